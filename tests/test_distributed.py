"""Data-parallel training on 2 CPU processes (gloo): DDP and FSDP2 (``fully_shard``, decoder layers then the
root) give the same gradients and adapter values as one process on the same global batch, across staged
training's stage boundaries; all ranks end with identical adapters; FSDP2 with bf16 parameters computes what
one process computes with the same bf16 casting and fp32 reduction. The Hugging Face ``Trainer`` under DDP runs ``StagedTrainingCallback`` with frozen scales left
bit-identical. Sharding the bank on its own, or the decoder layers without the root, is refused with an error
that says what to do.

``MSPLoraTrainer`` under FSDP2: Accelerate runs FSDP only on accelerators (on the CPU it trains with DDP, so
``fsdp=...`` with ``use_cpu=True`` is refused), so the Trainer's FSDP2 code path is tested by hand on a model
sharded as Accelerate shards it (decoder layers, embedding, tail, then the root): its checkpoint holds the full
tensors a single process trains (never one rank's shard) and loading it gives every rank its shard back."""
import datetime
import faulthandler
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers as tf

import msplora
from msplora import MSPLoraConfig
from msplora.io import adapter_parameters

WORLD = 2
VOCAB = 53
PER_RANK = 2
# The scales trained at each step: crosses the global -> mid and mid -> layer boundaries after wrapping.
SCHEDULE = (["global"], ["global"], ["mid"], ["layer"])
COLLECTIVE_TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def tiny_llama():
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32))
    return msplora.apply_msplora(model, MSPLoraConfig(
        target_modules=["q_proj", "v_proj"], ranks=(4, 2, 1), num_mid_groups=2, init_weights=False))


def global_batch(step):
    return torch.randint(0, VOCAB, (WORLD * PER_RANK, 8), generator=torch.Generator().manual_seed(100 + step))


def full(t):
    """A DTensor (FSDP2's sharded parameter or gradient) gathered whole; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, port, args, init_group):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    faulthandler.enable()  # a native abort in a worker then shows where it happened
    if init_group:
        # A collective that waits longer than this fails instead of hanging the test run.
        timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timeout)
    fn(rank, *args)
    # Both ranks are done with collectives; then leave without the interpreter's teardown, where destroying
    # gloo's process group can abort or deadlock (its threads, the interpreter lock) now and then. An
    # exception above skips this and reaches mp.spawn with its traceback.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_two_processes(fn, *args, init_group=True):
    """Run ``fn(rank, *args)`` on 2 processes; an exception in either fails the test with its traceback."""
    mp.spawn(_entry, args=(fn, free_port(), args, init_group), nprocs=WORLD, join=True)


def assert_ranks_identical(tensors):
    local = torch.cat([full(t).detach().reshape(-1) for t in tensors])
    gathered = [torch.empty_like(local) for _ in range(WORLD)]
    dist.all_gather(gathered, local)
    for other in gathered[1:]:
        assert torch.equal(other, gathered[0]), "ranks hold different adapters"


def _train_against_one_process(rank, wrapping):
    reference, model = tiny_llama(), tiny_llama()
    if wrapping == "ddp":
        # DDP fixes what it reduces when it wraps: frozen scales are skipped only with find_unused_parameters.
        engine = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        engine = model
    params, ref_params = adapter_parameters(model), adapter_parameters(reference)
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-2, weight_decay=0.1)
    ref_optimizer = torch.optim.AdamW(list(ref_params.values()), lr=1e-2, weight_decay=0.1)

    for step, scales in enumerate(SCHEDULE):
        msplora.set_trainable_scales(model, scales)
        msplora.set_trainable_scales(reference, scales)
        before = {k: full(p).detach().clone() for k, p in params.items()}
        ids = global_batch(step)
        local = ids[rank * PER_RANK:(rank + 1) * PER_RANK]
        engine(input_ids=local, labels=local).loss.backward()
        reference(input_ids=ids, labels=ids).loss.backward()
        for key, p in params.items():
            scale = key.split(".")[0]
            if scale in scales:
                torch.testing.assert_close(full(p.grad), ref_params[key].grad, rtol=1e-5, atol=1e-6,
                                           msg=f"step {step}: gradient of {key}")
            else:
                assert p.grad is None and ref_params[key].grad is None, f"step {step}: frozen {key} got a gradient"
        optimizer.step()
        ref_optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ref_optimizer.zero_grad(set_to_none=True)
        for key, p in params.items():
            value = full(p).detach()
            torch.testing.assert_close(value, ref_params[key].detach(), rtol=1e-5, atol=1e-6,
                                       msg=f"step {step}: value of {key}")
            if key.split(".")[0] not in scales:
                assert torch.equal(value, before[key]), f"step {step}: frozen {key} changed"
    assert_ranks_identical(list(params.values()))


def test_ddp_matches_one_process_across_stage_boundaries():
    run_on_two_processes(_train_against_one_process, "ddp")


def _shard_the_bank(rank):
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model.msplora_bank)
    fully_shard(model)
    ids = global_batch(0)[:PER_RANK]
    with pytest.raises(RuntimeError, match="Do not fully_shard model.msplora_bank"):
        model(input_ids=ids)


def _fsdp2_bf16_gradients(rank):
    """FSDP2 with bf16 parameters and fp32 reduction against the same computation on one process: a bf16 copy of
    the model runs each rank's half of the batch, its bf16 gradients are cast to fp32 and averaged. Error model:
    both run the same bf16 operations on the same inputs, so they differ only by the order of the fp32
    cross-rank sum (relative 2^-24 per element) unless a CPU kernel blocks differently for FSDP2's buffers; a
    relative error up to 2^-8 (one bf16 rounding) is accepted, far below what skipping or double-counting a
    rank, or running in fp32, would give (both checked)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model, emulated, exact = tiny_llama(), tiny_llama(), tiny_llama()
    for p in emulated.parameters():  # parameters only, as FSDP2 casts them; buffers (RoPE's) stay fp32
        p.data = p.data.to(torch.bfloat16)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    ids = global_batch(0)
    local = ids[rank * PER_RANK:(rank + 1) * PER_RANK]
    model(input_ids=local, labels=local).loss.backward()
    exact(input_ids=ids, labels=ids).loss.backward()
    per_rank = []
    for r in range(WORLD):
        emulated.zero_grad(set_to_none=True)
        half = ids[r * PER_RANK:(r + 1) * PER_RANK]
        emulated(input_ids=half, labels=half).loss.backward()
        per_rank.append({k: p.grad.float() for k, p in adapter_parameters(emulated).items()})
    in_fp32 = adapter_parameters(exact)
    for key, p in adapter_parameters(model).items():
        got = full(p.grad)
        reference = sum(g[key] for g in per_rank) / WORLD
        error = ((got - reference).norm() / reference.norm()).item()
        assert error <= 2**-8, f"{key}: relative error {error:.2e} against the one-process bf16 computation"
        assert ((got - per_rank[rank][key]).norm() / reference.norm()).item() > 2**-8, f"{key}: one rank only?"
        assert not torch.equal(got, in_fp32[key].grad), f"{key}: bf16 parameters had no effect"


def _fsdp2_checks(rank):
    _train_against_one_process(rank, "fsdp2")
    _fsdp2_bf16_gradients(rank)
    _shard_the_bank(rank)


def test_fsdp2_matches_one_process_and_refuses_a_separately_sharded_bank():
    """One pair of processes for all FSDP2 checks (each spawn costs seconds of imports): fp32 training across
    stage boundaries, bf16 mixed-precision gradients, and the error for a separately sharded bank."""
    run_on_two_processes(_fsdp2_checks)


class _Snapshots(tf.TrainerCallback):
    def __init__(self):
        self.values = []

    def on_step_end(self, args, state, control, model=None, **kw):
        self.values.append({k: p.detach().clone() for k, p in adapter_parameters(model).items()})


class _TokenDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 4 * WORLD * PER_RANK

    def __getitem__(self, i):
        ids = torch.randint(0, VOCAB, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def _trainer_with_stages(rank, output_dir):
    args = dict(output_dir=output_dir, use_cpu=True, per_device_train_batch_size=PER_RANK, max_steps=3,
                learning_rate=1e-2, weight_decay=0.1, lr_scheduler_type="constant", save_strategy="no",
                report_to=[], disable_tqdm=True, seed=3, ddp_timeout=COLLECTIVE_TIMEOUT_S)
    model = tiny_llama()
    start = {k: p.detach().clone() for k, p in adapter_parameters(model).items()}
    snapshots = _Snapshots()
    trainer = tf.Trainer(model=model, args=tf.TrainingArguments(**args), train_dataset=_TokenDataset(),
                         callbacks=[msplora.StagedTrainingCallback(), snapshots])
    trainer.train()
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    assert dist.get_world_size() == WORLD
    values = [start] + snapshots.values
    for step, scale in enumerate(["global", "mid", "layer"]):  # one step per stage
        for key, value in values[step + 1].items():
            assert torch.equal(value, values[step][key]) == (not key.startswith(scale + ".")), (step, key)
    assert_ranks_identical(list(adapter_parameters(model).values()))

    refused = tf.Trainer(model=tiny_llama(), args=tf.TrainingArguments(**args, ddp_find_unused_parameters=False),
                         train_dataset=_TokenDataset(), callbacks=[msplora.StagedTrainingCallback()])
    with pytest.raises(ValueError, match="needs ddp_find_unused_parameters=True"):
        refused.train()

    with pytest.raises(ValueError, match="Accelerate did not enable FSDP"):
        msplora.MSPLoraTrainer(model=tiny_llama(), args=tf.TrainingArguments(
            **args, fsdp=True, fsdp_config={"fsdp_version": 2}), train_dataset=_TokenDataset())


def test_trainer_under_ddp_trains_in_stages(tmp_path):
    run_on_two_processes(_trainer_with_stages, str(tmp_path), init_group=False)


def _shard_like_accelerate(model):
    """What Accelerate's ``fsdp2_prepare_model`` does with a transformer-layer wrap policy: each decoder layer,
    the input embedding, the tail (final norm and head), then the root (which so owns ``msplora_bank``)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model.model.embed_tokens)
    fully_shard([model.model.norm, model.lm_head], reshard_after_forward=False)
    fully_shard(model)
    return model


def _train_two_steps(model, sharded, rank):
    params = adapter_parameters(model)
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-2, weight_decay=0.1)
    for step in range(2):
        ids = global_batch(step)
        if sharded:
            ids = ids[rank * PER_RANK:(rank + 1) * PER_RANK]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _layers_without_root(rank):
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama()
    for layer in model.model.layers:
        fully_shard(layer)
    ids = global_batch(0)[:PER_RANK]
    with pytest.raises(RuntimeError, match=r"Shard the root model too.*fully_shard\(model\)"):
        model(input_ids=ids, labels=ids)


def _trainer_fsdp2_checkpoint(rank, output_dir):
    from safetensors.torch import load_file

    reference, model = tiny_llama(), _shard_like_accelerate(tiny_llama())
    _train_two_steps(reference, False, rank)
    _train_two_steps(model, True, rank)
    args = tf.TrainingArguments(output_dir=output_dir, use_cpu=True, report_to=[], disable_tqdm=True,
                                ddp_timeout=COLLECTIVE_TIMEOUT_S)
    trainer = msplora.MSPLoraTrainer(model=model, args=args)
    assert msplora.training.is_sharded(trainer.model)
    checkpoint = os.path.join(output_dir, "checkpoint-2")
    trainer.save_model(checkpoint)
    dist.barrier()
    saved = load_file(os.path.join(checkpoint, "adapter_model.safetensors"))
    expected = adapter_parameters(reference)
    assert saved.keys() == expected.keys()
    for key, value in saved.items():  # whole tensors, equal to what one process trained, on every rank's view
        assert value.shape == expected[key].shape, f"{key}: saved a shard {tuple(value.shape)}"
        torch.testing.assert_close(value, expected[key].detach(), rtol=1e-5, atol=1e-6, msg=key)

    fresh = tiny_llama()
    with torch.no_grad():
        for p in adapter_parameters(fresh).values():
            p.zero_()
    fresh = _shard_like_accelerate(fresh)
    resumed = msplora.MSPLoraTrainer(model=fresh, args=args)
    resumed._load_from_checkpoint(checkpoint)
    for key, p in adapter_parameters(fresh).items():
        assert type(p).__name__ == "DTensor", f"{key} is no longer sharded"
        assert torch.equal(full(p).detach(), saved[key]), key
    ids = global_batch(7)
    local = ids[rank * PER_RANK:(rank + 1) * PER_RANK]
    fresh(input_ids=local, labels=local).loss.backward()
    reference(input_ids=ids, labels=ids).loss.backward()
    for key, p in adapter_parameters(fresh).items():
        torch.testing.assert_close(full(p.grad), expected[key].grad, rtol=1e-5, atol=1e-6, msg=f"resumed {key}")


def _fsdp2_trainer_checks(rank, output_dir):
    _layers_without_root(rank)
    _trainer_fsdp2_checkpoint(rank, output_dir)


def test_fsdp2_trainer_checkpoints_hold_full_tensors_and_layers_without_root_are_refused(tmp_path):
    """One pair of processes: FSDP2 on the decoder layers without the root raises at the first forward with
    the fix; MSPLoraTrainer's FSDP2 checkpoint holds full tensors and loads back shard by shard."""
    run_on_two_processes(_fsdp2_trainer_checks, str(tmp_path))
