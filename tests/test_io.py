"""Adapter save/load: exactly-once storage, bit-exact round trip, and failures that change nothing."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import msplora
from msplora import MSPLoraConfig

from .models import gpt2, inputs, llama, output

TARGETS = ["q_proj", "v_proj"]


def trained_model(ranks=(8, 4, 2), **kw):
    torch.manual_seed(0)
    model = llama().eval()
    msplora.apply_msplora(model, MSPLoraConfig(target_modules=TARGETS, ranks=ranks, init_weights=False, **kw))
    return model


def fresh_model():
    torch.manual_seed(0)  # the same base weights as trained_model()
    return llama().eval()


def snapshot(model):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}, \
        [type(m).__name__ for m in model.modules()]


def assert_unchanged(model, snap):
    params, types = snapshot(model)
    assert types == snap[1]
    assert params.keys() == snap[0].keys()
    for n, (t, rg) in snap[0].items():
        assert torch.equal(params[n][0], t) and params[n][1] == rg, n


def test_shared_tensors_are_stored_exactly_once(tmp_path):
    model = trained_model()
    msplora.save_adapter(model, tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    # 2 sites x (1 global + 3 mid + 7 layer) branches x (A, B)
    assert len(state) == 2 * (1 + 3 + 7) * 2
    assert sum(t.numel() for t in state.values()) == msplora.trainable_parameters(model)["adapter"]
    assert "global.model.layers.*.self_attn.q_proj.lora_A" in state
    assert "mid.model.layers.*.self_attn.v_proj.2.lora_B" in state
    assert "layer.model.layers.6.self_attn.q_proj.lora_A" in state
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["ranks"] == [8, 4, 2] and config["peft_type"] == "MSPLORA"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact_into_a_plain_model(tmp_path, dtype):
    model = trained_model()
    model.to(dtype)
    msplora.save_adapter(model, tmp_path)
    loaded = fresh_model().to(dtype)
    msplora.load_adapter(loaded, tmp_path)
    want = msplora.adapter_state_dict(model)
    got = msplora.adapter_state_dict(loaded)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    ids = inputs()
    assert torch.equal(output(loaded, ids), output(model, ids))
    # loading again into an adapted model replaces the weights in place
    msplora.load_adapter(loaded, tmp_path)
    assert torch.equal(output(loaded, ids), output(model, ids))


def test_round_trip_with_conv1d_and_modules_to_save(tmp_path):
    torch.manual_seed(0)
    model = gpt2().eval()
    msplora.apply_msplora(model, MSPLoraConfig(target_modules=["c_attn"], init_weights=False,
                                               modules_to_save=["ln_f"]))
    with torch.no_grad():
        model.transformer.ln_f.weight.add_(0.5)
    msplora.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    loaded = gpt2().eval()
    msplora.load_adapter(loaded, tmp_path)
    ids = inputs()
    assert torch.equal(output(loaded, ids), output(model, ids))


def rewrite(tmp_path, change):
    model = trained_model()
    msplora.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    change(state)
    save_file(state, path)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s: s.pop("global.model.layers.*.self_attn.q_proj.lora_A"),
         r"missing key global\.model\.layers\.\*\.self_attn\.q_proj\.lora_A \(expected shape \(8, 32\)\)"),
        (lambda s: s.__setitem__("layer.model.layers.9.self_attn.q_proj.lora_A", torch.zeros(2, 32)),
         r"unexpected key layer\.model\.layers\.9\.self_attn\.q_proj\.lora_A"),
        (lambda s: s.__setitem__("mid.model.layers.*.self_attn.v_proj.1.lora_A", torch.zeros(5, 32)),
         r"mid\.model\.layers\.\*\.self_attn\.v_proj\.1\.lora_A: expected shape \(4, 32\), found \(5, 32\)"),
    ],
    ids=["missing", "unexpected", "wrong-shape"],
)
@pytest.mark.parametrize("into", ["plain", "adapted"])
def test_a_bad_file_names_the_key_and_changes_nothing(tmp_path, change, message, into):
    rewrite(tmp_path, change)
    model = fresh_model() if into == "plain" else trained_model(ranks=(8, 4, 2))
    if into == "adapted":
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.mul_(3.0)  # differ from the file, so that a partial copy would show
    snap = snapshot(model)
    with pytest.raises(ValueError, match=message):
        msplora.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


def test_wrong_ranks_in_config_are_reported_by_shape(tmp_path):
    msplora.save_adapter(trained_model(ranks=(4, 4, 2)), tmp_path)
    model = trained_model(ranks=(8, 4, 2))
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"expected shape \(8, 32\), found \(4, 32\)"):
        msplora.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


def test_corrupt_or_missing_files_change_nothing(tmp_path):
    msplora.save_adapter(trained_model(), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    model = fresh_model()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="cannot read adapter weights"):
        msplora.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)
    os.remove(weights)
    with pytest.raises(FileNotFoundError, match="no adapter weights"):
        msplora.load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        msplora.load_adapter(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        msplora.load_adapter(model, tmp_path / "nowhere")
    assert_unchanged(model, snap)


def test_file_holds_no_pickle(tmp_path):
    msplora.save_adapter(trained_model(), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_loading_into_a_merged_model_re_merges_the_new_weights(tmp_path):
    source = trained_model()
    msplora.save_adapter(source, tmp_path)
    torch.manual_seed(5)
    target = fresh_model()
    msplora.apply_msplora(target, MSPLoraConfig(target_modules=TARGETS, init_weights=False))
    msplora.merge(target)
    msplora.load_adapter(target, tmp_path)
    ids = inputs()
    assert all(layer.merged for _, layer in msplora.msplora_layers(target))
    torch.testing.assert_close(output(target, ids), output(source, ids), rtol=1e-4, atol=1e-5)
    plain = msplora.unload(target, merge=False)  # the old update left the base weights
    torch.testing.assert_close(output(plain, ids), output(fresh_model(), ids), rtol=1e-4, atol=1e-5)


def test_loading_weights_trained_with_other_alphas_is_refused(tmp_path):
    msplora.save_adapter(trained_model(alphas=(32, 32, 32)), tmp_path)
    model = trained_model()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"alphas=\(32.0, 32.0, 32.0\).*alphas=\(16.0, 16.0, 16.0\)"):
        msplora.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


def test_tied_weights_in_modules_to_save_are_stored_once(tmp_path):
    torch.manual_seed(0)
    model = gpt2().eval()
    msplora.apply_msplora(model, MSPLoraConfig(target_modules=["c_attn"], init_weights=False,
                                               modules_to_save=["lm_head", "wte"]))
    assert model.lm_head.weight is model.transformer.wte.weight
    msplora.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    loaded = gpt2().eval()
    msplora.load_adapter(loaded, tmp_path)
    assert torch.equal(output(loaded, inputs()), output(model, inputs()))
