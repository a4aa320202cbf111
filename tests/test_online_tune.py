"""``MSPLORA_TUNE=1``: keys missing from the committed tuning table are measured once on the device.

Specification (``msplora_kernels/_triton/online_tune.py``): without ``MSPLORA_TUNE=1`` nothing is ever
measured and a missing key runs the unfused path; with it, the first use of a missing key measures both
paths (``_measure``, replaced here by fake timings; its real inputs and runs are exercised on the CPU under
the Triton interpreter with only the timer faked) and picks the fused GEMM only when it took at most 97% of
the unfused time; the decision is written to a JSON cache file (atomically; a corrupt or foreign file is
ignored with a warning and left as it was) and read back by later processes; nothing is measured while
``torch.compile`` traces or a CUDA graph is captured; a decision, once used, never changes in the process;
under torch.distributed all ranks end with the decision of the one rank that measured (2 gloo processes);
the caller's RNG state is unchanged by a measurement.
"""
import datetime
import json
import os
import socket
import sys
import time
import warnings

import pytest
import torch

pytest.importorskip("triton")

from msplora_kernels import dispatch  # noqa: E402
from msplora_kernels._triton import online_tune, tuning  # noqa: E402

GPU, TORCH, TRITON = "NVIDIA H200", "2.11.0", "3.6.0"
CUDA0 = torch.device("cuda", 0)


def fake_h200(monkeypatch):
    monkeypatch.setattr(tuning, "_gpu_name", lambda index: GPU)
    monkeypatch.setattr(tuning, "software_versions", lambda: (TORCH, TRITON))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """A process that has decided nothing yet, with its cache file in tmp_path, on a (faked) H200."""
    online_tune._forget()
    monkeypatch.delenv(online_tune.ENV_TUNE, raising=False)
    monkeypatch.setenv(online_tune.ENV_CACHE, str(tmp_path / "cache.json"))
    fake_h200(monkeypatch)
    yield
    online_tune._forget()


class FakeTimer:
    """``_measure`` returning fixed (fused_ms, unfused_ms), recording the keys it was asked to time."""

    def __init__(self, fused_ms, unfused_ms=1.0):
        self.times = (fused_ms, unfused_ms)
        self.calls = []

    def __call__(self, key, device):
        self.calls.append(key)
        return self.times


@pytest.fixture
def timer(monkeypatch):
    def install(fused_ms, unfused_ms=1.0):
        fake = FakeTimer(fused_ms, unfused_ms)
        monkeypatch.setattr(online_tune, "_measure", fake)
        return fake
    return install


@pytest.fixture
def tune_on(monkeypatch):
    monkeypatch.setenv(online_tune.ENV_TUNE, "1")


def auto(m=8192, n=4096, k=4096, ranks=(8, 4, 2), dropout=True, op="forward", device=CUDA0, decisions=None):
    """What ``auto`` picks for this call (the committed table is empty, so every key here is missing)."""
    return tuning.prefer_fused(m, n, k, device, torch.bfloat16, ranks=ranks, dropout=dropout, op=op,
                               decisions=decisions)


def key_of(m=8192, n=4096, k=4096, ranks=(8, 4, 2), dropout=True, op="forward"):
    return tuning.table_key(GPU, TORCH, TRITON, "bf16", n, k, ranks, dropout, m, op)


def cache_file(tmp_path):
    return tmp_path / "cache.json"


# ---- the rule -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused_ms,chosen", [(0.5, True), (0.96, True), (0.97, True), (0.975, False),
                                             (0.98, False), (1.0, False), (1.5, False)])
def test_fused_only_when_measured_at_least_3_percent_faster(tune_on, timer, fused_ms, chosen):
    fake = timer(fused_ms, 1.0)
    assert auto() is chosen
    assert fake.calls == [key_of()]


def test_each_key_is_measured_for_its_own_op_and_m_bucket(tune_on, timer):
    fake = timer(0.5)
    auto(m=5000, op="forward")
    auto(m=8000, op="forward")  # same bucket (8192): measured already
    auto(m=5000, op="backward")
    auto(m=300, op="forward")
    assert fake.calls == [key_of(m=8192, op="forward"), key_of(m=8192, op="backward"), key_of(m=512)]


def test_committed_entries_are_never_measured(tune_on, timer):
    fake = timer(0.5)  # would pick fused; the committed table says unfused
    table = tuning.parse_table([dict(zip(online_tune._KEY_FIELDS, key_of()), ranks="8,4,2", fused_ms=2.0,
                                     unfused_ms=1.0)])
    assert auto(decisions=table) is False
    assert fake.calls == []


def test_forced_paths_and_other_devices_are_never_measured(tune_on, timer):
    fake = timer(0.5)
    assert tuning.prefer_fused(8192, 4096, 4096, CUDA0, torch.bfloat16, forced="unfused", ranks=(8, 4, 2)) is False
    assert tuning.prefer_fused(8192, 4096, 4096, CUDA0, torch.bfloat16, forced="fused", ranks=(8, 4, 2)) is True
    assert auto(device=torch.device("cpu")) is False
    assert fake.calls == []


@pytest.mark.parametrize("value", [None, "", "0", "true", "yes"])
def test_without_msplora_tune_1_nothing_is_ever_measured(monkeypatch, timer, tmp_path, value):
    if value is not None:
        monkeypatch.setenv(online_tune.ENV_TUNE, value)
    fake = timer(0.5)
    for m in (1, 37, 4096, 8192):
        for op in tuning.OPS:
            assert auto(m=m, op=op) is False
    assert fake.calls == [] and not cache_file(tmp_path).exists()


# ---- never switching within a process -----------------------------------------------------------------------


def test_a_decision_is_frozen_once_used(monkeypatch, tune_on, timer, tmp_path):
    timer(0.5)
    assert auto() is True
    later = timer(2.0)  # the timings change, the cache file goes away: the path does not
    cache_file(tmp_path).unlink()
    assert auto() is True
    monkeypatch.delenv(online_tune.ENV_TUNE)
    assert auto() is True
    assert later.calls == []


def test_a_key_first_used_without_tuning_stays_unfused_when_tuning_is_turned_on(monkeypatch, timer):
    fake = timer(0.5)
    assert auto() is False
    monkeypatch.setenv(online_tune.ENV_TUNE, "1")
    assert auto() is False
    assert fake.calls == []


def test_nothing_is_measured_while_compiling_and_that_decision_is_frozen(monkeypatch, tune_on, timer):
    fake = timer(0.5)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert auto() is False
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert auto() is False  # frozen: the compiled graph and eager calls run the same path
    assert fake.calls == []
    assert auto(n=11008) is True and fake.calls == [key_of(n=11008)]  # outside tracing: measured


def test_nothing_is_measured_during_cuda_graph_capture(monkeypatch, tune_on, timer):
    fake = timer(0.5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert auto() is False
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert auto() is False
    assert fake.calls == []


def test_the_tracing_check_sees_a_real_torch_compile_trace():
    @torch.compile(backend="eager", fullgraph=True)
    def compiled(x):
        return x + 1 if online_tune._tracing_or_capturing() else x - 1

    assert torch.equal(compiled(torch.zeros(2)), torch.ones(2))
    assert online_tune._tracing_or_capturing() is False


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_a_compiled_function_and_eager_calls_run_the_same_path(tune_on, timer):
    """``prefer_fused`` reached from compiled code: whether Dynamo traces it (default rule) or runs it
    eagerly after a graph break (measured), compiled and eager calls agree, and it is measured at most once."""
    fake = timer(0.5)

    @torch.compile(backend="eager")
    def compiled(x):
        return x + 1 if auto() else x - 1

    first = bool(compiled(torch.zeros(2))[0] == 1)
    assert auto() is first and bool(compiled(torch.zeros(2))[0] == 1) is first
    assert len(fake.calls) <= 1


# ---- the cache file -----------------------------------------------------------------------------------------


def test_decisions_are_written_to_the_cache_and_read_back_by_the_next_process(tune_on, timer, tmp_path):
    timer(0.5)
    assert auto() is True
    timer(2.0, 1.0)
    assert auto(op="backward") is False
    data = json.loads(cache_file(tmp_path).read_text())
    assert data["format"] == online_tune.CACHE_FORMAT and data["version"] == online_tune.CACHE_VERSION
    decisions = tuning.parse_table(data["entries"])  # the committed table's format: entries can be pasted there
    assert decisions == {key_of(): True, key_of(op="backward"): False}
    assert not [p for p in tmp_path.iterdir() if p.name != "cache.json"]  # no temporary file left

    online_tune._forget()  # a new process
    fake = timer(2.0)  # would say unfused, but the cache answers first
    assert auto() is True and auto(op="backward") is False
    assert fake.calls == []


def test_the_cache_keeps_other_entries_and_other_processes_writes(tune_on, timer, tmp_path):
    other = dict(zip(online_tune._KEY_FIELDS, key_of(n=11008)), ranks="8,4,2", fused_ms=0.5, unfused_ms=1.0)
    other["gpu"] = "NVIDIA A100-SXM4-80GB"
    cache_file(tmp_path).write_text(json.dumps({"format": online_tune.CACHE_FORMAT,
                                                "version": online_tune.CACHE_VERSION, "entries": [other]}))
    timer(0.5)
    auto()
    # Another process adds an entry after this one read the file: the next write keeps it.
    data = json.loads(cache_file(tmp_path).read_text())
    late = dict(other, gpu="NVIDIA L4")
    data["entries"].append(late)
    cache_file(tmp_path).write_text(json.dumps(data))
    auto(op="backward")
    entries = json.loads(cache_file(tmp_path).read_text())["entries"]
    assert other in entries and late in entries and len(entries) == 4


def test_default_cache_path_is_in_the_projects_cache_and_names_gpu_torch_and_triton(monkeypatch, tune_on, timer,
                                                                                     tmp_path):
    monkeypatch.delenv(online_tune.ENV_CACHE)
    monkeypatch.setenv("MSPLORA_CACHE", str(tmp_path / "cache"))
    timer(0.5)
    auto()
    expected = tmp_path / "cache" / "tuning" / "NVIDIA_H200-torch2.11.0-triton3.6.0.json"
    assert expected.exists()
    monkeypatch.delenv("MSPLORA_CACHE")
    home = online_tune.cache_path(GPU, TORCH, TRITON)
    assert home == os.path.join(os.path.expanduser("~"), ".cache", "msplora", "tuning", expected.name)


VALID_ENTRY = dict(zip(online_tune._KEY_FIELDS, key_of(n=11008)), ranks="8,4,2", fused_ms=0.5, unfused_ms=1.0)


@pytest.mark.parametrize("content,message", [
    ("{not json", "not readable as JSON"),
    (b"\xff\xfe\x00garbage", "not readable as JSON"),
    ("[]", "not a msplora-tuning-cache file"),
    (json.dumps({"format": "msplora-tuning-cache", "version": 99, "entries": []}), "found"),
    (json.dumps({"format": "something-else", "version": 1, "entries": []}), "not a msplora-tuning-cache"),
    (json.dumps({"format": "msplora-tuning-cache", "version": 1, "entries": {}}), "malformed"),
    (json.dumps({"format": "msplora-tuning-cache", "version": 1,
                 "entries": [dict(VALID_ENTRY, fused_ms=-1)]}), "malformed"),
    (json.dumps({"format": "msplora-tuning-cache", "version": 1,
                 "entries": [{k: v for k, v in VALID_ENTRY.items() if k != "op"}]}), "malformed"),
    (json.dumps({"format": "msplora-tuning-cache", "version": 1,
                 "entries": [dict(VALID_ENTRY, ranks="a,b")]}), "malformed"),
])
def test_a_corrupt_or_foreign_cache_is_ignored_with_a_warning_and_left_as_it_was(tune_on, timer, tmp_path,
                                                                                  content, message):
    path = cache_file(tmp_path)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = path.read_bytes()
    fake = timer(0.5)
    with pytest.warns(RuntimeWarning, match=message):
        assert auto() is True  # measured: the file's entries are not trusted
    assert fake.calls == [key_of()]
    assert path.read_bytes() == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per file, not one per key
        auto(op="backward")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(monkeypatch, tune_on, timer, tmp_path):
    timer(0.5)
    auto()
    before = cache_file(tmp_path).read_bytes()

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(online_tune.os, "replace", refuse)
    with pytest.warns(RuntimeWarning, match="could not write"):
        assert auto(op="backward") is True  # decided for this process all the same
    assert cache_file(tmp_path).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]


def test_a_failed_measurement_warns_runs_unfused_and_writes_nothing(monkeypatch, tune_on, tmp_path):
    def out_of_memory(key, device):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(online_tune, "_measure", out_of_memory)
    with pytest.warns(RuntimeWarning, match="measuring .* failed"):
        assert auto() is False
    assert auto() is False  # frozen, not measured again in this process
    assert not cache_file(tmp_path).exists()


# ---- the real measurement code, with a fake timer (the Triton interpreter on the CPU) -----------------------


@pytest.mark.skipif(not torch.cuda.is_available() and not dispatch.triton_interpreted(),
                    reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("op", tuning.OPS)
def test_measuring_runs_both_paths_without_touching_the_callers_rng(monkeypatch, one_thread, op):
    """``_measure`` builds its inputs and runs the backend's real forward or backward on both paths (only
    ``_time``, do_bench, is replaced: it runs each callable once); the caller's RNG state and the random
    numbers drawn after it are exactly those of a run without tuning."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    ran = []

    def run_once(run):
        from msplora_kernels import triton_backend

        result = run()
        ran.append((triton_backend._forced["path"], len(result)))
        return 1.0 if triton_backend._forced["path"] == "fused" else 2.0

    monkeypatch.setattr(online_tune, "_time", run_once)
    key = tuning.table_key(GPU, TORCH, TRITON, "fp32", 50, 72, (8, 4, 2), True, 37, op)

    torch.manual_seed(1234)
    expected = torch.rand(16)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    assert online_tune._measure(key, device) == (1.0, 2.0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(16), expected)
    assert ran == [("fused", 2 if op == "forward" else 3), ("unfused", 2 if op == "forward" else 3)]


@pytest.mark.skipif(not torch.cuda.is_available() and not dispatch.triton_interpreted(),
                    reason="needs CUDA or TRITON_INTERPRET=1")
def test_the_users_dropout_is_reproducible_with_tuning(monkeypatch, one_thread):
    """torch.manual_seed reproduces a layer's dropout whether or not a key was measured (the real
    ``_measure``, timer faked) between the seed and the layer's call."""
    import msplora_kernels

    monkeypatch.setattr(online_tune, "_time", lambda run: (run(), 1.0)[1])
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    key = tuning.table_key(GPU, TORCH, TRITON, "fp32", 50, 72, (8, 4, 2), True, 37, "backward")
    g = torch.Generator().manual_seed(3)
    x, weight = torch.randn(37, 72, generator=g), torch.randn(50, 72, generator=g)
    branches = [(torch.randn(r, 72, generator=g), torch.randn(50, r, generator=g), 1.0) for r in (8, 4, 2)]

    def layer():
        return msplora_kernels.msplora_linear(x, weight, None, branches, dropout_p=0.3, training=True)

    torch.manual_seed(7)
    plain = layer()
    torch.manual_seed(7)
    online_tune._measure(key, device)
    tuned = layer()
    assert torch.equal(tuned, plain)
    torch.manual_seed(8)
    assert not torch.equal(layer(), plain)  # the check could fail: another seed drops other elements


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_real_measurement_on_a_gpu(tune_on, tmp_path):
    """do_bench on CUDA, both ops, at a key whose kernels ``benchmarks/gpu_check.sh``'s benchmark step has
    compiled already (M = 8192, K = N = 4096, bf16, ranks 8/4/2, dropout): positive times, the CPU and CUDA
    RNG states untouched, and ``auto`` (committed table bypassed) decides by them and writes the cache."""
    device = torch.device("cuda", 0)
    cpu_state, cuda_state = torch.get_rng_state(), torch.cuda.get_rng_state(device)
    for op in tuning.OPS:
        fused_ms, unfused_ms = online_tune._measure(key_of(op=op), device)
        assert 0 < fused_ms < 1e3 and 0 < unfused_ms < 1e3, (op, fused_ms, unfused_ms)
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert torch.equal(torch.cuda.get_rng_state(device), cuda_state)
    decision = auto(decisions={})
    entries = json.loads(cache_file(tmp_path).read_text())["entries"]
    assert len(entries) == 1 and decision is online_tune._fused(entries[0])
    assert auto(decisions={}) is decision


# ---- torch.distributed: 2 gloo processes --------------------------------------------------------------------

WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank, port, folder):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MSPLORA_TUNE="1", MSPLORA_TUNE_CACHE=os.path.join(folder, f"rank{rank}.json"))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    tuning._gpu_name = lambda index: GPU
    tuning.software_versions = lambda: (TORCH, TRITON)
    torch.cuda.current_device = lambda: 0
    calls = []

    def measure(key, device):  # the ranks disagree: rank 0 finds fused faster, rank 1 unfused
        calls.append(key)
        time.sleep(0.2)  # a measurement takes time: the other rank arrives while it runs
        return (0.5, 1.0) if rank == 0 else (2.0, 1.0)

    online_tune._measure = measure

    def everyone(value):
        values = [None] * WORLD
        dist.all_gather_object(values, value)
        return values

    # Rank 0 reaches the key first: both ranks run rank 0's choice, rank 1 never measures.
    if rank == 1:
        dist.barrier()
    first = auto(n=1024)
    if rank == 0:
        dist.barrier()
    assert everyone(first) == [True, True]
    assert everyone(len(calls)) == [1, 0]
    # Rank 1 first: both run rank 1's choice.
    if rank == 0:
        dist.barrier()
    second = auto(n=2048)
    if rank == 1:
        dist.barrier()
    assert everyone(second) == [False, False]
    assert everyone(len(calls)) == [1, 1]
    # Both at once: one of them measures, both run its choice.
    dist.barrier()
    third = auto(n=3072)
    decisions, counts = everyone(third), everyone(len(calls))
    assert decisions[0] == decisions[1] and sum(counts) == 3, (decisions, counts)
    # Different keys on each rank (per-rank M buckets), and a shared key reached in different orders:
    # each rank measures its own key, the shared one is measured once, nobody waits for ever.
    if rank == 0:
        own, shared = auto(m=1024, n=4096), auto(m=4096, n=4096)
    else:
        shared, own = auto(m=4096, n=4096), auto(m=2048, n=4096)
    assert own is (rank == 0)
    decided, counts = everyone(shared), everyone(len(calls))
    assert decided[0] == decided[1] and sum(counts) == 6, (decided, counts)
    # Every rank's cache holds the decisions it ran, with the measuring rank's timings.
    entries = json.loads(open(os.path.join(folder, f"rank{rank}.json")).read())["entries"]
    first_entry = [e for e in entries if e["n"] == 1024]
    assert len(first_entry) == 1 and first_entry[0]["fused_ms"] == 0.5
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/test_distributed.py: skip gloo's teardown


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_all_ranks_run_the_decision_of_the_rank_that_measured(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_entry, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
