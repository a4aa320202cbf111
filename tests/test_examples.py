"""The examples run offline end to end (``--smoke``: tiny random models, generated data, the real code path):
the Trainer fine-tune with staged training, checkpoints, resume and PEFT export; the GLUE comparison with
its table and exact trainable-parameter counts, and its real-data path with stand-ins for ``datasets`` and the
Hub; and the torchrun launcher on 2 CPU processes."""
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import msplora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


pytestmark = pytest.mark.usefixtures("one_thread")


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def trainer_state(checkpoint):
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        return json.load(f)


def test_finetune_trainer_smoke_trains_resumes_and_exports(tmp_path):
    finetune = load_example("finetune_trainer")
    common = ["--smoke", "--output", str(tmp_path), "--block-size", "48", "--save-steps", "2", "--staged",
              "--lr", "1e-2"]
    first = finetune.main(common + ["--max-steps", "4", "--export-peft"])
    assert math.isfinite(first["eval_loss"])
    assert trainer_state(tmp_path / "checkpoint-4")["global_step"] == 4
    assert not (tmp_path / "checkpoint-4" / "model.safetensors").exists()  # adapter-only checkpoints

    # The saved adapter and its PEFT export both reproduce the trained model's outputs on a fresh base model.
    peft = pytest.importorskip("peft")
    args = finetune.parse_args(common + ["--max-steps", "4"])
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with_adapter = msplora.load_adapter(finetune.load_model_and_tokenizer(args)[0], str(tmp_path / "adapter")).eval()
    exported = peft.PeftModel.from_pretrained(finetune.load_model_and_tokenizer(args)[0],
                                              str(tmp_path / "peft-lora")).eval()
    with torch.no_grad():
        expected = with_adapter(input_ids=ids).logits
        assert (expected - finetune.load_model_and_tokenizer(args)[0](input_ids=ids).logits).abs().max() > 1e-3
        torch.testing.assert_close(exported(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)

    resumed = finetune.main(common + ["--max-steps", "6", "--resume"])
    assert trainer_state(tmp_path / "checkpoint-6")["global_step"] == 6
    assert math.isfinite(resumed["eval_loss"])


def test_smoke_runs_need_no_output_folder_and_never_write_into_the_checkout(monkeypatch):
    finetune, glue = load_example("finetune_trainer"), load_example("glue")
    for args in (finetune.parse_args(["--smoke"]), glue.parse_args(["--smoke"])):
        assert os.path.isabs(args.output) and not os.path.abspath(args.output).startswith(ROOT)
        os.rmdir(args.output)
    assert glue.parse_args([]).output == os.path.join("runs", "glue")
    with pytest.raises(SystemExit):
        finetune.parse_args(["--model", "m", "--text-file", "t"])  # a real run names its output
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        finetune.parse_args(["--smoke"])  # every torchrun process needs the same folder


def test_glue_smoke_compares_lora_and_msplora_with_exact_parameter_counts(tmp_path, capsys):
    glue = load_example("glue")
    rows = glue.main(["--smoke", "--tasks", "rte", "stsb", "--output", str(tmp_path)])

    hidden, layers, sites = 32, 4, 2  # the smoke RoBERTa; sites: query and value
    lora = layers * sites * glue.LORA_RANK * 2 * hidden
    r_g, r_m, r_l = glue.MSPLORA_RANKS
    groups = min(glue.MID_GROUPS, layers)
    msp = sites * (r_g + groups * r_m + layers * r_l) * 2 * hidden
    assert [(r["task"], r["method"]) for r in rows] == [("rte", "lora"), ("rte", "msplora"),
                                                        ("stsb", "lora"), ("stsb", "msplora")]
    for row in rows:
        assert row["adapter_params"] == (lora if row["method"] == "lora" else msp)
        assert row["trainable_params"] > row["adapter_params"]  # the classifier head trains too
        assert row["metric"] == ("pearson" if row["task"] == "stsb" else "accuracy")
        assert -1.0 <= row["score"] <= 1.0
        assert os.path.isdir(row["best_checkpoint"])  # load_best_model_at_end found its checkpoint
    msplora_best = [r["best_checkpoint"] for r in rows if r["method"] == "msplora"]
    assert all(os.path.isfile(os.path.join(d, "adapter_model.safetensors")) for d in msplora_best)

    table = capsys.readouterr().out
    assert "| rte | msplora | 3,584 |" in table and f"| stsb | lora | {lora:,} |" in table
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(rows))


def test_glue_smoke_with_staged_msplora_on_cola(tmp_path):
    glue = load_example("glue")
    (row,) = glue.main(["--smoke", "--tasks", "cola", "--methods", "msplora", "--staged", "--output", str(tmp_path)])
    assert row["metric"] == "matthews_correlation" and -1.0 <= row["score"] <= 1.0


@pytest.mark.parametrize(
    "metric,predictions,labels,expected",
    [
        ("accuracy", [1, 0, 1, 1], [1, 1, 1, 0], 0.5),
        ("matthews_correlation", [1, 0, 1, 0], [1, 0, 1, 0], 1.0),
        ("matthews_correlation", [1, 1, 0, 0], [1, 0, 1, 0], 0.0),
        ("matthews_correlation", [1, 1, 1, 0], [1, 1, 0, 0], 1 / math.sqrt(3)),
        ("matthews_correlation", [1, 1, 1, 1], [1, 0, 1, 0], 0.0),
        ("pearson", [0.1, 0.2, 0.3], [1.0, 2.0, 3.0], 1.0),
        ("pearson", [0.3, 0.2, 0.1], [1.0, 2.0, 3.0], -1.0),
    ],
)
def test_glue_metrics(metric, predictions, labels, expected):
    import numpy as np

    glue = load_example("glue")
    assert glue.METRICS[metric](np.array(predictions), np.array(labels)) == pytest.approx(expected)


def kill_processes_mentioning(text):
    """SIGKILL every process whose command line contains ``text`` (a path unique to one test)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text in f.read().decode(errors="replace"):
                    os.kill(int(entry), signal.SIGKILL)
        except OSError:  # the process ended meanwhile
            continue


@pytest.mark.skipif(shutil.which("torchrun") is None or not os.path.isdir("/proc"),
                    reason="needs torchrun on PATH and /proc (Linux)")
def test_ddp_torchrun_script_runs_two_cpu_processes(tmp_path):
    script = os.path.join(EXAMPLES, "ddp_torchrun.sh")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    usage = subprocess.run(["bash", script], capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and "usage:" in usage.stderr

    output = tmp_path / "run"
    command = ["bash", script, "2", "--smoke", "--staged", "--max-steps", "3", "--save-steps", "3", "--block-size",
               "48", "--output", str(output)]
    # Output to files, not pipes: after a hang no orphaned worker keeps a pipe open.
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        launcher = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env, start_new_session=True)
        try:
            launcher.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            kill_processes_mentioning(str(output))  # torchrun's workers run in sessions of their own
            launcher.wait()
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert launcher.returncode == 0, f"exit {launcher.returncode}:\n{stdout[-3000:]}{stderr[-3000:]}"
    assert stdout.count("train loss") == 1  # printed by rank 0 only
    assert (output / "adapter" / "adapter_model.safetensors").is_file()


class _LazyColumn:
    """Like a ``datasets`` 4 column: iterable, but not a list."""

    def __init__(self, values):
        self._values = values

    def __iter__(self):
        return iter(self._values)


class _FakeSplit:
    def __init__(self, columns):
        self.columns = columns

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def select(self, indices):
        indices = list(indices)
        return _FakeSplit({k: [v[i] for i in indices] for k, v in self.columns.items()})

    def __getitem__(self, key):
        return _LazyColumn(self.columns[key])


def test_glue_real_data_path_with_a_stand_in_for_datasets(tmp_path, monkeypatch):
    """The non-smoke path (GLUE rows -> tokenizer pairs -> Trainer), with ``datasets`` and the Hub replaced by
    local stand-ins: a word-level tokenizer and two MRPC-like splits."""
    import types

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    glue = load_example("glue")
    words = "the cat dog sat ran on a mat log fast slow".split()
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")

    g = torch.Generator().manual_seed(0)

    def sentence():
        length = int(torch.randint(3, 9, (), generator=g))
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (length,), generator=g))

    def split(n):
        return _FakeSplit({"sentence1": [sentence() for _ in range(n)], "sentence2": [sentence() for _ in range(n)],
                           "label": [int(i) for i in torch.randint(0, 2, (n,), generator=g)]})

    requested = []

    def load_dataset(path, name):
        requested.append((path, name))
        return {"train": split(40), "validation": split(12)}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    smoke_model = glue.load_model_and_tokenizer
    monkeypatch.setattr(glue, "load_model_and_tokenizer",
                        lambda args, task: (smoke_model(glue.parse_args(["--smoke"]), task)[0], tokenizer))

    rows = glue.main(["--tasks", "mrpc", "--methods", "msplora", "--epochs", "1", "--max-train-samples", "24",
                      "--output", str(tmp_path)])
    assert requested == [("nyu-mll/glue", "mrpc")]
    assert rows[0]["task"] == "mrpc" and rows[0]["metric"] == "accuracy" and 0.0 <= rows[0]["score"] <= 1.0
    steps = math.ceil(24 / glue.TASKS["mrpc"].batch_size)  # one epoch of 24 examples at the paper's batch size
    checkpoint = tmp_path / "mrpc" / "msplora" / f"checkpoint-{steps}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == steps


def test_the_readme_offline_example_runs_as_written():
    import re

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    example = [b for b in blocks if "offline" in b or "LlamaConfig(vocab_size=256" in b]
    assert len(example) == 1
    namespace = {}
    exec(compile(example[0], "README.md", "exec"), namespace)
    fresh = namespace["fresh"]
    assert not fresh.training and not any(p.requires_grad for p in fresh.parameters())
    assert len(list(namespace["msplora"].msplora_layers(fresh))) == 12
