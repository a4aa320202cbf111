"""MSPLoRA linear as one differentiable op: an autograd Function (eager) or custom ops (compiled) → functional.

The forward returns ``(y, S)``; autograd keeps only ``x``, ``S`` (M x R) and the dropout seed, and the
backward recomputes the dropout masks (the PyTorch backend, in eager mode, hands its backward the dropped
positions instead: int32, one per dropped element). The gradient maths is in ``torch_backend``'s docstring; every
backend implements the same ``forward``/``backward`` contract.

Two entry points to the same backend calls: under ``torch.compile`` the custom ops ``msplora::linear_forward``
and ``msplora::linear_backward`` (so the graph traces), in eager mode ``_MSPLoraLinearFunction``, which takes
each branch's A and B as inputs and concatenates them itself: a custom op's dispatch and a differentiable
``torch.cat`` cost about as much as the low-rank maths at the sizes of a small model's layers, paid by every
adapted layer in forward and backward.

The eager path concatenates the adapters (``A_cat``, ``B_cat``, cast to x's dtype) in one launch on the
Triton backend (``triton_backend.pack_adapters``) and keeps them per layer until its parameters change
(``_AdapterCache``), so repeated forwards with unchanged adapters skip that work. An entry is valid only
while every adapter tensor is the same object with the same storage address, version counter, shape,
strides, dtype and device: in-place changes through PyTorch (``optimizer.step()``, ``load_state_dict``,
``p.add_()`` under ``torch.no_grad()``) are seen; every ``torch.optim`` step also empties the cache (a
global step hook, which covers optimizers that write through raw pointers). Writes that bypass version
counters are not seen: ``p.data.add_()`` (``torch.autograd.gradcheck`` perturbs its inputs so, as do EMA
and initialisation code), ``p.data = t`` with ``t`` viewing the same memory as before
(``torch.nn.utils.vector_to_parameters`` from a reused flat buffer), and FSDP, which re-gathers parameters
with their version counters preserved.
Hence ``MSPLORA_ADAPTER_CACHE``, off (``0``) by default: a stale entry would be a silently wrong output, and
manual updates such as ``p.data -= lr * p.grad`` are common training-loop code. ``auto`` caches calls that
need no gradient (evaluation, generation: many forwards per parameter state, where one launch per layer
saved matters most), ``1`` also training calls (gradient accumulation, activation checkpointing's
recomputation). Without the cache the packing is still one launch (Triton) per layer call.
The cache is off under ``torch.distributed``; ``clear_adapter_cache()`` empties it. Entries are plain
tensors made inside the autograd Function's forward (never part of a graph), dropped when any of their
parameters is freed (weak references), and at most ``_AdapterCache.max_entries``.
"""
from __future__ import annotations

import collections
import functools
import os
import threading
import weakref
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .dispatch import get_backend, resolve_backend
from .reference import Branch, msplora_linear_ref

_SEED_HIGH = 2**31 - 1  # Philox seeds in Triton are 32-bit
CACHE_ENV_VAR = "MSPLORA_ADAPTER_CACHE"


@torch.library.custom_op("msplora::linear_forward", mutates_args=())
def _linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    a_cat: torch.Tensor,
    b_cat: torch.Tensor,
    ranks: List[int],
    scalings: List[float],
    p: float,
    seed: torch.Tensor,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return get_backend(backend).forward(x, weight, bias, a_cat, b_cat, ranks, scalings, p, int(seed))


@_linear_forward.register_fake
def _(x, weight, bias, a_cat, b_cat, ranks, scalings, p, seed, backend):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], a_cat.shape[0]))


@torch.library.custom_op("msplora::linear_backward", mutates_args=())
def _linear_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    a_cat: torch.Tensor,
    b_cat: torch.Tensor,
    ranks: List[int],
    scalings: List[float],
    p: float,
    seed: torch.Tensor,
    backend: str,
    need_dx: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, da, db = get_backend(backend).backward(
        dy, x, s, weight, a_cat, b_cat, ranks, scalings, p, int(seed), need_dx
    )
    return (dx if dx is not None else x.new_empty(0)), da, db


@_linear_backward.register_fake
def _(dy, x, s, weight, a_cat, b_cat, ranks, scalings, p, seed, backend, need_dx):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty(0)
    return dx, torch.empty_like(a_cat), torch.empty_like(b_cat)


def _setup_context(ctx, inputs, output):
    x, weight, bias, a_cat, b_cat, ranks, scalings, p, seed, backend = inputs
    ctx.save_for_backward(x, output[1], weight, a_cat, b_cat, seed)
    ctx.meta = (list(ranks), list(scalings), p, backend, bias is not None)


def _backward(ctx, dy, _ds):
    x, s, weight, a_cat, b_cat, seed = ctx.saved_tensors
    ranks, scalings, p, backend, has_bias = ctx.meta
    need_dx, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    dx, da, db = torch.ops.msplora.linear_backward(
        dy, x, s, weight, a_cat, b_cat, ranks, scalings, p, seed, backend, need_dx
    )
    # The base layer is normally frozen; these cover training code that unfreezes it.
    dweight = dy.t() @ x if need_dw else None
    dbias = dy.sum(0) if (need_db and has_bias) else None
    return (dx if need_dx else None), dweight, dbias, da, db, None, None, None, None, None


_linear_forward.register_autograd(_backward, setup_context=_setup_context)

_NO_SEED = torch.zeros((), dtype=torch.int64)
_call_state = threading.local()


def _check_shapes(x: torch.Tensor, weight: torch.Tensor, branches: Sequence[Branch]) -> None:
    n, k = weight.shape
    if x.shape[-1] != k:
        rows = x.numel() // max(x.shape[-1], 1)
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({rows}x{x.shape[-1]} and {k}x{n})")
    if weight.device != x.device:
        raise RuntimeError(f"msplora_linear: input is on {x.device} but weight is on {weight.device}")
    _check_branches(x, k, n, branches, "msplora_linear")


def _check_dropout(dropout_p: float, op: str) -> None:
    """0 <= p < 1, as ``MSPLoraLinear`` requires (p = 1 would drop everything and divide by 1 - p = 0)."""
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")


def _check_branches(x: torch.Tensor, k: int, n: int, branches: Sequence[Branch], op: str) -> None:
    """Each branch ``(A, B, c)`` has A (r, k) and B (n, r), on x's device."""
    for i, (a, b, _) in enumerate(branches):
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != k or b.shape[0] != n or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"branch {i}: expected A of shape (r, {k}) and B of shape ({n}, r), "
                f"got A {tuple(a.shape)} and B {tuple(b.shape)}"
            )
        for what, t in (("A", a), ("B", b)):
            if t.device != x.device:
                raise RuntimeError(f"{op}: input is on {x.device} but branch {i} {what} is on {t.device}")


def msplora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    branches: Sequence[Branch],
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """``y = x W^T + b + sum_s scaling_s * (drop_s(x) A_s^T) B_s^T`` for branches ``(A_s, B_s, scaling_s)``.

    Same arguments as :func:`msplora_linear_ref`; ``x`` may have any leading shape. Adapter weights are
    cast to the activation dtype (they may be kept in fp32); under autocast everything runs in the
    autocast dtype, as ``nn.Linear`` does.
    """
    _check_shapes(x, weight, branches)
    _check_dropout(dropout_p, "msplora_linear")
    name = resolve_backend(backend, x.device)
    if name == "reference":  # adapters may be fp32 beside half-precision activations, as below
        cast = [(a.to(x.dtype), b.to(x.dtype), c) for a, b, c in branches]
        return msplora_linear_ref(x, weight, bias, cast, dropout_p, training)
    if not branches:
        return F.linear(x, weight, bias)

    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return msplora_linear(
                x.to(dtype),
                weight.to(dtype),
                bias.to(dtype) if bias is not None else None,
                branches,  # every path below casts the adapters to x's dtype (and their gradients back)
                dropout_p,
                training,
                name,
            )
    if weight.dtype != x.dtype:
        raise RuntimeError(
            f"expected input and weight to have the same dtype, but got {x.dtype} and {weight.dtype}"
        )

    p = float(dropout_p) if training else 0.0
    ranks = [a.shape[0] for a, _, _ in branches]
    scalings = [float(c) for _, _, c in branches]
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling():
        if len(branches) == 1:
            a_cat, b_cat = branches[0][0].to(x.dtype), branches[0][1].to(x.dtype)
        else:
            a_cat = torch.cat([a for a, _, _ in branches]).to(x.dtype)
            b_cat = torch.cat([b for _, b, _ in branches], dim=1).to(x.dtype)
        seed = torch.randint(_SEED_HIGH, (), dtype=torch.int64) if p > 0 else _NO_SEED
        y, _ = torch.ops.msplora.linear_forward(x2d, weight, bias, a_cat, b_cat, ranks, scalings, p, seed, name)
    else:
        seed_value = int(torch.randint(_SEED_HIGH, (), dtype=torch.int64)) if p > 0 else 0
        y = _MSPLoraLinearFunction.apply(x2d, weight, bias, ranks, scalings, p, seed_value, name,
                                         *[a for a, _, _ in branches], *[b for _, b, _ in branches])
    return y.reshape(*lead, weight.shape[0])


def msplora_lowrank(
    x: torch.Tensor, branches: Sequence[Branch], dropout_p: float = 0.0, training: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """``sum_s scaling_s * (drop_s(x) A_s^T) B_s^T`` alone, without a base GEMM: for layers whose base layer is
    called on its own (bitsandbytes 4/8-bit, hooked or offloaded layers). ``backend`` as for
    :func:`msplora_linear` (``auto``: the Triton shrink and expand kernels on CUDA, the PyTorch backend on the
    CPU); autograd keeps x, S and the dropout's seed (PyTorch backend: the dropped positions), never a dropped
    copy of x. Adapters are cast to x's dtype, or everything to the autocast dtype under autocast. Under
    ``torch.compile`` tracing, on the meta device and for ``backend="reference"`` it runs the same maths in
    plain torch ops instead."""
    if not branches:
        raise ValueError("msplora_lowrank needs at least one branch")
    k, n = x.shape[-1], branches[0][1].shape[0]
    _check_branches(x, k, n, branches, "msplora_lowrank")
    _check_dropout(dropout_p, "msplora_lowrank")
    device_type = x.device.type
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return msplora_lowrank(x.to(dtype), [(a.to(dtype), b.to(dtype), c) for a, b, c in branches],
                                   dropout_p, training, backend)
    p = float(dropout_p) if training else 0.0
    name = "reference" if device_type == "meta" else resolve_backend(backend, x.device)
    if torch.compiler.is_compiling() or name == "reference":
        parts = [F.linear(F.dropout(x, p, True) if p > 0 else x, a.to(x.dtype) * c) for a, _, c in branches]
        return F.linear(torch.cat(parts, dim=-1), torch.cat([b.to(x.dtype) for _, b, _ in branches], dim=1))
    ranks = [a.shape[0] for a, _, _ in branches]
    scalings = [float(c) for _, _, c in branches]
    seed_value = int(torch.randint(_SEED_HIGH, (), dtype=torch.int64)) if p > 0 else 0
    y = _MSPLoraLinearFunction.apply(x.reshape(-1, k), None, None, ranks, scalings, p, seed_value, name,
                                     *[a for a, _, _ in branches], *[b for _, b, _ in branches])
    return y.reshape(*x.shape[:-1], n)


class _MSPLoraLinearFunction(torch.autograd.Function):
    """Eager autograd for the backend contract; inputs ``(x, W, b, ranks, scalings, p, seed, backend, A_1..A_n,
    B_1..B_n)``. Adapter weights are cast to x's dtype here and their gradients back to theirs."""

    @classmethod
    def apply(cls, *args):
        # forward runs with grad mode off: the cache needs to know whether this call will be differentiated
        _call_state.grad_enabled = torch.is_grad_enabled()
        return super().apply(*args)

    @staticmethod
    def forward(ctx, x, weight, bias, ranks, scalings, p, seed, backend, *adapters):
        n = len(ranks)
        a_list, b_list = adapters[:n], adapters[n:]
        training_call = getattr(_call_state, "grad_enabled", True) and any(ctx.needs_input_grad)
        a_cat, b_cat = _adapter_cache.get(a_list, b_list, x.dtype, backend, training_call)
        kept: List[torch.Tensor] = []
        if backend == "torch" and p > 0:  # the PyTorch backend can hand its dropped positions to backward
            y, s = get_backend(backend).forward(x, weight, bias, a_cat, b_cat, ranks, scalings, p, seed,
                                                keep_positions=kept)
        else:
            y, s = get_backend(backend).forward(x, weight, bias, a_cat, b_cat, ranks, scalings, p, seed)
        ctx.save_for_backward(x, s, weight, a_cat, b_cat, *kept)
        ctx.meta = (ranks, scalings, p, seed, backend, bias is not None,
                    [a.dtype for a in a_list], [b.dtype for b in b_list])
        return y

    @staticmethod
    def backward(ctx, dy):
        x, s, weight, a_cat, b_cat, *kept = ctx.saved_tensors
        ranks, scalings, p, seed, backend, has_bias, a_dtypes, b_dtypes = ctx.meta
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        extra = {"positions": kept[0]} if kept else {}
        per_branch = backend == "triton" and len(set(a_dtypes)) == 1 and len(set(b_dtypes)) == 1
        if per_branch:  # each branch's gradient contiguous and in its dtype: autograd copies nothing
            extra["branch_grads"] = (a_dtypes[0], b_dtypes[0])
        dx, da, db = get_backend(backend).backward(
            dy.contiguous(), x, s, weight, a_cat, b_cat, ranks, scalings, p, seed, need_dx, **extra
        )
        # The base layer is normally frozen; these cover training code that unfreezes it.
        dweight = dy.t() @ x if need_dw else None
        dbias = dy.sum(0) if (need_db and has_bias) else None
        if per_branch:
            grads_a, grads_b = da, db
        else:
            grads_a = [g.to(t) for g, t in zip(da.split(ranks), a_dtypes)]
            grads_b = [g.to(t) for g, t in zip(db.split(ranks, dim=1), b_dtypes)]
        return (dx if need_dx else None), dweight, dbias, None, None, None, None, None, *grads_a, *grads_b


def _concatenate(a_list, b_list, dtype: torch.dtype, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """A_cat (R, K) and B_cat (N, R) in ``dtype``: one Triton launch for both on the Triton backend, else
    ``torch.cat`` and a cast."""
    if backend == "triton":
        return get_backend(backend).pack_adapters(a_list, b_list, dtype)
    n = len(a_list)
    a_cat = (a_list[0] if n == 1 else torch.cat(a_list)).to(dtype)
    b_cat = (b_list[0] if n == 1 else torch.cat(b_list, dim=1)).to(dtype)
    return a_cat, b_cat


def _needs_copy(tensors, dtype: torch.dtype) -> bool:
    return len(tensors) > 1 or tensors[0].dtype != dtype


class _AdapterCache:
    """Per layer (its tuple of adapter tensors): the concatenated, cast adapters, valid while those tensors
    are unchanged (the module docstring says what that covers). Bounded, least recently used first out."""

    max_entries = 4096  # a 7B model with every projection adapted has 224 layers

    def __init__(self) -> None:
        self._entries: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
        self._lock = threading.RLock()  # lookups, inserts, clears; re-entrant: a weakref callback may run
        # (garbage collection) while this thread holds it
        self._hooked = False
        self.hits = self.misses = 0

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def enabled(training_call: bool) -> bool:
        setting = os.environ.get(CACHE_ENV_VAR, "0")
        if setting not in ("auto", "0", "1"):
            raise ValueError(f"${CACHE_ENV_VAR} must be auto, 0 or 1, got {setting!r}")
        if setting == "0" or (setting == "auto" and training_call):
            return False
        return not (torch.distributed.is_available() and torch.distributed.is_initialized())

    @staticmethod
    def _state(tensors) -> tuple:
        return tuple((t.data_ptr(), t._version, t.shape, t.stride(), t.dtype, t.device) for t in tensors)

    def get(self, a_list, b_list, dtype: torch.dtype, backend: str,
            training_call: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        if not (_needs_copy(a_list, dtype) or _needs_copy(b_list, dtype)):
            return a_list[0], b_list[0]  # the parameters themselves: nothing to cache
        tensors = (*a_list, *b_list)
        if not self.enabled(training_call) or any(t.is_inference() for t in tensors):  # (no version counters)
            return _concatenate(a_list, b_list, dtype, backend)
        inference = torch.is_inference_mode_enabled()  # tensors made there may only be used there
        key = (backend, dtype, inference, tuple(id(t) for t in tensors))
        state = self._state(tensors)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[1] == state and all(ref() is t for ref, t in zip(entry[0], tensors)):
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[2], entry[3]
            self.misses += 1
        a_cat, b_cat = _concatenate(a_list, b_list, dtype, backend)
        self._hook_optimizers()
        drop = functools.partial(_AdapterCache._forget, weakref.ref(self), key)
        with self._lock:
            self._entries[key] = (tuple(weakref.ref(t, drop) for t in tensors), state, a_cat, b_cat)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return a_cat, b_cat

    @staticmethod
    def _forget(cache_ref, key, _dead) -> None:
        cache = cache_ref()
        if cache is not None:
            with cache._lock:
                cache._entries.pop(key, None)

    def _hook_optimizers(self) -> None:
        if not self._hooked:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            register_optimizer_step_post_hook(lambda *_: self.clear())
            self._hooked = True


_adapter_cache = _AdapterCache()


def clear_adapter_cache() -> None:
    """Forget every cached concatenation of adapter weights (needed only after changing adapter weights in a
    way PyTorch does not track, e.g. ``p.data.add_()`` outside an optimizer step)."""
    _adapter_cache.clear()
