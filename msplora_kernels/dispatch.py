"""The one place that decides which backend runs an MSPLoRA linear layer.

``auto`` runs the Triton kernels on CUDA tensors when Triton is installed and the pure-PyTorch path
otherwise. ``MSPLORA_BACKEND`` in the environment replaces ``auto`` (an explicit choice in code wins).
Triton on CPU tensors is only possible under the interpreter (``TRITON_INTERPRET=1``), which is how the
kernels are tested without a GPU.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "triton", "reference")
ENV_VAR = "MSPLORA_BACKEND"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend_name(name: str, what: str = "backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


def resolve_backend(requested: str, device: torch.device) -> str:
    """Turn a requested backend (possibly ``auto``) into the concrete one for tensors on ``device``."""
    name = check_backend_name(requested)
    if name == "auto":
        name = check_backend_name(os.environ.get(ENV_VAR, "auto"), what=f"${ENV_VAR}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' needs the triton package: pip install triton")
        if device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f"backend 'triton' got tensors on {device}; it runs on CUDA tensors, or on CPU tensors only "
                "under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported). "
                "Use backend='torch' on the CPU."
            )
    return name


def get_backend(name: str) -> ModuleType:
    """The module implementing ``forward``/``backward``/``dropout_masks`` for a concrete backend."""
    if name == "torch":
        return importlib.import_module("msplora_kernels.torch_backend")
    if name == "triton":
        return importlib.import_module("msplora_kernels.triton_backend")
    raise ValueError(f"no fused implementation for backend {name!r}")
