"""The fused op on its PyTorch backend against the unfused three-branch reference."""
import pytest
import torch

from msplora_kernels import msplora_linear, msplora_linear_ref, torch_backend

RANKS = [(8, 4, 2), (5, 3, 1), (0, 0, 6), (16, 0, 3)]


def make_problem(m, k, n, ranks, dtype=torch.float64, bias=True):
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    weight = torch.randn(n, k, dtype=dtype) / k**0.5
    b = torch.randn(n, dtype=dtype) if bias else None
    branches = [
        (torch.randn(r, k, dtype=dtype, requires_grad=True), torch.randn(n, r, dtype=dtype, requires_grad=True), 16.0 / r)
        for r in ranks
        if r
    ]
    return x, weight, b, branches


def grads(y, x, branches, dy):
    leaves = [x] + [t for a, b, _ in branches for t in (a, b)]
    return torch.autograd.grad(y, leaves, dy)


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_forward_and_every_gradient(ranks, bias):
    x, weight, b, branches = make_problem(37, 72, 50, ranks, bias=bias)
    y = msplora_linear(x, weight, b, branches, backend="torch")
    y_ref = msplora_linear_ref(x, weight, b, branches)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    for got, want in zip(grads(y, x, branches, dy), grads(y_ref, x, branches, dy)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-11)


@pytest.mark.parametrize("ranks", [(8, 4, 2), (0, 3, 5)])
def test_dropout_matches_reference_given_the_same_masks(ranks):
    p = 0.3
    x, weight, b, branches = make_problem(37, 72, 50, ranks)
    torch.manual_seed(11)
    y = msplora_linear(x, weight, b, branches, dropout_p=p, training=True, backend="torch")
    torch.manual_seed(11)
    seed = int(torch.randint(2**31 - 1, (), dtype=torch.int64))
    masks = torch_backend.dropout_masks(seed, len(branches), 37, 72, p, x.device)
    y_ref = msplora_linear_ref(x, weight, b, branches, p, True, masks=masks)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-11)
    dy = torch.randn_like(y)
    for got, want in zip(grads(y, x, branches, dy), grads(y_ref, x, branches, dy)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-11)


def test_dropout_masks_keep_rate_independence_and_reproducibility():
    masks = torch_backend.dropout_masks(1234, 3, 256, 512, 0.25, torch.device("cpu"))
    keep = masks.float().mean(dim=(1, 2))
    assert torch.all((keep - 0.75).abs() < 0.01), keep
    assert not torch.equal(masks[0], masks[1])  # one independent mask per branch
    assert torch.equal(masks, torch_backend.dropout_masks(1234, 3, 256, 512, 0.25, torch.device("cpu")))
    assert not torch.equal(masks, torch_backend.dropout_masks(1235, 3, 256, 512, 0.25, torch.device("cpu")))


def test_dropout_is_reproducible_with_manual_seed_and_identity_in_eval():
    x, weight, b, branches = make_problem(16, 24, 8, (4, 2, 2))
    torch.manual_seed(3)
    y1 = msplora_linear(x, weight, b, branches, dropout_p=0.5, training=True, backend="torch")
    torch.manual_seed(3)
    y2 = msplora_linear(x, weight, b, branches, dropout_p=0.5, training=True, backend="torch")
    y3 = msplora_linear(x, weight, b, branches, dropout_p=0.5, training=True, backend="torch")
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    y_eval = msplora_linear(x, weight, b, branches, dropout_p=0.5, training=False, backend="torch")
    torch.testing.assert_close(y_eval, msplora_linear_ref(x, weight, b, branches))


def test_dropout_gradient_agrees_with_finite_differences():
    """With the masks fixed by the seed, the op is linear-affine in x: gradcheck in fp64."""
    x, weight, b, branches = make_problem(5, 7, 6, (3, 2, 1))
    x = x.detach().requires_grad_(True)

    def f(x, *ab):
        torch.manual_seed(7)
        bs = [(ab[2 * i], ab[2 * i + 1], branches[i][2]) for i in range(len(branches))]
        return msplora_linear(x, weight, b, bs, dropout_p=0.4, training=True, backend="torch")

    inputs = (x,) + tuple(t.detach().requires_grad_(True) for a, bb, _ in branches for t in (a, bb))
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("shape", [(0, 72), (1, 72), (2, 3, 72), (2, 2, 3, 72)])
def test_any_leading_shape(shape):
    x, weight, b, branches = make_problem(1, 72, 50, (8, 4, 2))
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = msplora_linear(x, weight, b, branches, backend="torch")
    assert y.shape == (*shape[:-1], 50)
    torch.testing.assert_close(y, msplora_linear_ref(x, weight, b, branches))
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_non_contiguous_input_and_transposed_weight():
    _, weight, b, branches = make_problem(1, 72, 50, (8, 4, 2))
    x = torch.randn(72, 37, dtype=torch.float64).t()  # non-contiguous
    w_t = weight.t().contiguous().t()  # a transposed view, as for GPT-2's Conv1D
    assert not x.is_contiguous() and not w_t.is_contiguous()
    y = msplora_linear(x, w_t, b, branches, backend="torch")
    torch.testing.assert_close(y, msplora_linear_ref(x, weight, b, branches))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_error_is_within_twice_pytorch_own_error(dtype):
    """flash-attention's rule: our error against fp64 <= 2x that of the reference maths run in ``dtype``."""
    x, weight, b, branches = make_problem(37, 72, 50, (8, 4, 2))
    y64 = msplora_linear_ref(x, weight, b, branches)
    low = lambda t: t.detach().to(dtype)  # noqa: E731
    low_branches = [(low(a), low(bb), c) for a, bb, c in branches]
    y = msplora_linear(low(x), low(weight), low(b), low_branches, backend="torch")
    y_pt = msplora_linear_ref(low(x), low(weight), low(b), low_branches)
    assert y.dtype == dtype
    ours = (y.double() - y64).abs().max().item()
    theirs = (y_pt.double() - y64).abs().max().item()
    assert ours <= 2 * theirs + 1e-5 * y64.abs().max().item()


def test_adapter_weights_in_fp32_with_half_activations_get_fp32_gradients():
    x, weight, b, branches = make_problem(9, 16, 12, (4, 2, 1), dtype=torch.float32)
    y = msplora_linear(x.detach().bfloat16(), weight.bfloat16(), b.bfloat16(), branches, backend="torch")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(a.grad is not None and a.grad.dtype == torch.float32 for a, _, _ in branches)


def test_autocast_runs_in_the_autocast_dtype():
    x, weight, b, branches = make_problem(9, 16, 12, (4, 2, 1), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = msplora_linear(x, weight, b, branches, backend="torch")
        y_ref = torch.nn.functional.linear(x, weight, b)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32


def test_shared_branch_gradient_is_the_sum_over_layers():
    x, w1, b1, branches = make_problem(11, 16, 16, (4,))
    w2 = torch.randn(16, 16, dtype=torch.float64)
    h = msplora_linear(x, w1, b1, branches, backend="torch")
    y = msplora_linear(h, w2, None, branches, backend="torch")  # the same A, B in a second layer
    y.sum().backward()
    a, bb, c = branches[0]
    got = (a.grad.clone(), bb.grad.clone())
    a.grad = bb.grad = None
    h = msplora_linear_ref(x, w1, b1, branches)
    msplora_linear_ref(h, w2, None, branches).sum().backward()
    torch.testing.assert_close(got[0], a.grad)
    torch.testing.assert_close(got[1], bb.grad)


def test_wrong_feature_size_raises_like_nn_linear():
    _, weight, b, branches = make_problem(1, 72, 50, (8, 4, 2))
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        msplora_linear(torch.randn(3, 71, dtype=torch.float64), weight, b, branches, backend="torch")
    with pytest.raises(RuntimeError):
        torch.nn.functional.linear(torch.randn(3, 71, dtype=torch.float64), weight, b)


def test_bad_branch_shape_dtype_and_backend_name():
    x, weight, b, branches = make_problem(3, 72, 50, (8,))
    with pytest.raises(ValueError, match="branch 0"):
        msplora_linear(x, weight, b, [(branches[0][0][:, :10], branches[0][1], 2.0)], backend="torch")
    with pytest.raises(RuntimeError, match="same dtype"):
        msplora_linear(x.float(), weight, b, branches, backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        msplora_linear(x, weight, b, branches, backend="cuda")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from msplora_kernels import resolve_backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        resolve_backend("triton", torch.device("cpu"))


def test_env_var_replaces_auto(monkeypatch):
    from msplora_kernels import resolve_backend

    monkeypatch.setenv("MSPLORA_BACKEND", "reference")
    assert resolve_backend("auto", torch.device("cpu")) == "reference"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    monkeypatch.setenv("MSPLORA_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MSPLORA_BACKEND"):
        resolve_backend("auto", torch.device("cpu"))
    monkeypatch.delenv("MSPLORA_BACKEND")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_saves_only_x_and_the_low_rank_activation():
    """Autograd keeps x (M x K), S (M x R) and the seed; no dropout copy or mask of size M x K."""
    m, k, n = 64, 48, 40
    x, weight, b, branches = make_problem(m, k, n, (8, 4, 2), dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        msplora_linear(x, weight, b, branches, dropout_p=0.1, training=True, backend="torch")
    activations = sorted(tuple(t.shape) for t in saved if t.dim() == 2 and t.shape[0] == m)
    assert activations == [(m, 14), (m, k)], activations
