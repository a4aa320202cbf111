"""What PEFT users do by habit gives right answers or clear errors: eval-mode models stay inference-ready,
tied heads are refused, wrapped (compiled, DataParallel, DDP, nn.Sequential) models keep their sharing and
work with every public function, ``save_pretrained`` does not write a checkpoint that reloads wrong, the
backend is a runtime choice, and a staged schedule too short for its stages says so."""
import os
import socket
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import transformers as tf

import msplora
from msplora import MSPLoraConfig, StagedTrainingCallback

from .models import VOCAB, bert, inputs, llama, output

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = ["q_proj", "v_proj"]


def adapted(dropout=0.5, model=None, **kw):
    torch.manual_seed(0)
    model = (model if model is not None else llama(num_layers=4)).eval()
    return msplora.apply_msplora(model, MSPLoraConfig(target_modules=TARGETS, init_weights=False,
                                                      dropout=dropout, **kw))


# ------------------------------------------------------------------------------------- 1: eval mode
def test_adapters_applied_to_an_eval_model_are_in_eval_mode():
    model = adapted(dropout=0.5)
    assert not any(m.training for m in model.modules())
    ids = inputs()
    with torch.no_grad():
        assert torch.equal(output(model, ids), output(model, ids))  # no dropout at inference
    model.train()
    with torch.no_grad():
        assert not torch.equal(output(model, ids), output(model, ids))  # and it is on in training


def test_greedy_generation_after_load_adapter_is_deterministic(tmp_path):
    msplora.save_adapter(adapted(dropout=0.5), str(tmp_path))
    torch.manual_seed(0)
    base = llama(num_layers=4)
    base.train()  # even a model left in train mode: load_adapter makes it inference-ready by default
    model = msplora.load_adapter(base, str(tmp_path))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    ids = inputs(batch=1, seq=5)
    runs = [model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_load_adapter_is_trainable_resumes_training(tmp_path):
    msplora.save_adapter(adapted(), str(tmp_path))
    torch.manual_seed(0)
    model = msplora.load_adapter(llama(num_layers=4).train(), str(tmp_path), is_trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n or "branch" in n for n in trainable) and model.training


# ------------------------------------------------------------------------------------- 2: tied heads
def tied_llama():
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True))


def test_a_tied_lm_head_target_is_refused_and_the_model_is_unchanged():
    model = tied_llama()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"lm_head: its weight is tied to model\.embed_tokens\.weight.*untie"):
        msplora.apply_msplora(model, MSPLoraConfig(target_modules=["q_proj", "lm_head"]))
    assert not msplora.model.has_msplora(model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_an_untied_head_can_be_targeted_and_merged_without_touching_the_embeddings():
    model = tied_llama().eval()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    embeddings = model.model.embed_tokens.weight.clone()
    with pytest.warns(UserWarning, match="single layer"):  # lm_head is a site of its own
        msplora.apply_msplora(model, MSPLoraConfig(target_modules=["q_proj", "lm_head"], init_weights=False))
    ids = inputs()
    with torch.no_grad():
        expected = output(model, ids)
        merged = msplora.unload(model, merge=True)
        torch.testing.assert_close(output(merged, ids), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(merged.model.embed_tokens.weight, embeddings)


# --------------------------------------------------------------------- 4, 10: wrapped models everywhere
class _Port:
    @staticmethod
    def free():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


@pytest.fixture
def ddp_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_Port.free()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrap", ["compile", "dataparallel", "ddp"])
def test_every_public_function_accepts_a_wrapped_model(tmp_path, wrap, request):
    model = adapted(dropout=0.0)
    msplora.save_adapter(model, str(tmp_path / "bare"))
    if wrap == "ddp":
        request.getfixturevalue("ddp_group")
        wrapped = nn.parallel.DistributedDataParallel(model.train(), find_unused_parameters=True)
    else:
        wrapped = torch.compile(model) if wrap == "compile" else nn.DataParallel(model)

    msplora.save_adapter(wrapped, str(tmp_path / "wrapped"))
    from safetensors.torch import load_file

    bare, other = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("bare", "wrapped"))
    assert bare.keys() == other.keys() and all(torch.equal(bare[k], other[k]) for k in bare)
    assert msplora.trainable_parameters(wrapped) == msplora.trainable_parameters(model)
    msplora.set_trainable_scales(wrapped, "global")
    assert msplora.trainable_parameters(model)["total"] == msplora.trainable_parameters(model)["global"]
    msplora.set_trainable_scales(wrapped, msplora.SCALES)
    msplora.merge(wrapped)
    assert all(layer.merged for _, layer in msplora.msplora_layers(model))
    msplora.unmerge(wrapped)
    with msplora.disable_adapters(wrapped):
        assert all(layer.disabled for _, layer in msplora.msplora_layers(wrapped))
    msplora.load_adapter(wrapped, str(tmp_path / "bare"), is_trainable=True)
    assert len(list(msplora.msplora_layers(wrapped))) == 8


def test_adding_adapters_inside_ddp_is_refused(ddp_group, tmp_path):
    msplora.save_adapter(adapted(), str(tmp_path))
    torch.manual_seed(0)
    wrapped = nn.parallel.DistributedDataParallel(llama(num_layers=4))
    with pytest.raises(ValueError, match="Add MSPLoRA to the bare model first"):
        msplora.apply_msplora(wrapped, MSPLoraConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="never average the new adapters"):
        msplora.load_adapter(wrapped, str(tmp_path), is_trainable=True)
    assert not msplora.model.has_msplora(wrapped)


def test_apply_returns_the_object_it_was_given():
    torch.manual_seed(0)
    compiled = torch.compile(llama(num_layers=2))
    assert msplora.apply_msplora(compiled, MSPLoraConfig(target_modules=TARGETS)) is compiled


# ------------------------------------------------------------------------------- 5: the layer index
class SentenceTransformerLike(nn.Sequential):
    """``0.auto_model.encoder.layer.N...``, as a sentence-transformers model names its modules."""

    def __init__(self, encoder):
        transformer = nn.Module()
        transformer.auto_model = encoder
        super().__init__(OrderedDict([("0", transformer), ("1", nn.Identity())]))


@pytest.mark.parametrize("wrap", [lambda m: nn.Sequential(m), SentenceTransformerLike,
                                  lambda m: nn.ModuleDict({"encoder": nn.ModuleDict({"bert": m})})],
                         ids=["sequential", "sentence-transformers", "nested-containers"])
def test_wrapped_models_keep_their_sharing(wrap):
    torch.manual_seed(0)
    config = MSPLoraConfig(target_modules=["query", "value"])
    bare = msplora.apply_msplora(bert(num_layers=4), config)
    torch.manual_seed(0)
    wrapped = msplora.apply_msplora(wrap(bert(num_layers=4)), config)
    assert msplora.trainable_parameters(wrapped)["adapter"] == msplora.trainable_parameters(bare)["adapter"]
    sites = list(msplora.model.get_bank(wrapped).sites)
    assert len(sites) == 2 and all(".layer.*." in s for s in sites), sites


class Stage(nn.Module):
    def __init__(self, width, depth):
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(width, width)}) for _ in range(depth)])

    def forward(self, x):
        for block in self.blocks:
            x = block["proj"](x)
        return x


def test_a_hierarchical_model_gets_one_site_per_stage():
    model = nn.ModuleDict({"stages": nn.ModuleList([Stage(8, 3), Stage(16, 4)])})
    msplora.apply_msplora(model, MSPLoraConfig(target_modules=["proj"]))
    sites = msplora.model.get_bank(model).sites
    assert list(sites) == ["stages.0.blocks.*.proj", "stages.1.blocks.*.proj"]
    assert [len(s["layers"]) for s in sites.values()] == [3, 4]


def test_stages_of_equal_width_share_one_site_across_stages():
    model = nn.ModuleDict({"stages": nn.ModuleList([Stage(8, 3), Stage(8, 2)])})
    with pytest.warns(UserWarning, match=r"single layer.*blocks\.2"):  # only the first stage has a third block
        msplora.apply_msplora(model, MSPLoraConfig(target_modules=["proj"]))
    assert list(msplora.model.get_bank(model).sites) == ["stages.*.blocks.0.proj", "stages.*.blocks.1.proj",
                                                          "stages.*.blocks.2.proj"]


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)


class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_proj = nn.Linear(8, 16)


class Experts(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.experts = nn.ModuleList([nn.ModuleDict({"up": nn.Linear(8, 8)}) for _ in range(n)])


def sites(model, targets):
    msplora.apply_msplora(model, MSPLoraConfig(target_modules=targets))
    return list(msplora.model.get_bank(model).sites)


def test_hybrid_layer_lists_stacks_of_linears_and_one_layer_models_keep_the_first_integer_rule():
    # a hybrid decoder (Jamba: attention and mamba layers in one list)
    assert sites(nn.ModuleDict({"layers": nn.ModuleList([Mixer(), Attention(), Mixer(), Attention()])}),
                 ["q_proj"]) == ["layers.*.q_proj"]
    # a stack whose blocks are the linear layers themselves
    stack = nn.ModuleDict({"layers": nn.ModuleList([nn.Linear(8, 8) for _ in range(6)])})
    assert sites(stack, r"layers\.\d+") == ["layers.*"]
    assert len(msplora.model.get_bank(stack).sites["layers.*"]["layers"]) == 6
    # a one-layer model whose layer holds a list of experts: the layer list, not the experts, is indexed
    assert sites(nn.ModuleDict({"layers": nn.ModuleList([Experts(3)])}), ["up"]) == [
        f"layers.*.experts.{k}.up" for k in range(3)]
    # and a wrapper (nn.Sequential of one model) changes nothing
    assert sites(nn.Sequential(nn.ModuleDict({"layers": nn.ModuleList([Experts(2)])})), ["up"]) == [
        f"0.layers.*.experts.{k}.up" for k in range(2)]


def test_all_linear_selects_the_linears_of_hybrid_layer_lists():
    model = nn.ModuleDict({"layers": nn.ModuleList([Mixer(), Attention(), Mixer(), Attention()])})
    assert sites(model, "all-linear") == ["layers.*.in_proj", "layers.*.q_proj"]


def test_a_site_with_one_layer_beside_many_is_warned_about():
    torch.manual_seed(0)
    model = llama(num_layers=4)
    model.config.tie_word_embeddings = False
    with pytest.warns(UserWarning, match=r"single layer.*lm_head"):
        msplora.apply_msplora(model, MSPLoraConfig(target_modules=["q_proj", "lm_head"]))


# ------------------------------------------------------------------------------- 6: save_pretrained
def test_save_pretrained_of_an_adapted_model_is_a_clear_error(tmp_path):
    model = adapted()
    with pytest.raises(ValueError, match=r"msplora\.save_adapter.*unload\(model, merge=True\)"):
        model.save_pretrained(str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match=r"msplora\.save_adapter"):  # the inner model holds the adapters too
        model.model.save_pretrained(str(tmp_path / "inner"))
    import copy
    import pickle

    pickle.loads(pickle.dumps(model))  # the stand-in keeps the model picklable and copyable
    copy.deepcopy(model)
    plain = msplora.unload(model, merge=True)
    plain.model.save_pretrained(str(tmp_path / "inner"))
    plain.save_pretrained(str(tmp_path / "merged"))
    reloaded = tf.LlamaForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(output(reloaded, inputs()), output(plain, inputs()))


# ------------------------------------------------------------------------------- 9: backend at runtime
def test_an_adapter_trained_with_the_triton_backend_loads_and_runs_on_the_cpu(tmp_path):
    model = adapted(backend="triton")
    msplora.save_adapter(model, str(tmp_path))
    torch.manual_seed(0)
    loaded = msplora.load_adapter(llama(num_layers=4), str(tmp_path))
    assert all(layer.backend == "auto" for _, layer in msplora.msplora_layers(loaded))
    with torch.no_grad():
        output(loaded, inputs())
    msplora.load_adapter(loaded, str(tmp_path), backend="reference")
    assert all(layer.backend == "reference" for _, layer in msplora.msplora_layers(loaded))


# ------------------------------------------------------------------------------- 11 and the config copy
def test_scales_by_a_single_name_and_counts_on_the_head_model():
    model = adapted()
    msplora.set_trainable_scales(model, "global")
    counts = msplora.trainable_parameters(model)
    assert counts["total"] == counts["global"] > 0
    cfg = llama(num_layers=2).config
    cfg.architectures = ["LlamaForCausalLM"]
    counted = msplora.count_parameters(cfg, MSPLoraConfig(target_modules=r".*\.q_proj", modules_to_save=["lm_head"]))
    assert counted["num_target_layers"] == 2
    with pytest.raises(ValueError, match="lora_rank"):
        msplora.count_parameters(cfg, MSPLoraConfig(target_modules=["q_proj"]), lora_rank=0)


def test_changing_the_config_after_apply_does_not_change_the_saved_adapter(tmp_path):
    config = MSPLoraConfig(target_modules=TARGETS, init_weights=False)
    torch.manual_seed(0)
    model = msplora.apply_msplora(llama(num_layers=2), config)
    config.alphas = (1.0, 1.0, 1.0)
    msplora.save_adapter(model, str(tmp_path))
    assert MSPLoraConfig.from_pretrained(str(tmp_path)).alphas == (16.0, 16.0, 16.0)


def test_saved_folders_have_the_permissions_of_mkdir(tmp_path):
    msplora.save_adapter(adapted(), str(tmp_path / "adapter"))
    os.mkdir(tmp_path / "plain")
    assert os.stat(tmp_path / "adapter").st_mode == os.stat(tmp_path / "plain").st_mode


def test_load_adapter_takes_the_saved_dropout_and_bad_scales_are_named(tmp_path):
    msplora.save_adapter(adapted(dropout=0.3), str(tmp_path))
    model = adapted(dropout=0.0)
    msplora.load_adapter(model, str(tmp_path))
    assert all(layer.dropout == 0.3 for _, layer in msplora.msplora_layers(model))
    for bad in (None, 3):
        with pytest.raises(ValueError, match="scales must be"):
            msplora.set_trainable_scales(model, bad)


def test_a_failed_save_leaves_no_folder(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(msplora.io, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        msplora.save_adapter(adapted(), str(tmp_path / "adapter"))
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------- 12: short schedules
@pytest.mark.parametrize("max_steps", [1, 2])
def test_a_staged_schedule_with_fewer_steps_than_stages_is_refused(max_steps):
    model = adapted()
    state = tf.TrainerState(max_steps=max_steps, global_step=0)
    args = tf.TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match=rf"{max_steps} optimizer step\(s\).*would never train"):
        StagedTrainingCallback().on_train_begin(args, state, tf.TrainerControl(), model=model)
