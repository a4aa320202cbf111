"""``LoraBranch`` (one A/B pair) and ``MSPLoraLinear``, the drop-in replacement for ``nn.Linear``.

An ``MSPLoraLinear`` *owns* its layer-specific branch and only *references* its global and mid branches:
those are shared with other layers, so exactly one module (``MSPLoraBank`` after ``apply_msplora``, or your
own container when building layers by hand) must own them. Holding the branch modules rather than their
tensors matters: DDP and FSDP2 swap the Parameters of the module that owns them, and each forward reads the
current ones.

Two ways to run a layer, chosen in one place (``MSPLoraLinear.forward``):

- *fused*: a plain ``nn.Linear``/``Conv1D`` without hooks. The op reads ``base_layer.weight`` and computes
  ``x W^T + b + sum_s c_s (D_s(x) A_s^T) B_s^T`` in one ``msplora_linear`` call.
- *base call*: every other base layer (a bitsandbytes ``Linear4bit``/``Linear8bitLt``, any ``nn.Linear``
  subclass, a layer carrying forward/backward hooks such as accelerate's offload hooks, weights or input on
  the meta device). The base layer is *called*, so its own kernel and its hooks run, and :func:`lowrank_term`
  adds ``sum_s c_s (D_s(x) A_s^T) B_s^T``. The two parts stay separate, so a fused dequantise-GEMM-plus-
  low-rank kernel for 4-bit bases plugs into that one branch.

Both follow the same dropout contract: one independent inverted-dropout mask per branch
(``D_s(x) = mask_s * x / (1 - p)``), identity in eval mode.
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from msplora_kernels import msplora_linear, msplora_lowrank
from msplora_kernels.dispatch import check_backend_name
from msplora_kernels.reference import Branch

from . import quant

try:  # FSDP2 keeps sharded parameters as DTensors
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch builds without distributed
    DTensor = None

try:  # GPT-2 style layers store their weight transposed
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is optional for the layer itself
    Conv1D = None


def is_conv1d(module: nn.Module) -> bool:
    return Conv1D is not None and isinstance(module, Conv1D)


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its class's ``forward``: module or global forward/backward
    hooks, or a ``forward`` replaced on the instance (accelerate's ``add_hook_to_module`` does that)."""
    from torch.nn.modules import module as torch_module

    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
        or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
        or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks
        or "forward" in module.__dict__ or getattr(module, "_hf_hook", None) is not None
    )


def is_plain_linear(module: nn.Module) -> bool:
    """An exact ``nn.Linear`` or ``Conv1D`` (no subclass) whose weight is an ordinary tensor: what the fused op
    computes exactly as the layer's own forward would."""
    if not (type(module) is nn.Linear or (Conv1D is not None and type(module) is Conv1D)):
        return False
    return type(module.weight) in (nn.Parameter, torch.Tensor) and (
        module.bias is None or type(module.bias) in (nn.Parameter, torch.Tensor)
    )


def base_layer_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its weight's device, or, for a layer offloaded by accelerate (weight on the
    meta device between calls), its hook's execution device. Adapters are made there."""
    weight = getattr(module, "weight", None)
    device = weight.device if weight is not None else torch.device("cpu")
    if device.type == "meta":
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]):  # accelerate's SequentialHook holds several
            execution = getattr(h, "execution_device", None)
            if isinstance(execution, dict):  # one device per tensor name
                execution = next(iter(execution.values()), None)
            if execution is not None:
                return torch.device(f"cuda:{execution}" if isinstance(execution, int) else execution)
    return device


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # devices without autocast (meta): "unknown device type for autocast"
        return False


def lowrank_term(x: torch.Tensor, branches: Sequence[Branch], dropout_p: float = 0.0,
                 training: bool = False, backend: str = "auto") -> torch.Tensor:
    """``sum_s c_s (D_s(x) A_s^T) B_s^T`` for branches ``(A_s, B_s, c_s)``, ``D_s`` an independent inverted
    dropout per branch (identity when not training or ``dropout_p == 0``): ``msplora_kernels.msplora_lowrank``
    (the backend's shrink and expand without the base GEMM: Triton kernels on CUDA under ``auto``, so autograd
    keeps no dropped copy of x) after moving the adapters to ``x``'s device. Shapes: x (..., K), A_s (r_s, K),
    B_s (N, r_s) -> (..., N).
    """
    return msplora_lowrank(x, [(a.to(x.device), b.to(x.device), c) for a, b, c in branches], dropout_p, training,
                           backend)


def linear_features(module: nn.Module) -> Tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a ``transformers`` ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"MSPLoRA adapts nn.Linear and transformers Conv1D layers, got {type(module).__name__}")


_FSDP_CACHE: dict = {"states": -1, "roots": [], "managed": frozenset()}


def _fsdp_managed_modules() -> frozenset:
    """ids of every module inside a module passed to FSDP2's ``fully_shard``; recomputed when the number of
    composable-API states (one per ``fully_shard`` call, weakly held) changes or one of those modules is gone
    (so that a freed module's id, which Python reuses, never stays in the set)."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch builds without distributed
        return frozenset()
    if len(_module_state_mapping) != _FSDP_CACHE["states"] or any(r() is None for r in _FSDP_CACHE["roots"]):
        roots = [m for m in list(_module_state_mapping.keys()) if isinstance(m, FSDPModule)]
        _FSDP_CACHE["states"] = len(_module_state_mapping)
        _FSDP_CACHE["roots"] = [weakref.ref(m) for m in roots]
        _FSDP_CACHE["managed"] = frozenset(id(s) for m in roots for s in m.modules())
    return _FSDP_CACHE["managed"]


def _check_shared_branches_sharded(layer: "MSPLoraLinear") -> None:
    """Refuse FSDP2 with the decoder layers sharded but not the module owning the shared (global and mid)
    branches (the root, through ``msplora_bank``): each rank would train its own copy of them, their gradients
    never reduced, silently. Only with a process group of 2 or more ranks; once checked for the current sharding
    it costs a few comparisons per call."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    managed = _fsdp_managed_modules()
    if layer._fsdp_checked is managed:
        return
    shared = [b for b in layer._shared if b is not None]
    if managed and id(layer) in managed and any(id(b) not in managed for b in shared):
        raise RuntimeError(
            "FSDP2 shards this MSPLoRA layer but not the module that owns its shared (global and mid) branches, "
            "model.msplora_bank: their gradients would not be reduced across ranks and every rank would train its "
            "own copy. Shard the root model too, after the decoder layers: `for layer in model.model.layers: "
            "fully_shard(layer)`, then `fully_shard(model)`"
        )
    layer._fsdp_checked = managed


class LoraBranch(nn.Module):
    """One low-rank pair: ``delta_y = scaling * (x A^T) B^T`` with A (rank, in), B (out, rank)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        use_rslora: bool = False,
        init_weights: Union[bool, str] = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = rank
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.reset_parameters(init_weights)

    @torch.no_grad()
    def reset_parameters(self, init_weights: Union[bool, str] = True) -> None:
        if init_weights == "gaussian":
            nn.init.normal_(self.A, std=1.0 / self.rank)
        else:  # PEFT's default, as for nn.Linear
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if init_weights is False:  # both random: a non-trivial adapter, for tests
            nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.B)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A``, the (out, in) update this branch adds to a weight."""
        return (self.B @ self.A) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, in={self.A.shape[1]}, out={self.B.shape[0]}, scaling={self.scaling:g}"


class MSPLoraLinear(nn.Module):
    """``base_layer(x) + sum over (global, mid, layer) of scaling_s * (drop_s(x) A_s^T) B_s^T``.

    ``base_layer`` (an ``nn.Linear``, ``Conv1D`` or bitsandbytes 4-/8-bit linear layer) is frozen and kept as
    is; ``forward`` either runs the fused op on its weight or calls it (see the module docstring).
    ``layer_branch`` is owned by this module; ``global_branch`` and ``mid_branch`` are only referenced (see the
    module docstring). Any branch may be ``None`` (a disabled scale).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        global_branch: Optional[LoraBranch] = None,
        mid_branch: Optional[LoraBranch] = None,
        layer_branch: Optional[LoraBranch] = None,
        dropout: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear_features(base_layer)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        for name, branch in (("global", global_branch), ("mid", mid_branch), ("layer", layer_branch)):
            if branch is not None and tuple(branch.A.shape[1:]) + tuple(branch.B.shape[:1]) != (
                self.in_features,
                self.out_features,
            ):
                raise ValueError(
                    f"{name} branch is for a ({branch.A.shape[1]} -> {branch.B.shape[0]}) layer, "
                    f"base layer is ({self.in_features} -> {self.out_features})"
                )
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.layer_branch = layer_branch
        self._shared = (global_branch, mid_branch)  # a tuple: referenced, not registered
        self.dropout = float(dropout)
        self.backend = check_backend_name(backend)
        self.merged = False
        self.disabled = False
        self._fsdp_checked = None  # the FSDP2 sharding _check_shared_branches_sharded last accepted

    def branches(self) -> Tuple[Optional[LoraBranch], Optional[LoraBranch], Optional[LoraBranch]]:
        """The (global, mid, layer) branches; ``None`` for a disabled scale."""
        return self._shared[0], self._shared[1], self.layer_branch

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (as PEFT's layers expose it: code that reads ``.weight.dtype`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def _active_branches(self):
        return [(b.A, b.B, b.scaling) for b in self.branches() if b is not None]

    def base_weight_and_bias(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The frozen weight as (out, in), a view for ``Conv1D``, and the bias."""
        weight = self.base_layer.weight
        return (weight.t() if is_conv1d(self.base_layer) else weight), self.base_layer.bias

    def calls_base_layer(self, x: torch.Tensor) -> bool:
        """Whether ``forward`` calls ``base_layer`` and adds :func:`lowrank_term` instead of running the fused op
        on its weight: for anything but a plain, hook-free ``nn.Linear``/``Conv1D`` whose weight is on ``x``'s
        device, and for the meta device (which the fused op does not run on)."""
        base = self.base_layer
        if not is_plain_linear(base) or has_hooks(base):
            return True
        return x.device.type == "meta" or base.weight.device != x.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = self._active_branches()
        if self.disabled or self.merged or not branches:
            return self.base_layer(x)
        if DTensor is not None and any(isinstance(a, DTensor) for a, _, _ in branches):
            raise RuntimeError(
                "MSPLoRA branch weights are still sharded (DTensor) when the layer runs: FSDP2 gathers a module's "
                "parameters only when that module's forward runs, and msplora_bank and LoraBranch modules are never "
                "called. Do not fully_shard model.msplora_bank or a LoraBranch: shard the decoder layers, then the "
                "root model (whose forward gathers the bank)"
            )
        _check_shared_branches_sharded(self)
        if self.calls_base_layer(x):
            # The one dispatch place for non-plain bases (quantised, hooked, offloaded, meta); a fused
            # dequantise-GEMM-plus-low-rank kernel for 4-bit bases would replace these two lines.
            if x.device.type != "meta" and any(t.device.type == "meta" for a, b, _ in branches for t in (a, b)):
                raise RuntimeError(
                    "MSPLoRA adapter weights are on the meta device while the input is on "
                    f"{x.device}: the adapters were offloaded (accelerate.cpu_offload, dispatch_model or a "
                    "device_map applied after apply_msplora), and their modules are never called, so no hook "
                    "loads them. Offload the base model first, then apply_msplora: adapters are then made on "
                    "the execution device"
                )
            y = self.base_layer(x)
            return y + lowrank_term(x, branches, self.dropout, self.training, self.backend).to(y.dtype)
        weight, bias = self.base_weight_and_bias()
        # Shared branches live on one device; a device_map may have put this layer on another.
        branches = [(a.to(weight.device), b.to(weight.device), c) for a, b, c in branches]
        return msplora_linear(x, weight, bias, branches, self.dropout, self.training, self.backend)

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) update of all branches together, in fp32."""
        delta = None
        for branch in self.branches():
            if branch is not None:
                d = branch.delta_weight().float()
                delta = d if delta is None else delta + d
        return delta if delta is not None else torch.zeros(self.out_features, self.in_features)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight; the forward then runs the base layer alone."""
        if self.merged:
            warnings.warn("MSPLoraLinear is already merged; nothing to do", stacklevel=2)
            return
        self._add_to_base(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (equal up to rounding: not bit-exact, even in fp32)."""
        if not self.merged:
            warnings.warn("MSPLoraLinear is not merged; nothing to do", stacklevel=2)
            return
        self._add_to_base(-self.delta_weight())
        self.merged = False

    def _add_to_base(self, delta: torch.Tensor) -> None:
        if quant.is_bnb_quantized(self.base_layer):  # dequantise, add, requantise (warns about the rounding)
            quant.add_to_quantized_weight(self.base_layer, delta)
            return
        weight = self.base_layer.weight
        delta = delta.to(weight.device)
        weight.add_((delta.t() if is_conv1d(self.base_layer) else delta).to(weight.dtype))

    def extra_repr(self) -> str:
        ranks = "/".join(str(b.rank) if b is not None else "0" for b in self.branches())
        return f"ranks={ranks}, dropout={self.dropout:g}, backend={self.backend!r}, merged={self.merged}"
