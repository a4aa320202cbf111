"""The implementations a benchmark compares, each built for one case as a forward callable ``x -> y``.

- ``bare``: ``F.linear`` on the frozen weight (what the layer costs with no adapter at all);
- ``reference``: the seed's three-branch formulation, ``msplora_linear_ref``;
- ``peft``: a real ``peft.tuners.lora.Linear`` around an ``nn.Linear``, at rank g + m + l (equal total rank);
- ``msplora``: ``MSPLoraLinear``, auto backend;
- CUDA only, when ``msplora_kernels.triton_backend`` imports: ``msplora_fused`` and ``msplora_unfused`` (the
  same layer with the Triton path forced) and ``triton_gemm`` (the Triton GEMM alone, forward only, to set
  against ``bare``, which is cuBLAS).

Every provider gets the same frozen weight and bias, and the same input ``x`` (which requires grad, as inside
a network, so backward includes the input gradient); adapter weights are trainable.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

BASE_PROVIDERS = ("bare", "reference", "peft", "msplora")
TRITON_PROVIDERS = ("msplora_fused", "msplora_unfused", "triton_gemm")
ALL_PROVIDERS = BASE_PROVIDERS + TRITON_PROVIDERS
FORWARD_ONLY = {"triton_gemm"}  # no autograd: timed in the fwd mode only
ALPHA = 16.0


@dataclass(frozen=True)
class Case:
    """One benchmarked layer: x (M, K) @ W (N, K)^T with ranks (g, m, l) and adapter dropout ``dropout``."""

    m: int
    k: int
    n: int
    ranks: Tuple[int, int, int]
    dropout: float
    dtype: torch.dtype
    device: torch.device

    @property
    def label(self) -> str:
        return f"{self.m}x{self.k}x{self.n} r{'/'.join(map(str, self.ranks))} p{self.dropout:g}"


@dataclass
class Provider:
    """A forward callable plus what the timers need: the tensors whose ``.grad`` to clear between calls and the
    parameters to leave out of the saved-activation count."""

    name: str
    forward: Callable[[], torch.Tensor]
    grads: List[torch.Tensor]
    params: List[torch.Tensor]
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    forward_only: bool = False


def triton_backend():
    """``msplora_kernels.triton_backend`` if it imports and has what the Triton providers need, else ``None``."""
    try:
        module = importlib.import_module("msplora_kernels.triton_backend")
    except Exception:  # triton missing or broken: the providers are skipped with a note
        return None
    return module if hasattr(module, "forced_path") and hasattr(module, "linear") else None


def available_providers(requested: Sequence[str], device: torch.device) -> Tuple[List[str], List[str]]:
    """(providers to run, notes about the ones skipped)."""
    unknown = [p for p in requested if p not in ALL_PROVIDERS]
    if unknown:
        raise ValueError(f"unknown providers {unknown}; choose from {', '.join(ALL_PROVIDERS)}")
    run, notes = [], []
    for name in requested:
        if name in TRITON_PROVIDERS:
            if device.type != "cuda":
                notes.append(f"skipped {name}: it needs CUDA")
                continue
            if triton_backend() is None:
                notes.append(f"skipped {name}: msplora_kernels.triton_backend (forced_path, linear) is not importable")
                continue
        if name == "peft" and importlib.util.find_spec("peft") is None:
            notes.append("skipped peft: the peft package is not installed (pip install peft)")
            continue
        run.append(name)
    return run, notes


class _Holder(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear


def _peft_layer(linear: nn.Linear, rank: int, dropout: float) -> nn.Module:
    """A ``peft.tuners.lora.Linear`` made through ``get_peft_model``, which works across peft versions."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    model = get_peft_model(_Holder(linear), LoraConfig(r=rank, lora_alpha=ALPHA, lora_dropout=dropout,
                                                       target_modules=["proj"]))
    layer = model.base_model.model.proj
    if not isinstance(layer, LoraLinear):
        raise TypeError(f"peft wrapped the layer as {type(layer).__name__}, expected peft.tuners.lora.Linear")
    return layer


def _branches(case: Case, generator: torch.Generator):
    from msplora import LoraBranch

    out = []
    for rank in case.ranks:
        if rank == 0:
            out.append(None)
            continue
        branch = LoraBranch(case.k, case.n, rank, ALPHA, init_weights=False)
        with torch.no_grad():  # small, non-zero weights so every term is real work
            branch.A.copy_(torch.randn(branch.A.shape, generator=generator) / case.k**0.5)
            branch.B.copy_(torch.randn(branch.B.shape, generator=generator) / rank**0.5)
        out.append(branch.to(device=case.device, dtype=case.dtype))
    return out


def make_inputs(case: Case, seed: int = 0) -> Tuple[torch.Tensor, nn.Linear, torch.Tensor]:
    """(x, the frozen linear, the output gradient dy), drawn on the case's device (Llama-sized tensors drawn
    on the host would cost seconds per case)."""
    generator = torch.Generator(device=case.device).manual_seed(seed)

    def normal(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, device=case.device) * std).to(case.dtype)

    x = normal(case.m, case.k).requires_grad_(True)
    with torch.device("meta"):
        linear = nn.Linear(case.k, case.n, bias=True)
    linear.weight = nn.Parameter(normal(case.n, case.k, std=case.k**-0.5), requires_grad=False)
    linear.bias = nn.Parameter(normal(case.n, std=0.1), requires_grad=False)
    return x, linear, normal(case.m, case.n)


def build_provider(name: str, case: Case, x: torch.Tensor, linear: nn.Linear) -> Provider:
    """One provider for ``case``; all share ``x`` and the frozen ``linear``."""
    from msplora import MSPLoraLinear, msplora_linear_ref

    weight, bias = linear.weight, linear.bias
    frozen = [weight, bias]
    if name == "bare":
        return Provider(name, lambda: F.linear(x, weight, bias), [x], frozen)
    if name == "triton_gemm":
        backend = triton_backend()
        return Provider(name, lambda: backend.linear(x.detach(), weight, bias), [], frozen, forward_only=True)
    branches = _branches(case, torch.Generator().manual_seed(1))
    adapter = [p for b in branches if b is not None for p in b.parameters()]
    if name == "reference":
        terms = [(b.A, b.B, b.scaling) for b in branches if b is not None]
        return Provider(name, lambda: msplora_linear_ref(x, weight, bias, terms, case.dropout, True), [x] + adapter,
                        frozen + adapter)
    if name == "peft":
        layer = _peft_layer(linear, sum(case.ranks), case.dropout).to(case.device, case.dtype).train()
        lora = [p for p in layer.parameters() if p.requires_grad]
        return Provider(name, lambda: layer(x), [x] + lora, frozen + lora)
    if name in ("msplora", "msplora_fused", "msplora_unfused"):
        layer = MSPLoraLinear(linear, *branches, dropout=case.dropout).train()
        context = contextlib.nullcontext
        if name != "msplora":
            backend = triton_backend()
            path = name.split("_", 1)[1]
            context = lambda: backend.forced_path(path)  # noqa: E731 - a factory: each use needs a fresh context
        return Provider(name, lambda: layer(x), [x] + adapter, frozen + adapter, context=context)
    raise ValueError(f"unknown provider {name!r}")


def check_agreement(providers: Dict[str, Provider], case: Case) -> Optional[str]:
    """Without dropout every adapter provider must compute the reference's output: a wrong kernel must not
    produce a fast row. Returns a description of the first disagreement, or ``None``."""
    if case.dropout > 0 or "reference" not in providers:
        return None
    with torch.no_grad():
        expected = providers["reference"].forward().float()
        scale = expected.abs().max().item() + 1e-6
        tolerance = 1e-4 if case.dtype == torch.float32 else 3e-2
        for name, provider in providers.items():
            if name in ("bare", "triton_gemm", "reference"):
                continue
            if name == "peft":  # a different (rank g+m+l) adapter: nothing to compare
                continue
            with provider.context():
                error = (provider.forward().float() - expected).abs().max().item() / scale
            if error > tolerance:
                return f"{name} differs from reference by {error:.2e} (relative) on {case.label}"
    return None
