"""Smoke test of the main job (``python -m msplora.demo``) at tiny settings on the random tiny Llama: both runs
train, the table and files appear, the parameter counts are the hand-computed ones, the held-out numbers of the
table and of the curve are the same measurement, each saved adapter reloads exactly, and no pickle is written.
One more test runs a step of the real SmolLM2 when its converted copy is cached."""
import json
import os
import time

import pytest
import torch

from msplora import assets, demo


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    args = demo.build_parser().parse_args([
        "--steps", "3", "--model", "tiny", "--targets", "q_proj,v_proj", "--ranks", "8,4,2", "--device", "cpu",
        "--batch-size", "2", "--seq-len", "32", "--eval-windows", "4", "--out", str(out),
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
    assert set(os.listdir(out / "msplora_adapter")) == {"adapter_config.json", "adapter_model.safetensors"}
    assert not any(f.endswith((".pt", ".pth", ".bin", ".pkl")) for f in os.listdir(out / "lora_adapter"))  # no pickle
    with open(out / "results.json") as f:
        stored = json.load(f)
    assert [r["method"] for r in stored["results"]] == ["lora", "msplora"]
    assert stored["device"] == "cpu" and stored["commit"] and stored["date"]
    assert "| MSPLoRA 8/4/2 " in stored["table"] and "| LoRA r=8 (peft) " in stored["table"]
    assert "| base model, before training " in stored["table"] and "nats per byte" in stored["table"]
    assert stored["model"] == "tiny" and stored["settings"]["eval_windows"] == 4


def test_both_runs_use_the_same_settings_and_report_finite_numbers(tiny_demo):
    summary, _ = tiny_demo
    for result in summary["results"]:
        assert len(result["losses"]) == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
        assert result["evals"][0][0] == 0 and result["evals"][-1][0] == 3
        assert 0 < result["held_out_loss"] < 10 and result["step_ms"] > 0
        assert result["peak_mem_mb"] is None or result["peak_mem_mb"] >= 0
        # the table's held-out loss is the curve's last point, and the base model's is its first
        assert result["held_out_loss"] == result["evals"][-1][1]
        assert result["base_held_out_loss"] == result["evals"][0][1]
    lora, msp = summary["results"]
    assert lora["evals"][0][1] == pytest.approx(msp["evals"][0][1])  # same base model, same held-out batches


def test_the_held_out_set_is_the_first_windows_of_the_last_tenth():
    _, held_out = demo.split_tokens(demo.encode(demo.load_text()))
    batches = demo.fixed_batches(held_out, 2, 32, limit=4)
    assert [b.shape for b in batches] == [(2, 33), (2, 33)]
    assert torch.equal(batches[0][0], held_out[:33]) and torch.equal(batches[1][1], held_out[96:129])
    assert len(demo.held_out_windows(held_out, 32)) == (len(held_out) - 33) // 32 + 1


def test_each_model_has_its_own_defaults_and_flags_override_them():
    pretrained = demo.resolve_settings(demo.build_parser().parse_args([]))
    assert pretrained["targets"] == ["q_proj", "v_proj"] and pretrained["eval_windows"] == 16
    assert pretrained["threads"] == 1 and pretrained["eval_every"] == pretrained["steps"] // 4
    tiny = demo.resolve_settings(demo.build_parser().parse_args(["--model-size", "tiny", "--lr", "0.5",
                                                                  "--eval-windows", "0"]))
    assert tiny["targets"] == list(demo.ALL_PROJECTIONS) and tiny["lr"] == 0.5 and tiny["eval_windows"] is None
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        demo.resolve_settings(demo.build_parser().parse_args(["--steps", "0"]))


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
    for flag in ("--steps", "--model", "--targets", "--ranks", "--device", "--out", "--eval-windows"):
        assert flag in text


@pytest.mark.parametrize("flag, value, message", [
    ("--ranks", "8,4", "three integers"),
    ("--ranks", "0,4,2", "g >= 1"),
    ("--model", "huge", "invalid choice"),
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


@pytest.mark.skipif(assets.smollm2_converted() is None, reason="SmolLM2's converted copy is not cached (python -m msplora.demo converts it once)")
def test_real_smollm2_trains_a_step_and_its_adapter_reloads(tmp_path):
    import msplora

    spec = demo.RunSpec(method="msplora", ranks=(8, 4, 2), targets=["q_proj", "v_proj"], steps=1, model="smollm2",
                        device="cpu", out=str(tmp_path))
    model = demo.add_adapter(demo.build_base_model("smollm2", 16, 0, "cpu"), spec)
    counts = msplora.trainable_parameters(model)  # 30 layers, 3 mid groups; q 576 -> 576, v 576 -> 192
    assert (counts["global"], counts["mid"], counts["layer"]) == (8 * 1920, 3 * 4 * 1920, 30 * 2 * 1920)
    tokens = demo.tokenize("In the beginning God created the heaven and the earth.", "smollm2")
    batch = tokens[None, :12]
    model.train()
    demo._lm_loss(model, batch).backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=batch[:, :-1]).logits
    msplora.save_adapter(model, spec.adapter_dir)
    reload = demo.reload_check(spec, batch[:, :-1], trained)
    assert reload["max_abs_diff_to_trained"] <= 1e-5 and reload["max_abs_diff_to_base"] > 1e-4


def test_a_failing_run_breaks_the_lockstep_so_the_other_run_does_not_wait(monkeypatch, tmp_path):
    """Runs that go at once start each step together (a barrier); a run that fails aborts that barrier, so the
    run still waiting there stops with an error instead of hanging until the timeout."""
    import threading

    barrier = threading.Barrier(2)
    monkeypatch.setattr(demo, "_LOCKSTEP", [barrier])
    spec = demo.RunSpec(method="msplora", ranks=(8, 4, 2), targets=["q_proj"], steps=1, model="no-such-model",
                        device="cpu", out=str(tmp_path))
    with pytest.raises(Exception):
        demo.train_one(spec)
    assert barrier.broken
    with pytest.raises(threading.BrokenBarrierError):
        demo._wait_for_the_other_runs()


def test_each_training_step_waits_at_the_lockstep_barrier(monkeypatch, tmp_path):
    """Every training step (not the evaluations) starts with one wait at the barrier shared by the runs."""
    waits = []

    class Counting:
        def wait(self, timeout):
            waits.append(timeout)

    monkeypatch.setattr(demo, "_LOCKSTEP", [Counting()])
    spec = demo.RunSpec(method="msplora", ranks=(8, 4, 2), targets=["q_proj", "v_proj"], steps=2, model="tiny",
                        device="cpu", out=str(tmp_path), batch_size=2, seq_len=32, eval_every=1, eval_windows=2)
    result = demo.train_one(spec)
    assert len(result["losses"]) == 2 and waits == [None, demo.LOCKSTEP_TIMEOUT_S]  # no limit before step 1


def _killed_or_waiting(spec):
    """A stand-in for ``train_one`` in a spawned process: the LoRA run dies without a Python exception (as
    if killed by the OOM killer), the MSPLoRA run waits at the lockstep barrier for its next step."""
    if spec.method == "lora":
        os._exit(137)
    demo.LOCKSTEP_TIMEOUT_S = 120.0
    time.sleep(1.0)
    demo._wait_for_the_other_runs()


def test_a_killed_run_releases_the_other_run_at_once(tmp_path):
    """The parent breaks the barrier when a run's process dies, so the run still waiting stops within
    seconds instead of after the barrier's timeout."""
    from concurrent.futures.process import BrokenProcessPool

    specs = [demo.RunSpec(method=m, ranks=(8, 4, 2), targets=["q_proj"], steps=1, model="tiny", device="cpu",
                          out=str(tmp_path)) for m in demo.METHODS]
    started = time.monotonic()
    with pytest.raises(BrokenProcessPool):
        demo.run_in_fresh_processes(specs, jobs=2, target=_killed_or_waiting)
    assert time.monotonic() - started < 60  # not the 120 s of the waiting run's barrier timeout
