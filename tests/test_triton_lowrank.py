"""The low-rank term alone on the Triton backend (``msplora_lowrank``, ``weight=None``): what layers whose base
layer is called on its own (bitsandbytes 4/8-bit, hooked, offloaded) add to the base layer's output.

Runs on CUDA where there is one, else under the Triton interpreter (``conftest.py`` sets ``TRITON_INTERPRET=1``).
Oracle: the fused Triton layer with the same torch seed draws the same masks, so ``msplora_linear`` =
``x W^T + msplora_lowrank`` in every output and gradient. Both sides run the same kernels on the same masks
and differ only in the base GEMM's rounding (added to y, and dy W to dx), so in fp64 the difference is a few
ulps of the values: 1e-10 relative.
"""
import pytest
import torch
from torch import nn

from msplora_kernels import dispatch, msplora_linear, msplora_linear_ref, msplora_lowrank

pytest.importorskip("triton")
if not torch.cuda.is_available() and not dispatch.triton_interpreted():
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from msplora import LoraBranch, MSPLoraLinear  # noqa: E402
from msplora_kernels import triton_backend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
M, K, N = 37, 72, 50


def problem(ranks, dtype=torch.float64, seed=3):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).to(DEVICE)  # noqa: E731
    x = rand(M, K).requires_grad_()
    weight = rand(N, K) / K**0.5
    branches = [(rand(r, K).div(K**0.5).requires_grad_(), rand(N, r).requires_grad_(), 16.0 / r)
                for r in ranks if r]
    dy = rand(M, N)
    return x, weight, branches, dy


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("ranks", [(8, 4, 2), (16, 0, 3)])
def test_lowrank_alone_is_the_fused_layer_minus_its_base(p, ranks):
    x, weight, branches, dy = problem(ranks)
    params = [x] + [t for a, b, _ in branches for t in (a, b)]
    torch.manual_seed(11)
    fused = msplora_linear(x, weight, None, branches, dropout_p=p, training=True, backend="triton")
    grads_fused = torch.autograd.grad(fused, params, dy)
    torch.manual_seed(11)
    low = msplora_lowrank(x, branches, dropout_p=p, training=True, backend="triton")
    grads_low = torch.autograd.grad(low, params, dy)

    close = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(low.detach() + x.detach() @ weight.t(), fused, **close)
    torch.testing.assert_close(grads_low[0] + dy @ weight, grads_fused[0], **close)
    for got, want in zip(grads_low[1:], grads_fused[1:]):
        torch.testing.assert_close(got, want, **close)
    if p > 0:  # the masks are real: the term differs from the undropped one
        undropped = msplora_lowrank(x, branches, backend="triton")
        assert (undropped - low).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lowrank_alone_matches_the_reference_without_dropout(dtype):
    """Against the fp64 reference term (its base part subtracted), judged by the error of the same maths run
    by PyTorch in ``dtype`` (flash-attention's rule: at most twice that, plus a small floor)."""
    x, weight, branches, dy = problem((8, 4, 2))
    zero = torch.zeros_like(weight)
    exact = msplora_linear_ref(x, zero, None, branches)
    cast = [(a.detach().to(dtype), b.detach().to(dtype), c) for a, b, c in branches]
    same_dtype = msplora_linear_ref(x.detach().to(dtype), zero.to(dtype), None, cast)
    got = msplora_lowrank(x.detach().to(dtype), cast, backend="triton")
    assert got.dtype == dtype and got.shape == (M, N)
    ours = (got.double() - exact).abs().max().item()
    theirs = (same_dtype.double() - exact).abs().max().item()
    floor = {torch.float32: 1e-5, torch.float16: 1e-3}[dtype] * exact.abs().max().item()
    assert ours <= 2 * theirs + floor, (ours, theirs, floor)


def test_a_hooked_base_layer_runs_the_triton_lowrank_kernels(monkeypatch):
    """A layer whose base has a forward hook calls it and adds the Triton low-rank term: same output and
    gradients as the fused op on the same layer without the hook, with the hook run."""
    torch.manual_seed(0)
    base = nn.Linear(K, N, dtype=torch.float64, device=DEVICE)
    branches = {name: LoraBranch(K, N, r, 16.0, dtype=torch.float64, device=DEVICE)
                for name, r in (("global_branch", 8), ("mid_branch", 4), ("layer_branch", 2))}
    for branch in branches.values():
        nn.init.normal_(branch.B)  # non-zero B
    layer = MSPLoraLinear(base, dropout=0.1, backend="triton", **branches).train()
    x = torch.randn(M, K, dtype=torch.float64, device=DEVICE)

    torch.manual_seed(5)
    plain = layer(x)
    plain.square().sum().backward()
    grads_plain = [b.A.grad.clone() for b in branches.values()]
    for branch in branches.values():
        branch.zero_grad()

    calls = {"hook": 0, "lowrank": 0}
    forward = triton_backend.forward

    def counting_forward(x2d, weight, *args):
        calls["lowrank"] += weight is None
        return forward(x2d, weight, *args)

    monkeypatch.setattr(triton_backend, "forward", counting_forward)
    base.register_forward_hook(lambda *_: calls.__setitem__("hook", calls["hook"] + 1))
    assert layer.calls_base_layer(x)
    torch.manual_seed(5)
    hooked = layer(x)
    hooked.square().sum().backward()
    assert calls == {"hook": 1, "lowrank": 1}
    torch.testing.assert_close(hooked, plain, rtol=1e-10, atol=1e-10)
    for branch, want in zip(branches.values(), grads_plain):
        torch.testing.assert_close(branch.A.grad, want, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="bitsandbytes layers built on the CPU here")
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_quantised_base_with_the_triton_lowrank_term(kind):
    """QLoRA on the Triton backend: a bitsandbytes 4-bit or 8-bit base (run by bitsandbytes) plus the Triton
    low-rank term equals the same layer on the PyTorch backend (fp32: both sum the same few products; the
    bound is a few fp32 ulps of the output's scale), in output and adapter gradients."""
    pytest.importorskip("bitsandbytes")
    from tests.test_quant import adapted, quantized_linear

    layer = adapted(quantized_linear(kind))
    x = torch.randn(M, K)
    outputs, grads = [], []
    for backend in ("torch", "triton"):
        layer.backend = backend
        layer.zero_grad()
        y = layer(x)
        y.square().sum().backward()
        outputs.append(y.detach())
        grads.append([p.grad.clone() for p in layer.parameters() if p.requires_grad])
    scale = outputs[0].abs().max().item()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-5 * scale)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert len(grads[0]) == 6  # A and B of three branches, never the quantised weight
