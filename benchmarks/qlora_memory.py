"""Peak memory of MSPLoRA training over a 4-bit (QLoRA, NF4) base against a 16-bit (bf16) base.

A Llama-shaped model of random weights is saved once in bf16, then each base is measured in a fresh process
(so that one run's memory never counts for the other): ``from_pretrained`` as users load it (plain bf16, or
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
bnb_4bit_use_double_quant=True)``), ``apply_msplora`` on every linear layer of the blocks (8/4/2), gradient
checkpointing, and a few AdamW steps. Reported per base:

- ``weights_mb``: bytes of every parameter and buffer (the packed 4-bit data and its quantisation state for
  NF4), exact;
- ``training_mb``: what the training steps add on top of the loaded model (activations, gradients,
  optimizer state, temporaries such as bitsandbytes' dequantised weights): on CUDA
  ``torch.cuda.max_memory_allocated() - memory_allocated()`` from just before the first step; on the CPU the
  process's peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``) minus its resident
  memory just before the first step, after touching every weight once (pages that ``from_pretrained``
  memory-maps then count from the start) and handing memory freed while loading back to the OS
  (``malloc_trim``). Resident memory includes allocator slack, so CPU figures are upper bounds;
- ``peak_train_mb = weights_mb + training_mb``. Loading itself (bitsandbytes quantises a 16-bit copy) is
  left out.

Run: ``python -m benchmarks.qlora_memory [--size small|7b-layer] [--device cpu|cuda] [--out benchmarks/results]``.
Prints a markdown table and writes ``qlora-memory-<date>-<device>.json``/``.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from typing import Dict, List

SIZES = {
    # hidden, intermediate, layers, heads, vocab: ~100M linear weights, minutes on 2 CPU cores
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=8000),
    # LLaMA-2-7B's layer shapes, 4 layers (a GPU or a patient CPU)
    "7b-layer": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
}
BASES = ("bf16", "nf4")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _release_freed_memory() -> None:
    """Hand memory freed while loading (the bf16 copy quantised to 4 bits) back to the OS, so that it does not
    stay resident and count as training's (glibc ``malloc_trim``; a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current resident size (Linux)
        f.write("5")


def measure_one(directory: str, base: str, device: str, steps: int, batch: int, seq: int) -> Dict[str, float]:
    """Load the saved model with ``base`` weights, adapt it, train ``steps`` AdamW steps; the memory numbers."""
    import torch
    import transformers as tf

    import msplora

    kwargs = dict(dtype=torch.bfloat16, device_map=device)
    if base == "nf4":
        kwargs["quantization_config"] = tf.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True)
    model = tf.AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    msplora.apply_msplora(model, msplora.MSPLoraConfig(target_modules=TARGETS, ranks=(8, 4, 2), num_mid_groups=3,
                                                       dropout=0.05))
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    for module in model.modules():  # the 4-bit quantisation state (absmax, nested absmax, code) is not a parameter
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            tensors = [state.absmax, state.code] + ([state.state2.absmax, state.state2.code] if state.nested else [])
            weights += sum(t.numel() * t.element_size() for t in tensors)
    trainable = msplora.trainable_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    model.train()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        with torch.no_grad():  # page in memory-mapped weights
            for t in list(model.parameters()) + list(model.buffers()):
                t.view(-1)[:: max(1, 4096 // t.element_size())].sum()
        _release_freed_memory()
        _reset_peak_rss()
        start = _rss_mb("VmRSS")
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if device == "cuda":
        torch.cuda.synchronize()
        training = (torch.cuda.max_memory_allocated() - start) / 2**20
    else:
        training = _rss_mb("VmHWM") - start
    return {"base": base, "weights_mb": weights / 2**20, "training_mb": training,
            "peak_train_mb": weights / 2**20 + training, "adapter_params": trainable["adapter"],
            "all_params": trainable["all"], "first_loss": losses[0], "last_loss": losses[-1]}


def _commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _shape_text(shape: Dict[str, int]) -> str:
    return (f"hidden {shape['hidden_size']}, intermediate {shape['intermediate_size']}, "
            f"{shape['num_hidden_layers']} layers, vocab {shape['vocab_size']}")


def markdown(result: Dict[str, object]) -> str:
    rows: List[Dict[str, float]] = result["rows"]
    by = {r["base"]: r for r in rows}
    lines = [
        f"QLoRA memory, size `{result['size']}` ({_shape_text(result['shape'])}), "
        f"batch {result['batch']} x {result['seq']} "
        f"tokens, {result['steps']} AdamW steps, MSPLoRA 8/4/2 on {len(TARGETS)} projections per layer, "
        f"gradient checkpointing; {result['device']}, commit {result['commit']}, {result['date']}, "
        f"load average {result['loadavg']}.",
        "",
        "| base | weights (MiB) | training adds (MiB) | peak in training (MiB) | all params | adapter params "
        "| loss first -> last |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['base']} | {r['weights_mb']:.1f} | {r['training_mb']:.1f} | {r['peak_train_mb']:.1f} | "
                     f"{r['all_params']:,} | "
                     f"{r['adapter_params']:,} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    if set(BASES) <= set(by):
        lines += ["", f"4-bit / 16-bit: weights {by['nf4']['weights_mb'] / by['bf16']['weights_mb']:.2f}x, "
                      f"peak {by['nf4']['peak_train_mb'] / by['bf16']['peak_train_mb']:.2f}x."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", default=None, help="folder for the .json/.md results (default: print only)")
    parser.add_argument("--child", choices=BASES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> Dict[str, object]:
    args = build_parser().parse_args(argv)
    if args.child:  # one measurement in this fresh process, as JSON on the last line of stdout
        row = measure_one(args.model_dir, args.child, args.device, args.steps, args.batch, args.seq)
        print(json.dumps(row))
        return row

    import torch
    import transformers as tf

    shape = SIZES[args.size]
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        config = tf.LlamaConfig(max_position_embeddings=max(args.seq, 64), **shape)
        tf.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
        rows = []
        for base in BASES:
            cmd = [sys.executable, "-m", "benchmarks.qlora_memory", "--child", base, "--model-dir", directory,
                   "--device", args.device, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--seq", str(args.seq)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                os.path.abspath(__file__))))
            if done.returncode != 0:
                raise RuntimeError(f"the {base} run failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {
        "size": args.size, "shape": shape, "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "device": args.device if args.device == "cuda" else f"cpu ({platform.processor() or platform.machine()}, "
                                                            f"{os.cpu_count()} cores)",
        "commit": _commit(), "date": datetime.date.today().isoformat(),
        "loadavg": open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "n/a",
        "rows": rows,
    }
    text = markdown(result)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"qlora-memory-{result['date']}-{args.device}")
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        with open(stem + ".md", "w") as f:
            f.write(text)
    return result


if __name__ == "__main__":
    main()
