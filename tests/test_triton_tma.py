"""The persistent TMA GEMM (``_triton/kernels_tma.py``, the forward's ``fused_tma`` path) against the fp64
reference, the rule that picks it (never without a measurement), and its sm_90 compile.

Runs under the Triton interpreter on the CPU (``conftest.py`` sets ``TRITON_INTERPRET=1``; triton 3.9's
interpreter implements tensor descriptors, zero padding included) or on CUDA. The compile test compiles for
sm_90 without a GPU. Low-precision results are judged by the error-ratio rule of ``test_triton_kernels.py``.
"""
import os
import subprocess
import sys

import pytest
import torch

from msplora_kernels import dispatch, msplora_linear_ref

pytest.importorskip("triton")

from msplora_kernels import triton_backend  # noqa: E402
from msplora_kernels._triton import kernels_tma, tuning  # noqa: E402
from tests.test_triton_dispatch import GPU, TORCH, TRITON, on_h200  # noqa: E402,F401 (on_h200: a fixture)
from tests.test_triton_dispatch import broken_entry, entry as dispatch_entry  # noqa: E402
from tests.test_triton_kernels import assert_error_ratio, make_problem, packed, to  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RUNS = torch.cuda.is_available() or dispatch.triton_interpreted()
needs_kernels = pytest.mark.skipif(not RUNS, reason="needs CUDA or TRITON_INTERPRET=1")


class Spy:
    """Records the TMA kernel's launches (constexprs) and runs them."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches.append(dict(meta, grid=grid))
            return self.kernel[grid](*args, **meta)
        return launch


@pytest.fixture
def spy(monkeypatch):
    recorder = Spy(kernels_tma._matmul_lowrank_tma_kernel)
    monkeypatch.setattr(kernels_tma, "_matmul_lowrank_tma_kernel", recorder)
    return recorder


def skip_unless_tma_runs(dtype):
    """On a GPU the TMA GEMM runs only on Hopper in 16-bit (the interpreter runs fp32 too)."""
    probe = torch.empty(16, 64, dtype=dtype, device=DEVICE)
    if not kernels_tma.supported(probe, probe, tuning._arch(DEVICE)):
        pytest.skip(f"the TMA GEMM does not run for {dtype} on {DEVICE}")


def forward(x, weight, b, branches, dtype, p=0.0, seed=99, path="fused_tma"):
    a_cat, b_cat, ranks, scalings = packed(branches, dtype)
    with triton_backend.forced_path(path):
        return triton_backend.forward(to(x, dtype), to(weight, dtype), to(b, dtype), a_cat, b_cat, ranks, scalings,
                                      p, seed)


@needs_kernels
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("ranks", [(8, 4, 2), (16, 0, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k,n", [(37, 72, 50), (300, 200, 260), (300, 200, 264)])
def test_forward_matches_the_fp64_reference(m, k, n, dtype, ranks, bias, spy):
    """Non-zero B; 37 x 72 -> 50 crosses every tile edge; N = 260 (fp16: a row of y is 520 bytes, not a
    multiple of 16: masked stores) and 264 (TMA stores); ranks 16/0/3 take two rank steps (the loop)."""
    skip_unless_tma_runs(dtype)
    x, weight, b, branches = make_problem(m, k, n, ranks, bias=bias)
    y, _ = forward(x, weight, b, branches, dtype)
    assert len(spy.launches) == 1, "the TMA kernel did not run"
    launch = spy.launches[0]
    assert launch["Y_DESCRIPTOR"] == ((n * torch.tensor([], dtype=dtype).element_size()) % 16 == 0)
    assert launch["grid"][0] <= triton_tiles(m, n, launch)
    if DEVICE.type == "cpu":
        assert launch["grid"][0] < triton_tiles(m, n, launch)  # persistent: programs walk several tiles
    assert launch["RANK_STEPS"] == -(-sum(ranks) // launch["BLOCK_R"])
    exact = msplora_linear_ref(x, weight, b, branches)
    xd, wd, bd = to(x, dtype), to(weight, dtype), to(b, dtype)
    same_dtype = msplora_linear_ref(xd, wd, bd, [(to(a, dtype), to(bb, dtype), c) for a, bb, c in branches])
    assert y.dtype == dtype and y.shape == (m, n)
    assert_error_ratio(y, same_dtype, exact, "y")


def triton_tiles(m, n, launch):
    return -(-m // launch["BLOCK_M"]) * -(-n // launch["BLOCK_N"])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_forward_uses_the_shrinks_masks(dtype, spy):
    """S carries the masks and 1 / (1 - p_eff): y is the reference run with the kernels' own masks."""
    skip_unless_tma_runs(dtype)
    m, k, n, p, seed = 37, 72, 56, 0.3, 5
    x, weight, b, branches = make_problem(m, k, n, (8, 4, 2))
    y, _ = forward(x, weight, b, branches, dtype, p=p, seed=seed)
    assert len(spy.launches) == 1
    masks = triton_backend.dropout_masks(seed, len(branches), m, k, p, DEVICE).cpu()
    p_eff = triton_backend.effective_p(p)
    exact = msplora_linear_ref(x, weight, b, branches, p_eff, True, masks=list(masks))
    same = msplora_linear_ref(to(x, dtype), to(weight, dtype), to(b, dtype),
                              [(to(a, dtype), to(bb, dtype), c) for a, bb, c in branches], p_eff, True,
                              masks=[mk.to(DEVICE) for mk in masks])
    assert_error_ratio(y, same, exact, "y with dropout")


@needs_kernels
def test_backward_under_fused_tma_is_the_unfused_backward_bit_for_bit():
    """The TMA GEMM is forward only: under ``forced_path("fused_tma")`` backward runs cuBLAS + our kernels."""
    dtype = torch.float32 if DEVICE.type == "cpu" else torch.float16
    skip_unless_tma_runs(dtype)
    x, weight, b, branches = make_problem(37, 72, 56, (8, 4, 2))
    a_cat, b_cat, ranks, scalings = packed(branches, dtype)
    dy = torch.randn(37, 56, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    grads = {}
    for path in ("fused_tma", "unfused"):
        with triton_backend.forced_path(path):
            _, s = triton_backend.forward(to(x, dtype), to(weight, dtype), to(b, dtype), a_cat, b_cat, ranks,
                                          scalings, 0.1, 7)
            grads[path] = triton_backend.backward(dy, to(x, dtype), s, to(weight, dtype), a_cat, b_cat, ranks,
                                                  scalings, 0.1, 7, True)
    for got, expected in zip(grads["fused_tma"], grads["unfused"]):
        assert torch.equal(got, expected)


@needs_kernels
@pytest.mark.parametrize("case", ["row stride not a multiple of 16 bytes", "transposed weight", "fp64"])
def test_operands_tma_cannot_address_take_the_unfused_path(case, spy):
    dtype = torch.float64 if case == "fp64" else torch.float16
    k = 75 if case.startswith("row stride") else 72
    x, weight, b, branches = make_problem(37, k, 50, (8, 4, 2))
    a_cat, b_cat, ranks, scalings = packed(branches, dtype)
    w = to(weight, dtype)
    if case == "transposed weight":
        w = w.t().contiguous().t()
    with triton_backend.forced_path("fused_tma"):
        y, _ = triton_backend.forward(to(x, dtype), w, to(b, dtype), a_cat, b_cat, ranks, scalings, 0.0, 1)
    assert spy.launches == []
    exact = msplora_linear_ref(x, weight, b, branches)
    same = msplora_linear_ref(to(x, dtype), to(weight, dtype), to(b, dtype),
                              [(to(a, dtype), to(bb, dtype), c) for a, bb, c in branches])
    if dtype == torch.float64:
        torch.testing.assert_close(y.cpu(), exact)
    else:
        assert_error_ratio(y, same, exact, case)


@needs_kernels
def test_the_tuning_step_times_the_tma_gemm_only_where_it_computes_y(monkeypatch):
    """``tune.tma_agrees`` (run on the GPU before timing fused_tma) passes for the kernel and fails for one
    that drops the low-rank term."""
    from msplora_kernels._triton import tune

    dtype = torch.float16
    skip_unless_tma_runs(dtype)
    x, weight, _, branches = make_problem(37, 72, 56, (8, 4, 2))
    a_cat, b_cat, ranks, scalings = packed(branches, dtype)
    args = (to(x, dtype), to(weight, dtype), a_cat, b_cat, ranks, scalings, 0.1)
    assert tune.tma_agrees(*args)
    real = kernels_tma.launch
    monkeypatch.setattr(kernels_tma, "launch",
                        lambda y, x, w, bias, s, b, *rest: real(y, x, w, bias, None, None, *rest))
    assert not tune.tma_agrees(*args)


def test_support_rules():
    x = torch.empty(8, 64, dtype=torch.bfloat16)
    w = torch.empty(32, 64, dtype=torch.bfloat16)
    assert kernels_tma.supported(x, w, 9) and kernels_tma.supported(x, w, "interpreter")
    assert not kernels_tma.supported(x, w, 8)  # no TMA before Hopper
    assert not kernels_tma.supported(x, w, None)  # other GPUs: not measured, not compiled
    assert not kernels_tma.supported(x.float(), w.float(), 9)  # fp32 on sm_90 is not offered
    assert kernels_tma.supported(x.float(), w.float(), "interpreter")
    assert not kernels_tma.supported(x[:, 1:], w[:, 1:], 9)  # base not 16-byte aligned, stride 63
    assert not kernels_tma.supported(x, w.t().contiguous().t(), 9)
    assert not kernels_tma.supported(x[:0], w, 9)


# ---- the rule that picks it ---------------------------------------------------------------------------------


def entry(fused_ms, unfused_ms, tma_ms=None, **changes):
    """A tuning-table entry (``test_triton_dispatch.entry``), with the TMA GEMM's time when given."""
    if tma_ms is not None:
        changes["fused_tma_ms"] = tma_ms
    return dispatch_entry(fused_ms, unfused_ms, **changes)


def picks_tma(entries, m=8192, forced=None, device=torch.device("cuda", 0), **call):
    decisions = tuning.parse_tma_table(entries)
    return tuning.prefer_tma(m, 4096, 4096, device, torch.bfloat16, forced=forced, ranks=(8, 4, 2), dropout=True,
                             decisions=decisions, **call)


def test_tma_only_where_measured_3_percent_faster_than_unfused_and_faster_than_fused(on_h200):
    assert not picks_tma([])
    assert not picks_tma([entry(1.0, 1.0)])  # not measured
    assert picks_tma([entry(1.0, 1.0, 0.96)])
    assert picks_tma([entry(1.0, 1.0, 0.97)])
    assert not picks_tma([entry(1.0, 1.0, 0.98)])  # 2% faster is not enough
    assert not picks_tma([entry(0.90, 1.0, 0.95)])  # the fused GEMM is faster still
    assert not picks_tma([entry(1.0, 1.0, 0.5)], m=16384)  # another M bucket
    assert not picks_tma([entry(1.0, 1.0, 0.5, gpu="NVIDIA H100 80GB HBM3")])


def test_default_and_forced_choices(on_h200):
    measured = [entry(1.0, 1.0, 0.5)]
    assert not picks_tma(measured, device=torch.device("cpu"))  # off CUDA: never under auto
    assert picks_tma([], forced="fused_tma", device=torch.device("cpu"))
    assert not picks_tma(measured, forced="fused") and not picks_tma(measured, forced="unfused")
    # Forcing the TMA forward leaves the backward on cuBLAS + our kernels, whatever the table says.
    backward = tuning.parse_table([entry(0.5, 1.0, op="backward")])
    assert tuning.prefer_fused(8192, 4096, 4096, torch.device("cuda", 0), torch.bfloat16, forced="auto",
                               ranks=(8, 4, 2), dropout=True, op="backward", decisions=backward)
    assert not tuning.prefer_fused(8192, 4096, 4096, torch.device("cuda", 0), torch.bfloat16, forced="fused_tma",
                                   ranks=(8, 4, 2), dropout=True, op="backward", decisions=backward)
    with triton_backend.forced_path("fused_tma"):
        assert triton_backend._forced["path"] == "fused_tma"


@pytest.mark.parametrize("bad,message", [
    (dict(fused_tma_ms=-1.0), "fused_tma_ms must be positive"),
    (dict(fused_tma_ms=0.5, op="backward"), "for op .forward. only"),
    (dict(fused_tma_ms=0.5, fused_ms=None), "missing fields"),
])
def test_malformed_tma_entries_are_refused_naming_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message):
        tuning.parse_tma_table([broken_entry(bad)])


def test_the_committed_table_parses_for_the_tma_rule():
    from msplora_kernels._triton import tuning_table

    assert isinstance(tuning.parse_tma_table(tuning_table.ENTRIES), dict)


# ---- compiled for sm_90 -------------------------------------------------------------------------------------


def test_tma_variants_compile_for_hopper_with_wgmma_tma_and_no_spills():
    """Every TMA variant the launcher makes at the llama7b shapes, M = 1 and 37 x 72 -> 50 (bf16 and fp16,
    rank tiles of 16 in one step and of 32 in four), compiled for sm_90 as Triton's launcher specialises it:
    no spills, shared memory within the H200's 227 KiB, warp-group MMA and TMA instructions in the SASS."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.getcwd(), TRITON_DEFAULT_FP_FUSION="1")
    command = [sys.executable, "-m", "msplora_kernels._triton.compile_check", "--arch", "90", "--dtypes",
               "bf16,fp16", "--ranks", "8,4,2;64,32,16", "--kernels", "_matmul_lowrank_tma_kernel"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("_matmul_lowrank_tma_kernel")]
    assert len(lines) == 12, result.stdout
    for line in lines:
        assert "STACK=  0" in line and "wgmma=True" in line and " tma= 0" not in line, line
        assert int(line.split("shared=")[1].split()[0]) <= 232448, line
