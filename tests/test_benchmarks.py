"""Smoke tests of the microbenchmark runner (``python -m benchmarks.run``) at tiny sizes: the files it writes,
the ratios, the saved-activation accounting, the parameter table and its argument errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import measure, param_table, providers, run



@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = run.build_parser().parse_args([
        "--shape", "64,32,48", "--ranks", "4,2,1", "--dropout", "0", "--dropout", "0.1", "--device", "cpu",
        "--warmup", "1", "--repeats", "2", "--threads", str(torch.get_num_threads()), "--out", str(out),
    ])
    return run.run_benchmarks(args), out


def test_writes_json_markdown_and_plot_in_the_results_format(tiny_result):
    result, out = tiny_result
    files = sorted(os.listdir(out))
    stems = {os.path.splitext(f)[0] for f in files}
    assert len(stems) == 1 and stems.pop().endswith(f"-cpu-{torch.get_num_threads()}threads")
    assert {os.path.splitext(f)[1] for f in files} == {".json", ".md", ".png"}
    with open(out / [f for f in files if f.endswith(".json")][0]) as f:
        stored = json.load(f)
    assert {"device", "commit", "date", "rows"} <= set(stored)
    # 2 dropouts x 3 modes x 4 CPU providers (the Triton ones are skipped without CUDA)
    assert len(stored["rows"]) == 24
    for row in stored["rows"]:
        assert row["shape"] == [64, 32, 48] and row["ranks"] == [4, 2, 1]
        assert row["mode"] in measure.MODES and row["provider"] in providers.BASE_PROVIDERS
        assert row["median_ms"] > 0 and row["q20_ms"] <= row["q80_ms"]
        assert row["peak_mem_mb"] is None  # not measurable per call on the CPU
    md = open(out / [f for f in files if f.endswith(".md")][0]).read()
    assert "speedup vs reference" in md and md.count("| msplora |") == 6


def test_ratios_are_against_bare_and_reference_of_the_same_case(tiny_result):
    rows = tiny_result[0]["rows"]
    for row in rows:
        same = {r["provider"]: r["median_ms"] for r in rows
                if (r["dropout"], r["mode"]) == (row["dropout"], row["mode"])}
        assert row["vs_bare"] == pytest.approx(row["median_ms"] / same["bare"])
        assert row["speedup_vs_reference"] == pytest.approx(same["reference"] / row["median_ms"])


def test_saved_activations_count_inputs_not_parameters(tiny_result):
    rows = [r for r in tiny_result[0]["rows"] if r["mode"] == "fwd"]
    saved = {(r["provider"], r["dropout"]): r["saved_mb"] for r in rows}
    x_mb = 64 * 32 * 4 / 2**20
    assert saved[("bare", 0.0)] == 0.0  # a frozen weight needs nothing saved (and parameters are excluded)
    assert saved[("msplora", 0.0)] >= x_mb
    # the reference keeps a dropped copy of x per branch; msplora keeps x and S and redraws its masks
    assert saved[("reference", 0.1)] >= 3 * x_mb > saved[("msplora", 0.1)]


def test_providers_agree_with_the_reference_without_dropout():
    case = providers.Case(33, 20, 17, (3, 2, 1), 0.0, torch.float32, torch.device("cpu"))
    x, linear, _ = providers.make_inputs(case)
    built = {n: providers.build_provider(n, case, x, linear) for n in ("reference", "msplora")}
    assert providers.check_agreement(built, case) is None
    broken = providers.Provider("msplora", lambda: built["reference"].forward() * 1.01, [], [])
    assert "msplora differs" in providers.check_agreement({"reference": built["reference"], "msplora": broken}, case)


def test_cpu_preset_contains_the_core_target_case():
    args = run.build_parser().parse_args(["--preset", "cpu", "--device", "cpu"])
    cases, _, dtype = run.plan(args, torch.device("cpu"))
    core = [(c.m, c.k, c.n, c.ranks, c.dropout) for c in cases if (c.m, c.k, c.n) == (2048, 1024, 1024)]
    assert dtype == "fp32"
    assert sorted(core) == [(2048, 1024, 1024, (8, 4, 2), 0.0), (2048, 1024, 1024, (8, 4, 2), 0.05)]


def test_llama7b_preset_covers_the_issue_grid():
    args = run.build_parser().parse_args(["--preset", "llama7b"])
    cases, _, _ = run.plan(args, torch.device("cpu"))
    assert len(cases) == 2 * 3 * 2 * 2
    assert {(c.k, c.n) for c in cases} == {(4096, 4096), (4096, 11008), (11008, 4096)}
    assert {c.ranks for c in cases} == {(8, 4, 2), (64, 32, 16)}


def test_parameter_table_matches_hand_counts():
    rows = param_table.parameter_rows()
    roberta_qv = next(r for r in rows if r["model"] == "RoBERTa-base" and r["targets"] == ["query", "value"])
    # 12 layers x 2 sites, each 768 -> 768: LoRA 24 * 8 * (768 + 768); MSPLoRA per site 8 + 3 * 4 + 12 * 2 ranks
    assert roberta_qv["lora"] == 24 * 8 * 1536
    assert roberta_qv["msplora_per_scale"] == {"global": 2 * 8 * 1536, "mid": 2 * 3 * 4 * 1536, "layer": 24 * 2 * 1536}
    llama_qv = next(r for r in rows if r["model"] == "LLaMA-2-7B" and r["targets"] == ["q_proj", "v_proj"])
    assert llama_qv["lora"] == 64 * 8 * 8192 and llama_qv["msplora"] == 2 * (8 + 12 + 64) * 8192
    table = param_table.parameter_table_markdown(rows)
    assert "| RoBERTa-base | query, value | 24 | 0.295M |" in table


@pytest.mark.parametrize("flag, value, message", [
    ("--shape", "64,32", "three non-negative integers"),
    ("--shape", "0,32,32", "must be >= 1"),
    ("--ranks", "0,0,0", "at least one scale"),
    ("--dropout", "1.5", "probability"),
    ("--providers", "bare,cublas", "subset of"),
])
def test_bad_arguments_are_named(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        run.build_parser().parse_args([flag, value])
    assert message in capsys.readouterr().err


def test_runs_as_a_module_from_another_folder(tmp_path):
    done = subprocess.run([sys.executable, "-m", "msplora_benchmarks.run", "--param-table"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "LLaMA-2-7B" in done.stdout and "RoBERTa-base" in done.stdout
    assert not os.listdir(tmp_path)  # the table alone runs no timing and writes nothing
    # installed as msplora_benchmarks: no top-level "benchmarks" package claimed in site-packages
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('benchmarks'))"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert probe.stdout.strip() == "None", probe.stdout


def test_an_interrupted_run_writes_what_it_measured(tmp_path, monkeypatch):
    calls = []

    def fake_case(case, names, modes, timer):
        if calls:
            raise KeyboardInterrupt  # what SIGTERM from a time limit turns into
        calls.append(case)
        row = {"shape": [case.m, case.k, case.n], "ranks": list(case.ranks), "dropout": case.dropout, "mode": "fwd",
               "provider": "bare", "median_ms": 1.0, "q20_ms": 1.0, "q80_ms": 1.0, "peak_mem_mb": None,
               "saved_mb": 0.0, "samples": 1, "min_ms": 1.0}
        return [row], None

    monkeypatch.setattr(run, "run_case", fake_case)
    args = run.build_parser().parse_args(["--shape", "8,8,8", "--dropout", "0", "--dropout", "0.1", "--device", "cpu",
                                          "--providers", "bare", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as stopped:
        run.run_benchmarks(args)
    assert stopped.value.code == 130
    stored = json.load(open(next(tmp_path.glob("*.json"))))
    assert len(stored["rows"]) == 1
    assert "interrupted after 1 of 2 cases" in next(tmp_path.glob("*.md")).read_text()
