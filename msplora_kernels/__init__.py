"""MSPLoRA maths, free of any Hugging Face import: reference, fused op, backends and their dispatch."""
from .dispatch import BACKENDS, resolve_backend
from .function import msplora_linear, msplora_lowrank
from .reference import msplora_linear_ref

__all__ = ["BACKENDS", "msplora_linear", "msplora_linear_ref", "msplora_lowrank", "resolve_backend"]
