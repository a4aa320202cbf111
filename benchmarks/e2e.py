"""End-to-end training-step benchmark: ``python -m benchmarks.run --preset e2e-cpu`` (``--preset e2e`` on a GPU).

One training step (forward with labels, backward, AdamW step, zero_grad) of a randomly initialised Llama whose
seven projections per decoder layer (q, k, v, o, gate, up, down) carry an adapter, timed for:

- ``peft``: PEFT LoRA at rank g + m + l (14 for 8/4/2: the same total rank), ``lora_dropout`` = p;
- ``reference``: MSPLoRA on the ``reference`` backend, the seed's formulation (three separate branches, one
  ``F.dropout`` copy of x each);
- ``msplora``: MSPLoRA with the default (``auto``) backend.

each at every dropout p (default 0 and 0.05). All models share the same frozen base weights and batch. On the CPU
every step of every candidate is taken in turn, the order rotated each round, so that background load hits all
alike; the median is reported with the 20/80 % quantiles, the fastest step, tokens/s, the activations autograd
saves in one forward (``saved MB``: unique storages, parameters excluded) and, on CUDA, the peak memory of a
step above what was allocated before it. Ratios: ``vs peft`` = time / PEFT's time at the same p, ``vs own p=0``
= time / the same method's time without dropout. The load average is sampled every round: on a shared machine
it says how busy the cores were while the numbers were taken.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import measure, report

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("peft", "reference", "msplora")
ALPHA = 16.0
PRESETS: Dict[str, Dict[str, object]] = {
    # the CPU setting: 8-layer, 512-wide Llama (byte vocabulary, as in `make demo --model-size base`),
    # seq 256, batch 4, fp32
    "e2e-cpu": {
        "model": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=256),
        "seq": 256, "batch": 4, "dtype": "fp32", "warmup": 2, "rounds": 10,
    },
    # a ~1.1B Llama (TinyLlama's shape) in bf16 at seq 2048
    "e2e": {
        "model": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000),
        "seq": 2048, "batch": 4, "dtype": "bf16", "warmup": 3, "rounds": 10,
    },
    # a smoke-test size (tests/test_e2e_benchmark.py)
    "e2e-tiny": {
        "model": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64),
        "seq": 16, "batch": 2, "dtype": "fp32", "warmup": 1, "rounds": 2,
    },
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Candidate:
    """One (method, dropout) model with its optimizer and the step to time."""

    def __init__(self, method: str, dropout: float, ranks: Tuple[int, int, int], spec: Dict[str, object],
                 device: torch.device, dtype: torch.dtype) -> None:
        self.method, self.dropout = method, dropout
        self.model = build_model(method, dropout, ranks, spec, device, dtype)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.device = device

    @property
    def name(self) -> str:
        return f"{self.method} p={self.dropout:g}"

    def step(self, batch: torch.Tensor) -> None:
        loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def saved_mb(self, batch: torch.Tensor) -> float:
        """MB of activations one forward saves for backward (each storage once, parameters excluded)."""
        return measure.saved_mb(lambda: self.model(input_ids=batch, labels=batch).loss, self.model.parameters())

    def peak_mb(self, batch: torch.Tensor) -> Optional[float]:
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.step(batch)
        return (torch.cuda.max_memory_allocated(self.device) - before) / 2**20


def build_model(method: str, dropout: float, ranks: Tuple[int, int, int], spec: Dict[str, object],
                device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The seeded base Llama (identical for every candidate) with ``method``'s adapter, in ``dtype``, training."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=spec["seq"], tie_word_embeddings=False, **spec["model"])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    torch.manual_seed(1)
    if method == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=sum(ranks), lora_alpha=ALPHA, lora_dropout=dropout,
                                                 target_modules=TARGETS))
    elif method in ("reference", "msplora"):
        import msplora

        model = msplora.apply_msplora(model, msplora.MSPLoraConfig(
            target_modules=TARGETS, ranks=ranks, alphas=(ALPHA,) * 3, dropout=dropout,
            backend="reference" if method == "reference" else "auto"))
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return model.to(device=device, dtype=dtype).train()


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def time_steps(candidates: Sequence[Candidate], batch: torch.Tensor, warmup: int, rounds: int,
               log: Callable[[str], None] = print) -> Tuple[Dict[str, List[float]], List[List[float]]]:
    """Seconds per step of every candidate (one step each per round, the order rotated), and the load
    average sampled after every round."""
    for candidate in candidates:
        for _ in range(warmup):
            candidate.step(batch)
    samples: Dict[str, List[float]] = {c.name: [] for c in candidates}
    loads: List[List[float]] = []
    for round_index in range(rounds):
        shift = round_index % len(candidates)
        for candidate in list(candidates[shift:]) + list(candidates[:shift]):
            started = time.perf_counter()
            candidate.step(batch)
            samples[candidate.name].append(time.perf_counter() - started)
        load = _load_average()
        if load:
            loads.append(load)
        log(f"round {round_index + 1}/{rounds}: load {load}, "
            + ", ".join(f"{name} {values[-1]:.3f} s" for name, values in samples.items()))
    return samples, loads


def rows_from(candidates: Sequence[Candidate], samples: Dict[str, List[float]], tokens: int,
              saved: Dict[str, float], peaks: Dict[str, Optional[float]]) -> List[Dict[str, object]]:
    rows = []
    for c in candidates:
        values = samples[c.name]
        median = statistics.median(values)
        rows.append({
            "method": c.method, "dropout": c.dropout, "median_s": median, "q20_s": _quantile(values, 0.2),
            "q80_s": _quantile(values, 0.8), "min_s": min(values), "samples": len(values),
            "tokens_per_s": tokens / median, "saved_mb": saved[c.name], "peak_mb": peaks[c.name],
        })
    medians = {(r["method"], r["dropout"]): r["median_s"] for r in rows}
    for row in rows:
        peft = medians.get(("peft", row["dropout"]))
        own = medians.get((row["method"], 0.0))
        row["vs_peft"] = row["median_s"] / peft if peft else None
        row["vs_own_p0"] = row["median_s"] / own if own and row["dropout"] > 0 else None
    return rows


def _fmt(value: Optional[float], pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def markdown_table(rows: Sequence[Dict[str, object]]) -> str:
    header = ("method", "dropout", "median step s", "q20-q80 s", "fastest s", "tokens/s", "vs peft", "vs own p=0",
              "saved MB", "peak MB")
    lines = ["| " + " | ".join(header) + " |", "| --- | ---: | " + " | ".join(["---:"] * (len(header) - 2)) + " |"]
    for r in rows:
        lines.append("| " + " | ".join([
            r["method"], f"{r['dropout']:g}", f"{r['median_s']:.3f}", f"{r['q20_s']:.3f}-{r['q80_s']:.3f}",
            f"{r['min_s']:.3f}", f"{r['tokens_per_s']:.0f}", _fmt(r["vs_peft"], "{:.2f}x"),
            _fmt(r["vs_own_p0"], "{:.2f}x"), f"{r['saved_mb']:.1f}", _fmt(r["peak_mb"], "{:.0f}"),
        ]) + " |")
    return "\n".join(lines)


def plot(result: Dict[str, object], path: str) -> None:
    """Median step time (with the 20/80 % quantiles) per method, grouped by dropout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    dropouts = list(dict.fromkeys(r["dropout"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(1, len(methods))
    for j, method in enumerate(methods):
        xs, ys, errors = [], [], [[], []]
        for i, p in enumerate(dropouts):
            match = [r for r in rows if r["method"] == method and r["dropout"] == p]
            if match:
                r = match[0]
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(r["median_s"])
                errors[0].append(r["median_s"] - r["q20_s"])
                errors[1].append(r["q80_s"] - r["median_s"])
        ax.bar(xs, ys, width=width, yerr=errors, capsize=3, label=method)
    ax.set_xticks(range(len(dropouts)))
    ax.set_xticklabels([f"dropout {p:g}" for p in dropouts])
    ax.set_ylabel("median training step (s)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{result['setting']}\n{result['device']}, {result['date']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(result: Dict[str, object], out_dir: str, stem: str, with_plot: bool = True) -> Dict[str, str]:
    import json

    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1)
    loads = result.get("load_average_rounds") or []
    load_text = (f"load average (1 min) over the rounds: median {statistics.median(l[0] for l in loads):.2f}, "
                 f"max {max(l[0] for l in loads):.2f}" if loads else "load average not available")
    lines = [
        f"# MSPLoRA end-to-end training step: {result['device']}",
        "",
        f"commit `{result['commit']}`{' (with uncommitted changes)' if result.get('dirty') else ''}, "
        f"{result['date']}, torch {result['torch']}, transformers {result['transformers']}, peft {result['peft']}.",
        f"Setting: {result['setting']}. Timer: {result['timer']}. Load average (1/5/15 min) at start "
        f"{result['load_average_at_start']}, at end {result.get('load_average_at_end')}; {load_text}.",
        "",
        "vs peft: median step / PEFT LoRA's at the same dropout; vs own p=0: median step / the same method's "
        "without dropout; saved MB: activations one forward keeps for backward (parameters excluded); "
        "peak MB: peak allocated during a step above what was allocated before (CUDA only).",
        "",
    ] + [f"- {note}" for note in result.get("notes", [])] + ([""] if result.get("notes") else [])
    with open(paths["md"], "w") as f:
        f.write("\n".join(lines) + "\n" + markdown_table(result["rows"]) + "\n")
    if with_plot:
        plot(result, paths["png"])
    return paths


def run_e2e(preset: str, device: torch.device, out_dir: str, dropouts: Optional[Sequence[float]] = None,
            ranks: Tuple[int, int, int] = (8, 4, 2), warmup: Optional[int] = None, rounds: Optional[int] = None,
            methods: Sequence[str] = METHODS, dtype_name: Optional[str] = None) -> Dict[str, object]:
    import peft
    import transformers

    spec = PRESETS[preset]
    dtype_name = dtype_name or (spec["dtype"] if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    dropouts = list(dropouts) if dropouts else [0.0, 0.05]
    warmup = spec["warmup"] if warmup is None else warmup
    rounds = spec["rounds"] if rounds is None else rounds
    if rounds < 1:
        raise SystemExit(f"--repeats must be >= 1, got {rounds}")
    model = spec["model"]
    setting = (f"Llama {model['num_hidden_layers']} layers x {model['hidden_size']} (intermediate "
               f"{model['intermediate_size']}, {model['num_attention_heads']}/{model['num_key_value_heads']} heads, "
               f"vocab {model['vocab_size']}), adapters on {', '.join(TARGETS)}, ranks {'/'.join(map(str, ranks))} "
               f"(PEFT r={sum(ranks)}), seq {spec['seq']}, batch {spec['batch']}, {dtype_name}, AdamW"
               + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""))
    print(f"e2e benchmark: {setting}", flush=True)
    batch = torch.randint(0, model["vocab_size"], (spec["batch"], spec["seq"]),
                          generator=torch.Generator().manual_seed(2)).to(device)
    candidates = [Candidate(m, p, ranks, spec, device, dtype) for p in dropouts for m in methods]
    saved = {c.name: c.saved_mb(batch) for c in candidates}
    peaks = {c.name: c.peak_mb(batch) for c in candidates}
    result: Dict[str, object] = {
        "benchmark": "e2e", "preset": preset, "setting": setting, "device": report.device_description(device),
        **report.git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "dtype": dtype_name, "tokens_per_step": spec["batch"] * spec["seq"],
        "timer": f"{warmup} warm-up steps each, then {rounds} rounds of one step per candidate (order rotated "
                 "each round), median and 20/80 % quantiles",
        "load_average_at_start": _load_average(), "rows": [], "notes": [],
    }
    stem = f"{time.strftime('%Y-%m-%d', time.gmtime())}-e2e-{report.device_slug(device)}"
    samples, loads = time_steps(candidates, batch, warmup, rounds)
    result["rows"] = rows_from(candidates, samples, spec["batch"] * spec["seq"], saved, peaks)
    result["load_average_rounds"] = loads
    result["load_average_at_end"] = _load_average()
    paths = write_results(result, out_dir, stem)
    print()
    print(markdown_table(result["rows"]))
    print(f"\nwrote {paths['json']}, {paths['md']}, {paths['png']}")
    return result
