"""The Triton backend's ``auto`` path rule and its tuning table, and how many launches a layer makes.

The rule: our fused GEMM runs only where the committed tuning table holds a measurement for exactly the
call's key in which it took at most 97% of the unfused path (cuBLAS GEMM + our low-rank kernels); every
other call, and every call off CUDA, takes the unfused path. Pure Python except the launch count, which runs
under the Triton interpreter (or on CUDA).
"""
import pytest
import torch

pytest.importorskip("triton")

from msplora_kernels import dispatch  # noqa: E402
from msplora_kernels._triton import tune, tuning, tuning_table  # noqa: E402

GPU, TORCH, TRITON = "NVIDIA H200", "2.11.0", "3.6.0"


def entry(fused_ms, unfused_ms, **changes):
    base = dict(gpu=GPU, torch=TORCH, triton=TRITON, dtype="bf16", n=4096, k=4096, ranks="8,4,2", dropout=True,
                m_bucket=8192, op="forward", fused_ms=fused_ms, unfused_ms=unfused_ms,
                device="NVIDIA H200", commit="abc1234", date="2026-12-02")
    base.update(changes)
    return base


@pytest.fixture
def on_h200(monkeypatch):
    """prefer_fused as on an H200 with torch 2.11 and triton 3.6 (no GPU is touched)."""
    monkeypatch.setattr(tuning, "_gpu_name", lambda index: GPU)
    monkeypatch.setattr(tuning, "software_versions", lambda: (TORCH, TRITON))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def decide(decisions, m=8192, n=4096, k=4096, dtype=torch.bfloat16, ranks=(8, 4, 2), dropout=True, op="forward"):
    return tuning.prefer_fused(m, n, k, torch.device("cuda", 0), dtype, ranks=ranks, dropout=dropout, op=op,
                               decisions=decisions)


def test_the_committed_table_parses_and_an_empty_table_never_picks_our_gemm(on_h200):
    committed = tuning.parse_table(tuning_table.ENTRIES)
    assert isinstance(committed, dict)
    for m in (1, 1024, 8192, 65536):
        assert not decide({}, m=m)


def test_fused_only_where_measured_at_least_3_percent_faster(on_h200):
    assert decide(tuning.parse_table([entry(0.96, 1.0)]))
    assert decide(tuning.parse_table([entry(0.97, 1.0)]))
    assert not decide(tuning.parse_table([entry(0.98, 1.0)]))  # 2% faster is not enough
    assert not decide(tuning.parse_table([entry(1.2, 1.0)]))


@pytest.mark.parametrize("change,call", [
    (dict(gpu="NVIDIA H100 80GB HBM3"), {}),
    (dict(torch="2.10.0"), {}),
    (dict(triton="3.5.0"), {}),
    (dict(dtype="fp16"), {}),
    (dict(n=11008), {}),
    (dict(k=11008), {}),
    (dict(ranks="64,32,16"), {}),
    (dict(dropout=False), {}),
    (dict(m_bucket=4096), {}),
    (dict(op="backward"), {}),
    ({}, dict(m=16384)),
])
def test_every_part_of_the_key_must_match(on_h200, change, call):
    decisions = tuning.parse_table([entry(0.5, 1.0, **change)])
    assert not decide(decisions, **call)


def test_m_buckets_are_powers_of_two():
    assert [tuning.m_bucket(m) for m in (1, 2, 3, 4096, 4097, 8192)] == [1, 2, 4, 4096, 8192, 8192]
    decisions = tuning.parse_table([entry(0.5, 1.0)])
    assert tuning.table_key(GPU, TORCH, TRITON, "bf16", 4096, 4096, (8, 4, 2), True, 4097, "forward") in decisions


@pytest.mark.parametrize("bad,message", [
    ({"fused_ms": None}, "missing fields"),
    ({"fused_ms": -1.0}, "positive"),
    ({"m_bucket": 1000}, "not a power of two"),
    ({"op": "sideways"}, "op must be one of"),
])
def test_malformed_entries_are_refused_naming_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message):
        tuning.parse_table([broken_entry(bad)])


def broken_entry(bad):
    """A valid entry with the fields of ``bad`` replaced (None: removed)."""
    broken = entry(1.0, 1.0)
    for key, value in bad.items():
        if value is None:
            del broken[key]
        else:
            broken[key] = value
    return broken


def test_off_cuda_auto_takes_the_unfused_path_and_forced_paths_win(on_h200):
    decisions = tuning.parse_table([entry(0.5, 1.0)])
    assert not tuning.prefer_fused(8192, 4096, 4096, torch.device("cpu"), torch.bfloat16, ranks=(8, 4, 2),
                                   dropout=True, decisions=decisions)
    assert tuning.prefer_fused(1, 1, 1, torch.device("cpu"), torch.float32, forced="fused")
    assert not tuning.prefer_fused(8192, 4096, 4096, torch.device("cuda", 0), torch.bfloat16, forced="unfused",
                                   ranks=(8, 4, 2), dropout=True, decisions=decisions)


def test_the_tuning_step_writes_a_table_that_parses_and_merges(tmp_path):
    path = tmp_path / "tuning_table.py"
    kept = entry(0.9, 1.0, gpu="NVIDIA A100-SXM4-80GB")
    replaced = entry(2.0, 1.0)
    tune.write_table(str(path), [kept, replaced])
    tune.write_table(str(path), [entry(0.5, 1.0)], merge=True)
    namespace = {}
    exec(path.read_text(), namespace)
    entries = namespace["ENTRIES"]
    assert len(entries) == 2 and kept in entries
    decisions = tuning.parse_table(entries)
    key = tuning.table_key(GPU, TORCH, TRITON, "bf16", 4096, 4096, (8, 4, 2), True, 8192, "forward")
    assert decisions[key]  # the new measurement replaced the old one for the same key


# ---- launches per layer -------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available() and not dispatch.triton_interpreted(),
                    reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("ranks", [(8, 4, 2), (64, 32, 16)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_launches_per_whole_layer_call(p, ranks):
    """Kernels one whole layer call launches (``msplora_linear`` in training mode, then ``backward`` into the
    gradients of x and every adapter, None before as after ``zero_grad()``; Triton kernels plus torch ops
    that run a kernel; allocation and views launch nothing). Each branch's gradient comes out contiguous
    in its parameter's dtype, so autograd adopts it without a copy.

    Unfused (the default), p = 0: forward 4 = packing A_cat and B_cat (one launch for both, cast included),
    shrink, cuBLAS x W^T + b, y += S B^T (3 with the adapter cache warm); backward 5 = dS and dB in one launch,
    cuBLAS dy W, the dx epilogue, dA, and one launch summing dA's and dB's partials (37 rows: two row tiles or
    slices under the interpreter; 4 where a GPU needs no split). Fused: our GEMM replaces cuBLAS and the
    epilogue: 3 (2 cached) and 4. With dropout the seed is drawn on the host (``torch.randint`` and its
    ``.item()``: two CPU ops, no GPU launch); nothing else changes."""
    from tests.test_triton_kernels import make_problem

    counts = tune.count_launches(*make_problem(37, 72, 50, ranks, dtype=torch.float32), p=p)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sums = 1 if tuning.reduction_splits(37, device) > 1 else 0
    seed = 2 if p > 0 else 0
    assert counts["unfused"] == {"forward": 4 + seed, "backward": 4 + sums, "forward_cached": 3 + seed}, counts
    assert counts["fused"] == {"forward": 3 + seed, "backward": 3 + sums, "forward_cached": 2 + seed}, counts
    if p == 0:
        assert counts["unfused"]["forward"] <= 4 and counts["unfused"]["backward"] <= 6


@pytest.mark.skipif(not torch.cuda.is_available() and not dispatch.triton_interpreted(),
                    reason="needs CUDA or TRITON_INTERPRET=1")
def test_half_precision_activations_with_fp32_adapters_add_no_casts():
    """Adapters kept in fp32 beside fp16 activations (as trained in mixed precision): the packing casts them in
    its one launch, and the gradients are written in fp32 by the kernels: the same counts as all-fp32."""
    from tests.test_triton_kernels import make_problem

    counts = tune.count_launches(*make_problem(37, 72, 50, (8, 4, 2), dtype=torch.float32), dtype=torch.float16)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sums = 1 if tuning.reduction_splits(37, device) > 1 else 0
    assert counts["unfused"] == {"forward": 4, "backward": 4 + sums, "forward_cached": 3}, counts


@pytest.mark.skipif(not dispatch.triton_interpreted(), reason="runs the tuning step's code under the interpreter")
def test_the_tuning_step_runs_end_to_end_on_the_interpreter(monkeypatch, tmp_path):
    """``tune.measure`` (the GPU check's required tune step) on the CPU under the interpreter, with
    ``do_bench`` replaced by one call of the timed function and a fake time per path: every launch of both
    paths and of the TMA check runs, the entries have the committed table's fields and parse, and the
    written table reads back with the rule applied (fused at 0.9x the unfused time, not at 1.0x)."""
    import triton.testing

    fake = {"fused": 0.9, "unfused": 1.0, "fused_tma": 1.0}
    from msplora_kernels import triton_backend

    def do_bench(fn, warmup, rep):
        fn()
        return fake[triton_backend._forced["path"]]

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    wrong = []
    entries = tune.measure([(37, 72, 50)], [(8, 4, 2)], [0.0, 0.05], torch.float16, 1, 1, wrong=wrong,
                           device="cpu")
    assert wrong == []  # the TMA GEMM's y agreed with cuBLAS + ours (here: the interpreter's)
    assert [(e["op"], e["dropout"]) for e in entries] == [("forward", False), ("backward", False),
                                                          ("forward", True), ("backward", True)]
    assert all(e["fused_ms"] == 0.9 and e["unfused_ms"] == 1.0 for e in entries)
    assert all(e.get("fused_tma_ms") == 1.0 for e in entries if e["op"] == "forward")
    decisions = tuning.parse_table(entries)
    assert all(decisions.values()) and len(decisions) == 4
    assert not any(tuning.parse_tma_table(entries).values())  # TMA no faster than unfused: not chosen
    path = tmp_path / "table.py"
    tune.write_table(str(path), entries)
    assert "ENTRIES" in path.read_text() and "fused_ms" in path.read_text()
