"""msplora: Multi-Scale Pyramid LoRA (global, mid and layer-specific low-rank branches) for PyTorch and
Hugging Face models, on a fused kernel (``msplora_kernels``)."""
from msplora_kernels import msplora_linear, msplora_linear_ref

from .config import SCALES, MSPLoraConfig
from .export import export_peft
from .io import adapter_state_dict, load_adapter, save_adapter
from .layer import LoraBranch, MSPLoraLinear
from .model import (
    MSPLoraBank,
    apply_msplora,
    count_parameters,
    disable_adapters,
    group_positions,
    merge,
    msplora_layers,
    print_trainable_parameters,
    set_trainable_scales,
    trainable_parameters,
    unload,
    unmerge,
)

from .training import MSPLoraTrainer, StagedTrainingCallback

__version__ = "0.1.0"

__all__ = [
    "SCALES",
    "LoraBranch",
    "MSPLoraBank",
    "MSPLoraConfig",
    "MSPLoraLinear",
    "MSPLoraTrainer",
    "StagedTrainingCallback",
    "adapter_state_dict",
    "apply_msplora",
    "count_parameters",
    "disable_adapters",
    "export_peft",
    "group_positions",
    "load_adapter",
    "merge",
    "msplora_layers",
    "msplora_linear",
    "msplora_linear_ref",
    "print_trainable_parameters",
    "save_adapter",
    "set_trainable_scales",
    "trainable_parameters",
    "unload",
    "unmerge",
]
