"""Pure-PyTorch MSPLoRA backend: the CPU path, and the GPU fallback where Triton is absent.

Notation (all 2-D): x (M, K), weight W (N, K), A = [A_1; ...; A_n] (R, K), B = [B_1 | ... | B_n] (N, R) for
n branches of ranks r_s, c_s = scaling_s / (1 - p) and A'_s = c_s A_s (A' = the stacked A'_s, (R, K)).

Dropout (the contract shared with every backend): branch s sees D_s(x) = keep_s * x with keep_s an
independent Bernoulli(1 - p) mask per element and per branch, scaled by 1/(1 - p) (folded into c_s); the same
masks in forward and backward, all drawn from one integer ``seed``; no dropped copy of x is kept.

Complement-sparse correction
----------------------------
Write keep_s = 1 - E_s, with E_s the dropped set (density p). Then D_s(x) = x - E_s * x, and everything
splits into the p = 0 dense computation minus a correction that touches only the dropped elements:

    S   = x A'^T - C,       C[:, s] = (E_s * x) A'_s^T                                  (M, R)
    y   = x W^T + b + S B^T
    dS  = dy B,   dB = dy^T S                                                           (S is saved)
    dx  = dy W + dS A' - sum_s E_s * (dS_s A'_s)                                        (M, K)
    dA_s = c_s (dS_s^T x - dS_s^T (E_s * x))                                            (r_s, K)

The corrections run over one index space that interleaves the branches, f = (i K + j) n + s for element (i, j)
of branch s, with A' laid out to match as the (K n, R) matrix A_E, A_E[j n + s, cols of s] = A'_s[:, j] and zeros
elsewhere: position f's row of A_E is f - i K n. Two implementations of the same sums, chosen per call:

* **the compiled helper** (``msplora_kernels/_cpu``, CPU tensors in fp32, fp64 or bf16; built on first use with
  the machine's C compiler): one pass over the sorted positions in forward (C[i, :] += x[i, j] A_E[f - i K n, :])
  and one in backward (dx[i, j] -= dS[i, :] . A_E[f - i K n, :] and G[f - i K n, :] += x[i, j] dS[i, :], then
  dA's correction from G's owned columns), rows split over ``torch.get_num_threads()`` threads, and the draw
  itself (below), split over the same threads. ``dropout_correction.c`` has the loop details.
* **PyTorch sparse products** (other dtypes, other devices, no compiler, or ``MSPLORA_CPU_EXT=0``): the dropped
  set as one sparse (M, K n) CSR matrix X_E with X_E[i, j n + s] = x[i, j] (the positions come out sorted), and

    C       = X_E A_E                                 one CSR x dense product
    dx corr = the values of dS A_E^T sampled at X_E's pattern, added at (i, j)   (torch.sparse.sampled_addmm)
    dA corr = sum over s of the s-blocks of X_E^T dS  one CSR x dense product on the transposed pattern

  where the transposed pattern is X_E's positions sorted (stably) by column.

Both draw the same positions (the same bits), so they give the same masks; they differ only in the order of
their sums. The dense terms are the p = 0 kernels: one shrink for all branches, one expand, and in backward dS,
dB, dS A' and dS^T x, also once.

Drawing the dropped set: the gaps between consecutive dropped positions of an i.i.d. Bernoulli(p) sequence
are i.i.d. geometric, P(gap = g) = (1 - p)^(g - 1) p, so positions = cumsum(gaps) - 1 with
gap = ceil(log(u) / log(1 - p)) for u uniform in (0, 1) (P(gap > g) = P(u < (1 - p)^g) = (1 - p)^g). The
uniforms come from a counter-based stream, so any range of them can be computed independently (in
parallel, on any device): draw c of the stream of ``seed`` is

    u_c = (floor(mix64(key + (c + 1) G) / 2^12) + 1/2) 2^-52,     key = mix64(seed + G)  (mod 2^64)

with mix64 SplitMix64's output function and G = 0x9e3779b97f4a7c15 its increment (SplitMix64 itself, read at
counter c: it passes BigCrush), so u lies on the 2^52 midpoints of (0, 1). log(u) is computed by a fixed
sequence of IEEE fp64 operations (``_log_unit``: an exponent split and the atanh series, within a few ulps),
not by a library log, and the helper runs the same operations in C: the two paths draw the same bits (as
would a CUDA device by the same argument: IEEE fp64 arithmetic and wrapping int64; untested, no GPU here).
Exact up to u's grid and the log's rounding: each P(gap > g) is within about 2^-52 of (1 - p)^g (so each gap
is within that total-variation distance of the geometric law), except that no gap exceeds
ceil(log(2^-53) / log(1 - p)) ~ 37/p (of probability e^-37 ~ 1e-16). The mean rate, 1 / E[gap], is within a
relative ~37 2^-52 ~ 1e-14 of p, and the scaling 1/(1 - p) is off by as little: far below what any estimate
of the mean could see. Random draws and extra work scale with p M K n, not with M K n: at p = 0.05
one twentieth of an element-wise pass per branch. The clamp of each gap at total + 1 (past the end) keeps
the running sums exact integers.

The backward needs the same positions: in eager mode the forward hands them over (``keep_positions``; int32,
4 bytes per dropped element, 0.6 byte per element of x for three branches at p = 0.05, where PEFT keeps a
dropped copy of x); through the contract alone (the custom ops under ``torch.compile``) the backward draws them
again from the seed. Nothing of size M x K is saved besides x itself. ``dropout_masks`` turns the positions
into dense masks, for tests.

Cost at p = 0.05 with three branches, per element of x: 0.15 draws (a hash and a log: about 2 ns each per
core in the helper with AVX-512, 5 with SSE2; on the other path three dozen PyTorch ops over them, about
28 ns per draw on 2 cores, 3x PyTorch's own ``uniform_`` and ``log_``: the price of identical bits), then in
the helper one pass over the 0.15 positions per element in forward and one in backward, each doing about
P = R rounded up to 4 multiply-adds (twice that in backward) from a (K n, P) table; against the p = 0 layer,
whose GEMMs are 2 (K + N) + 4 R multiply-adds per element. The sparse products instead make a dozen passes
over 0.15-long index arrays each way (CSR indices, gathers, a stable 16-bit sort for the transposed pattern)
and run in fp32 for fp16 and bf16 inputs (the CPU has no half-precision CSR kernels). For large p the
corrections cost more than dense masks would (p n M K entries); the layer stays correct, only p <= ~0.2 is
what this path is tuned for.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import math
import warnings
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import _cpu

_csr_warning_silenced = [False]


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: Tuple[int, int]) -> torch.Tensor:
    """A CSR matrix from indices built here (its invariants hold by construction, so they are not checked).
    PyTorch warns once per process that CSR support is in beta: the first call silences that one warning, later
    calls skip the (costly) ``warnings.catch_warnings``."""
    if _csr_warning_silenced[0]:
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        made = torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)
    _csr_warning_silenced[0] = True
    return made


_DRAW_MARGIN_SD = 6.0  # the first draw covers the expected count of dropped elements plus this many sd


def _branch_coefficients(ranks: Sequence[int], scalings: Sequence[float], p: float) -> List[float]:
    keep = 1.0 - p
    return [scaling / keep for scaling in scalings]


def _scaled_rows(a_cat: torch.Tensor, ranks: Sequence[int], coefs: Sequence[float]) -> torch.Tensor:
    """A with each branch's rows multiplied by its coefficient: (R, K), tiny next to x."""
    if len(set(coefs)) == 1:
        return a_cat * coefs[0]
    return a_cat * _row_coefficients(tuple(ranks), tuple(coefs), a_cat.dtype, a_cat.device)


@functools.lru_cache(maxsize=256)
def _row_coefficients(ranks: Tuple[int, ...], coefs: Tuple[float, ...], dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """(R, 1): c_s repeated r_s times. Cached: every layer of a model asks for the same few (never written to)."""
    return torch.cat([torch.full((r,), c, dtype=dtype, device=device) for r, c in zip(ranks, coefs)])[:, None]


_MASK64 = (1 << 64) - 1
_MIX_G = 0x9E3779B97F4A7C15  # SplitMix64's increment (2^64 / golden ratio, odd)
_MIX_C1, _MIX_C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_SQRT2 = float.fromhex("0x1.6a09e667f3bcdp+0")
_LN2 = float.fromhex("0x1.62e42fefa39efp-1")
_LOG_TERMS = tuple(1.0 / (2 * k + 1) for k in range(11))  # the atanh series' 1, 1/3, ..., 1/21


def _mix64(z: int) -> int:
    """SplitMix64's output function on a 64-bit integer (Python ints: exact)."""
    z = ((z ^ (z >> 30)) * _MIX_C1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX_C2) & _MASK64
    return z ^ (z >> 31)


def _stream_key(seed: int) -> int:
    """The 64-bit key of the draw stream of ``seed``."""
    return _mix64((seed + _MIX_G) & _MASK64)


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _srl(z: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 read as uint64 (PyTorch's >> is arithmetic)."""
    return (z >> shift) & ((1 << (64 - shift)) - 1)


def _uniforms(key: int, c0: int, n: int, device: torch.device) -> torch.Tensor:
    """u_c = (mix64(key + (c + 1) G) >> 12 + 1/2) 2^-52 for the counters c = c0 .. c0 + n - 1 (fp64), in PyTorch
    int64 ops (they wrap modulo 2^64 as uint64 arithmetic does): the helper's ``mix64`` and ``unit_midpoint``."""
    c = torch.arange(c0 + 1, c0 + n + 1, dtype=torch.int64, device=device)
    z = c * _signed64(_MIX_G) + _signed64(key)
    z = (z ^ _srl(z, 30)) * _signed64(_MIX_C1)
    z = (z ^ _srl(z, 27)) * _signed64(_MIX_C2)
    z = z ^ _srl(z, 31)
    return _srl(z, 12).to(torch.float64).add_(0.5).mul_(2.0**-52)  # (k + 1/2) 2^-52, exactly


def _log_unit(u: torch.Tensor) -> torch.Tensor:
    """log(u) for fp64 u in [2^-53, 1), within a few ulps: the helper's ``log_unit``, operation for operation
    (each one correctly rounded IEEE fp64, no fused multiply-add), so the same bits on any device. Eager only:
    a fusing compiler would contract its multiply-adds (``dropped_positions`` is kept out of torch.compile)."""
    bits = u.view(torch.int64)
    e = (bits >> 52) - 1023
    m = ((bits & ((1 << 52) - 1)) | 0x3FF0000000000000).view(torch.float64)  # u = 2^e m, m in [1, 2)
    big = m > _SQRT2
    m = torch.where(big, m * 0.5, m)
    e = e + big
    f = m - 1.0
    s = f / (f + 2.0)
    z = s * s
    c = _LOG_TERMS  # c[k] = 1 / (2k + 1); Estrin's scheme, as the helper
    z2 = z * z
    z4 = z2 * z2
    z8 = z4 * z4
    p01, p23, p45, p67 = z * c[1] + c[0], z * c[3] + c[2], z * c[5] + c[4], z * c[7] + c[6]
    p810 = z2 * c[10] + (z * c[9] + c[8])
    p03, p47 = p23 * z2 + p01, p67 * z2 + p45
    poly = p810 * z8 + (p47 * z4 + p03)
    return e.to(torch.float64) * _LN2 + (s + s) * poly


_CPU_CHUNK = 1 << 13  # draws per pass on the CPU: each temporary (64 KB) stays in cache


def _log_uniforms(key: int, c0: int, n: int, device: torch.device) -> torch.Tensor:
    """log(u_c) for the counters c0 .. c0 + n - 1 of stream ``key``: the helper's draw in PyTorch ops (on the
    CPU in chunks: the three dozen temporaries of one pass over 80K draws took twice as long)."""
    if device.type != "cpu" or n <= _CPU_CHUNK:
        return _log_unit(_uniforms(key, c0, n, device))
    out = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, _CPU_CHUNK):
        size = min(_CPU_CHUNK, n - start)
        out[start:start + size] = _log_unit(_uniforms(key, c0 + start, size, device))
    return out


@torch.compiler.disable
def dropped_positions(seed: int, total: int, p: float, device: torch.device,
                      dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Sorted positions in [0, total) of an i.i.d. Bernoulli(p) dropped set, drawn from ``seed``: int32 when
    ``total`` < 2^31 (the compact form backward keeps), else int64, unless ``dtype`` says.

    Geometric gaps from a counter-based stream (see the module docstring), the same bits on every device and
    path; a first draw covers the expected count plus 6 standard deviations, and in the rare case it falls
    short the stream continues.
    """
    if dtype is None:
        dtype = torch.int32 if total < 2**31 else torch.int64
    key = _stream_key(seed)
    inv_log = 1.0 / math.log1p(-p)
    lib = _cpu.library() if device.type == "cpu" and dtype == torch.int32 else None
    chunks: List[torch.Tensor] = []
    start, counter = 0, 0  # the first position the next chunk may take; the next draw's counter
    while start < total:
        mean = (total - start) * p
        n = max(16, int(mean + _DRAW_MARGIN_SD * math.sqrt(mean) + 16))
        if lib is not None:  # the same draws and sums in C, in parallel
            out, last = torch.empty(n, dtype=torch.int32), ctypes.c_int64()
            made = lib.msplora_draw_positions(key, counter, n, inv_log, start, total, out.data_ptr(),
                                              ctypes.byref(last), torch.get_num_threads())
            if made < 0:
                raise RuntimeError(f"msplora: the CPU helper rejected the draw (total={total}, start={start})")
            chunks.append(out[:made])
            start, counter = last.value + 1, counter + n
            continue
        # the geometric gaps ceil(log u / log(1 - p)) >= 1, clamped at total + 1 (past the end, and exact)
        gaps = _log_uniforms(key, counter, n, device).mul_(inv_log).ceil_().clamp_(max=float(total) + 1.0)
        gaps[:1].add_(start - 1)
        positions = gaps.cumsum_(0)  # integers below 2^53 until past the end: exact
        last = int(positions[-1])
        if last >= total:
            positions = positions[: int(torch.searchsorted(positions, float(total)))]
        chunks.append(positions.to(dtype))
        start, counter = last + 1, counter + n
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def dropout_masks(seed: int, n_branches: int, m: int, k: int, p: float, device: torch.device) -> torch.Tensor:
    """The keep-masks this backend uses for ``seed``: (n_branches, M, K) booleans (for tests)."""
    keep = torch.ones(m * k * n_branches, dtype=torch.bool, device=device)
    if p > 0.0 and keep.numel():
        keep[dropped_positions(seed, keep.numel(), p, device)] = False
    return keep.view(m, k, n_branches).permute(2, 0, 1)


class _Dropped(NamedTuple):
    """The dropped set of one call as the CSR matrix X_E (M, K n): its row pointers, each value's row and column,
    its values, and each value's flat index into x."""

    crow: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    flat: torch.Tensor
    values: torch.Tensor
    n_rows: int
    n_cols: int

    def csr(self, dtype: torch.dtype) -> torch.Tensor:
        return _csr(self.crow, self.col, self.values.to(dtype), (self.n_rows, self.n_cols))


def _sparse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the sparse corrections: fp32 for half types (no half CSR kernels on the CPU)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _floor_div(a: torch.Tensor, divisors: Sequence[int]) -> List[torch.Tensor]:
    """floor(a / d) for each ``d`` in ``divisors``, for non-negative integers ``a``, in a's dtype. For int32
    ``a`` by fp64 arithmetic from one fp64 copy, a third of the time of CPU integer division: with
    a = q d + r, (a + 1/2) / d = q + (r + 1/2) / d lies at least 1/(2d) from both integers q and q + 1, and
    fp64 errs by under 2^-51 q, less than that for a < 2^50."""
    if a.dtype != torch.int32:
        return [torch.div(a, d, rounding_mode="floor") for d in divisors]
    half_up = a.to(torch.float64).add_(0.5)
    return [(half_up * (1.0 / d)).to(torch.int32) for d in divisors]  # truncation = floor (positive)


def _dropped(x: torch.Tensor, n_branches: int, p: float, seed: int,
             positions: Optional[torch.Tensor] = None) -> Tuple[_Dropped, torch.Tensor]:
    """X_E for this call, and its positions as compactly as they fit (int32 below 2^31 elements)."""
    m, k = x.shape
    width = k * n_branches
    total = m * width
    if positions is None:
        positions = dropped_positions(seed, total, p, x.device)
    crow = torch.searchsorted(positions, torch.arange(0, total + 1, width, device=x.device, dtype=positions.dtype),
                              out_int32=positions.dtype == torch.int32)
    flat, row = _floor_div(positions, (n_branches, width))  # (i K + j): the element of x; i: its row
    col = torch.sub(positions, row, alpha=width)  # j n + s
    return _Dropped(crow, row, col, flat, x.reshape(-1).index_select(0, flat), m, width), positions


def _interleaved(a_scaled: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """A_E (K n, R): row j n + s holds A'_s[:, j] in branch s's columns, zeros elsewhere."""
    n, (r_total, k) = len(ranks), a_scaled.shape
    if n == 1:
        return a_scaled.t()
    return (a_scaled.t()[:, None, :] * _owner_mask(tuple(ranks), a_scaled.dtype, a_scaled.device)).reshape(k * n, r_total)


@functools.lru_cache(maxsize=256)
def _owner_mask(ranks: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(n, R): row s is 1 in branch s's columns, 0 elsewhere. Cached and never written to."""
    mask = torch.zeros(len(ranks), sum(ranks), dtype=dtype, device=device)
    start = 0
    for s, r in enumerate(ranks):
        mask[s, start:start + r] = 1
        start += r
    return mask


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    a_cat: torch.Tensor,
    b_cat: torch.Tensor,
    ranks: Sequence[int],
    scalings: Sequence[float],
    p: float,
    seed: int,
    keep_positions: Optional[List[torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, S)``. With ``keep_positions`` (a list), the dropped positions are appended to it, for
    :func:`backward`'s ``positions``: 4 bytes per dropped element (0.6 per element of x for three branches at
    p = 0.05) save the backward drawing them again. ``weight=None`` (and no bias): the low-rank term alone,
    y = S B^T, for layers whose base layer is called separately."""
    coefs = _branch_coefficients(ranks, scalings, p)
    a_scaled = _scaled_rows(a_cat, ranks, coefs)
    s = x @ a_scaled.t()
    if p > 0.0 and x.numel():
        helper = _helper(x, ranks)
        if helper is not None:
            positions = dropped_positions(seed, x.numel() * len(ranks), p, x.device)
            if keep_positions is not None:
                keep_positions.append(positions)
            _helper_forward(helper, positions, x, a_scaled, ranks, s)
            return _expand(x, weight, bias, b_cat, s)
        dropped, positions = _dropped(x, len(ranks), p, seed)
        if keep_positions is not None:
            keep_positions.append(positions)
        work = _sparse_dtype(x.dtype)
        a_e = _interleaved(a_scaled, ranks).to(work)
        if work == s.dtype:
            s.addmm_(dropped.csr(work), a_e, alpha=-1.0)
        else:
            s.sub_((dropped.csr(work) @ a_e).to(s.dtype))
    return _expand(x, weight, bias, b_cat, s)


def _expand(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], b_cat: torch.Tensor,
            s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x W^T + b + S B^T, S)``, or ``(S B^T, S)`` without a weight."""
    if weight is None:
        return s @ b_cat.t(), s
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    y.addmm_(s, b_cat.t())
    return y, s


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    a_cat: torch.Tensor,
    b_cat: torch.Tensor,
    ranks: Sequence[int],
    scalings: Sequence[float],
    p: float,
    seed: int,
    need_dx: bool,
    positions: Optional[torch.Tensor] = None,
) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(dx, dA, dB)``; the masks are drawn again from ``seed`` unless ``positions`` (kept by the forward)
    are given."""
    coefs = _branch_coefficients(ranks, scalings, p)
    a_scaled = _scaled_rows(a_cat, ranks, coefs)
    ds = dy @ b_cat
    db = dy.t() @ s
    dx = None
    if need_dx and weight is None:  # the low-rank term alone (see forward)
        dx = ds @ a_scaled
    elif need_dx:
        dx = dy @ weight
        dx.addmm_(ds, a_scaled)
    dat = ds.t() @ x  # (R, K): dS^T x, before the per-branch coefficients
    if p > 0.0 and x.numel():
        m, k = x.shape
        n = len(ranks)
        helper = _helper(x, ranks)
        if helper is not None:
            if positions is None:
                positions = dropped_positions(seed, m * k * n, p, x.device)
            _helper_backward(helper, positions, x, a_scaled, ranks, ds, dx, dat)
            return dx, _scaled_rows(dat, ranks, coefs), db
        dropped, _ = _dropped(x, n, p, seed, positions)
        work = _sparse_dtype(x.dtype)
        a_e, ds_w = _interleaved(a_scaled, ranks).to(work), ds.to(work)
        if dx is not None:
            sampled = torch.sparse.sampled_addmm(dropped.csr(work), ds_w, a_e.t(), beta=0.0)
            dx.view(-1).index_add_(0, dropped.flat, sampled.values().to(dx.dtype), alpha=-1.0)
        # X_E^T as CSR (K n, M): the positions sorted stably by column, so rows stay ascending within one.
        # Sorting 16-bit keys is about twice as fast as 32-bit ones, 64-bit ones half as fast again.
        key_dtype = torch.int16 if dropped.n_cols < torch.iinfo(torch.int16).max else torch.int32
        col_sorted, order = torch.sort(dropped.col.to(key_dtype), stable=True)
        boundaries = torch.arange(dropped.n_cols + 1, dtype=key_dtype, device=x.device)
        crow_t = torch.searchsorted(col_sorted, boundaries, out_int32=True)
        rows = dropped.row.index_select(0, order).to(torch.int32)
        # (the CSR index dtypes must agree: crow_t and rows are int32, fine below 2^31 dropped elements)
        x_e_t = _csr(crow_t, rows, dropped.values.index_select(0, order).to(work), (dropped.n_cols, m))
        correction = (x_e_t @ ds_w).view(k, n, -1)  # (K, n, R): branch s's block is row s of the middle axis
        if n > 1:
            correction = (correction * _owner_mask(tuple(ranks), work, ds.device)).sum(1, keepdim=True)
        dat.sub_(correction[:, 0].t().to(dat.dtype))
    da = _scaled_rows(dat, ranks, coefs)
    return dx, da, db


# ---- the compiled helper (msplora_kernels/_cpu) ---------------------------------------------------------------

_HELPER_TYPES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}


def _helper(x: torch.Tensor, ranks: Sequence[int]):
    """The compiled corrections' pair of functions for x, or None (then the sparse products below run): CPU
    tensors in fp32, fp64 or bf16, int32 positions (below 2^31 of them), at most 16 branches and rank 4096."""
    name = _HELPER_TYPES.get(x.dtype)
    if (name is None or x.device.type != "cpu" or x.numel() * len(ranks) >= 2**31 or len(ranks) > 16
            or sum(ranks) > 4096):
        return None
    lib = _cpu.library()
    if lib is None:
        return None
    return getattr(lib, f"msplora_forward_{name}"), getattr(lib, f"msplora_backward_{name}")


@functools.lru_cache(maxsize=256)
def _offsets_tensor(ranks: Tuple[int, ...]) -> torch.Tensor:
    """Branch s's columns are offsets[s] .. offsets[s + 1] (int64, CPU; cached, never written to)."""
    return torch.tensor([0, *itertools.accumulate(ranks)], dtype=torch.int64)


def _check_positions(positions: torch.Tensor) -> None:
    if positions.dtype != torch.int32 or not positions.is_contiguous():
        raise ValueError("the CPU helper takes contiguous int32 dropped positions")


def _helper_forward(helper, positions: torch.Tensor, x: torch.Tensor, a_scaled: torch.Tensor,
                    ranks: Sequence[int], s: torch.Tensor) -> None:
    """S -= the dropped elements' part of x A'^T, in place (S: (M, R), contiguous, x's dtype)."""
    _check_positions(positions)
    xc, a = x.contiguous(), a_scaled.contiguous()
    assert s.is_contiguous() and s.dtype == x.dtype == a.dtype
    status = helper[0](positions.data_ptr(), positions.numel(), xc.data_ptr(), x.shape[1], len(ranks),
                       _offsets_tensor(tuple(ranks)).data_ptr(), a.data_ptr(), s.data_ptr(), torch.get_num_threads())
    if status:
        raise RuntimeError(f"msplora CPU helper: forward failed ({'out of memory' if status == 2 else status})")


def _helper_backward(helper, positions: torch.Tensor, x: torch.Tensor, a_scaled: torch.Tensor,
                     ranks: Sequence[int], ds: torch.Tensor, dx: Optional[torch.Tensor], dat: torch.Tensor) -> None:
    """In place: dx -= the dropped elements' part of dS A' (when dx is given), dat (R, K) -= theirs of
    dS^T x. Every tensor in x's dtype."""
    _check_positions(positions)
    xc, a, ds = x.contiguous(), a_scaled.contiguous(), ds.contiguous()
    assert ds.dtype == x.dtype == a.dtype == dat.dtype and dat.is_contiguous()
    assert dx is None or (dx.is_contiguous() and dx.dtype == x.dtype)
    status = helper[1](positions.data_ptr(), positions.numel(), xc.data_ptr(), x.shape[1], len(ranks),
                       _offsets_tensor(tuple(ranks)).data_ptr(), a.data_ptr(), ds.data_ptr(),
                       None if dx is None else dx.data_ptr(), dat.data_ptr(), torch.get_num_threads())
    if status:
        raise RuntimeError(f"msplora CPU helper: backward failed ({'out of memory' if status == 2 else status})")
