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

import contextlib
import math
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.training_args import ParallelMode

from .config import SCALES, MSPLoraConfig
from .io import (WEIGHTS_NAME, _check_scalings, _check_state, _read_weights, adapter_parameters, load_adapter,
                 save_adapter, write_adapter)
from .model import get_bank, has_msplora, scale_parameters, set_trainable_scales, unwrap_model  # noqa: F401

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
                f"{'/'.join(empty)} stage(s) would never train. Give every stage at least one step: more "
                "optimizer steps (max_steps, epochs or data) or larger fractions for those stages"
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


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


def is_sharded(model: nn.Module) -> bool:
    """Whether any adapter parameter of ``model`` is an FSDP2 shard (a DTensor)."""
    return any(_is_dtensor(p) for p in adapter_parameters(unwrap_model(model)).values())


def gather_adapter_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every adapter tensor whole, on the CPU, under its file key; a collective under FSDP2: every rank must call
    it. Each shard is gathered with ``DTensor.full_tensor()``, so the file holds the full tensors, never one
    rank's shard (the trap of accelerate#4206)."""
    out = {}
    for key, p in adapter_parameters(unwrap_model(model)).items():
        t = p.detach()
        out[key] = (t.full_tensor() if _is_dtensor(t) else t).contiguous().cpu()
    return out


def save_sharded_adapter(model: nn.Module, directory: str, is_main_process: bool = True) -> None:
    """:func:`msplora.save_adapter` for a model whose adapters FSDP2 shards: all ranks gather, the main one
    writes the same two files (``adapter_config.json``, ``adapter_model.safetensors``)."""
    state = gather_adapter_state(model)
    if is_main_process:
        write_adapter(directory, get_bank(model).config, state)


@torch.no_grad()
def load_sharded_adapter(model: nn.Module, directory: str) -> nn.Module:
    """Load a saved adapter into a model whose adapters FSDP2 shards: every rank reads the full tensors and
    keeps its own shard (``distribute_tensor`` without communication). Scalings, keys and shapes are checked
    before anything is copied, as :func:`msplora.load_adapter` does; plain (unsharded) parameters are copied
    whole."""
    from torch.distributed.tensor import distribute_tensor

    model = unwrap_model(model)
    _check_scalings(get_bank(model).config, MSPLoraConfig.from_pretrained(directory), directory)
    path = os.path.join(directory, WEIGHTS_NAME)
    found = _read_weights(path)
    expected = adapter_parameters(model)
    _check_state(expected, found, path)
    for key, p in expected.items():
        if _is_dtensor(p):
            local = found[key].to(device=p.to_local().device, dtype=p.dtype)
            p.copy_(distribute_tensor(local, p.device_mesh, p.placements, src_data_rank=None))
        else:
            p.copy_(found[key].to(device=p.device, dtype=p.dtype))
    return model


@contextlib.contextmanager
def _adapters_declared_to_transformers(model: Optional[nn.Module]):
    """The ``Trainer`` refuses a quantised model without PEFT adapters ("You cannot perform fine-tuning on purely
    quantized models"), knowing nothing of MSPLoRA's. While it checks, a quantised model with MSPLoRA adapters
    carries the flag transformers sets for adapters it loaded itself (``_hf_peft_config_loaded``)."""
    inner = unwrap_model(model) if isinstance(model, nn.Module) else None
    declare = (inner is not None and getattr(inner, "is_quantized", False) and has_msplora(inner)
               and not getattr(inner, "_hf_peft_config_loaded", False))
    if declare:
        inner._hf_peft_config_loaded = True
    try:
        yield
    finally:
        if declare:
            inner._hf_peft_config_loaded = False


class MSPLoraTrainer(Trainer):
    """A ``Trainer`` whose checkpoints (and ``save_model``) hold the MSPLoRA adapter only: ``adapter_config.json``
    and ``adapter_model.safetensors`` with every shared tensor once, beside the optimizer, scheduler, RNG and
    trainer state the ``Trainer`` writes. ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end``
    load the adapter back into the model.

    FSDP: FSDP2 only (``TrainingArguments(fsdp=True, fsdp_config={"fsdp_version": 2, ...})``), which Accelerate
    applies to the wrapped layers, then the root, so the root owns ``msplora_bank``. Adapter files are then
    written from full tensors gathered on all ranks (:func:`save_sharded_adapter`), never from one rank's shard,
    and the sharded model (the frozen base) is not written into every checkpoint; resuming gives each rank its
    shard again (:func:`load_sharded_adapter`) and the optimizer state through Accelerate. FSDP1 is refused,
    and so is ``fsdp`` where Accelerate would not run it (on the CPU it silently trains with DDP instead)."""

    def __init__(self, *args, **kwargs) -> None:
        with _adapters_declared_to_transformers(kwargs.get("model", args[0] if args else None)):
            super().__init__(*args, **kwargs)
        if self.args.fsdp and not self.is_fsdp_enabled:
            raise ValueError(
                "TrainingArguments(fsdp=...) is set, but Accelerate did not enable FSDP (it runs FSDP on GPUs and "
                "other accelerators only; with use_cpu=True or on a CPU-only machine it would silently train with "
                "DDP). Drop fsdp to train with DDP, or run on accelerators"
            )
        if self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise ValueError(
                "MSPLoraTrainer supports FSDP2 only: FSDP1 flattens parameters per wrapped unit, which breaks the "
                "layers' references to the shared branches. Set fsdp_config={'fsdp_version': 2, ...}"
            )

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        if not self.is_fsdp_enabled and not is_sharded(self.model):
            return super().save_model(output_dir, _internal_call)
        # Under FSDP2 every rank takes part in gathering the full adapter tensors; the main process writes.
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_sharded_adapter(self.model, output_dir, is_main_process=self.args.should_save)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # The Trainer would also write the whole sharded model (the frozen base) here, for resuming; the
        # adapter file written by save_model is all that resuming needs, so that write is skipped.
        import transformers.trainer as hf_trainer

        save_fsdp_model = hf_trainer.save_fsdp_model
        hf_trainer.save_fsdp_model = lambda *args, **kwargs: None
        try:
            super()._save_optimizer_and_scheduler(output_dir)
        finally:
            hf_trainer.save_fsdp_model = save_fsdp_model

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
        self._load_adapter(model if model is not None else self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_adapter(self.model, self.state.best_model_checkpoint)

    @staticmethod
    def _load_adapter(model: nn.Module, directory: str) -> None:
        model = unwrap_model(model)
        if is_sharded(model):
            load_sharded_adapter(model, directory)
        else:
            load_adapter(model, directory, is_trainable=True)
