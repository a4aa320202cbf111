"""Smoke test of the main job (``python -m msplora.demo``) at tiny settings: both runs train, the table and
files appear, the parameter counts are the hand-computed ones, and each saved adapter reloads exactly."""
import json
import os

import pytest
import torch

from msplora import demo


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    args = demo.build_parser().parse_args([
        "--steps", "3", "--model-size", "tiny", "--targets", "q_proj,v_proj", "--ranks", "8,4,2", "--device", "cpu",
        "--batch-size", "2", "--seq-len", "32", "--out", str(out),
    ])
    return demo.run_demo(args), out


def test_shipped_text_is_real_english_and_split_without_overlap():
    text = demo.load_text()
    assert 150_000 < len(text) < 400_000 and "In the beginning God created the heaven and the earth." in text
    tokens = demo.encode(text)
    train, held_out = demo.split_tokens(tokens)
    assert int(tokens.max()) < demo.VOCAB_SIZE
    assert len(train) + len(held_out) == len(tokens) and abs(len(held_out) / len(tokens) - 0.1) < 0.01


def test_writes_table_plot_results_and_both_adapters(tiny_demo):
    summary, out = tiny_demo
    files = set(os.listdir(out))
    assert {"loss_curve.png", "results.json", "results.md", "lora_adapter", "msplora_adapter"} <= files
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out / "msplora_adapter"))
    with open(out / "results.json") as f:
        stored = json.load(f)
    assert [r["method"] for r in stored["results"]] == ["lora", "msplora"]
    assert stored["device"] == "cpu" and stored["commit"] and stored["date"]
    assert "| MSPLoRA 8/4/2 " in stored["table"] and "| LoRA r=8 (peft) " in stored["table"]


def test_both_runs_use_the_same_settings_and_report_finite_numbers(tiny_demo):
    summary, _ = tiny_demo
    for result in summary["results"]:
        assert len(result["losses"]) == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
        assert result["evals"][0][0] == 0 and result["evals"][-1][0] == 3
        assert 0 < result["held_out_loss"] < 10 and result["step_ms"] > 0
        assert result["peak_mem_mb"] is None or result["peak_mem_mb"] >= 0
    lora, msp = summary["results"]
    assert lora["evals"][0][1] == pytest.approx(msp["evals"][0][1])  # same base model, same held-out batches


def test_parameter_counts_per_scale(tiny_demo):
    lora, msp = (r["params"] for r in tiny_demo[0]["results"])
    # tiny: 4 layers, hidden 128; q_proj 128 -> 128, v_proj 128 -> 64 (2 KV heads of 32); 3 mid groups
    q, v = 128 + 128, 128 + 64
    assert lora == {"global": None, "mid": None, "layer": 4 * 8 * (q + v), "total": 4 * 8 * (q + v)}
    assert msp == {"global": 8 * (q + v), "mid": 3 * 4 * (q + v), "layer": 4 * 2 * (q + v),
                   "total": (8 + 12 + 8) * (q + v)}


def test_reloaded_adapters_reproduce_the_trained_outputs(tiny_demo):
    for result in tiny_demo[0]["results"]:
        reload = result["reload"]
        assert reload["ok"] and reload["max_abs_diff_to_trained"] <= 1e-5
        assert reload["max_abs_diff_to_base"] > 1e-3  # the adapter changed the model, so the check means something


def test_help_explains_the_flags(capsys):
    with pytest.raises(SystemExit):
        demo.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--steps", "--model-size", "--targets", "--ranks", "--device", "--out"):
        assert flag in text


@pytest.mark.parametrize("flag, value, message", [
    ("--ranks", "8,4", "three integers"),
    ("--ranks", "0,4,2", "g >= 1"),
    ("--model-size", "huge", "invalid choice"),
    ("--targets", ",", "at least one module"),
])
def test_bad_flags_are_named(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        demo.build_parser().parse_args([flag, value])
    assert message in capsys.readouterr().err


def test_unavailable_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit, match="CUDA is not available"):
        demo.resolve_device("cuda")
