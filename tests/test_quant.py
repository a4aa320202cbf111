"""QLoRA: MSPLoRA over bitsandbytes 4-bit (NF4, FP4; fp32/bf16/fp16 compute; double quantisation on/off) and
8-bit bases, on bitsandbytes' CPU backend.

Layer level (bnb layers built by hand, odd shapes): the forward is ``base_layer(x)`` plus the reference
low-rank term with non-zero B, gradients reach the adapters and the input, never the quantised weight.
Model level (a tiny Llama saved to a temporary folder and loaded by ``from_pretrained(...,
quantization_config=BitsAndBytesConfig(...))``, as users do): PEFT's ``prepare_model_for_kbit_training`` with
gradient checkpointing before ``apply_msplora``, only adapters change under AdamW, save/load round trip exact,
``export_peft`` loaded by ``PeftModel.from_pretrained`` over the same quantised base within 1e-4, merge within
one requantisation step, ``unload(merge=False)`` gives the bnb layers back untouched, parameter counts
unpacked. Other quantisers' layers are refused at ``apply_msplora`` naming the layer type.

bitsandbytes 0.50's CPU inference kernel (AVX512-BF16 machines, eval mode without grad) needs
``in_features % 64 == 0`` and ``out_features % 32 == 0``; the tiny model's sizes respect that, the odd shapes
run with gradients (the kernel every machine has).
"""
import math
import os
import warnings

import pytest
import torch
import torch.nn as nn
import transformers as tf

import msplora
from msplora import MSPLoraConfig, MSPLoraLinear, msplora_linear_ref
from msplora.io import adapter_parameters

bnb = pytest.importorskip("bitsandbytes")

M, K, N = 37, 72, 50
RANKS = (4, 2, 1)
FOUR_BIT = [(q, dtype, double) for q in ("nf4", "fp4") for dtype in (torch.float32, torch.bfloat16, torch.float16)
            for double in (False, True)]
VOCAB = 97


def quantized_linear(kind, k=K, n=N, compute_dtype=torch.float32, double_quant=False, seed=0):
    """A bnb layer quantised from a random nn.Linear (on the CPU, quantisation happens at ``.to("cpu")``)."""
    torch.manual_seed(seed)
    dense = nn.Linear(k, n)
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(k, n, has_fp16_weights=False, threshold=0.0)
        layer.load_state_dict(dense.state_dict())
    else:
        layer = bnb.nn.Linear4bit(k, n, compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=kind)
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False,
                                         compress_statistics=double_quant, quant_type=kind)
        layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")


def adapted(base, dropout=0.0, seed=1):
    torch.manual_seed(seed)
    k, n = base.in_features, base.out_features
    branches = [msplora.LoraBranch(k, n, r, alpha=2 * r + 1, init_weights=False) for r in RANKS]
    layer = MSPLoraLinear(base, *branches[:2], layer_branch=branches[2], dropout=dropout)
    layer.shared = nn.ModuleList(branches[:2])  # the owner of the shared branches, as in the README
    return layer


def reference_term(x, layer):
    """The unfused reference's low-rank term (base weight zero), in fp64."""
    zero = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    branches = [(b.A.double(), b.B.double(), b.scaling) for b in layer.branches()]
    return msplora_linear_ref(x.double(), zero, None, branches)


def packed_state(base):
    """Everything a bnb layer's output depends on, copied."""
    w = base.weight
    state = {"data": w.data.clone()}
    qs = getattr(w, "quant_state", None)
    if qs is not None:
        state["absmax"] = qs.absmax.clone()
    for name in ("CB", "SCB"):
        for holder in (w, getattr(base, "state", None)):
            t = getattr(holder, name, None)
            if t is not None:
                state[name] = t.clone()
    return state


def assert_same_packed(before, after):
    for key in before.keys() & after.keys():
        assert torch.equal(before[key], after[key]), f"the quantised {key} changed"


# ------------------------------------------------------------------------------------------ layer level
@pytest.mark.parametrize("quant_type,compute_dtype,double_quant", FOUR_BIT)
def test_4bit_forward_is_base_layer_plus_reference_term(quant_type, compute_dtype, double_quant):
    layer = adapted(quantized_linear(quant_type, compute_dtype=compute_dtype, double_quant=double_quant))
    x = torch.randn(M, K, requires_grad=True)
    assert layer.calls_base_layer(x)
    y = layer(x)
    # fp32 activations: the low-rank term is fp32 whatever bnb computes the base in; K=72, R=7 terms.
    torch.testing.assert_close(y - layer.base_layer(x), reference_term(x, layer).float(), rtol=1e-5, atol=1e-5)
    assert y.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_4bit_half_activations_within_half_precision_error(dtype):
    """x in the compute dtype: the term is computed in it; judged by the error of torch's own half-precision
    computation of the reference against fp64 (ratio 2, plus a floor of a few ulps of the output)."""
    layer = adapted(quantized_linear("nf4", compute_dtype=dtype, double_quant=True))
    x = torch.randn(M, K).to(dtype)
    with torch.no_grad():
        term = (layer(x.requires_grad_()) - layer.base_layer(x)).double()
        half = msplora_linear_ref(x, torch.zeros(N, K, dtype=dtype), None,
                                  [(b.A.to(dtype), b.B.to(dtype), b.scaling) for b in layer.branches()]).double()
    exact = reference_term(x, layer)
    eps = torch.finfo(dtype).eps
    # the subtraction y - base adds one rounding of y (|y| ulp) to our side
    floor = 4 * eps * (exact.abs().max() + layer.base_layer(x).double().abs().max())
    assert (term - exact).abs().max() <= 2 * (half - exact).abs().max() + floor


def test_8bit_forward_is_base_layer_plus_reference_term():
    layer = adapted(quantized_linear("int8"))
    x = torch.randn(M, K, requires_grad=True)
    torch.testing.assert_close(layer(x) - layer.base_layer(x), reference_term(x, layer).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_gradients_reach_adapters_and_input_never_the_quantised_weight(kind):
    """dA, dB and dx against autograd through the dequantised weight and the fp64 reference; dropout 0."""
    base = quantized_linear(kind)
    layer = adapted(base)
    dense = msplora.quant.dequantized_weight(base).double()
    x = torch.randn(M, K, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(M, N, dtype=torch.float64)
    params = [p for b in layer.branches() for p in (b.A, b.B)]
    ref = [p.detach().double().requires_grad_() for p in params]
    y_ref = x @ dense.t() + msplora_linear_ref(x, torch.zeros(N, K, dtype=torch.float64), None,
                                               [(ref[2 * i], ref[2 * i + 1], b.scaling)
                                                for i, b in enumerate(layer.branches())])
    y_ref.backward(dy)
    x32 = x.detach().float().requires_grad_()
    layer(x32).backward(dy.float())
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad.double(), r.grad, rtol=1e-4, atol=1e-4)
    # bnb computes dx from its own dequantised weight in fp32 (8-bit: fp16 products); int8 rounds dy to fp16
    tol = 1e-4 if kind != "int8" else 3e-3
    torch.testing.assert_close(x32.grad.double(), x.grad, rtol=tol, atol=tol)
    assert all(p.grad is None for p in base.parameters())
    assert not any(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dropout_masks_are_independent_per_branch_and_off_in_eval(kind):
    layer = adapted(quantized_linear(kind, k=128, n=64), dropout=0.5)
    x = torch.randn(M, 128, requires_grad=True)
    torch.manual_seed(3)
    y1 = layer(x)
    torch.manual_seed(4)
    y2 = layer(x)
    assert not torch.equal(y1, y2), "dropout did not change the training output"
    layer.eval()
    with torch.no_grad():
        e1, e2 = layer(x.detach()), layer(x.detach())
    assert torch.equal(e1, e2)
    torch.testing.assert_close(e1 - layer.base_layer(x.detach()), reference_term(x, layer).float(), rtol=1e-5,
                               atol=1e-5)


# ------------------------------------------------------------------------------------------ model level
def tiny_llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg)


QUANT_CONFIGS = {
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                       bnb_4bit_use_double_quant=True),
    "fp4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16),
    "int8": dict(load_in_8bit=True),
}
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("base"))
    tiny_llama().save_pretrained(directory)
    return directory


def load_quantized(directory, kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tf.AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=tf.BitsAndBytesConfig(**QUANT_CONFIGS[kind]), device_map="cpu")
    quantized = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    assert isinstance(model.model.layers[0].self_attn.q_proj, quantized)
    return model


def ids(seed=0, batch=2, seq=9):
    return torch.randint(2, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def config(**kw):
    return MSPLoraConfig(target_modules=TARGETS, ranks=RANKS, num_mid_groups=2, init_weights=False, **kw)


@pytest.mark.parametrize("kind", list(QUANT_CONFIGS))
def test_kbit_training_changes_only_adapters(saved_base, kind, one_thread):
    peft = pytest.importorskip("peft")
    model = load_quantized(saved_base, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    assert model.is_gradient_checkpointing
    msplora.apply_msplora(model, config(dropout=0.1))
    targets = [m.base_layer for _, m in msplora.msplora_layers(model)]
    packed = [packed_state(t) for t in targets]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapters = adapter_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    losses = []
    for step in range(3):
        loss = model(input_ids=ids(step), labels=ids(step)).loss
        loss.backward()
        assert all(p.grad is not None for p in adapters.values()), "an adapter got no gradient"
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    adapter_ids = {id(p) for p in adapters.values()}
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == (id(p) in adapter_ids), f"{name}: changed={changed}"
    for t, state in zip(targets, packed):
        assert_same_packed(state, packed_state(t))


def test_parameter_counts_unpack_4bit_weights(saved_base):
    dense = msplora.apply_msplora(tiny_llama(), config())
    model = msplora.apply_msplora(load_quantized(saved_base, "nf4-double"), config())
    assert msplora.trainable_parameters(model) == msplora.trainable_parameters(dense)
    assert msplora.trainable_parameters(model)["all"] == sum(p.numel() for p in dense.parameters())


@pytest.mark.parametrize("kind", list(QUANT_CONFIGS))
def test_save_load_and_peft_export_over_the_quantized_base(saved_base, kind, tmp_path):
    peft = pytest.importorskip("peft")
    model = msplora.apply_msplora(load_quantized(saved_base, kind), config())
    model.eval()
    tokens = ids(5)
    expected = logits(model, tokens)
    with msplora.disable_adapters(model):
        assert (logits(model, tokens) - expected).abs().max() > 1e-3, "the adapter does not change the output"

    msplora.save_adapter(model, str(tmp_path / "adapter"))
    loaded = load_quantized(saved_base, kind)
    msplora.load_adapter(loaded, str(tmp_path / "adapter"))
    for key, p in adapter_parameters(loaded).items():
        assert torch.equal(p, adapter_parameters(model)[key]), key
    loaded.eval()
    assert torch.equal(logits(loaded, tokens), expected)

    msplora.export_peft(model, str(tmp_path / "peft"), task_type="CAUSAL_LM")
    peft_model = peft.PeftModel.from_pretrained(load_quantized(saved_base, kind), str(tmp_path / "peft"))
    peft_model.eval()
    torch.testing.assert_close(logits(peft_model, tokens), expected, rtol=1e-4, atol=1e-4)


def test_msplora_trainer_trains_over_a_quantized_base(saved_base, tmp_path, one_thread):
    """The Trainer refuses "purely quantized models" it sees no PEFT adapter on; MSPLoraTrainer declares its own."""
    model = msplora.apply_msplora(load_quantized(saved_base, "nf4-double"), config())

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"input_ids": ids(i, batch=1)[0], "labels": ids(i, batch=1)[0]}

    with pytest.raises(ValueError, match="purely quantized"):
        tf.Trainer(model=model, args=tf.TrainingArguments(output_dir=str(tmp_path / "plain"), use_cpu=True,
                                                          report_to=[]), train_dataset=Tokens())
    packed = [packed_state(layer.base_layer) for _, layer in msplora.msplora_layers(model)]
    before = {k: p.detach().clone() for k, p in adapter_parameters(model).items()}
    args = tf.TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, per_device_train_batch_size=2,
                                max_steps=2, save_steps=2, learning_rate=1e-2, report_to=[], disable_tqdm=True)
    msplora.MSPLoraTrainer(model=model, args=args, train_dataset=Tokens()).train()
    assert not getattr(model, "_hf_peft_config_loaded", False)
    assert os.path.isfile(tmp_path / "out" / "checkpoint-2" / "adapter_model.safetensors")
    assert all(not torch.equal(p, before[k]) for k, p in adapter_parameters(model).items())
    for (_, layer), state in zip(msplora.msplora_layers(model), packed):
        assert_same_packed(state, packed_state(layer.base_layer))


def _requantization_step(layer, target):
    """Largest error of quantising ``target`` (out, in) once into ``layer``'s stored format, per element.

    int8: row scale ``a = max|t|`` (t rounded to fp16 first), codes round(127 t / a): ``a / 254`` plus the fp16
    rounding. 4-bit: blocks of 64 with absmax ``a``, codes the nearest of the NF4/FP4 grid to ``t / a`` (at most
    half its largest gap ``g``), and the value ``code * a_q`` with ``a_q`` the stored absmax (double
    quantisation rounds it again): ``|code a_q - t| <= g a / 2 + |a_q - a|``."""
    if msplora.quant.is_bnb_8bit(layer):
        return target.abs().amax(1, keepdim=True) / 254 * (1 + 2**-9) + target.abs() * 2**-11
    state = layer.weight.quant_state
    code = bnb.functional.get_4bit_type(layer.weight.quant_type, device="cpu").float()
    half_gap = (code.sort().values.diff().max() / 2).item()
    stored = state.absmax.float() if not state.nested else (
        bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset)
    blocks = target.reshape(-1, 64).abs().amax(1, keepdim=True)
    bound = blocks * half_gap + (stored.reshape(-1, 1).float() - blocks).abs()
    return bound.expand(-1, 64).reshape(target.shape) * (1 + 2**-20)


@pytest.mark.parametrize("kind", ["nf4-double", "int8"])
def test_merge_requantizes_within_one_rounding_and_warns(saved_base, kind):
    model = msplora.apply_msplora(load_quantized(saved_base, kind), config())
    layers = list(msplora.msplora_layers(model))
    original = {n: msplora.quant.dequantized_weight(l.base_layer) for n, l in layers}
    deltas = {n: l.delta_weight() for n, l in layers}
    with pytest.warns(UserWarning, match="differs from the unmerged one by that rounding"):
        msplora.merge(model)
    first = {}
    for name, layer in layers:
        target = original[name] + deltas[name]
        merged = msplora.quant.dequantized_weight(layer.base_layer)
        first[name] = _requantization_step(layer.base_layer, target)
        assert ((merged - target).abs() <= first[name]).all(), name
        assert (merged - original[name]).abs().max() > 0, "the update was not merged"
    merged_weights = {n: msplora.quant.dequantized_weight(l.base_layer) for n, l in layers}
    with pytest.warns(UserWarning, match="unmerge does not restore the original bits"):
        msplora.unmerge(model)
    for name, layer in layers:  # two roundings: of W + delta, then of deQ(W') - delta
        second = _requantization_step(layer.base_layer, merged_weights[name] - deltas[name])
        error = (msplora.quant.dequantized_weight(layer.base_layer) - original[name]).abs()
        assert (error <= first[name] + second).all(), name
    merged = msplora.unload(model, merge=True)
    assert not any(isinstance(m, MSPLoraLinear) for m in merged.modules())
    assert isinstance(merged.model.layers[0].self_attn.q_proj, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


@pytest.mark.parametrize("kind", ["nf4-double", "int8"])
def test_unload_without_merge_gives_the_bnb_layers_back_untouched(saved_base, kind):
    model = load_quantized(saved_base, kind)
    originals = {n: m for n, m in model.named_modules() if n.endswith(tuple(TARGETS))}
    packed = {n: packed_state(m) for n, m in originals.items()}
    msplora.apply_msplora(model, config())
    model.train()
    loss = model(input_ids=ids(), labels=ids()).loss
    loss.backward()
    msplora.unload(model, merge=False)
    for name, module in originals.items():
        assert model.get_submodule(name) is module
        assert_same_packed(packed[name], packed_state(module))
    assert not hasattr(model, "msplora_bank")


# ------------------------------------------------------------------------------------------- refusals
def _fake_class(name, module, base=nn.Module):
    def init(self, k=8, n=8):
        if base is nn.Linear:
            base.__init__(self, k, n)
        else:
            base.__init__(self)
        self.in_features, self.out_features = k, n
        self.register_buffer("qweight", torch.zeros(n, k // 8, dtype=torch.int32))

    return type(name, (base,), {"__init__": init, "__module__": module, "forward": lambda self, x: x})


class _QuantizedTensor(torch.Tensor):
    pass


_QuantizedTensor.__module__ = "torchao.dtypes.affine_quantized_tensor"
_QuantizedTensor.__name__ = _QuantizedTensor.__qualname__ = "AffineQuantizedTensor"


def _torchao_linear():
    layer = nn.Linear(8, 8)
    layer.weight = nn.Parameter(layer.weight.data.as_subclass(_QuantizedTensor), requires_grad=False)
    return layer


def _int8_weight_linear():
    layer = nn.Linear(8, 8)
    layer.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    return layer


REFUSED = [
    ("GPTQ", lambda: _fake_class("QuantLinear", "auto_gptq.nn_modules.qlinear.qlinear_cuda")(), "QuantLinear.*GPTQ"),
    ("GPTQModel", lambda: _fake_class("TorchQuantLinear", "gptqmodel.nn_modules.qlinear.torch")(), "GPTQ"),
    ("AWQ", lambda: _fake_class("WQLinear_GEMM", "awq.modules.linear.gemm")(), "WQLinear_GEMM.*AWQ"),
    ("HQQ", lambda: _fake_class("HQQLinear", "hqq.core.quantize", nn.Linear)(), "HQQLinear.*HQQ"),
    ("quanto", lambda: _fake_class("QLinear", "optimum.quanto.nn.qlinear", nn.Linear)(), "QLinear.*quanto"),
    ("torchao", _torchao_linear, "AffineQuantizedTensor.*torchao"),
    ("int8 weight", _int8_weight_linear, "dtype torch.int8"),
]


def _block_model(make):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = make()
            self.other = nn.Linear(8, 8)

    model = nn.Module()
    model.layers = nn.ModuleList([Block(), Block()])
    return model


@pytest.mark.parametrize("label,make,message", REFUSED, ids=[r[0] for r in REFUSED])
@pytest.mark.parametrize("targets", [["proj"], "all-linear"])
def test_other_quantizers_are_refused_naming_the_layer_type(label, make, message, targets):
    model = _block_model(make)
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=f"target layers.0.proj is a .*{message}"):
        msplora.apply_msplora(model, MSPLoraConfig(target_modules=targets, ranks=(2, 1, 1)))
    assert [type(m) for m in model.modules()] == before
    assert not hasattr(model, "msplora_bank")
    assert all(p.requires_grad for p in model.layers[0].other.parameters())


def test_memory_benchmark_measures_both_bases(saved_base):
    """``benchmarks/qlora_memory.py`` on the tiny model: the 4-bit base's weights take less than the 16-bit one's."""
    from benchmarks import qlora_memory

    rows = {base: qlora_memory.measure_one(saved_base, base, "cpu", steps=1, batch=1, seq=8)
            for base in qlora_memory.BASES}
    assert rows["nf4"]["weights_mb"] < rows["bf16"]["weights_mb"]
    assert rows["nf4"]["all_params"] == rows["bf16"]["all_params"]
    assert all(r["training_mb"] >= 0 and math.isfinite(r["last_loss"]) for r in rows.values())
    text = qlora_memory.markdown({"size": "tiny", "shape": qlora_memory.SIZES["small"], "batch": 1, "seq": 8,
                                  "steps": 1, "device": "cpu", "commit": "x", "date": "d", "loadavg": "0",
                                  "rows": list(rows.values())})
    assert "| nf4 |" in text and "4-bit / 16-bit" in text
