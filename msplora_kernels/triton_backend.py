"""Triton MSPLoRA backend: the ``forward``/``backward``/``dropout_masks`` contract of ``torch_backend``.

Notation: x (M, K), W (N, K), A = [A_1; ...; A_n] (R, K), B = [B_1 | ... | B_n] (N, R), D_s(x) = keep_s ⊙ x,
c_s = scaling_s / (1 - p_eff) with p_eff = round(p * 2^16) / 2^16 the drop probability the kernels realise
exactly (``effective_p``; |p - p_eff| <= 2^-17, so the estimator is exactly unbiased for p_eff). The c_s
go to the kernels as scalars: no scaled copy of A is made on the host.

Forward (two launches fused, three unfused; x read twice: by the shrink, for all branches, and the GEMM;
the eager path adds one, ``pack_adapters``, unless its adapter cache holds A_cat and B_cat):

    A_cat, B_cat from the branches' A_s, B_s, cast         _pack_adapters_kernel (one launch for both)
    S = [c_1 D_1(x) A_1^T | ... | c_n D_n(x) A_n^T]     _shrink_kernel: one Philox draw per pair of elements
                                                         for all branches, writes the packed mask   (M, R)
    y = x W^T + b + S B^T                                 _matmul_lowrank_kernel (fused), or cuBLAS + the
                                                          same kernel adding S B^T in place (unfused)

Backward, given dy (M, N) (four launches fused, five unfused; four where no reduction is split):

    dS = dy B, dB = dy^T S                                _lowrank_grad_sb_kernel: one sweep over dy for
                                                          narrow ranks, dB as partial sums per row tile
    dx = dy W + sum_s c_s keep_s ⊙ (dS_s A_s)             GEMM epilogue reading the packed mask
    dA_s = c_s dS_s^T D_s(x)                              _lowrank_grad_a_kernel reading the packed mask
    dA, dB = the sums of their partials                   _sum_partials_kernel (one launch for both)

With ``branch_grads`` (the eager path) dA_s and dB_s come out as separate contiguous tensors in the
adapters' dtype (dB's partials are laid out branch by branch), so autograd adopts them as they are.

Rank padding: where the rank is a reduction (the epilogues' S B^T and per-branch dS_s A_s) loops step in
chunks that pad each range to a multiple of 16 only (``tuning.rank_step``); where it is an output dimension
(S, dS, dB, dA) the tile is a power of two (``tl.arange``), so that x or dy is read once for all ranks.

Dropout RNG per training step: one Philox pass over x (the shrink's); dx and dA read the packed mask
(0.5 byte per element of x: bit s of a nibble is keep_s, layout in ``_triton/kernels.py``).

Where the mask lives (the function.py contract saves only x, S and the seed): in S's own storage, after
S's M*R elements, so autograd keeps it exactly as long as S. ``S`` is returned as a plain contiguous
(M, R) view of a larger allocation (shape and strides as the op's fake promises); backward finds the mask
there when S's storage has exactly the size this backend allocated and a host-side record of that
allocation (device, address, size, seed, threshold, shape, dtype) matches. Anything else (S copied by a
saved-tensor hook, offloaded, or the record evicted after ``_MASK_RECORDS`` newer forwards) falls back to
drawing the same bits again with Philox in each backward kernel: the masks are a pure function of the seed,
so results are identical, only slower. Saved for backward: x, S and its packed mask (at most PEFT LoRA's
x plus M x R plus 0.5 byte per element).

Reductions over M (dB, dA) are cut into a fixed number of row tiles or slices written to an fp32 buffer
and summed in a fixed order by ``_sum_partials_kernel``: no atomics anywhere, so gradients are
bit-identical run to run (whether or not ``torch.are_deterministic_algorithms_enabled()``).

Paths: ``unfused`` runs x W^T + b and dy W with ``torch`` (cuBLAS) and adds the low-rank terms with our
kernels in accumulate mode (y += S B^T, dx += sum_s c_s keep_s ⊙ (dS_s A_s)), one more read and write of y
and dx; ``fused`` runs our GEMM with the low-rank term in its epilogue. ``auto`` asks
``_triton.tuning.prefer_fused``, which picks the fused GEMM only where the committed per-GPU tuning table
measured it at least 3% faster (``_triton/tuning_table.py``); cuBLAS + our low-rank kernels otherwise.
``forced_path`` overrides the choice (for benchmarks and the tuning step); ``linear`` is the Triton GEMM
alone (x W^T + b). ``weight=None`` (and no bias): the low-rank term alone, y = S B^T and
dx = sum_s c_s keep_s ⊙ (dS_s A_s), for layers whose base layer is called on its own (bitsandbytes 4/8-bit,
hooked or offloaded): the same kernels, the epilogue writing instead of accumulating, no dy W GEMM.
A third forward path, ``fused_tma`` (the persistent TMA GEMM of ``_triton/kernels_tma.py``,
Hopper, 16-bit), runs only where forced or where the table measured it faster (``tuning.prefer_tma``).

Determinism: both paths are deterministic run to run on one GPU and software stack (no atomics; cuBLAS
needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` under ``torch.use_deterministic_algorithms``). The two paths
round differently (cuBLAS vs our tile order), so results are bit-identical only within one path, which is
why the path is a pure function of the call's key and the committed table (with ``MSPLORA_TUNE=1``: of the
key and the first measurement, see ``_triton/online_tune.py``) and never changes within a run.
"""
from __future__ import annotations

import contextlib
import collections
import functools
import itertools
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import dispatch
from ._triton import kernels, kernels_tma, tuning

PATHS = ("auto", "fused", "unfused", "fused_tma")
MAX_BRANCHES = 4  # one Philox draw gives four words: one mask per branch
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MASK_BITS = 16  # the kernels compare 16 random bits per element and branch with round(p * 2^16)
_MASK_RECORDS = 4096  # forwards whose saved packed masks backward can find (older ones: masks redrawn)
_forced = {"path": "auto"}


@contextlib.contextmanager
def forced_path(path: str) -> Iterator[None]:
    """Within the block, run the fused GEMM (``"fused"``), cuBLAS + low-rank kernels (``"unfused"``), the
    persistent TMA GEMM in the forward (``"fused_tma"``; backward then runs unfused, and operands TMA cannot
    address run unfused too) or let the ``auto`` rule choose."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    previous = _forced["path"]
    _forced["path"] = path
    try:
        yield
    finally:
        _forced["path"] = previous


def uses_fused_path(
    m: int, n: int, k: int, device: torch.device, dtype: torch.dtype,
    ranks: Sequence[int] = (), dropout: bool = False, op: str = "forward",
) -> bool:
    """Whether a call with these sizes runs the fused GEMM under the current ``forced_path``."""
    return tuning.prefer_fused(m, n, k, device, dtype, forced=_forced["path"], ranks=tuple(ranks),
                               dropout=dropout, op=op)


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
    """The kernels drop an element when its 16 random bits are below this: round(p * 2^16), at most 2^16 - 1."""
    return min(round(p * 2**_MASK_BITS), 2**_MASK_BITS - 1) if p > 0.0 else 0


def effective_p(p: float) -> float:
    """The drop probability the kernels realise exactly for a requested ``p``: threshold / 2^16."""
    return _threshold(p) / 2**_MASK_BITS


def _branch_coefficients(scalings: Sequence[float], p: float) -> List[float]:
    """c_s = scaling_s / (1 - p_eff), padded to the kernels' four scalars."""
    keep = 1.0 - effective_p(p)
    return [float(c) / keep for c in scalings] + [0.0] * (MAX_BRANCHES - len(scalings))


def _offsets(ranks: Sequence[int]) -> List[int]:
    """[0, r_1, r_1 + r_2, ..., R]: where each branch's rank columns start, and R."""
    return [0, *itertools.accumulate(ranks)]


@functools.lru_cache(maxsize=256)
def _rank_bounds(ranks: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[0, r_1, r_1 + r_2, ..., R, R, ...] (MAX_BRANCHES + 1 entries, int32, on ``device``): the branches'
    rank columns (cached: one copy per rank layout, not one per call)."""
    bounds = _offsets(ranks)
    bounds += [bounds[-1]] * (MAX_BRANCHES + 1 - len(bounds))
    return torch.tensor(bounds, dtype=torch.int32, device=device)


# ---- the packed dropout mask, kept in S's storage -----------------------------------------------------

_records: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()


def _mask_layout(m: int, r: int, k: int, dtype: torch.dtype) -> Tuple[int, int]:
    """(byte offset of the mask in S's storage, total elements of that storage)."""
    offset = -(-(m * r * dtype.itemsize) // 16) * 16  # 16-byte aligned, as the kernels' loads assume
    total_bytes = offset + m * ((k + 1) // 2)
    return offset, -(-total_bytes // dtype.itemsize)


def _new_s(m: int, r: int, k: int, dtype: torch.dtype, device: torch.device, seed: int, threshold: int,
           branches: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """S (M, R) and, with dropout, the packed mask (M, ceil(K/2)) uint8 placed after it in one allocation."""
    if threshold == 0:
        return torch.empty((m, r), device=device, dtype=dtype), None
    offset, total = _mask_layout(m, r, k, dtype)
    storage = torch.empty((total,), device=device, dtype=dtype)
    s = storage[: m * r].view(m, r)
    mask = storage.view(torch.uint8)[offset: offset + m * ((k + 1) // 2)].view(m, (k + 1) // 2)
    key = (str(device), storage.untyped_storage().data_ptr())
    _records[key] = (storage.untyped_storage().nbytes(), seed, threshold, branches, m, r, k, dtype)
    _records.move_to_end(key)
    while len(_records) > _MASK_RECORDS:
        _records.popitem(last=False)
    return s, mask


def _saved_mask(s: torch.Tensor, k: int, seed: int, threshold: int, branches: int) -> Optional[torch.Tensor]:
    """The packed mask the forward that made ``s`` stored, or None (then the kernels redraw it)."""
    m, r = s.shape
    if s.storage_offset() != 0 or not s.is_contiguous():
        return None
    storage = s.untyped_storage()
    key = (str(s.device), storage.data_ptr())
    offset, total = _mask_layout(m, r, k, s.dtype)
    if _records.get(key) != (storage.nbytes(), seed, threshold, branches, m, r, k, s.dtype):
        return None
    if storage.nbytes() != total * s.dtype.itemsize:
        return None
    full = torch.empty((0,), device=s.device, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))
    return full[offset: offset + m * ((k + 1) // 2)].view(m, (k + 1) // 2)


# ---- launchers --------------------------------------------------------------------------------------------


def _launch_matmul(
    out: torch.Tensor,
    lhs: Optional[torch.Tensor],
    rhs: Optional[torch.Tensor],
    config: tuning.MatmulConfig,
    bias: Optional[torch.Tensor] = None,
    low_rank: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    scaled: Optional[Tuple[Sequence[int], Sequence[float]]] = None,
    masked: Optional[Tuple[int, int, Optional[torch.Tensor]]] = None,
    accumulate: bool = False,
    splits: int = 1,
) -> None:
    """out (+)= lhs rhs (+ bias + low-rank term): ``out`` (M, N), or (splits, M, N) partial sums over slices
    of the inner dimension.

    ``low_rank`` = (L, U) adds L U; ``scaled`` = (ranks, coefficients) multiplies branch s's columns of L by
    c_s; ``masked`` = (seed, threshold, packed mask or None) also masks each branch's part with its dropout
    mask at out's elements (out is then x-shaped), read from the packed mask or drawn again.
    ``lhs``/``rhs`` None: no main product.
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
    if scaled is not None:
        ranks, coefs = scaled
        bounds = _rank_bounds(tuple(ranks), out.device)
        stepped = list(ranks) if masked is not None else [rank]  # masked: one loop per branch
    else:
        bounds, coefs, stepped, ranks = out, [0.0] * MAX_BRANCHES, [rank], ()
    seed, threshold, mask = masked if masked is not None else (0, 0, None)
    stride_cs = out.stride(0) if out.dim() == 3 else 0
    stride_cm, stride_cn = out.stride()[-2:]
    config = tuning.for_strides(config, (stride_pm, stride_pk, stride_qk, stride_qn))
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), splits)
    with _on(out.device):
        kernels._matmul_lowrank_kernel[grid](
            lhs, rhs, out, bias if bias is not None else out, l_mat, u_mat, bounds,
            mask if mask is not None else out,
            m, n, k, rank, seed, threshold, *coefs,
            stride_pm, stride_pk, stride_qk, stride_qn, stride_cs, stride_cm, stride_cn,
            stride_lm, stride_lr, stride_ur, stride_un, mask.stride(0) if mask is not None else 0,
            HAS_BIAS=bias is not None, HAS_LOW_RANK=low_rank is not None,
            SCALE_LOW_RANK=scaled is not None and masked is None,
            MASKED_BRANCHES=len(ranks) if masked is not None else 0,
            MASK_SOURCE=0 if masked is None else (2 if mask is not None else 1),
            ACCUMULATE=accumulate, SPLIT_K=splits,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            BLOCK_R=tuning.rank_step(stepped, config.max_block_r),
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


def _grad_s_b(dy: torch.Tensor, b_cat: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype,
              bounds: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """dS = dy B and dB's partial sums dy^T S, one per row tile or slice, in one launch (one sweep over dy for
    narrow ranks): (dS, partials (pieces, N, R) in fp32, or (1, N, R) in ``out_dtype`` when one piece is the
    result). ``bounds``: each partial holds every branch's dB_s as a contiguous block, (pieces, N * R)."""
    m, n = dy.shape
    rank = b_cat.shape[1]
    config, block_r, one_pass = tuning.grad_sb_config(dy.device, dy.dtype, rank)
    row_tiles = triton.cdiv(m, config.block_m)
    if one_pass:
        pieces, rows_per_slice, programs = row_tiles, config.block_m, row_tiles
    else:
        pieces = tuning.reduction_splits(m, dy.device)
        rows_per_slice = triton.cdiv(triton.cdiv(m, pieces), config.block_m) * config.block_m
        pieces = triton.cdiv(m, rows_per_slice)
        programs = row_tiles + pieces * triton.cdiv(n, config.block_n)
    ds = torch.empty((m, rank), device=dy.device, dtype=dy.dtype)
    shape = (pieces, n * rank) if bounds is not None else (pieces, n, rank)
    partial = torch.empty(shape, device=dy.device, dtype=out_dtype if pieces == 1 else _accumulator(dy.dtype))
    strides = (partial.stride(0), 0, 0) if bounds is not None else partial.stride()
    with _on(dy.device):
        kernels._lowrank_grad_sb_kernel[(programs, triton.cdiv(rank, block_r))](
            dy, b_cat, s, ds, partial, bounds if bounds is not None else ds, m, n, rank, row_tiles, rows_per_slice,
            *dy.stride(), *b_cat.stride(), *s.stride(), *ds.stride(), *strides,
            BLOCKED_G=bounds is not None, ONE_PASS=one_pass,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_R=block_r,
            DOT_PRECISION=_dot_precision(dy.dtype), ACC_DTYPE=_acc_constexpr(dy.dtype),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return ds, partial


_SUM_BLOCK = 1024


def _sum_partials(*reductions: Tuple[torch.Tensor, torch.dtype]) -> List[torch.Tensor]:
    """Each (partials (pieces, ...), dtype) summed over its pieces, in ``dtype``; a single piece is already the
    result (its kernel wrote it in ``dtype``). All reductions with several pieces (at most two) are summed by
    one launch, in a fixed order (deterministic)."""
    results, pending = [], []
    for partial, dtype in reductions:
        if partial.shape[0] == 1:
            results.append(partial[0])
        else:
            results.append(torch.empty(partial.shape[1:], device=partial.device, dtype=dtype))
            pending.append((partial, results[-1]))
    if len(pending) > 2:
        raise ValueError("at most two reductions per launch")
    if pending:
        (pa, a_out), (pb, b_out) = pending[0], pending[1] if len(pending) == 2 else (pending[0][0], pending[0][1][:0])
        programs = triton.cdiv(a_out.numel(), _SUM_BLOCK) + triton.cdiv(b_out.numel(), _SUM_BLOCK)
        with _on(pa.device):
            kernels._sum_partials_kernel[(programs,)](
                pa, a_out, a_out.numel(), pa.shape[0], pb, b_out, b_out.numel(), pb.shape[0], BLOCK=_SUM_BLOCK,
                num_warps=4,
            )
    return results


def _rank_tiles(total_rank: int, config: tuning.LowRankConfig) -> Tuple[int, int]:
    """(BLOCK_R, tiles): the rank window of the shrink and dA kernels and how many windows cover R."""
    block_r = tuning.rank_block(total_rank, config.max_block_r)
    return block_r, triton.cdiv(total_rank, block_r)


def _shrink(
    x: torch.Tensor, a_cat: torch.Tensor, ranks: Sequence[int], coefs: Sequence[float], threshold: int, seed: int
) -> torch.Tensor:
    m, k = x.shape
    total_rank = a_cat.shape[0]
    s, mask = _new_s(m, total_rank, k, x.dtype, x.device, seed, threshold, len(ranks))
    config = tuning.low_rank_config(x.device, x.dtype, masked=threshold > 0)
    block_r, rank_tiles = _rank_tiles(total_rank, config)
    config = tuning.shrink_config(config, block_r, x.stride())
    grid = (triton.cdiv(m, config.block_m) * rank_tiles,)
    with _on(x.device):
        kernels._shrink_kernel[grid](
            x, a_cat, s, _rank_bounds(tuple(ranks), x.device), mask if mask is not None else s,
            m, k, total_rank, seed, threshold, *coefs,
            *x.stride(), *a_cat.stride(), *s.stride(), mask.stride(0) if mask is not None else 0,
            MASKED_BRANCHES=len(ranks) if threshold > 0 else 0, WRITE_MASK=mask is not None,
            RANK_TILES=rank_tiles, BLOCK_M=config.block_m, BLOCK_R=block_r, BLOCK_K=config.block_k,
            DOT_PRECISION=_dot_precision(x.dtype), ACC_DTYPE=_acc_constexpr(x.dtype),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return s


def _grad_a(
    ds: torch.Tensor, x: torch.Tensor, ranks: Sequence[int], coefs: Sequence[float], threshold: int, seed: int,
    mask: Optional[torch.Tensor], final_dtype: torch.dtype,
) -> torch.Tensor:
    m, k = x.shape
    total_rank = ds.shape[1]
    config = tuning.low_rank_config(x.device, x.dtype, masked=threshold > 0)
    block_r, rank_tiles = _rank_tiles(total_rank, config)
    splits = tuning.reduction_splits(m, x.device)
    out_dtype = final_dtype if splits == 1 else _accumulator(x.dtype)
    partial = torch.empty((splits, total_rank, k), device=x.device, dtype=out_dtype)
    config = tuning.grad_a_config(config, block_r, (*ds.stride(), *x.stride(), *partial.stride()[1:]))
    grid = (rank_tiles, triton.cdiv(k, config.block_k), splits)
    with _on(x.device):
        kernels._lowrank_grad_a_kernel[grid](
            ds, x, partial, _rank_bounds(tuple(ranks), x.device), mask if mask is not None else x,
            m, k, total_rank, seed, threshold, *coefs,
            *ds.stride(), *x.stride(), *partial.stride(), mask.stride(0) if mask is not None else 0,
            MASKED_BRANCHES=len(ranks) if threshold > 0 else 0,
            MASK_SOURCE=0 if threshold == 0 else (2 if mask is not None else 1), SPLIT_M=splits,
            BLOCK_M=config.block_m, BLOCK_R=block_r, BLOCK_K=config.block_k,
            DOT_PRECISION=_dot_precision(x.dtype), ACC_DTYPE=_acc_constexpr(x.dtype),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return partial  # (splits, R, K): the launcher sums them with dB's


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
    n = b_cat.shape[0]
    if m == 0:
        return x.new_empty((0, n)), x.new_empty((0, a_cat.shape[0]))
    threshold = _threshold(p)
    s = _shrink(x, a_cat, ranks, _branch_coefficients(scalings, p), threshold, seed)
    low_rank = (s, b_cat.t())
    if weight is None:  # the low-rank term alone, y = S B^T (the base layer is called separately)
        y = torch.empty((m, n), device=x.device, dtype=x.dtype)
        _launch_matmul(y, None, None, tuning.epilogue_only_config(x.device, x.dtype), low_rank=low_rank)
    elif (tuning.prefer_tma(m, n, k, x.device, x.dtype, _forced["path"], tuple(ranks), threshold > 0)
            and kernels_tma.supported(x, weight, tuning._arch(x.device))):
        y = torch.empty((m, n), device=x.device, dtype=x.dtype)
        config = tuning.tma_config(tuning._arch(x.device), x.dtype)
        block_r = tuning.rank_block(s.shape[1], config.max_block_r)
        with _on(x.device):
            kernels_tma.launch(y, x, weight, bias, s, b_cat, config, block_r, _dot_precision(x.dtype),
                               _acc_constexpr(x.dtype))
    elif uses_fused_path(m, n, k, x.device, x.dtype, ranks, threshold > 0, "forward"):
        y = torch.empty((m, n), device=x.device, dtype=x.dtype)
        _launch_matmul(y, x, weight.t(), tuning.matmul_config(x.device, x.dtype), bias=bias, low_rank=low_rank)
    else:
        y = torch.nn.functional.linear(x, weight, bias)
        _launch_matmul(y, None, None, tuning.epilogue_only_config(x.device, x.dtype), low_rank=low_rank, accumulate=True)
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
    branch_grads: Optional[Tuple[torch.dtype, torch.dtype]] = None,
):
    """(dx or None, dA_cat, dB_cat); ``branch_grads`` = (dtype of A's, dtype of B's): dA and dB as lists of
    each branch's gradient instead, contiguous and in those dtypes (written so by the kernels: no split
    views for autograd to copy, no casts)."""
    _check_tensors(dy=dy, x=x, s=s, weight=weight, a_cat=a_cat, b_cat=b_cat)
    _check_branches(ranks)
    m, k = x.shape
    n = b_cat.shape[0]
    a_dtype, b_dtype = branch_grads if branch_grads is not None else (a_cat.dtype, b_cat.dtype)
    if m == 0:
        dx = x.new_empty((0, k)) if need_dx else None
        da, db = torch.zeros_like(a_cat, dtype=a_dtype), torch.zeros_like(b_cat, dtype=b_dtype)
        if branch_grads is not None:
            return dx, list(da.split(list(ranks))), [t.contiguous() for t in db.split(list(ranks), dim=1)]
        return dx, da, db
    coefs = _branch_coefficients(scalings, p)
    threshold = _threshold(p)
    mask = _saved_mask(s, k, seed, threshold, len(ranks)) if threshold > 0 else None
    blocked = _rank_bounds(tuple(ranks), x.device) if branch_grads is not None else None
    ds, db_partial = _grad_s_b(dy, b_cat, s, b_dtype, blocked)

    dx = None
    if need_dx:
        low_rank = (ds, a_cat)
        masked = (seed, threshold, mask) if threshold > 0 else None
        scaled = (list(ranks), coefs)
        if weight is None:  # the low-rank term alone: dx = sum_s c_s keep_s ⊙ (dS_s A_s)
            dx = torch.empty((m, k), device=x.device, dtype=x.dtype)
            _launch_matmul(dx, None, None, tuning.epilogue_only_config(x.device, x.dtype), low_rank=low_rank,
                           scaled=scaled, masked=masked)
        elif uses_fused_path(m, n, k, x.device, x.dtype, ranks, threshold > 0, "backward"):
            dx = torch.empty((m, k), device=x.device, dtype=x.dtype)
            config = tuning.matmul_config(x.device, x.dtype, masked=masked is not None, redraw=mask is None)
            _launch_matmul(dx, dy, weight, config, low_rank=low_rank, scaled=scaled, masked=masked)
        else:
            dx = dy @ weight
            _launch_matmul(dx, None, None, tuning.epilogue_only_config(x.device, x.dtype), low_rank=low_rank,
                           scaled=scaled, masked=masked, accumulate=True)
    da, db = _sum_partials((_grad_a(ds, x, ranks, coefs, threshold, seed, mask, a_dtype), a_dtype),
                           (db_partial, b_dtype))
    if branch_grads is None:
        return dx, da, db
    bounds = _offsets(ranks)
    return dx, list(da.split(list(ranks))), [db[n * lo: n * hi].view(n, hi - lo) for lo, hi in zip(bounds, bounds[1:])]


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
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(k, config.block_k))
    with _on(device):
        kernels._dropout_mask_kernel[grid](
            keep, m, k, seed, _threshold(p), BRANCHES=n_branches, BLOCK_M=config.block_m,
            BLOCK_K=config.block_k, num_warps=config.num_warps,
        )
    return keep.bool()


def packed_mask_of(s: torch.Tensor, k: int, p: float, seed: int, n_branches: int) -> Optional[torch.Tensor]:
    """The packed mask (M, ceil(K/2)) uint8 saved with ``s`` by ``forward``, or None (for tests)."""
    return _saved_mask(s, k, seed, _threshold(p), n_branches)


_PACK_BLOCK, _PACK_WARPS = 512, 4  # 1024 elements per program spill registers on sm_90 (compile_check)


def pack_adapters(a_list: Sequence[torch.Tensor], b_list: Sequence[torch.Tensor],
                  dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """A_cat = [A_1; ...; A_n] (R, K) and B_cat = [B_1 | ... | B_n] (N, R), contiguous, in ``dtype``: one
    launch for both (``torch.cat`` of each and a cast would be up to four)."""
    n = len(a_list)
    if not 1 <= n <= MAX_BRANCHES or len(b_list) != n:
        raise ValueError(f"triton backend: expected 1 to {MAX_BRANCHES} A and as many B, got {n} and {len(b_list)}")
    device, k, rows = a_list[0].device, a_list[0].shape[1], b_list[0].shape[0]
    _check_device(device)
    ranks = [a.shape[0] for a in a_list]
    bounds = _offsets(ranks)[1:]
    total = bounds[-1]
    bounds += [total] * (MAX_BRANCHES - n)
    a_cat = torch.empty((total, k), device=device, dtype=dtype)
    b_cat = torch.empty((rows, total), device=device, dtype=dtype)
    elements = max(a_cat.numel(), b_cat.numel())
    if elements == 0:
        return a_cat, b_cat
    a_ptrs = list(a_list) + [a_cat] * (MAX_BRANCHES - n)
    b_ptrs = list(b_list) + [b_cat] * (MAX_BRANCHES - n)
    with _on(device):
        kernels._pack_adapters_kernel[(triton.cdiv(elements, _PACK_BLOCK),)](
            *a_ptrs, *b_ptrs, a_cat, b_cat, k, rows, total, *bounds[:3],
            *[s for a in a_ptrs for s in a.stride()], *[s for b in b_ptrs for s in b.stride()],
            BRANCHES=n, BLOCK=_PACK_BLOCK, num_warps=_PACK_WARPS,
        )
    return a_cat, b_cat
