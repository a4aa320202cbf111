"""Adapter save/load: ``adapter_config.json`` + one ``adapter_model.safetensors`` holding every adapter
tensor exactly once (shared branches too). No pickle. Loading checks every key and shape before it copies
anything, so a bad file leaves the model as it was.

Keys: ``global.<site>.lora_A``, ``mid.<site>.<group>.lora_A``, ``layer.<module>.lora_A`` (and ``lora_B``),
``modules_to_save.<module>.<param>`` for full modules trained beside the adapter.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._files import atomic_directory
from .config import MSPLoraConfig
from .model import (
    _matches,
    apply_msplora,
    check_not_data_parallel,
    get_bank,
    has_msplora,
    msplora_layers,
    unload,
    unwrap_model,
)

WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Every adapter Parameter under its file key, shared ones once."""
    model = unwrap_model(model)
    bank = get_bank(model)
    out: Dict[str, nn.Parameter] = {}

    def add(prefix: str, branch) -> None:
        if branch is not None:
            out[f"{prefix}.lora_A"] = branch.A
            out[f"{prefix}.lora_B"] = branch.B

    for site, info in bank.sites.items():
        add(f"global.{site}", bank.global_branch(site))
        for group in sorted(set(info["groups"])):
            add(f"mid.{site}.{group}", bank.mid_branch(site, group))
    for name, layer in msplora_layers(model):
        add(f"layer.{name}", layer.layer_branch)
    if bank.config.modules_to_save:
        for name, module in model.named_modules():
            if _matches(name, bank.config.modules_to_save):
                for pname, p in module.named_parameters():
                    if not any(p is q for q in out.values()):  # tied weights are stored once
                        out[f"modules_to_save.{name}.{pname}"] = p
    return out


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: p.detach() for k, p in adapter_parameters(model).items()}


def save_adapter(model: nn.Module, directory: str) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory`` (both or neither:
    they are written to a temporary folder first). ``model`` may be wrapped (DDP, ``torch.compile``)."""
    state = {k: t.contiguous().cpu() for k, t in adapter_state_dict(model).items()}
    write_adapter(directory, get_bank(model).config, state)


def write_adapter(directory: str, config: MSPLoraConfig, state: Dict[str, torch.Tensor]) -> None:
    """The two adapter files from a config and whole CPU tensors under their file keys, written atomically."""
    with atomic_directory(directory) as staging:
        config.save_pretrained(staging)
        save_file(state, os.path.join(staging, WEIGHTS_NAME), metadata={"format": "pt", "adapter": "msplora"})


def _read_weights(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no adapter weights at {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read adapter weights {path}: {e}") from None


def _check_state(expected: Dict[str, nn.Parameter], found: Dict[str, torch.Tensor], path: str) -> None:
    problems: List[str] = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    problems += [f"missing key {k} (expected shape {tuple(expected[k].shape)})" for k in missing[:5]]
    problems += [f"unexpected key {k} (shape {tuple(found[k].shape)})" for k in unexpected[:5]]
    for k in sorted(set(expected) & set(found)):
        if tuple(found[k].shape) != tuple(expected[k].shape):
            problems.append(f"{k}: expected shape {tuple(expected[k].shape)}, found {tuple(found[k].shape)}")
        elif not found[k].is_floating_point():
            problems.append(f"{k}: expected a floating-point tensor, found {found[k].dtype}")
    if problems:
        more = len(missing) + len(unexpected) - min(len(missing), 5) - min(len(unexpected), 5)
        tail = f" (and {more} more missing/unexpected keys)" if more > 0 else ""
        raise ValueError(f"adapter {path} does not fit this model: " + "; ".join(problems) + tail)


def load_adapter(
    model: nn.Module, directory: str, is_trainable: bool = False, backend: Optional[str] = None
) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model`` (bare or wrapped by DDP/``torch.compile``).

    A plain model gets the adapter's config applied first (as ``PeftModel.from_pretrained`` does); a model
    that already has MSPLoRA adapters gets its adapter weights replaced (merged layers are re-merged with the
    new weights). Any error leaves ``model`` unchanged.

    Args:
        is_trainable: PEFT's convention. ``False`` (default): ready for inference: the adapter (and any
            ``modules_to_save``) is frozen and the model is put in eval mode, so adapter dropout is off.
            ``True``: the adapter requires grad and the model's mode is left alone (resuming training).
        backend: the backend of newly applied layers (default ``"auto"``); for a model that already has
            adapters, ``None`` keeps their backend. Backends are never read from the adapter folder.
    """
    config = MSPLoraConfig.from_pretrained(directory)
    applied_here = not has_msplora(model)
    if backend is not None or applied_here:
        config = dataclasses.replace(config, backend=backend or "auto")  # validates the name
    path = os.path.join(directory, WEIGHTS_NAME)
    found = _read_weights(path)
    if applied_here:
        check_not_data_parallel(model, "load_adapter into a model without adapters")
    wrapper, model = model, unwrap_model(model)
    if not applied_here:
        _check_scalings(get_bank(model).config, config, directory)
    else:
        requires_grad = {p: p.requires_grad for p in model.parameters()}
        apply_msplora(model, config)
    try:
        expected = adapter_parameters(model)
        _check_state(expected, found, path)
    except Exception:
        if applied_here:
            unload(model, merge=False)
            for p, flag in requires_grad.items():
                p.requires_grad_(flag)
        raise
    merged = [layer for _, layer in msplora_layers(model) if layer.merged]
    for layer in merged:  # the base weights hold the old update: take it out before the weights change
        layer.unmerge()
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(found[key])
    for layer in merged:
        layer.merge()
    for _, layer in msplora_layers(model):
        layer.dropout = config.dropout  # the saved adapter's dropout, as PEFT takes lora_dropout from the file
        if backend is not None:
            layer.backend = config.backend
    get_bank(model).config.dropout = config.dropout
    for param in expected.values():
        param.requires_grad_(bool(is_trainable))
    if not is_trainable:
        wrapper.eval()
    return wrapper


def _check_scalings(current: MSPLoraConfig, saved: MSPLoraConfig, directory: str) -> None:
    """Same shapes are not enough: the scalings the weights were trained with must match the model's."""
    for field in ("alphas", "use_rslora"):
        if getattr(current, field) != getattr(saved, field):
            raise ValueError(
                f"adapter {directory} was trained with {field}={getattr(saved, field)} but this model's adapters "
                f"use {field}={getattr(current, field)}; load it into the plain model (msplora.unload first)"
            )

