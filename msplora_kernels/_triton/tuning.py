"""Every launch choice of the Triton backend, per architecture, in one place.

Tiles, warps and stages are picked by a heuristic (a table per GPU generation) instead of autotuning: the
interpreter that runs the tests on the CPU cannot afford to try configurations, and the backend must stay
deterministic (one shape, one configuration). The Hopper defaults follow the usual Triton GEMM choices
(128 x 128 x 64 tiles, 8 warps, 4 stages, grouped tile order); none of them is measured yet.

``prefer_fused`` is the one rule that decides, under ``forced_path("auto")``, between the fused GEMM and
the unfused path (cuBLAS GEMM + our shrink/expand kernels). Its thresholds are provisional until the GPU
benchmark (``benchmarks/gpu_check.sh``) justifies them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

# A small-M GEMM leaves most SMs idle in our one-tile-per-program kernel, while cuBLAS picks split-K or
# narrow tiles; below this many rows the extra read and write of Y in the unfused path is the cheaper cost.
FUSED_MIN_ROWS = 1024


@dataclass(frozen=True)
class MatmulConfig:
    """Tiles of a GEMM program (block_m x block_n output, block_k inner step) and its low-rank epilogue's
    largest rank step (``max_block_r``)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    max_block_r: int = 64


@dataclass(frozen=True)
class LowRankConfig:
    """Tiles of the narrow kernels (shrink, dA, masks): rows of X per program, X columns per step, max rank tile."""

    block_m: int
    block_k: int
    max_block_r: int
    num_warps: int
    num_stages: int


# Keys: "interpreter", or the CUDA compute-capability major (9 = Hopper, 8 = Ampere/Ada); None = any other GPU.
_MATMUL_16BIT = {
    "interpreter": MatmulConfig(32, 32, 32, 2, 1, 1, 32),
    9: MatmulConfig(128, 128, 64, 8, 8, 4),
    8: MatmulConfig(128, 128, 32, 8, 4, 4),
    None: MatmulConfig(64, 64, 32, 8, 4, 3),
}
_MATMUL_32BIT = {
    "interpreter": MatmulConfig(32, 32, 32, 2, 1, 1, 32),
    9: MatmulConfig(128, 64, 32, 8, 8, 3),
    8: MatmulConfig(64, 64, 32, 8, 4, 3),
    None: MatmulConfig(64, 64, 16, 8, 4, 2),
}
# With dropout, each tile also holds four Philox words per element: tiles of fewer elements per thread keep
# those kernels from spilling registers (``python -m msplora_kernels._triton.compile_check`` prints registers
# and spills per variant).
_MATMUL_16BIT_MASKED = {
    "interpreter": MatmulConfig(32, 32, 32, 2, 1, 1, 32),
    9: MatmulConfig(128, 64, 64, 8, 8, 4),
    8: MatmulConfig(128, 64, 32, 8, 8, 4),
    None: MatmulConfig(64, 64, 32, 8, 4, 3),
}
_MATMUL_32BIT_MASKED = {
    "interpreter": MatmulConfig(32, 32, 32, 2, 1, 1, 32),
    9: MatmulConfig(128, 64, 32, 8, 8, 3),
    8: MatmulConfig(64, 64, 32, 8, 4, 3),
    None: MatmulConfig(64, 64, 16, 8, 4, 2),
}
# The unfused path's epilogue-only launch (y += S B^T, dx += masked dS A): no main loop to feed.
_EPILOGUE_ONLY = {
    "interpreter": MatmulConfig(32, 32, 32, 1, 1, 1, 32),
    9: MatmulConfig(64, 64, 64, 8, 8, 1),
    8: MatmulConfig(64, 64, 64, 8, 8, 1),
    None: MatmulConfig(64, 64, 32, 8, 4, 1),
}
_LOW_RANK_16BIT = {
    "interpreter": LowRankConfig(32, 32, 32, 1, 1),
    9: LowRankConfig(64, 128, 128, 4, 3),
    8: LowRankConfig(64, 64, 128, 4, 3),
    None: LowRankConfig(32, 64, 64, 4, 2),
}
# fp32 products run on FMA units with operands in registers (no TF32 unless allowed): smaller steps.
_LOW_RANK_32BIT = {
    "interpreter": LowRankConfig(32, 32, 32, 1, 1),
    9: LowRankConfig(64, 32, 64, 4, 3),
    8: LowRankConfig(64, 32, 64, 4, 3),
    None: LowRankConfig(32, 32, 64, 4, 2),
}
# Narrow outputs (dS: M x R, dB: N x R) are GEMMs whose output width is the rank tile (block_n: its maximum).
_LOW_RANK_MASKED_16BIT = {
    "interpreter": LowRankConfig(32, 32, 32, 1, 1),
    9: LowRankConfig(64, 64, 128, 8, 3),
    8: LowRankConfig(64, 64, 64, 8, 3),
    None: LowRankConfig(32, 32, 64, 4, 2),
}
_LOW_RANK_MASKED_32BIT = {
    "interpreter": LowRankConfig(32, 32, 32, 1, 1),
    9: LowRankConfig(64, 32, 64, 8, 3),
    8: LowRankConfig(64, 32, 64, 8, 3),
    None: LowRankConfig(32, 32, 64, 4, 2),
}
_NARROW_MATMUL_16BIT = {
    "interpreter": MatmulConfig(32, 32, 32, 1, 1, 1, 32),
    9: MatmulConfig(64, 128, 128, 8, 4, 3),
    8: MatmulConfig(64, 128, 64, 8, 4, 3),
    None: MatmulConfig(32, 64, 32, 8, 4, 2),
}
_NARROW_MATMUL_32BIT = {
    "interpreter": MatmulConfig(32, 32, 32, 1, 1, 1, 32),
    9: MatmulConfig(64, 64, 32, 8, 4, 3),
    8: MatmulConfig(64, 64, 32, 8, 4, 3),
    None: MatmulConfig(32, 64, 32, 8, 4, 2),
}
# Reductions over M (dA, dB) are split into at most this many slices, summed in a second pass, so that
# a long M still fills the GPU without atomics (bit-identical results run to run).
_MAX_SPLIT = {"interpreter": 2, 9: 16, 8: 16, None: 8}
_ROWS_PER_SPLIT = {"interpreter": 16, 9: 1024, 8: 1024, None: 1024}  # the tests' 37 rows: 2 slices


def _arch(device: torch.device):
    if device.type != "cuda":
        return "interpreter"
    major = torch.cuda.get_device_capability(device)[0]
    return major if major in (8, 9) else None


def _lookup(table: dict, device: torch.device):
    arch = _arch(device)
    return table.get(arch, table[None])


def matmul_config(device: torch.device, dtype: torch.dtype, masked: bool = False) -> MatmulConfig:
    """The main GEMM's tiles; ``masked``: its epilogue draws dropout masks (the fused dx)."""
    if dtype in (torch.float16, torch.bfloat16):
        return _lookup(_MATMUL_16BIT_MASKED if masked else _MATMUL_16BIT, device)
    return _lookup(_MATMUL_32BIT_MASKED if masked else _MATMUL_32BIT, device)


def epilogue_only_config(device: torch.device) -> MatmulConfig:
    return _lookup(_EPILOGUE_ONLY, device)


def narrow_matmul_config(device: torch.device, dtype: torch.dtype, width: int) -> MatmulConfig:
    """Config for a GEMM with ``width`` (<= a few hundred) output columns: the column tile covers them."""
    base = _lookup(_NARROW_MATMUL_16BIT if dtype in (torch.float16, torch.bfloat16) else _NARROW_MATMUL_32BIT, device)
    block_n = rank_block(width, base.block_n)
    return MatmulConfig(base.block_m, block_n, base.block_k, base.group_m, base.num_warps, base.num_stages,
                        base.max_block_r)


def low_rank_config(device: torch.device, dtype: torch.dtype, masked: bool = False) -> LowRankConfig:
    """Tiles of the shrink and dA kernels; ``masked``: they draw dropout masks."""
    if dtype in (torch.float16, torch.bfloat16):
        return _lookup(_LOW_RANK_MASKED_16BIT if masked else _LOW_RANK_16BIT, device)
    return _lookup(_LOW_RANK_MASKED_32BIT if masked else _LOW_RANK_32BIT, device)


def rank_block(rank: int, max_block: int) -> int:
    """The rank tile: a power of two, at least 16 (the smallest ``tl.dot`` operand), at most ``max_block``."""
    return max(16, min(triton.next_power_of_2(max(rank, 1)), max_block))


def reduction_splits(rows: int, device: torch.device) -> int:
    """How many slices a reduction over ``rows`` is cut into (each summed by one program, then added)."""
    arch = _arch(device)
    return max(1, min(_MAX_SPLIT.get(arch, _MAX_SPLIT[None]), rows // _ROWS_PER_SPLIT.get(arch, 1024)))


def prefer_fused(
    m: int, n: int, k: int, device: torch.device, dtype: torch.dtype, forced: Optional[str] = None
) -> bool:
    """The ``auto`` rule: the fused GEMM for fp16/bf16 with enough rows, else cuBLAS GEMM + our low-rank
    kernels (fp32 too: our fp32 GEMM is exact-fp32 FMA unless TF32 is allowed, far below cuBLAS)."""
    if forced == "fused":
        return True
    if forced == "unfused":
        return False
    if device.type != "cuda":
        return True  # the interpreter exercises the fused kernels; speed means nothing there
    return dtype in (torch.float16, torch.bfloat16) and m >= FUSED_MIN_ROWS
