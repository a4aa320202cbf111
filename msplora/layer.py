"""``LoraBranch`` (one A/B pair) and ``MSPLoraLinear``, the drop-in replacement for ``nn.Linear``.

An ``MSPLoraLinear`` *owns* its layer-specific branch and only *references* its global and mid branches:
those are shared with other layers, so exactly one module (``MSPLoraBank`` after ``apply_msplora``, or your
own container when building layers by hand) must own them. Holding the branch modules rather than their
tensors matters: DDP and FSDP2 swap the Parameters of the module that owns them, and each forward reads the
current ones.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from msplora_kernels import msplora_linear
from msplora_kernels.dispatch import check_backend_name

try:  # FSDP2 keeps sharded parameters as DTensors
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch builds without distributed
    DTensor = None

try:  # GPT-2 style layers store their weight transposed
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is optional for the layer itself
    Conv1D = None


def is_conv1d(module: nn.Module) -> bool:
    return Conv1D is not None and isinstance(module, Conv1D)


def linear_features(module: nn.Module) -> Tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a ``transformers`` ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"MSPLoRA adapts nn.Linear and transformers Conv1D layers, got {type(module).__name__}")


class LoraBranch(nn.Module):
    """One low-rank pair: ``delta_y = scaling * (x A^T) B^T`` with A (rank, in), B (out, rank)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        use_rslora: bool = False,
        init_weights: Union[bool, str] = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = rank
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.reset_parameters(init_weights)

    @torch.no_grad()
    def reset_parameters(self, init_weights: Union[bool, str] = True) -> None:
        if init_weights == "gaussian":
            nn.init.normal_(self.A, std=1.0 / self.rank)
        else:  # PEFT's default, as for nn.Linear
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if init_weights is False:  # both random: a non-trivial adapter, for tests
            nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.B)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A``, the (out, in) update this branch adds to a weight."""
        return (self.B @ self.A) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, in={self.A.shape[1]}, out={self.B.shape[0]}, scaling={self.scaling:g}"


class MSPLoraLinear(nn.Module):
    """``base_layer(x) + sum over (global, mid, layer) of scaling_s * (drop_s(x) A_s^T) B_s^T``.

    ``base_layer`` (an ``nn.Linear`` or ``Conv1D``) is frozen and kept as is. ``layer_branch`` is owned by this
    module; ``global_branch`` and ``mid_branch`` are only referenced (see the module docstring). Any branch
    may be ``None`` (a disabled scale).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        global_branch: Optional[LoraBranch] = None,
        mid_branch: Optional[LoraBranch] = None,
        layer_branch: Optional[LoraBranch] = None,
        dropout: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear_features(base_layer)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        for name, branch in (("global", global_branch), ("mid", mid_branch), ("layer", layer_branch)):
            if branch is not None and tuple(branch.A.shape[1:]) + tuple(branch.B.shape[:1]) != (
                self.in_features,
                self.out_features,
            ):
                raise ValueError(
                    f"{name} branch is for a ({branch.A.shape[1]} -> {branch.B.shape[0]}) layer, "
                    f"base layer is ({self.in_features} -> {self.out_features})"
                )
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.layer_branch = layer_branch
        self._shared = (global_branch, mid_branch)  # a tuple: referenced, not registered
        self.dropout = float(dropout)
        self.backend = check_backend_name(backend)
        self.merged = False
        self.disabled = False

    def branches(self) -> Tuple[Optional[LoraBranch], Optional[LoraBranch], Optional[LoraBranch]]:
        """The (global, mid, layer) branches; ``None`` for a disabled scale."""
        return self._shared[0], self._shared[1], self.layer_branch

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (as PEFT's layers expose it: code that reads ``.weight.dtype`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def _active_branches(self):
        return [(b.A, b.B, b.scaling) for b in self.branches() if b is not None]

    def base_weight_and_bias(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The frozen weight as (out, in), a view for ``Conv1D``, and the bias."""
        weight = self.base_layer.weight
        return (weight.t() if is_conv1d(self.base_layer) else weight), self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = self._active_branches()
        if self.disabled or self.merged or not branches:
            return self.base_layer(x)
        if DTensor is not None and any(isinstance(a, DTensor) for a, _, _ in branches):
            raise RuntimeError(
                "MSPLoRA branch weights are still sharded (DTensor) when the layer runs: FSDP2 gathers a module's "
                "parameters only when that module's forward runs, and msplora_bank and LoraBranch modules are never "
                "called. Do not fully_shard model.msplora_bank or a LoraBranch: shard the decoder layers, then the "
                "root model (whose forward gathers the bank)"
            )
        weight, bias = self.base_weight_and_bias()
        # Shared branches live on one device; a device_map may have put this layer on another.
        branches = [(a.to(weight.device), b.to(weight.device), c) for a, b, c in branches]
        return msplora_linear(x, weight, bias, branches, self.dropout, self.training, self.backend)

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) update of all branches together, in fp32."""
        delta = None
        for branch in self.branches():
            if branch is not None:
                d = branch.delta_weight().float()
                delta = d if delta is None else delta + d
        return delta if delta is not None else torch.zeros(self.out_features, self.in_features)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight; the forward then runs the base layer alone."""
        if self.merged:
            warnings.warn("MSPLoraLinear is already merged; nothing to do", stacklevel=2)
            return
        self._add_to_base(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (equal up to rounding: not bit-exact, even in fp32)."""
        if not self.merged:
            warnings.warn("MSPLoraLinear is not merged; nothing to do", stacklevel=2)
            return
        self._add_to_base(-self.delta_weight())
        self.merged = False

    def _add_to_base(self, delta: torch.Tensor) -> None:
        weight = self.base_layer.weight
        delta = delta.to(weight.device)
        weight.add_((delta.t() if is_conv1d(self.base_layer) else delta).to(weight.dtype))

    def extra_repr(self) -> str:
        ranks = "/".join(str(b.rank) if b is not None else "0" for b in self.branches())
        return f"ranks={ranks}, dropout={self.dropout:g}, backend={self.backend!r}, merged={self.merged}"
