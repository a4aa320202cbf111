"""``MSPLoraConfig``: a typed, validated, JSON round-tripping description of an MSPLoRA adapter."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from msplora_kernels.dispatch import BACKENDS

SCALES = ("global", "mid", "layer")
CONFIG_NAME = "adapter_config.json"
INIT_CHOICES = (True, False, "gaussian")


@dataclass
class MSPLoraConfig:
    """Configuration of a Multi-Scale Pyramid LoRA adapter (field order follows the paper: global, mid, layer).

    Args:
        target_modules: which linear layers to adapt: a list of module-name suffixes (``["q_proj", "v_proj"]``),
            a regular expression matched against the full module name, or ``"all-linear"`` (every
            ``nn.Linear``/``Conv1D`` inside the repeated blocks, never the output head).
        ranks: ranks of the (global, mid, layer) branches; 0 disables a scale.
        alphas: LoRA alphas of the three branches; each branch scales by ``alpha / rank``.
        num_mid_groups: G, the number of contiguous layer groups that share a mid branch.
        dropout: probability of the (independent, per branch) dropout on the adapter input.
        use_rslora: scale by ``alpha / sqrt(rank)`` (rank-stabilised LoRA) instead of ``alpha / rank``.
        init_weights: ``True``: PEFT's default (A kaiming-uniform, B zeros, so the model is unchanged at start);
            ``"gaussian"``: A normal(0, 1/rank), B zeros; ``False``: A and B both random (tests and debugging).
        exclude_modules: names (suffix list or regex) never to adapt, even if ``target_modules`` matches them.
        modules_to_save: names (suffixes) of extra modules to train and save in full, e.g. a classifier head.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"``; ``auto`` defers to the
            ``MSPLORA_BACKEND`` environment variable, then picks Triton on CUDA and PyTorch elsewhere. A runtime
            choice: it is not written to ``adapter_config.json`` (an adapter trained on a GPU loads anywhere),
            and ``load_adapter(..., backend=...)`` sets it for the loaded layers.
    """

    target_modules: Union[List[str], str]
    ranks: Tuple[int, int, int] = (8, 4, 2)
    alphas: Tuple[float, float, float] = (16.0, 16.0, 16.0)
    num_mid_groups: int = 3
    dropout: float = 0.0
    use_rslora: bool = False
    init_weights: Union[bool, str] = True
    exclude_modules: Optional[Union[List[str], str]] = None
    modules_to_save: Optional[List[str]] = None
    backend: str = "auto"
    peft_type: str = field(default="MSPLORA", init=False)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"target_modules must be a non-empty list of names, got {self.target_modules!r}")
        elif not isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(f"target_modules must be a list of names or a regex string, got {self.target_modules!r}")
        self.target_modules = self._names("target_modules", self.target_modules)
        self.ranks = tuple(int(r) for r in self._triple("ranks", self.ranks, numbers.Integral))
        self.alphas = self._triple("alphas", self.alphas, numbers.Real)
        if any(r < 0 for r in self.ranks):
            raise ValueError(f"ranks must be >= 0, got {self.ranks}")
        if not any(self.ranks):
            raise ValueError(f"ranks must enable at least one scale, got {self.ranks}")
        if any(not math.isfinite(a) or a <= 0 for a in self.alphas):
            raise ValueError(f"alphas must be finite numbers > 0, got {self.alphas}")
        self.alphas = tuple(float(a) for a in self.alphas)
        if isinstance(self.num_mid_groups, bool) or not isinstance(self.num_mid_groups, numbers.Integral) \
                or self.num_mid_groups < 1:
            raise ValueError(f"num_mid_groups must be an integer >= 1, got {self.num_mid_groups!r}")
        self.num_mid_groups = int(self.num_mid_groups)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be a bool, got {self.use_rslora!r}")
        if not any(self.init_weights is c or self.init_weights == c for c in INIT_CHOICES if isinstance(c, str)) \
                and not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights must be one of {INIT_CHOICES}, got {self.init_weights!r}")
        if self.exclude_modules is not None:
            self.exclude_modules = self._names("exclude_modules", self.exclude_modules)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                raise ValueError("modules_to_save must be a list of module names, not a string")
            self.modules_to_save = self._names("modules_to_save", self.modules_to_save)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    @staticmethod
    def _names(name: str, value: Any) -> Union[List[str], str]:
        """A regex string (checked to compile) or a list of non-empty name strings."""
        if isinstance(value, str):
            if value == "all-linear":
                return value
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"{name} is not a valid regular expression ({e}): {value!r}") from None
            return value
        if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) and v for v in value):
            return list(value)
        raise ValueError(f"{name} must be a list of module names or a regex string, got {value!r}")

    @staticmethod
    def _triple(name: str, value: Any, kind) -> tuple:
        try:
            items = tuple(value)
        except TypeError:
            raise ValueError(f"{name} must be a sequence of 3 numbers (global, mid, layer), got {value!r}") from None
        if len(items) != 3 or not all(isinstance(v, kind) and not isinstance(v, bool) for v in items):
            raise ValueError(f"{name} must be 3 numbers (global, mid, layer), got {value!r}")
        return items

    def scaling(self, scale: str) -> float:
        """The multiplier ``alpha / rank`` (or ``alpha / sqrt(rank)``) of one scale."""
        i = SCALES.index(scale)
        rank = self.ranks[i]
        return self.alphas[i] / (rank**0.5 if self.use_rslora else rank)

    # --- serialisation (PEFT's conventions: adapter_config.json in a directory) ---
    def to_dict(self) -> Dict[str, Any]:
        """The persisted fields (``backend``, a runtime choice, is left out)."""
        out = dataclasses.asdict(self)
        out["ranks"], out["alphas"] = list(self.ranks), list(self.alphas)
        del out["backend"]
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "MSPLoraConfig":
        data = dict(data)
        data.pop("backend", None)  # written by msplora 0.1.0; a runtime choice, not part of the adapter
        peft_type = data.pop("peft_type", "MSPLORA")
        if peft_type != "MSPLORA":
            raise ValueError(f"not an MSPLoRA config: peft_type is {peft_type!r}")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MSPLoraConfig fields: {unknown}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            f.write(self.to_json_string() + "\n")

    @classmethod
    def from_pretrained(cls, directory: str) -> "MSPLoraConfig":
        path = os.path.join(directory, CONFIG_NAME)
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)
