"""Turning a model into an MSPLoRA model and back: target matching, sites and groups, the bank that owns
shared branches, merge/unmerge/unload, disabling adapters, staged training and parameter counts.

Sites and groups: a targeted module ``model.layers.5.self_attn.q_proj`` belongs to the *site*
``model.layers.*.self_attn.q_proj`` (its first integer path component is the layer index). A site with
L layers (sorted by index, positions i = 0..L-1) gets one global branch, one mid branch per group
``floor(i * G / L)`` (G = ``num_mid_groups``; with G > L every layer is its own group) and one branch per
layer. The global and mid branches live once in ``model.msplora_bank``; layers reference them.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from collections import OrderedDict
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .config import SCALES, MSPLoraConfig
from . import quant
from .layer import LoraBranch, MSPLoraLinear, base_layer_device, is_conv1d, linear_features

BANK_NAME = "msplora_bank"


# ---------------------------------------------------------------------------------------------- matching
def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def layer_index(name: str) -> Tuple[Optional[int], str]:
    """(layer index, site) of a module name: the first integer path component, replaced by ``*``."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[:i] + ["*"] + parts[i + 1 :])
    return None, name


def _matches(name: str, patterns) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_targets(model: nn.Module, config: MSPLoraConfig) -> List[Tuple[str, nn.Module]]:
    """The (name, module) pairs ``config`` selects, in model order; a clear error if a match is not linear."""
    targets = []
    attention_modules = {n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    for name, module in model.named_modules():
        if not name or name == BANK_NAME or name.startswith(BANK_NAME + "."):
            continue
        if config.target_modules == "all-linear":
            linear = is_linear(module) or quant.looks_like_quantised_linear(module)  # other quantisers: refused below
            selected = linear and layer_index(name)[0] is not None
        else:
            selected = _matches(name, config.target_modules)
        if selected and config.exclude_modules is not None and _matches(name, config.exclude_modules):
            selected = False
        if not selected:
            continue
        if name.rpartition(".")[0] in attention_modules:
            # nn.MultiheadAttention reads out_proj.weight directly and never calls out_proj.
            if config.target_modules == "all-linear":
                continue
            raise ValueError(
                f"target {name} is the out_proj of an nn.MultiheadAttention, which uses its weight directly "
                "instead of calling it, so it cannot be adapted; exclude it (exclude_modules)"
            )
        if isinstance(module, MSPLoraLinear):
            raise ValueError(f"{name} is already an MSPLoraLinear: the model already has MSPLoRA adapters")
        quant.check_supported(name, module)  # other quantisers' layers: refused, naming the layer type
        if not is_linear(module):
            raise ValueError(
                f"target {name} is a {type(module).__name__}; MSPLoRA adapts nn.Linear and Conv1D layers only "
                "(narrow target_modules, e.g. with a longer suffix)"
            )
        targets.append((name, module))
    return targets


def group_positions(num_layers: int, num_groups: int) -> List[int]:
    """Mid-group id of each layer position: ``floor(i * G / L)``, densely renumbered (G > L gives L groups)."""
    raw = [i * num_groups // num_layers for i in range(num_layers)]
    dense = {g: j for j, g in enumerate(sorted(set(raw)))}
    return [dense[g] for g in raw]


# ---------------------------------------------------------------------------------------------- the bank
def _site_key(site: str) -> str:
    return site.replace(".", "__").replace("*", "N")


class MSPLoraBank(nn.Module):
    """Owns every shared (global and mid) branch of a model, once, so that DDP/FSDP2 see one owner.

    ``sites`` maps each site to its layers' module names (sorted by layer index), their mid-group ids and the
    key of its branches in ``global_branches``/``mid_branches``.
    """

    def __init__(self, config: MSPLoraConfig) -> None:
        super().__init__()
        self.config = config
        self.global_branches = nn.ModuleDict()
        self.mid_branches = nn.ModuleDict()
        self.sites: "OrderedDict[str, Dict[str, list]]" = OrderedDict()

    def add_site(self, site: str, names: Sequence[str], groups: Sequence[int], in_f: int, out_f: int, **factory):
        cfg = self.config
        key = _site_key(site)
        taken = {info["key"] for info in self.sites.values()}
        suffix = 1
        while key in taken:  # module names with "__" could map two sites to one key
            key, suffix = f"{_site_key(site)}_{suffix}", suffix + 1
        self.sites[site] = {"layers": list(names), "groups": list(groups), "key": key}
        if cfg.ranks[0]:
            self.global_branches[key] = self._branch(in_f, out_f, 0, factory)
        if cfg.ranks[1]:
            self.mid_branches[key] = nn.ModuleList(
                [self._branch(in_f, out_f, 1, factory) for _ in range(max(groups) + 1)]
            )

    def _branch(self, in_f: int, out_f: int, scale: int, factory) -> LoraBranch:
        cfg = self.config
        return LoraBranch(
            in_f, out_f, cfg.ranks[scale], cfg.alphas[scale], cfg.use_rslora, cfg.init_weights, **factory
        )

    def global_branch(self, site: str) -> Optional[LoraBranch]:
        return self.global_branches[self.sites[site]["key"]] if self.config.ranks[0] else None

    def mid_branch(self, site: str, group: int) -> Optional[LoraBranch]:
        return self.mid_branches[self.sites[site]["key"]][group] if self.config.ranks[1] else None

    def extra_repr(self) -> str:
        return f"sites={len(self.sites)}, ranks={self.config.ranks}, num_mid_groups={self.config.num_mid_groups}"


def get_bank(model: nn.Module) -> MSPLoraBank:
    bank = getattr(model, BANK_NAME, None)
    if not isinstance(bank, MSPLoraBank):
        raise ValueError("this model has no MSPLoRA adapters: call msplora.apply_msplora(model, config) first")
    return bank


def has_msplora(model: nn.Module) -> bool:
    return isinstance(getattr(model, BANK_NAME, None), MSPLoraBank) or any(
        isinstance(m, MSPLoraLinear) for m in model.modules()
    )


def msplora_layers(model: nn.Module) -> Iterator[Tuple[str, MSPLoraLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, MSPLoraLinear):
            yield name, module


# -------------------------------------------------------------------------------------------- injection
def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _linear_names(model: nn.Module, limit: int = 8) -> List[str]:
    names = [n for n, m in model.named_modules() if is_linear(m)]
    return names[:limit] + (["..."] if len(names) > limit else [])


def apply_msplora(model: nn.Module, config: MSPLoraConfig) -> nn.Module:
    """Replace each targeted linear layer of ``model`` in place by an ``MSPLoraLinear`` and freeze the rest.

    Shared branches go into ``model.msplora_bank``; adapter weights are fp32 on the device of the layer
    they adapt (the kernels cast them to the activation dtype). Returns ``model``.
    """
    if not isinstance(config, MSPLoraConfig):
        raise TypeError(f"config must be an MSPLoraConfig, got {type(config).__name__}")
    if has_msplora(model):
        raise ValueError("the model already has MSPLoRA adapters; call msplora.unload(model) before applying again")
    targets = find_targets(model, config)
    if not targets:
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module. Linear modules in this model "
            f"include: {_linear_names(model)}"
        )
    fast_path_layers = {n for n, m in model.named_modules() if isinstance(m, nn.TransformerEncoderLayer)}
    if any(name.rpartition(".")[0] in fast_path_layers for name, _ in targets):
        warnings.warn(
            "nn.TransformerEncoderLayer's inference fast path (eval mode, no grad) reads its linear weights "
            "directly and so bypasses MSPLoRA adapters; run such layers with gradients enabled or in train mode, "
            "or merge the adapters (msplora.merge) for inference",
            stacklevel=2,
        )
    if config.modules_to_save:
        missing = [n for n in config.modules_to_save if not any(_matches(m, [n]) for m, _ in model.named_modules())]
        if missing:
            raise ValueError(f"modules_to_save names no module of this model: {missing}")
        overlap = [n for n, _ in targets if _matches(n, config.modules_to_save)]
        if overlap:
            raise ValueError(f"modules_to_save and target_modules both select {overlap[:3]}; a module is adapted or saved in full, not both")

    by_site: "OrderedDict[str, List[Tuple[int, str, nn.Module]]]" = OrderedDict()
    for name, module in targets:
        index, site = layer_index(name)
        by_site.setdefault(site, []).append((index if index is not None else 0, name, module))

    for site, members in by_site.items():  # validate everything before changing anything
        members.sort(key=lambda t: t[0])
        shapes = {linear_features(m) for _, _, m in members}
        if len(shapes) != 1:
            raise ValueError(f"site {site} has layers of different shapes {sorted(shapes)}; they cannot share branches")

    for p in model.parameters():
        p.requires_grad_(False)
    bank = MSPLoraBank(config)
    replacements = []
    for site, members in by_site.items():
        in_f, out_f = linear_features(members[0][2])
        groups = group_positions(len(members), config.num_mid_groups)
        factory = dict(device=base_layer_device(members[0][2]), dtype=torch.float32)
        bank.add_site(site, [n for _, n, _ in members], groups, in_f, out_f, **factory)
        for (_, name, module), group in zip(members, groups):
            own = dict(factory, device=base_layer_device(module))  # a device_map may spread layers over devices
            layer_branch = bank._branch(in_f, out_f, 2, own) if config.ranks[2] else None
            replacements.append(
                (name, MSPLoraLinear(module, bank.global_branch(site), bank.mid_branch(site, group), layer_branch,
                                     config.dropout, config.backend))
            )
    for name, layer in replacements:
        _set_submodule(model, name, layer)
    model.add_module(BANK_NAME, bank)
    for name, module in model.named_modules():
        if config.modules_to_save and _matches(name, config.modules_to_save):
            for p in module.parameters():
                p.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------------- merge and unload
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (forward then costs what the base model costs)."""
    get_bank(model)
    for _, layer in msplora_layers(model):
        if not layer.merged:
            layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`."""
    get_bank(model)
    for _, layer in msplora_layers(model):
        if layer.merged:
            layer.unmerge()
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the plain base modules back (with the adapters merged into them if ``merge``) and drop the bank."""
    get_bank(model)
    for name, layer in list(msplora_layers(model)):
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
    delattr(model, BANK_NAME)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes its base output (merged adapters are unmerged, then restored)."""
    get_bank(model)
    layers = [layer for _, layer in msplora_layers(model)]
    remerge = [layer for layer in layers if layer.merged]
    for layer in remerge:
        layer.unmerge()
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was
        for layer in remerge:
            layer.merge()


# ------------------------------------------------------------------------------- scales and parameters
def scale_parameters(model: nn.Module) -> Dict[str, List[nn.Parameter]]:
    """The adapter Parameters of each scale, each exactly once."""
    bank = get_bank(model)
    out: Dict[str, List[nn.Parameter]] = {
        "global": list(bank.global_branches.parameters()),
        "mid": list(bank.mid_branches.parameters()),
        "layer": [],
    }
    for _, layer in msplora_layers(model):
        if layer.layer_branch is not None:
            out["layer"].extend(layer.layer_branch.parameters())
    return out


def set_trainable_scales(model: nn.Module, scales: Iterable[str]) -> nn.Module:
    """Train only the given scales (``{"global"}``, ``{"global", "mid"}``, ...): the others get
    ``requires_grad=False`` and so no gradient.

    Under DDP, which fixes the parameters it reduces when it wraps the model, either choose the scales
    before wrapping, or wrap with ``find_unused_parameters=True`` (Trainer: ``ddp_find_unused_parameters=True``)
    so that frozen scales are skipped; their ``.grad`` then stays ``None`` and optimizers leave them alone.
    """
    scales = set(scales)
    unknown = scales - set(SCALES)
    if unknown:
        raise ValueError(f"unknown scales {sorted(unknown)}; choose from {SCALES}")
    for scale, params in scale_parameters(model).items():
        for p in params:
            p.requires_grad_(scale in scales)
            if scale not in scales:
                p.grad = None
    return model


def trainable_parameters(model: nn.Module) -> Dict[str, int]:
    """Adapter parameter counts per scale (each shared tensor once), ``"adapter"`` (their sum),
    ``"total"`` (everything that requires grad, e.g. a head in ``modules_to_save``) and ``"all"``."""
    counts = {scale: sum(p.numel() for p in ps) for scale, ps in scale_parameters(model).items()}
    counts["adapter"] = sum(counts[s] for s in SCALES)
    counts["total"] = sum(quant.num_elements(p) for p in model.parameters() if p.requires_grad)
    counts["all"] = sum(quant.num_elements(p) for p in model.parameters())  # packed 4-bit weights unpacked
    return counts


def print_trainable_parameters(model: nn.Module) -> None:
    c = trainable_parameters(model)
    print(
        f"trainable params: {c['total']:,} || all params: {c['all']:,} || trainable%: {100 * c['total'] / c['all']:.4f}"
        f" || adapter: global {c['global']:,}, mid {c['mid']:,}, layer {c['layer']:,}"
    )


def count_parameters(hf_config, config: MSPLoraConfig, lora_rank: Optional[int] = None) -> Dict[str, object]:
    """Adapter sizes of MSPLoRA and of plain LoRA (rank ``lora_rank``, default the largest MSPLoRA rank)
    on the same targets, computed on the meta device: no weights are allocated or downloaded."""
    from transformers import AutoModel

    lora_rank = lora_rank or max(config.ranks)
    with torch.device("meta"):
        model = AutoModel.from_config(hf_config)
    targets = find_targets(model, config)
    if not targets:
        raise ValueError(f"target_modules={config.target_modules!r} matched no module of this model")
    lora = sum(lora_rank * sum(linear_features(m)) for _, m in targets)
    apply_msplora(model, config)
    counts = trainable_parameters(model)
    return {
        "lora": lora,
        "lora_rank": lora_rank,
        "msplora": counts["adapter"],
        "msplora_per_scale": {s: counts[s] for s in SCALES},
        "num_target_layers": len(targets),
        "ratio": counts["adapter"] / lora,
    }
