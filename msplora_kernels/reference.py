"""The faithful, unfused MSPLoRA formulation: the test oracle and the benchmarks' ``reference``.

    y = x W^T + b + sum_s scale_s * (drop_s(x) A_s^T) B_s^T

with one independent (inverted) dropout per branch, exactly as the paper's published code computes it:
three separate branches, each reading its own dropped copy of ``x``. Nothing here is fast on purpose.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Branch = Tuple[torch.Tensor, torch.Tensor, float]  # (A: r x K, B: N x r, scaling)


def msplora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    branches: Sequence[Branch],
    dropout_p: float = 0.0,
    training: bool = False,
    masks: Optional[Sequence[torch.Tensor]] = None,
) -> torch.Tensor:
    """Three-branch MSPLoRA linear layer.

    ``weight`` is (N, K) as in ``nn.Linear``. ``masks``, when given, holds one boolean keep-mask of ``x``'s
    shape per branch and replaces the random dropout (used to check kernels that draw their own masks).
    """
    y = F.linear(x, weight, bias)
    for i, (a, b, scaling) in enumerate(branches):
        if masks is not None:
            keep = 1.0 - dropout_p
            dropped = x * masks[i].to(x.dtype) / keep
        else:
            dropped = F.dropout(x, dropout_p, training) if dropout_p > 0 else x
        y = y + F.linear(F.linear(dropped, a), b) * scaling
    return y
