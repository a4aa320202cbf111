"""Compile every kernel variant the Triton backend launches, for a GPU architecture, on a machine without a GPU.

The interpreter that tests the kernels on the CPU never compiles them, so errors of the compiled path
(non-constexpr globals, type rules, shared memory beyond the chip, register spills) would only show on the
GPU. This runs the backend's real launch code (``triton_backend.forward``/``backward``/``linear``/
``dropout_masks``) on meta tensors (no memory, no work) at the shapes the GPU runs, the llama7b preset's
M = 8192 with its split reductions, M = 1 and odd shapes included, on both paths, with and without dropout,
with the saved mask found and redrawn, and intercepts each launch. Each distinct variant is then
specialised exactly as Triton's own launcher would (``JITFunction``'s binder: integers equal to 1 become
constants, integers and pointers divisible by 16 are marked so, ``do_not_specialize`` honoured) and
compiled with ``triton.compile`` for the target. One line per variant: shared memory, registers, spilled
bytes (STACK), SASS instructions, whether Hopper's warp-group MMA and asynchronous copies were used, and the
shapes that launched it.

``--rng-cost`` compiles three micro-kernels that isolate the dropout work per element (draw and pack the
mask, as the shrink does; read and unpack it for three branches, as dx and dA do; draw per kernel, the
fallback) and prints their SASS instruction counts per element of x (the numbers quoted in
``_triton/kernels.py`` and used by ``python -m benchmarks.roofline``).

    TRITON_INTERPRET=0 python -m msplora_kernels._triton.compile_check --arch 90 --dtypes bf16,fp16,fp32

Exit status 1 if any variant spills registers or needs more shared memory than the chip has.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from .. import dispatch, triton_backend
from . import kernels, kernels_tma, tuning

_KERNELS = ["_matmul_lowrank_kernel", "_shrink_kernel", "_lowrank_grad_a_kernel", "_lowrank_grad_sb_kernel",
            "_pack_adapters_kernel", "_sum_partials_kernel", "_dropout_mask_kernel"]
_TMA_KERNELS = ["_matmul_lowrank_tma_kernel"]  # in kernels_tma: the forward's third path (fused_tma)
_MODULE_OF = {**{name: kernels for name in _KERNELS}, **{name: kernels_tma for name in _TMA_KERNELS}}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
_LAUNCH_OPTIONS = ("num_warps", "num_stages")
_QUIET_CONSTEXPRS = ("DOT_PRECISION", "ACC_DTYPE")  # implied by the argument types printed
# Shared memory one block may use: H100/H200 (sm_90) and A100 (sm_80; sm_86/89 have less, 99 KiB).
SHARED_LIMIT = {9: 232448, 8: 166912}
# (M, K, N): the llama7b preset's largest M with its three projections, M = 1 (decoding), odd shapes.
SHAPES = [(8192, 4096, 4096), (8192, 4096, 11008), (8192, 11008, 4096), (1, 4096, 4096), (37, 72, 50)]
_INTEGER_OPS = ("IMAD", "IADD", "LOP3", "SHF", "ISETP", "PRMT", "SEL", "IMNMX", "LEA", "SHL", "SHR", "FLO",
                "POPC", "I2F", "F2I", "IMUL", "BFE", "BFI", "VIADD", "IABS", "LOP")


@dataclass
class Variant:
    """One distinct compiled kernel and what launched it."""

    name: str
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    options: Dict[str, int]
    launched_by: List[str] = field(default_factory=list)
    shared: int = 0
    registers: int = -1
    spilled: int = -1
    instructions: int = 0
    wgmma: bool = False
    pipelined: bool = False
    tma: int = 0  # TMA instructions in the SASS (UTMALDG loads, UTMASTG stores)
    seconds: float = 0.0


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **meta)`` records the launch instead of running it."""

    def __init__(self, fn, launches: List[Tuple], label: List[str]):
        self.fn, self.launches, self.label = fn, launches, label

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append((self.fn, args, meta, self.label[0]))


@contextlib.contextmanager
def _recording(arch: int) -> Iterator[Tuple[List[Tuple], List[str]]]:
    launches: List[Tuple] = []
    label = [""]
    saved = {name: getattr(_MODULE_OF[name], name) for name in _MODULE_OF}
    saved_arch, saved_interpreted = tuning._arch, dispatch.triton_interpreted
    for name, fn in saved.items():
        setattr(_MODULE_OF[name], name, _Recorder(fn, launches, label))
    tuning._arch = lambda device: arch if arch in (8, 9) else None
    dispatch.triton_interpreted = lambda: True  # the backend may take meta tensors: nothing runs on them
    try:
        yield launches, label
    finally:
        for name, fn in saved.items():
            setattr(_MODULE_OF[name], name, fn)
        tuning._arch, dispatch.triton_interpreted = saved_arch, saved_interpreted


def record_backend_calls(dtype: torch.dtype, ranks: Tuple[int, ...], shapes: Sequence[Tuple[int, int, int]],
                         label: List[str]) -> None:
    """Run forward/backward (both paths, p = 0 and 0.05, saved mask found and redrawn), ``linear``,
    ``dropout_masks`` and ``pack_adapters`` on meta tensors of each shape."""
    meta = torch.device("meta")
    r = sum(ranks)
    scalings = [1.0] * len(ranks)
    for m, k, n in shapes:
        x, weight, bias = (torch.empty(m, k, dtype=dtype, device=meta), torch.empty(n, k, dtype=dtype, device=meta),
                           torch.empty(n, dtype=dtype, device=meta))
        a_cat, b_cat = torch.empty(r, k, dtype=dtype, device=meta), torch.empty(n, r, dtype=dtype, device=meta)
        for path in ("fused", "unfused", "fused_tma"):  # fused_tma: the forward's TMA GEMM, backward unfused
            for p in (0.0, 0.05):
                label[0] = f"{m}x{k}x{n}"
                with triton_backend.forced_path(path):
                    y, s = triton_backend.forward(x, weight, bias, a_cat, b_cat, list(ranks), scalings, p, 7)
                    triton_backend.backward(y, x, s, weight, a_cat, b_cat, list(ranks), scalings, p, 7, True)
                    # The eager path: each branch's gradient in the (fp32) adapters' dtype.
                    triton_backend.backward(y, x, s, weight, a_cat, b_cat, list(ranks), scalings, p, 7, True,
                                            branch_grads=(torch.float32, torch.float32))
                    if p > 0:  # S without its stored mask: the backward kernels draw it again
                        triton_backend.backward(y, x, torch.empty_like(s), weight, a_cat, b_cat, list(ranks),
                                                scalings, p, 7, True)
        triton_backend.linear(x, weight, bias)
        triton_backend.dropout_masks(7, len(ranks), m, k, 0.05, meta)
        # The eager path packs the adapters (as trained: fp32, and already in the activations' dtype).
        for source in {torch.float32, dtype}:
            triton_backend.pack_adapters([torch.empty(rank, k, dtype=source, device=meta) for rank in ranks],
                                         [torch.empty(n, rank, dtype=source, device=meta) for rank in ranks], dtype)


def _specialise(fn, backend, args, meta) -> Tuple[Dict[str, str], Dict[tuple, object], Dict[tuple, list], dict]:
    """Signature, constexprs and attributes exactly as Triton's launcher derives them for these arguments."""
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **meta)
    parsed, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, options)
    return signature, constexprs, attrs, {key: meta[key] for key in _LAUNCH_OPTIONS if key in meta}


def _cuda_tool(name: str) -> Optional[str]:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def _cubin_stats(cubin: bytes) -> Tuple[int, int, List[str]]:
    """(registers, spilled bytes per thread, SASS instruction mnemonics) of a cubin, by the tools Triton
    ships ((-1, -1, []) where they are missing)."""
    cuobjdump = _cuda_tool("cuobjdump")
    if cuobjdump is None:
        return -1, -1, []
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as file:
            file.write(cubin)
        usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout
    registers = spilled = -1
    for token in usage.replace(",", " ").split():
        if token.startswith("REG:"):
            registers = int(token[4:])
        elif token.startswith("STACK:"):
            spilled = int(token[6:])
    mnemonics = []
    for line in sass.splitlines():
        text = line.strip()
        if text.startswith("/*") and "*/" in text:
            body = text.split("*/", 1)[1].strip().rstrip(";").strip()
            if body and not body.startswith("/*"):
                words = body.split()
                op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
                mnemonics.append(op.split(".")[0])
    return registers, spilled, mnemonics


def _compile(fn, signature, constexprs, attrs, options, arch: int):
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch * 10, 32), options=options)


def _distinct_launches(arch: int, dtypes: List[torch.dtype], rank_sets: List[Tuple[int, ...]],
                       shapes: Sequence[Tuple[int, int, int]]) -> Dict[tuple, tuple]:
    """{variant key: (kernel name, signature, constexprs, attrs, options, shapes that launched it)}."""
    with _recording(arch) as (recorded, label):
        for dtype in dtypes:
            for ranks in rank_sets:
                record_backend_calls(dtype, ranks, shapes, label)
        launches = list(recorded)
    backend = make_backend(GPUTarget("cuda", arch * 10, 32))
    distinct: Dict[tuple, tuple] = {}
    for fn, args, meta, shape in launches:
        signature, constexprs, attrs, options = _specialise(fn, backend, args, meta)
        key = (fn.__name__, tuple(signature.items()), tuple(sorted((k, str(v)) for k, v in constexprs.items())),
               tuple(sorted((k, str(v)) for k, v in attrs.items())), tuple(sorted(options.items())))
        if key not in distinct:
            distinct[key] = (fn.__name__, signature, constexprs, attrs, options, [])
        if shape not in distinct[key][5]:
            distinct[key][5].append(shape)
    return distinct


def _compile_variant(job: tuple) -> Variant:
    name, signature, constexprs, attrs, options, shapes, arch = job
    fn = getattr(_MODULE_OF[name], name)
    variant = Variant(name, signature, {fn.arg_names[i[0]]: v for i, v in constexprs.items()}, options, shapes)
    started = time.time()
    compiled = _compile(fn, signature, constexprs, attrs, options, arch)
    variant.seconds = time.time() - started
    ttgir = compiled.asm["ttgir"]
    variant.wgmma = "warp_group_dot" in ttgir
    variant.pipelined = "async_copy_global_to_local" in ttgir or "async_tma" in ttgir
    variant.shared = compiled.metadata.shared
    variant.registers, variant.spilled, mnemonics = _cubin_stats(compiled.asm["cubin"])
    variant.instructions = len(mnemonics)
    variant.tma = sum(1 for op in mnemonics if op in ("UTMALDG", "UTMASTG"))
    return variant


def compile_launches(arch: int, dtypes: List[torch.dtype], rank_sets: List[Tuple[int, ...]],
                     shapes: Sequence[Tuple[int, int, int]] = SHAPES, quiet: bool = False,
                     jobs: int = 1, only: Optional[Sequence[str]] = None) -> List[Variant]:
    """Compile each distinct launch for ``sm_<arch>0`` (``jobs`` processes; each compiled kernel also lands in
    Triton's cache, which pre-warms a GPU run); returns the variants with their statistics. ``only``: the
    kernel names to compile (default: all)."""
    work = [entry + (arch,) for entry in _distinct_launches(arch, dtypes, rank_sets, shapes).values()
            if only is None or entry[0] in only]
    if jobs > 1:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = pool.map(_compile_variant, work)
            variants = []
            for variant in results:
                variants.append(variant)
                if not quiet:
                    print(format_variant(variant), flush=True)
        return variants
    variants = []
    for job in work:
        variants.append(_compile_variant(job))
        if not quiet:
            print(format_variant(variants[-1]), flush=True)
    return variants


def format_variant(v: Variant) -> str:
    types = ",".join(sorted({t for t in v.signature.values() if t.startswith("*")}))
    shown = {k: val for k, val in v.constexprs.items() if k.isupper() and k not in _QUIET_CONSTEXPRS}
    return (f"{v.name:24s} {types:22s} w{v.options.get('num_warps')} s{v.options.get('num_stages', '-')} "
            f"shared={v.shared:6d} B REG={v.registers:3d} STACK={v.spilled:3d} sass={v.instructions:5d} "
            f"wgmma={v.wgmma!s:5s} async={v.pipelined!s:5s} tma={v.tma:2d} {v.seconds:4.1f}s {shown} "
            f"by {','.join(v.launched_by)}")


def problems(variants: Sequence[Variant], arch: int) -> List[str]:
    """Variants that would fail or run badly on the chip: register spills, shared memory above the limit."""
    found = []
    limit = SHARED_LIMIT.get(arch)
    for v in variants:
        if v.spilled > 0:
            found.append(f"{v.name} {v.constexprs}: spills {v.spilled} B per thread")
        if limit is not None and v.shared > limit:
            found.append(f"{v.name} {v.constexprs}: needs {v.shared} B of shared memory; sm_{arch}0 has {limit} B")
    return found


# ---- the dropout work per element, isolated -------------------------------------------------------------


@triton.jit(do_not_specialize=["seed", "threshold"])
def _rng_draw_cost_kernel(mask_ptr, seed, threshold, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          BRANCHES: tl.constexpr, STORE_PACKED: tl.constexpr):
    """Draw and pack the masks of a BLOCK_M x BLOCK_K tile (the shrink's work), then store one byte per
    element (or per pair with STORE_PACKED) so nothing is optimised away."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    packed = kernels._drawn_mask(seed, threshold, rows, 0, K, BLOCK_K // 2, BRANCHES)
    if STORE_PACKED:
        tl.store(mask_ptr + rows[:, None] * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)[None, :], packed.to(tl.uint8))
    else:
        bits = kernels._element_bits(packed)
        tl.store(mask_ptr + rows[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :], bits.to(tl.uint8))


@triton.jit
def _rng_read_cost_kernel(mask_ptr, x_ptr, out_ptr, M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          BRANCHES: tl.constexpr):
    """Read and unpack a tile's packed mask and select x per branch (the dx and dA kernels' extra work)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    bits = kernels._element_bits(kernels._stored_mask(mask_ptr, rows, 0, M, K, K // 2, BLOCK_K // 2))
    x = tl.load(x_ptr + rows[:, None] * K + cols[None, :])
    total = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for branch in tl.static_range(BRANCHES):
        total += tl.where(((bits >> branch) & 1) != 0, x, 0.0).to(tl.float32) * (branch + 1)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], total.to(out_ptr.dtype.element_ty))


def rng_costs(arch: int = 9, branches: int = 3) -> Dict[str, Dict[str, float]]:
    """SASS instructions per element of x (total and integer-pipe) for: drawing and packing the masks once
    (``draw``), reading and unpacking them with the per-branch selects (``read``), and the bare tile loop
    that stores one byte per element (``baseline``, subtracted from ``draw``)."""
    block_m, block_k, warps = 64, 64, 4
    elements_per_thread = block_m * block_k / (warps * 32)
    backend = make_backend(GPUTarget("cuda", arch * 10, 32))
    results = {}
    cases = {
        "draw": (_rng_draw_cost_kernel, [torch.empty(1, dtype=torch.uint8, device="meta"), 12345, 3277, 4096],
                 dict(BLOCK_M=block_m, BLOCK_K=block_k, BRANCHES=branches, STORE_PACKED=True)),
        "read": (_rng_read_cost_kernel, [torch.empty(1, dtype=torch.uint8, device="meta"),
                                         torch.empty(1, dtype=torch.bfloat16, device="meta"),
                                         torch.empty(1, dtype=torch.bfloat16, device="meta"), 8192, 4096],
                 dict(BLOCK_M=block_m, BLOCK_K=block_k, BRANCHES=branches)),
        "read_baseline": (_rng_read_cost_kernel, [torch.empty(1, dtype=torch.uint8, device="meta"),
                                                  torch.empty(1, dtype=torch.bfloat16, device="meta"),
                                                  torch.empty(1, dtype=torch.bfloat16, device="meta"), 8192, 4096],
                          dict(BLOCK_M=block_m, BLOCK_K=block_k, BRANCHES=0)),
    }
    for name, (fn, args, meta) in cases.items():
        signature, constexprs, attrs, _ = _specialise(fn, backend, args, dict(meta, num_warps=warps))
        compiled = _compile(fn, signature, constexprs, attrs, {"num_warps": warps}, arch)
        _, _, mnemonics = _cubin_stats(compiled.asm["cubin"])
        integer = sum(1 for op in mnemonics if op.startswith(_INTEGER_OPS))
        results[name] = {"per_element": len(mnemonics) / elements_per_thread,
                         "integer_per_element": integer / elements_per_thread}
    base = results.pop("read_baseline")
    results["read"] = {key: results["read"][key] - base[key] for key in base}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=9, help="compute capability major (9: Hopper, 8: Ampere) "
                        "or the full number (90, 80)")
    parser.add_argument("--dtypes", default="bf16", help="comma-separated: bf16, fp16, fp32, fp64")
    parser.add_argument("--ranks", default="8,4,2", help="semicolon-separated rank sets, e.g. '8,4,2;64,32,16'")
    parser.add_argument("--shapes", default=None, help="semicolon-separated M,K,N (default: llama7b at M=8192, "
                        "M=1 and 37,72,50)")
    parser.add_argument("--rng-cost", action="store_true", help="also print the dropout work per element")
    parser.add_argument("--count-only", action="store_true", help="only count the distinct variants (no compiling)")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--kernels", default=None, help="comma-separated kernel names to compile (default: all), "
                        "e.g. _matmul_lowrank_tma_kernel")
    args = parser.parse_args(argv)
    if dispatch.triton_interpreted():
        parser.error("run with TRITON_INTERPRET=0: the interpreter does not compile")
    arch = args.arch // 10 if args.arch >= 10 else args.arch
    dtypes = [_DTYPES[name] for name in args.dtypes.split(",")]
    # Disabled scales (rank 0) are never passed to the backend.
    rank_sets = [tuple(int(r) for r in group.split(",") if int(r)) for group in args.ranks.split(";")]
    shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    if args.count_only:
        print(f"{count_variants(arch, dtypes, rank_sets, shapes)} distinct kernel variants")
        return 0
    only = None if args.kernels is None else args.kernels.split(",")
    unknown = sorted(set(only or ()) - set(_MODULE_OF))
    if unknown:
        parser.error(f"--kernels: unknown kernel names {unknown}; known: {sorted(_MODULE_OF)}")
    variants = compile_launches(arch, dtypes, rank_sets, shapes, jobs=args.jobs, only=only)
    print(f"compiled {len(variants)} kernel variants for sm_{arch}0 with triton {triton.__version__}")
    if args.rng_cost:
        for name, cost in rng_costs(arch).items():
            print(f"dropout {name:5s}: {cost['per_element']:.1f} SASS instructions per element of x "
                  f"({cost['integer_per_element']:.1f} on the integer pipes), 3 branches")
    found = problems(variants, arch)
    for line in found:
        print("PROBLEM:", line)
    return 1 if found else 0


def count_variants(arch: int, dtypes: List[torch.dtype], rank_sets: List[Tuple[int, ...]],
                   shapes: Sequence[Tuple[int, int, int]] = SHAPES) -> int:
    """How many distinct variants these calls compile (the launcher's specialisation; nothing is compiled)."""
    return len(_distinct_launches(arch, dtypes, rank_sets, shapes))


if __name__ == "__main__":
    sys.exit(main())
