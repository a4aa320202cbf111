"""The main job: fine-tune a tiny Llama twice, with plain LoRA (the real ``peft`` package) and with MSPLoRA.

Run ``python -m msplora.demo`` (or ``make demo``). Both runs use the same base model (a Llama built from a
config with one token per byte, seeded, so no download), the same target modules, data, optimiser, steps and
seed; only the adapter differs. The text is the Book of Genesis in the King James Version (public domain),
shipped in ``msplora/data``; its last tenth is held out. Each run happens in a fresh process so that its
peak-memory figure is its own. Afterwards the demo prints a table, writes a loss-curve PNG, and reloads each
saved adapter into a freshly built model to check that it reproduces the trained model's outputs.
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
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Dict, List, Optional, Sequence, Tuple

import torch

DATA_FILE = "genesis_kjv.txt"
VOCAB_SIZE = 256  # one token per byte: no tokenizer to download
HELD_OUT_FRACTION = 0.1
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODEL_SIZES: Dict[str, Dict[str, int]] = {
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4),
    "base": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4),
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
    model_size: str
    device: str
    out: str
    seed: int = 0
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1e-2
    dropout: float = 0.05
    eval_every: int = 25
    eval_batches: int = 4
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
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def split_tokens(tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the held-out part is the contiguous last tenth, never seen in training."""
    cut = int(len(tokens) * (1 - HELD_OUT_FRACTION))
    return tokens[:cut], tokens[cut:]


def random_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])


def fixed_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, limit: Optional[int] = None) -> List[torch.Tensor]:
    """Non-overlapping windows in order (the same for every run), grouped into batches."""
    windows = [tokens[s : s + seq_len + 1] for s in range(0, len(tokens) - seq_len - 1, seq_len)]
    batches = [torch.stack(windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]
    return batches[:limit] if limit else batches


# ----------------------------------------------------------------------------------------------- model
def build_base_model(model_size: str, seq_len: int, seed: int, device: str) -> torch.nn.Module:
    """A randomly initialised, seeded Llama with byte tokens: the same weights for the same arguments."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if model_size not in MODEL_SIZES:
        raise ValueError(f"model size must be one of {sorted(MODEL_SIZES)}, got {model_size!r}")
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, max_position_embeddings=seq_len, tie_word_embeddings=False,
        # Llama's default init (std 0.02) caps a frozen random head's logits near +-2.5, so adapters could not fit
        # anything; std 1/sqrt(width) lets the logits reach about sqrt(width) at any model size.
        initializer_range=MODEL_SIZES[model_size]["hidden_size"] ** -0.5, **MODEL_SIZES[model_size]
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device)


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


def probe_batch(seq_len: int) -> torch.Tensor:
    """A fixed held-out batch on which the reloaded adapter must reproduce the trained model's logits."""
    _, held_out = split_tokens(encode(load_text()))
    return fixed_batches(held_out, 4, seq_len, limit=1)[0][:, :-1]


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
def train_one(spec: RunSpec) -> Dict[str, object]:
    """Train one adapter, save it, and return its losses, timings, memory and parameter counts.

    Runs in its own process (see :func:`run_demo`); the progress bar goes to stderr.
    """
    from tqdm import tqdm

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from peft/transformers internals
    if spec.device == "cpu":
        torch.set_num_threads(spec.threads)
    train_tokens, held_out = split_tokens(encode(load_text()))
    model = add_adapter(build_base_model(spec.model_size, spec.seq_len, spec.seed, spec.device), spec)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / spec.steps))
    )
    generator = torch.Generator().manual_seed(spec.seed + 2)  # the same batches for both methods
    eval_set = fixed_batches(held_out, spec.batch_size, spec.seq_len, limit=spec.eval_batches)
    torch.manual_seed(spec.seed + 3)  # the same dropout stream start for both methods

    memory = PeakMemory(spec.device)
    memory.start()
    losses: List[float] = []
    step_times: List[float] = []
    evals: List[Tuple[int, float]] = [(0, mean_loss(model, eval_set, spec.device))]
    cuda = spec.device.startswith("cuda")
    for step in tqdm(range(1, spec.steps + 1), desc=f"{spec.label:>18}", file=sys.stderr, mininterval=1.0):
        batch = random_batch(train_tokens, spec.batch_size, spec.seq_len, generator).to(spec.device)
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
    held_out_loss = mean_loss(model, fixed_batches(held_out, spec.batch_size, spec.seq_len), spec.device)
    with torch.no_grad():
        probe_logits = model(input_ids=probe_batch(spec.seq_len).to(spec.device)).logits.float().cpu()
    os.makedirs(spec.adapter_dir, exist_ok=True)
    if spec.method == "lora":
        model.save_pretrained(spec.adapter_dir)
    else:
        import msplora

        msplora.save_adapter(model, spec.adapter_dir)
    torch.save(probe_logits, os.path.join(spec.adapter_dir, "probe_logits.pt"))

    timed = step_times[WARMUP_STEPS_EXCLUDED:] or step_times
    tail = max(1, len(losses) // 10)
    return {
        "method": spec.method,
        "label": spec.label,
        "params": adapter_counts(model, spec.method),
        "losses": losses,
        "evals": evals,
        "final_train_loss": statistics.fmean(losses[-tail:]),
        "held_out_loss": held_out_loss,
        "step_ms": 1000 * statistics.median(timed),
        "peak_mem_mb": peak_mb,
    }


def _run_in_fresh_process(spec: RunSpec) -> Dict[str, object]:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(train_one, spec).result()


# ------------------------------------------------------------------------------------------ reload check
def reload_check(spec: RunSpec) -> Dict[str, float]:
    """Load the saved adapter into a freshly built base model and compare its logits with the trained one's.

    Returns the largest absolute difference to the trained model (should be ~0) and to the bare base model
    (should not be: it shows the adapter changed something).
    """
    fresh = build_base_model(spec.model_size, spec.seq_len, spec.seed, spec.device).eval()
    probe = probe_batch(spec.seq_len).to(spec.device)
    with torch.no_grad():
        base_logits = fresh(input_ids=probe).logits.float().cpu()
    if spec.method == "lora":
        from peft import PeftModel

        with warnings.catch_warnings():  # deprecation notices from peft/transformers internals
            warnings.simplefilter("ignore", FutureWarning)
            reloaded = PeftModel.from_pretrained(fresh, spec.adapter_dir).eval()
    else:
        import msplora

        reloaded = msplora.load_adapter(fresh, spec.adapter_dir).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=probe).logits.float().cpu()
    trained = torch.load(os.path.join(spec.adapter_dir, "probe_logits.pt"))
    return {
        "max_abs_diff_to_trained": (logits - trained).abs().max().item(),
        "max_abs_diff_to_base": (logits - base_logits).abs().max().item(),
    }


# ------------------------------------------------------------------------------------------------ output
def _fmt_int(value: Optional[int]) -> str:
    return "-" if value is None else f"{value:,}"


def _fmt_float(value: Optional[float], digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def results_table(results: Sequence[Dict[str, object]], device: str) -> str:
    """A Markdown table (it also reads well in a terminal)."""
    header = ("method", "global", "mid", "layer", "trainable", "train loss", "held-out loss", "step ms", "peak MB",
              "reload max diff")
    rows = [header, tuple("---" for _ in header)]
    for r in results:
        p = r["params"]
        rows.append((
            r["label"], _fmt_int(p["global"]), _fmt_int(p["mid"]), _fmt_int(p["layer"]), _fmt_int(p["total"]),
            _fmt_float(r["final_train_loss"], 3), _fmt_float(r["held_out_loss"], 3), _fmt_float(r["step_ms"], 1),
            _fmt_float(r["peak_mem_mb"], 1), f"{r['reload']['max_abs_diff_to_trained']:.1e}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    memory = ("peak CUDA memory allocated above the start of training" if device.startswith("cuda")
              else "peak resident memory (VmHWM) above the start of training, fresh process per run")
    notes = [
        "",
        f"device: {device}; train loss: mean of the last tenth of the steps; held-out loss: the last tenth of the "
        "text; step ms: median step time (forward, backward, optimiser step); peak MB: " + memory + "; "
        "reload: largest logit difference after reloading the saved adapter into a freshly built model.",
    ]
    return "\n".join(lines + notes)


def plot_losses(results: Sequence[Dict[str, object]], path: str, title: str) -> None:
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
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.set_title(title)
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
    parser = argparse.ArgumentParser(
        prog="python -m msplora.demo",
        description="Fine-tune a tiny Llama (built from a config, byte tokens) on the Book of Genesis (KJV, shipped "
        "with msplora) twice: plain LoRA via peft at rank g, and MSPLoRA g/m/l, on the same targets, steps, data and "
        "seed. Prints a table, writes a loss-curve PNG and results.json, saves both adapters and checks that each "
        "reloads into a fresh model with the same outputs.",
    )
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps per run (default: 200)")
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="tiny",
                        help="base model: tiny (4 layers x 128), small (6 x 256) or base (8 x 512) (default: tiny)")
    parser.add_argument("--targets", type=parse_targets, default=list(DEFAULT_TARGETS),
                        help="comma-separated module names to adapt (default: all attention and MLP projections: "
                        + ",".join(DEFAULT_TARGETS) + ")")
    parser.add_argument("--ranks", type=parse_ranks, default=(8, 4, 2),
                        help="MSPLoRA ranks global,mid,layer; plain LoRA uses the global rank (default: 8,4,2)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--out", default="demo_out", help="output folder (default: ./demo_out)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the base model, adapters, batches (default: 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: 8)")
    parser.add_argument("--seq-len", type=int, default=128, help="bytes per sequence (default: 128)")
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW peak learning rate, cosine decay (default: 1e-2)")
    parser.add_argument("--dropout", type=float, default=0.05, help="adapter dropout, both methods (default: 0.05)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per run (default: 1: the tiny model's matrices are too small for more to "
                        "pay, and one thread does not stall when other processes share the cores)")
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


def run_demo(args: argparse.Namespace) -> Dict[str, object]:
    """Both runs, the reload checks, the table, the plot and ``results.json``; returns what it wrote."""
    if args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    device = resolve_device(args.device)
    os.makedirs(args.out, exist_ok=True)
    common = dict(
        ranks=tuple(args.ranks), targets=list(args.targets), steps=args.steps, model_size=args.model_size,
        device=device, out=args.out, seed=args.seed, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        dropout=args.dropout, eval_every=max(1, args.steps // 10), threads=args.threads,
    )
    specs = [RunSpec(method=m, **common) for m in METHODS]
    print(f"msplora demo: {args.model_size} Llama on {device}, {args.steps} steps x {args.batch_size} x "
          f"{args.seq_len} bytes, targets {','.join(args.targets)}", flush=True)
    started = time.perf_counter()
    results = []
    for spec in specs:
        result = _run_in_fresh_process(spec)
        result["reload"] = reload_check(spec)
        results.append(result)

    table = results_table(results, device)
    print()
    print(table)
    for r in results:
        reload = r["reload"]
        ok = reload["max_abs_diff_to_trained"] <= 1e-4 and reload["max_abs_diff_to_base"] > 1e-4
        print(f"reload {r['label']}: max |logits - trained| = {reload['max_abs_diff_to_trained']:.2e}, "
              f"max |logits - base model| = {reload['max_abs_diff_to_base']:.2e} -> {'OK' if ok else 'MISMATCH'}")
        r["reload"]["ok"] = ok
    plot_path = os.path.join(args.out, "loss_curve.png")
    plot_losses(results, plot_path, f"{args.model_size} Llama, Genesis (KJV), {args.steps} steps, {device}")
    summary = {
        "device": device,
        "commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
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
          f"and {specs[1].adapter_dir} ({summary['wall_s']:.0f} s)")
    if not all(r["reload"]["ok"] for r in results):
        raise SystemExit("a reloaded adapter did not reproduce the trained model's outputs")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_demo(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
