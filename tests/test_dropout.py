"""Adapter dropout on the PyTorch backend: the masks' statistics, and the complement-sparse maths against the
unfused reference given the same masks.

Statistical bounds: a count of n independent Bernoulli(q) events has sd = sqrt(n q (1 - q)); every check allows
6 sd (plus 1 for the discreteness of small counts). A correct sampler fails one such check with probability
about 2e-9, so the ~40 checks here flake less than once in 10^7 runs, while a sampler off by 1% of p at
n p = 10^5 (sd 316) is outside 6 sd. Seeds are fixed, so a run is reproducible anyway.

Every test runs twice: with the compiled CPU helper (``msplora_kernels._cpu``) and with the PyTorch sparse
products it replaces where no C compiler is found.
"""
import math
import os
import shutil

import pytest
import torch

from msplora import LoraBranch, MSPLoraLinear
from msplora_kernels import _cpu, msplora_linear, msplora_linear_ref, torch_backend

RANKS = [(8, 4, 2), (5, 3, 1), (0, 0, 6), (16, 0, 3)]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, params=["helper", "sparse"])
def cpu_path(request, monkeypatch):
    """The compiled helper (a failed build is an error) or the sparse products."""
    if request.param == "helper" and shutil.which(os.environ.get("CC") or "cc") is None:
        pytest.skip("no C compiler here: the helper path cannot be built")
    monkeypatch.setenv(_cpu.ENV_VAR, "1" if request.param == "helper" else "0")
    return request.param


def within(count: float, n: int, q: float, sds: float = 6.0) -> bool:
    return abs(count - n * q) <= sds * math.sqrt(n * q * (1 - q)) + 1


def make_problem(m, k, n, ranks, dtype=torch.float64):
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    weight = torch.randn(n, k, dtype=dtype) / k**0.5
    bias = torch.randn(n, dtype=dtype)
    branches = [
        (torch.randn(r, k, dtype=dtype, requires_grad=True), torch.randn(n, r, dtype=dtype, requires_grad=True), 16.0 / r)
        for r in ranks
        if r
    ]
    return x, weight, bias, branches


def leaves(x, branches):
    return [x] + [t for a, b, _ in branches for t in (a, b)]


def seed_for(global_seed):
    """The dropout seed ``msplora_linear`` draws after ``torch.manual_seed(global_seed)``."""
    torch.manual_seed(global_seed)
    return int(torch.randint(2**31 - 1, (), dtype=torch.int64))


@pytest.mark.parametrize("p", [1e-4, 0.05, 0.3, 0.9])
def test_keep_rate_of_every_branch_is_one_minus_p(p):
    m, k = (512, 1024) if p < 0.01 else (256, 512)  # n p >= 50 dropped elements even at p = 1e-4
    masks = torch_backend.dropout_masks(1234, 3, m, k, p, CPU)
    assert masks.shape == (3, m, k) and masks.dtype == torch.bool
    for branch in masks:
        assert within((~branch).sum().item(), m * k, p), ((~branch).float().mean().item(), p)


def test_masks_are_independent_between_branches_and_between_neighbours():
    p, m, k = 0.3, 256, 512
    dropped = ~torch_backend.dropout_masks(99, 3, m, k, p, CPU)
    n = m * k
    for a, b in [(0, 1), (0, 2), (1, 2)]:  # the same element in two branches
        assert within((dropped[a] & dropped[b]).sum().item(), n, p * p)
    # neighbours in a row and in a column of one branch (geometric gaps must not correlate them)
    assert within((dropped[0, :, 1:] & dropped[0, :, :-1]).sum().item(), m * (k - 1), p * p)
    assert within((dropped[1, 1:, :] & dropped[1, :-1, :]).sum().item(), (m - 1) * k, p * p)
    # no drift along the index space: both halves of the rows drop at rate p
    half = m // 2
    assert within(dropped[2, :half].sum().item(), half * k, p)
    assert within(dropped[2, half:].sum().item(), (m - half) * k, p)


def test_dropped_positions_are_sorted_distinct_and_in_range():
    total = 3 * 37 * 72
    positions = torch_backend.dropped_positions(5, total, 0.3, CPU)
    assert positions.dtype == torch.int32  # the compact form below 2^31 elements
    assert torch.equal(torch_backend.dropped_positions(5, total, 0.3, CPU, torch.int64), positions.long())
    assert positions.min() >= 0 and positions.max() < total
    assert torch.all(positions[1:] > positions[:-1])
    assert torch.equal(positions, torch_backend.dropped_positions(5, total, 0.3, CPU))
    assert not torch.equal(positions, torch_backend.dropped_positions(6, total, 0.3, CPU))


def test_the_stream_is_splitmix64_read_at_each_counter_on_the_midpoint_grid():
    """mix64 and G are SplitMix64's (its published first outputs from state 0); u_c = (mix64(key + (c + 1) G)
    >> 12 + 1/2) 2^-52, checked against Python's exact integers; any range of counters gives the same values
    (counter-based: the helper splits it over threads)."""
    splitmix64_from_0 = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert [torch_backend._mix64((c * torch_backend._MIX_G) % 2**64) for c in (1, 2, 3)] == splitmix64_from_0
    key = torch_backend._stream_key(2024)
    mask = (1 << 64) - 1
    want = [((torch_backend._mix64((key + (c + 1) * torch_backend._MIX_G) & mask) >> 12) + 0.5) * 2.0**-52
            for c in range(1000)]
    got = torch_backend._uniforms(key, 0, 1000, CPU)
    assert got.tolist() == want
    assert torch.equal(torch_backend._uniforms(key, 400, 37, CPU), got[400:437])
    assert 0.0 < got.min() and got.max() < 1.0


def test_the_log_is_within_its_error_bound():
    """_log_unit against libm's log (within 1 ulp), at 10^6 draws, at the ends of u's grid and around the split
    points sqrt(1/2) 2^-e. Error model, relative, in units of 2^-53 (one rounding: at most 1): s = f / (f + 2)
    costs 2 (f is exact), the series about 3 (three additions near 1; its products touch only terms below 0.01 of
    it; the truncation is below 2^-60), the product (s + s) poly 1: |log m| within about 6. e ln 2 costs 1.3
    (ln 2's own rounding and the product's) on a term at most twice |log u| (|log m| <= 0.35 <= |log u| when
    e != 0, so no cancellation), the final sum 1: about 10 in all (the largest seen, 6.5, is at e = 0);
    allowed 16, plus 1 ulp for libm."""
    u = torch_backend._uniforms(torch_backend._stream_key(7), 0, 10**6, CPU)
    edges = [2.0**-53, 1.5 * 2.0**-53, 1.0 - 2.0**-53, 0.5, 0.5 - 2.0**-54, 0.25]
    for e in range(0, 53):
        root = math.sqrt(0.5) * 2.0**-e
        edges += [math.nextafter(root, 0.0), root, math.nextafter(root, 1.0)]
    u = torch.cat([u, torch.tensor(edges, dtype=torch.float64)])
    got = torch_backend._log_unit(u)
    want = torch.tensor([math.log(v) for v in u.tolist()], dtype=torch.float64)
    assert torch.all((got - want).abs() <= 18 * 2.0**-53 * want.abs()), (got - want).abs().div(want.abs()).max()


def test_a_draw_that_falls_short_continues_the_stream(monkeypatch):
    """The first draw covers mean + 6 sd; with a negative margin it almost never does, and the loop goes on."""
    monkeypatch.setattr(torch_backend, "_DRAW_MARGIN_SD", -4.0)
    total, p = 200_000, 0.05
    positions = torch_backend.dropped_positions(8, total, p, CPU)
    assert torch.all(positions[1:] > positions[:-1]) and positions.max() < total
    assert within(positions.numel(), total, p)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
@pytest.mark.parametrize("ranks", RANKS)
def test_forward_and_every_gradient_match_the_reference_with_the_same_masks(ranks, p):
    """The masks the backward redraws are the forward's: every gradient equals the reference's given them."""
    m, k, n = 37, 72, 50
    x, weight, bias, branches = make_problem(m, k, n, ranks)
    torch.manual_seed(11)
    y = msplora_linear(x, weight, bias, branches, dropout_p=p, training=True, backend="torch")
    masks = torch_backend.dropout_masks(seed_for(11), len(branches), m, k, p, CPU)
    y_ref = msplora_linear_ref(x, weight, bias, branches, p, True, masks=masks)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-11)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves(x, branches), dy)
    want = torch.autograd.grad(y_ref, leaves(x, branches), dy)
    for name, g, w in zip(["x"] + [f"{t}{i}" for i in range(len(branches)) for t in "AB"], got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-11, msg=name)


@pytest.mark.parametrize("ranks", RANKS)
def test_gradcheck_in_fp64_with_the_seed_fixed(ranks, one_thread):
    """With the masks fixed by the seed the op is affine in x and in each B, bilinear in (A, B): finite
    differences of x, every A and every B agree with the analytic gradients."""
    _, weight, bias, branches = make_problem(5, 7, 4, ranks)
    scalings = [c for _, _, c in branches]

    def f(x, *ab):
        torch.manual_seed(7)
        terms = [(ab[2 * i], ab[2 * i + 1], scalings[i]) for i in range(len(scalings))]
        return msplora_linear(x, weight, bias, terms, dropout_p=0.3, training=True, backend="torch")

    inputs = [torch.randn(5, 7, dtype=torch.float64, requires_grad=True)]
    inputs += [t.detach().requires_grad_(True) for a, b, _ in branches for t in (a, b)]
    assert torch.autograd.gradcheck(f, tuple(inputs))


def test_zero_rows_in_training():
    x, weight, bias, branches = make_problem(0, 72, 50, (8, 4, 2))
    y = msplora_linear(x, weight, bias, branches, dropout_p=0.05, training=True, backend="torch")
    assert y.shape == (0, 50)
    y.sum().backward()
    assert x.grad.shape == (0, 72)
    assert all(torch.count_nonzero(t.grad) == 0 for a, b, _ in branches for t in (a, b))


def test_leading_dimensions_and_non_contiguous_input():
    _, weight, bias, branches = make_problem(1, 72, 50, (5, 3, 1))
    x = torch.randn(2, 72, 19, dtype=torch.float64).transpose(1, 2).requires_grad_(True)  # (2, 19, 72), strided
    torch.manual_seed(4)
    y = msplora_linear(x, weight, bias, branches, dropout_p=0.3, training=True, backend="torch")
    masks = torch_backend.dropout_masks(seed_for(4), 3, 38, 72, 0.3, CPU)
    y_ref = msplora_linear_ref(x.reshape(38, 72), weight, bias, branches, 0.3, True, masks=masks)
    torch.testing.assert_close(y.reshape(38, 50), y_ref, rtol=1e-12, atol=1e-11)
    dy = torch.randn_like(y_ref)
    got = torch.autograd.grad(y.reshape(38, 50), leaves(x, branches), dy)
    want = torch.autograd.grad(y_ref, leaves(x, branches), dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-11)


def test_the_estimator_is_unbiased(one_thread):
    """The mean output over many independent draws is the no-dropout output: 4000 copies of the same 4 rows in
    one call (every element of every copy has its own masks), each of the 4 x 8 means within 6 standard errors.
    This catches a wrong scaling (1/(1-p) missing, or applied to the kept and the dropped alike); that the rate
    is exactly p is the keep-rate test's job."""
    copies = 4000
    x, weight, bias, branches = make_problem(4, 16, 8, (4, 2, 1))
    branches = [(a.detach(), b.detach(), c) for a, b, c in branches]
    expected = msplora_linear_ref(x.detach(), weight, bias, branches)
    x_copies = x.detach().repeat(copies, 1)
    samples = msplora_linear(x_copies, weight, bias, branches, dropout_p=0.3, training=True, backend="torch")
    samples = samples.view(copies, 4, 8)
    error = (samples.mean(0) - expected).abs()
    standard_error = samples.std(0) / math.sqrt(copies)
    assert torch.all(error <= 6 * standard_error), (error / standard_error).max()


def test_seeds_reproduce_and_eval_is_the_identity():
    x, weight, bias, branches = make_problem(16, 24, 8, (4, 2, 2))
    run = lambda training: msplora_linear(  # noqa: E731
        x, weight, bias, branches, dropout_p=0.5, training=training, backend="torch"
    )
    torch.manual_seed(3)
    y1 = run(True)
    torch.manual_seed(3)
    y2, y3 = run(True), run(True)
    assert torch.equal(y1, y2) and not torch.equal(y2, y3)
    torch.testing.assert_close(run(False), msplora_linear_ref(x, weight, bias, branches), rtol=1e-13, atol=1e-12)


def test_layer_in_eval_mode_is_deterministic_and_without_dropout():
    base = torch.nn.Linear(24, 20)
    layer = MSPLoraLinear(base, LoraBranch(24, 20, 4, 16.0, init_weights=False),
                          LoraBranch(24, 20, 2, 16.0, init_weights=False),
                          LoraBranch(24, 20, 1, 16.0, init_weights=False), dropout=0.3, backend="torch")
    x = torch.randn(7, 24)
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    terms = [(b.A, b.B, b.scaling) for b in layer.branches()]
    torch.testing.assert_close(layer(x), msplora_linear_ref(x, base.weight, base.bias, terms))


def test_autograd_keeps_no_mask_and_no_dropped_copy_of_x():
    """Saved: x, S, the weights and the dropped positions (int32, one per dropped element: 0.6 byte per element
    of x for three branches at p = 0.05, where a byte mask would be 3 and PEFT's dropped copy 4)."""
    m, k, p = 64, 48, 0.3
    x, weight, bias, branches = make_problem(m, k, 40, (8, 4, 2), dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        msplora_linear(x, weight, bias, branches, dropout_p=p, training=True, backend="torch")
    two_d = sorted(tuple(t.shape) for t in saved if t.dim() == 2)
    assert two_d == sorted([(m, k), (m, 14), (40, k), (14, k), (40, 14)]), two_d  # x, S and the weights
    one_d = [t for t in saved if t.dim() == 1]
    assert len(one_d) == 1 and one_d[0].dtype == torch.int32
    assert within(one_d[0].numel(), 3 * m * k, p)


def test_backward_redraws_the_forwards_masks_from_the_seed():
    """The contract's path (used under torch.compile and by other backends): without the kept positions the
    backward draws them again from the seed, and gets the same gradients."""
    x, weight, bias, branches = make_problem(37, 72, 50, (5, 3, 1))
    a_cat = torch.cat([a for a, _, _ in branches]).detach()
    b_cat = torch.cat([b for _, b, _ in branches], 1).detach()
    args = (weight, a_cat, b_cat, [5, 3, 1], [c for _, _, c in branches], 0.05, 1234)
    kept = []
    y, s = torch_backend.forward(x.detach(), weight, bias, a_cat, b_cat, *args[3:], keep_positions=kept)
    y_redrawn, _ = torch_backend.forward(x.detach(), weight, bias, a_cat, b_cat, *args[3:])
    assert torch.equal(y, y_redrawn) and len(kept) == 1
    dy = torch.randn_like(y)
    with_kept = torch_backend.backward(dy, x.detach(), s, *args, True, positions=kept[0])
    redrawn = torch_backend.backward(dy, x.detach(), s, *args, True)
    for a, b in zip(with_kept, redrawn):
        assert torch.equal(a, b)


# --------------------------------------------------------------- the low-rank term alone (called base layers)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("ranks", [(8, 4, 2), (0, 0, 6)])
def test_lowrank_alone_is_the_fused_layer_minus_its_base(p, ranks):
    """``msplora_lowrank`` (the term layers with a called base layer add) draws the same masks from the same
    torch seed as ``msplora_linear``, so with one seed: fused = x W^T + lowrank, and so are all gradients."""
    from msplora_kernels import msplora_lowrank

    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 72, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(50, 72, dtype=torch.float64, generator=g)
    branches = [(torch.randn(r, 72, dtype=torch.float64, generator=g, requires_grad=True),
                 torch.randn(50, r, dtype=torch.float64, generator=g, requires_grad=True), 16.0 / r)
                for r in ranks if r]
    dy = torch.randn(37, 50, dtype=torch.float64, generator=g)
    params = [x] + [t for a, b, _ in branches for t in (a, b)]

    torch.manual_seed(11)
    fused = msplora_linear(x, weight, None, branches, dropout_p=p, training=True, backend="torch")
    grads_fused = torch.autograd.grad(fused, params, dy)
    torch.manual_seed(11)
    low = msplora_lowrank(x, branches, dropout_p=p, training=True)
    grads_low = torch.autograd.grad(low, params, dy)

    torch.testing.assert_close(fused, x.detach() @ weight.t() + low.detach(), rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(grads_fused[0], grads_low[0] + dy @ weight, rtol=1e-12, atol=1e-11)
    for got, want in zip(grads_low[1:], grads_fused[1:]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-11)


def test_lowrank_alone_keeps_no_dropped_copy_of_x():
    from msplora_kernels import msplora_lowrank

    x = torch.randn(512, 256, requires_grad=True)
    branches = [(torch.randn(r, 256, requires_grad=True), torch.randn(128, r, requires_grad=True), 2.0)
                for r in (8, 4, 2)]
    sizes = []

    def pack(t):
        sizes.append(t.untyped_storage().nbytes() if t.data_ptr() != x.data_ptr() else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        msplora_lowrank(x, branches, dropout_p=0.05, training=True)
    assert sum(sizes) < x.numel() * x.element_size()  # S and the dropped positions only: < one copy of x


@pytest.mark.parametrize("d", [1, 2, 3, 7, 1536, 3 * 11008, 2**31 - 1])
def test_floor_division_by_fp64_is_exact_for_int32(d):
    """The index arithmetic's fp64 floor division equals integer division at every residue edge, up to the
    largest int32 (multiples of d, one below and one above, and the ends of the range)."""
    from msplora_kernels.torch_backend import _floor_div

    top = 2**31 - 1
    q = torch.cat([torch.arange(0, 2000), torch.arange(top // d - 2000, top // d + 1)]).clamp(min=0).unique()
    edges = torch.cat([q * d - 1, q * d, q * d + 1, q * d + d - 1, torch.tensor([0, top])])
    edges = edges[(edges >= 0) & (edges <= top)].to(torch.int32)
    (got,) = _floor_div(edges, (d,))
    assert got.dtype == torch.int32
    assert torch.equal(got, torch.div(edges.long(), d, rounding_mode="floor").int())


def test_sparse_dropout_warns_nothing_on_any_call():
    """PyTorch's once-per-process "CSR support is in beta" warning is silenced on the first sparse product and
    later calls skip ``warnings.catch_warnings``: under ``-W error`` no call may warn (fresh process)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from msplora_kernels import msplora_linear\n"
        "x = torch.randn(33, 40, requires_grad=True)\n"
        "br = [(torch.randn(r, 40, requires_grad=True), torch.randn(20, r, requires_grad=True), 2.0) for r in (4, 2)]\n"
        "for _ in range(3):\n"
        "    msplora_linear(x, torch.randn(20, 40), None, br, 0.2, True, 'torch').sum().backward()\n"
    )
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("p", [1.0, 1.5, -0.1, float("nan")])
def test_a_dropout_outside_0_to_1_is_refused_by_name(p):
    from msplora_kernels import msplora_lowrank

    x = torch.randn(5, 8)
    branches = [(torch.randn(2, 8), torch.randn(4, 2), 1.0)]
    with pytest.raises(ValueError, match=r"msplora_linear: dropout_p must be in \[0, 1\)"):
        msplora_linear(x, torch.randn(4, 8), None, branches, dropout_p=p, training=True, backend="torch")
    with pytest.raises(ValueError, match=r"msplora_lowrank: dropout_p must be in \[0, 1\)"):
        msplora_lowrank(x, branches, dropout_p=p, training=True)


def test_a_vanishing_p_drops_nothing_rather_than_the_last_element():
    """Every gap is clamped at total + 1 (for p < 1e-15 they could exceed 2^53); the clamp lands past the end,
    so the last element is not dropped by every seed."""
    for seed in range(5):
        assert torch_backend.dropped_positions(seed, 10**6, 1e-16, CPU).numel() == 0
