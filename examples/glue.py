"""The paper's GLUE setting: RoBERTa-base, LoRA r=8 against MSPLoRA (ranks 8/4/2), with a results table.

Per task the settings of the paper's scripts (``/work/shared/paper-recipes.md``): targets query and value,
alpha 16 for every branch, dropout 0.05, 3 mid groups, weight decay 0.1, warmup ratio 0.06, evaluation and
saving every epoch, the best epoch by the task's metric, seed 42; epochs, batch size, maximum length and
learning rate per task (``TASKS``). The classifier head is trained in full with either adapter, as PEFT does
for sequence classification.

    pip install datasets            # the only extra the real run needs
    python examples/glue.py --tasks rte mrpc --output runs/glue

``--smoke`` runs offline through the same code path on a tiny random RoBERTa with synthetic token data
(CI uses it): it checks the plumbing, not the accuracy.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import msplora
from msplora import MSPLoraConfig, MSPLoraTrainer, StagedTrainingCallback


@dataclass(frozen=True)
class Task:
    text_keys: Tuple[str, ...]
    num_labels: int  # 1: regression (STS-B)
    epochs: int
    batch_size: int
    max_length: int
    learning_rate: float
    metric: str


TASKS: Dict[str, Task] = {
    "mrpc": Task(("sentence1", "sentence2"), 2, 30, 64, 256, 4e-4, "accuracy"),
    "qnli": Task(("question", "sentence"), 2, 25, 64, 256, 4e-4, "accuracy"),
    "rte": Task(("sentence1", "sentence2"), 2, 80, 64, 512, 4e-4, "accuracy"),
    "sst2": Task(("sentence",), 2, 60, 64, 256, 5e-4, "accuracy"),
    "stsb": Task(("sentence1", "sentence2"), 1, 40, 64, 256, 4e-4, "pearson"),
    "cola": Task(("sentence",), 2, 80, 64, 256, 4e-4, "matthews_correlation"),
}
METHODS = ("lora", "msplora")
TARGETS = {"qv": ["query", "value"],
           "all": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]}
LORA_RANK, MSPLORA_RANKS, ALPHA, DROPOUT, MID_GROUPS = 8, (8, 4, 2), 16.0, 0.05, 3
WEIGHT_DECAY, WARMUP_RATIO, SEED = 0.1, 0.06, 42
SMOKE = dict(vocab_size=64, train_size=48, eval_size=16, epochs=2, batch_size=8, max_length=24)


# ---------------------------------------------------------------------------------------------- metrics
def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float((predictions == labels).mean())


def matthews_correlation(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (multi-class form); 0 when either side is constant, as scikit-learn returns."""
    classes = np.union1d(predictions, labels)
    confusion = np.array([[np.sum((labels == t) & (predictions == p)) for p in classes] for t in classes], float)
    n, correct = confusion.sum(), np.trace(confusion)
    predicted, true = confusion.sum(0), confusion.sum(1)
    denominator = math.sqrt((n * n - predicted @ predicted) * (n * n - true @ true))
    return float((correct * n - predicted @ true) / denominator) if denominator else 0.0


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    if predictions.std() == 0 or labels.std() == 0:
        return 0.0
    return float(np.corrcoef(predictions, labels)[0, 1])


METRICS: Dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy, "matthews_correlation": matthews_correlation, "pearson": pearson}


def metric_function(task: Task):
    def compute(prediction) -> Dict[str, float]:
        logits, labels = prediction.predictions, prediction.label_ids
        predictions = logits.squeeze(-1) if task.num_labels == 1 else logits.argmax(-1)
        return {task.metric: METRICS[task.metric](predictions, labels)}

    return compute


# ------------------------------------------------------------------------------------------------- data
class PaddingCollator:
    """Pads ``input_ids`` (with the pad id) and ``attention_mask`` (with 0) to the longest example."""

    def __init__(self, pad_token_id: int, regression: bool) -> None:
        self.pad_token_id, self.regression = pad_token_id, regression

    def __call__(self, examples: List[dict]) -> Dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[i, : len(e["input_ids"])] = 1
        labels = torch.tensor([e["label"] for e in examples], dtype=torch.float if self.regression else torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def load_glue(name: str, task: Task, tokenizer, limit: Optional[int]) -> Tuple[list, list]:
    """GLUE train and validation splits, tokenized (needs the datasets package and the network or a cache)."""
    from datasets import load_dataset  # only the real run needs datasets

    splits = load_dataset("nyu-mll/glue", name)

    def encode(split) -> list:
        rows = split.select(range(min(limit, len(split)))) if limit else split
        texts = [list(rows[key]) for key in task.text_keys]  # datasets >= 4 returns lazy columns, not lists
        encoded = tokenizer(*texts, truncation=True, max_length=task.max_length)
        return [{"input_ids": ids, "label": label} for ids, label in zip(encoded["input_ids"], list(rows["label"]))]

    return encode(splits["train"]), encode(splits["validation"])


def synthetic_glue(task: Task, seed: int) -> Tuple[list, list]:
    """Token sequences of varying length whose label depends on their content (a learnable rule)."""
    g = torch.Generator().manual_seed(seed)
    vocab, half = SMOKE["vocab_size"], SMOKE["vocab_size"] // 2

    def example() -> dict:
        length = int(torch.randint(6, SMOKE["max_length"], (), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g)
        low = float((ids < half).float().mean())
        label = 5.0 * low if task.num_labels == 1 else int(low > 0.5)
        return {"input_ids": [0] + ids.tolist() + [2], "label": label}

    return ([example() for _ in range(SMOKE["train_size"])], [example() for _ in range(SMOKE["eval_size"])])


# ------------------------------------------------------------------------------------------------ model
def load_model_and_tokenizer(args: argparse.Namespace, task: Task):
    import transformers as tf

    if args.smoke:
        torch.manual_seed(SEED)
        config = tf.RobertaConfig(vocab_size=SMOKE["vocab_size"], hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=4, num_attention_heads=4,
                                  max_position_embeddings=SMOKE["max_length"] + 8, num_labels=task.num_labels,
                                  pad_token_id=1)
        return tf.RobertaForSequenceClassification(config), None
    model = tf.AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=task.num_labels)
    return model, tf.AutoTokenizer.from_pretrained(args.model)


def add_adapter(model: torch.nn.Module, method: str, targets: List[str]) -> Tuple[torch.nn.Module, Dict[str, int]]:
    """The model with its adapter, and its trainable parameter counts (``adapter``: A/B only; ``trainable``:
    with the classifier head)."""
    if method == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            task_type="SEQ_CLS", r=LORA_RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=targets,
            bias="none"))
        adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    else:
        msplora.apply_msplora(model, MSPLoraConfig(
            target_modules=targets, ranks=MSPLORA_RANKS, alphas=(ALPHA,) * 3, dropout=DROPOUT,
            num_mid_groups=MID_GROUPS, modules_to_save=["classifier"]))
        adapter = msplora.trainable_parameters(model)["adapter"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, {"adapter": adapter, "trainable": trainable}


# ---------------------------------------------------------------------------------------------- running
def run(name: str, method: str, args: argparse.Namespace) -> Dict[str, object]:
    import transformers as tf

    task = TASKS[name]
    if args.smoke:
        task = Task(task.text_keys, task.num_labels, SMOKE["epochs"], SMOKE["batch_size"], SMOKE["max_length"],
                    task.learning_rate, task.metric)
    if args.epochs:
        task = Task(*[args.epochs if f == "epochs" else getattr(task, f) for f in Task.__dataclass_fields__])
    tf.set_seed(SEED)
    model, tokenizer = load_model_and_tokenizer(args, task)
    model, counts = add_adapter(model, method, TARGETS[args.targets])
    train_set, eval_set = synthetic_glue(task, SEED) if args.smoke else load_glue(name, task, tokenizer,
                                                                                 args.max_train_samples)
    output_dir = os.path.join(args.output, name, method)
    training_args = tf.TrainingArguments(
        output_dir=output_dir, num_train_epochs=task.epochs, per_device_train_batch_size=task.batch_size,
        per_device_eval_batch_size=task.batch_size, learning_rate=task.learning_rate, weight_decay=WEIGHT_DECAY,
        warmup_steps=WARMUP_RATIO, eval_strategy="epoch", save_strategy="epoch", save_total_limit=1,
        load_best_model_at_end=True, metric_for_best_model=task.metric, greater_is_better=True, seed=SEED,
        report_to=[], disable_tqdm=True, logging_strategy="epoch", use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False)
    trainer_cls = MSPLoraTrainer if method == "msplora" else tf.Trainer
    callbacks = [StagedTrainingCallback()] if (args.staged and method == "msplora") else []
    pad = tokenizer.pad_token_id if tokenizer is not None else model.config.pad_token_id
    trainer = trainer_cls(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                          data_collator=PaddingCollator(pad, task.num_labels == 1),
                          compute_metrics=metric_function(task), callbacks=callbacks)
    trainer.train()
    best = trainer.evaluate()[f"eval_{task.metric}"]
    return {"task": name, "method": method, "adapter_params": counts["adapter"],
            "trainable_params": counts["trainable"], "metric": task.metric, "score": best,
            "best_checkpoint": trainer.state.best_model_checkpoint}


def format_table(rows: Sequence[Dict[str, object]]) -> str:
    lines = ["| task | method | adapter params | trainable params (with head) | metric | score |",
             "|---|---|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['method']} | {r['adapter_params']:,} | {r['trainable_params']:,} | "
                     f"{r['metric']} | {r['score']:.4f} |")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=list(TASKS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--model", default="FacebookAI/roberta-base")
    p.add_argument("--targets", choices=sorted(TARGETS), default="qv")
    p.add_argument("--output", help="where results.json/.md go (default runs/glue; with --smoke a temporary folder)")
    p.add_argument("--epochs", type=int, help="override the paper's epochs (quick trials)")
    p.add_argument("--max-train-samples", type=int, help="use the first N training examples (quick trials)")
    p.add_argument("--staged", action="store_true", help="MSPLoRA: train global, then mid, then layer scales")
    p.add_argument("--smoke", action="store_true", help="offline: tiny random RoBERTa and synthetic data")
    args = p.parse_args(argv)
    if args.output is None:
        args.output = tempfile.mkdtemp(prefix="msplora-glue-smoke-") if args.smoke else os.path.join("runs", "glue")
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    args = parse_args(argv)
    rows = [run(name, method, args) for name in args.tasks for method in args.methods]
    table = format_table(rows)
    print(table)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(args.output, "results.md"), "w") as f:
        f.write(table + "\n")
    print(f"wrote {os.path.join(args.output, 'results.json')} and results.md")
    return rows


if __name__ == "__main__":
    main()
