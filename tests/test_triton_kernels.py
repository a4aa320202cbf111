"""The Triton backend against the fp64 three-branch reference: every output and gradient, dropout, paths, errors.

Runs on CUDA where there is one, else under the Triton interpreter on the CPU (``conftest.py`` sets
``TRITON_INTERPRET=1``), so shapes stay small and odd (37 x 72 -> 50 crosses every tile edge). Low-precision
results are judged by flash-attention's rule: our error against fp64 is at most twice the error of the same
maths run by PyTorch in that dtype, plus a small floor.
"""
import os
import subprocess
import sys

import pytest
import torch

from msplora_kernels import dispatch, msplora_linear, msplora_linear_ref

pytest.importorskip("triton")
if not torch.cuda.is_available() and not dispatch.triton_interpreted():
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from msplora_kernels import triton_backend  # noqa: E402
from msplora_kernels._triton import kernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RANKS = [(8, 4, 2), (5, 3, 1), (0, 0, 6), (16, 0, 3)]
DTYPES = [torch.float32, torch.float16]
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}  # relative to the largest |value|
M, K, N = 37, 72, 50


def make_problem(m, k, n, ranks, dtype=torch.float64, bias=True, seed=0):
    """x (m, k), weight (n, k), bias, and one (A, B, scaling) per non-zero rank, all random (B too)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    x = rand(m, k)
    weight = rand(n, k) / k**0.5
    b = rand(n) if bias else None
    branches = [(rand(r, k) / k**0.5, rand(n, r) / r**0.5, 16.0 / r) for r in ranks if r]
    return x, weight, b, branches


def to(t, dtype):
    return None if t is None else t.detach().to(DEVICE, dtype)


def packed(branches, dtype):
    """The backend's arguments for these branches: A_cat, B_cat, ranks, scalings."""
    a_cat = torch.cat([to(a, dtype) for a, _, _ in branches])
    b_cat = torch.cat([to(b, dtype) for _, b, _ in branches], dim=1)
    return a_cat, b_cat, [a.shape[0] for a, _, _ in branches], [c for _, _, c in branches]


def reference_outputs(x, weight, b, branches, dy, p=0.0, masks=None, dtype=torch.float64):
    """y and (dx, dA_cat, dB_cat) of the reference run by PyTorch in ``dtype`` (on the CPU for fp64). Given the
    backend's masks, the reference scales by 1 / (1 - p_eff), the drop probability those masks realise."""
    if masks is not None:
        p = triton_backend.effective_p(p)
    dev = DEVICE if dtype != torch.float64 else torch.device("cpu")
    cast = lambda t: None if t is None else t.detach().to(dev, dtype).requires_grad_()  # noqa: E731
    xr = cast(x)
    br = [(cast(a), cast(bb), c) for a, bb, c in branches]
    masks = None if masks is None else [m.to(dev) for m in masks]
    y = msplora_linear_ref(xr, cast(weight).detach(), None if b is None else cast(b).detach(), br,
                           p, p > 0, masks=masks)
    grads = torch.autograd.grad(y, [xr] + [t for a, bb, _ in br for t in (a, bb)], dy.to(dev, dtype))
    da = torch.cat([grads[1 + 2 * i] for i in range(len(br))])
    db = torch.cat([grads[2 + 2 * i] for i in range(len(br))], dim=1)
    return y.detach(), (grads[0], da, db)


def assert_error_ratio(got, pytorch_same_dtype, exact, what):
    exact = exact.double().cpu()
    ours = (got.double().cpu() - exact).abs().max().item()
    theirs = (pytorch_same_dtype.double().cpu() - exact).abs().max().item()
    floor = FLOOR[got.dtype] * max(exact.abs().max().item(), 1.0)
    assert ours <= 2 * theirs + floor, f"{what}: error {ours:.3g} vs PyTorch's {theirs:.3g} (+ floor {floor:.3g})"


def assert_every_gradient(grads, grads_pt, grads64, ranks):
    """dx, then each branch's dA_s and dB_s on its own (a small branch's error is not hidden by a big one's)."""
    dx, da, db = grads
    assert_error_ratio(dx, grads_pt[0], grads64[0], "dx")
    ranks = [r for r in ranks if r]
    per_branch = [("dA", da, grads_pt[1], grads64[1], 0), ("dB", db, grads_pt[2], grads64[2], 1)]
    for name, got, theirs, exact, dim in per_branch:
        assert got.dtype == dx.dtype and got.shape == exact.shape, name
        pieces = zip(got.split(ranks, dim), theirs.split(ranks, dim), exact.split(ranks, dim))
        for branch, (g, t, e) in enumerate(pieces):
            assert_error_ratio(g, t, e, f"{name} of branch {branch}")


def run_backend(x, weight, b, branches, dy, dtype, p=0.0, seed=1234, need_dx=True):
    a_cat, b_cat, ranks, scalings = packed(branches, dtype)
    y, s = triton_backend.forward(to(x, dtype), to(weight, dtype), to(b, dtype), a_cat, b_cat, ranks, scalings, p, seed)
    grads = triton_backend.backward(to(dy, dtype), to(x, dtype), s, to(weight, dtype), a_cat, b_cat, ranks,
                                    scalings, p, seed, need_dx)
    return y, s, grads


@pytest.mark.parametrize("path", ["fused", "unfused"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_forward_and_every_gradient_match_the_fp64_reference(ranks, dtype, path, p):
    x, weight, b, branches = make_problem(M, K, N, ranks)
    dy = torch.randn(M, N, dtype=torch.float64)
    seed = 77
    masks = triton_backend.dropout_masks(seed, len(branches), M, K, p, DEVICE) if p else None
    with triton_backend.forced_path(path):
        y, _, grads = run_backend(x, weight, b, branches, dy, dtype, p, seed)
    y64, grads64 = reference_outputs(x, weight, b, branches, dy, p, masks)
    y_pt, grads_pt = reference_outputs(x, weight, b, branches, dy, p, masks, dtype=dtype)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_error_ratio(y, y_pt, y64, "y")
    assert_every_gradient(grads, grads_pt, grads64, ranks)


@pytest.mark.parametrize("ranks", [(40, 3, 0), (1, 1, 1)])
def test_ranks_wider_than_one_rank_tile_and_rank_one(ranks):
    x, weight, b, branches = make_problem(M, K, N, ranks)
    dy = torch.randn(M, N, dtype=torch.float64)
    masks = triton_backend.dropout_masks(5, len(branches), M, K, 0.2, DEVICE)
    y, _, grads = run_backend(x, weight, b, branches, dy, torch.float32, 0.2, seed=5)
    y64, grads64 = reference_outputs(x, weight, b, branches, dy, 0.2, masks)
    y_pt, grads_pt = reference_outputs(x, weight, b, branches, dy, 0.2, masks, dtype=torch.float32)
    assert_error_ratio(y, y_pt, y64, "y")
    assert_every_gradient(grads, grads_pt, grads64, ranks)


def test_saved_s_is_the_scaled_dropped_shrink_and_dx_can_be_skipped():
    x, weight, b, branches = make_problem(M, K, N, (8, 4, 2))
    p, seed = 0.25, 9
    y, s, (dx, da, db) = run_backend(x, weight, b, branches, torch.randn(M, N, dtype=torch.float64),
                                     torch.float32, p, seed, need_dx=False)
    masks = triton_backend.dropout_masks(seed, 3, M, K, p, DEVICE).cpu()
    want = torch.cat([((x * masks[i]) @ a.t()) * (c / (1 - p)) for i, (a, _, c) in enumerate(branches)], 1)
    torch.testing.assert_close(s.cpu().double(), want, rtol=1e-4, atol=1e-4)
    assert dx is None and da.shape == (14, K) and db.shape == (N, 14)


@pytest.mark.parametrize("shape", [(0, K), (1, K), (2, 5, K), (2, 3, 4, K)])
def test_any_leading_shape_through_the_op(shape):
    _, weight, b, branches = make_problem(1, K, N, (8, 4, 2))
    x = torch.randn(*shape, dtype=torch.float64)
    xt = to(x, torch.float32).requires_grad_()
    bt = [(to(a, torch.float32).requires_grad_(), to(bb, torch.float32).requires_grad_(), c) for a, bb, c in branches]
    y = msplora_linear(xt, to(weight, torch.float32), to(b, torch.float32), bt, backend="triton")
    y64 = msplora_linear_ref(x, weight, b, branches)
    assert y.shape == (*shape[:-1], N)
    torch.testing.assert_close(y.double().cpu(), y64, rtol=1e-4, atol=1e-4)
    y.sum().backward()  # a stride-0 (expanded) dy
    assert xt.grad.shape == x.shape and bt[0][0].grad.shape == branches[0][0].shape
    if x.numel() == 0:
        assert bt[0][0].grad.abs().sum() == 0 and bt[0][1].grad.abs().sum() == 0


def test_non_contiguous_input_and_transposed_weight():
    _, weight, b, branches = make_problem(1, K, N, (8, 4, 2))
    x = torch.randn(K, M, dtype=torch.float64).t()  # non-contiguous rows
    w_t = to(weight, torch.float32).t().contiguous().t()  # a transposed view, as for GPT-2's Conv1D
    xt = to(x, torch.float32).t().contiguous().t().requires_grad_()
    assert not xt.is_contiguous() and not w_t.is_contiguous()
    bt = [(to(a, torch.float32).requires_grad_(), to(bb, torch.float32), c) for a, bb, c in branches]
    for path in triton_backend.PATHS:
        with triton_backend.forced_path(path):
            y = msplora_linear(xt, w_t, to(b, torch.float32), bt, backend="triton")
        torch.testing.assert_close(y.double().cpu(), msplora_linear_ref(x, weight, b, branches), rtol=1e-4, atol=1e-4)


def test_shared_branch_gets_the_sum_of_its_gradients_over_layers():
    _, w1, b1, branches = make_problem(1, K, K, (8, 4, 2))
    w2 = torch.randn(K, K, dtype=torch.float64) / K**0.5
    x = torch.randn(M, K, dtype=torch.float64)

    def two_layers(backend, dtype):
        leaves = [(to(a, dtype).requires_grad_(), to(bb, dtype).requires_grad_(), c) for a, bb, c in branches]
        h = msplora_linear(to(x, dtype), to(w1, dtype), to(b1, dtype), leaves, backend=backend)
        y = msplora_linear(h, to(w2, dtype), None, leaves, backend=backend)  # the same A, B in a second layer
        return torch.autograd.grad(y.square().sum(), [t for a, bb, _ in leaves for t in (a, bb)])

    for got, want in zip(two_layers("triton", torch.float32), two_layers("reference", torch.float64)):
        torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=1e-3, atol=1e-3)


def test_linear_alone_matches_f_linear():
    x, weight, b, _ = make_problem(M, K, N, (1,))
    for dtype in DTYPES:
        got = triton_backend.linear(to(x, dtype), to(weight, dtype).t().contiguous().t(), to(b, dtype))
        want64 = torch.nn.functional.linear(x, weight, b)
        assert_error_ratio(got, torch.nn.functional.linear(to(x, dtype), to(weight, dtype), to(b, dtype)), want64, "y")


def test_saves_only_x_and_the_low_rank_activation():
    """Autograd keeps x (M x K), S (M x R) and the seed: no mask or dropped copy of x."""
    x, weight, b, branches = make_problem(64, K, N, (8, 4, 2), dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    leaves = [(to(a, torch.float32).requires_grad_(), to(bb, torch.float32), c) for a, bb, c in branches]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        msplora_linear(to(x, torch.float32), to(weight, torch.float32), to(b, torch.float32), leaves,
                       dropout_p=0.1, training=True, backend="triton")
    activations = sorted(tuple(t.shape) for t in saved if t.dim() == 2 and t.shape[0] == 64)
    assert activations == [(64, 14), (64, K)], activations


def test_gradients_are_bit_identical_run_to_run():
    x, weight, b, branches = make_problem(M, K, N, (8, 4, 2))
    dy = torch.randn(M, N, dtype=torch.float64)
    first = run_backend(x, weight, b, branches, dy, torch.float32, 0.1, seed=3)[2]
    second = run_backend(x, weight, b, branches, dy, torch.float32, 0.1, seed=3)[2]
    for one, two in zip(first, second):
        assert torch.equal(one, two)


# ---- dropout ----------------------------------------------------------------------------------------------


@triton.jit
def _keep_mask_at_kernel(keep_ptr, first_row, K, seed, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = first_row + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    keep = kernels._element_bits(kernels._drawn_mask(seed, threshold, rows, 0, K, BLOCK_K // 2, 1)) & 1
    tl.store(keep_ptr + tl.arange(0, BLOCK_M)[:, None] * BLOCK_K + cols[None, :], keep.to(tl.int8))


def test_masks_beyond_2_to_the_31_elements_use_the_whole_64_bit_offset():
    """Rows whose Philox counters (m*K + k) / 2 pass 2^31 and 2^32 get fresh draws, not those of the counter
    mod 2^32."""
    k = 64
    def keep_at(first_row):
        out = torch.empty((32, k), dtype=torch.int8, device=DEVICE)
        _keep_mask_at_kernel[(1,)](out, first_row, k, 42, triton_backend._threshold(0.5), BLOCK_M=32, BLOCK_K=k)
        return out.bool()
    pairs_per_row = k // 2
    low, past_2_31, past_2_32 = keep_at(0), keep_at(2**31 // pairs_per_row), keep_at(2**32 // pairs_per_row)
    assert not torch.equal(low, past_2_32)  # offset 2^32 + j is not offset j
    for keep in (low, past_2_31, past_2_32):
        assert abs(keep.float().mean().item() - 0.5) < 0.1


def test_inverted_dropout_in_training_and_identity_in_eval():
    x, weight, b, branches = make_problem(M, K, N, (8, 4, 2), dtype=torch.float32)
    args = (to(x, torch.float32), to(weight, torch.float32), to(b, torch.float32),
            [(to(a, torch.float32), to(bb, torch.float32), c) for a, bb, c in branches])
    y_eval = msplora_linear(*args, dropout_p=0.5, training=False, backend="triton")
    torch.testing.assert_close(y_eval, msplora_linear(*args, backend="triton"))
    # Inverted scaling: averaged over many masks, the low-rank term with dropout is the one without.
    x1 = args[0][:1].expand(1024, K)
    lowrank = lambda y: y - torch.nn.functional.linear(x1, args[1], args[2])  # noqa: E731
    mean_train = lowrank(msplora_linear(x1, *args[1:], dropout_p=0.5, training=True, backend="triton")).mean(0)
    no_drop = lowrank(msplora_linear(x1[:1], *args[1:], backend="triton"))[0]
    assert (mean_train - no_drop).abs().max() < 0.2 * no_drop.abs().max()  # unscaled: off by 0.5x


def test_same_torch_seed_gives_the_same_masks_and_the_reference_agrees():
    x, weight, b, branches = make_problem(M, K, N, (8, 4, 2), dtype=torch.float32)
    leaves = [(to(a, torch.float32).requires_grad_(), to(bb, torch.float32).requires_grad_(), c)
              for a, bb, c in branches]
    xt = to(x, torch.float32).requires_grad_()

    def run():
        return msplora_linear(xt, to(weight, torch.float32), to(b, torch.float32), leaves, 0.3, True, "triton")

    torch.manual_seed(11)
    seed = int(torch.randint(2**31 - 1, (), dtype=torch.int64))  # what msplora_linear draws
    torch.manual_seed(11)
    y1 = run()
    torch.manual_seed(11)
    y2 = run()
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, run())
    masks = triton_backend.dropout_masks(seed, 3, M, K, 0.3, DEVICE)
    dy = torch.randn(M, N, dtype=torch.float64)
    y64, grads64 = reference_outputs(x.double(), weight.double(), b.double(),
                                     [(a.double(), bb.double(), c) for a, bb, c in branches], dy, 0.3, masks)
    torch.testing.assert_close(y1.double().cpu(), y64, rtol=1e-4, atol=1e-4)
    got = torch.autograd.grad(y1, [xt] + [t for a, bb, _ in leaves for t in (a, bb)], to(dy, torch.float32))
    torch.testing.assert_close(got[0].double().cpu(), grads64[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat([got[1], got[3], got[5]]).double().cpu(), grads64[1], rtol=1e-4, atol=1e-4)


def test_dropout_gradients_agree_with_finite_differences_in_fp64():
    """Backward is the derivative of forward under one seed: central differences along random directions."""
    m, k, n = 9, 20, 11
    x, weight, b, branches = make_problem(m, k, n, (4, 2, 3))
    a_cat, b_cat, ranks, scalings = packed(branches, torch.float64)
    x, weight, b = to(x, torch.float64), to(weight, torch.float64), to(b, torch.float64)
    p, seed = 0.4, 2024
    dy = torch.randn(m, n, dtype=torch.float64, device=DEVICE)

    def loss(x_, a_, b_):
        return (triton_backend.forward(x_, weight, b, a_, b_, ranks, scalings, p, seed)[0] * dy).sum()

    _, s = triton_backend.forward(x, weight, b, a_cat, b_cat, ranks, scalings, p, seed)
    dx, da, db = triton_backend.backward(dy, x, s, weight, a_cat, b_cat, ranks, scalings, p, seed, True)
    eps = 1e-6
    for _ in range(3):
        vx, va, vb = torch.randn_like(x), torch.randn_like(a_cat), torch.randn_like(b_cat)
        numeric = (loss(x + eps * vx, a_cat + eps * va, b_cat + eps * vb)
                   - loss(x - eps * vx, a_cat - eps * va, b_cat - eps * vb)) / (2 * eps)
        analytic = (dx * vx).sum() + (da * va).sum() + (db * vb).sum()
        torch.testing.assert_close(numeric, analytic, rtol=1e-6, atol=1e-6)


# ---- dispatch and bad inputs ------------------------------------------------------------------------------


def test_forced_paths_nest_and_unknown_paths_are_refused():
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    with triton_backend.forced_path("unfused"):
        assert not triton_backend.uses_fused_path(8192, 4096, 4096, cuda, bf16)
        with triton_backend.forced_path("fused"):
            assert triton_backend.uses_fused_path(1, 4096, 4096, cuda, torch.float32)
        assert not triton_backend.uses_fused_path(8192, 4096, 4096, cuda, bf16)
    with pytest.raises(ValueError, match="path must be one of"):
        with triton_backend.forced_path("cublas"):
            pass


def test_environment_variable_selects_the_triton_kernels(monkeypatch):
    calls = []
    forward = triton_backend.forward
    monkeypatch.setattr(triton_backend, "forward", lambda *args: calls.append(1) or forward(*args))
    monkeypatch.setenv("MSPLORA_BACKEND", "triton")
    x, weight, b, branches = make_problem(M, K, N, (8, 4, 2), dtype=torch.float32)
    y = msplora_linear(to(x, torch.float32), to(weight, torch.float32), to(b, torch.float32),
                       [(to(a, torch.float32), to(bb, torch.float32), c) for a, bb, c in branches])
    assert calls == [1]
    torch.testing.assert_close(y.cpu(), msplora_linear_ref(x, weight, b, branches), rtol=1e-4, atol=1e-4)


def test_cpu_tensors_outside_the_interpreter_are_refused_clearly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_backend.linear(torch.randn(3, 4), torch.randn(5, 4))


def test_mixed_devices_and_dtypes_are_refused_clearly():
    x = torch.randn(3, 4, device=DEVICE)
    with pytest.raises(RuntimeError, match="x is on .* but weight is on meta"):
        triton_backend.linear(x, torch.randn(5, 4, device="meta"))
    with pytest.raises(RuntimeError, match="x is torch.float32 but weight is torch.float16"):
        triton_backend.linear(x, torch.randn(5, 4, device=DEVICE, dtype=torch.float16))
    a, bb = torch.randn(2, 4, device=DEVICE), torch.randn(5, 2, device="meta")
    with pytest.raises(RuntimeError, match="b_cat is on meta"):
        triton_backend.forward(x, torch.randn(5, 4, device=DEVICE), None, a, bb, [2], [1.0], 0.0, 0)
    with pytest.raises(TypeError, match="not supported"):
        triton_backend.linear(x.int(), torch.randn(5, 4, device=DEVICE).int())
    five = torch.randn(5, 4, device=DEVICE)
    with pytest.raises(ValueError, match="expected 1 to 4 branches"):
        triton_backend.forward(x, five, None, five, torch.randn(5, 5, device=DEVICE), [1] * 5, [1.0] * 5, 0.1, 0)
    with pytest.raises(ValueError, match="rank >= 1"):
        triton_backend.forward(x, five, None, five, torch.randn(5, 5, device=DEVICE), [5, 0], [1.0] * 2, 0.1, 0)


# ---- a whole model ----------------------------------------------------------------------------------------


def test_tiny_llama_loss_and_gradients_match_the_torch_backend():
    from msplora import MSPLoraConfig, apply_msplora
    from tests import models

    def loss_and_grads(backend):
        torch.manual_seed(0)
        model = models.llama(num_layers=2).to(DEVICE)
        config = MSPLoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], ranks=(8, 4, 2),
                               num_mid_groups=2, init_weights=False, backend=backend)
        model = apply_msplora(model, config)
        ids = models.inputs().to(DEVICE)
        loss = model(input_ids=ids, labels=ids).loss
        names = [n for n, t in model.named_parameters() if t.requires_grad]
        grads = torch.autograd.grad(loss, [t for n, t in model.named_parameters() if t.requires_grad])
        return loss, dict(zip(names, grads))

    loss_t, grads_t = loss_and_grads("torch")
    loss_k, grads_k = loss_and_grads("triton")
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=1e-5)
    assert grads_k.keys() == grads_t.keys() and any("msplora_bank" in n for n in grads_k)
    for name in grads_t:
        torch.testing.assert_close(grads_k[name], grads_t[name], rtol=1e-4, atol=1e-5, msg=name)


# ---- the GPU code path, compiled without a GPU ------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile and run the kernels")
def test_every_launch_compiles_for_hopper_without_spills():
    """The interpreter does not compile; this compiles each bf16 kernel variant the backend's launch code makes
    for sm_90 (M = 8192 with its split reductions, and 37 x 72 -> 50; rank tiles of 16 and 64; both paths, with
    and without dropout, saved mask found and redrawn), specialised as Triton's launcher does, and fails on
    any register spill or shared memory above the chip's (compile_check exits 1). About 60 variants: a
    minute or two on a cold Triton cache."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.getcwd(), TRITON_DEFAULT_FP_FUSION="1")
    command = [sys.executable, "-m", "msplora_kernels._triton.compile_check", "--arch", "90", "--dtypes", "bf16",
               "--ranks", "8,4,2;64,32,16", "--shapes", "8192,4096,4096;37,72,50", "--rng-cost"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "compiled" in result.stdout and "STACK=  0" in result.stdout
    # The roofline's RNG costs are these counts (to 15%: they move a little between Triton versions).
    from benchmarks import roofline

    costs = {line.split()[1]: float(line.split("(")[1].split()[0])
             for line in result.stdout.splitlines() if line.startswith("dropout ")}
    assert costs["draw"] == pytest.approx(roofline.RNG_DRAW_PER_ELEMENT, rel=0.15)
    assert costs["read"] == pytest.approx(roofline.RNG_READ_PER_ELEMENT, rel=0.15)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("ranks", [(8, 4, 2), (16, 0, 3), (40, 3, 0)])
def test_per_branch_gradients_are_contiguous_in_the_adapters_dtype(ranks, p):
    """``branch_grads`` (the eager path's request): each branch's dA_s and dB_s written as its own contiguous
    tensor in the adapters' dtype (fp32 adapters, fp16 activations), so autograd neither copies nor casts;
    values by the error-ratio rule (judged in fp16, the activations' dtype). (8,4,2): one sweep over dy,
    (16,0,3) and (40,3,0): two sweeps, the latter over two rank tiles; 37 rows: summed partials."""
    x, weight, b, branches = make_problem(M, K, N, ranks)
    dy = torch.randn(M, N, dtype=torch.float64)
    dtype, seed = torch.float16, 21
    a_cat, b_cat, rank_list, scalings = packed(branches, dtype)
    _, s = triton_backend.forward(to(x, dtype), to(weight, dtype), to(b, dtype), a_cat, b_cat, rank_list,
                                  scalings, p, seed)
    dx, da, db = triton_backend.backward(to(dy, dtype), to(x, dtype), s, to(weight, dtype), a_cat, b_cat,
                                         rank_list, scalings, p, seed, True, branch_grads=(torch.float32,) * 2)
    assert [t.shape for t in da] == [a.shape for a, _, _ in branches]
    assert [t.shape for t in db] == [bb.shape for _, bb, _ in branches]
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in da + db)
    masks = triton_backend.dropout_masks(seed, len(branches), M, K, p, DEVICE) if p else None
    _, grads64 = reference_outputs(x, weight, b, branches, dy, p, masks)
    _, grads_pt = reference_outputs(x, weight, b, branches, dy, p, masks, dtype=dtype)
    grads = (dx, torch.cat(da).to(dtype), torch.cat(db, dim=1).to(dtype))
    assert_every_gradient(grads, grads_pt, grads64, ranks)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ranks", RANKS + [(64, 32, 16)])
def test_whole_layer_call_matches_the_reference(ranks, dtype, p):
    """``msplora_linear`` end to end on the Triton backend (the eager Function: adapters packed in one launch
    from fp32 parameters, per-branch gradients in fp32), forward and every gradient, by the error-ratio rule
    in the activations' dtype. 64/32/16 (R = 112) loops over seven 16-wide rank steps unmasked and
    64 + 32 + 16 columns masked; it takes the two-sweep dS/dB under the interpreter, 8/4/2 one sweep."""
    x, weight, b, branches = make_problem(M, K, N, ranks)
    dy = torch.randn(M, N, dtype=torch.float64)
    xt = to(x, dtype).requires_grad_()
    params = [(to(a, torch.float32).requires_grad_(), to(bb, torch.float32).requires_grad_(), c)
              for a, bb, c in branches]
    torch.manual_seed(5)
    seed = int(torch.randint(2**31 - 1, (), dtype=torch.int64))  # the seed msplora_linear draws
    torch.manual_seed(5)
    y = msplora_linear(xt, to(weight, dtype), to(b, dtype), params, p, True, "triton")
    y.backward(to(dy, dtype))
    masks = triton_backend.dropout_masks(seed, len(branches), M, K, p, DEVICE) if p else None
    # The reference sees the adapters rounded to the activations' dtype, as the kernels do.
    rounded = [(a.to(dtype).double(), bb.to(dtype).double(), c) for a, bb, c in branches]
    y64, grads64 = reference_outputs(x, weight, b, rounded, dy, p, masks)
    y_pt, grads_pt = reference_outputs(x, weight, b, rounded, dy, p, masks, dtype=dtype)
    assert y.dtype == dtype and all(t.grad.dtype == torch.float32 and t.grad.is_contiguous()
                                    for a, bb, _ in params for t in (a, bb))
    assert_error_ratio(y, y_pt, y64, "y")
    grads = (xt.grad, torch.cat([a.grad for a, _, _ in params]).to(dtype),
             torch.cat([bb.grad for _, bb, _ in params], dim=1).to(dtype))
    assert_every_gradient(grads, grads_pt, grads64, ranks)
