"""A roofline model of one MSPLoRA layer on the Triton backend: ``python -m benchmarks.roofline``.

For each launch of a layer's forward and backward (the unfused path, cuBLAS + our low-rank kernels, which
``auto`` runs unless the tuning table says otherwise, and the fused path) it prints the FLOPs, the HBM bytes,
the integer instructions of the dropout work, the lower bound on an H200 (the largest of FLOPs / peak,
bytes / bandwidth, instructions / integer throughput) and the predicted ratio to the bare layer (x W^T
forward, dy W backward: a frozen W has no weight gradient). These are predictions, not measurements: no GPU
has run the kernels. Design arguments cite them until ``benchmarks/gpu_check.sh`` measures.

Model (each assumption is a constant below):
- H200 SXM: 989 TFLOP/s dense bf16 tensor cores, 4.8 TB/s HBM3e, 132 SMs at 1.755 GHz.
- Dropout work is integer instructions per element of x, counted in the SASS that triton 3.9 compiles for
  sm_90 (``python -m msplora_kernels._triton.compile_check --rng-cost``; ``--measure-rng`` recomputes them):
  drawing and packing the masks once (the shrink), and reading and unpacking them (dx and dA). They run on
  64 INT32 lanes per SM per clock (conservative: IMAD also issues to the FP32 lanes, which would halve it).
- Every kernel is bound by its slowest resource; kernels run one after another; launch gaps are ignored (at
  M = 8192 each kernel runs for tens of microseconds or more). ``derated`` assumes 75% of peak FLOPs for
  every GEMM (cuBLAS and ours) and 85% of peak bandwidth for every memory-bound kernel.
- Sizes: bf16 activations and weights, fp32 partial sums over 8 row slices for dB and dA (M >= 8192).

    python -m benchmarks.roofline                       # llama7b: M=8192, K=4096, N in {4096, 11008}, p=0.05
    python -m benchmarks.roofline --shape 4096,11008,4096 --ranks 64,32,16 --dropout 0
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

PEAK_FLOPS = 989e12  # H200 SXM dense bf16
PEAK_BYTES = 4.8e12  # HBM3e, bytes/s
SMS, CLOCK, INT_LANES = 132, 1.755e9, 64
PEAK_INT = SMS * CLOCK * INT_LANES  # integer instructions per second (one thread's instruction = one lane)
GEMM_EFFICIENCY, MEMORY_EFFICIENCY = 0.75, 0.85
# Integer-pipe SASS instructions per element of x, three branches (compile_check --rng-cost, triton 3.9,
# sm_90, commit of this file): draw + threshold + pack; read + unpack + the per-branch selects.
RNG_DRAW_PER_ELEMENT = 30.4
RNG_READ_PER_ELEMENT = 13.4
BF16, FP32 = 2, 4
SPLITS = 8
# Rank padding (``msplora_kernels._triton.tuning``): a rank *tile* (the rank as an output dimension: S, dS,
# dB, dA) is a power of two from 16 to 128; a rank *step* (the rank as a reduction: S B^T, dS_s A_s) pads each
# range to a multiple of 16 (``rank_padding="pow2"`` models the earlier power-of-two steps).
RANK_QUANTUM, MAX_RANK_TILE = 16, 128
# dS = dy B and dB = dy^T S in one launch (``_lowrank_grad_sb_kernel``, sm_90, 16-bit): one sweep over dy with
# GRAD_BLOCK_M-row tiles, each writing an fp32 dB partial, while 8 R_t < GRAD_BLOCK_M x 2 bytes; else two
# sweeps (dS row tiles and dB slices) in the same launch. B (N x R) is read from HBM once (L2 holds it).
GRAD_BLOCK_M = 256


@dataclass
class Launch:
    name: str
    flops: float
    bytes: float
    int_ops: float = 0.0
    gemm: bool = False

    def bound(self, derated: bool = False) -> Tuple[float, str]:
        """(seconds, what binds)."""
        flops_eff = GEMM_EFFICIENCY if derated else 1.0
        bytes_eff = MEMORY_EFFICIENCY if derated else 1.0
        terms = {"tensor": self.flops / (PEAK_FLOPS * (flops_eff if self.gemm else 1.0)),
                 "memory": self.bytes / (PEAK_BYTES * bytes_eff),
                 "integer": self.int_ops / PEAK_INT}
        what = max(terms, key=terms.get)
        return terms[what], what


def rank_tile(r: int) -> int:
    return max(RANK_QUANTUM, min(1 << max(r - 1, 0).bit_length(), MAX_RANK_TILE))


def rank_steps(ranks: Sequence[int], padding: str = "16") -> int:
    """Rank columns a loop over these ranges computes: each rounded up to 16 (or, ``pow2``, to the power-of-two
    step the kernels used before: the widest range's, for every range)."""
    if padding == "pow2":
        step = rank_tile(max(ranks))
        return sum(-(-r // step) * step for r in ranks)
    return sum(-(-r // RANK_QUANTUM) * RANK_QUANTUM for r in ranks)


def grad_sb_one_sweep(r: int) -> bool:
    """The backend's rule (``tuning.grad_sb_config``) for 16-bit dy on sm_90."""
    return 8 * rank_tile(r) < GRAD_BLOCK_M * BF16


def layer_launches(m: int, k: int, n: int, ranks: Sequence[int], p: float, path: str,
                   rng: str = "once", rank_padding: str = "16", ds_db: str = "auto") -> Dict[str, List[Launch]]:
    """The launches of one layer's forward and backward. ``path``: unfused, fused or bare; ``rng``: once (the
    shrink draws and stores the packed mask, dx and dA read it) or redraw (each of the three draws again);
    ``rank_padding``: 16 (now) or pow2 (before); ``ds_db``: auto (the backend's rule), one (one sweep over dy),
    two (two sweeps, one launch) or separate (the earlier two launches, dB split over 8 slices)."""
    r = sum(ranks)
    branches = len(ranks)
    masked = p > 0
    x, y, w = m * k * BF16, m * n * BF16, n * k * BF16
    gemm_flops = 2.0 * m * n * k
    if path == "bare":
        return {"forward": [Launch("x W^T (cuBLAS)", gemm_flops, x + w + y, gemm=True)],
                "backward": [Launch("dy W (cuBLAS)", gemm_flops, y + w + x, gemm=True)]}
    mask = m * k / 2 if masked else 0.0  # packed: one byte per pair of elements
    draw = RNG_DRAW_PER_ELEMENT * m * k if masked else 0.0
    read = RNG_READ_PER_ELEMENT * m * k if masked else 0.0
    if rng == "redraw":
        read = draw
        mask_read = mask_write = 0.0
    else:
        mask_read, mask_write = mask, mask
    tile = rank_tile(r) * -(-r // MAX_RANK_TILE)  # rank-tile columns (S, dS, dB, dA), all tiles
    # A masked shrink or dA adds one full-tile product per branch (the other branches' rows zeroed).
    tile_products = tile * (branches if masked else 1)
    low_rank_y = 2.0 * m * n * rank_steps([r], rank_padding)
    masked_dx = 2.0 * m * k * (rank_steps(ranks, rank_padding) if masked else rank_steps([r], rank_padding))
    s_bytes, a_bytes, b_bytes = m * r * BF16, r * k * BF16, n * r * BF16
    # fp32 adapters (as trained) read once, A_cat and B_cat written in bf16.
    forward = [Launch("pack A_cat, B_cat (one launch, cast)", 0.0, (r * k + n * r) * (FP32 + BF16)),
               Launch("shrink S = c_s D_s(x) A_s^T" + (" + mask" if masked else ""), 2.0 * m * k * tile_products,
                      x + a_bytes + s_bytes + mask_write, draw)]
    if ds_db == "auto":
        ds_db = "one" if grad_sb_one_sweep(r) else "two"
    if ds_db == "separate":
        backward = [Launch("dS = dy B", 2.0 * m * n * tile, y + b_bytes + s_bytes),
                    Launch("dB = dy^T S (8 slices)", 2.0 * m * n * tile, y + s_bytes + SPLITS * n * r * FP32)]
        pieces = SPLITS
    elif ds_db == "one":
        pieces = -(-m // GRAD_BLOCK_M)
        backward = [Launch(f"dS, dB (1 sweep over dy, {pieces} partials)", 4.0 * m * n * tile,
                           y + b_bytes + 2 * s_bytes + pieces * n * r * FP32)]
    else:
        pieces = SPLITS
        backward = [Launch("dS, dB (2 sweeps over dy, 1 launch)", 4.0 * m * n * tile,
                           2 * y + b_bytes + 3 * s_bytes + SPLITS * n * r * FP32)]
    if path == "unfused":
        forward += [Launch("x W^T + b (cuBLAS)", gemm_flops, x + w + y, gemm=True),
                    Launch("y += S B^T", low_rank_y, 2 * y + s_bytes + b_bytes)]
        backward += [Launch("dy W (cuBLAS)", gemm_flops, y + w + x, gemm=True),
                     Launch("dx += sum_s c_s keep_s (dS_s A_s)", masked_dx, 2 * x + s_bytes + a_bytes + mask_read,
                            read)]
    else:
        forward += [Launch("x W^T + b + S B^T (ours)", gemm_flops + low_rank_y, x + w + y + s_bytes + b_bytes,
                           gemm=True)]
        backward += [Launch("dy W + masked dS A (ours)", gemm_flops + masked_dx, y + w + x + s_bytes + a_bytes + mask_read,
                            read, gemm=True)]
    backward += [Launch("dA = c_s dS_s^T D_s(x) (8 slices)", 2.0 * m * k * tile_products,
                        x + s_bytes + mask_read + SPLITS * r * k * FP32, read),
                 Launch(f"sum dA (8) and dB ({pieces}) partials, one launch", 0.0,
                        SPLITS * r * k * FP32 + a_bytes + pieces * n * r * FP32 + b_bytes)]
    return {"forward": forward, "backward": backward}


def predict(m: int, k: int, n: int, ranks: Sequence[int], p: float, path: str, rng: str = "once",
            derated: bool = False, **design: str) -> Dict[str, float]:
    """Predicted seconds of forward, backward and fwd+bwd, and their ratios to bare (``design``:
    ``rank_padding`` and ``ds_db`` of ``layer_launches``)."""
    ours = layer_launches(m, k, n, ranks, p, path, rng, **design)
    bare = layer_launches(m, k, n, ranks, p, "bare")
    result = {}
    for mode in ("forward", "backward"):
        result[mode] = sum(launch.bound(derated)[0] for launch in ours[mode])
        result["bare_" + mode] = sum(launch.bound(derated)[0] for launch in bare[mode])
    result["fwd+bwd"] = result["forward"] + result["backward"]
    result["bare_fwd+bwd"] = result["bare_forward"] + result["bare_backward"]
    for mode in ("forward", "backward", "fwd+bwd"):
        result["ratio_" + mode] = result[mode] / result["bare_" + mode]
    return result


def _table(m, k, n, ranks, p, path) -> str:
    lines = [f"\n{path} path, M={m} K={k} N={n}, ranks {'/'.join(map(str, ranks))}, p={p:g} (H200 lower bounds)",
             f"{'launch':50s} {'GFLOP':>8s} {'MB':>8s} {'G int':>7s} {'us':>8s}  bound"]
    for mode, launches in layer_launches(m, k, n, ranks, p, path).items():
        for launch in launches:
            seconds, what = launch.bound()
            lines.append(f"{mode[:3]} {launch.name:46s} {launch.flops / 1e9:8.2f} {launch.bytes / 1e6:8.2f} "
                         f"{launch.int_ops / 1e9:7.2f} {seconds * 1e6:8.1f}  {what}")
    return "\n".join(lines)


def _parse_triple(text: str) -> Tuple[int, int, int]:
    values = tuple(int(v) for v in text.split(","))
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers separated by commas, got {text!r}")
    return values  # type: ignore[return-value]


def _parse_ranks(text: str) -> Tuple[int, ...]:
    values = tuple(int(v) for v in text.split(",") if int(v) > 0)
    if not values or len(values) > 4:
        raise argparse.ArgumentTypeError(f"expected 1 to 4 positive ranks separated by commas, got {text!r}")
    return values


def main(argv=None) -> int:
    global RNG_DRAW_PER_ELEMENT, RNG_READ_PER_ELEMENT
    parser = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=_parse_triple, action="append", help="M,K,N (repeatable; default: M=8192, "
                        "K=4096, N in {4096, 11008})")
    parser.add_argument("--ranks", type=_parse_ranks, default=(8, 4, 2), help="e.g. 8,4,2 (default)")
    parser.add_argument("--dropout", type=float, default=0.05, help="adapter dropout p (default 0.05)")
    parser.add_argument("--launches", action="store_true", help="print every launch's FLOPs, bytes and bound")
    parser.add_argument("--measure-rng", action="store_true", help="recount the RNG instructions per element by "
                        "compiling for sm_90 (needs TRITON_INTERPRET=0; a few seconds)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.measure_rng:
        from msplora_kernels._triton import compile_check

        costs = compile_check.rng_costs(9, len(args.ranks))
        RNG_DRAW_PER_ELEMENT = costs["draw"]["integer_per_element"]
        RNG_READ_PER_ELEMENT = costs["read"]["integer_per_element"]
    shapes = args.shape or [(8192, 4096, 4096), (8192, 4096, 11008)]
    print(f"RNG: {RNG_DRAW_PER_ELEMENT:.1f} integer instructions per element to draw, {RNG_READ_PER_ELEMENT:.1f} "
          f"to read the packed mask (sm_90 SASS); H200 {PEAK_FLOPS / 1e12:.0f} TFLOP/s, {PEAK_BYTES / 1e12:.1f} TB/s, "
          f"{PEAK_INT / 1e12:.1f} T int instr/s")
    print(f"\n{'shape':18s} {'path':8s} {'rng':6s} {'fwd':>6s} {'bwd':>6s} {'f+b':>6s}   derated: {'fwd':>6s} {'f+b':>6s}"
          f"   (predicted time / bare)")
    for m, k, n in shapes:
        for path in ("unfused", "fused"):
            for rng in (("once", "redraw") if args.dropout > 0 else ("once",)):
                peak = predict(m, k, n, args.ranks, args.dropout, path, rng)
                der = predict(m, k, n, args.ranks, args.dropout, path, rng, derated=True)
                print(f"{m}x{k}x{n:<8d} {path:8s} {rng:6s} {peak['ratio_forward']:6.3f} {peak['ratio_backward']:6.3f} "
                      f"{peak['ratio_fwd+bwd']:6.3f}            {der['ratio_forward']:6.3f} {der['ratio_fwd+bwd']:6.3f}")
    print(f"\ndesign choices, p={args.dropout:g} (predicted fwd+bwd time / bare; backward in brackets)")
    designs = [("now: dS/dB one launch (backend's rule), ranks padded to 16", {}),
               ("dS/dB one sweep over dy", {"ds_db": "one"}),
               ("dS/dB two sweeps, one launch", {"ds_db": "two"}),
               ("before: dS, dB two launches", {"ds_db": "separate"}),
               ("before: power-of-two rank steps", {"rank_padding": "pow2"})]
    for m, k, n in shapes:
        for label, design in designs:
            cells = []
            for path in ("unfused", "fused"):
                peak = predict(m, k, n, args.ranks, args.dropout, path, **design)
                cells.append(f"{path} {peak['ratio_fwd+bwd']:6.3f} ({peak['backward'] * 1e6:7.1f} us)")
            print(f"{m}x{k}x{n:<8d} {label:60s} " + "   ".join(cells))
    if args.launches:
        for m, k, n in shapes:
            for path in ("unfused", "fused", "bare"):
                print(_table(m, k, n, args.ranks, args.dropout, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
