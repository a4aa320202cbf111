"""Smoke test of the end-to-end training-step benchmark (``python -m benchmarks.run --preset e2e-cpu``) at the
``e2e-tiny`` size: the files it writes, the ratios and the saved-activation accounting."""
import json

import pytest
import torch

from benchmarks import e2e, run


@pytest.fixture(scope="module")
def tiny_e2e(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run.main(["--preset", "e2e-tiny", "--device", "cpu", "--repeats", "2", "--warmup", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out


def test_writes_json_markdown_and_plot(tiny_e2e):
    files = sorted(p.name for p in tiny_e2e.iterdir())
    assert {f.rsplit(".", 1)[1] for f in files} == {"json", "md", "png"}
    assert all("-e2e-cpu-1threads." in f for f in files)
    stored = json.loads(next(tiny_e2e.glob("*.json")).read_text())
    assert {"device", "commit", "date", "setting", "load_average_at_start", "load_average_rounds", "rows"} <= set(stored)
    assert len(stored["load_average_rounds"]) in (0, 2)  # one sample per round where the OS reports it
    assert "| msplora | 0.05 |" in next(tiny_e2e.glob("*.md")).read_text()


def test_rows_ratios_and_saved_activations(tiny_e2e):
    rows = json.loads(next(tiny_e2e.glob("*.json")).read_text())["rows"]
    assert {(r["method"], r["dropout"]) for r in rows} == {(m, p) for m in e2e.METHODS for p in (0.0, 0.05)}
    by = {(r["method"], r["dropout"]): r for r in rows}
    for row in rows:
        assert row["samples"] == 2 and row["min_s"] <= row["median_s"]
        assert row["vs_peft"] == pytest.approx(row["median_s"] / by[("peft", row["dropout"])]["median_s"])
        assert row["tokens_per_s"] == pytest.approx(2 * 16 / row["median_s"])
        assert (row["vs_own_p0"] is None) == (row["dropout"] == 0)
        assert row["saved_mb"] > 0 and row["peak_mb"] is None  # no per-step peak on the CPU
    # the reference keeps one dropped copy of x per branch; msplora none
    assert by[("reference", 0.05)]["saved_mb"] > by[("msplora", 0.05)]["saved_mb"]


def test_e2e_preset_rejects_several_ranks():
    with pytest.raises(SystemExit, match="one --ranks"):
        run.main(["--preset", "e2e-tiny", "--ranks", "4,2,1", "--ranks", "2,2,2"])
