"""The tuning step: measure our fused GEMM against cuBLAS + our low-rank kernels, per key, on this GPU, and
write the table ``tuning.prefer_fused`` reads (``_triton/tuning_table.py``, committed with device, commit
and date). Run by ``benchmarks/gpu_check.sh``; by hand:

    python -m msplora_kernels._triton.tune --preset llama7b --out msplora_kernels/_triton/tuning_table.py

Each key (GPU name, torch and triton versions, dtype, N, K, rank layout, dropout on/off, M bucket) gets two
entries, ``forward`` (S and y) and ``backward`` (dS, dB, dx, dA), each with the median time of both paths
from ``triton.testing.do_bench``; the forward entry also times the persistent TMA GEMM (``fused_tma_ms``,
where the operands allow TMA on this GPU and its y matched the unfused path's; ``tuning.prefer_tma`` reads
it). Entries for other keys already in the table are kept (``--merge``).

Also here: ``count_launches``, the kernels one layer call launches (Triton kernels and torch ops that run
one), used by the tests.
"""
from __future__ import annotations

import argparse
import datetime
import os
import pprint
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from . import kernels, kernels_tma, tuning

PRESETS = {
    "llama7b": {"shapes": [(m, k, n) for m in (4096, 8192) for k, n in ((4096, 4096), (4096, 11008), (11008, 4096))],
                "ranks": [(8, 4, 2), (64, 32, 16)], "dropouts": [0.0, 0.05]},
    "quick": {"shapes": [(8192, 4096, 4096), (8192, 4096, 11008)], "ranks": [(8, 4, 2)], "dropouts": [0.0, 0.05]},
}
_HEADER = '''"""Measured fused-vs-unfused times per key, read by ``tuning.prefer_fused`` (the fused GEMM runs only where an
entry here says it is at least 3% faster). Written by ``python -m msplora_kernels._triton.tune`` on a GPU
(``benchmarks/gpu_check.sh`` runs it) and committed; each entry records the device, commit and date.
"""

'''


def write_table(path: str, entries: Sequence[dict], merge: bool = False) -> List[dict]:
    """Write ``entries`` as the table module at ``path``; ``merge``: keep the entries already there whose
    keys the new ones do not replace. Returns what was written."""
    new = list(entries)
    tuning.parse_tma_table(new)  # refuse to write anything prefer_fused or prefer_tma could not read
    if merge and os.path.exists(path):
        namespace: Dict[str, object] = {}
        with open(path, encoding="utf-8") as file:
            exec(compile(file.read(), path, "exec"), namespace)  # our own generated file: a literal list
        fresh = set(tuning.parse_table(new))
        old = [e for e in namespace.get("ENTRIES", []) if next(iter(tuning.parse_table([e]))) not in fresh]
        new = old + new
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        file.write(_HEADER + "ENTRIES = " + pprint.pformat(new, width=116, sort_dicts=False) + "\n")
    os.replace(path + ".tmp", path)  # a failed write leaves the old table
    return new


# ---- launch counting ----------------------------------------------------------------------------------------

_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "view", "_unsafe_view", "t", "transpose", "as_strided",
              "slice", "select", "expand", "detach", "alias", "set_", "unsqueeze", "squeeze", "permute", "split",
              "split_with_sizes", "unbind", "reshape", "_reshape_alias", "lift_fresh", "sym_size", "sym_stride",
              "sym_numel", "sym_storage_offset", "is_contiguous"}


def count_launches(x, weight, bias, branches, p: float = 0.0, seed: int = 3,
                   dtype: torch.dtype = torch.float32) -> Dict[str, Dict[str, int]]:
    """Kernels one whole layer call launches, per path: ``msplora_kernels.msplora_linear`` in training mode on
    the Triton backend (x, W and b in ``dtype``, fp32 adapters as parameters, x requiring grad, W and b
    frozen: the eager autograd
    Function, its adapter packing and casts included), then ``backward`` into the gradients of x and every
    adapter (all None before, as after ``zero_grad()``: autograd's accumulation is counted too).
    Each Triton launch counts one, each torch op that runs a kernel (not allocation or views) one.
    ``forward_cached``: the forward again with ``MSPLORA_ADAPTER_CACHE=1`` and unchanged adapters."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    from .. import function, msplora_linear, triton_backend

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    x = x.detach().to(device, dtype).requires_grad_()
    weight = weight.detach().to(device, dtype)
    bias = None if bias is None else bias.detach().to(device, dtype)
    fp32 = torch.float32
    params = [(torch.nn.Parameter(a.detach().to(device, fp32)), torch.nn.Parameter(b.detach().to(device, fp32)), c)
              for a, b, c in branches]
    leaves = [x] + [t for a, b, _ in params for t in (a, b)]
    dy = torch.randn(x.shape[0], weight.shape[0], device=device, dtype=dtype)
    count = [0]

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in _NO_LAUNCH:
                count[0] += 1
            return func(*args, **(kwargs or {}))

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **meta):
                count[0] += 1
                with _disable_current_modes():  # the interpreter's own tensor work is not a launch
                    return self.kernel[grid](*args, **meta)
            return launch

    def counted(run):
        count[0] = 0
        with Counter():
            out = run()
        return count[0], out

    def layer():
        torch.manual_seed(seed)
        return msplora_linear(x, weight, bias, params, p, True, "triton")

    names = [name for name in dir(kernels) if name.endswith("_kernel")]
    saved = {name: getattr(kernels, name) for name in names}
    previous = os.environ.get(function.CACHE_ENV_VAR)
    result: Dict[str, Dict[str, int]] = {}
    try:
        for name in names:
            setattr(kernels, name, Spy(saved[name]))
        for path in ("unfused", "fused"):
            with triton_backend.forced_path(path):
                layer().backward(dy)  # warm caches
                forward, y = counted(layer)
                for leaf in leaves:
                    leaf.grad = None  # as after optimizer.zero_grad(): autograd's accumulation is counted too
                backward, _ = counted(lambda: y.backward(dy))
                os.environ[function.CACHE_ENV_VAR] = "1"
                function.clear_adapter_cache()
                layer()
                cached, _ = counted(layer)
                function.clear_adapter_cache()
                if previous is None:
                    del os.environ[function.CACHE_ENV_VAR]
                else:
                    os.environ[function.CACHE_ENV_VAR] = previous
                result[path] = {"forward": forward, "backward": backward, "forward_cached": cached}
    finally:
        for name, kernel in saved.items():
            setattr(kernels, name, kernel)
        if previous is None:
            os.environ.pop(function.CACHE_ENV_VAR, None)
        else:
            os.environ[function.CACHE_ENV_VAR] = previous
    return result


# ---- measuring on a GPU -------------------------------------------------------------------------------------


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def measure(shapes, rank_sets, dropouts, dtype: torch.dtype, warmup_ms: int, rep_ms: int,
            deadline: Optional[float] = None, wrong: Optional[List[str]] = None,
            device: Optional[torch.device] = None) -> List[dict]:
    """Median times (ms) of both paths per key and op on the current GPU; stops at ``deadline`` (time.time()).
    Keys where the TMA GEMM's y disagreed with the unfused path's are appended to ``wrong`` (not timed).
    ``device``: the current CUDA device by default (the tests run it on the CPU under the interpreter, with
    ``triton.testing.do_bench`` replaced)."""
    import triton.testing

    from .. import triton_backend

    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    torch_version, triton_version = tuning.software_versions()
    commit, date = _commit(), datetime.date.today().isoformat()
    entries = []
    for m, k, n in shapes:
        for ranks in rank_sets:
            ranks = tuple(r for r in ranks if r)
            for p in dropouts:
                if deadline is not None and time.time() > deadline:
                    print("tune: time limit reached, table partial", flush=True)
                    return entries
                g = torch.Generator(device=device).manual_seed(0)
                x = torch.randn(m, k, device=device, generator=g).to(dtype)
                weight = (torch.randn(n, k, device=device, generator=g) / k**0.5).to(dtype)
                a_cat = (torch.randn(sum(ranks), k, device=device, generator=g) / k**0.5).to(dtype)
                b_cat = (torch.randn(n, sum(ranks), device=device, generator=g) * 0.01).to(dtype)
                # with a bias, as the pre-warm step compiles the forward (the key does not depend on it)
                bias = torch.randn(n, device=device, generator=g).to(dtype)
                dy = torch.randn(m, n, device=device, generator=g).to(dtype)
                scalings = [16.0 / r for r in ranks]
                times = {}
                if kernels_tma.supported(x, weight, tuning._arch(device)):
                    if tma_agrees(x, weight, a_cat, b_cat, ranks, scalings, p, bias):
                        with triton_backend.forced_path("fused_tma"):
                            tma = lambda: triton_backend.forward(x, weight, bias, a_cat, b_cat, ranks,  # noqa: E731
                                                                 scalings, p, 11)
                            times["fused_tma"] = (triton.testing.do_bench(tma, warmup=warmup_ms, rep=rep_ms), None)
                    else:
                        print(f"tune {m}x{k}x{n}: the TMA GEMM's y differs from cuBLAS + ours beyond rounding; "
                              "fused_tma not recorded", flush=True)
                        if wrong is not None:
                            wrong.append(f"{m}x{k}x{n} r{'/'.join(map(str, ranks))} p{p:g}")
                for path in ("fused", "unfused"):
                    with triton_backend.forced_path(path):
                        fwd = lambda: triton_backend.forward(x, weight, bias, a_cat, b_cat, ranks, scalings, p, 11)  # noqa: E731
                        _, s = fwd()
                        bwd = lambda: triton_backend.backward(dy, x, s, weight, a_cat, b_cat, ranks, scalings, p, 11,  # noqa: E731
                                                              True)
                        times[path] = (triton.testing.do_bench(fwd, warmup=warmup_ms, rep=rep_ms),
                                       triton.testing.do_bench(bwd, warmup=warmup_ms, rep=rep_ms))
                for index, op in enumerate(tuning.OPS):
                    entry = dict(gpu=gpu, torch=torch_version, triton=triton_version,
                                 dtype=tuning._DTYPE_NAMES[dtype], n=n, k=k, ranks=",".join(map(str, ranks)),
                                 dropout=triton_backend._threshold(p) > 0, m_bucket=tuning.m_bucket(m), op=op,
                                 fused_ms=round(times["fused"][index], 5), unfused_ms=round(times["unfused"][index], 5),
                                 device=gpu, commit=commit, date=date)
                    if op == "forward" and "fused_tma" in times:
                        entry["fused_tma_ms"] = round(times["fused_tma"][0], 5)
                        chosen = next(iter(tuning.parse_tma_table([entry]).values()))
                        print(f"tune {m}x{k}x{n} r{'/'.join(map(str, ranks))} p{p:g} forward  fused_tma "
                              f"{entry['fused_tma_ms']:.4f} ms ratio {entry['fused_tma_ms'] / entry['unfused_ms']:.3f}"
                              f" -> {'fused_tma' if chosen else 'not fused_tma'}", flush=True)
                    entries.append(entry)
                    ratio = entry["fused_ms"] / entry["unfused_ms"]
                    print(f"tune {m}x{k}x{n} r{'/'.join(map(str, ranks))} p{p:g} {op:8s} fused {entry['fused_ms']:.4f} ms"
                          f" unfused {entry['unfused_ms']:.4f} ms ratio {ratio:.3f} -> "
                          f"{'fused' if ratio <= tuning.FUSED_MIN_GAIN else 'unfused'}", flush=True)
                del x, weight, bias, a_cat, b_cat, dy, s
    return entries


def tma_agrees(x, weight, a_cat, b_cat, ranks, scalings, p: float, bias=None) -> bool:
    """Whether the TMA GEMM's y equals the unfused path's (cuBLAS + ours) to within rounding on this GPU, with
    B scaled up so that the low-rank term is as large as x W^T (a kernel that dropped it would fail). Both
    accumulate in fp32 and round once to y's dtype, so they differ by about one unit in the last place:
    2^-6 of |y| elementwise (bf16 spacing is 2^-7 relative) plus 2^-10 of the largest |y| for elements
    near zero. A kernel never seen correct on this GPU must not be chosen for being fast."""
    from .. import triton_backend

    b_check = b_cat * 100.0
    ys = {}
    for path in ("fused_tma", "unfused"):
        with triton_backend.forced_path(path):
            ys[path] = triton_backend.forward(x, weight, bias, a_cat, b_check, ranks, scalings, p, 11)[0].float()
    expected, got = ys["unfused"], ys["fused_tma"]
    bound = 2.0**-6 * expected.abs() + 2.0**-10 * expected.abs().max()
    return bool(torch.isfinite(got).all()) and bool(((got - expected).abs() <= bound).all())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama7b")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "tuning_table.py"))
    parser.add_argument("--no-merge", action="store_true", help="replace the whole table instead of merging")
    parser.add_argument("--warmup-ms", type=int, default=5)
    parser.add_argument("--rep-ms", type=int, default=20)
    parser.add_argument("--time-limit", type=float, default=None, help="seconds; the table is written partial")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the tuning step measures on a CUDA GPU; there is none here")
    preset = PRESETS[args.preset]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    deadline = time.time() + args.time_limit if args.time_limit else None
    wrong: List[str] = []
    entries = measure(preset["shapes"], preset["ranks"], preset["dropouts"], dtype, args.warmup_ms, args.rep_ms,
                      deadline, wrong)
    written = write_table(args.out, entries, merge=not args.no_merge)
    print(f"tune: wrote {len(entries)} measurements ({len(written)} entries in all) to {args.out}")
    if wrong:  # the table is written (without those timings), but a wrong kernel fails the step
        print(f"tune: the TMA GEMM computed a wrong y at {', '.join(wrong)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
