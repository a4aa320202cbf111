"""GPU-only checks of the Triton backend (skipped without CUDA): bf16, autocast, large shapes and 64-bit
offsets, bit-identical gradients under deterministic algorithms, and ``torch.compile(fullgraph=True)``.

Everything that can be proven on the CPU is in ``test_triton_kernels.py``, which runs here on CUDA too.
"""
import pytest
import torch

from msplora_kernels import msplora_linear, msplora_linear_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
triton = pytest.importorskip("triton")

DEVICE = torch.device("cuda")


def make_problem(m, k, n, ranks, dtype, bias=True, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=DEVICE, dtype=torch.float32)  # noqa: E731
    x = rand(m, k).to(dtype)
    weight = (rand(n, k) / k**0.5).to(dtype)
    b = rand(n).to(dtype) if bias else None
    branches = [((rand(r, k) / k**0.5).to(dtype), (rand(n, r) / r**0.5).to(dtype), 16.0 / r) for r in ranks if r]
    return x, weight, b, branches


def grads_of(y, leaves, dy):
    return torch.autograd.grad(y, leaves, dy)


def leaves_of(x, branches):
    return [x] + [t for a, b, _ in branches for t in (a, b)]


def with_grad(x, branches):
    return x.detach().requires_grad_(), [(a.detach().requires_grad_(), b.detach().requires_grad_(), c)
                                          for a, b, c in branches]


def error(got, exact):
    return (got.double() - exact.double()).abs().max().item()


@pytest.mark.parametrize("path", ["fused", "unfused"])
@pytest.mark.parametrize("m,k,n", [(37, 72, 50), (1, 4096, 4096), (2048, 4096, 11008), (4096, 11008, 4096)])
@pytest.mark.parametrize("ranks", [(8, 4, 2), (64, 32, 16), (256, 0, 3)])
def test_bf16_forward_and_gradients_by_the_error_ratio_rule(m, k, n, ranks, path):
    from msplora_kernels import triton_backend

    x, weight, b, branches = make_problem(m, k, n, ranks, torch.bfloat16)
    dy = torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16)
    x, branches = with_grad(x, branches)
    with triton_backend.forced_path(path):
        y = msplora_linear(x, weight, b, branches, backend="triton")
        got = grads_of(y, leaves_of(x, branches), dy)
    x64, br64 = with_grad(x.double(), [(a.double(), bb.double(), c) for a, bb, c in branches])
    y64 = msplora_linear_ref(x64, weight.double(), b.double(), br64)
    exact = grads_of(y64, leaves_of(x64, br64), dy.double())
    y_pt = msplora_linear_ref(x, weight, b, branches)
    theirs = grads_of(y_pt, leaves_of(x, branches), dy)
    names = ["y", "dx"] + [f"{t}_{i}" for i in range(len(branches)) for t in ("dA", "dB")]
    for name, g, t, e in zip(names, [y] + list(got), [y_pt] + list(theirs), [y64] + list(exact), strict=True):
        floor = 1e-2 * max(e.abs().max().item(), 1.0)
        assert error(g, e) <= 2 * error(t, e) + floor, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_and_fp32_adapter_weights(dtype):
    x, weight, b, branches = make_problem(300, 256, 192, (8, 4, 2), torch.float32)
    x, branches = with_grad(x, branches)
    with torch.autocast("cuda", dtype=dtype):
        y = msplora_linear(x, weight, b, branches, backend="triton")
    assert y.dtype == dtype
    y.float().square().mean().backward()
    assert all(a.grad.dtype == torch.float32 and b_.grad.dtype == torch.float32 for a, b_, _ in branches)
    torch.testing.assert_close(y.float(), msplora_linear_ref(x, weight, b, branches), rtol=3e-2, atol=3e-2)


def test_offsets_beyond_2_to_the_31_elements():
    """x and y with more than 2^31 elements: rows past the 32-bit limit, masks included, are right."""
    from msplora_kernels import triton_backend

    k = n = 4096
    m = 2**31 // k + 256
    p, seed = 0.1, 99
    x, weight, b, branches = make_problem(m, k, n, (8, 4, 2), torch.bfloat16)
    a_cat = torch.cat([a for a, _, _ in branches])
    b_cat = torch.cat([bb for _, bb, _ in branches], dim=1)
    ranks, scalings = [8, 4, 2], [c for _, _, c in branches]
    y, s = triton_backend.forward(x, weight, b, a_cat, b_cat, ranks, scalings, p, seed)
    dy = torch.randn_like(y)
    dx, _, _ = triton_backend.backward(dy, x, s, weight, a_cat, b_cat, ranks, scalings, p, seed, True)
    tail = slice(m - 256, m)
    masks = triton_backend.dropout_masks(seed, 3, m, k, p, DEVICE)[:, tail]
    assert abs(masks.float().mean().item() - (1 - p)) < 0.01
    x_tail = x[tail].float().requires_grad_()
    y_ref = msplora_linear_ref(x_tail, weight.float(), b.float(), [(a.float(), bb.float(), c) for a, bb, c in branches],
                               p, True, masks=list(masks))
    (dx_ref,) = torch.autograd.grad(y_ref, x_tail, dy[tail].float())
    torch.testing.assert_close(y[tail].float(), y_ref, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(dx[tail].float(), dx_ref, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gradients_are_bit_identical_under_deterministic_algorithms(p, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # torch refuses cuBLAS calls otherwise
    x, weight, b, branches = make_problem(4096, 1024, 2048, (64, 32, 16), torch.bfloat16)
    dy = torch.randn(4096, 2048, device=DEVICE, dtype=torch.bfloat16)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            xg, bg = with_grad(x, branches)
            torch.manual_seed(5)
            y = msplora_linear(xg, weight, b, bg, dropout_p=p, training=True, backend="triton")
            runs.append([y] + list(grads_of(y, leaves_of(xg, bg), dy)))
    finally:
        torch.use_deterministic_algorithms(previous)
    for one, two in zip(*runs):
        assert torch.equal(one, two)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compiled_layer_fullgraph_matches_eager(dropout):
    from torch._inductor import config as inductor_config

    from msplora.layer import LoraBranch, MSPLoraLinear

    torch._dynamo.reset()
    shared = LoraBranch(256, 192, 8, 16.0, init_weights=False)
    layer = MSPLoraLinear(torch.nn.Linear(256, 192), shared, LoraBranch(256, 192, 4, 16.0, init_weights=False),
                          LoraBranch(256, 192, 2, 16.0, init_weights=False), dropout=dropout, backend="triton")
    layer.to(DEVICE)
    shared.to(DEVICE)  # referenced by the layer, not registered in it
    x = torch.randn(4, 33, 256, device=DEVICE, requires_grad=True)

    def run(fn):
        torch.manual_seed(3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x)
        y.float().square().sum().backward()
        grads = [x.grad.clone(), shared.A.grad.clone(), layer.layer_branch.B.grad.clone()]
        x.grad = None
        layer.zero_grad()
        shared.zero_grad()
        return y, grads

    y_eager, grads_eager = run(layer)
    with inductor_config.patch(fallback_random=True):  # the dropout seed drawn as in eager
        y_compiled, grads_compiled = run(torch.compile(layer, fullgraph=True))
    torch.testing.assert_close(y_compiled, y_eager, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
