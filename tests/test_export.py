"""``msplora.export_peft``: the written adapter is a PEFT LoRA adapter that PEFT loads with the MSPLoRA model's
outputs (fp32, 1e-4), for Linear and Conv1D (GPT-2) layers, any alphas, rsLoRA, disabled scales, layers of
different total rank and a trained classifier head; and MSPLoRA with ranks 0/0/r is PEFT LoRA r."""
import json
import os

import pytest
import torch
import transformers as tf

import msplora
from msplora import MSPLoraConfig

peft = pytest.importorskip("peft")

VOCAB = 61


def tiny_llama():
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32))


def tiny_gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=3, n_head=2, n_positions=32))


def tiny_roberta():
    return tf.RobertaForSequenceClassification(tf.RobertaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=40, num_labels=3, pad_token_id=1, initializer_range=0.3))


MODELS = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"], None),
    "gpt2-conv1d": (tiny_gpt2, ["c_attn", "mlp.c_proj"], None),
    "roberta-seqcls": (tiny_roberta, ["query", "value"], "SEQ_CLS"),
}


def base_and_adapted(name, **config):
    """Two copies of one random base model; the second gets MSPLoRA with random (non-zero) A and B."""
    build, targets, _ = MODELS[name]
    torch.manual_seed(0)
    base = build().eval()
    adapted = build().eval()
    adapted.load_state_dict(base.state_dict())
    config.setdefault("init_weights", False)
    msplora.apply_msplora(adapted, MSPLoraConfig(target_modules=targets, **config))
    return base, adapted


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize(
    "config",
    [
        dict(ranks=(4, 2, 1), alphas=(16, 16, 16)),
        dict(ranks=(3, 2, 5), alphas=(4, 9, 1.5), num_mid_groups=2),
        dict(ranks=(2, 2, 2), alphas=(8, 3, 5), use_rslora=True),
        dict(ranks=(0, 2, 3), alphas=(1, 7, 2)),
    ],
    ids=["paper-alphas", "different-alphas", "rslora", "no-global"],
)
def test_peft_loads_the_export_with_the_same_outputs(tmp_path, model_name, config):
    base, adapted = base_and_adapted(model_name, **config)
    expected = logits(adapted, IDS)
    assert (expected - logits(base, IDS)).abs().max() > 1e-2  # the adapter changes the outputs

    written = msplora.export_peft(adapted, str(tmp_path), task_type=MODELS[model_name][2])
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()

    assert written["r"] == sum(config["ranks"]) and written["lora_alpha"] == written["r"]
    assert isinstance(loaded.peft_config["default"], peft.LoraConfig)
    torch.testing.assert_close(logits(loaded, IDS), expected, rtol=1e-4, atol=1e-4)


def test_export_writes_peft_files_with_one_concatenated_lora_per_layer(tmp_path):
    _, adapted = base_and_adapted("llama", ranks=(4, 2, 1), alphas=(16, 8, 2))
    msplora.export_peft(adapted, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(tmp_path / "adapter_config.json") as f:
        cfg = json.load(f)
    assert cfg["peft_type"] == "LORA" and not cfg["use_rslora"] and cfg["fan_in_fan_out"] is False

    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    layer = adapted.model.layers[3].self_attn.q_proj
    a = tensors["base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (7, 16) and b.shape == (16, 7)
    g, m, l = layer.branches()
    torch.testing.assert_close(a, torch.cat([g.A, m.A, l.A]).detach())
    torch.testing.assert_close(b[:, :4], g.B.detach() * 4.0)  # 16 / 4
    torch.testing.assert_close(b[:, 6:], l.B.detach() * 2.0)  # 2 / 1
    torch.testing.assert_close(b @ a, layer.delta_weight(), rtol=1e-5, atol=1e-6)


def test_layers_of_different_total_rank_export_through_rank_pattern(tmp_path):
    base, adapted = base_and_adapted("llama", ranks=(2, 2, 3), alphas=(4, 5, 6))
    adapted.model.layers[1].self_attn.v_proj.layer_branch = None  # this layer is rank 4, the others 7
    expected = logits(adapted, IDS)

    written = msplora.export_peft(adapted, str(tmp_path))
    assert written["r"] == 7
    assert written["rank_pattern"] == {r"model\.layers\.1\.self_attn\.v_proj": 4}
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    torch.testing.assert_close(logits(loaded, IDS), expected, rtol=1e-4, atol=1e-4)


def test_trained_head_in_modules_to_save_is_exported(tmp_path):
    base, adapted = base_and_adapted("roberta-seqcls", ranks=(2, 1, 1), modules_to_save=["classifier"])
    with torch.no_grad():
        adapted.classifier.out_proj.weight.normal_()
    written = msplora.export_peft(adapted, str(tmp_path), task_type="SEQ_CLS")
    assert written["modules_to_save"] == ["classifier"]
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    torch.testing.assert_close(logits(loaded, IDS), logits(adapted, IDS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_name", ["llama", "gpt2-conv1d"])
@pytest.mark.parametrize("rank,alpha", [(4, 8.0), (3, 16.0)])
def test_msplora_with_only_the_layer_scale_is_peft_lora(model_name, rank, alpha):
    build, targets, _ = MODELS[model_name]
    torch.manual_seed(0)
    base = build().eval()
    adapted = build().eval()
    adapted.load_state_dict(base.state_dict())
    lora = peft.get_peft_model(
        base, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                              fan_in_fan_out=model_name == "gpt2-conv1d")
    ).eval()
    msplora.apply_msplora(adapted, MSPLoraConfig(target_modules=targets, ranks=(0, 0, rank), alphas=(1, 1, alpha)))

    for name, layer in msplora.msplora_layers(adapted):
        peft_layer = lora.base_model.model.get_submodule(name)
        with torch.no_grad():
            layer.layer_branch.A.copy_(peft_layer.lora_A["default"].weight)
            layer.layer_branch.B.copy_(peft_layer.lora_B["default"].weight)
    assert msplora.trainable_parameters(adapted)["adapter"] == sum(
        p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    torch.testing.assert_close(logits(adapted, IDS), logits(lora, IDS), rtol=1e-5, atol=1e-5)


def test_export_of_a_wrapped_model_is_the_export_of_the_model(tmp_path):
    _, adapted = base_and_adapted("llama", ranks=(2, 1, 1))
    msplora.export_peft(adapted, str(tmp_path / "plain"))
    msplora.export_peft(torch.compile(adapted), str(tmp_path / "compiled"))  # wrapped, never run
    from safetensors.torch import load_file

    plain, wrapped = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("plain", "compiled"))
    assert plain.keys() == wrapped.keys() and all(torch.equal(plain[k], wrapped[k]) for k in plain)


def test_export_refuses_merged_models_and_bad_task_types(tmp_path):
    _, adapted = base_and_adapted("llama", ranks=(1, 1, 1))
    with pytest.raises(ValueError, match="task_type must be one of"):
        msplora.export_peft(adapted, str(tmp_path), task_type="CLASSIFY")
    msplora.merge(adapted)
    with pytest.raises(ValueError, match="unmerge"):
        msplora.export_peft(adapted, str(tmp_path))
    with pytest.raises(ValueError, match="no MSPLoRA adapters"):
        msplora.export_peft(tiny_llama(), str(tmp_path))


def tied_llama():
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True))


@pytest.mark.parametrize("saved", [["lm_head"], ["embed_tokens", "lm_head"]])
def test_a_trained_tied_head_exports_exactly(tmp_path, saved):
    torch.manual_seed(0)
    base = tied_llama().eval()
    adapted = tied_llama().eval()
    adapted.load_state_dict(base.state_dict())
    assert adapted.lm_head.weight is adapted.model.embed_tokens.weight
    msplora.apply_msplora(adapted, MSPLoraConfig(target_modules=["q_proj", "v_proj"], ranks=(2, 1, 1),
                                                 init_weights=False, modules_to_save=saved))
    with torch.no_grad():  # training the tied head moves the input embeddings too
        adapted.lm_head.weight.add_(torch.randn_like(adapted.lm_head.weight))
    written = msplora.export_peft(adapted, str(tmp_path / "export"), task_type="CAUSAL_LM")
    assert sorted(written["modules_to_save"]) == ["embed_tokens", "lm_head"]
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "export")).eval()
    torch.testing.assert_close(logits(loaded, IDS), logits(adapted, IDS), rtol=1e-4, atol=1e-4)
    assert os.listdir(tmp_path) == ["export"]  # no staging folder left behind


def test_a_failed_export_leaves_no_folder_and_an_existing_one_untouched(tmp_path, monkeypatch):
    _, adapted = base_and_adapted("llama", ranks=(2, 1, 1))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(msplora.export, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        msplora.export_peft(adapted, str(tmp_path / "new"))
    assert os.listdir(tmp_path) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "adapter_config.json").write_text("{}")
    with pytest.raises(OSError, match="disk full"):
        msplora.export_peft(adapted, str(tmp_path / "old"))
    assert os.listdir(tmp_path) == ["old"] and (tmp_path / "old" / "adapter_config.json").read_text() == "{}"


@pytest.mark.parametrize("arch,saved", [("roberta", ["lm_head"]), ("bert", ["decoder"])])
def test_a_masked_lm_head_with_shared_biases_exports_exactly(tmp_path, arch, saved):
    common = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=40, pad_token_id=1)
    build = (lambda: tf.RobertaForMaskedLM(tf.RobertaConfig(**common))) if arch == "roberta" else (
        lambda: tf.BertForMaskedLM(tf.BertConfig(**common)))
    torch.manual_seed(0)
    base, adapted = build().eval(), build().eval()
    adapted.load_state_dict(base.state_dict())
    msplora.apply_msplora(adapted, MSPLoraConfig(target_modules=["query", "value"], ranks=(2, 1, 1),
                                                 init_weights=False, modules_to_save=saved))
    with torch.no_grad():
        for p in adapted.get_submodule("lm_head" if arch == "roberta" else "cls.predictions.decoder").parameters():
            p.add_(torch.randn_like(p))
    written = msplora.export_peft(adapted, str(tmp_path))
    assert "predictions" not in written["modules_to_save"]  # never an ancestor of a saved module
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    torch.testing.assert_close(logits(loaded, IDS), logits(adapted, IDS), rtol=1e-4, atol=1e-4)
