"""The PyTorch backend's compiled helper: the dropout corrections of ``dropout_correction.c`` on CPU tensors.

The C file is compiled on first use with the machine's C compiler (``$CC``, else ``cc``; plain C, no PyTorch
headers: about a second) into ``<$MSPLORA_CACHE or ~/.cache/msplora>/cpu/<source hash>/``, written
atomically, and loaded with ctypes: as Triton builds its own launcher. Where no compiler works, the backend
runs the same corrections as PyTorch sparse products (same masks, same maths, slower) after one warning.
``MSPLORA_CPU_EXT=0`` chooses that path; ``1`` makes a failed build an error instead of a warning.

Where PyTorch runs its CPU ops on OpenMP from a ``libgomp.so.1`` (the Linux wheels), the helper is built with
``-fopenmp`` and its threads are PyTorch's own pool (``torch.get_num_threads()`` of them): the dynamic loader
resolves its ``libgomp.so.1`` to the copy PyTorch loaded. Elsewhere, or where that build fails to compile or
load or brings an OpenMP runtime of its own (clang's libomp, a second libgomp), the pthreads build runs.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from typing import Optional

ENV_VAR = "MSPLORA_CPU_EXT"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dropout_correction.c")
_FLAGS = ["-O3", "-fPIC", "-shared", "-std=c99", "-pthread", "-fno-math-errno", "-ffp-contract=off", "-Wno-psabi"]
_OPENMP = "-fopenmp"
_lock = threading.Lock()
_state = {"lib": None, "tried": False, "flags": None}
_TYPES = ("f32", "f64", "bf16")


def _setting() -> str:
    value = os.environ.get(ENV_VAR, "auto")
    if value not in ("auto", "0", "1"):
        raise ValueError(f"${ENV_VAR} must be auto, 0 or 1, got {value!r}")
    return value


def _torch_uses_openmp() -> bool:
    import torch

    return "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def _build_dir(source: bytes, compiler: str, flags) -> str:
    tag = hashlib.sha256(source + " ".join([compiler, *flags, platform.machine()]).encode()).hexdigest()[:16]
    root = os.environ.get("MSPLORA_CACHE") or os.path.join("~", ".cache", "msplora")
    return os.path.join(os.path.abspath(os.path.expanduser(root)), "cpu", tag)


def _compile(source_path: str, target: str, compiler: str, flags) -> None:
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so.partial", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, source_path, "-o", partial, "-lm"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(partial, target)  # atomic: concurrent builders each write a whole file
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for name in _TYPES:
        fwd = getattr(lib, f"msplora_forward_{name}")
        fwd.argtypes = [p, i64, p, i64, i64, p, p, p, i64]
        fwd.restype = ctypes.c_int
        bwd = getattr(lib, f"msplora_backward_{name}")
        bwd.argtypes = [p, i64, p, i64, i64, p, p, p, p, p, i64]
        bwd.restype = ctypes.c_int
    draw = lib.msplora_draw_positions
    draw.argtypes = [ctypes.c_uint64, ctypes.c_uint64, i64, ctypes.c_double, i64, i64, p, ctypes.POINTER(i64), i64]
    draw.restype = i64
    logs = lib.msplora_draw_logs
    logs.argtypes = [ctypes.c_uint64, ctypes.c_uint64, i64, p]
    logs.restype = None


_OMP_RUNTIMES = ("libgomp", "libomp", "libiomp")  # GNU, LLVM and Intel OpenMP runtimes, by file name


def _openmp_runtimes() -> Optional[set]:
    """The OpenMP runtime files mapped into this process (from /proc/self/maps); None where that is unknown."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {fields[5] for fields in (line.split(None, 5) for line in maps) if len(fields) == 6}
    except OSError:
        return None
    return {path.strip() for path in paths if os.path.basename(path.strip()).startswith(_OMP_RUNTIMES)}


def _openmp_wanted() -> bool:
    """The OpenMP build only where it can join PyTorch's own pool: Linux, PyTorch on OpenMP, and PyTorch's
    runtime a ``libgomp.so.1`` (a build's ``libgomp.so.1`` then resolves to that copy, by its soname)."""
    if not sys.platform.startswith("linux") or not _torch_uses_openmp():
        return False
    runtimes = _openmp_runtimes()
    return bool(runtimes) and all(os.path.basename(path) == "libgomp.so.1" for path in runtimes)


def _load(source: bytes, compiler: str) -> ctypes.CDLL:
    """The built library: the OpenMP build where ``_openmp_wanted()`` and it compiles, loads and brings no
    OpenMP runtime of its own; else the pthreads build. An OpenMP build found unusable where the pthreads one
    works is marked (a ``failed`` file beside it), so later processes do not try it again."""
    candidates = [[*_FLAGS, _OPENMP], _FLAGS] if _openmp_wanted() else [_FLAGS]
    unusable = []  # (folder, why) of OpenMP builds that did not work
    error: Optional[Exception] = None
    for flags in candidates:
        folder = _build_dir(source, compiler, flags)
        target, openmp = os.path.join(folder, "libmsplora_cpu.so"), _OPENMP in flags
        if openmp and os.path.exists(os.path.join(folder, "failed")):
            continue  # a previous process found it unusable
        before = _openmp_runtimes() if openmp else None
        try:
            if not os.path.exists(target):
                _compile(_SOURCE, target, compiler, flags)
            lib = ctypes.CDLL(target)
            _declare(lib)
        except (RuntimeError, OSError, AttributeError, subprocess.SubprocessError) as exc:
            error = exc
            if openmp:
                unusable.append((folder, str(exc)))
            continue
        if openmp and _openmp_runtimes() != before:  # it brought another runtime: another, competing pool
            unusable.append((folder, "loading it mapped a second OpenMP runtime"))
            continue
        for bad, why in unusable:
            _mark_unusable(bad, why)
        _state["flags"] = list(flags)
        return lib
    assert error is not None  # the last candidate, the pthreads build, returned or failed with an error
    raise error


def _mark_unusable(folder: str, why: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "failed"), "w") as f:
            f.write(why[-2000:] + "\n")
    except OSError:
        pass  # only an optimisation: the next process tries it again


def library() -> Optional[ctypes.CDLL]:
    """The compiled helper, built on the first call; None where ``MSPLORA_CPU_EXT=0`` or it cannot be built."""
    setting = _setting()
    if setting == "0":
        return None
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if _state["tried"]:
            return _state["lib"]
        compiler = os.environ.get("CC") or "cc"
        try:
            if shutil.which(compiler) is None:
                raise RuntimeError(f"no C compiler {compiler!r} on PATH (set $CC)")
            with open(_SOURCE, "rb") as f:
                source = f.read()
            lib = _load(source, compiler)
        except Exception as exc:  # noqa: BLE001 - any failure means the PyTorch path, said once
            if setting == "1":
                raise RuntimeError(f"msplora: building the CPU dropout helper failed: {exc}") from exc
            warnings.warn(f"msplora: the CPU dropout helper could not be built ({exc}); dropout on the CPU uses "
                          f"PyTorch sparse products instead (same results, slower). Set {ENV_VAR}=0 to silence "
                          "this.", RuntimeWarning, stacklevel=3)
            lib = None
        _state["lib"], _state["tried"] = lib, True
        return lib


def build_flags() -> Optional[list]:
    """The compiler flags of the loaded helper (``-fopenmp`` among them for the OpenMP build); None before a
    successful ``library()``."""
    return _state["flags"] if _state["lib"] is not None else None


def reset() -> None:
    """Forget the loaded helper (tests: the next ``library()`` looks again)."""
    with _lock:
        _state["lib"], _state["tried"], _state["flags"] = None, False, None
