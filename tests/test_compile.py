"""``torch.compile`` (inductor, CPU): a whole tiny Hugging Face model with MSPLoRA layers (dropout on) trains
with the losses and adapter values of eager mode, and one ``MSPLoraLinear`` compiles with ``fullgraph=True``
(no graph break: the custom ops trace) in fp32 and under bf16 autocast. Compiling is slow on small CPUs, so
there are exactly three small graphs."""
import pytest
import torch
import torch._dynamo
import torch._inductor.config as inductor_config
import transformers as tf

import msplora
from msplora import LoraBranch, MSPLoraConfig, MSPLoraLinear

STEPS = 3


def tiny_llama():
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=53, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32))
    return msplora.apply_msplora(model, MSPLoraConfig(
        target_modules=["q_proj", "v_proj"], ranks=(4, 2, 1), init_weights=False, dropout=0.1, backend="torch"))


def train(model, forward):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 53, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)  # the dropout seeds are drawn from the global generator
    losses = []
    for _ in range(STEPS):
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), {k: p.detach() for k, p in msplora.adapter_state_dict(model).items()}


def test_whole_model_compiles_and_trains_with_eager_losses():
    eager_losses, eager_params = train(eager := tiny_llama(), eager)
    torch._dynamo.reset()
    compiled = tiny_llama()
    # fallback_random: inductor draws random numbers (here the dropout seeds) as eager does, so runs compare.
    with inductor_config.patch(fallback_random=True):
        compiled_losses, compiled_params = train(compiled, torch.compile(compiled))
    assert not torch.equal(eager_losses[0], eager_losses[-1])  # it trains
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for key, value in eager_params.items():
        torch.testing.assert_close(compiled_params[key], value, rtol=1e-5, atol=1e-6, msg=key)


# Error model: compiled and eager code may round at different points (fused kernels keep fp32 intermediates):
# a few units of the last place of the output dtype, relative to the tensor's scale: 2^-8 for bf16 -> 5 ulps.
@pytest.mark.parametrize("autocast_dtype,tol", [(None, 1e-5), (torch.bfloat16, 5 * 2**-8)], ids=["fp32", "bf16-autocast"])
def test_one_layer_compiles_with_fullgraph(autocast_dtype, tol):
    torch._dynamo.reset()
    shared = LoraBranch(24, 20, 4, 16.0, init_weights=False)
    layer = MSPLoraLinear(torch.nn.Linear(24, 20), shared, LoraBranch(24, 20, 2, 8.0, init_weights=False),
                          LoraBranch(24, 20, 1, 4.0, init_weights=False), backend="torch").eval()
    x = torch.randn(3, 5, 24, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)

    def run(fn):
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            y = fn(x)
        y.float().square().sum().backward()
        grads = [x.grad.clone()] + [p.grad.clone() for p in (shared.A, shared.B, layer.layer_branch.A)]
        x.grad = None
        layer.zero_grad()
        shared.zero_grad()  # referenced by the layer, not registered in it
        return y, grads

    y_eager, grads_eager = run(layer)
    y_compiled, grads_compiled = run(compiled)
    assert y_compiled.dtype == (autocast_dtype or torch.float32)
    torch.testing.assert_close(y_compiled, y_eager, rtol=tol, atol=tol * y_eager.abs().max().item())
    for got, expected in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol * expected.abs().max().item())
