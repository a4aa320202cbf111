"""MSPLoRA with the Hugging Face ``Trainer``: staged training (global, then mid, then layer scales) and
checkpoints that hold the adapter only.

Staged training and the optimizer. The ``Trainer`` builds its optimizer (and, under DDP, wraps the model)
from the parameters that require grad *before* training starts, so every adapter parameter must require
grad then; :class:`StagedTrainingCallback` freezes scales only from ``on_train_begin`` on, and checks that
the optimizer holds every adapter parameter. A frozen scale gets ``requires_grad=False`` and ``.grad = None``;
``torch.optim`` optimizers skip parameters without a gradient entirely (no weight decay, no moment update),
so frozen scales keep their values bit for bit.

Under DDP the set of parameters to all-reduce is fixed when the model is wrapped. A scale frozen later never
produces a gradient, which DDP only tolerates with ``find_unused_parameters=True``: it then marks the frozen
parameters as unused on every rank, reduces the rest, and leaves the frozen gradients ``None``. The
``Trainer`` passes ``find_unused_parameters=True`` by default (unless gradient checkpointing is on); the
callback raises an error if ``ddp_find_unused_parameters=False`` was chosen. Plain PyTorch loops: wrap with
``DistributedDataParallel(model, find_unused_parameters=True)`` and call
:func:`msplora.set_trainable_scales` at the stage boundaries.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.training_args import ParallelMode

from .config import SCALES
from .io import WEIGHTS_NAME, load_adapter, save_adapter
from .model import get_bank, scale_parameters, set_trainable_scales, unwrap_model  # noqa: F401 (re-exported)

TRAINING_ARGS_NAME = "training_args.bin"


class StagedTrainingCallback(TrainerCallback):
    """Train the scales one after another: global, then mid, then layer, as the paper's staged training does.

    Args:
        fractions: the share of the optimizer steps given to each of (global, mid, layer); they must sum to 1.
            ``None`` (default): equal shares over the enabled scales (thirds with all three enabled). A scale
            disabled by rank 0 must get share 0.
        cumulative: ``False`` (default, as in the paper): only the current stage's scale trains.
            ``True``: scales stay trainable once their stage has started (global, then global + mid, ...).

    Stages are measured in optimizer steps (``state.max_steps``), so they work for epoch- and step-based
    schedules and resume at the right stage from a checkpoint. At the end of training all enabled scales
    are trainable again.
    """

    def __init__(self, fractions: Optional[Sequence[float]] = None, cumulative: bool = False) -> None:
        if fractions is not None:
            fractions = tuple(float(f) for f in fractions)
            if len(fractions) != len(SCALES) or any(f < 0 or math.isnan(f) for f in fractions):
                raise ValueError(f"fractions must be 3 non-negative numbers (global, mid, layer), got {fractions}")
            if not math.isclose(sum(fractions), 1.0, rel_tol=0, abs_tol=1e-6):
                raise ValueError(f"fractions must sum to 1, got {fractions} (sum {sum(fractions):g})")
        self.fractions = fractions
        self.cumulative = bool(cumulative)
        self.current_stage: Optional[int] = None
        self._starts: List[int] = []
        self._scales: List[str] = []

    def stage_starts(self, model: nn.Module, max_steps: int) -> Dict[str, int]:
        """The optimizer step at which each enabled scale's stage begins."""
        ranks = get_bank(model).config.ranks
        enabled = [s for s, r in zip(SCALES, ranks) if r > 0]
        fractions = self.fractions
        if fractions is None:
            fractions = tuple(1.0 / len(enabled) if r > 0 else 0.0 for r in ranks)
        for scale, rank, fraction in zip(SCALES, ranks, fractions):
            if rank == 0 and fraction > 0:
                raise ValueError(f"StagedTrainingCallback gives the {scale} scale a share {fraction:g}, but its "
                                 "rank is 0 (disabled): give it 0")
        starts, cumulated = {}, 0.0
        for scale, fraction in zip(SCALES, fractions):
            if scale in enabled:
                starts[scale] = round(cumulated * max_steps)
            cumulated += fraction
        return starts

    def stage_at(self, step: int) -> int:
        return max(i for i, start in enumerate(self._starts) if start <= step or i == 0)

    def _enter(self, model: nn.Module, step: int) -> None:
        stage = self.stage_at(step)
        if stage != self.current_stage:
            active = self._scales[: stage + 1] if self.cumulative else [self._scales[stage]]
            set_trainable_scales(model, active)
            self.current_stage = stage

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model = unwrap_model(kwargs["model"])
        self._check_distributed(args, model)
        self._check_optimizer(model, kwargs.get("optimizer"))
        starts = self.stage_starts(model, state.max_steps)
        self._check_stage_lengths(model, starts, state.max_steps)
        self._scales, self._starts = list(starts), list(starts.values())
        self.current_stage = None
        self._enter(model, state.global_step)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._enter(unwrap_model(kwargs["model"]), state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        set_trainable_scales(unwrap_model(kwargs["model"]), SCALES)
        self.current_stage = None

    def _check_stage_lengths(self, model: nn.Module, starts: Dict[str, int], max_steps: int) -> None:
        """Every stage given a share must get at least one optimizer step: it would be skipped silently."""
        bounds = list(starts.values()) + [max_steps]
        lengths = {scale: bounds[i + 1] - bounds[i] for i, scale in enumerate(starts)}
        shares = dict(zip(SCALES, self.fractions)) if self.fractions is not None else {}
        empty = [scale for scale, length in lengths.items() if length < 1 and shares.get(scale, 1.0) > 0]
        if empty:
            raise ValueError(
                f"StagedTrainingCallback: {max_steps} optimizer step(s) give the stages {lengths} steps, so the "
                f"{'/'.join(empty)} stage(s) would never train. Train for at least {len(starts)} steps "
                "(max_steps, or more epochs/data), or change fractions"
            )

    @staticmethod
    def _check_optimizer(model: nn.Module, optimizer) -> None:
        if optimizer is None:
            return
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [scale for scale, params in scale_parameters(model).items()
                   if any(id(p) not in in_optimizer for p in params)]
        if missing:
            raise ValueError(
                f"the optimizer does not hold the {'/'.join(missing)} adapter parameters, so their stage could not "
                "train them. The Trainer builds its optimizer from the parameters requiring grad: leave every scale "
                "trainable when creating the Trainer (StagedTrainingCallback freezes scales itself)"
            )

    @staticmethod
    def _check_distributed(args: TrainingArguments, model: nn.Module) -> None:
        if args.parallel_mode != ParallelMode.DISTRIBUTED:
            return
        find_unused = args.ddp_find_unused_parameters
        if find_unused is None:  # the Trainer's own default: on unless activation checkpointing is
            checkpointing = getattr(model, "is_activation_checkpointing", None)
            if checkpointing is None:  # transformers < 5
                checkpointing = getattr(model, "is_gradient_checkpointing", False)
            find_unused = not (checkpointing or getattr(args, "activation_checkpointing", False)
                               or getattr(args, "gradient_checkpointing", False))
        if not find_unused:
            raise ValueError(
                "StagedTrainingCallback under DDP needs ddp_find_unused_parameters=True in TrainingArguments: DDP "
                "fixes what it all-reduces when it wraps the model, and frozen scales produce no gradient"
            )


class MSPLoraTrainer(Trainer):
    """A ``Trainer`` whose checkpoints (and ``save_model``) hold the MSPLoRA adapter only: ``adapter_config.json``
    and ``adapter_model.safetensors`` with every shared tensor once, beside the optimizer, scheduler, RNG and
    trainer state the ``Trainer`` writes. ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end``
    load the adapter back into the model. Under FSDP (``TrainingArguments(fsdp=...)``) it refuses to start:
    its adapter files are written from whole tensors, which FSDP holds sharded."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled or self.args.fsdp:  # args too: a second Trainer shares the first one's state
            raise ValueError(
                "MSPLoraTrainer does not support FSDP: its adapter checkpoints are written from whole tensors, "
                "which FSDP keeps sharded. Train with DDP, or shard with torch.distributed.fsdp.fully_shard "
                "(decoder layers, then the root) in your own training loop"
            )

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_adapter(unwrap_model(self.model), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        if not os.path.isfile(os.path.join(resume_from_checkpoint, WEIGHTS_NAME)):
            raise ValueError(f"no MSPLoRA adapter ({WEIGHTS_NAME}) in checkpoint {resume_from_checkpoint}")
        load_adapter(unwrap_model(model if model is not None else self.model), resume_from_checkpoint, is_trainable=True)

    def _load_best_model(self) -> None:
        load_adapter(unwrap_model(self.model), self.state.best_model_checkpoint, is_trainable=True)
