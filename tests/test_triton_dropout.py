"""Dropout in the Triton backend: the masks' distribution, one RNG pass per step, and the packed mask that
backward reads.

Runs on CUDA where there is one, else under the Triton interpreter (``conftest.py``). The distribution tests
count drops over a few hundred thousand draws and allow 5 standard deviations (a false failure about once
in 3.5 million runs per check); they test against p_eff = round(p * 2^16) / 2^16, the probability the
16-bit threshold realises exactly.
"""
import math

import pytest
import torch

from msplora_kernels import dispatch

pytest.importorskip("triton")
if not torch.cuda.is_available() and not dispatch.triton_interpreted():
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from msplora_kernels import triton_backend  # noqa: E402
from msplora_kernels._triton import kernels  # noqa: E402
from tests.test_triton_kernels import (  # noqa: E402
    DEVICE, assert_error_ratio, assert_every_gradient, make_problem, reference_outputs, run_backend, to,
)

SD = 5.0


def within(count: float, n: int, q: float) -> bool:
    """``count`` successes of ``n`` Bernoulli(q) draws lie within SD standard deviations of n q (and a count
    of exactly n q is always accepted, for q = 0)."""
    return abs(count - n * q) <= SD * math.sqrt(max(n * q * (1 - q), 0.0)) + 1e-9


def test_effective_p_is_the_16_bit_threshold_and_stays_below_one():
    assert triton_backend.effective_p(0.0) == 0.0
    assert triton_backend.effective_p(0.05) == round(0.05 * 65536) / 65536
    assert triton_backend.effective_p(1e-4) == 7 / 65536
    assert triton_backend.effective_p(1e-6) == 0.0  # below 2^-17: no element is ever dropped
    assert triton_backend.effective_p(1 - 1e-7) == 65535 / 65536  # never all dropped: 1 / (1 - p_eff) stays finite
    for p in (1e-4, 0.05, 0.3, 0.9):
        assert abs(triton_backend.effective_p(p) - p) <= 2**-17


@pytest.mark.parametrize("p", [1e-4, 0.05, 0.3, 0.9])
def test_keep_rate_per_branch_and_independence(p):
    m, k = 128, 512  # 65536 elements per branch, four branches
    masks = triton_backend.dropout_masks(2024, 4, m, k, p, DEVICE).cpu()
    assert masks.dtype == torch.bool and masks.shape == (4, m, k)
    q, n = triton_backend.effective_p(p), m * k
    dropped = ~masks
    for branch in range(4):
        assert within(dropped[branch].sum().item(), n, q), (branch, dropped[branch].float().mean().item(), q)
    # Independence: a pair of branches drops the same element with probability q^2, as do the two elements
    # of one Philox word (even and odd columns) and vertically adjacent elements (different counters).
    for one, two in [(0, 1), (0, 3), (1, 2), (2, 3)]:
        assert within((dropped[one] & dropped[two]).sum().item(), n, q * q), (one, two)
    assert within((dropped[:, :, 0::2] & dropped[:, :, 1::2]).sum().item(), 4 * n // 2, q * q)
    assert within((dropped[:, 0::2] & dropped[:, 1::2]).sum().item(), 4 * n // 2, q * q)


def test_masks_are_a_function_of_the_seed_alone():
    one = triton_backend.dropout_masks(7, 3, 37, 73, 0.3, DEVICE)
    assert torch.equal(one, triton_backend.dropout_masks(7, 3, 37, 73, 0.3, DEVICE))
    assert not torch.equal(one, triton_backend.dropout_masks(8, 3, 37, 73, 0.3, DEVICE))
    # Fewer branches draw the same first masks: branch s uses word s of each draw.
    assert torch.equal(one[:2], triton_backend.dropout_masks(7, 2, 37, 73, 0.3, DEVICE))


def unpack(packed: torch.Tensor, k: int, branches: int) -> torch.Tensor:
    """Keep-masks (branches, M, K) from the packed mask (M, ceil(K/2)): bit s of each nibble, even column low."""
    nibbles = torch.stack([packed.int() & 0xF, packed.int() >> 4], dim=-1).reshape(packed.shape[0], -1)[:, :k]
    return torch.stack([((nibbles >> s) & 1).bool() for s in range(branches)])


@pytest.mark.parametrize("path", ["fused", "unfused"])
@pytest.mark.parametrize("k", [72, 33])
def test_forward_stores_the_packed_mask_that_backward_reads(path, k):
    """The shrink draws once and stores the masks (bit for bit the backend's ``dropout_masks``); backward reads
    them: with the stored mask, with it zeroed in place (every element dropped), and redrawn from the seed
    (S copied, so the stored mask is not found) it computes exactly what those masks imply."""
    m, n, p, seed = 37, 50, 0.3, 99
    x, weight, b, branches = make_problem(m, k, n, (5, 3, 1))
    a_cat, b_cat = (torch.cat([to(a, torch.float32) for a, _, _ in branches]),
                    torch.cat([to(bb, torch.float32) for _, bb, _ in branches], dim=1))
    ranks, scalings = [5, 3, 1], [c for _, _, c in branches]
    xt, wt, dy = to(x, torch.float32), to(weight, torch.float32), torch.randn(m, n, device=DEVICE)
    with triton_backend.forced_path(path):
        _, s = triton_backend.forward(xt, wt, to(b, torch.float32), a_cat, b_cat, ranks, scalings, p, seed)
        packed = triton_backend.packed_mask_of(s, k, p, seed, 3)
        assert packed is not None and packed.shape == (m, (k + 1) // 2) and packed.dtype == torch.uint8
        assert torch.equal(unpack(packed.cpu(), k, 3), triton_backend.dropout_masks(seed, 3, m, k, p, DEVICE).cpu())
        assert triton_backend.packed_mask_of(s.clone(), k, p, seed, 3) is None
        assert triton_backend.packed_mask_of(s, k, p, seed + 1, 3) is None

        stored = triton_backend.backward(dy, xt, s, wt, a_cat, b_cat, ranks, scalings, p, seed, True)
        redrawn = triton_backend.backward(dy, xt, s.clone(), wt, a_cat, b_cat, ranks, scalings, p, seed, True)
        for one, two in zip(stored, redrawn):
            assert torch.equal(one, two)
        packed.zero_()  # the mask lives in S's storage: backward must now see every element dropped
        dx, da, _ = triton_backend.backward(dy, xt, s, wt, a_cat, b_cat, ranks, scalings, p, seed, True)
    torch.testing.assert_close(dx, dy @ wt, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(da) == 0


def test_evicted_mask_records_fall_back_to_redrawing(monkeypatch):
    monkeypatch.setattr(triton_backend, "_MASK_RECORDS", 1)
    x, weight, b, branches = make_problem(37, 72, 50, (8, 4, 2))
    dy = torch.randn(37, 50, dtype=torch.float64)
    a_cat = torch.cat([to(a, torch.float32) for a, _, _ in branches])
    b_cat = torch.cat([to(bb, torch.float32) for _, bb, _ in branches], dim=1)
    args = (to(x, torch.float32), to(weight, torch.float32), to(b, torch.float32), a_cat, b_cat, [8, 4, 2],
            [c for _, _, c in branches], 0.2, 5)
    _, s_first = triton_backend.forward(*args)
    _, s_second = triton_backend.forward(*args[:-1], 6)
    assert triton_backend.packed_mask_of(s_first, 72, 0.2, 5, 3) is None  # evicted by the second forward
    assert triton_backend.packed_mask_of(s_second, 72, 0.2, 6, 3) is not None
    masks = triton_backend.dropout_masks(5, 3, 37, 72, 0.2, DEVICE)
    got = triton_backend.backward(to(dy, torch.float32), args[0], s_first, args[1], a_cat, b_cat, [8, 4, 2],
                                  args[6], 0.2, 5, True)
    _, grads64 = reference_outputs(x, weight, b, branches, dy, 0.2, masks)
    _, grads_pt = reference_outputs(x, weight, b, branches, dy, 0.2, masks, dtype=torch.float32)
    assert_every_gradient(got, grads_pt, grads64, (8, 4, 2))


@pytest.mark.parametrize("p", [1e-4, 0.9])
def test_extreme_dropout_matches_the_reference(p):
    x, weight, b, branches = make_problem(37, 72, 50, (16, 0, 3))
    dy = torch.randn(37, 50, dtype=torch.float64)
    masks = triton_backend.dropout_masks(31, 2, 37, 72, p, DEVICE)
    y, _, grads = run_backend(x, weight, b, branches, dy, torch.float32, p, seed=31)
    y64, grads64 = reference_outputs(x, weight, b, branches, dy, p, masks)
    y_pt, grads_pt = reference_outputs(x, weight, b, branches, dy, p, masks, dtype=torch.float32)
    assert_error_ratio(y, y_pt, y64, "y")
    assert_every_gradient(grads, grads_pt, grads64, (16, 0, 3))


def test_zero_rows_and_all_zero_rows_with_dropout():
    _, weight, b, branches = make_problem(1, 72, 50, (8, 4, 2))
    a_cat = torch.cat([to(a, torch.float32) for a, _, _ in branches])
    b_cat = torch.cat([to(bb, torch.float32) for _, bb, _ in branches], dim=1)
    ranks, scalings = [8, 4, 2], [c for _, _, c in branches]
    wt = to(weight, torch.float32)
    y, s = triton_backend.forward(torch.empty(0, 72, device=DEVICE), wt, None, a_cat, b_cat, ranks, scalings, 0.1, 3)
    assert y.shape == (0, 50) and s.shape == (0, 14)
    dx, da, db = triton_backend.backward(torch.empty(0, 50, device=DEVICE), torch.empty(0, 72, device=DEVICE), s, wt,
                                         a_cat, b_cat, ranks, scalings, 0.1, 3, True)
    assert dx.shape == (0, 72) and torch.count_nonzero(da) == 0 and torch.count_nonzero(db) == 0
    x = torch.zeros(5, 72, device=DEVICE)  # rows of zeros: S = 0 whatever the masks, dA = 0
    _, s = triton_backend.forward(x, wt, None, a_cat, b_cat, ranks, scalings, 0.1, 3)
    assert torch.count_nonzero(s) == 0
    _, da, db = triton_backend.backward(torch.randn(5, 50, device=DEVICE), x, s, wt, a_cat, b_cat, ranks, scalings,
                                        0.1, 3, False)
    assert torch.count_nonzero(da) == 0 and torch.count_nonzero(db) == 0


def test_one_rng_pass_per_training_step(monkeypatch):
    """Forward and backward together draw Philox once per element pair (in the shrink) when the mask is found;
    the backward kernels are launched with MASK_SOURCE = 2 (read), never 1 (draw)."""
    launches = []
    for name in ("_shrink_kernel", "_matmul_lowrank_kernel", "_lowrank_grad_a_kernel"):
        kernel = getattr(kernels, name)

        class Spy:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                def launch(*args, **meta):
                    launches.append((self.name, meta))
                    return self.kernel[grid](*args, **meta)
                return launch

        monkeypatch.setattr(kernels, name, Spy(kernel, name))
    for path in ("fused", "unfused"):
        launches.clear()
        with triton_backend.forced_path(path):
            run_backend(*make_problem(37, 72, 50, (8, 4, 2)), torch.randn(37, 50, dtype=torch.float64),
                        torch.float32, 0.1, seed=4)
        draws = [name for name, meta in launches
                 if (name == "_shrink_kernel" and meta["MASKED_BRANCHES"]) or meta.get("MASK_SOURCE") == 1]
        reads = [name for name, meta in launches if meta.get("MASK_SOURCE") == 2]
        assert draws == ["_shrink_kernel"], launches
        assert sorted(reads) == ["_lowrank_grad_a_kernel", "_matmul_lowrank_kernel"], launches
