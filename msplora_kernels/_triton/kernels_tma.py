"""A persistent TMA GEMM for the MSPLoRA forward on Hopper: y = x W^T + b + S B^T, with S B^T as the
accumulator's initial value.

Shapes: x (M, K), W (N, K), b (N,), S (M, R) = [c_1 D_1(x) A_1^T | ... | c_n D_n(x) A_n^T] from
``_shrink_kernel`` (dropout and the branch coefficients are already in S), B = [B_1 | ... | B_n] (N, R).
Launched by ``triton_backend.forward`` only under ``forced_path("fused_tma")`` or where the committed tuning
table measured it at least 3% faster than cuBLAS + our low-rank kernels (``tuning.prefer_tma``): never by
default.

Maths, per output tile T = rows m0:m0+BM, columns n0:n0+BN, accumulated in fp32 (fp64 is not offered):

    acc  = sum_{r-steps} S[T_m, r-step] B[T_n, r-step]^T          before the K loop (rank R padded to BLOCK_R)
    acc += sum_{k-steps} x[T_m, k-step] W[T_n, k-step]^T          the K loop, TMA-fed, software-pipelined
    y[T] = round(acc + b[T_n])                                    subtiled epilogue

which is y = x W^T + b + S B^T with the same fp32 accumulation as ``_matmul_lowrank_kernel`` (which adds the
low-rank product after the K loop): the two differ only in the order of the fp32 sums, so their results
agree to fp32 rounding before the one rounding to y's dtype.

Why the low-rank term is the accumulator's initial value rather than an epilogue:
- The MMA unit is idle at the start of a tile anyway, waiting for the first TMA stages of x and W; the
  rank-R product (R/K of the tile's MMA work: 14/4096 = 0.3% for 8/4/2 at K = 4096) runs in that wait. An
  epilogue product runs after the last K step, when nothing else is in flight for this tile, and its loads
  of S and B are exposed latency.
- The epilogue is then only bias + convert + store, the part a persistent kernel overlaps with the next
  tile's first loads (the tile loop is flattened into the K loop, ``tl.range(..., flatten=True)``, so the
  pipeline keeps TMA loads of tile i + 1 in flight while tile i is stored).
- No second accumulator: acc holds S B^T then x W^T on top, one register file of BM x BN fp32.

Design:
- Persistent: min(#SMs, #tiles) programs walk the tiles (grouped order, GROUP_M row tiles sweep the columns
  together for L2 reuse of W) with stride ``tl.num_programs(0)``: one launch, no tail wave of programs.
- Tensor descriptors (``triton.tools.tensor_descriptor.TensorDescriptor``, built on the host and passed as
  kernel arguments, so no ``triton.set_allocator`` is needed) for x and W: TMA copies whole BM x BK and
  BN x BK boxes into 128-byte-swizzled shared memory with one instruction, zero-filled past M, N and K, so
  the loop has no masks and no address arithmetic. TMA needs 16-byte-aligned bases, unit last strides and
  row strides that are multiples of 16 bytes (``supported``); other operands take the unfused path.
- S and B are read with ordinary masked loads (R is a few tens of columns; their row strides, R elements,
  are rarely multiples of 16 bytes), y is written by TMA when its row stride allows (N * itemsize % 16 == 0),
  else by masked stores; both in SUBTILES column slices of BM x BN / SUBTILES, so the staging buffer for the
  TMA store is a fraction of the tile and the bias and conversion registers are live for a slice only.
- Tiles (``tuning.tma_config``): 16-bit operands on sm_90 use BM x BN x BK = 128 x 256 x 64, 8 warps (two
  consumer warp groups of 64 x 256: 128 fp32 accumulator registers per thread), the arithmetic intensity
  that keeps wgmma fed from HBM (BM BN / (BM + BN) = 85 FLOP per loaded byte, against 64 for 128 x 128).
  Shared memory per stage: (128 + 256) x 64 x 2 B = 48 KiB; the epilogue's staging slice 128 x 128 x 2 B =
  32 KiB; S and B rank tiles (128 + 256) x BLOCK_R x 2 B (12 KiB at BLOCK_R = 16, 24 KiB at 32), used only
  before the K loop. 3 stages: 144 + 32 + 12 = 188 KiB, within the H200's 227 KiB per block (232448 B);
  4 stages are 236 KiB by the compiler's own count (241696 B), too many, so 3.
- Ranks: one rank step (R <= BLOCK_R: 8/4/2) is straight-line code, so the tile loop keeps a single inner
  loop and is flattened; more steps (64/32/16 = 112 in tiles of at most 32) run as a loop, because unrolled
  steps each got their own S and B buffers (320 KiB); the loop reuses one pair but is not flattened.
- y whose rows are not 16-byte multiples (odd N) is stored with masks, which carry an address and a mask bit
  per element: next to the 128 x 256 accumulator they spilled registers even in quarter slices, so such
  calls use 128 x 128 tiles (``launch``). fp32 on sm_90 (an FMA dot, no wgmma) spilled too and is not
  offered there (``supported``); the interpreter runs fp32 for the tests.

Compiled for sm_90 (``python -m msplora_kernels._triton.compile_check --dtypes bf16,fp16 --ranks
"8,4,2;64,32,16" --kernels _matmul_lowrank_tma_kernel``, 2026-12-02, no GPU), bf16, triton 3.9 / 3.6:

    variant                                    shared     registers   spills   wgmma   TMA instr. (SASS)
    128x256, R 14 (1 step), TMA store          192536 B   192 / 204   0        yes     2 loads + 4 stores
    128x256, R 112 (4 steps, loop), TMA store  180248 B   210 / 216   0        yes     6 loads + 2 stores
    128x128, R 14, masked stores (N = 50)      114712 B   169 / 187   0        yes     2 loads
    128x128, R 112, masked stores (N = 50)      98328 B   188 / 206   0        yes     6 loads

(fp16 compiles to the same resources.) The tile loop of the first is flattened into the K loop (one
``scf.for`` with the low-rank product and the epilogue under ``scf.if``), the K loop's loads are
``async_tma_copy_global_to_local`` and its MMAs ``warp_group_dot`` (ttgir).

Nothing here has run on a GPU: correctness is tested under the Triton interpreter (which implements tensor
descriptors, zero padding included), and the kernel is compiled for sm_90 by ``compile_check``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .kernels import _grouped_tile

try:  # triton >= 3.4 (3.6 on the GPU machine, 3.9 here)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the TMA path is never taken
    TensorDescriptor = None

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRETER_PROGRAMS = 3  # fewer programs than tiles under the interpreter: the persistent loop is exercised


@triton.jit
def _store_slice(part, y_desc, y_ptr, bias_ptr, off_m, col, M, N, stride_ym, stride_yn,
                 HAS_BIAS: tl.constexpr, Y_DESCRIPTOR: tl.constexpr, BLOCK_M: tl.constexpr,
                 SLICE_N: tl.constexpr):
    """Add the bias to one BLOCK_M x SLICE_N slice of the accumulator (columns ``col``...), convert, store."""
    cols = col + tl.arange(0, SLICE_N)
    if HAS_BIAS:
        part += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(part.dtype)[None, :]
    if Y_DESCRIPTOR:
        y_desc.store([off_m, col], part.to(y_desc.dtype))
    else:
        # 32-bit offsets from the tile's first row (a BLOCK_M-row tile of y stays below 2^31 elements).
        rows = tl.arange(0, BLOCK_M)
        ptrs = y_ptr + off_m.to(tl.int64) * stride_ym + (rows[:, None] * stride_ym + cols[None, :] * stride_yn)
        tl.store(ptrs, part.to(y_ptr.dtype.element_ty), mask=(rows < M - off_m)[:, None] & (cols < N)[None, :])


@triton.jit
def _low_rank_step(acc, s_ptr, b_ptr, rm, rn, r0, M, N, R, stride_sm, stride_sr, stride_bn, stride_br,
                   BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + S[rm, r0:r0 + BLOCK_R] B[rn, r0:r0 + BLOCK_R]^T (rank columns past R read as zero)."""
    rr = r0 + tl.arange(0, BLOCK_R)
    s_tile = tl.load(s_ptr + rm.to(tl.int64)[:, None] * stride_sm + rr[None, :] * stride_sr,
                     mask=(rm < M)[:, None] & (rr < R)[None, :], other=0.0)
    b_tile = tl.load(b_ptr + rn.to(tl.int64)[:, None] * stride_bn + rr[None, :] * stride_br,
                     mask=(rn < N)[:, None] & (rr < R)[None, :], other=0.0)
    return tl.dot(s_tile, b_tile.T, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def _matmul_lowrank_tma_kernel(
    x_desc, w_desc, y_desc, y_ptr, bias_ptr, s_ptr, b_ptr,
    M, N, K, R,
    stride_ym, stride_yn, stride_sm, stride_sr, stride_bn, stride_br,
    HAS_BIAS: tl.constexpr, HAS_LOW_RANK: tl.constexpr, Y_DESCRIPTOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    RANK_STEPS: tl.constexpr, GROUP_M: tl.constexpr, SUBTILES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """y = x W^T + b + S B^T, persistent over output tiles (maths and design in the module docstring).

    ``x_desc`` (M, K) with block [BLOCK_M, BLOCK_K], ``w_desc`` (N, K) with block [BLOCK_N, BLOCK_K], ``y_desc``
    (M, N) with block [BLOCK_M, BLOCK_N // SUBTILES] when Y_DESCRIPTOR (else y is stored through ``y_ptr``).
    RANK_STEPS = cdiv(R, BLOCK_R): one step is straight-line code, so the tile loop's body keeps a single
    inner loop (the K loop) and is flattened into one software pipeline; more steps run as a loop. SUBTILES:
    1 or 2 column slices in the epilogue.
    """
    tl.static_assert(SUBTILES == 1 or SUBTILES == 2, "the epilogue stores the tile whole or in two halves")
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=True):
        pid_m, pid_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        if HAS_LOW_RANK:
            rm = off_m + tl.arange(0, BLOCK_M)
            rn = off_n + tl.arange(0, BLOCK_N)
            if RANK_STEPS == 1:  # straight-line code: the tile loop keeps one inner loop and is flattened
                acc = _low_rank_step(acc, s_ptr, b_ptr, rm, rn, 0, M, N, R, stride_sm, stride_sr, stride_bn,
                                     stride_br, BLOCK_R, DOT_PRECISION)
            else:  # a loop, so that every step reuses one pair of S and B buffers in shared memory
                for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
                    acc = _low_rank_step(acc, s_ptr, b_ptr, rm, rn, r0, M, N, R, stride_sm, stride_sr, stride_bn,
                                         stride_br, BLOCK_R, DOT_PRECISION)
        for step in range(k_steps):
            x_tile = x_desc.load([off_m, step * BLOCK_K])
            w_tile = w_desc.load([off_n, step * BLOCK_K])
            acc = tl.dot(x_tile, w_tile.T, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

        if SUBTILES == 1:
            _store_slice(acc, y_desc, y_ptr, bias_ptr, off_m, off_n, M, N, stride_ym, stride_yn,
                         HAS_BIAS, Y_DESCRIPTOR, BLOCK_M, BLOCK_N)
        else:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            left, right = tl.split(halves)
            _store_slice(left, y_desc, y_ptr, bias_ptr, off_m, off_n, M, N, stride_ym, stride_yn,
                         HAS_BIAS, Y_DESCRIPTOR, BLOCK_M, BLOCK_N // 2)
            _store_slice(right, y_desc, y_ptr, bias_ptr, off_m, off_n + BLOCK_N // 2, M, N, stride_ym,
                         stride_yn, HAS_BIAS, Y_DESCRIPTOR, BLOCK_M, BLOCK_N // 2)


def _describable(t: torch.Tensor) -> bool:
    """Whether TMA can address this 2-D tensor: unit last stride, 16-byte-aligned base and row stride."""
    return (t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
            and t.data_ptr() % 16 == 0)


def supported(x: torch.Tensor, weight: torch.Tensor, arch) -> bool:
    """Whether the TMA GEMM can run ``x W^T`` here: Hopper (``arch`` 9, from ``tuning._arch``) with fp16/bf16,
    or the interpreter with fp16/bf16/fp32 (its tests), and x and W describable by TMA (``_describable``)."""
    dtypes = _DTYPES if arch == "interpreter" else _DTYPES[:2]  # fp32 on sm_90: FMA-bound, and it spills
    return (TensorDescriptor is not None and arch in (9, "interpreter") and x.dtype in dtypes
            and x.shape[0] > 0 and x.shape[1] > 0 and _describable(x) and _describable(weight))


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(device: torch.device, tiles: int) -> int:
    if device.type == "cuda":
        return min(tiles, _sm_count(device.index if device.index is not None else torch.cuda.current_device()))
    return min(tiles, _INTERPRETER_PROGRAMS)


def launch(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           s: Optional[torch.Tensor], b_cat: Optional[torch.Tensor], config, block_r: int,
           dot_precision: str, acc_dtype) -> None:
    """y (M, N) = x W^T + bias + S B^T by ``_matmul_lowrank_tma_kernel`` (``supported(x, weight, ...)`` must
    hold; ``config``: a ``tuning.TmaConfig``; ``block_r``: the rank tile, at most ``config.max_block_r``)."""
    m, k = x.shape
    n = weight.shape[0]
    if y.numel() == 0:
        return
    y_descriptor = _describable(y)
    bm, bn, bk, subtiles = config.block_m, config.block_n, config.block_k, config.subtiles
    if not y_descriptor:
        # Masked stores hold an address and a mask bit per element: next to a 128 x 256 accumulator they
        # spill registers in the flattened loop even in quarter slices (compile_check), so such a y (a row
        # stride that is not a multiple of 16 bytes: odd N, rare) gets column tiles of at most 128.
        bn = min(bn, 128)
    x_desc = TensorDescriptor(x, [m, k], [x.stride(0), 1], [bm, bk])
    w_desc = TensorDescriptor(weight, [n, k], [weight.stride(0), 1], [bn, bk])
    y_desc = TensorDescriptor(y, [m, n], [y.stride(0), 1], [bm, bn // subtiles]) if y_descriptor else y
    rank = s.shape[1] if s is not None else 0
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    grid = (_programs(y.device, tiles),)
    _matmul_lowrank_tma_kernel[grid](
        x_desc, w_desc, y_desc, y, bias if bias is not None else y, s if s is not None else y,
        b_cat if b_cat is not None else y,
        m, n, k, rank,
        y.stride(0), y.stride(1), *(s.stride() if s is not None else (0, 0)),
        *(b_cat.stride() if b_cat is not None else (0, 0)),
        HAS_BIAS=bias is not None, HAS_LOW_RANK=s is not None, Y_DESCRIPTOR=y_descriptor,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=block_r, RANK_STEPS=triton.cdiv(max(rank, 1), block_r),
        GROUP_M=config.group_m, SUBTILES=subtiles, DOT_PRECISION=dot_precision, ACC_DTYPE=acc_dtype,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
