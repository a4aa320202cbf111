"""Hugging Face ``Trainer`` integration: ``StagedTrainingCallback`` trains global, then mid, then layer scales
with the Trainer's own AdamW (frozen scales stay bit-identical, weight decay included), and
``MSPLoraTrainer`` checkpoints hold the adapter only, from which training resumes to the same result."""
import os

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import msplora
from msplora import MSPLoraConfig, MSPLoraTrainer, StagedTrainingCallback
from msplora.io import adapter_parameters
from msplora.model import scale_parameters

VOCAB = 53


def tiny_llama(ranks=(4, 2, 1)):
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32))
    return msplora.apply_msplora(
        model, MSPLoraConfig(target_modules=["q_proj", "v_proj"], ranks=ranks, init_weights=False, dropout=0.1))


pytestmark = pytest.mark.usefixtures("one_thread")


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n=24, seq=8):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(out, **kw):
    defaults = dict(output_dir=str(out), use_cpu=True, per_device_train_batch_size=4, max_steps=6,
                    learning_rate=1e-2, weight_decay=0.1, warmup_steps=0, lr_scheduler_type="constant",
                    save_strategy="no", report_to=[], logging_steps=100, disable_tqdm=True, seed=7)
    defaults.update(kw)
    return tf.TrainingArguments(**defaults)


class Recorder(tf.TrainerCallback):
    """Snapshots every scale's parameters after each optimizer step."""

    def __init__(self):
        self.after_step = []

    def on_step_end(self, args, state, control, model=None, **kw):
        self.after_step.append({s: [p.detach().clone() for p in ps] for s, ps in scale_parameters(model).items()})


def changed(before, after, scale):
    return [not torch.equal(a, b) for a, b in zip(before[scale], after[scale])]


@pytest.mark.parametrize(
    "fractions,cumulative,ranks,expected_stages",
    [
        (None, False, (4, 2, 1), [{"global"}] * 2 + [{"mid"}] * 2 + [{"layer"}] * 2),
        ((0.5, 0.0, 0.5), False, (4, 2, 1), [{"global"}] * 3 + [{"layer"}] * 3),
        ((1 / 6, 2 / 6, 3 / 6), True, (4, 2, 1),
         [{"global"}] + [{"global", "mid"}] * 2 + [{"global", "mid", "layer"}] * 3),
        (None, False, (0, 2, 1), [{"mid"}] * 3 + [{"layer"}] * 3),
    ],
    ids=["thirds", "skip-mid", "cumulative", "no-global"],
)
def test_staged_training_with_trainer_trains_only_the_current_stage(tmp_path, fractions, cumulative, ranks,
                                                                    expected_stages):
    model = tiny_llama(ranks)
    start = {s: [p.detach().clone() for p in ps] for s, ps in scale_parameters(model).items()}
    recorder = Recorder()
    trainer = tf.Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenDataset(),
                         callbacks=[StagedTrainingCallback(fractions, cumulative), recorder])
    trainer.train()

    snapshots = [start] + recorder.after_step
    for step, active in enumerate(expected_stages):
        for scale in ("global", "mid", "layer"):
            moved = changed(snapshots[step], snapshots[step + 1], scale)
            if scale in active:  # B is random, so both A and B get gradients
                assert all(moved), (step, scale)
            else:  # bit-identical: no gradient, so AdamW applies neither weight decay nor momentum
                assert not any(moved), (step, scale)
    for p in adapter_parameters(model).values():  # all trainable again after training
        assert p.requires_grad


def test_staged_callback_refuses_an_optimizer_without_every_scale(tmp_path):
    model = tiny_llama()
    msplora.set_trainable_scales(model, ["global"])  # too early: the Trainer's AdamW would miss mid and layer
    trainer = tf.Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenDataset(),
                         callbacks=[StagedTrainingCallback()])
    with pytest.raises(ValueError, match="optimizer does not hold the mid/layer adapter parameters"):
        trainer.train()


@pytest.mark.parametrize(
    "fractions,message",
    [((0.5, 0.5), "3 non-negative numbers"), ((0.5, 0.6, -0.1), "non-negative"), ((0.2, 0.2, 0.2), "sum to 1")],
)
def test_staged_callback_rejects_bad_fractions(fractions, message):
    with pytest.raises(ValueError, match=message):
        StagedTrainingCallback(fractions)


def test_staged_callback_rejects_a_share_for_a_disabled_scale():
    callback = StagedTrainingCallback((0.5, 0.25, 0.25))
    with pytest.raises(ValueError, match="global scale a share 0.5, but its rank is 0"):
        callback.stage_starts(tiny_llama((0, 2, 1)), 12)


def adapter_values(model):
    return {k: p.detach().clone() for k, p in adapter_parameters(model).items()}


class StopAfter(tf.TrainerCallback):
    """Interrupts training after a given optimizer step (once that step's checkpoint is written)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_checkpoints_hold_the_adapter_once_and_training_resumes_to_the_same_result(tmp_path):
    args = dict(max_steps=6, save_strategy="steps", save_steps=3)
    full = tiny_llama()
    MSPLoraTrainer(model=full, args=training_args(tmp_path / "full", **args), train_dataset=TokenDataset(),
                   callbacks=[StagedTrainingCallback()]).train()

    interrupted = tiny_llama()
    MSPLoraTrainer(model=interrupted, args=training_args(tmp_path / "resumed", **args), train_dataset=TokenDataset(),
                   callbacks=[StagedTrainingCallback(), StopAfter(3)]).train()
    assert sorted(os.listdir(tmp_path / "resumed")) == ["checkpoint-3"]
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
    assert not any(f.startswith("model") for f in files)  # no full-model weights
    saved = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert set(saved) == set(adapter_parameters(interrupted))  # each shared branch once
    assert sum(t.numel() for t in saved.values()) == msplora.trainable_parameters(interrupted)["adapter"]

    resumed = tiny_llama()
    with torch.no_grad():  # make sure the resumed run does not start from the right values by accident
        for p in adapter_parameters(resumed).values():
            p.mul_(-1)
    MSPLoraTrainer(model=resumed, args=training_args(tmp_path / "resumed", **args), train_dataset=TokenDataset(),
                   callbacks=[StagedTrainingCallback()]).train(resume_from_checkpoint=str(checkpoint))
    expected, got = adapter_values(full), adapter_values(resumed)
    assert set(expected) == set(got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)


def test_save_model_writes_a_loadable_adapter(tmp_path):
    model = tiny_llama()
    trainer = MSPLoraTrainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=TokenDataset())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    fresh = tf.LlamaForCausalLM(model.config)
    msplora.load_adapter(fresh, str(tmp_path / "final"))
    for key, value in adapter_values(model).items():
        assert torch.equal(adapter_parameters(fresh)[key], value)


def test_resume_from_a_checkpoint_without_an_adapter_says_so(tmp_path):
    os.makedirs(tmp_path / "checkpoint-1")
    trainer = MSPLoraTrainer(model=tiny_llama(), args=training_args(tmp_path), train_dataset=TokenDataset())
    with pytest.raises(ValueError, match="no MSPLoRA adapter"):
        trainer._load_from_checkpoint(str(tmp_path / "checkpoint-1"))
