"""Every launch choice of the Triton backend, per architecture, in one place.

Tiles, warps and stages are picked by a heuristic (a table per GPU generation) instead of autotuning: the
interpreter that runs the tests on the CPU cannot afford to try configurations, and the backend must stay
deterministic (one shape, one configuration). The Hopper defaults follow the usual Triton GEMM choices
(128 x 128 x 64 tiles, 8 warps, 4 stages, grouped tile order); none of them is measured yet.

``prefer_fused`` is the one rule that decides, under ``forced_path("auto")``, between the fused GEMM and
the unfused path (cuBLAS GEMM + our low-rank kernels): the fused GEMM only where the committed tuning table
(``tuning_table.py``, written on a GPU by ``python -m msplora_kernels._triton.tune``, run by
``benchmarks/gpu_check.sh``) holds a measurement for exactly this key (GPU name, torch and triton versions,
dtype, N, K, rank layout, dropout on/off, M bucket, forward or backward) in which the fused path took at most
``FUSED_MIN_GAIN`` of the unfused time (3% faster). A key the table lacks runs the unfused path, unless
``MSPLORA_TUNE=1`` asks ``online_tune`` to measure it on the device (once; cached in a file; never switching
paths within a process).
``prefer_tma`` is the same rule for the forward's third path, the persistent TMA GEMM
(``_triton/kernels_tma.py``): an entry's optional ``fused_tma_ms`` must be at most ``FUSED_MIN_GAIN`` of
its ``unfused_ms`` and below its ``fused_ms``; where it is chosen it runs instead of the fused GEMM.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
import triton

# The fused GEMM must take at most this fraction of the unfused path's measured time to be chosen.
FUSED_MIN_GAIN = 0.97
OPS = ("forward", "backward")
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


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
class GradConfig:
    """Tiles of the dS/dB sweep: rows of dy per program, columns of dy per step, widest rank tile."""

    block_m: int
    block_n: int
    max_block_r: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class TmaConfig(MatmulConfig):
    """The persistent TMA GEMM's tiles: as ``MatmulConfig``, and the epilogue's column slices per tile."""

    subtiles: int = 2


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
# The persistent TMA GEMM (forward only; shared-memory budget in kernels_tma.py): 128 x 256 x 64, 3 stages,
# the epilogue in two 128 x 128 slices; rank tiles of at most 32 columns (S and B tiles before the K loop).
_TMA_16BIT = {
    "interpreter": TmaConfig(32, 32, 32, 2, 1, 1, 16, 2),
    9: TmaConfig(128, 256, 64, 8, 8, 3, 32, 2),
}
_TMA_32BIT = {"interpreter": TmaConfig(32, 32, 32, 2, 1, 1, 16, 2)}  # fp32 on sm_90: FMA dot, spills; not offered
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
# The dx epilogue drawing the masks again (the saved mask was not found: rare) holds Philox state for the
# whole tile: 128 x 64 spills on sm_90 (compile_check), 64 x 64 does not.
_MATMUL_16BIT_REDRAW = {
    "interpreter": MatmulConfig(32, 32, 32, 2, 1, 1, 32),
    9: MatmulConfig(64, 64, 64, 8, 8, 4),
    8: MatmulConfig(64, 64, 32, 8, 8, 4),
    None: MatmulConfig(64, 64, 32, 8, 4, 3),
}
# The unfused path's epilogue-only launch (y += S B^T, dx += masked dS A): no main loop to feed.
_EPILOGUE_ONLY = {
    "interpreter": MatmulConfig(32, 32, 32, 1, 1, 1, 32),
    9: MatmulConfig(64, 64, 64, 8, 8, 1),
    8: MatmulConfig(64, 64, 64, 8, 8, 1),
    None: MatmulConfig(64, 64, 32, 8, 4, 1),
}
# fp32 epilogues multiply on FMA units with operands in registers: 64 x 64 and 32 x 64 tiles spill on sm_90.
_EPILOGUE_ONLY_32BIT = {
    "interpreter": MatmulConfig(32, 32, 32, 1, 1, 1, 32),
    9: MatmulConfig(32, 32, 32, 8, 4, 1, 16),
    8: MatmulConfig(32, 32, 32, 8, 4, 1, 16),
    None: MatmulConfig(32, 32, 32, 8, 4, 1, 16),
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
    9: LowRankConfig(32, 32, 64, 4, 3),
    8: LowRankConfig(32, 32, 64, 4, 3),
    None: LowRankConfig(32, 32, 64, 4, 2),
}
# Narrow outputs (dS: M x R, dB: N x R) are GEMMs whose output width is the rank tile (block_n: its maximum).
_LOW_RANK_MASKED_16BIT = {
    "interpreter": LowRankConfig(32, 32, 32, 1, 1),
    9: LowRankConfig(64, 64, 128, 8, 3),
    8: LowRankConfig(64, 64, 64, 8, 3),
    None: LowRankConfig(32, 32, 64, 4, 2),
}
_LOW_RANK_MASKED_32BIT = {  # 64-row tiles spill on sm_90 in fp32 (compile_check)
    "interpreter": LowRankConfig(32, 32, 32, 1, 1),
    9: LowRankConfig(32, 32, 64, 8, 3),
    8: LowRankConfig(32, 32, 64, 8, 3),
    None: LowRankConfig(32, 32, 64, 4, 2),
}
# dS = dy B and dB = dy^T S in one sweep over dy (``_lowrank_grad_sb_kernel``): rows of dy per program
# (each program's dB partial sum covers that many rows: taller tiles, fewer partials), columns per step,
# and the widest rank tile. sm_90, 16-bit: a 256 x 64 dy tile (32 KiB per stage) feeds both products.
_GRAD_SB_16BIT = {
    "interpreter": GradConfig(32, 32, 32, 1, 1),
    9: GradConfig(256, 64, 128, 8, 3),
    8: GradConfig(128, 64, 128, 8, 3),
    None: GradConfig(64, 32, 64, 4, 2),
}
_GRAD_SB_32BIT = {  # FMA products with operands in registers: smaller tiles
    "interpreter": GradConfig(32, 32, 32, 1, 1),
    9: GradConfig(64, 32, 64, 4, 2),
    8: GradConfig(64, 32, 64, 4, 2),
    None: GradConfig(32, 32, 64, 4, 2),
}
# One sweep pays 8 N R_t bytes of fp32 partial sums (written, then read by the sum) per row tile, where a
# second sweep would read dy again (M N x its element size): one sweep wins while 8 R_t < block_m x element
# size (``grad_sb_config``; ``python -m benchmarks.roofline`` prints both). The interpreter instead takes
# one sweep for rank tiles of 16 and two for wider ones, so that the tests run both variants.
_INTERPRETER_ONE_PASS_MAX_RANK = 16
# With two sweeps, the dS row tiles are at most this tall (a BLOCK_M x BLOCK_R fp32 accumulator).
_TWO_PASS_MAX_ROWS = 64
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


def matmul_config(device: torch.device, dtype: torch.dtype, masked: bool = False, redraw: bool = False) -> MatmulConfig:
    """The main GEMM's tiles; ``masked``: its epilogue applies dropout masks (the fused dx), ``redraw``: it
    draws them with Philox instead of reading the saved mask."""
    if dtype in (torch.float16, torch.bfloat16):
        if masked and redraw:
            return _lookup(_MATMUL_16BIT_REDRAW, device)
        return _lookup(_MATMUL_16BIT_MASKED if masked else _MATMUL_16BIT, device)
    return _lookup(_MATMUL_32BIT_MASKED if masked else _MATMUL_32BIT, device)


def tma_config(arch, dtype: torch.dtype) -> TmaConfig:
    """The TMA GEMM's tiles for ``arch`` (``_arch``: 9 or "interpreter"; it runs nowhere else)."""
    return (_TMA_16BIT if dtype in (torch.float16, torch.bfloat16) else _TMA_32BIT)[arch]


def for_strides(config: MatmulConfig, strides: Sequence[int]) -> MatmulConfig:
    """The config for a main loop over operands with these strides: where a stride is neither 1 nor a
    multiple of 16 elements the loads cannot be vectorised or asynchronous, every element carries its own
    64-bit address, and the usual tiles spill registers (compile_check at K = 72); such loops get tiles of
    at most 64 x 64 x 32 and no software pipeline."""
    if all(s == 1 or s % 16 == 0 for s in strides):
        return config
    return MatmulConfig(min(config.block_m, 64), min(config.block_n, 64), min(config.block_k, 32), config.group_m,
                        config.num_warps, 1, config.max_block_r)


def shrink_config(config: LowRankConfig, block_r: int, strides: Sequence[int]) -> LowRankConfig:
    """The shrink's tiles for a rank tile of ``block_r`` over x with these strides. A 128-wide rank tile
    takes 32 columns of x per step (64 x 128 accumulators plus wider steps spill on sm_90, compile_check);
    an x whose row stride is not a multiple of 16 elements is read in 32-column steps, unpipelined."""
    block_k, stages = config.block_k, config.num_stages
    if block_r > 64:
        block_k = min(block_k, 32)
    if not all(s == 1 or s % 16 == 0 for s in strides):
        block_k, stages = min(block_k, 32), 1
    return LowRankConfig(config.block_m, block_k, config.max_block_r, config.num_warps, stages)


def grad_a_config(config: LowRankConfig, block_r: int, strides: Sequence[int]) -> LowRankConfig:
    """The dA kernel's tiles for a rank tile of ``block_r`` over operands with these strides: a 128-wide rank
    tile over unaligned rows (a stride neither 1 nor a multiple of 16: per-element addresses) takes 64
    columns of x per program (128 x 128 fp32 accumulators spill there on sm_90, compile_check at K = 72)."""
    if block_r > 64 and not all(s == 1 or s % 16 == 0 for s in strides):
        return LowRankConfig(config.block_m, min(config.block_k, 64), config.max_block_r, config.num_warps,
                             config.num_stages)
    return config


def epilogue_only_config(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> MatmulConfig:
    if dtype in (torch.float32, torch.float64):
        return _lookup(_EPILOGUE_ONLY_32BIT, device)
    return _lookup(_EPILOGUE_ONLY, device)


def grad_sb_config(device: torch.device, dtype: torch.dtype, rank: int) -> Tuple[GradConfig, int, bool]:
    """(tiles, rank tile, one sweep?) of the dS/dB launch for a total rank of ``rank``."""
    config = _lookup(_GRAD_SB_16BIT if dtype in (torch.float16, torch.bfloat16) else _GRAD_SB_32BIT, device)
    block_r = rank_block(rank, config.max_block_r)
    if _arch(device) == "interpreter":
        one_pass = block_r <= _INTERPRETER_ONE_PASS_MAX_RANK
    else:
        one_pass = 8 * block_r < config.block_m * dtype.itemsize
    if not one_pass:
        config = GradConfig(min(config.block_m, _TWO_PASS_MAX_ROWS), config.block_n, config.max_block_r,
                            config.num_warps, config.num_stages)
    return config, block_r, one_pass


def low_rank_config(device: torch.device, dtype: torch.dtype, masked: bool = False) -> LowRankConfig:
    """Tiles of the shrink and dA kernels; ``masked``: they draw dropout masks."""
    if dtype in (torch.float16, torch.bfloat16):
        return _lookup(_LOW_RANK_MASKED_16BIT if masked else _LOW_RANK_16BIT, device)
    return _lookup(_LOW_RANK_MASKED_32BIT if masked else _LOW_RANK_32BIT, device)


RANK_QUANTUM = 16  # the smallest ``tl.dot`` inner dimension


def rank_block(rank: int, max_block: int) -> int:
    """A rank *tile* (the rank as an output dimension: S, dS, dB, dA): a power of two (``tl.arange``), at
    least 16, at most ``max_block``. Such a tile is padded to a power of two: reading x or dy once for all
    ranks matters more in those memory-bound kernels than the padded columns' products."""
    return max(RANK_QUANTUM, min(triton.next_power_of_2(max(rank, 1)), max_block))


def rank_step(ranks: Sequence[int], max_block: int) -> int:
    """A rank *step* (the rank as a loop's reduction: the epilogues' S B^T and per-branch dS_s A_s): the
    largest power of two, at least 16, at most ``max_block``, that divides every rank rounded up to a
    multiple of 16, so each loop over a rank range is padded to a multiple of 16 only (R = 112: seven
    steps of 16, not 128; 64/32/16 masked per branch: 64 + 32 + 16, not 3 x 64)."""
    step = RANK_QUANTUM
    padded = [-(-max(int(r), 1) // RANK_QUANTUM) * RANK_QUANTUM for r in ranks]
    while step * 2 <= max_block and all(p % (step * 2) == 0 for p in padded):
        step *= 2
    return step


def reduction_splits(rows: int, device: torch.device) -> int:
    """How many slices a reduction over ``rows`` is cut into (each summed by one program, then added)."""
    arch = _arch(device)
    return max(1, min(_MAX_SPLIT.get(arch, _MAX_SPLIT[None]), rows // _ROWS_PER_SPLIT.get(arch, 1024)))


def m_bucket(m: int) -> int:
    """The M bucket of a call: the smallest power of two >= M (a measurement at M = 8192 covers 4097..8192)."""
    return 1 << max(m - 1, 0).bit_length()


def software_versions() -> Tuple[str, str]:
    """(torch, triton) versions as the table records them: torch without its local build tag."""
    return torch.__version__.split("+")[0], triton.__version__


def table_key(gpu: str, torch_version: str, triton_version: str, dtype: str, n: int, k: int,
              ranks: Sequence[int], dropout: bool, m: int, op: str) -> Tuple:
    """The key of one tuning-table entry (``m`` is bucketed)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return (gpu, torch_version, triton_version, dtype, int(n), int(k), ",".join(str(int(r)) for r in ranks),
            bool(dropout), m_bucket(int(m)), op)


_ENTRY_FIELDS = ("gpu", "torch", "triton", "dtype", "n", "k", "ranks", "dropout", "m_bucket", "op",
                 "fused_ms", "unfused_ms")


def _entry_key(entry: dict) -> Tuple:
    """The key of a tuning-table entry (its ``ranks`` written "8,4,2"), as ``table_key`` builds a call's."""
    ranks = [int(r) for r in str(entry["ranks"]).split(",")]
    return table_key(entry["gpu"], entry["torch"], entry["triton"], entry["dtype"], entry["n"], entry["k"],
                     ranks, entry["dropout"], entry["m_bucket"], entry["op"])


def parse_table(entries: Iterable[dict]) -> Dict[Tuple, bool]:
    """{key: fused path chosen} from tuning-table entries; a malformed entry raises, naming what is wrong."""
    decisions: Dict[Tuple, bool] = {}
    for index, entry in enumerate(entries):
        missing = [f for f in _ENTRY_FIELDS if f not in entry]
        if missing:
            raise ValueError(f"tuning table entry {index}: missing fields {missing}")
        fused, unfused = float(entry["fused_ms"]), float(entry["unfused_ms"])
        if not (fused > 0 and unfused > 0):
            raise ValueError(f"tuning table entry {index}: times must be positive, got {fused} and {unfused}")
        if entry["m_bucket"] != m_bucket(int(entry["m_bucket"])):
            raise ValueError(f"tuning table entry {index}: m_bucket {entry['m_bucket']} is not a power of two")
        key = _entry_key(entry)
        decisions[key] = fused <= FUSED_MIN_GAIN * unfused
    return decisions


@functools.lru_cache(maxsize=1)
def _committed_decisions() -> Dict[Tuple, bool]:
    from . import tuning_table

    return parse_table(tuning_table.ENTRIES)


@functools.lru_cache(maxsize=None)
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def prefer_fused(
    m: int, n: int, k: int, device: torch.device, dtype: torch.dtype, forced: Optional[str] = None,
    ranks: Tuple[int, ...] = (), dropout: bool = False, op: str = "forward",
    decisions: Optional[Dict[Tuple, bool]] = None,
) -> bool:
    """The ``auto`` rule: the fused GEMM only where the tuning table measured it >= 3% faster for this key;
    cuBLAS GEMM + our low-rank kernels everywhere else (and always off CUDA, where nothing was measured)."""
    if forced == "fused":
        return True
    if forced in ("unfused", "fused_tma"):  # fused_tma forces the forward; backward then runs cuBLAS + ours
        return False
    if device.type != "cuda":
        return False
    table = _committed_decisions() if decisions is None else decisions
    key = _call_key(m, n, k, device, dtype, ranks, dropout, op)
    if key in table:
        return table[key]
    from . import online_tune  # a missing key: unfused, or measured once with MSPLORA_TUNE=1

    return online_tune.decide(key, device)


def _call_key(m, n, k, device, dtype, ranks, dropout, op) -> Tuple:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return table_key(_gpu_name(index), *software_versions(), _DTYPE_NAMES.get(dtype, str(dtype)), n, k, ranks,
                     dropout, m, op)


def parse_tma_table(entries: Iterable[dict]) -> Dict[Tuple, bool]:
    """{key: TMA GEMM chosen} for the entries that measured it (``fused_tma_ms``, forward only): chosen where
    it took at most ``FUSED_MIN_GAIN`` of the unfused time and less than the fused GEMM."""
    entries = list(entries)
    parse_table(entries)  # the common fields, checked once
    decisions: Dict[Tuple, bool] = {}
    for index, entry in enumerate(entries):
        if "fused_tma_ms" not in entry:
            continue
        tma = float(entry["fused_tma_ms"])
        if not tma > 0:
            raise ValueError(f"tuning table entry {index}: fused_tma_ms must be positive, got {tma}")
        if entry["op"] != "forward":
            raise ValueError(f"tuning table entry {index}: fused_tma_ms is measured for op 'forward' only, "
                             f"got op {entry['op']!r}")
        key = _entry_key(entry)
        decisions[key] = (tma <= FUSED_MIN_GAIN * float(entry["unfused_ms"])
                          and tma < float(entry["fused_ms"]))
    return decisions


@functools.lru_cache(maxsize=1)
def _committed_tma_decisions() -> Dict[Tuple, bool]:
    from . import tuning_table

    return parse_tma_table(tuning_table.ENTRIES)


def prefer_tma(
    m: int, n: int, k: int, device: torch.device, dtype: torch.dtype, forced: Optional[str] = None,
    ranks: Tuple[int, ...] = (), dropout: bool = False, decisions: Optional[Dict[Tuple, bool]] = None,
) -> bool:
    """Whether the forward runs the persistent TMA GEMM: forced (``"fused_tma"``), or under ``auto`` where
    the tuning table measured it >= 3% faster than the unfused path and faster than the fused GEMM for this
    key. Never otherwise (nor off CUDA). The caller still checks that the operands allow TMA."""
    if forced == "fused_tma":
        return True
    if forced in ("fused", "unfused") or device.type != "cuda":
        return False
    table = _committed_tma_decisions() if decisions is None else decisions
    return table.get(_call_key(m, n, k, device, dtype, ranks, dropout, "forward"), False)
