"""The eager path's cache of concatenated adapters (``msplora_kernels.function._AdapterCache``): every way of
changing the adapters that PyTorch tracks gives the output of the changed adapters, entries never outlive
their parameters, the cache is bounded and never part of an autograd graph.

Each check compares against the unfused reference at odd shapes (M=37, K=72, N=50) with non-zero B, in
fp64 (the maths is the same, so the tolerance is fp64 rounding: 1e-10 relative).
"""
import gc

import pytest
import torch

from msplora_kernels import dispatch, function, msplora_linear, msplora_linear_ref
from tests.test_triton_kernels import make_problem

M, K, N = 37, 72, 50
BACKENDS = ["torch"] + (["triton"] if dispatch.triton_available() and (torch.cuda.is_available()
                                                                       or dispatch.triton_interpreted()) else [])


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    """Each test starts with an empty cache, enabled for calls without gradients (``auto``) unless it says."""
    monkeypatch.setenv(function.CACHE_ENV_VAR, "auto")
    function.clear_adapter_cache()
    yield
    function.clear_adapter_cache()


def test_the_cache_is_off_by_default_so_untracked_writes_are_seen(monkeypatch):
    """Without ``MSPLORA_ADAPTER_CACHE`` nothing is cached: a hand-written update through ``p.data`` (which
    no version counter sees) between two evaluation calls shows in the second one."""
    monkeypatch.delenv(function.CACHE_ENV_VAR)
    x, weight, bias, params = layer()
    before = counts()  # cumulative over the process: other tests' calls count too
    with torch.no_grad():
        check(x, weight, bias, params, "torch")
        params[0][0].data -= 0.1 * torch.ones_like(params[0][0])
        check(x, weight, bias, params, "torch")
    assert counts() == before and len(function._adapter_cache) == 0


def layer(ranks=(8, 4, 2), seed=0):
    x, weight, bias, branches = make_problem(M, K, N, ranks, seed=seed)
    params = [(torch.nn.Parameter(a), torch.nn.Parameter(b), c) for a, b, c in branches]
    return x, weight, bias, params


def check(x, weight, bias, params, backend, **kw):
    y = msplora_linear(x, weight, bias, params, backend=backend, **kw)
    want = msplora_linear_ref(x, weight, bias, [(a.detach(), b.detach(), c) for a, b, c in params])
    torch.testing.assert_close(y.detach(), want, rtol=1e-10, atol=1e-10)
    return y


def counts():
    cache = function._adapter_cache
    return cache.hits, cache.misses


@pytest.mark.parametrize("backend", BACKENDS)
def test_calls_without_gradients_reuse_the_concatenation(backend):
    x, weight, bias, params = layer()
    hits, misses = counts()
    with torch.no_grad():
        check(x, weight, bias, params, backend)
        check(x, weight, bias, params, backend)
    assert counts() == (hits + 1, misses + 1)
    check(x, weight, bias, params, backend)  # a call that needs gradients: not cached under auto
    assert counts() == (hits + 1, misses + 1)


@pytest.mark.parametrize("change", ["optimizer_step", "load_state_dict", "no_grad_add", "replace_data",
                                    "dtype", "clear_after_data_write"])
def test_every_tracked_change_of_the_adapters_is_seen(change):
    x, weight, bias, params = layer()
    module = torch.nn.ParameterList([t for a, b, _ in params for t in (a, b)])
    with torch.no_grad():
        check(x, weight, bias, params, "torch")
    if change == "optimizer_step":
        y = msplora_linear(x, weight, bias, params, backend="torch")
        y.square().sum().backward()
        torch.optim.SGD(module.parameters(), lr=0.1).step()
    elif change == "load_state_dict":
        module.load_state_dict({k: torch.randn_like(v) for k, v in module.state_dict().items()})
    elif change == "no_grad_add":
        with torch.no_grad():
            params[1][1].add_(1.0)  # one B
    elif change == "replace_data":
        params[0][0].data = torch.randn_like(params[0][0])
    elif change == "dtype":
        x = x.float()
        weight, bias = weight.float(), bias.float()
    elif change == "clear_after_data_write":
        params[2][0].data.mul_(3.0)  # bypasses the version counter: needs clear_adapter_cache()
        function.clear_adapter_cache()
    with torch.no_grad():
        y = msplora_linear(x, weight, bias, params, backend="torch")
    want = msplora_linear_ref(x.double(), weight.double(), bias.double(),
                              [(a.detach(), b.detach(), c) for a, b, c in params])
    tol = 1e-5 if change == "dtype" else 1e-10
    assert y.dtype == x.dtype
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)


def test_training_calls_are_not_cached_under_auto_so_data_writes_are_seen():
    """``p.data`` writes bypass version counters (gradcheck perturbs its inputs this way)."""
    x, weight, bias, params = layer()
    check(x, weight, bias, params, "torch")
    params[0][1].data.add_(0.5)
    check(x, weight, bias, params, "torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_training_calls_give_the_reference_gradients(backend, monkeypatch):
    """MSPLORA_ADAPTER_CACHE=1: two forwards (gradient accumulation) share one cached concatenation, which is
    no graph tensor; gradients are the reference's, and an optimizer step is seen."""
    monkeypatch.setenv(function.CACHE_ENV_VAR, "1")
    x, weight, bias, params = layer()
    leaves = [t for a, b, _ in params for t in (a, b)]
    ref = [(a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_(), c) for a, b, c in params]
    for micro in range(2):
        xm = x + micro
        check(xm, weight, bias, params, backend).square().sum().backward()
        msplora_linear_ref(xm, weight, bias, ref).square().sum().backward()
    assert function._adapter_cache.hits >= 1
    for entry in function._adapter_cache._entries.values():
        assert all(t.grad_fn is None and not t.requires_grad for t in entry[2:])
    for got, want in zip(leaves, [t for a, b, _ in ref for t in (a, b)]):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-10)
    torch.optim.SGD(leaves, lr=0.1).step()
    assert len(function._adapter_cache) == 0  # every optimizer step empties it
    check(x, weight, bias, params, backend)


def test_entries_die_with_their_parameters_and_the_cache_is_bounded(monkeypatch):
    x, weight, bias, params = layer()
    with torch.no_grad():
        check(x, weight, bias, params, "torch")
    assert len(function._adapter_cache) == 1
    del params
    gc.collect()
    assert len(function._adapter_cache) == 0
    monkeypatch.setattr(function._AdapterCache, "max_entries", 3)
    layers = [layer(seed=i)[3] for i in range(5)]
    with torch.no_grad():
        for params in layers:
            check(x, weight, bias, params, "torch")
    assert len(function._adapter_cache) == 3


def test_inference_mode_entries_are_not_used_by_training_calls(monkeypatch):
    monkeypatch.setenv(function.CACHE_ENV_VAR, "1")
    x, weight, bias, params = layer()
    with torch.inference_mode():
        check(x, weight, bias, params, "torch")
    check(x, weight, bias, params, "torch").sum().backward()  # would fail on a saved inference tensor
    assert params[0][0].grad is not None


def test_off_switch_and_bad_setting(monkeypatch):
    x, weight, bias, params = layer()
    monkeypatch.setenv(function.CACHE_ENV_VAR, "0")
    with torch.no_grad():
        check(x, weight, bias, params, "torch")
    assert len(function._adapter_cache) == 0
    monkeypatch.setenv(function.CACHE_ENV_VAR, "yes")
    with pytest.raises(ValueError, match="MSPLORA_ADAPTER_CACHE must be auto, 0 or 1"), torch.no_grad():
        msplora_linear(x, weight, bias, params, backend="torch")
