"""Compile every kernel launch of the Triton backend for a GPU architecture, on a machine without a GPU.

The interpreter that tests the kernels on the CPU never compiles them, so errors of the compiled path
(non-constexpr globals, type rules, shared memory beyond the chip) would only show on the GPU. This runs
the backend's forward and backward on empty CPU tensors with every launch intercepted, then compiles each
distinct launch (kernel, argument types, constexprs, warps, stages) with ``triton.compile`` for the target,
with the launch table of that architecture. It prints one line per kernel variant: shared memory, registers
and spilled bytes per thread (STACK), and whether Hopper's warp-group MMA and asynchronous (pipelined)
copies were used.

    TRITON_INTERPRET=0 python -m msplora_kernels._triton.compile_check --arch 90 --dtypes bf16,fp16,fp32
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterator, List, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .. import dispatch, triton_backend
from . import kernels, tuning

_KERNELS = ["_matmul_lowrank_kernel", "_shrink_kernel", "_lowrank_grad_a_kernel", "_dropout_mask_kernel"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
_TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
               torch.int8: "i8", torch.int32: "i32", torch.int64: "i64"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages")
_QUIET_CONSTEXPRS = ("DOT_PRECISION", "ACC_DTYPE")  # implied by the argument types printed
# Shared memory one block may use: H100/H200 (sm_90) and A100 (sm_80; sm_86/89 have less, 99 KiB).
_SHARED_LIMIT = {9: 232448, 8: 166912}


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **meta)`` records the launch instead of running it."""

    def __init__(self, fn, launches: List[Tuple]):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append((self.fn, args, meta))


@contextlib.contextmanager
def _recording(arch: int) -> Iterator[List[Tuple]]:
    launches: List[Tuple] = []
    saved = {name: getattr(kernels, name) for name in _KERNELS}
    saved_arch, saved_interpreted = tuning._arch, dispatch.triton_interpreted
    for name, fn in saved.items():
        setattr(kernels, name, _Recorder(fn, launches))
    tuning._arch = lambda device: arch if arch in (8, 9) else None
    dispatch.triton_interpreted = lambda: True  # the backend may take CPU tensors: nothing runs on them
    try:
        yield launches
    finally:
        for name, fn in saved.items():
            setattr(kernels, name, fn)
        tuning._arch, dispatch.triton_interpreted = saved_arch, saved_interpreted


def _record_backend_calls(dtype: torch.dtype, ranks: Tuple[int, ...]) -> None:
    m, k, n = 256, 192, 160
    x, weight, bias = torch.zeros(m, k, dtype=dtype), torch.zeros(n, k, dtype=dtype), torch.zeros(n, dtype=dtype)
    a_cat, b_cat = torch.zeros(sum(ranks), k, dtype=dtype), torch.zeros(n, sum(ranks), dtype=dtype)
    scalings = [1.0] * len(ranks)
    for path in ("fused", "unfused"):
        for p in (0.0, 0.1):
            with triton_backend.forced_path(path):
                y, s = triton_backend.forward(x, weight, bias, a_cat, b_cat, list(ranks), scalings, p, 7)
                triton_backend.backward(y, x, s, weight, a_cat, b_cat, list(ranks), scalings, p, 7, True)
    triton_backend.linear(x, weight, bias)
    triton_backend.dropout_masks(7, len(ranks), m, k, 0.1, x.device)


def _signature(fn, args, meta) -> Tuple[Dict[str, str], Dict[str, object], Dict[tuple, list]]:
    """Argument types, constexprs and alignment attributes as Triton's launcher would specialize them:
    integers equal to 1 become constants, pointers and integers divisible by 16 are marked so."""
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, value) in enumerate(zip(fn.arg_names, list(args) + [meta[a] for a in fn.arg_names[len(args):]])):
        if name in meta:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPE_NAMES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{fn.__name__}: unexpected runtime argument {name}={value!r}")
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and value != 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _registers(cubin: bytes) -> str:
    """'REG:n STACK:bytes' of a cubin, by the cuobjdump Triton ships (empty if it is missing)."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        return ""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as file:
            file.write(cubin)
        usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
    fields = [field for line in usage.splitlines() if "REG:" in line
              for field in line.split() if field.startswith(("REG", "STACK"))]
    return " ".join(fields)


def compile_launches(arch: int, dtypes: List[torch.dtype], rank_sets: List[Tuple[int, ...]]) -> int:
    """Compile each distinct recorded launch for ``sm_<arch>0``; returns how many were compiled.

    Raises if a variant needs more shared memory than the architecture has (it would fail to launch)."""
    launches: List[Tuple] = []
    with _recording(arch) as recorded:
        for dtype in dtypes:
            for ranks in rank_sets:
                _record_backend_calls(dtype, ranks)
        launches = list(recorded)
    seen = set()
    target = GPUTarget("cuda", arch * 10, 32)
    for fn, args, meta in launches:
        options = {key: meta[key] for key in _LAUNCH_OPTIONS if key in meta}
        kernel_meta = {key: value for key, value in meta.items() if key not in _LAUNCH_OPTIONS}
        signature, constexprs, attrs = _signature(fn, args, kernel_meta)
        key = (fn.__name__, tuple(signature.items()), tuple((k, str(v)) for k, v in constexprs.items()),
               tuple(options.items()))
        if key in seen:
            continue
        seen.add(key)
        started = time.time()
        source = ASTSource(fn=fn, signature=signature,
                           constexprs={(fn.arg_names.index(name),): value for name, value in constexprs.items()},
                           attrs=attrs)
        compiled = triton.compile(source, target=target, options=options)
        ttgir = compiled.asm["ttgir"]
        wgmma = "warp_group_dot" in ttgir
        pipelined = "async_copy_global_to_local" in ttgir or "async_tma" in ttgir
        types = ",".join(sorted({t for t in signature.values() if t.startswith("*")}))
        print(f"{fn.__name__:26s} {types:22s} {str(options):36s} shared={compiled.metadata.shared:6d} B "
              f"{_registers(compiled.asm['cubin']):18s} "
              f"wgmma={wgmma!s:5s} async={pipelined!s:5s} {time.time() - started:4.1f}s "
              f"{ {k: v for k, v in constexprs.items() if k.isupper() and k not in _QUIET_CONSTEXPRS} }", flush=True)
        limit = _SHARED_LIMIT.get(arch)
        if limit is not None and compiled.metadata.shared > limit:
            raise RuntimeError(f"{fn.__name__} needs {compiled.metadata.shared} B of shared memory; sm_{arch}0 "
                               f"has {limit} B: shrink its tiles or stages in _triton/tuning.py")
    return len(seen)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=9, help="compute capability major (9: Hopper, 8: Ampere) "
                        "or the full number (90, 80)")
    parser.add_argument("--dtypes", default="bf16", help="comma-separated: bf16, fp16, fp32, fp64")
    parser.add_argument("--ranks", default="8,4,2", help="semicolon-separated rank sets, e.g. '8,4,2;64,32,16'")
    args = parser.parse_args(argv)
    if dispatch.triton_interpreted():
        parser.error("run with TRITON_INTERPRET=0: the interpreter does not compile")
    arch = args.arch // 10 if args.arch >= 10 else args.arch
    dtypes = [_DTYPES[name] for name in args.dtypes.split(",")]
    # Disabled scales (rank 0) are never passed to the backend.
    rank_sets = [tuple(int(r) for r in group.split(",") if int(r)) for group in args.ranks.split(";")]
    count = compile_launches(arch, dtypes, rank_sets)
    print(f"compiled {count} kernel variants for sm_{arch}0 with triton {triton.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
