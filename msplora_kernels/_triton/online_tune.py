"""On-device measurement of keys missing from the committed tuning table (``MSPLORA_TUNE=1``).

``tuning.prefer_fused`` decides between our fused GEMM and the unfused path (cuBLAS GEMM + our low-rank
kernels) from the committed table (``tuning_table.py``). For a key the table does not hold (GPU name, torch
and triton versions, dtype, N, K, rank layout, dropout on/off, M bucket, forward or backward) it asks
``decide`` here, which returns, in this order:

1. the decision this process already used for the key (it is frozen the first time it is used, so a path
   never changes within a process: the two paths round differently);
2. without ``MSPLORA_TUNE=1``: the default, unfused (nothing is measured, ever);
3. while ``torch.compile`` traces (``torch.compiler.is_compiling()``) or a CUDA graph is being captured
   (``torch.cuda.is_current_stream_capturing()``): the default, unfused, frozen for the rest of the process
   like any other decision (timing inside a trace or a capture would be meaningless or illegal). Under
   ``torch.compile`` the backend runs inside custom ops, so a compiled model's layers are normally reached
   at run time, outside tracing, and are measured there; with CUDA graphs (``mode="reduce-overhead"``) the
   warm-up runs before capture measure, and the capture then reuses the frozen decision;
4. the cache file's entry for the key (see below);
5. a measurement: ``_measure`` times both paths on the device for the key's op (``forward``: S and y;
   ``backward``: dS, dB, dx, dA) at M = the key's bucket (the largest M the bucket covers), on random
   tensors of the key's shapes allocated for the purpose (the caller's tensors are not touched), drawn
   from a private generator inside ``torch.random.fork_rng`` with a fixed dropout seed, so that the
   caller's RNG streams (``torch.manual_seed`` and the dropout seeds drawn from it) are exactly as they
   would be without tuning. ``triton.testing.do_bench`` gives the median of repeated runs after warm-up.
   The fused path is chosen when ``fused_ms <= FUSED_MIN_GAIN * unfused_ms`` (at least 3% faster), the
   committed table's rule. A measurement that fails (e.g. out of memory) warns, decides unfused, and is not
   written to the cache. The result is written to the cache file and frozen.

**Cache file**: ``$MSPLORA_TUNE_CACHE`` if set, else ``<cache>/tuning/<gpu>-torch<v>-triton<v>.json`` in the
project's cache folder, ``$MSPLORA_CACHE`` or ``~/.cache/msplora`` (as ``msplora.assets``). JSON:
``{"format": "msplora-tuning-cache", "version": 1, "entries": [...]}``; the entries have exactly the committed table's fields (so they can be pasted into
``tuning_table.py``) and are validated by the same ``tuning.parse_table``. A file that cannot be read, is
not valid JSON, has another format or version, or holds a malformed entry is ignored with a warning naming
it and is never overwritten (delete it, or point ``MSPLORA_TUNE_CACHE`` elsewhere). Writes re-read the file,
add the new entry and replace the file atomically (a temporary file in the same folder, then
``os.replace``), so a reader never sees half a file; two processes writing at the same moment can lose one
of the two new entries, which is then measured again by a later run.

**Distributed** (``torch.distributed`` initialised, world size > 1): every rank must run the same path for
a key, so the decision for a new key is made once per job and shared through the default process group's
key-value store (``_get_default_store``; the TCP or file store that ``init_process_group`` set up), not by
a collective: the first rank to reach the key claims it (``store.add`` returns 1 to exactly one rank),
decides as above (cache, else measurement) and publishes the decision with its timings; every other rank
waits for that decision (up to ``WAIT_S`` seconds) and writes it to its own cache file, so caches on
different nodes agree after the first run. Unlike a broadcast from rank 0, this needs no matching calls on
all ranks: ranks may reach keys in different orders, or different keys (per-rank M buckets with dynamic
padding), without hanging or pairing the wrong decisions; a rank only ever waits for a rank that is already
measuring that key. In the usual case where all ranks reach a key together, rank 0 is not necessarily the
one that measures. Inside tracing or capture no rank touches the store (step 3 applies on every rank).

**Determinism.** Each path is deterministic run to run on one GPU and software stack: our kernels use no
atomics and one launch configuration per shape; cuBLAS (the unfused path's GEMMs) needs
``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (or ``:16:8``) to be deterministic, and torch requires it under
``torch.use_deterministic_algorithms(True)``. The two paths round differently, so results are bit-identical
only between runs that take the same path for every key. Without ``MSPLORA_TUNE`` the path is a pure
function of the key and the committed table. With it, it is also a function of the cache file and, for
keys measured afresh, of timings, which vary run to run: a key near the 3% threshold may be decided
differently by two runs that both measure it. For bit-reproducible runs keep the cache file between runs
(every key measured once, then read back), or leave ``MSPLORA_TUNE`` unset.

**Limits** (none of this has run on a GPU yet): a measurement runs inside the caller's forward or backward,
so that call takes longer once per key (two paths, ``WARMUP_MS + REP_MS`` each, plus compiling kernels on a
cold Triton cache) and holds the inputs of the key's shapes at its M bucket in memory meanwhile; it selects
the paths with ``triton_backend.forced_path``, which is process-wide, so another thread calling the backend
at that moment would run the path being timed; ``do_bench`` synchronises the whole device, so a rank that
measures also waits for its outstanding collectives, which the waiting ranks have normally launched already
(they ran the same layers before reaching the key); if not, the wait ends after ``WAIT_S`` with an error
naming the key instead of hanging.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import tempfile
import threading
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from . import tuning

ENV_TUNE = "MSPLORA_TUNE"
ENV_CACHE = "MSPLORA_TUNE_CACHE"
CACHE_FORMAT = "msplora-tuning-cache"
CACHE_VERSION = 1
WAIT_S = 900  # how long a rank waits for another rank's measurement of a key (a cold Triton cache compiles)
WARMUP_MS, REP_MS = 10, 50  # do_bench's warm-up and measuring time per path
_MEASURE_P = 0.05  # dropout keys are timed at this p: the masks cost the same at any p > 0
_MEASURE_SEED = 11
_KEY_FIELDS = ("gpu", "torch", "triton", "dtype", "n", "k", "ranks", "dropout", "m_bucket", "op")
_DTYPES = {name: dtype for dtype, name in tuning._DTYPE_NAMES.items()}

_lock = threading.Lock()
_frozen: Dict[Tuple, bool] = {}  # every decision this process has used for a key missing from the table
_caches: Dict[str, Dict[Tuple, dict]] = {}  # cache file -> {key: entry}, read once per process
_warned: set = set()


def enabled() -> bool:
    """Whether missing keys are measured: ``MSPLORA_TUNE=1``."""
    return os.environ.get(ENV_TUNE, "").strip() == "1"


def _tracing_or_capturing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def decide(key: Tuple, device: torch.device) -> bool:
    """The path for ``key`` (a ``tuning.table_key`` the committed table lacks): True = fused. Frozen once
    returned, for the rest of the process."""
    decision = _frozen.get(key)
    if decision is not None:
        return decision
    with _lock:
        decision = _frozen.get(key)
        if decision is None:
            if not enabled() or _tracing_or_capturing():
                decision = False
            else:
                decision = _decide_once_per_job(key, device)
            _frozen[key] = decision
        return decision


def _forget() -> None:
    """Drop every frozen decision and cached file (for tests: a process never needs it)."""
    with _lock:
        _frozen.clear()
        _caches.clear()
        _warned.clear()


# ---- one decision per job -----------------------------------------------------------------------------------


def _store():
    """The default process group's store when several ranks run, else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    return dist.distributed_c10d._get_default_store()


def _decide_once_per_job(key: Tuple, device: torch.device) -> bool:
    store = _store()
    if store is None:
        entry = _decide_here(key, device)
        return entry is not None and _fused(entry)
    name = "msplora/tune/" + json.dumps(list(key))
    if store.add(name + "/claim", 1) == 1:
        entry = None
        try:
            entry = _decide_here(key, device)
        finally:  # the other ranks wait for this, whatever happens here
            store.set(name + "/decision", json.dumps(entry))
        return entry is not None and _fused(entry)
    try:
        store.wait([name + "/decision"], datetime.timedelta(seconds=WAIT_S))
    except RuntimeError as error:
        raise RuntimeError(f"msplora tuning: no decision for {dict(zip(_KEY_FIELDS, key))} from the rank that "
                           f"measures it within {WAIT_S} s (did that rank fail?)") from error
    entry = json.loads(store.get(name + "/decision"))
    if entry is None:
        return False
    _write_entry(entry)  # this rank's cache then agrees with the measuring rank's
    return _fused(entry)


def _fused(entry: dict) -> bool:
    return float(entry["fused_ms"]) <= tuning.FUSED_MIN_GAIN * float(entry["unfused_ms"])


def _decide_here(key: Tuple, device: torch.device) -> Optional[dict]:
    """The cache's entry for ``key``, else a fresh measurement (written to the cache); None if measuring
    failed (then: unfused, nothing written)."""
    entry = _read_cache(cache_path(*key[:3])).get(key)
    if entry is not None:
        return entry
    try:
        fused_ms, unfused_ms = _measure(key, device)
    except Exception as error:  # out of memory, a kernel that fails to compile: the default path runs
        warnings.warn(f"msplora tuning: measuring {dict(zip(_KEY_FIELDS, key))} failed ({error!r}); the "
                      f"unfused path runs for it in this process", RuntimeWarning, stacklevel=4)
        return None
    entry = dict(zip(_KEY_FIELDS, key), fused_ms=round(float(fused_ms), 5), unfused_ms=round(float(unfused_ms), 5),
                 device=key[0], date=datetime.date.today().isoformat())
    _write_entry(entry)
    return entry


# ---- the cache file -----------------------------------------------------------------------------------------


def cache_path(gpu: str, torch_version: str, triton_version: str) -> str:
    """``$MSPLORA_TUNE_CACHE``, else
    ``<$MSPLORA_CACHE or ~/.cache/msplora>/tuning/<gpu>-torch<v>-triton<v>.json``."""
    override = os.environ.get(ENV_CACHE)
    if override:
        return os.path.abspath(os.path.expanduser(override))
    folder = os.environ.get("MSPLORA_CACHE") or os.path.join("~", ".cache", "msplora")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{gpu}-torch{torch_version}-triton{triton_version}")
    return os.path.join(os.path.abspath(os.path.expanduser(folder)), "tuning", name + ".json")


def _warn_once(path: str, why: str) -> None:
    if path not in _warned:
        _warned.add(path)
        warnings.warn(f"msplora tuning cache {path} ignored and left as it is: {why}. Delete it or set "
                      f"{ENV_CACHE} to another file.", RuntimeWarning, stacklevel=5)


def _load(path: str) -> Optional[Dict[Tuple, dict]]:
    """{key: entry} from the file; {} if there is none; None (with a warning) if it cannot be used."""
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        _warn_once(path, f"not readable as JSON ({error})")
        return None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
        found = (data.get("format"), data.get("version")) if isinstance(data, dict) else type(data).__name__
        _warn_once(path, f"not a {CACHE_FORMAT} file of version {CACHE_VERSION} (found {found})")
        return None
    entries = data.get("entries")
    try:
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError("'entries' is not a list of objects")
        return {_entry_key(e): e for e in entries}  # parse_table raises on a malformed entry
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        _warn_once(path, f"malformed ({error})")
        return None


def _entry_key(entry: dict) -> Tuple:
    return next(iter(tuning.parse_table([entry])))


def _read_cache(path: str) -> Dict[Tuple, dict]:
    if path not in _caches:
        _caches[path] = _load(path) or {}
    return _caches[path]


def _write_entry(entry: dict) -> None:
    """Add ``entry`` to the cache file (re-read first, so that other processes' entries are kept); a file
    that cannot be used, or a failed write, leaves the file as it was."""
    path = cache_path(entry["gpu"], entry["torch"], entry["triton"])
    key = _entry_key(entry)
    current = _load(path)
    if current is None:
        return
    current[key] = entry
    _caches[path] = current
    entries: List[dict] = list(current.values())
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                                             dir=os.path.dirname(path))
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump({"format": CACHE_FORMAT, "version": CACHE_VERSION, "entries": entries}, file, indent=1)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as error:
        warnings.warn(f"msplora tuning: could not write {path} ({error}); the decision holds for this process "
                      f"only", RuntimeWarning, stacklevel=4)


# ---- measuring ----------------------------------------------------------------------------------------------


def _measure(key: Tuple, device: torch.device) -> Tuple[float, float]:
    """(fused_ms, unfused_ms): ``_time`` of the key's op on both paths, on fresh inputs of the key's shapes
    (M = its bucket) drawn from a private generator inside ``fork_rng``, so the caller's RNG streams are
    untouched. The tests run it on the CPU under the Triton interpreter with a fake ``_time``; on a GPU it
    has not run yet."""
    from .. import triton_backend

    fields = dict(zip(_KEY_FIELDS, key))
    m, n, k, dtype, op = fields["m_bucket"], fields["n"], fields["k"], _DTYPES[fields["dtype"]], fields["op"]
    ranks = [int(r) for r in fields["ranks"].split(",")]
    p = _MEASURE_P if fields["dropout"] else 0.0
    scalings = [1.0 / r for r in ranks]
    times = {}
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.no_grad(), triton_backend._on(device), \
            torch.autocast(device_type=device.type, enabled=False):
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(m, k, device=device, generator=g).to(dtype)
        weight = (torch.randn(n, k, device=device, generator=g) / k**0.5).to(dtype)
        a_cat = (torch.randn(sum(ranks), k, device=device, generator=g) / k**0.5).to(dtype)
        b_cat = (torch.randn(n, sum(ranks), device=device, generator=g) * 0.01).to(dtype)
        dy = torch.randn(m, n, device=device, generator=g).to(dtype) if op == "backward" else None
        for path in ("fused", "unfused"):
            with triton_backend.forced_path(path):
                def forward():
                    return triton_backend.forward(x, weight, None, a_cat, b_cat, ranks, scalings, p, _MEASURE_SEED)

                def backward():
                    return triton_backend.backward(dy, x, s, weight, a_cat, b_cat, ranks, scalings, p,
                                                   _MEASURE_SEED, True)

                s = forward()[1] if op == "backward" else None
                times[path] = _time(forward if op == "forward" else backward)
    return times["fused"], times["unfused"]


def _time(run) -> float:
    """Median milliseconds of ``run()`` after warm-up (``triton.testing.do_bench``: CUDA events, the L2
    cache flushed before each run)."""
    import triton.testing

    return triton.testing.do_bench(run, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
