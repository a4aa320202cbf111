"""One set of property checks run over a table of tiny Hugging Face models (PEFT's testing style)."""
import copy

import pytest
import torch

import msplora
from msplora import MSPLoraConfig, MSPLoraLinear

from .models import CASES, inputs, output


def adapted(builder, targets, **overrides):
    torch.manual_seed(0)
    model = builder().eval()
    base = copy.deepcopy(model)
    kwargs = dict(target_modules=targets, init_weights=False)
    kwargs.update(overrides)
    msplora.apply_msplora(model, MSPLoraConfig(**kwargs))
    return base, model


def set_backend(model, backend):
    for _, layer in msplora.msplora_layers(model):
        layer.backend = backend


params = pytest.mark.parametrize("name,builder,targets,num_layers", CASES, ids=[c[0] for c in CASES])


@params
def test_output_and_gradients_equal_the_reference(name, builder, targets, num_layers):
    _, model = adapted(builder, targets)
    model.double()  # fp64 so that the comparison is tight through the whole network
    ids = inputs()
    adapter = [p for p in model.parameters() if p.requires_grad]
    set_backend(model, "torch")
    y = output(model, ids)
    g = torch.autograd.grad(y.square().sum(), adapter)
    set_backend(model, "reference")
    y_ref = output(model, ids)
    g_ref = torch.autograd.grad(y_ref.square().sum(), adapter)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@params
def test_default_init_leaves_the_model_unchanged_and_nonzero_b_changes_it(name, builder, targets, num_layers):
    base, model = adapted(builder, targets, init_weights=True)
    ids = inputs()
    torch.testing.assert_close(output(model, ids), output(base, ids))
    _, model = adapted(builder, targets)
    assert not torch.allclose(output(model, ids), output(base, ids))


@params
def test_sharing_is_real(name, builder, targets, num_layers):
    _, model = adapted(builder, targets)
    bank = model.msplora_bank
    all_params = list(model.parameters())
    assert len({id(p) for p in all_params}) == len(all_params)  # each once
    for site, info in bank.sites.items():
        layers = [model.get_submodule(n) for n in info["layers"]]
        assert len(layers) == num_layers
        globals_ = {id(layer.branches()[0].A) for layer in layers}
        assert len(globals_) == 1
        assert len({layer.branches()[0].A.data_ptr() for layer in layers}) == 1
        for layer, group in zip(layers, info["groups"]):
            assert layer.branches()[1] is bank.mid_branch(site, group)
        assert len({id(layer.branches()[2]) for layer in layers}) == num_layers


@params
def test_shared_gradient_is_the_sum_of_each_layer_contribution(name, builder, targets, num_layers):
    _, model = adapted(builder, targets)
    ids = inputs()
    site, info = next(iter(model.msplora_bank.sites.items()))
    shared = model.msplora_bank.global_branch(site)
    output(model, ids).square().sum().backward()
    total = shared.A.grad.clone()
    # Give each layer a private copy of the global branch: the copies' gradients must add up to the total.
    model.zero_grad()
    copies = []
    for layer_name in info["layers"]:
        layer = model.get_submodule(layer_name)
        private = copy.deepcopy(shared)
        layer._shared = (private, layer._shared[1])
        copies.append(private)
    output(model, ids).square().sum().backward()
    torch.testing.assert_close(sum(c.A.grad for c in copies), total, rtol=1e-5, atol=1e-6)


@params
def test_only_adapter_parameters_change_after_training(name, builder, targets, num_layers):
    _, model = adapted(builder, targets, dropout=0.1)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        loss = output(model, inputs(seed=step)).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    adapter_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapter_names and all(
        (".A" in n or ".B" in n) and ("msplora_bank" in n or "layer_branch" in n) for n in adapter_names
    )
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (n in adapter_names), n


@params
def test_merge_unmerge_and_unload_keep_the_output(name, builder, targets, num_layers):
    base, model = adapted(builder, targets)
    ids = inputs()
    y = output(model, ids)
    msplora.merge(model)
    assert all(layer.merged for _, layer in msplora.msplora_layers(model))
    torch.testing.assert_close(output(model, ids), y, rtol=1e-4, atol=1e-5)
    msplora.unmerge(model)
    torch.testing.assert_close(output(model, ids), y, rtol=1e-4, atol=1e-5)
    with msplora.disable_adapters(model):
        torch.testing.assert_close(output(model, ids), output(base, ids), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output(model, ids), y, rtol=1e-4, atol=1e-5)
    plain = msplora.unload(model)
    assert not any(isinstance(m, MSPLoraLinear) for m in plain.modules())
    assert not hasattr(plain, "msplora_bank")
    assert set(dict(plain.named_parameters())) == set(dict(base.named_parameters()))
    torch.testing.assert_close(output(plain, ids), y, rtol=1e-4, atol=1e-5)


def test_unload_without_merge_gives_back_the_base_model():
    base, model = adapted(CASES[0][1], CASES[0][2])
    ids = inputs()
    msplora.merge(model)
    plain = msplora.unload(model, merge=False)
    torch.testing.assert_close(output(plain, ids), output(base, ids), rtol=1e-5, atol=1e-5)


def test_disable_adapters_on_a_merged_model_restores_the_merge():
    base, model = adapted(CASES[0][1], CASES[0][2])
    ids = inputs()
    y = output(model, ids)
    msplora.merge(model)
    with msplora.disable_adapters(model):
        torch.testing.assert_close(output(model, ids), output(base, ids), rtol=1e-5, atol=1e-5)
    assert all(layer.merged for _, layer in msplora.msplora_layers(model))
    torch.testing.assert_close(output(model, ids), y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "num_layers,groups,expected",
    [
        (6, 3, [0, 0, 1, 1, 2, 2]),
        (7, 3, [0, 0, 0, 1, 1, 2, 2]),
        (12, 3, [0] * 4 + [1] * 4 + [2] * 4),
        (5, 2, [0, 0, 0, 1, 1]),
        (2, 3, [0, 1]),
        (1, 3, [0]),
    ],
)
def test_mid_groups(num_layers, groups, expected):
    assert msplora.group_positions(num_layers, groups) == expected


def test_mid_groups_in_a_model_with_layers_not_divisible_by_groups():
    from .models import llama

    model = llama(num_layers=7)
    msplora.apply_msplora(model, MSPLoraConfig(target_modules=["q_proj"], num_mid_groups=3))
    info = model.msplora_bank.sites["model.layers.*.self_attn.q_proj"]
    assert info["groups"] == [0, 0, 0, 1, 1, 2, 2]
    assert len(model.msplora_bank.mid_branches["model__layers__N__self_attn__q_proj"]) == 3


def test_sites_are_module_paths_with_the_layer_index_starred():
    from .models import roberta

    model = roberta()
    msplora.apply_msplora(model, MSPLoraConfig(target_modules=["attention.output.dense", "output.dense"]))
    assert set(model.msplora_bank.sites) == {
        "roberta.encoder.layer.*.attention.output.dense",
        "roberta.encoder.layer.*.output.dense",
    }


def test_staged_training_freezes_the_other_scales():
    _, model = adapted(CASES[0][1], CASES[0][2])
    per_scale = msplora.model.scale_parameters(model)
    for active in ({"global"}, {"mid"}, {"layer"}, {"global", "mid", "layer"}):
        msplora.set_trainable_scales(model, active)
        output(model, inputs()).square().sum().backward()
        for scale, ps in per_scale.items():
            for p in ps:
                assert p.requires_grad == (scale in active)
                assert (p.grad is not None) == (scale in active)
        model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="unknown scales"):
        msplora.set_trainable_scales(model, {"globl"})


def test_trainable_parameters_and_count_parameters_match_a_hand_count():
    from transformers import RobertaConfig

    counts = msplora.count_parameters(RobertaConfig(), MSPLoraConfig(target_modules=["query", "value"]))
    # per site: global 8*(768+768), 3 mid groups of 4*(768+768), 12 layers of 2*(768+768); 2 sites
    assert counts["msplora"] == 2 * (8 * 1536 + 3 * 4 * 1536 + 12 * 2 * 1536) == 135_168
    assert counts["lora"] == 24 * 8 * 1536 == 294_912
    assert counts["msplora_per_scale"] == {"global": 24_576, "mid": 36_864, "layer": 73_728}

    _, model = adapted(CASES[0][1], ["q_proj"])  # 7 layers, 32 -> 32
    c = msplora.trainable_parameters(model)
    assert (c["global"], c["mid"], c["layer"]) == (8 * 64, 3 * 4 * 64, 7 * 2 * 64)
    assert c["adapter"] == c["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_rank_zero_disables_a_scale():
    _, model = adapted(CASES[0][1], ["q_proj"], ranks=(0, 4, 2))
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.branches()[0] is None and layer.branches()[1].rank == 4
    assert msplora.trainable_parameters(model)["global"] == 0


def test_rslora_and_alphas_set_each_scaling():
    _, model = adapted(CASES[0][1], ["q_proj"], alphas=(16, 8, 4), use_rslora=True)
    g, m, l = model.get_submodule("model.layers.0.self_attn.q_proj").branches()
    assert (g.scaling, m.scaling, l.scaling) == pytest.approx((16 / 8**0.5, 8 / 4**0.5, 4 / 2**0.5))


def test_all_linear_skips_the_output_head():
    from .models import llama

    model = llama(num_layers=2)
    msplora.apply_msplora(model, MSPLoraConfig(target_modules="all-linear"))
    names = [n for n, _ in msplora.msplora_layers(model)]
    assert len(names) == 2 * 7 and "lm_head" not in names


def test_regex_targets_and_exclusions():
    from .models import llama

    model = llama(num_layers=3)
    msplora.apply_msplora(
        model, MSPLoraConfig(target_modules=r".*\.(q|v)_proj", exclude_modules=r"model\.layers\.0\..*")
    )
    names = [n for n, _ in msplora.msplora_layers(model)]
    assert names == [f"model.layers.{i}.self_attn.{p}_proj" for i in (1, 2) for p in ("q", "v")]


def test_applying_twice_and_matching_nothing_are_clear_errors():
    from .models import llama

    model = llama(num_layers=2)
    with pytest.raises(ValueError, match="matched no module.*q_proj"):
        msplora.apply_msplora(model, MSPLoraConfig(target_modules=["qq_proj"]))
    assert not any(p.requires_grad is False for p in model.parameters())  # nothing was changed
    msplora.apply_msplora(model, MSPLoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has MSPLoRA"):
        msplora.apply_msplora(model, MSPLoraConfig(target_modules=["v_proj"]))


def test_a_non_linear_target_is_a_clear_error():
    from .models import llama

    with pytest.raises(ValueError, match="self_attn is a LlamaAttention"):
        msplora.apply_msplora(llama(num_layers=2), MSPLoraConfig(target_modules=["self_attn"]))


def test_modules_to_save_stay_trainable():
    from .models import roberta

    model = roberta()
    msplora.apply_msplora(model, MSPLoraConfig(target_modules=["query"], modules_to_save=["classifier"]))
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert not model.roberta.embeddings.word_embeddings.weight.requires_grad
    with pytest.raises(ValueError, match="modules_to_save"):
        msplora.apply_msplora(roberta(), MSPLoraConfig(target_modules=["query"], modules_to_save=["head"]))


def test_wrong_input_feature_size_raises_like_nn_linear():
    layer = MSPLoraLinear(torch.nn.Linear(8, 4), layer_branch=msplora.LoraBranch(8, 4, 2, 16, init_weights=False))
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        layer(torch.randn(3, 7))


def test_hand_built_stack_of_layers_sharing_branches():
    """Training code without Hugging Face: one owner module holds the shared branches."""
    torch.manual_seed(0)
    dim, num_layers, groups = 16, 5, 2
    owner = torch.nn.ModuleDict({
        "global": msplora.LoraBranch(dim, dim, 8, 16, init_weights=False),
        "mid": torch.nn.ModuleList([msplora.LoraBranch(dim, dim, 4, 16, init_weights=False) for _ in range(groups)]),
    })
    group_of = msplora.group_positions(num_layers, groups)
    layers = torch.nn.ModuleList([
        MSPLoraLinear(torch.nn.Linear(dim, dim), owner["global"], owner["mid"][group_of[i]],
                      msplora.LoraBranch(dim, dim, 2, 16, init_weights=False))
        for i in range(num_layers)
    ])
    net = torch.nn.ModuleDict({"shared": owner, "layers": layers})
    x = torch.randn(3, dim)
    h = x
    for layer in layers:
        h = layer(h)
    h.sum().backward()
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert len(trainable) == 2 + 2 * groups + 2 * num_layers
    assert all(p.grad is not None for p in trainable)


def test_multihead_attention_out_proj_is_skipped_by_all_linear_and_refused_by_name():
    def encoder():
        layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).train()  # no fast path

    model, x = encoder(), torch.randn(2, 5, 16)
    base = model(x)
    with pytest.warns(UserWarning, match="fast path"):
        msplora.apply_msplora(model, MSPLoraConfig(target_modules="all-linear", init_weights=False))
    names = [n for n, _ in msplora.msplora_layers(model)]
    assert names and not any(n.endswith("out_proj") for n in names)
    assert not torch.allclose(model(x), base)
    with pytest.raises(ValueError, match="out_proj of an nn.MultiheadAttention"):
        msplora.apply_msplora(encoder(), MSPLoraConfig(target_modules=["out_proj"]))


def test_reference_backend_runs_a_half_precision_model():
    from .models import llama

    model = llama(num_layers=2).to(torch.bfloat16)
    msplora.apply_msplora(model, MSPLoraConfig(target_modules=["q_proj"], init_weights=False, backend="reference"))
    y = output(model, inputs())
    set_backend(model, "torch")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, output(model, inputs()), rtol=0.05, atol=0.05)


def test_layer_branches_are_made_on_their_own_layer_device():
    from .models import llama

    model = llama(num_layers=2)
    model.model.layers[1].self_attn.q_proj.to("meta")  # stands in for a layer a device_map put elsewhere
    msplora.apply_msplora(model, MSPLoraConfig(target_modules=["q_proj"]))
    devices = [layer.layer_branch.A.device.type for _, layer in msplora.msplora_layers(model)]
    assert devices == ["cpu", "meta"]


def test_modules_to_save_may_not_overlap_the_targets():
    from .models import llama

    with pytest.raises(ValueError, match="modules_to_save and target_modules both select"):
        msplora.apply_msplora(llama(num_layers=2), MSPLoraConfig(target_modules=["q_proj"], modules_to_save=["q_proj"]))


def test_sites_whose_keys_would_collide_each_keep_their_own_branches():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Module()
            self.a.b = torch.nn.Linear(4, 4)
            self.a__b = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.a__b(self.a.b(x))

    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([Block(), Block()])
    msplora.apply_msplora(model, MSPLoraConfig(target_modules=["a.b", "a__b"]))
    bank = model.msplora_bank
    assert set(bank.sites) == {"blocks.*.a.b", "blocks.*.a__b"}
    assert len(bank.global_branches) == 2
    assert bank.global_branch("blocks.*.a.b") is not bank.global_branch("blocks.*.a__b")
    owned = {id(p) for p in model.parameters()}
    for _, layer in msplora.msplora_layers(model):
        assert all(id(p) in owned for b in layer.branches() for p in b.parameters())
