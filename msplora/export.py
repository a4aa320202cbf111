"""Export an MSPLoRA model as a standard PEFT LoRA adapter, servable by PEFT, vLLM, TGI and the like.

Per layer the three branches are one LoRA of rank ``R = r_g + r_m + r_l``:

    sum_s c_s (x A_s^T) B_s^T = (x A^T) B^T,   A = [A_g; A_m; A_l] (R, in),  B = [c_g B_g | c_m B_m | c_l B_l] (out, R)

where ``c_s`` is the branch's scaling (``alpha_s / r_s``, or ``/ sqrt(r_s)`` with rsLoRA). Each scaling is
folded into its columns of B, so any alphas export exactly, and the PEFT adapter sets ``lora_alpha = R``
(with ``use_rslora`` off) so that PEFT's own scaling is 1. Layers whose total rank differs from the most
common one get ``rank_pattern``/``alpha_pattern`` entries.

What does not carry over: PEFT draws one dropout mask for the whole rank-R input where MSPLoRA draws one per
branch (inference is unaffected; resumed training with dropout is not the same process), and the sharing of
global/mid branches is unrolled into per-layer copies (the adapter file is larger than MSPLoRA's own).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ._files import atomic_directory
from .layer import is_conv1d
from .model import _matches, get_bank, msplora_layers, parameter_names, unwrap_model

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# PEFT's task types; the one given decides which PeftModel class ``PeftModel.from_pretrained`` builds.
PEFT_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
HEAD_TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS")
PEFT_HEAD_NAMES = ("classifier", "score")


def peft_lora_weights(model: nn.Module) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Each adapted layer's (A, B) as one LoRA: ``{module name: (A (R, in), B (out, R) with scalings folded in)}``,
    computed in fp32."""
    out = {}
    for name, layer in msplora_layers(model):
        if layer.merged:
            raise ValueError(
                f"{name} is merged into its base weight; call msplora.unmerge(model) before exporting, "
                "or the exported adapter would be added twice"
            )
        branches = [b for b in layer.branches() if b is not None]
        if not branches:
            continue
        a = torch.cat([b.A.detach().float() for b in branches])
        b = torch.cat([branch.B.detach().float() * branch.scaling for branch in branches], dim=1)
        out[name] = (a, b)
    return out


def export_peft(
    model: nn.Module,
    directory: str,
    task_type: Optional[str] = None,
    base_model_name_or_path: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
) -> Dict[str, object]:
    """Write ``model``'s MSPLoRA adapter as a PEFT LoRA adapter (``adapter_config.json`` and
    ``adapter_model.safetensors``) into ``directory``; ``peft.PeftModel.from_pretrained(base_model, directory)``
    then computes what the MSPLoRA model computes.

    Args:
        model: a model prepared by :func:`msplora.apply_msplora` (not merged), possibly wrapped by DDP or
            ``torch.compile``.
        directory: where to write; created if needed.
        task_type: PEFT's task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...), or ``None`` for a plain ``PeftModel``.
            For ``SEQ_CLS``/``TOKEN_CLS`` the head (``classifier`` or ``score``) is written in full, as PEFT
            expects: a base model loaded for classification starts with a new, random head.
        base_model_name_or_path: recorded in the config; defaults to ``model.config._name_or_path`` if set.
        dtype: the dtype to store the weights in (default: fp32, as trained).

    Returns the PEFT config written, as a dict.
    """
    if task_type is not None and task_type not in PEFT_TASK_TYPES:
        raise ValueError(f"task_type must be one of {PEFT_TASK_TYPES} or None, got {task_type!r}")
    model = unwrap_model(model)
    config = get_bank(model).config
    weights = peft_lora_weights(model)
    if not weights:
        raise ValueError("the model has no active MSPLoRA branch to export")

    ranks = {name: a.shape[0] for name, (a, _) in weights.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    # PEFT matches pattern keys as regular expressions against module names: escape the names.
    rank_pattern = {re.escape(name): r for name, r in ranks.items() if r != rank}
    uses_conv1d = any(is_conv1d(layer.base_layer) for _, layer in msplora_layers(model))

    tensors: Dict[str, torch.Tensor] = {}
    for name, (a, b) in weights.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
    modules_to_save = list(config.modules_to_save or [])
    if task_type in HEAD_TASK_TYPES:
        # PEFT wraps these heads itself for such tasks and expects their weights in the file.
        modules_to_save += [n for n in PEFT_HEAD_NAMES if n not in modules_to_save]
    saved = [name for name, _ in model.named_modules() if modules_to_save and _matches(name, modules_to_save)]
    saved += [n for n in _tied_partners(model, saved) if n not in saved]
    saved_modules = set()
    for name in saved:
        saved_modules.add(name.rpartition(".")[2])
        # PEFT keeps these in full under their own names (its wrapper's prefix is dropped in the file).
        # every name of a shared parameter (RoBERTa's lm_head.bias is lm_head.decoder.bias): PEFT loads by name
        for pname, p in model.get_submodule(name).named_parameters(remove_duplicate=False):
            tensors[f"{PEFT_PREFIX}{name}.{pname}"] = p.detach()
    modules_to_save = [n for n in modules_to_save if n in (config.modules_to_save or []) or n in saved_modules]
    modules_to_save += sorted(n for n in saved_modules if n not in modules_to_save)
    # clone: tied tensors (saved under two names) must not share memory in a safetensors file
    tensors = {k: t.to(dtype or t.dtype).contiguous().cpu().clone() for k, t in tensors.items()}

    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "use_rslora": False,
        "lora_dropout": config.dropout,
        "target_modules": sorted(weights),
        "fan_in_fan_out": uses_conv1d,
        "bias": "none",
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": True,
    }
    with atomic_directory(directory) as staging:  # both files or neither
        with open(os.path.join(staging, PEFT_CONFIG_NAME), "w") as f:
            json.dump(peft_config, f, indent=2, sort_keys=True)
            f.write("\n")
        save_file(tensors, os.path.join(staging, PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    return peft_config


def _tied_partners(model: nn.Module, saved) -> list:
    """Modules outside ``saved`` that share a parameter with a module in it (an input embedding tied to a saved
    ``lm_head``). Training the saved module trained them too, but PEFT copies each module it saves, so an
    export exact in PEFT must save them as well."""
    def related(n: str) -> bool:  # a saved module, inside one, or an ancestor of one (BERT's predictions.bias)
        return any(n == s or n.startswith(s + ".") or s.startswith(n + ".") or not n for s in saved)

    holders = parameter_names(model)
    partners = []
    for name in saved:
        for p in model.get_submodule(name).parameters():
            owners = [pname.rpartition(".")[0] for pname in holders.get(id(p), [])]
            partners += [m for m in owners if not related(m) and m not in partners]
    return partners
