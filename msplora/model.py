"""Turning a model into an MSPLoRA model and back: target matching, sites and groups, the bank that owns
shared branches, merge/unmerge/unload, disabling adapters, staged training and parameter counts.

Sites and groups: a targeted module ``model.layers.5.self_attn.q_proj`` belongs to the *site*
``model.layers.*.self_attn.q_proj``: its layer index is its position in the model's repeated block list, an
``nn.ModuleList`` (or ``nn.Sequential``) whose children all have the same class, whatever wraps the model
(``nn.Sequential``, a sentence-transformers model, a DDP or compiled wrapper). Where several such lists
nest on the path, the outermost one whose members agree in shape is used: a hierarchical model such as Swin
(stages of blocks, each stage its own width) gets one site per stage, with the block index starred. A site
with L layers (sorted by index, positions i = 0..L-1) gets one global branch, one mid branch per group
``floor(i * G / L)`` (G = ``num_mid_groups``; with G > L every layer is its own group) and one branch per
layer. The global and mid branches live once in ``model.msplora_bank``; layers reference them.

Every public function here accepts the model as the user holds it: bare, or wrapped by DDP, DataParallel
or ``torch.compile`` (see :func:`unwrap_model`).
"""
from __future__ import annotations

import contextlib
import copy
import re
import warnings
from collections import OrderedDict
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .config import SCALES, MSPLoraConfig
from . import quant
from .layer import LoraBranch, MSPLoraLinear, base_layer_device, is_conv1d, linear_features

BANK_NAME = "msplora_bank"


# ---------------------------------------------------------------------------------------------- wrappers
def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def check_not_data_parallel(model: nn.Module, what: str) -> None:
    """Adding adapters inside DDP/DataParallel is refused: DDP fixes the parameters it all-reduces when it wraps
    the model, so new adapters would train apart on every rank."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise ValueError(
            f"{what} would add adapters inside a {type(model).__name__} wrapper, which has already registered the "
            "parameters it synchronises (DDP would never average the new adapters' gradients). Add MSPLoRA to "
            "the bare model first, then wrap it"
        )


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside this package."""
    import sys

    package = __name__.rpartition(".")[0]
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(package + "."):
        frame, level = frame.f_back, level + 1
    return level


# ---------------------------------------------------------------------------------------------- matching
def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def block_lists(model: nn.Module) -> Dict[str, int]:
    """The repeated block lists, name -> length: every non-empty ``nn.ModuleList`` (hybrid decoders such as
    Jamba mix layer classes in theirs), and each ``nn.Sequential`` of two or more children of one class (a
    wrapper such as ``nn.Sequential(model)`` or a sentence-transformers pipeline is not one). ``""`` stands
    for the model itself when it is one."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            out[name] = len(module)
        elif isinstance(module, nn.Sequential) and len(module) > 1:
            if len({type(child) for child in module.children()}) == 1:
                out[name] = len(module)
    return out


def block_positions(name: str, lists: Dict[str, int]) -> List[int]:
    """The path positions of ``name`` that index a repeated block list, outermost first (the last position
    too: a list of linear layers is a stack of one-layer blocks)."""
    parts = name.split(".")
    return [i for i in range(len(parts)) if parts[i].isdigit() and ".".join(parts[:i]) in lists]


def _starred(name: str, position: int) -> Tuple[int, str]:
    parts = name.split(".")
    return int(parts[position]), ".".join(parts[:position] + ["*"] + parts[position + 1 :])


def _matches(name: str, patterns) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_targets(model: nn.Module, config: MSPLoraConfig) -> List[Tuple[str, nn.Module]]:
    """The (name, module) pairs ``config`` selects, in model order; a clear error if a match is not linear."""
    targets = []
    attention_modules = {n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    lists = block_lists(model) if config.target_modules == "all-linear" else {}
    for name, module in model.named_modules():
        if not name or name == BANK_NAME or name.startswith(BANK_NAME + "."):
            continue
        if config.target_modules == "all-linear":
            linear = is_linear(module) or quant.looks_like_quantised_linear(module)  # other quantisers: refused below
            selected = linear and bool(block_positions(name, lists))
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
    bank = getattr(unwrap_model(model), BANK_NAME, None)
    if not isinstance(bank, MSPLoraBank):
        raise ValueError("this model has no MSPLoRA adapters: call msplora.apply_msplora(model, config) first")
    return bank


def has_msplora(model: nn.Module) -> bool:
    model = unwrap_model(model)
    return isinstance(getattr(model, BANK_NAME, None), MSPLoraBank) or any(
        isinstance(m, MSPLoraLinear) for m in model.modules()
    )


def msplora_layers(model: nn.Module) -> Iterator[Tuple[str, MSPLoraLinear]]:
    """(name, layer) of every ``MSPLoraLinear``, names as in the unwrapped model."""
    for name, module in unwrap_model(model).named_modules():
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
    check_not_data_parallel(model, "apply_msplora")
    wrapper, model = model, unwrap_model(model)
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

    _check_untied(model, targets)
    by_site = assign_sites(model, targets)
    for site, members in by_site.items():  # validate everything before changing anything
        shapes = {linear_features(m) for _, _, m in members}
        if len(shapes) != 1:
            raise ValueError(f"site {site} has layers of different shapes {sorted(shapes)}; they cannot share branches")
    _warn_lonely_sites(by_site)

    for p in model.parameters():
        p.requires_grad_(False)
    config = copy.deepcopy(config)  # the caller's object may change later; the adapter must not
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
            layer = MSPLoraLinear(module, bank.global_branch(site), bank.mid_branch(site, group), layer_branch,
                                  config.dropout, config.backend)
            replacements.append((name, layer.train(module.training)))  # an eval-mode model stays inference-ready
    for name, layer in replacements:
        _set_submodule(model, name, layer)
    model.add_module(BANK_NAME, bank.train(model.training))
    _guard_save_pretrained(model)
    for name, module in model.named_modules():
        if config.modules_to_save and _matches(name, config.modules_to_save):
            for p in module.parameters():
                p.requires_grad_(True)
    return wrapper


def assign_sites(model: nn.Module, targets: Sequence[Tuple[str, nn.Module]]):
    """Group targets into sites: ``{site: [(layer index, name, module), ...]}`` sorted by index, in model order.

    Each target's path is starred at its outermost repeated block list (see the module docstring). If any
    site formed from one block list would mix shapes, every target in that list is starred one block list
    further in instead (Swin: stages of different widths give one site per stage and block position).
    """
    lists = block_lists(model)
    sites: "OrderedDict[str, List[Tuple[int, str, nn.Module]]]" = OrderedDict()

    def list_of(name: str, positions: List[int], level: int) -> str:
        return ".".join(name.split(".")[: positions[level]]) if level < len(positions) else name

    def place(items, level: int) -> None:
        by_list: "OrderedDict[str, list]" = OrderedDict()
        for item in items:
            by_list.setdefault(list_of(item[0], item[2], level), []).append(item)
        for members in by_list.values():
            groups: "OrderedDict[str, list]" = OrderedDict()
            for name, module, positions in members:
                index, site = _starred(name, positions[level]) if level < len(positions) else (0, name)
                groups.setdefault(site, []).append((index, name, module))
            mixed = any(len({linear_features(m) for _, _, m in g}) > 1 for g in groups.values())
            if mixed and any(level + 1 < len(positions) for *_, positions in members):
                place(members, level + 1)
                continue
            for site, group in groups.items():
                sites[site] = sorted(group, key=lambda t: t[0])

    place([(name, module, block_positions(name, lists)) for name, module in targets], 0)
    order = {name: i for i, (name, _) in enumerate(targets)}  # sites in model order of their first layer
    return OrderedDict(sorted(sites.items(), key=lambda kv: min(order[n] for _, n, _ in kv[1])))


def parameter_names(model: nn.Module) -> Dict[int, List[str]]:
    """Every name of each parameter, by ``id``: a tied weight (``lm_head.weight`` is
    ``model.embed_tokens.weight``) has several."""
    holders: Dict[int, List[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(pname)
    return holders


def _check_untied(model: nn.Module, targets: Sequence[Tuple[str, nn.Module]]) -> None:
    """Refuse targets whose weight another module shares (an ``lm_head`` tied to the input embeddings)."""
    holders = parameter_names(model)
    for name, module in targets:
        others = [n for n in holders.get(id(module.weight), []) if n != f"{name}.weight"]
        if others:
            raise ValueError(
                f"target {name}: its weight is tied to {others[0]} (e.g. tie_word_embeddings), so merging the adapter "
                "would rewrite that module too, and tie_weights, resize_token_embeddings and save_pretrained would "
                f"break. Leave {name} out of target_modules (or in exclude_modules), or untie it first: "
                f"model.config.tie_word_embeddings = False; then give {name} its own copy, "
                f"e.g. module.weight = nn.Parameter(module.weight.detach().clone())"
            )


def _warn_lonely_sites(by_site) -> None:
    most = max(len(members) for members in by_site.values())
    lonely = [site for site, members in by_site.items() if len(members) == 1]
    if most > 1 and lonely:
        warnings.warn(
            f"{len(lonely)} site(s) have a single layer while others have up to {most}: {lonely[:3]}. They share "
            "nothing (global and mid branches of their own). Expected for a lone module such as a head; otherwise "
            "the module is outside the model's repeated block list",
            stacklevel=_user_stacklevel(),
        )


def _guard_save_pretrained(model: nn.Module) -> None:
    """Every module with a ``save_pretrained`` that holds adapted layers (the model, and e.g. ``model.model``
    or a sentence-transformers ``auto_model``) gets the refusing stand-in; :func:`unload` removes them."""
    for module in model.modules():
        if callable(getattr(module, "save_pretrained", None)) and any(
            isinstance(m, MSPLoraLinear) for m in module.modules()
        ):
            module.save_pretrained = _RefuseSavePretrained()


def _unguard_save_pretrained(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module.__dict__.get("save_pretrained"), _RefuseSavePretrained):
            del module.__dict__["save_pretrained"]


class _RefuseSavePretrained:
    """Stands in for ``model.save_pretrained`` while adapters are in (picklable: holds no reference)."""

    def __call__(self, *args, **kwargs):
        raise ValueError(
            "save_pretrained on a model with MSPLoRA adapters would write a checkpoint that from_pretrained reloads "
            "with every adapted projection re-initialised at random (their weights sit under base_layer.*). "
            "Save the adapter with msplora.save_adapter(model, dir) (reload: msplora.load_adapter(base_model, dir)), "
            "or a plain model with the update merged with msplora.unload(model, merge=True).save_pretrained(dir); "
            "with the Hugging Face Trainer use msplora.MSPLoraTrainer, whose checkpoints hold the adapter"
        )


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
    inner = unwrap_model(model)
    for name, layer in list(msplora_layers(inner)):
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        _set_submodule(inner, name, layer.base_layer)
    delattr(inner, BANK_NAME)
    _unguard_save_pretrained(inner)
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


def set_trainable_scales(model: nn.Module, scales: Union[str, Iterable[str]]) -> nn.Module:
    """Train only the given scales (``{"global"}``, ``{"global", "mid"}``, ...): the others get
    ``requires_grad=False`` and so no gradient.

    Under DDP, which fixes the parameters it reduces when it wraps the model, either choose the scales
    before wrapping, or wrap with ``find_unused_parameters=True`` (Trainer: ``ddp_find_unused_parameters=True``)
    so that frozen scales are skipped; their ``.grad`` then stays ``None`` and optimizers leave them alone.
    """
    if isinstance(scales, str):
        scales = {scales}
    elif isinstance(scales, Iterable):
        scales = set(scales)
    else:
        raise ValueError(f"scales must be a scale name or a collection of them, from {SCALES}; got {scales!r}")
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
    params = list(unwrap_model(model).parameters())
    counts["total"] = sum(quant.num_elements(p) for p in params if p.requires_grad)
    counts["all"] = sum(quant.num_elements(p) for p in params)  # packed 4-bit weights unpacked
    return counts


def print_trainable_parameters(model: nn.Module) -> None:
    c = trainable_parameters(model)
    print(
        f"trainable params: {c['total']:,} || all params: {c['all']:,} || trainable%: {100 * c['total'] / c['all']:.4f}"
        f" || adapter: global {c['global']:,}, mid {c['mid']:,}, layer {c['layer']:,}"
    )


def count_parameters(
    hf_config, config: MSPLoraConfig, lora_rank: Optional[int] = None, model_class=None
) -> Dict[str, object]:
    """Adapter sizes of MSPLoRA and of plain LoRA (rank ``lora_rank``, default the largest MSPLoRA rank)
    on the same targets, computed on the meta device: no weights are allocated or downloaded.

    The model built is ``model_class`` if given, else the architecture ``hf_config.architectures`` names
    (e.g. ``LlamaForCausalLM``, with its head, so ``modules_to_save=["lm_head"]`` counts), else ``AutoModel``.
    """
    import transformers

    if lora_rank is not None and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1):
        raise ValueError(f"lora_rank must be an integer >= 1, got {lora_rank!r}")
    lora_rank = lora_rank or max(config.ranks)
    if model_class is None:
        names = getattr(hf_config, "architectures", None) or []
        model_class = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    with torch.device("meta"):
        model = model_class(hf_config) if model_class is not None else transformers.AutoModel.from_config(hf_config)
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
