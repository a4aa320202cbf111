"""The compiled CPU helper (``msplora_kernels/_cpu``) against the PyTorch sparse products it replaces: the same
dropped positions (both draw them from the seed), so the same maths; and its build: cached, atomic, with one
warning and the sparse path where no compiler works.

Tolerances: fp64 results agree to a few ulps of the largest term (the sums run in another order); fp32 and bf16
results are judged against the fp64 result by the error-ratio rule: within twice the sparse path's own error
plus a floor of a few ulps of the largest value.
"""
import ctypes
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch

from msplora_kernels import _cpu, torch_backend

CPU = torch.device("cpu")
FLOOR = {torch.float32: 4 * 2.0**-24, torch.bfloat16: 4 * 2.0**-8}
def _compiler():
    return os.environ.get("CC") or "cc"


def _assert_fp64_close(got, want):
    """fp64 results to 64 ulps of each tensor's largest value (the sums run in another order)."""
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=64 * 2.0**-52 * w.abs().max().item())


needs_cc = pytest.mark.skipif(shutil.which(_compiler()) is None, reason="no C compiler here")


def problem(m, k, n, ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = sum(ranks)
    x = torch.randn(m, k, generator=g, dtype=torch.float64)
    weight = torch.randn(n, k, generator=g, dtype=torch.float64) / k**0.5
    bias = torch.randn(n, generator=g, dtype=torch.float64)
    a = torch.randn(r, k, generator=g, dtype=torch.float64)
    b = torch.randn(n, r, generator=g, dtype=torch.float64)
    dy = torch.randn(m, n, generator=g, dtype=torch.float64)
    return x, weight, bias, a, b, dy


def run(monkeypatch, path, dtype, tensors, ranks, p, seed=99, with_weight=True, need_dx=True):
    """(y, S, dx, dA, dB) of the PyTorch backend on ``path`` ("helper", "sparse" or "auto")."""
    monkeypatch.setenv(_cpu.ENV_VAR, {"helper": "1", "sparse": "0", "auto": "auto"}[path])
    x, weight, bias, a, b, dy = (t.to(dtype) for t in tensors)
    if not with_weight:
        weight = bias = None
    scalings = [16.0 / max(r, 1) for r in ranks]
    kept = []
    y, s = torch_backend.forward(x, weight, bias, a, b, ranks, scalings, p, seed, keep_positions=kept)
    dx, da, db = torch_backend.backward(dy, x, s, weight, a, b, ranks, scalings, p, seed, need_dx,
                                        positions=kept[0])
    return y, s, dx, da, db


SHAPES = [(37, 72, 50, (8, 4, 2)), (37, 72, 50, (5, 3, 1)), (16, 33, 9, (0, 0, 6)), (20, 72, 50, (16, 0, 3)),
          (5, 7, 4, (3,)), (1, 130, 3, (2, 2, 2, 2, 2))]


@needs_cc
@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_the_helper_equals_the_sparse_products_in_fp64(monkeypatch, shape, p):
    m, k, n, ranks = shape
    tensors = problem(m, k, n, ranks)
    got = run(monkeypatch, "helper", torch.float64, tensors, ranks, p)
    want = run(monkeypatch, "sparse", torch.float64, tensors, ranks, p)
    for name, g, w in zip(["y", "S", "dx", "dA", "dB"], got, want):
        scale = max(w.abs().max().item(), 1.0)
        torch.testing.assert_close(g, w, rtol=0, atol=64 * 2.0**-52 * scale, msg=name)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
def test_the_helper_is_as_accurate_as_the_sparse_products_in_low_precision(monkeypatch, shape, dtype):
    m, k, n, ranks = shape
    tensors = problem(m, k, n, ranks, seed=3)
    exact = run(monkeypatch, "helper", torch.float64, tensors, ranks, 0.3)
    got = run(monkeypatch, "helper", dtype, tensors, ranks, 0.3)
    theirs = run(monkeypatch, "sparse", dtype, tensors, ranks, 0.3)
    for name, g, t, e in zip(["y", "S", "dx", "dA", "dB"], got, theirs, exact):
        assert g.dtype == dtype, name
        ours = (g.double() - e).abs().max().item()
        sparse = (t.double() - e).abs().max().item()
        floor = FLOOR[dtype] * max(e.abs().max().item(), 1.0)
        assert ours <= 2 * sparse + floor, f"{name}: error {ours:.3g} vs the sparse path's {sparse:.3g}"


@needs_cc
@pytest.mark.parametrize("with_weight,need_dx", [(False, True), (True, False), (False, False)])
def test_the_lowrank_term_alone_and_no_dx(monkeypatch, with_weight, need_dx):
    tensors = problem(37, 72, 50, (8, 4, 2))
    got = run(monkeypatch, "helper", torch.float64, tensors, (8, 4, 2), 0.2, with_weight=with_weight,
              need_dx=need_dx)
    want = run(monkeypatch, "sparse", torch.float64, tensors, (8, 4, 2), 0.2, with_weight=with_weight,
               need_dx=need_dx)
    assert (got[2] is None) == (not need_dx)
    for name, g, w in zip(["y", "S", "dx", "dA", "dB"], got, want):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=name)


@needs_cc
def test_the_helper_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MSPLORA_CACHE", str(tmp_path))
    monkeypatch.setenv(_cpu.ENV_VAR, "1")
    _cpu.reset()
    try:
        assert _cpu.library() is not None
        built = list(tmp_path.glob("cpu/*/libmsplora_cpu.so"))
        assert len(built) == 1 and not list(tmp_path.glob("cpu/*/*.partial"))
        stamp = built[0].stat().st_mtime_ns
        _cpu.reset()
        assert _cpu.library() is not None and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    finally:
        _cpu.reset()


def test_without_a_compiler_one_warning_and_the_sparse_path(monkeypatch, tmp_path):
    monkeypatch.setenv("MSPLORA_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv(_cpu.ENV_VAR, "auto")
    tensors = problem(37, 72, 50, (8, 4, 2))
    _cpu.reset()
    try:
        with pytest.warns(RuntimeWarning, match="no-such-cc"):
            got = run(monkeypatch, "auto", torch.float64, tensors, (8, 4, 2), 0.3)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once
            again = run(monkeypatch, "auto", torch.float64, tensors, (8, 4, 2), 0.3)
        want = run(monkeypatch, "sparse", torch.float64, tensors, (8, 4, 2), 0.3)
        for g, a, w in zip(got, again, want):
            assert torch.equal(g, w) and torch.equal(a, w)
        assert not list(tmp_path.glob("cpu/*/*"))  # nothing half-written left behind
    finally:
        _cpu.reset()


def test_a_failed_build_is_an_error_when_asked_for(monkeypatch, tmp_path):
    monkeypatch.setenv("MSPLORA_CACHE", str(tmp_path))
    fake = tmp_path / "broken-cc"
    fake.write_text("#!/bin/sh\necho 'broken-cc: cannot compile' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv(_cpu.ENV_VAR, "1")
    _cpu.reset()
    try:
        with pytest.raises(RuntimeError, match="cannot compile"):
            _cpu.library()
        assert not list(tmp_path.glob("cpu/*/*"))
    finally:
        _cpu.reset()


def test_an_unknown_setting_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(_cpu.ENV_VAR, "yes")
    with pytest.raises(ValueError, match=_cpu.ENV_VAR):
        _cpu.library()


@needs_cc
@pytest.mark.parametrize("short_first_draw", [False, True])
@pytest.mark.parametrize("p", [1e-4, 0.05, 0.3, 0.9])
def test_the_helper_draws_the_same_positions_as_pytorch(monkeypatch, p, short_first_draw):
    """The draw in C (hash, log, gaps and their running sum, in vectors and split over threads) is bit for bit
    its PyTorch mirror (the same integer and IEEE fp64 operations), at totals that leave every kind of partial
    vector, also when the first draw falls short and the stream continues."""
    if short_first_draw:
        monkeypatch.setattr(torch_backend, "_DRAW_MARGIN_SD", -8.0)
    for total in (1, 17, 1000, 37 * 72 * 3, 200_003):
        drawn = {}
        for setting in ("1", "0"):
            monkeypatch.setenv(_cpu.ENV_VAR, setting)
            drawn[setting] = torch_backend.dropped_positions(5, total, p, CPU)
        assert drawn["1"].dtype == drawn["0"].dtype == torch.int32
        assert torch.equal(drawn["1"], drawn["0"]), (p, total)


@needs_cc
def test_the_draw_does_not_depend_on_the_thread_count(restore_num_threads):
    """About 107K draws: up to six shares of at least 16384 (counter-based, so each share is computed alone);
    any number of threads gives the same positions."""
    total, p = 3 * 1024 * 700, 0.05
    drawn = []
    for threads in (1, 2, 3, 7):
        torch.set_num_threads(threads)
        drawn.append(torch_backend.dropped_positions(21, total, p, CPU))
    for other in drawn[1:]:
        assert torch.equal(other, drawn[0])


def _assert_same_logs(lib):
    """The helper's logs are the PyTorch mirror's bit for bit (a position moves only when a log crosses an
    integer of y, about once in 10^16 draws: positions alone would pass a log a few ulps off, e.g. one built
    with fused multiply-adds)."""
    key, c0, n = torch_backend._stream_key(77), 12_345, (1 << 16) + 5
    got = torch.empty(n, dtype=torch.float64)
    lib.msplora_draw_logs(key, c0, n, got.data_ptr())
    want = torch_backend._log_uniforms(key, c0, n, CPU)
    assert torch.equal(got.view(torch.int64), want.view(torch.int64)), (got != want).sum()


@needs_cc
def test_the_helper_logs_are_the_pytorch_mirrors_bits():
    """The loaded build (on x86-64 with GCC 12 or later: the copy target_clones picked for this CPU)."""
    lib = _cpu.library()
    assert lib is not None
    _assert_same_logs(lib)


_LEVEL_FLAGS = {  # the /proc/cpuinfo flags each x86-64 level needs (cumulative)
    "x86-64-v2": {"sse4_2", "ssse3", "popcnt", "cx16"},
    "x86-64-v3": {"avx2", "bmi1", "bmi2", "fma", "f16c", "movbe", "abm"},
    "x86-64-v4": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}


def _cpu_has(level):
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return False
    levels = list(_LEVEL_FLAGS)
    return all(_LEVEL_FLAGS[lv] <= flags for lv in levels[: levels.index(level) + 1])


@needs_cc
@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 instruction sets")
@pytest.mark.parametrize("level", [None, "x86-64-v2", "x86-64-v3", "x86-64-v4"])
def test_every_instruction_set_draws_the_same_bits(monkeypatch, tmp_path, level):
    """The draw's vector loop has one copy per instruction set (GCC's target_clones, chosen at load); each,
    built alone (-DMSPLORA_NO_CLONES and that -march; None: the compiler's baseline, SSE2), computes the
    PyTorch mirror's logs and positions bit for bit."""
    if level is not None and not _cpu_has(level):
        pytest.skip(f"this CPU lacks {level}")
    flags = [*_cpu._FLAGS, "-DMSPLORA_NO_CLONES"] + ([f"-march={level}"] if level else [])
    target = str(tmp_path / "libdraw.so")
    try:
        _cpu._compile(_cpu._SOURCE, target, _compiler(), flags)
    except RuntimeError as exc:
        if level is not None and "march" in str(exc):
            pytest.skip(f"{_compiler()} does not know -march={level}")
        raise
    lib = ctypes.CDLL(target)
    _cpu._declare(lib)
    _assert_same_logs(lib)
    monkeypatch.setattr(_cpu, "library", lambda: lib)
    for p, total in [(0.05, 200_003), (0.3, 37 * 72 * 3), (1e-4, 10**6), (0.9, 1000)]:
        got = torch_backend.dropped_positions(9, total, p, CPU)  # int32: the helper
        mirror = torch_backend.dropped_positions(9, total, p, CPU, torch.int64)  # int64: PyTorch's ops
        assert got.dtype == torch.int32 and torch.equal(got.long(), mirror), (level, p, total)


@needs_cc
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_rows_split_over_threads_give_the_sparse_products(monkeypatch, threads, restore_num_threads):
    """Enough dropped positions for several workers (each owns whole rows; at least 16384 positions each): the
    same results as the sparse products in fp64, and S and dx bit for bit those of one thread (per row, in
    order); dA sums the workers' partial G in another order (a few ulps)."""
    m, k, n, ranks = 401, 150, 50, (8, 4, 2)  # p = 0.3: about 54K dropped positions
    tensors = problem(m, k, n, ranks)
    torch.set_num_threads(1)
    single = run(monkeypatch, "helper", torch.float64, tensors, ranks, 0.3)
    torch.set_num_threads(threads)
    got = run(monkeypatch, "helper", torch.float64, tensors, ranks, 0.3)
    want = run(monkeypatch, "sparse", torch.float64, tensors, ranks, 0.3)
    _assert_fp64_close(got, want)
    for i in (0, 1, 2):  # y, S, dx
        assert torch.equal(got[i], single[i])


def _compiler_has_openmp():
    compiler = _compiler()
    if shutil.which(compiler) is None:
        return False
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "t.c")
        with open(source, "w") as f:
            f.write("int f(int n) { int s = 0;\n#pragma omp parallel for reduction(+:s)\n"
                    "for (int i = 0; i < n; ++i) s += i; return s; }\n")
        done = subprocess.run([compiler, "-fopenmp", "-fPIC", "-shared", source, "-o", source + ".so"],
                              capture_output=True)
        return done.returncode == 0


def _omp_runtimes_mapped():
    """OpenMP runtime files in this process's memory map (GNU libgomp, LLVM libomp, Intel libiomp)."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if len(line.split()) >= 6}
    return {path for path in paths if re.match(r"lib(g|i)?omp[^a-z]", os.path.basename(path))}


@needs_cc
@pytest.mark.skipif(not _cpu._openmp_wanted() or not _compiler_has_openmp(),
                    reason="no OpenMP build here: PyTorch not on a libgomp.so.1, no /proc/self/maps, or the "
                           "compiler has no -fopenmp")
def test_the_openmp_build_runs_in_pytorchs_own_pool(monkeypatch, restore_num_threads):
    """Where PyTorch runs on libgomp.so.1 the helper is built with OpenMP (with GCC always) and shares that
    runtime: one OpenMP runtime mapped, and a call on several threads starts no thread of its own."""
    monkeypatch.setenv(_cpu.ENV_VAR, "1")
    ranks = (8, 4, 2)
    x = torch.randn(401, 150)
    a = torch.randn(14, 150)
    s = torch.zeros(401, 14)
    gcc = "Free Software Foundation" in subprocess.run([_compiler(), "--version"], capture_output=True,
                                                       text=True).stdout
    _cpu.reset()
    try:
        assert _cpu.library() is not None
        if not gcc and "-fopenmp" not in _cpu.build_flags():  # e.g. clang's libomp: set aside, and marked
            assert os.path.exists(os.path.join(_openmp_folder(), "failed"))
            return
        assert "-fopenmp" in _cpu.build_flags()  # GCC's -fopenmp needs libgomp.so.1: PyTorch's copy
        assert len(_omp_runtimes_mapped()) == 1, _omp_runtimes_mapped()
        torch.set_num_threads(2)
        positions = torch_backend.dropped_positions(3, x.numel() * 3, 0.3, CPU)  # about 54K: several workers
        helper = torch_backend._helper(x, ranks)
        (x @ x.t()).sum()  # PyTorch's pool exists
        threads = len(os.listdir("/proc/self/task"))
        torch_backend._helper_forward(helper, positions, x, a, ranks, s)
        assert len(os.listdir("/proc/self/task")) == threads
    finally:
        _cpu.reset()


def _check_against_sparse(monkeypatch, ranks=(8, 4, 2)):
    tensors = problem(401, 150, 50, ranks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the helper works
        got = run(monkeypatch, "helper", torch.float64, tensors, ranks, 0.3)
    want = run(monkeypatch, "sparse", torch.float64, tensors, ranks, 0.3)
    _assert_fp64_close(got, want)


def _openmp_folder():
    with open(_cpu._SOURCE, "rb") as f:
        source = f.read()
    return _cpu._build_dir(source, _compiler(), [*_cpu._FLAGS, _cpu._OPENMP])


@needs_cc
def test_a_compiler_without_openmp_gets_the_pthreads_build(monkeypatch, tmp_path):
    monkeypatch.setenv("MSPLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(_cpu, "_OPENMP", "-fno-such-option-for-msplora")
    monkeypatch.setattr(_cpu, "_openmp_wanted", lambda: True)
    _cpu.reset()
    try:
        _check_against_sparse(monkeypatch)
        assert _cpu.build_flags() == _cpu._FLAGS
        assert os.path.exists(os.path.join(_openmp_folder(), "failed"))  # not tried again
    finally:
        _cpu.reset()


@needs_cc
@pytest.mark.parametrize("failure", ["load", "second runtime"])
def test_an_openmp_build_that_does_not_work_gives_way_to_the_pthreads_build(monkeypatch, tmp_path, failure):
    """An OpenMP build that compiles but will not load, or that maps an OpenMP runtime of its own (clang's
    libomp, a second libgomp), is set aside for the pthreads build, and marked so no later process uses it."""
    monkeypatch.setenv("MSPLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(_cpu, "_openmp_wanted", lambda: True)
    folder = _openmp_folder()
    real_cdll, loads = _cpu.ctypes.CDLL, []

    def cdll(path, *args, **kwargs):
        loads.append(os.path.dirname(path))
        if failure == "load" and os.path.dirname(path) == folder:
            raise OSError("libfoo.so: cannot open shared object file")
        return real_cdll(path, *args, **kwargs)

    monkeypatch.setattr(_cpu.ctypes, "CDLL", cdll)
    if failure == "second runtime":
        maps = iter([{"/x/libgomp.so.1"}, {"/x/libgomp.so.1", "/y/libomp.so.5"}])
        monkeypatch.setattr(_cpu, "_openmp_runtimes", lambda: next(maps))
    _cpu.reset()
    try:
        _check_against_sparse(monkeypatch)
        assert _cpu.build_flags() == _cpu._FLAGS
        assert loads[0] == folder and os.path.exists(os.path.join(folder, "failed"))
        loads.clear()
        _cpu.reset()
        monkeypatch.setenv(_cpu.ENV_VAR, "1")
        assert _cpu.library() is not None and folder not in loads  # the mark is read: not loaded again
    finally:
        _cpu.reset()
