"""Base layers that must be *called*: hooks, ``nn.Linear`` subclasses, the meta device and accelerate's offloading.

``MSPLoraLinear`` runs the fused op on the weight of a plain, hook-free ``nn.Linear``/``Conv1D`` and otherwise
calls the base layer and adds the low-rank term (``msplora.layer``). Checked here: user forward hooks and
pre-hooks run and take effect; a subclass's own forward is used; a model on the meta device runs forward;
``accelerate.cpu_offload``, ``dispatch_model`` with layers offloaded to disk, and a ``from_pretrained(...,
device_map=...)`` model with disk offload give the non-offloaded model's logits, gradients and AdamW steps;
plain layers keep the fused path.
"""
import copy

import pytest
import torch
import torch.nn as nn
import transformers as tf

import msplora
from msplora import MSPLoraConfig, MSPLoraLinear, msplora_linear_ref
from msplora.io import adapter_parameters, adapter_state_dict

from .models import inputs, llama

M, K, N = 37, 72, 50
RANKS = (4, 2, 1)


def adapted(base, dropout=0.0):
    torch.manual_seed(1)
    branches = [msplora.LoraBranch(base.in_features, base.out_features, r, 2 * r + 1, init_weights=False)
                for r in RANKS]
    layer = MSPLoraLinear(base, *branches[:2], layer_branch=branches[2], dropout=dropout)
    layer.shared = nn.ModuleList(branches[:2])
    return layer


def reference(x, weight, bias, layer):
    return msplora_linear_ref(x, weight, bias, [(b.A, b.B, b.scaling) for b in layer.branches()])


# ------------------------------------------------------------------------------------- hooks (issue 10, 8)
def test_forward_hooks_on_the_base_layer_run_and_take_effect():
    base = nn.Linear(K, N)
    layer = adapted(base)
    x = torch.randn(M, K)
    calls = []
    pre = base.register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
    post = base.register_forward_hook(lambda mod, args, out: calls.append(out.shape) or out + 1)
    assert layer.calls_base_layer(x)
    y = layer(x)
    assert calls == [torch.Size([M, N])]
    # the pre-hook doubles the base layer's input only; the low-rank term reads the layer's input
    expected = base.weight.new_zeros(()) + torch.nn.functional.linear(2 * x, base.weight, base.bias) + 1
    expected = expected + reference(x, torch.zeros(N, K), None, layer)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    pre.remove()
    post.remove()
    assert not layer.calls_base_layer(x), "a plain layer without hooks must keep the fused path"
    torch.testing.assert_close(layer(x), reference(x, base.weight, base.bias, layer), rtol=1e-5, atol=1e-5)


def test_a_linear_subclass_is_called_not_read():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 3 * super().forward(x)

    base = Scaled(K, N)
    layer = adapted(base)
    x = torch.randn(M, K, requires_grad=True)
    y = layer(x)
    expected = 3 * torch.nn.functional.linear(x, base.weight, base.bias) + reference(x, torch.zeros(N, K), None, layer)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert all(b.A.grad is not None and b.B.grad is not None for b in layer.branches())


def test_fused_path_is_kept_for_plain_layers(monkeypatch):
    calls = []
    original = msplora.layer.msplora_linear
    monkeypatch.setattr(msplora.layer, "msplora_linear", lambda *a, **k: calls.append(1) or original(*a, **k))
    layer = adapted(nn.Linear(K, N))
    layer(torch.randn(M, K))
    assert calls == [1]


# ------------------------------------------------------------------------------- meta device (issue 10, 7)
def test_forward_on_the_meta_device():
    with torch.device("meta"):
        model = llama(3)
    msplora.apply_msplora(model, MSPLoraConfig(target_modules=["q_proj", "v_proj"], ranks=RANKS))
    assert all(p.device.type == "meta" for p in adapter_parameters(model).values())
    out = model(input_ids=torch.zeros(2, 5, dtype=torch.long, device="meta"))
    assert out.logits.device.type == "meta" and out.logits.shape == (2, 5, 97)


# ------------------------------------------------------------------------------------ accelerate offloading
accelerate = pytest.importorskip("accelerate")
CONFIG = MSPLoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], ranks=RANKS, num_mid_groups=2,
                       init_weights=False, dropout=0.0)
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return llama(3)


def _cpu_offload(model, tmp_path):
    accelerate.cpu_offload(model, execution_device="cpu")
    return model


def _dispatch_to_disk(model, tmp_path):
    accelerate.dispatch_model(model, device_map=DEVICE_MAP, offload_dir=str(tmp_path / "offload"))
    return model


def _from_pretrained_device_map(model, tmp_path):
    model.save_pretrained(str(tmp_path / "base"))
    return tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), device_map=DEVICE_MAP,
                                                   offload_folder=str(tmp_path / "offload"))


OFFLOADS = {"cpu_offload": _cpu_offload, "dispatch_model": _dispatch_to_disk, "device_map": _from_pretrained_device_map}


@pytest.mark.parametrize("how", list(OFFLOADS))
def test_offloaded_model_trains_like_the_plain_one(base_model, how, tmp_path, one_thread):
    plain = msplora.apply_msplora(copy.deepcopy(base_model), CONFIG)
    offloaded = OFFLOADS[how](copy.deepcopy(base_model), tmp_path)
    q_proj = offloaded.model.layers[1].self_attn.q_proj
    assert q_proj.weight.device.type == "meta", "the test model is not offloaded"
    msplora.apply_msplora(offloaded, CONFIG)
    params, plain_params = adapter_parameters(offloaded), adapter_parameters(plain)
    with torch.no_grad():
        for key, p in params.items():
            assert p.device.type == "cpu", f"{key} was made on {p.device}"
            p.copy_(plain_params[key])
    optimizers = [torch.optim.AdamW(list(ps.values()), lr=1e-2, weight_decay=0.1) for ps in (params, plain_params)]
    for step in range(2):
        ids = inputs(seed=step)
        losses = [m(input_ids=ids, labels=ids).loss for m in (offloaded, plain)]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
        for loss in losses:
            loss.backward()
        for key, p in params.items():
            torch.testing.assert_close(p.grad, plain_params[key].grad, rtol=1e-5, atol=1e-7, msg=key)
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    for key, p in params.items():
        torch.testing.assert_close(p, plain_params[key], rtol=1e-5, atol=1e-6, msg=key)
    with torch.no_grad():
        ids = inputs(seed=9)
        torch.testing.assert_close(offloaded(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert offloaded.model.layers[1].self_attn.q_proj.base_layer.weight.device.type == "meta", "offload was undone"
    state = adapter_state_dict(offloaded)
    assert all(t.device.type == "cpu" for t in state.values())


def test_offloading_after_apply_is_refused_with_the_fix(base_model):
    model = msplora.apply_msplora(copy.deepcopy(base_model), CONFIG)
    accelerate.cpu_offload(model, execution_device="cpu")
    with pytest.raises(RuntimeError, match="Offload the base model first, then apply_msplora"):
        model(input_ids=inputs())
