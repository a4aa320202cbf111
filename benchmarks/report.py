"""Benchmark output: the printed/Markdown table with ratios against ``bare`` and ``reference``, the JSON file
(``{"device", "commit", "date", "rows": [...]}``) and a PNG plot of time relative to ``bare``."""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from typing import Dict, List, Optional, Sequence, Tuple

import torch

ROW_KEY = Tuple[Tuple[int, int, int], Tuple[int, int, int], float, str]


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU ({model}, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """``nvidia-h200``; ``cpu-2threads`` (CPU timings depend on the thread count as much as on the chip)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu {torch.get_num_threads()}threads"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or device.type


def git_commit() -> Dict[str, object]:
    """The commit of the checkout this package lives in (``unknown`` outside git) and whether it had changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit or "unknown", "dirty": dirty if commit else None}


def _key(row: Dict[str, object]) -> ROW_KEY:
    return tuple(row["shape"]), tuple(row["ranks"]), row["dropout"], row["mode"]


def add_ratios(rows: List[Dict[str, object]]) -> None:
    """``vs_bare`` = time / bare time (>= 1: the adapter's overhead); ``speedup_vs_reference`` = reference time
    / time (> 1: faster than the seed's formulation). Both compare rows of the same case and mode."""
    by_case: Dict[ROW_KEY, Dict[str, float]] = {}
    for row in rows:
        by_case.setdefault(_key(row), {})[row["provider"]] = row["median_ms"]
    for row in rows:
        times = by_case[_key(row)]
        bare, reference = times.get("bare"), times.get("reference")
        row["vs_bare"] = row["median_ms"] / bare if bare else None
        row["speedup_vs_reference"] = reference / row["median_ms"] if reference else None


def _fmt(value: Optional[float], pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def markdown_table(rows: Sequence[Dict[str, object]]) -> str:
    header = ("shape M,K,N", "ranks", "dropout", "mode", "provider", "median ms", "q20-q80 ms", "x bare",
              "speedup vs reference", "saved MB", "peak MB")
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * 5 + ["---:"] * 6) + " |"]
    for row in rows:
        lines.append("| " + " | ".join([
            ",".join(map(str, row["shape"])), "/".join(map(str, row["ranks"])), f"{row['dropout']:g}", row["mode"],
            row["provider"], f"{row['median_ms']:.3f}", f"{row['q20_ms']:.3f}-{row['q80_ms']:.3f}",
            _fmt(row.get("vs_bare"), "{:.2f}"), _fmt(row.get("speedup_vs_reference"), "{:.2f}"),
            _fmt(row.get("saved_mb"), "{:.1f}"), _fmt(row.get("peak_mem_mb"), "{:.1f}"),
        ]) + " |")
    return "\n".join(lines)


def write_results(result: Dict[str, object], out_dir: str, stem: str, notes: Sequence[str] = (),
                  with_plot: bool = True) -> Dict[str, str]:
    """``<stem>.json``, ``<stem>.md`` and (``with_plot``) ``<stem>.png`` in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1)
    header = [
        f"# MSPLoRA microbenchmark: {result['device']}",
        "",
        f"commit `{result['commit']}`{' (with uncommitted changes)' if result.get('dirty') else ''}, {result['date']}, "
        f"torch {result['torch']}, dtype {result['dtype']}, timer: {result['timer']}."
        + (f" Load average (1/5/15 min) at start: {result['load_average_at_start']}."
           if result.get("load_average_at_start") else ""),
        "",
        "x bare: time / time of the frozen linear alone; speedup vs reference: time of the seed's three-branch "
        "formulation / time; saved MB: activations autograd keeps for backward (x included, parameters not); "
        "peak MB: peak allocated above the inputs (CUDA only).",
        "",
    ]
    header += [f"- {note}" for note in notes] + ([""] if notes else [])
    with open(paths["md"], "w") as f:
        f.write("\n".join(header) + "\n" + markdown_table(result["rows"]) + "\n")
    if with_plot:
        plot(result, paths["png"])
    return paths


def plot(result: Dict[str, object], path: str) -> None:
    """One panel per mode: grouped bars of time / bare time per case, one bar per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("vs_bare") is not None]
    modes = [m for m in ("fwd", "bwd", "fwd+bwd") if any(r["mode"] == m for r in rows)]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    cases = list(dict.fromkeys((tuple(r["shape"]), tuple(r["ranks"]), r["dropout"]) for r in rows))
    if not modes:
        return
    width = max(7.0, 0.35 * len(cases) * max(1, len(providers)) / 2)
    fig, axes = plt.subplots(len(modes), 1, figsize=(width, 3.2 * len(modes)), squeeze=False)
    bar = 0.8 / max(1, len(providers))
    for ax, mode in zip(axes[:, 0], modes):
        for j, provider in enumerate(providers):
            xs, ys = [], []
            for i, case in enumerate(cases):
                match = [r for r in rows if r["mode"] == mode and r["provider"] == provider
                         and (tuple(r["shape"]), tuple(r["ranks"]), r["dropout"]) == case]
                if match:
                    xs.append(i + (j - (len(providers) - 1) / 2) * bar)
                    ys.append(match[0]["vs_bare"])
            ax.bar(xs, ys, width=bar, label=provider)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(f"{mode}: time / bare")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{s[0]}x{s[1]}x{s[2]}\nr{'/'.join(map(str, r))} p{p:g}" for s, r, p in cases],
                           fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(ncol=min(len(providers), 4), fontsize=8)
    axes[0, 0].set_title(f"MSPLoRA linear layer, {result['device']}, {result['dtype']}, {result['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
