"""Quantised base layers: what MSPLoRA supports (bitsandbytes 4-bit and 8-bit), what it refuses (every other
quantiser), merging into a quantised weight, and counting packed parameters.

Supported bases, both ``nn.Linear`` subclasses, run by calling the layer (``MSPLoraLinear`` never reads their
packed weight, see ``msplora.layer``): ``y = base_layer(x) + sum_s c_s (D_s(x) A_s^T) B_s^T``.

- ``bitsandbytes.nn.Linear4bit`` (and its ``LinearNF4``/``LinearFP4`` subclasses): the weight is a
  ``Params4bit`` of ``out * in / 2`` packed bytes (two 4-bit codes per byte, NF4 or FP4) plus a
  ``quant_state`` with one absmax per block of 64 weights (themselves 8-bit quantised with double
  quantisation), ``W ~= code[q] * absmax``.
- ``bitsandbytes.nn.Linear8bitLt``: an ``Int8Params`` weight ``CB`` (int8, out x in) with one scale per output
  row ``SCB``, ``W ~= CB * SCB / 127``.

Merging (``merge``/``unload(merge=True)``) does what PEFT does: ``W' = Q(deQ(W) + delta)``, dequantise, add the
fp32 update, quantise again. ``Q(deQ(W) + delta) != deQ(W) + delta``: the merged layer differs from the
unmerged one by one rounding of the new weight (up to half a quantisation step per weight, which with 4 bits
is large next to a small update), and ``unmerge`` (``Q(deQ(W') - delta)``) does not give back ``W``'s bits; a
warning says so. ``unload(merge=False)`` of a layer never merged gives the original bitsandbytes layer back,
untouched.

Parameter counts: a ``Params4bit`` holds two weights per element, so ``num_elements`` counts
``prod(quant_state.shape)`` (the unpacked ``out x in``), not ``numel()``.

bitsandbytes is imported only when a model already holds its layers (``sys.modules``), so nothing here costs
an import or requires the package.
"""
from __future__ import annotations

import re
import sys
import warnings
from typing import Optional

import torch
import torch.nn as nn

ROUNDING_WARNING = (
    "merging MSPLoRA adapters into a quantised ({kind}) weight dequantises it, adds the update and quantises the "
    "sum again: the merged layer differs from the unmerged one by that rounding (outputs and generations may "
    "change), and unmerge does not restore the original bits. Keep the adapter unmerged for exact outputs, or "
    "merge into a 16-bit copy of the base model"
)

# Quantisers whose layers compute from packed weights that MSPLoRA neither reads nor can call safely: module
# prefix of the layer's (or its weight's) class -> what to call it in the error.
_OTHER_QUANTISERS = {
    "auto_gptq": "GPTQ (auto-gptq)",
    "gptqmodel": "GPTQ (GPTQModel)",
    "optimum.gptq": "GPTQ (optimum)",
    "awq": "AWQ (AutoAWQ)",
    "hqq": "HQQ",
    "torchao": "torchao",
    "optimum.quanto": "quanto",
    "quanto": "quanto",
    "eetq": "EETQ",
    "aqlm": "AQLM",
    "vptq": "VPTQ",
    "auto_round": "AutoRound",
    "compressed_tensors": "compressed-tensors",
    "fbgemm_gpu": "FBGEMM",
    "transformers.integrations": "a transformers quantisation integration",
}
# Class names of quantised linear layers, for classes defined outside the packages above (vendored copies).
_QUANTISED_CLASS_NAME = re.compile(
    r"(.*QuantLinear.*|WQLinear.*|HQQLinear.*|QLinear|EetqLinear|.*FP8.*Linear|.*Fp8Linear|HiggsLinear|SpQRLinear"
    r"|AutoBitLinear|BitLinear|GgufLinear|NVFP4Linear|QuantizedLinear|MarlinLinear|ExllamaLinear.*)"
)


def _bnb():
    return sys.modules.get("bitsandbytes")


def is_bnb_4bit(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_bnb_8bit(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)


def is_bnb_quantized(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit layer, or an 8-bit one whose weight is int8 (not ``has_fp16_weights``)."""
    if is_bnb_4bit(module):
        return True
    return is_bnb_8bit(module) and module.weight.dtype == torch.int8


def quantization_kind(module: nn.Module) -> Optional[str]:
    """``"nf4"``/``"fp4"`` for 4-bit bitsandbytes layers, ``"int8"`` for 8-bit ones, ``None`` otherwise."""
    if is_bnb_4bit(module):
        return getattr(module.weight, "quant_type", "4bit")
    if is_bnb_quantized(module):
        return "int8"
    return None


def _quantiser_of(cls: type) -> Optional[str]:
    module_name = getattr(cls, "__module__", "") or ""
    for prefix, label in _OTHER_QUANTISERS.items():
        if module_name == prefix or module_name.startswith(prefix + "."):
            if prefix == "transformers.integrations" and "Linear" not in cls.__name__:
                continue
            return label
    return None


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why MSPLoRA cannot adapt ``module`` (a quantised layer of another quantiser, a quantised tensor
    subclass as weight, a weight of an integer or float8 dtype), or ``None`` if nothing speaks against it."""
    if is_bnb_4bit(module) or is_bnb_8bit(module):
        return None
    cls = type(module)
    label = _quantiser_of(cls)
    if label is None and _QUANTISED_CLASS_NAME.fullmatch(cls.__name__):
        label = "a quantisation library"
    if label is not None:
        return f"a quantised layer from {label} ({cls.__module__}.{cls.__name__})"
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        wcls = type(weight)
        if wcls not in (nn.Parameter, torch.Tensor):
            label = _quantiser_of(wcls)
            if label is not None or "quant" in wcls.__name__.lower():
                return f"its weight is a quantised {wcls.__module__}.{wcls.__name__} ({label or 'unknown quantiser'})"
        if not (weight.is_floating_point() or weight.is_complex()) or weight.element_size() == 1:
            return f"its weight has dtype {weight.dtype} (a quantised weight MSPLoRA cannot read)"
    return None


def looks_like_quantised_linear(module: nn.Module) -> bool:
    """A layer of another quantiser that plays the role of a linear layer (for ``target_modules="all-linear"``,
    which must refuse it rather than skip it silently)."""
    return unsupported_reason(module) is not None and (
        isinstance(module, nn.Linear) or _QUANTISED_CLASS_NAME.fullmatch(type(module).__name__) is not None
        or _quantiser_of(type(module)) is not None
    )


def check_supported(name: str, module: nn.Module) -> None:
    """Raise ``ValueError`` naming ``name``'s layer type if MSPLoRA cannot adapt it (see ``unsupported_reason``)."""
    reason = unsupported_reason(module)
    if reason is not None:
        raise ValueError(
            f"target {name} is a {type(module).__name__}: {reason}. MSPLoRA adapts nn.Linear, transformers "
            "Conv1D and bitsandbytes Linear4bit/Linear8bitLt layers (load the model with "
            "transformers.BitsAndBytesConfig for QLoRA), or exclude this module (exclude_modules)"
        )


def num_elements(p: torch.Tensor) -> int:
    """The number of weights ``p`` stands for: ``numel()``, but the unpacked ``out x in`` of a ``Params4bit``
    (two 4-bit weights per byte)."""
    state = getattr(p, "quant_state", None)
    bnb = _bnb()
    if bnb is not None and isinstance(p, bnb.nn.Params4bit) and state is not None:
        return int(torch.Size(state.shape).numel())
    return p.numel()


def _unpack_cpu_format(module: nn.Module) -> None:
    """bitsandbytes repacks 4-bit weights in place for its AVX512-BF16 CPU kernel at the first eval forward;
    its own ``state_dict`` undoes that first, and so do we before dequantising."""
    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        module.quant_state = weight.quant_state


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight a bitsandbytes layer computes with, in fp32."""
    import bitsandbytes.functional as bnbf

    weight = module.weight
    if is_bnb_4bit(module):
        _unpack_cpu_format(module)
        return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if is_bnb_quantized(module):
        state = getattr(module, "state", None)
        cb = weight.CB if getattr(weight, "CB", None) is not None else getattr(state, "CB", None)
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else getattr(state, "SCB", None)
        if cb is None:
            cb = weight.data
        if scb is None:
            raise RuntimeError(
                f"{type(module).__name__} has no int8 scales (SCB): was it quantised (moved to a device)?")
        return cb.float() * (scb.float().view(-1, 1) / 127.0)
    return weight.detach().float()


def add_to_quantized_weight(module: nn.Module, delta: torch.Tensor) -> None:
    """``W <- Q(deQ(W) + delta)`` for a bitsandbytes layer, with the rounding warning (module docstring).
    ``delta`` is (out, in). The new weight is quantised on the layer's device with the old one's settings."""
    kind = quantization_kind(module)
    # stacklevel: here, MSPLoraLinear._add_to_base, .merge/.unmerge, torch.no_grad's wrapper, msplora.merge/
    # unmerge/unload, and then the user's call
    warnings.warn(ROUNDING_WARNING.format(kind=kind), UserWarning, stacklevel=6)
    with torch.no_grad():
        _requantize(module, delta)


def _requantize(module: nn.Module, delta: torch.Tensor) -> None:
    import bitsandbytes as bnb

    old = module.weight
    device = old.device
    merged = dequantized_weight(module) + delta.to(device=device, dtype=torch.float32)
    if is_bnb_4bit(module):
        state = old.quant_state
        new = bnb.nn.Params4bit(
            merged.to(state.dtype).cpu(), requires_grad=False, blocksize=old.blocksize,
            compress_statistics=old.compress_statistics, quant_type=old.quant_type,
            quant_storage=old.quant_storage, module=module,
        )
        module.weight = new.to(device)
        module.quant_state = module.weight.quant_state
    else:
        new = bnb.nn.Int8Params(merged.to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False)
        module.weight = new.to(device)
        if getattr(module, "state", None) is not None:
            module.state.reset_grads()  # the cached CB/SCB belong to the old weight
