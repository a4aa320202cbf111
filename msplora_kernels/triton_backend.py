"""Triton MSPLoRA backend: the ``forward``/``backward``/``dropout_masks`` contract of ``torch_backend``.

Notation as in ``torch_backend``: x (M, K), W (N, K), A = [A_1; ...; A_n] (R, K), B = [B_1 | ... | B_n]
(N, R), c_s = scaling_s / (1 - p), D_s(x) = keep_s ⊙ x, A' = A with branch s's rows times c_s (R x K, made
on the host: tiny next to x).

Forward (two launches, x read twice: once by the shrink, for all branches, once by the GEMM):

    S = [D_1(x) A'_1^T | ... | D_n(x) A'_n^T]            _shrink_kernel, one Philox draw per element (M, R)
    y = x W^T + b + S B^T                                 _matmul_lowrank_kernel, one write of y

Backward, given dy (M, N):

    dS = dy B                                             narrow GEMM                      (M, R)
    dB = dy^T S                                           narrow GEMM split over M         (N, R)
    dx = dy W + sum_s keep_s ⊙ (dS_s A'_s)                one GEMM, masks redrawn in its epilogue
    dA_s = c_s dS_s^T D_s(x)                              _lowrank_grad_a_kernel, masks redrawn as x streams

Reductions over M (dB, dA) are cut into a fixed number of slices written to an fp32 buffer and summed by
``torch.sum``: no atomics anywhere, so gradients are bit-identical run to run (whether or not
``torch.are_deterministic_algorithms_enabled()``). Masks come from one Philox draw per pair of elements of x,
keyed by ``seed`` and the pair's offset, whose four words serve up to four branches (see ``_triton/kernels.py``);
they are drawn three times per training step (shrink, dx, dA) and never stored. Saved for backward: x, S and
the seed, as the contract asks.

Paths: ``fused`` runs the GEMMs above; ``unfused`` runs x W^T + b and dy W with ``torch`` (cuBLAS) and adds the
low-rank terms with the same kernels in accumulate mode (y += S B^T, dx += sum_s keep_s ⊙ (dS_s A'_s)),
which costs one more read and write of y and dx. ``auto`` asks ``_triton.tuning.prefer_fused``.
``forced_path`` overrides the choice (for benchmarks); ``linear`` is the Triton GEMM alone (x W^T + b).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import dispatch
from ._triton import kernels, tuning
from .torch_backend import _branch_coefficients, _scaled_rows

PATHS = ("auto", "fused", "unfused")
MAX_BRANCHES = 4  # one Philox draw gives four words: one mask per branch
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MASK_BITS = 16  # the kernels compare 16 random bits per element and branch with round(p * 2^16)
_forced = {"path": "auto"}


@contextlib.contextmanager
def forced_path(path: str) -> Iterator[None]:
    """Within the block, run the fused GEMM (``"fused"``), cuBLAS + low-rank kernels (``"unfused"``) or let the
    ``auto`` rule choose."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    previous = _forced["path"]
    _forced["path"] = path
    try:
        yield
    finally:
        _forced["path"] = previous


def uses_fused_path(m: int, n: int, k: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a call with these sizes runs the fused GEMM under the current ``forced_path``."""
    return tuning.prefer_fused(m, n, k, device, dtype, forced=_forced["path"])


def _on(device: torch.device):
    """Launch on ``device``: Triton launches on the current CUDA device, which may not be the tensors'."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_device(device: torch.device) -> None:
    if device.type != "cuda" and not dispatch.triton_interpreted():
        raise RuntimeError(
            f"triton backend: tensors are on {device}; the kernels run on CUDA tensors, or on CPU tensors "
            "only under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)"
        )


def _check_tensors(**tensors: Optional[torch.Tensor]) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.device != first.device:
            raise RuntimeError(f"triton backend: {first_name} is on {first.device} but {name} is on {t.device}")
        if t.dtype != first.dtype:
            raise RuntimeError(f"triton backend: {first_name} is {first.dtype} but {name} is {t.dtype}")
    if first.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"triton backend: dtype {first.dtype} is not supported (use one of {_SUPPORTED_DTYPES})")
    _check_device(first.device)


def _check_branches(ranks: Sequence[int]) -> None:
    if not 1 <= len(ranks) <= MAX_BRANCHES:
        raise ValueError(
            f"triton backend: expected 1 to {MAX_BRANCHES} branches, got {len(ranks)}; use backend='torch' for more"
        )
    if min(ranks) < 1:
        raise ValueError(f"triton backend: every branch passed needs rank >= 1, got ranks {list(ranks)}")


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use TF32 tensor cores only where PyTorch's matmuls would (``allow_tf32``)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc_constexpr(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _threshold(p: float) -> int:
    return round(p * 2**_MASK_BITS)


@functools.lru_cache(maxsize=256)
def _rank_bounds(ranks: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[0, r_1, r_1 + r_2, ..., R] as int32 on ``device``: the branches' rank columns (cached: one copy per
    rank layout, not one per call)."""
    bounds = [0]
    for rank in ranks:
        bounds.append(bounds[-1] + rank)
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def _launch_matmul(
    out: torch.Tensor,
    lhs: Optional[torch.Tensor],
    rhs: Optional[torch.Tensor],
    config: tuning.MatmulConfig,
    bias: Optional[torch.Tensor] = None,
    low_rank: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    masked: Optional[Tuple[Sequence[int], float, int]] = None,
    accumulate: bool = False,
    splits: int = 1,
) -> None:
    """out (+)= lhs rhs (+ bias + low-rank term): ``out`` (M, N), or (splits, M, N) partial sums over slices
    of the inner dimension.

    ``low_rank`` = (L, U) adds L U; ``masked`` = (ranks, p, seed) masks each branch's part of it with its
    dropout mask, drawn at out's elements (out is then x-shaped). ``lhs``/``rhs`` None: no main product.
    """
    m, n = out.shape[-2:]
    if out.numel() == 0:
        return
    operand = lhs if lhs is not None else low_rank[0]
    if lhs is None:
        k = 0
        lhs = rhs = out
        stride_pm = stride_pk = stride_qk = stride_qn = 0
    else:
        k = lhs.shape[1]
        stride_pm, stride_pk = lhs.stride()
        stride_qk, stride_qn = rhs.stride()
    if low_rank is not None:
        l_mat, u_mat = low_rank
        rank = l_mat.shape[1]
        stride_lm, stride_lr = l_mat.stride()
        stride_ur, stride_un = u_mat.stride()
    else:
        l_mat = u_mat = out
        rank = stride_lm = stride_lr = stride_ur = stride_un = 0
    if masked is not None:
        ranks, drop_p, seed = masked
        bounds = _rank_bounds(tuple(ranks), out.device)
        n_masked, threshold, widest = len(ranks), _threshold(drop_p), max(ranks)
    else:
        bounds, n_masked, seed, threshold, widest = out, 0, 0, 0, rank
    stride_cs = out.stride(0) if out.dim() == 3 else 0
    stride_cm, stride_cn = out.stride()[-2:]
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), splits)
    with _on(out.device):
        kernels._matmul_lowrank_kernel[grid](
            lhs, rhs, out, bias if bias is not None else out, l_mat, u_mat, bounds,
            m, n, k, rank, seed, threshold,
            stride_pm, stride_pk, stride_qk, stride_qn, stride_cs, stride_cm, stride_cn,
            stride_lm, stride_lr, stride_ur, stride_un,
            HAS_BIAS=bias is not None, HAS_LOW_RANK=low_rank is not None, MASKED_BRANCHES=n_masked,
            ACCUMULATE=accumulate, SPLIT_K=splits,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            BLOCK_R=tuning.rank_block(widest, config.max_block_r),
            GROUP_M=config.group_m,
            DOT_PRECISION=_dot_precision(operand.dtype), ACC_DTYPE=_acc_constexpr(operand.dtype),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )


def linear(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x2d W^T + bias`` by the Triton GEMM alone (no low-rank term): the baseline against cuBLAS."""
    _check_tensors(x=x2d, weight=weight, bias=bias)
    m, n = x2d.shape[0], weight.shape[0]
    out = torch.empty((m, n), device=x2d.device, dtype=x2d.dtype)
    if out.numel() > 0:
        _launch_matmul(out, x2d, weight.t(), tuning.matmul_config(x2d.device, x2d.dtype), bias=bias)
    return out


def _reduce_over_rows(
    p: torch.Tensor, q: torch.Tensor, out_dtype: torch.dtype, config: tuning.MatmulConfig
) -> torch.Tensor:
    """p q for a long inner dimension (rows of x): fp32 partial sums over slices, added by ``torch.sum``."""
    splits = tuning.reduction_splits(p.shape[1], p.device)
    partial = torch.empty((splits, p.shape[0], q.shape[1]), device=p.device, dtype=_accumulator(p.dtype))
    _launch_matmul(partial, p, q, config, splits=splits)
    return partial.sum(0).to(out_dtype)


def _rank_tiles(total_rank: int, config: tuning.LowRankConfig) -> Tuple[int, int]:
    """(BLOCK_R, tiles): the rank window of the shrink and dA kernels and how many windows cover R."""
    block_r = tuning.rank_block(total_rank, config.max_block_r)
    return block_r, triton.cdiv(total_rank, block_r)


def _shrink(x: torch.Tensor, a_scaled: torch.Tensor, ranks: Sequence[int], p: float, seed: int) -> torch.Tensor:
    m, k = x.shape
    total_rank = a_scaled.shape[0]
    s = torch.empty((m, total_rank), device=x.device, dtype=x.dtype)
    config = tuning.low_rank_config(x.device, x.dtype, masked=p > 0.0)
    block_r, rank_tiles = _rank_tiles(total_rank, config)
    grid = (triton.cdiv(m, config.block_m) * rank_tiles,)
    with _on(x.device):
        kernels._shrink_kernel[grid](
            x, a_scaled, s, _rank_bounds(tuple(ranks), x.device), m, k, total_rank, seed, _threshold(p),
            *x.stride(), *a_scaled.stride(), *s.stride(),
            MASKED_BRANCHES=len(ranks) if p > 0.0 else 0, RANK_TILES=rank_tiles,
            BLOCK_M=config.block_m, BLOCK_R=block_r, BLOCK_K=config.block_k,
            DOT_PRECISION=_dot_precision(x.dtype), ACC_DTYPE=_acc_constexpr(x.dtype),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return s


def _grad_a(
    ds: torch.Tensor, x: torch.Tensor, ranks: Sequence[int], coefs: Sequence[float], p: float, seed: int
) -> torch.Tensor:
    m, k = x.shape
    total_rank = ds.shape[1]
    config = tuning.low_rank_config(x.device, x.dtype, masked=p > 0.0)
    block_r, rank_tiles = _rank_tiles(total_rank, config)
    splits = tuning.reduction_splits(m, x.device)
    partial = torch.empty((splits, total_rank, k), device=x.device, dtype=_accumulator(x.dtype))
    grid = (rank_tiles, triton.cdiv(k, config.block_k), splits)
    with _on(x.device):
        kernels._lowrank_grad_a_kernel[grid](
            ds, x, partial, _rank_bounds(tuple(ranks), x.device), m, k, total_rank, seed, _threshold(p),
            *ds.stride(), *x.stride(), *partial.stride(),
            MASKED_BRANCHES=len(ranks) if p > 0.0 else 0, SPLIT_M=splits,
            BLOCK_M=config.block_m, BLOCK_R=block_r, BLOCK_K=config.block_k,
            DOT_PRECISION=_dot_precision(x.dtype), ACC_DTYPE=_acc_constexpr(x.dtype),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    da = partial.sum(0) if splits > 1 else partial[0]
    return _scaled_rows(da, ranks, coefs).to(x.dtype)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    a_cat: torch.Tensor,
    b_cat: torch.Tensor,
    ranks: Sequence[int],
    scalings: Sequence[float],
    p: float,
    seed: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_tensors(x=x, weight=weight, bias=bias, a_cat=a_cat, b_cat=b_cat)
    _check_branches(ranks)
    m, k = x.shape
    n = weight.shape[0]
    if m == 0:
        return x.new_empty((0, n)), x.new_empty((0, a_cat.shape[0]))
    a_scaled = _scaled_rows(a_cat, ranks, _branch_coefficients(ranks, scalings, p))
    s = _shrink(x, a_scaled, ranks, p, seed)
    low_rank = (s, b_cat.t())
    if uses_fused_path(m, n, k, x.device, x.dtype):
        y = torch.empty((m, n), device=x.device, dtype=x.dtype)
        _launch_matmul(y, x, weight.t(), tuning.matmul_config(x.device, x.dtype), bias=bias, low_rank=low_rank)
    else:
        y = torch.nn.functional.linear(x, weight, bias)
        _launch_matmul(y, None, None, tuning.epilogue_only_config(x.device), low_rank=low_rank, accumulate=True)
    return y, s


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    a_cat: torch.Tensor,
    b_cat: torch.Tensor,
    ranks: Sequence[int],
    scalings: Sequence[float],
    p: float,
    seed: int,
    need_dx: bool,
) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    _check_tensors(dy=dy, x=x, s=s, weight=weight, a_cat=a_cat, b_cat=b_cat)
    _check_branches(ranks)
    m, k = x.shape
    n = weight.shape[0]
    if m == 0:
        dx = x.new_empty((0, k)) if need_dx else None
        return dx, torch.zeros_like(a_cat), torch.zeros_like(b_cat)
    coefs = _branch_coefficients(ranks, scalings, p)
    width = a_cat.shape[0]
    narrow = tuning.narrow_matmul_config(x.device, x.dtype, width)

    ds = torch.empty((m, width), device=x.device, dtype=x.dtype)
    _launch_matmul(ds, dy, b_cat, narrow)
    db = _reduce_over_rows(dy.t(), s, b_cat.dtype, narrow)

    dx = None
    if need_dx:
        low_rank = (ds, _scaled_rows(a_cat, ranks, coefs))
        masked = (list(ranks), p, seed) if p > 0.0 else None
        dx = torch.empty((m, k), device=x.device, dtype=x.dtype)
        if uses_fused_path(m, n, k, x.device, x.dtype):
            config = tuning.matmul_config(x.device, x.dtype, masked=masked is not None)
            _launch_matmul(dx, dy, weight, config, low_rank=low_rank, masked=masked)
        else:
            torch.mm(dy, weight, out=dx)
            _launch_matmul(dx, None, None, tuning.epilogue_only_config(x.device), low_rank=low_rank, masked=masked,
                           accumulate=True)
    da = _grad_a(ds, x, ranks, coefs, p, seed)
    return dx, da, db


def dropout_masks(seed: int, n_branches: int, m: int, k: int, p: float, device: torch.device) -> torch.Tensor:
    """The keep-masks the kernels draw for ``seed``: (n_branches, M, K) booleans (for tests)."""
    if n_branches > MAX_BRANCHES:
        raise ValueError(f"triton backend: at most {MAX_BRANCHES} branches, got {n_branches}")
    device = torch.device(device)
    _check_device(device)
    keep = torch.empty((n_branches, m, k), dtype=torch.int8, device=device)
    if keep.numel() == 0:
        return keep.bool()
    config = tuning.low_rank_config(device, torch.float16, masked=True)
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(k, config.block_k), n_branches)
    with _on(device):
        kernels._dropout_mask_kernel[grid](
            keep, m, k, seed, _threshold(p), BLOCK_M=config.block_m, BLOCK_K=config.block_k,
            num_warps=config.num_warps,
        )
    return keep.bool()
