"""The accuracy benchmark (``python -m benchmarks.accuracy``): the sentiment file parser (both formats, labels,
clear errors), the seeded split, the targets and head each method trains, its ``--quick`` path end to end on a
tiny random BERT and a small file made here, and one real-model smoke test when the MiniLM asset is present."""
import json
import os

import pytest
import torch

from benchmarks import accuracy
from msplora import assets

GROUND_TRUTH = (
    "1\t2.26666666667\tThe Rock is destined to be the 21st Century's new ''Conan''.\r\n"
    "2\t-0.6\tEffective but too tepid biopic\r\n"
    "3\t0\tA film.\r\n"
    "4\t3.1\tA masterpiece, moving and funny.\r\n"
    "5\t-2.5\tDull, tedious and far too long.\r\n"
)


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return str(path)


# ------------------------------------------------------------------------------------------ the parser
def test_ground_truth_format_crlf_labels_and_zeros_dropped(tmp_path):
    examples = accuracy.read_sentiment_file(_write(tmp_path / "gt.txt", GROUND_TRUTH))
    assert [(e.text, e.label) for e in examples] == [
        ("The Rock is destined to be the 21st Century's new ''Conan''.", 1), ("Effective but too tepid biopic", 0),
        ("A masterpiece, moving and funny.", 1), ("Dull, tedious and far too long.", 0)]


def test_text_label_format_with_a_byte_order_mark_and_lf(tmp_path):
    text = "\ufeffgood film\t1\nbad film\t0\n\nfine work\t1\nawful\t0\n"
    examples = accuracy.read_sentiment_file(_write(tmp_path / "tl.tsv", text))
    assert [(e.text, e.label) for e in examples] == [("good film", 1), ("bad film", 0), ("fine work", 1), ("awful", 0)]


@pytest.mark.parametrize("text, message", [
    ("a\t1\nb\t0\nc\t1\td\n", r"tl.txt:3: 3 tab-separated columns, the file's first line has 2"),
    ("just text\n", r"tl.txt:1: 1 tab-separated columns; expected"),
    ("1\tgood\tx\n", r"tl.txt:1: rating 'good' is not a number"),
    ("1\tnan\tx\n", r"tl.txt:1: rating 'nan' is not finite"),
    ("a\t1\nb\tpositive\n", r"tl.txt:2: label 'positive' is not 0 or 1"),
    ("a\t1\nb\t1\nc\t0\n", r"1 negative examples; need at least 2 of each"),
    ("", r"0 positive and 0 negative"),
])
def test_a_corrupt_file_names_the_line(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        accuracy.read_sentiment_file(_write(tmp_path / "tl.txt", text))


def test_non_utf8_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"not UTF-8 text \(line 2"):
        accuracy.read_sentiment_file(_write(tmp_path / "latin1.txt", "a\t1\nb\u00e9\t0\n", encoding="latin-1"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        accuracy.read_sentiment_file(str(tmp_path / "nowhere.txt"))


# ------------------------------------------------------------------------------------------- the split
def _examples(n):
    return [accuracy.Example(f"sentence {i}", i % 2) for i in range(n)]


def test_the_split_is_seeded_disjoint_and_sized():
    examples = _examples(100)
    a = accuracy.split_examples(examples, dev_size=10, test_size=20, train_size=None, seed=0)
    b = accuracy.split_examples(examples, dev_size=10, test_size=20, train_size=None, seed=0)
    c = accuracy.split_examples(examples, dev_size=10, test_size=20, train_size=None, seed=1)
    assert a == b and a["test"] != c["test"]
    assert [len(a[k]) for k in ("train", "dev", "test")] == [70, 10, 20]
    texts = [{e.text for e in a[k]} for k in ("train", "dev", "test")]
    assert sum(map(len, texts)) == 100 and len(set.union(*texts)) == 100
    # a smaller training set is a prefix of the full one, and the dev and test sets do not move
    small = accuracy.split_examples(examples, dev_size=10, test_size=20, train_size=30, seed=0)
    assert small["train"] == a["train"][:30] and small["test"] == a["test"] and small["dev"] == a["dev"]
    # the order is Python's seeded shuffle: the same on every machine
    assert [e.text for e in a["test"][:3]] == [f"sentence {i}" for i in (23, 8, 11)]


def test_a_split_that_cannot_fit_is_a_clear_error():
    with pytest.raises(ValueError, match="10 examples cannot give a dev set of 5, a test set of 5"):
        accuracy.split_examples(_examples(10), 5, 5, None, 0)


def test_stages_cover_the_steps_in_thirds_in_order():
    assert [accuracy._stage_of(s, 9) for s in range(9)] == ["global"] * 3 + ["mid"] * 3 + ["layer"] * 3
    assert [accuracy._stage_of(s, 4) for s in range(4)] == ["global", "global", "mid", "layer"]


# ------------------------------------------------------------------------------ a tiny model and file
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 4-layer BERT (hidden 32) with a word-level tokenizer, saved like a downloaded model folder."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    words = "good bad film fine awful great dull moving tedious funny a the is and".split()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    good, bad = "good great fine moving funny".split(), "bad awful dull tedious".split()
    lines = []
    for i in range(80):
        word = (good if i % 2 else bad)[i % 4]
        lines.append(f"{i}\t{1.5 if i % 2 else -1.5}\tthe film is {word} and {word}")
    path = tmp_path_factory.mktemp("data") / "reviews.txt"
    path.write_text("\r\n".join(lines))
    return str(path)


def test_targets_and_head_of_each_method(tiny_bert):
    model = accuracy.load_encoder(tiny_bert, seed=0)
    assert accuracy.head_modules(model) == ["bert.pooler", "classifier"]
    qv = accuracy.target_modules(model, "qv")
    assert qv == [f"bert.encoder.layer.{i}.attention.self.{n}" for i in range(4) for n in ("query", "value")]
    assert len(accuracy.target_modules(model, "all")) == 4 * 6  # q, k, v, attention out, intermediate, output


@pytest.fixture(scope="module")
def quick_run(tiny_bert, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    torch.set_num_threads(1)
    args = accuracy.build_parser().parse_args(
        ["--quick", "--data", tiny_data, "--model", tiny_bert, "--out", str(out), "--threads", "1", "--no-progress"])
    return accuracy.run(args), out


def test_quick_run_writes_table_json_and_plot_for_every_method(quick_run):
    result, out = quick_run
    assert {"accuracy.json", "accuracy.png"} <= set(os.listdir(out))
    with open(out / "accuracy.json") as f:
        stored = json.load(f)
    assert [r["method"] for r in stored["rows"]] == list(accuracy.METHODS)
    assert stored["quick"] and stored["complete"] and stored["sizes"] == {"train": 16, "dev": 16, "test": 32}
    assert stored["machine"]["loadavg_start"] is None or len(stored["machine"]["loadavg_start"]) == 3
    for label in accuracy.LABELS.values():
        assert f"| {label} |" in stored["table"]
    for run in stored["runs"]:
        assert 0.0 <= run["test"] <= 1.0 and len(run["dev"]) == 2 and run["best_dev"] == max(run["dev"])
        assert run["train_s"] > 0 and torch.isfinite(torch.tensor(run["final_loss"]))


def test_quick_run_parameter_counts_per_scale(quick_run):
    rows = {r["method"]: r["params"] for r in quick_run[0]["rows"]}
    d = 32 + 32  # every targeted linear is 32 -> 32 except intermediate (32 -> 48) and output (48 -> 32)
    head = (32 * 32 + 32) + (32 * 2 + 2)  # pooler.dense and classifier, trained in every method
    assert {r["head"] for r in rows.values()} == {head}
    assert rows["lora-qv"] == {"global": None, "mid": None, "layer": 4 * 2 * 8 * d, "adapter": 4 * 2 * 8 * d,
                               "head": head, "total": 4 * 2 * 8 * d + head}
    # 4 layers, 3 mid groups (layers 0,0,1,2): per site one global r=8, three mid r=4, four layer r=2
    assert rows["msplora-qv"] == {"global": 2 * 8 * d, "mid": 2 * 3 * 4 * d, "layer": 2 * 4 * 2 * d,
                                  "adapter": 2 * 28 * d, "head": head, "total": 2 * 28 * d + head}
    assert rows["msplora-qv-staged"] == rows["msplora-qv"]
    all_d = 4 * d + (32 + 48) * 2  # per layer: q, k, v, attention.output (each 64) + intermediate + output (each 80)
    assert rows["lora-all"]["adapter"] == 4 * 8 * all_d and rows["msplora-all"]["adapter"] == 28 * all_d


def test_staged_training_trains_each_scale_in_its_stage(tiny_bert, tiny_data):
    """Staged: each step trains one scale, global for the first third of the steps, then mid, then layer."""
    import msplora

    examples = accuracy.read_sentiment_file(tiny_data)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    sets = {k: accuracy.Encoded(v, tok, 16) for k, v in accuracy.split_examples(examples, 8, 8, 48, 0).items()}
    seen = []
    real_set = msplora.set_trainable_scales

    def spy(model, scales):
        seen.append(sorted(scales))
        return real_set(model, scales)

    msplora.set_trainable_scales = spy
    try:
        accuracy.train_and_evaluate("msplora-qv-staged", 0, tiny_bert, sets,
                                    accuracy.Settings(epochs=1, batch_size=8), progress=False)
    finally:
        msplora.set_trainable_scales = real_set
    assert seen == [["global"], ["global"], ["mid"], ["mid"], ["layer"], ["layer"]]


def test_bad_flags_are_named(capsys):
    for flag, value, message in (("--seeds", "x", "--seeds takes"), ("--methods", "lora-qv,dora", "unknown methods")):
        with pytest.raises(SystemExit):
            accuracy.build_parser().parse_args([flag, value])
        assert message in capsys.readouterr().err
    assert accuracy.build_parser().parse_args(["--seeds", "2"]).seeds == [0, 1]
    assert accuracy.build_parser().parse_args(["--seeds", "4,7"]).seeds == [4, 7]


def test_a_missing_data_file_stops_with_its_name(tiny_bert, tmp_path):
    args = accuracy.build_parser().parse_args(["--quick", "--data", str(tmp_path / "none.txt"), "--model", tiny_bert,
                                               "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="none.txt does not exist"):
        accuracy.run(args)


# ---------------------------------------------------------------------------------- the real model
@pytest.mark.skipif(assets.find("minilm") is None or assets.find("movie_reviews") is None,
                    reason="the MiniLM and movie-review assets are not here (python -m msplora.assets fetch)")
def test_real_minilm_loads_trains_one_step_and_its_adapter_reloads(tmp_path):
    import msplora
    from transformers import AutoTokenizer

    model_dir, data = str(assets.find("minilm")), str(assets.find("movie_reviews"))
    examples = accuracy.read_sentiment_file(data)
    assert len(examples) == 10_568 and sum(e.label for e in examples) == 5_242  # 37 zero ratings dropped
    model = accuracy.add_adapter(accuracy.load_encoder(model_dir, 0), "msplora-qv", 0, (8, 4, 2), 0.05, 3)
    assert msplora.trainable_parameters(model)["adapter"] == 2 * (8 + 3 * 4 + 6 * 2) * (384 + 384)
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = accuracy.Encoded(examples[:4], tok, 32).batch(range(4))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model(**batch).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n or ".B" in n for n in changed) and any("classifier" in n for n in changed)
    model.eval()
    batch.pop("labels")
    with torch.no_grad():
        expected = model(**batch).logits
    msplora.save_adapter(model, str(tmp_path / "adapter"))
    fresh = accuracy.load_encoder(model_dir, 0)
    reloaded = msplora.load_adapter(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)
