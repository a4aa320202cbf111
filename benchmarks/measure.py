"""Timing, peak memory and saved-activation bytes of a provider in one mode (fwd, bwd, fwd+bwd).

Timing: ``triton.testing.do_bench`` on CUDA (median and 20/80 % quantiles). On the CPU, :func:`time_interleaved`
warms every provider up, then takes each repeat of every provider in turn (rotating the order), so that a
burst of background load hits all providers alike instead of whichever happened to run then.

Modes: ``fwd`` is the training forward (autograd records the graph and saves what backward needs);
``bwd`` replays backward through one retained graph (forward not timed); ``fwd+bwd`` is both.

Saved activations: the bytes autograd keeps between forward and backward, seen through
``torch.autograd.graph.saved_tensors_hooks``; each storage counts once and parameters (frozen weight, bias,
adapter weights) are left out, the input ``x`` is counted. Peak memory: on CUDA the peak allocated above what
was allocated before the call; on the CPU ``None``, because the allocator keeps freed blocks and the resident
set of a process does not show one call's peak.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .providers import Provider

MODES = ("fwd", "bwd", "fwd+bwd")
QUANTILES = (0.5, 0.2, 0.8)


@dataclass
class Timing:
    median_ms: float
    q20_ms: float
    q80_ms: float
    samples: int
    min_ms: Optional[float] = None  # CPU: the least-disturbed sample, a useful second view on a shared machine


def clear_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def mode_callable(provider: Provider, mode: str, dy: torch.Tensor) -> Callable[[], None]:
    """A no-argument callable running ``mode`` once; for ``bwd`` the forward runs here, once, untimed."""
    if mode == "fwd":
        def run() -> None:
            with provider.context():
                provider.forward()
        return run
    if provider.forward_only:
        raise ValueError(f"{provider.name} has no backward")
    if mode == "fwd+bwd":
        def run() -> None:
            with provider.context():
                provider.forward().backward(dy)
        return run
    if mode == "bwd":
        with provider.context():
            y = provider.forward()

        def run() -> None:
            with provider.context():
                y.backward(dy, retain_graph=True)
        return run
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _quantile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def time_interleaved(
    runs: Dict[str, Callable[[], None]], grads: Dict[str, Sequence[torch.Tensor]], warmup: int, repeats: int,
    min_sample_s: float = 0.02,
) -> Dict[str, Timing]:
    """CPU timer: ``warmup`` untimed calls each, then ``repeats`` rounds that time every provider once, in an
    order rotated by one each round. A call shorter than ``min_sample_s`` is repeated within its sample
    (the same count for every round) so that timer resolution and call overhead do not dominate."""
    names = list(runs)
    inner: Dict[str, int] = {}
    for name in names:
        # At least ``warmup`` calls and 0.1 s: first calls pay for thread pools, allocator growth, lazy imports.
        elapsed: List[float] = []
        while len(elapsed) < max(1, warmup) or sum(elapsed) < 0.1:
            clear_grads(grads[name])
            started = time.perf_counter()
            runs[name]()
            elapsed.append(time.perf_counter() - started)
        typical = min(elapsed[len(elapsed) // 2 :])
        inner[name] = max(1, min(100, int(min_sample_s / max(typical, 1e-7))))
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            total = 0.0
            for _ in range(inner[name]):
                clear_grads(grads[name])  # outside the timed call: gradient accumulation would add work
                started = time.perf_counter()
                runs[name]()
                total += time.perf_counter() - started
            samples[name].append(1000 * total / inner[name])
    return {
        name: Timing(statistics.median(values), _quantile(values, 0.2), _quantile(values, 0.8), len(values),
                     min(values))
        for name, values in samples.items()
    }


def time_cuda(run: Callable[[], None], grads: Sequence[torch.Tensor], warmup_ms: int, rep_ms: int) -> Timing:
    """``triton.testing.do_bench`` (it flushes the L2 cache between calls and clears ``grad_to_none``)."""
    import triton.testing

    median, q20, q80 = triton.testing.do_bench(
        run, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grads) or None, quantiles=list(QUANTILES)
    )
    return Timing(median, q20, q80, 0)


def saved_mb(forward: Callable[[], object], params) -> float:
    """MB that autograd saves for backward while ``forward()`` runs: each storage once, ``params`` excluded."""
    excluded = {p.untyped_storage().data_ptr() for p in params if p is not None}
    storages: Dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded and storage.nbytes() > 0:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values()) / 2**20


def saved_activation_mb(provider: Provider) -> Optional[float]:
    """MB that autograd saves for backward in one forward (``None`` for forward-only providers)."""
    if provider.forward_only:
        return None
    with provider.context():
        return saved_mb(provider.forward, provider.params)


def peak_memory_mb(run: Callable[[], None], grads: Sequence[torch.Tensor], device: torch.device) -> Optional[float]:
    """Peak CUDA memory allocated by one call above what was allocated before it; ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    clear_grads(grads)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    clear_grads(grads)
    return peak / 2**20
