"""Microbenchmark of one MSPLoRA linear layer: ``python -m benchmarks.run`` (from any folder).

Times ``bare`` (the frozen linear alone), ``reference`` (the seed's three-branch formulation), ``peft`` (PEFT
LoRA at rank g + m + l) and ``msplora`` (our layer; plus the forced Triton paths and the Triton GEMM on CUDA)
in the modes fwd, bwd and fwd+bwd; prints a table with ratios against ``bare`` and ``reference``; writes
``<out>/<date>-<device>.json`` (with a ``.md`` table and a ``.png`` plot beside it). ``--param-table`` prints
the LoRA vs MSPLoRA parameter counts of RoBERTa-base and LLaMA-2-7B. See ``--help``.
"""
from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import e2e, measure, param_table, providers, report

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CORE_SHAPE = (2048, 1024, 1024)  # the core issue's CPU target: fwd+bwd >= 1.4x reference without dropout
PRESETS: Dict[str, Dict[str, object]] = {
    "cpu": {
        "shapes": [CORE_SHAPE, (512, 512, 2048)],
        "ranks": [(8, 4, 2)],
        "dropouts": [0.0, 0.05],
        "dtype": {"cpu": "fp32", "cuda": "fp32"},
        "cpu_timer": (2, 12),  # (warm-up calls, interleaved rounds)
        "cuda_timer": (25, 100),  # do_bench (warmup ms, rep ms)
    },
    "llama7b": {
        "shapes": [(m, k, n) for m in (4096, 8192) for k, n in ((4096, 4096), (4096, 11008), (11008, 4096))],
        "ranks": [(8, 4, 2), (64, 32, 16)],
        "dropouts": [0.0, 0.05],
        "dtype": {"cpu": "fp32", "cuda": "bf16"},
        "cpu_timer": (1, 5),
        "cuda_timer": (5, 25),  # 24 cases x 3 modes x 7 providers must fit in about 3 minutes on an H200
    },
}


def _int_triple(text: str, what: str) -> Tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{what} must be three non-negative integers separated by commas, got {text!r}")
    return values  # type: ignore[return-value]


def parse_shape(text: str) -> Tuple[int, int, int]:
    shape = _int_triple(text, "--shape (M,K,N)")
    if min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--shape sizes must be >= 1, got {text!r}")
    return shape


def parse_ranks(text: str) -> Tuple[int, int, int]:
    ranks = _int_triple(text, "--ranks (g,m,l)")
    if not any(ranks):
        raise argparse.ArgumentTypeError(f"--ranks must enable at least one scale, got {text!r}")
    return ranks


def parse_dropout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"--dropout must be a probability in [0, 1), got {text!r}")
    return value


def parse_list(choices: Sequence[str], what: str):
    def parse(text: str) -> List[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in items if t not in choices]
        if not items or unknown:
            raise argparse.ArgumentTypeError(f"{what} must be a comma-separated subset of {', '.join(choices)}, "
                                             f"got {text!r}")
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Time one MSPLoRA linear layer (y = x W^T + b + sum of three low-rank branches) against the "
        "frozen linear alone, the unfused reference and PEFT LoRA; write JSON, Markdown and a PNG plot.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS) + sorted(e2e.PRESETS),
                        help="cpu: M,K,N in {2048,1024,1024; 512,512,2048}, ranks 8/4/2, dropout 0 and 0.05, fp32 "
                        "(about a minute on 2 cores); llama7b: M in {4096,8192} x (K,N) in {(4096,4096), "
                        "(4096,11008), (11008,4096)}, ranks 8/4/2 and 64/32/16, dropout 0 and 0.05, bf16 on CUDA; e2e-cpu: "
                        "whole training steps of an 8-layer, 512-wide Llama (seq 256, batch 4, fp32) with PEFT LoRA, "
                        "the reference and MSPLoRA at dropout 0 and 0.05 (a few minutes on 2 cores); e2e: the same "
                        "with a ~1.1B Llama, seq 2048, bf16, on a GPU (see benchmarks/e2e.py). "
                        "Default: llama7b on CUDA, cpu otherwise; --shape, --ranks, --dropout and --dtype override its values")
    parser.add_argument("--shape", type=parse_shape, action="append",
                        help="M,K,N of one case (repeatable); replaces the preset's shapes")
    parser.add_argument("--ranks", type=parse_ranks, action="append",
                        help="g,m,l ranks (repeatable; default 8,4,2 or the preset's)")
    parser.add_argument("--dropout", type=parse_dropout, action="append",
                        help="adapter dropout probability (repeatable; default 0 and 0.05)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="fp32, bf16 or fp16 (default: the preset's)")
    parser.add_argument("--modes", type=parse_list(measure.MODES, "--modes"), default=list(measure.MODES),
                        help="comma-separated subset of fwd,bwd,fwd+bwd (default: all)")
    parser.add_argument("--providers", type=parse_list(providers.ALL_PROVIDERS, "--providers"),
                        default=list(providers.ALL_PROVIDERS),
                        help="comma-separated subset of " + ",".join(providers.ALL_PROVIDERS) + " (default: all "
                        "available; the Triton ones need CUDA)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    parser.add_argument("--out", default="benchmark-results",
                        help="folder for <date>-<device>.json/.md/.png (default: ./benchmark-results)")
    parser.add_argument("--warmup", type=int, help="CPU: warm-up calls per provider; CUDA: do_bench warmup ms")
    parser.add_argument("--repeats", type=int, help="CPU: interleaved timing rounds; CUDA: do_bench rep ms")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: torch's choice, one per core); 1 is steadier on a "
                        "machine that other jobs share")
    parser.add_argument("--param-table", action="store_true",
                        help="print the LoRA vs MSPLoRA parameter counts of RoBERTa-base and LLaMA-2-7B (meta "
                        "device); alone, it runs no timing")
    return parser


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def plan(args: argparse.Namespace, device: torch.device) -> Tuple[List[providers.Case], Tuple[int, int], str]:
    """The cases to run, the timer settings and the dtype name, from the preset and the overriding flags."""
    preset_name = args.preset or ("llama7b" if device.type == "cuda" else "cpu")
    preset = PRESETS[preset_name]
    shapes = args.shape or preset["shapes"]
    ranks = args.ranks or preset["ranks"]
    dropouts = args.dropout if args.dropout is not None else preset["dropouts"]
    dtype_name = args.dtype or preset["dtype"][device.type]
    if dtype_name != "fp32" and device.type == "cpu":
        print(f"note: {dtype_name} matmuls on the CPU are slow and unrepresentative; fp32 is the CPU default",
              file=sys.stderr)
    warmup, repeats = preset["cuda_timer" if device.type == "cuda" else "cpu_timer"]
    timer = (args.warmup if args.warmup is not None else warmup, args.repeats if args.repeats is not None else repeats)
    if timer[1] < 1:
        raise SystemExit(f"--repeats must be >= 1, got {timer[1]}")
    cases = [
        providers.Case(m, k, n, tuple(r), float(p), DTYPES[dtype_name], device)
        for (m, k, n), r, p in itertools.product(shapes, ranks, dropouts)
    ]
    return cases, timer, dtype_name


def run_case(case: providers.Case, names: Sequence[str], modes: Sequence[str], timer: Tuple[int, int]
             ) -> Tuple[List[Dict[str, object]], Optional[str]]:
    """All rows of one case, and a disagreement message if an adapter provider did not match the reference."""
    x, linear, dy = providers.make_inputs(case)
    built = {name: providers.build_provider(name, case, x, linear) for name in names}
    problem = providers.check_agreement(built, case)
    saved = {name: measure.saved_activation_mb(p) for name, p in built.items()}
    rows = []
    for mode in modes:
        active = {n: p for n, p in built.items() if mode == "fwd" or not p.forward_only}
        runs = {n: measure.mode_callable(p, mode, dy) for n, p in active.items()}
        grads = {n: p.grads for n, p in active.items()}
        if case.device.type == "cuda":
            timings = {n: measure.time_cuda(runs[n], grads[n], *timer) for n in runs}
        else:
            timings = measure.time_interleaved(runs, grads, *timer)
        for name, timing in timings.items():
            rows.append({
                "shape": [case.m, case.k, case.n], "ranks": list(case.ranks), "dropout": case.dropout, "mode": mode,
                "provider": name, "median_ms": timing.median_ms, "q20_ms": timing.q20_ms, "q80_ms": timing.q80_ms,
                "peak_mem_mb": measure.peak_memory_mb(runs[name], grads[name], case.device),
                "saved_mb": saved[name], "samples": timing.samples, "min_ms": timing.min_ms,
            })
        del runs
    if case.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, problem


def _summary(rows: Sequence[Dict[str, object]]) -> List[str]:
    """One line per case: msplora's fwd+bwd speedup over the reference and overhead over bare."""
    lines = []
    by_key = {(tuple(r["shape"]), tuple(r["ranks"]), r["dropout"], r["mode"], r["provider"]): r for r in rows}
    for row in rows:
        if row["provider"] == "msplora" and row["mode"] == "fwd+bwd" and row.get("speedup_vs_reference"):
            line = (f"msplora fwd+bwd {','.join(map(str, row['shape']))} r{'/'.join(map(str, row['ranks']))} "
                    f"p={row['dropout']:g}: {row['speedup_vs_reference']:.2f}x faster than reference (medians), "
                    f"{row['vs_bare']:.2f}x the bare linear")
            reference = by_key.get((tuple(row["shape"]), tuple(row["ranks"]), row["dropout"], "fwd+bwd", "reference"))
            if row.get("min_ms") and reference and reference.get("min_ms"):
                line += f"; {reference['min_ms'] / row['min_ms']:.2f}x by the fastest samples"
            lines.append(line)
    return lines


def _load_average() -> Optional[List[float]]:
    """1, 5 and 15 minute load averages: on a shared machine, how busy it was while we timed."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_benchmarks(args: argparse.Namespace) -> Dict[str, object]:
    device = resolve_device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    cases, timer, dtype_name = plan(args, device)
    names, notes = providers.available_providers(args.providers, device)
    for note in notes:
        print(f"note: {note}", flush=True)
    timer_text = (f"triton.testing.do_bench(warmup={timer[0]} ms, rep={timer[1]} ms), median and 20/80 % quantiles"
                  if device.type == "cuda" else
                  f"{timer[0]} warm-up calls, then {timer[1]} interleaved rounds (order rotated each round), "
                  "median and 20/80 % quantiles")
    started = time.perf_counter()
    rows: List[Dict[str, object]] = []
    result = {
        "device": report.device_description(device),
        **report.git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "dtype": dtype_name,
        "timer": timer_text,
        "load_average_at_start": _load_average(),
        "rows": rows,
    }
    stem = f"{time.strftime('%Y-%m-%d', time.gmtime())}-{report.device_slug(device)}"
    # A run stopped by a time limit (SIGTERM) still writes the cases it finished.
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for i, case in enumerate(cases, 1):
            case_rows, problem = run_case(case, names, args.modes, timer)
            if problem:
                notes.append(f"DISAGREEMENT: {problem}")
                print(f"WARNING: {problem}", file=sys.stderr, flush=True)
            rows += case_rows
            print(f"[{i}/{len(cases)}] {case.label} ({time.perf_counter() - started:.0f} s)", flush=True)
            if i < len(cases):
                report.add_ratios(rows)
                report.write_results(result, args.out, stem, notes, with_plot=False)
    except KeyboardInterrupt:
        notes.append(f"interrupted after {len({(tuple(r['shape']), tuple(r['ranks']), r['dropout']) for r in rows})} "
                     f"of {len(cases)} cases")
        print(f"\n{notes[-1]}: writing what was measured", file=sys.stderr, flush=True)
        report.add_ratios(rows)
        report.write_results(result, args.out, stem, notes)
        raise SystemExit(130)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    report.add_ratios(rows)
    result["load_average_at_end"] = _load_average()
    paths = report.write_results(result, args.out, stem, notes)
    print()
    print(report.markdown_table(rows))
    print()
    for line in _summary(rows):
        print(line)
    print(f"\nwrote {paths['json']}, {paths['md']}, {paths['png']} ({time.perf_counter() - started:.0f} s)")
    return result


def run_e2e_benchmark(args: argparse.Namespace) -> Dict[str, object]:
    """The end-to-end training-step presets (``benchmarks/e2e.py``); --ranks, --dropout, --providers (of peft,
    reference, msplora), --dtype, --warmup and --repeats (rounds) override the preset's values."""
    device = resolve_device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    methods = [m for m in e2e.METHODS if m in args.providers]
    if not methods:
        raise SystemExit(f"--preset {args.preset} times the providers {', '.join(e2e.METHODS)}; --providers names none")
    if args.ranks and len(args.ranks) > 1:
        raise SystemExit(f"--preset {args.preset} takes one --ranks")
    return e2e.run_e2e(args.preset, device, args.out, dropouts=args.dropout,
                       ranks=tuple(args.ranks[0]) if args.ranks else (8, 4, 2), warmup=args.warmup,
                       rounds=args.repeats, methods=methods, dtype_name=args.dtype)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.param_table:
        print(param_table.parameter_table_markdown(param_table.parameter_rows()))
        print()
        if not (args.preset or args.shape):
            return
    if args.preset in e2e.PRESETS:
        run_e2e_benchmark(args)
        return
    run_benchmarks(args)


if __name__ == "__main__":
    main()
