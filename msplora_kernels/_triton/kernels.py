"""Triton kernels of the MSPLoRA linear layer (launched by ``msplora_kernels.triton_backend``).

Notation: x (M, K), W (N, K), A = [A_1; ...; A_n] (R, K), B = [B_1 | ... | B_n] (N, R), S (M, R), dy (M, N),
c_s = scaling_s / (1 - p_eff) the coefficient of branch s, passed to the kernels as the scalars c0..c3.
Branch s owns the rank columns ``bounds[s]:bounds[s + 1]`` (``bounds``: an int32 tensor of 5 entries,
the last ones repeated R when there are fewer than 4 branches).

Dropout (n <= 4 branches, each with its own mask):
- One Philox4x32 draw (7 rounds) per pair of elements x[m, 2j], x[m, 2j + 1], at counter
  (m*ceil(K/2) + j as two 32-bit words, 0, 0) under the 32-bit ``seed``, gives four 32-bit words; branch s
  keeps x[m, 2j] when the low 16 bits of word s are >= t = round(p * 2^16) (clamped to 2^16 - 1), and
  x[m, 2j + 1] by the high 16 bits. 16 uniform bits against an integer threshold: each element is dropped
  with probability exactly p_eff = t / 2^16 (|p - p_eff| <= 2^-17), independently per element and branch,
  and the launcher scales kept elements by 1 / (1 - p_eff), so the estimator is exactly unbiased.
- The shrink draws once per training step and writes the packed mask: one byte per pair of elements
  (``mask[m, j]``, M x ceil(K/2) uint8), bit s = keep_s of x[m, 2j], bit 4 + s = keep_s of x[m, 2j + 1].
  The backward kernels (dx epilogue, dA) read it (MASK_SOURCE = 2): RNG work per step is one pass over x,
  and the mask costs 0.5 byte per element of x to write once and read twice. Where the mask is not
  available they draw the same bits again (MASK_SOURCE = 1; see ``triton_backend`` for when).

Cost per element of x on sm_90, three branches (``python -m msplora_kernels._triton.compile_check
--rng-cost``: SASS of micro-kernels isolating the work, triton 3.9): drawing and packing the masks costs
32.0 instructions per element (30.4 on the integer pipes: a 7-round Philox4x32 is ~42 integer instructions
per pair of elements, 28 of them IMAD, plus the counters, the threshold tests of both halves of a word at
once and the packing); reading and unpacking them costs 24.2 (13.4 integer) plus 0.5 byte per element.
The RNG is paid once per step (the shrink), where it used to be paid three times (shrink, dx epilogue, dA)
at 35.5 instructions per element.

Roofline (``python -m benchmarks.roofline``; H200: 989 TFLOP/s bf16, 4.8 TB/s, integer work at 64 lanes per
SM per clock; predictions, no GPU has measured) at M=8192, K=4096, bf16, ranks 8/4/2, p=0.05, as time /
bare cuBLAS (x W^T forward, dy W backward):

    N       path      fwd     fwd+bwd   (fwd+bwd with the masks drawn in all three kernels)
    4096    unfused   1.349   1.317     1.454
    4096    fused     1.252   1.218     1.287
    11008   unfused   1.193   1.169     1.220
    11008   fused     1.096   1.102     1.127

(p = 0: fwd+bwd 1.184 / 1.087 at N=4096, 1.119 / 1.053 at N=11008; before dS and dB shared one sweep over
dy: 1.338 / 1.239 and 1.190 / 1.122 at p=0.05, 1.205 / 1.107 and 1.140 / 1.073 at p=0.) The 1.12x target
is not met at N=4096: the shrink is integer-bound (69 us of RNG against 17 us of memory traffic for x), and
the unfused path's extra passes (y += S B^T, the dx epilogue's read and write of dx) cost another ~60 us
against the bare layer's 556 us. A cheaper draw alone cannot close it (the model with the draw free: fused
1.126 at N=4096; with the mask reads free too: 1.103). What would: the PyTorch backend's complement-sparse
correction on the GPU, the dense kernels then being the p = 0 ones (issue 11 design 1).

Kernels (all accumulate in fp32, fp64 for fp64 inputs, and store in the output's dtype):

    _matmul_lowrank_kernel   C (+)= P Q + bias + low-rank term                        (one write of C)
        forward:  P = x,  Q = W^T,  L = S,  U = B^T, unmasked, unscaled            ->  y
        dx:       P = dy, Q = W,    L = dS, U = A,   sum_s c_s keep_s ⊙ (dS_s A_s)  ->  dx
        plain:    x W^T (``linear``),  y += S B^T (unfused)
    _shrink_kernel           S[:, s] = c_s (keep_s ⊙ x) A_s^T, and the packed mask    (M, R), (M, K/2)
    _lowrank_grad_sb_kernel  dS = dy B and dB's partials dy_j^T S_j, one sweep over dy (M, R), (pieces, N, R)
    _lowrank_grad_a_kernel   G[j, s] = c_s dS_s^T (keep_s ⊙ x) over the rows of slice j (splits, R, K)
    _sum_partials_kernel     dA = sum_j G[j], dB = sum_j G'[j], one launch, fixed order
    _pack_adapters_kernel    A_cat, B_cat from the branches' A_s, B_s, cast           (R, K), (N, R)
    _dropout_mask_kernel     keep[s, m, k]                                            (n, M, K)

Rank padding: the epilogues loop over ranks in steps of ``tuning.rank_step`` (each range padded to a
multiple of 16: R = 112 is seven steps of 16, the masked dx's 64/32/16 is 112 columns, not 3 x 64; 8/4/2
stays 3 x 16, one tensor-core product per branch mask); kernels whose output is the rank (shrink, dS/dB,
dA) use one power-of-two tile, so that they read x or dy once (memory-bound: the padded columns cost
tensor-core time they have to spare, ``benchmarks.roofline``).

Row offsets are 64-bit, so M*K or M*N beyond 2^31 elements are addressed correctly. ``seed`` and the
threshold are never specialised by the launcher (``do_not_specialize``): a seed divisible by 16 must not
compile another variant.
"""
import triton
import triton.language as tl

# Philox4x32 with 7 rounds passes BigCrush (Salmon et al., SC'11); 3 fewer rounds than the default.
_PHILOX_ROUNDS = tl.constexpr(7)
_NO_SPECIALIZE = ["seed", "threshold"]


@triton.jit
def _philox_words(seed, rows, first_col, row_len, HALF_COLS: tl.constexpr):
    """Four random uint32 blocks (len(rows), HALF_COLS) for the column pairs of x from ``first_col`` (even)
    on: entry [i, j] belongs to elements (rows[i], first_col + 2j) and (rows[i], first_col + 2j + 1)."""
    pairs = first_col // 2 + tl.arange(0, HALF_COLS)
    offsets = rows.to(tl.int64)[:, None] * ((row_len + 1) // 2) + pairs.to(tl.int64)[None, :]
    low = offsets.to(tl.uint32)
    high = (offsets >> 32).to(tl.uint32)
    zero = low * 0
    return tl.philox(seed, low, high, zero, zero, _PHILOX_ROUNDS)


@triton.jit
def _drawn_mask(seed, threshold, rows, first_col, row_len, HALF_COLS: tl.constexpr, BRANCHES: tl.constexpr):
    """The packed mask bytes (len(rows), HALF_COLS) as int32: bit s keeps the pair's even element for
    branch s, bit 4 + s its odd element (layout in the module docstring).

    Both 16-bit halves of a word are tested at once (SWAR): with H = 0x80008000, d = (w | H) - (t & ~H)
    per half (no borrow crosses halves) has bit 15 of each half set iff w's low 15 bits >= t's, and
    ((w & ~t) | (~(w ^ t) & d)) & H adds the top bits: bit 15 and 31 say lo >= t and hi >= t.
    """
    w0, w1, w2, w3 = _philox_words(seed, rows, first_col, row_len, HALF_COLS)
    t = threshold.to(tl.uint32)
    t2 = t | (t << 16)
    high = tl.full((1,), 0x80008000, tl.uint32)
    ones = tl.full((1,), 0xFFFFFFFF, tl.uint32)  # x ^ ones, not ~x: triton 3.6's interpreter rejects ~ on uint32
    t2_low, t2_not = t2 & (high ^ ones), t2 ^ ones
    acc = (w0 * 0).to(tl.uint32)
    for branch in tl.static_range(BRANCHES):
        w = w0 if branch == 0 else (w1 if branch == 1 else (w2 if branch == 2 else w3))
        d = (w | high) - t2_low
        ge = ((w & t2_not) | ((w ^ t2_not) & d)) & high
        acc |= ge >> (15 - branch)  # even element's bit at s, odd element's at 16 + s
    return ((acc | (acc >> 12)) & 0xFF).to(tl.int32)


@triton.jit
def _stored_mask(mask_ptr, rows, first_col, M, K, stride_mm, HALF_COLS: tl.constexpr):
    """The packed mask bytes (len(rows), HALF_COLS) as int32, read from the shrink's mask (M, ceil(K/2))."""
    pairs = first_col // 2 + tl.arange(0, HALF_COLS)
    inside = (rows < M)[:, None] & (pairs < (K + 1) // 2)[None, :]
    ptrs = mask_ptr + rows.to(tl.int64)[:, None] * stride_mm + pairs[None, :]
    return tl.load(ptrs, mask=inside, other=0).to(tl.int32)


@triton.jit
def _element_bits(packed):
    """Per-element branch bits (rows, 2 * HALF_COLS) from packed pairs (rows, HALF_COLS)."""
    return tl.interleave(packed & 0xF, packed >> 4)


@triton.jit
def _mask_bits(seed, threshold, mask_ptr, rows, first_col, M, K, stride_mm,
               HALF_COLS: tl.constexpr, BRANCHES: tl.constexpr, MASK_SOURCE: tl.constexpr):
    """Per-element branch bits of x[rows, first_col:first_col + 2 * HALF_COLS]: drawn (MASK_SOURCE 1) or
    read from the stored mask (MASK_SOURCE 2); the same bits either way."""
    if MASK_SOURCE == 1:
        packed = _drawn_mask(seed, threshold, rows, first_col, K, HALF_COLS, BRANCHES)
    else:
        packed = _stored_mask(mask_ptr, rows, first_col, M, K, stride_mm, HALF_COLS)
    return _element_bits(packed)


@triton.jit
def _rank_coefficients(bounds_ptr, rr, c0, c1, c2, c3):
    """c_s of the branch owning each rank index in ``rr``."""
    b1 = tl.load(bounds_ptr + 1)
    b2 = tl.load(bounds_ptr + 2)
    b3 = tl.load(bounds_ptr + 3)
    return tl.where(rr < b1, c0, tl.where(rr < b2, c1, tl.where(rr < b3, c2, c3)))


@triton.jit
def _grouped_tile(pid, rows, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile (pid_m, pid_n) of program ``pid``: GROUP_M row tiles sweep the columns together (L2 reuse)."""
    tiles_m = tl.cdiv(rows, BLOCK_M)
    tiles_n = tl.cdiv(cols, BLOCK_N)
    group_width = GROUP_M * tiles_n
    first_m = (pid // group_width) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_width) % group_rows
    pid_n = (pid % group_width) // group_rows
    return pid_m, pid_n


@triton.jit
def _accumulate_low_rank(
    acc, l_ptr, u_ptr, bounds_ptr, rm, rn, M, N, r_lo, r_hi, c0, c1, c2, c3,
    stride_lm, stride_lr, stride_ur, stride_un,
    BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr, SCALE_L: tl.constexpr,
):
    """acc + L[rm, r_lo:r_hi] U[r_lo:r_hi, rn], the rank range walked in BLOCK_R steps; SCALE_L: L's
    columns times their branch's c_s first (rounded to L's dtype, as a scaled copy of L would be).

    Not software-pipelined (num_stages=1): a few steps at most, and its buffers would add to the main
    loop's shared memory.
    """
    for r0 in tl.range(r_lo, r_hi, BLOCK_R, num_stages=1):
        rr = r0 + tl.arange(0, BLOCK_R)
        in_rank = rr < r_hi
        l_tile = tl.load(
            l_ptr + rm[:, None] * stride_lm + rr[None, :] * stride_lr,
            mask=(rm < M)[:, None] & in_rank[None, :], other=0.0,
        )
        if SCALE_L:
            coef = _rank_coefficients(bounds_ptr, rr, c0, c1, c2, c3)
            l_tile = (l_tile.to(acc.dtype) * coef[None, :]).to(l_tile.dtype)
        u_tile = tl.load(
            u_ptr + rr[:, None] * stride_ur + rn[None, :] * stride_un,
            mask=in_rank[:, None] & (rn < N)[None, :], other=0.0,
        )
        acc = tl.dot(l_tile, u_tile, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _matmul_lowrank_kernel(
    p_ptr, q_ptr, c_ptr, bias_ptr, l_ptr, u_ptr, bounds_ptr, mask_ptr,
    M, N, K, R, seed, threshold, c0, c1, c2, c3,
    stride_pm, stride_pk, stride_qk, stride_qn, stride_cs, stride_cm, stride_cn,
    stride_lm, stride_lr, stride_ur, stride_un, stride_mm,
    HAS_BIAS: tl.constexpr, HAS_LOW_RANK: tl.constexpr, SCALE_LOW_RANK: tl.constexpr,
    MASKED_BRANCHES: tl.constexpr, MASK_SOURCE: tl.constexpr,
    ACCUMULATE: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """C[split] (+)= P[:, slice] Q[slice, :] (+ bias + low-rank term when SPLIT_K == 1).

    MASKED_BRANCHES == 0: the low-rank term is L U over all R columns (SCALE_LOW_RANK: L's columns times
    c_s); otherwise it is sum_s c_s keep_s ⊙ (L_s U_s) over that many branches, keep_s at C's element (m, n)
    of an (M, N) x-shaped matrix, drawn (MASK_SOURCE 1) or read from ``mask_ptr`` (MASK_SOURCE 2).
    With SPLIT_K > 1, program axis 1 picks a slice of the reduction and writes C + slice * stride_cs.
    """
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)

    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = tl.program_id(1) * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    # Rows and columns past the edge are read at a wrapped index (their results are never stored), so the
    # loads need no mask along M or N: such masks keep Triton from pipelining the loop.
    p_ptrs = p_ptr + (rm % M)[:, None] * stride_pm + (k_start + rk).to(tl.int64)[None, :] * stride_pk
    q_ptrs = q_ptr + (k_start + rk).to(tl.int64)[:, None] * stride_qk + (rn % N)[None, :] * stride_qn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(k_start, k_end, BLOCK_K):
        p_tile = tl.load(p_ptrs, mask=rk[None, :] < k_end - k0, other=0.0)
        q_tile = tl.load(q_ptrs, mask=rk[:, None] < k_end - k0, other=0.0)
        acc = tl.dot(p_tile, q_tile, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        p_ptrs += BLOCK_K * stride_pk
        q_ptrs += BLOCK_K * stride_qk

    if HAS_LOW_RANK:
        if MASKED_BRANCHES == 0:
            acc = _accumulate_low_rank(
                acc, l_ptr, u_ptr, bounds_ptr, rm, rn, M, N, 0, R, c0, c1, c2, c3,
                stride_lm, stride_lr, stride_ur, stride_un, BLOCK_R, DOT_PRECISION, SCALE_LOW_RANK,
            )
        else:
            bits = _mask_bits(seed, threshold, mask_ptr, rm, pid_n * BLOCK_N, M, N, stride_mm,
                              BLOCK_N // 2, MASKED_BRANCHES, MASK_SOURCE)
            for branch in tl.static_range(MASKED_BRANCHES):
                coef = c0 if branch == 0 else (c1 if branch == 1 else (c2 if branch == 2 else c3))
                part = _accumulate_low_rank(
                    tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE), l_ptr, u_ptr, bounds_ptr, rm, rn, M, N,
                    tl.load(bounds_ptr + branch), tl.load(bounds_ptr + branch + 1), c0, c1, c2, c3,
                    stride_lm, stride_lr, stride_ur, stride_un, BLOCK_R, DOT_PRECISION, False,
                )
                acc += tl.where(((bits >> branch) & 1) != 0, part * coef, 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(ACC_DTYPE)[None, :]

    c_ptrs = c_ptr + tl.program_id(1).to(tl.int64) * stride_cs + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    in_c = (rm < M)[:, None] & (rn < N)[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=in_c, other=0.0).to(ACC_DTYPE)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=in_c)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _shrink_kernel(
    x_ptr, a_ptr, s_ptr, bounds_ptr, mask_ptr,
    M, K, R, seed, threshold, c0, c1, c2, c3,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr, stride_mm,
    MASKED_BRANCHES: tl.constexpr, WRITE_MASK: tl.constexpr, RANK_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """S[rows, r-tile] = c_s sum_s (keep_s ⊙ x[rows]) A[r-tile ∩ branch s]^T  (no masks: c_s x[rows] A^T).

    Program ``pid`` = row tile * RANK_TILES + rank tile. x's tile is loaded and its Philox words drawn
    once per step for every branch; each branch adds one product with the other branches' A rows zeroed.
    WRITE_MASK: the programs of rank tile 0 also store the packed mask bytes of their rows.
    """
    pid_m = tl.program_id(0) // RANK_TILES
    rank_tile = tl.program_id(0) % RANK_TILES
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = rank_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    # Out-of-range rows of x and A are read at a safe index and their results dropped at the store: only
    # the reduction (K) needs a load mask, which keeps the loop pipelined.
    x_ptrs = x_ptr + (rm % M)[:, None] * stride_xm + rk.to(tl.int64)[None, :] * stride_xk
    a_ptrs = a_ptr + (rr % R)[None, :] * stride_ar + rk[:, None] * stride_ak

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        x_tile = tl.load(x_ptrs, mask=rk[None, :] < K - k0, other=0.0)
        a_tile = tl.load(a_ptrs, mask=rk[:, None] < K - k0, other=0.0)
        if MASKED_BRANCHES == 0:
            acc = tl.dot(x_tile, a_tile, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        else:
            packed = _drawn_mask(seed, threshold, rm, k0, K, BLOCK_K // 2, MASKED_BRANCHES)
            if WRITE_MASK:
                pairs = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                rows_written = tl.where(rank_tile == 0, M, 0)  # one rank tile writes the mask
                tl.store(
                    mask_ptr + rm[:, None] * stride_mm + pairs[None, :], packed.to(tl.uint8),
                    mask=(rm < rows_written)[:, None] & (pairs < (K + 1) // 2)[None, :],
                )
            bits = _element_bits(packed)
            for branch in tl.static_range(MASKED_BRANCHES):
                in_branch = (rr >= tl.load(bounds_ptr + branch)) & (rr < tl.load(bounds_ptr + branch + 1))
                acc = tl.dot(
                    tl.where(((bits >> branch) & 1) != 0, x_tile, 0.0),
                    tl.where(in_branch[None, :], a_tile, 0.0),
                    acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE,
                )
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    acc *= _rank_coefficients(bounds_ptr, rr, c0, c1, c2, c3)[None, :]
    tl.store(
        s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
        acc.to(s_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rr < R)[None, :],
    )


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _lowrank_grad_a_kernel(
    ds_ptr, x_ptr, g_ptr, bounds_ptr, mask_ptr,
    M, K, R, seed, threshold, c0, c1, c2, c3,
    stride_dsm, stride_dsr, stride_xm, stride_xk, stride_gs, stride_gr, stride_gk, stride_mm,
    MASKED_BRANCHES: tl.constexpr, MASK_SOURCE: tl.constexpr, SPLIT_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """G[slice, r-tile, cols] = c_s sum_s dS[rows, r-tile ∩ branch s]^T (keep_s ⊙ x[rows, cols]), rows of
    the slice; stored in G's dtype (the final dA when SPLIT_M == 1).

    Axis 0: rank tile (adjacent programs share x's tile); axis 1: column tile of x; axis 2: slice of rows.
    """
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = tl.arange(0, BLOCK_M)

    m_per_split = tl.cdiv(tl.cdiv(M, SPLIT_M), BLOCK_M) * BLOCK_M
    m_start = tl.program_id(2) * m_per_split
    m_end = tl.minimum(M, m_start + m_per_split)
    # As in the shrink: only the reduction (rows of x) is masked in the loads, to keep the loop pipelined.
    ds_ptrs = ds_ptr + (rr % R)[:, None] * stride_dsr + (m_start + rows).to(tl.int64)[None, :] * stride_dsm
    x_ptrs = x_ptr + (m_start + rows).to(tl.int64)[:, None] * stride_xm + (rk % K)[None, :] * stride_xk
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=ACC_DTYPE)
    for m0 in range(m_start, m_end, BLOCK_M):
        ds_tile = tl.load(ds_ptrs, mask=rows[None, :] < m_end - m0, other=0.0)
        x_tile = tl.load(x_ptrs, mask=rows[:, None] < m_end - m0, other=0.0)
        if MASKED_BRANCHES == 0:
            acc = tl.dot(ds_tile, x_tile, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        else:
            bits = _mask_bits(seed, threshold, mask_ptr, m0 + rows, tl.program_id(1) * BLOCK_K, M, K, stride_mm,
                              BLOCK_K // 2, MASKED_BRANCHES, MASK_SOURCE)
            for branch in tl.static_range(MASKED_BRANCHES):
                in_branch = (rr >= tl.load(bounds_ptr + branch)) & (rr < tl.load(bounds_ptr + branch + 1))
                acc = tl.dot(
                    tl.where(in_branch[:, None], ds_tile, 0.0),
                    tl.where(((bits >> branch) & 1) != 0, x_tile, 0.0),
                    acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE,
                )
        ds_ptrs += BLOCK_M * stride_dsm
        x_ptrs += BLOCK_M * stride_xm
    acc *= _rank_coefficients(bounds_ptr, rr, c0, c1, c2, c3)[:, None]
    tl.store(
        g_ptr + tl.program_id(2) * stride_gs + rr[:, None] * stride_gr + rk[None, :] * stride_gk,
        acc.to(g_ptr.dtype.element_ty), mask=(rr < R)[:, None] & (rk < K)[None, :],
    )


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _dropout_mask_kernel(
    keep_ptr, M, K, seed, threshold,
    BRANCHES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """keep[branch, rows, cols] as int8 for every branch, exactly as the shrink draws them."""
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    bits = _element_bits(_drawn_mask(seed, threshold, rm, tl.program_id(1) * BLOCK_K, K, BLOCK_K // 2, BRANCHES))
    inside = (rm < M)[:, None] & (rk < K)[None, :]
    for branch in tl.static_range(BRANCHES):
        offsets = branch * M * K + rm[:, None] * K + rk[None, :]
        tl.store(keep_ptr + offsets, ((bits >> branch) & 1).to(tl.int8), mask=inside)


@triton.jit
def _gather_rows(ptr, rows, cols, first, last, stride_r, stride_c, inside):
    """Entries (rows - first, cols) of one branch's matrix where ``first <= rows < last``, else 0."""
    mine = inside & (rows >= first) & (rows < last)
    return tl.load(ptr + (rows - first).to(tl.int64) * stride_r + cols.to(tl.int64) * stride_c, mask=mine, other=0.0)


@triton.jit
def _pack_adapters_kernel(
    a0_ptr, a1_ptr, a2_ptr, a3_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr, a_out_ptr, b_out_ptr,
    K, N, R, r1, r2, r3,
    s_a0r, s_a0k, s_a1r, s_a1k, s_a2r, s_a2k, s_a3r, s_a3k,
    s_b0n, s_b0r, s_b1n, s_b1r, s_b2n, s_b2r, s_b3n, s_b3r,
    BRANCHES: tl.constexpr, BLOCK: tl.constexpr,
):
    """A_cat = [A_0; ...; A_n] (R, K) and B_cat = [B_0 | ... | B_n] (N, R), both contiguous, in the outputs'
    dtype, in one launch (branch s owns rank columns r_s..r_{s+1}; r0 = 0, r4 = R). Program i copies
    elements i*BLOCK.. of A_cat and the same of B_cat (flat, row-major). Flat indices are 32-bit (adapters
    have far fewer than 2^31 elements; a 64-bit division would need a stack frame), addresses 64-bit."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_a = offsets < R * K
    a_rows, a_cols = offsets // K, offsets % K
    a = _gather_rows(a0_ptr, a_rows, a_cols, 0, r1, s_a0r, s_a0k, in_a)
    b_rows, b_cols = offsets % R, offsets // R  # B_s^T's rows are B's rank columns
    in_b = offsets < N * R
    b = _gather_rows(b0_ptr, b_rows, b_cols, 0, r1, s_b0r, s_b0n, in_b)
    if BRANCHES > 1:
        a += _gather_rows(a1_ptr, a_rows, a_cols, r1, r2, s_a1r, s_a1k, in_a)
        b += _gather_rows(b1_ptr, b_rows, b_cols, r1, r2, s_b1r, s_b1n, in_b)
    if BRANCHES > 2:
        a += _gather_rows(a2_ptr, a_rows, a_cols, r2, r3, s_a2r, s_a2k, in_a)
        b += _gather_rows(b2_ptr, b_rows, b_cols, r2, r3, s_b2r, s_b2n, in_b)
    if BRANCHES > 3:
        a += _gather_rows(a3_ptr, a_rows, a_cols, r3, R, s_a3r, s_a3k, in_a)
        b += _gather_rows(b3_ptr, b_rows, b_cols, r3, R, s_b3r, s_b3n, in_b)
    tl.store(a_out_ptr + offsets, a.to(a_out_ptr.dtype.element_ty), mask=in_a)
    tl.store(b_out_ptr + offsets, b.to(b_out_ptr.dtype.element_ty), mask=in_b)


@triton.jit
def _g_offsets(bounds_ptr, rr, rn, N, stride_gn, stride_gr, BLOCKED_G: tl.constexpr):
    """Offsets of dB[rn, rr] in one partial: (N, R) with strides, or BLOCKED_G: branch s's columns stored as
    their own contiguous (N, r_s) matrix from N * bounds[s] on (each branch's gradient a contiguous view)."""
    if BLOCKED_G:
        b1 = tl.load(bounds_ptr + 1)
        b2 = tl.load(bounds_ptr + 2)
        b3 = tl.load(bounds_ptr + 3)
        b4 = tl.load(bounds_ptr + 4)
        first = tl.where(rr < b1, 0, tl.where(rr < b2, b1, tl.where(rr < b3, b2, b3))).to(tl.int64)
        last = tl.where(rr < b1, b1, tl.where(rr < b2, b2, tl.where(rr < b3, b3, b4))).to(tl.int64)
        return rn.to(tl.int64)[:, None] * (last - first)[None, :] + (first * N + rr - first)[None, :]
    return rn.to(tl.int64)[:, None] * stride_gn + rr[None, :] * stride_gr


@triton.jit
def _grad_s_rows(dy_ptr, b_ptr, s_ptr, ds_ptr, g_ptr, bounds_ptr, tile, rr, M, N, R,
                 stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, stride_dsm, stride_dsr,
                 stride_gs, stride_gn, stride_gr, BLOCKED_G: tl.constexpr,
                 ONE_PASS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """dS[rows of ``tile``, rr] = dy B, sweeping all N; ONE_PASS: also G[tile] = dy[rows]^T S[rows]."""
    in_rank = rr < R
    rm = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    if ONE_PASS:  # rows past M are zero here, so the wrapped rows of dy below add nothing to dB
        s_tile = tl.load(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
                         mask=(rm < M)[:, None] & in_rank[None, :], other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    # dy is read at wrapped indices past its edges (no load mask: the loop stays pipelined): B's rows past
    # N are zero, so they add nothing to dS, and dS rows past M and dB rows past N are never stored.
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + rn
        dy_tile = tl.load(dy_ptr + (rm % M)[:, None] * stride_dym + (cols % N).to(tl.int64)[None, :] * stride_dyn)
        b_tile = tl.load(b_ptr + cols.to(tl.int64)[:, None] * stride_bn + rr[None, :] * stride_br,
                         mask=(cols < N)[:, None] & in_rank[None, :], other=0.0)
        acc = tl.dot(dy_tile, b_tile, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if ONE_PASS:
            part = tl.dot(tl.trans(dy_tile), s_tile, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            tl.store(g_ptr + tile.to(tl.int64) * stride_gs
                     + _g_offsets(bounds_ptr, rr, cols, N, stride_gn, stride_gr, BLOCKED_G),
                     part.to(g_ptr.dtype.element_ty), mask=(cols < N)[:, None] & in_rank[None, :])
    tl.store(ds_ptr + rm[:, None] * stride_dsm + rr[None, :] * stride_dsr, acc.to(ds_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & in_rank[None, :])


@triton.jit
def _grad_b_slice(dy_ptr, s_ptr, g_ptr, bounds_ptr, q, rr, M, N, R, rows_per_slice,
                  stride_dym, stride_dyn, stride_sm, stride_sr, stride_gs, stride_gn, stride_gr,
                  BLOCKED_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """G[slice, n-tile, rr] = dy[rows of the slice, n-tile]^T S[rows of the slice, rr]
    (q = slice * n_tiles + n-tile)."""
    in_rank = rr < R
    n_tiles = tl.cdiv(N, BLOCK_N)
    piece = q // n_tiles
    rn = (q % n_tiles).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    m_start = piece * rows_per_slice
    m_end = tl.minimum(M, m_start + rows_per_slice)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=ACC_DTYPE)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = (m0 + rows).to(tl.int64)
        inside = rm < m_end
        dy_tile = tl.load(dy_ptr + rm[:, None] * stride_dym + (rn % N)[None, :] * stride_dyn,
                          mask=inside[:, None], other=0.0)
        s_tile = tl.load(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
                         mask=inside[:, None] & in_rank[None, :], other=0.0)
        acc = tl.dot(tl.trans(dy_tile), s_tile, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    tl.store(g_ptr + piece.to(tl.int64) * stride_gs
             + _g_offsets(bounds_ptr, rr, rn, N, stride_gn, stride_gr, BLOCKED_G),
             acc.to(g_ptr.dtype.element_ty), mask=(rn < N)[:, None] & in_rank[None, :])


@triton.jit(do_not_specialize=["rows_per_slice"])
def _lowrank_grad_sb_kernel(
    dy_ptr, b_ptr, s_ptr, ds_ptr, g_ptr, bounds_ptr,
    M, N, R, ds_programs, rows_per_slice,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, stride_dsm, stride_dsr,
    stride_gs, stride_gn, stride_gr,
    BLOCKED_G: tl.constexpr, ONE_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """dS = dy B (M, R) and dB = dy^T S as partial sums G[j] (N, R) in one launch; axis 1: the rank tile
    (R_t = BLOCK_R x rank tiles columns computed, R of them stored).

    ONE_PASS: program i owns rows i*BLOCK_M.. and sweeps all of N once; per BLOCK_N step it adds
    dy_tile B_tile to its dS tile and stores dy_tile^T S_tile as G[i] (the launcher sums the G[i] with
    ``torch.sum``: deterministic, no atomics). dy is read once. FLOPs: 2 M N R_t each for dS and dB;
    HBM bytes (16-bit dy, S, dS): 2 M N (dy) + 2 M R (S) + 2 M R (dS) + 2 N R per row tile (B, mostly
    from L2) + 8 N R x M / BLOCK_M (fp32 partials written, then read by the sum).
    Otherwise (wide ranks, where those partials would cost more than reading dy twice) programs below
    ``ds_programs`` compute dS row tiles and the others dB over slices of ``rows_per_slice`` rows (program
    ds_programs + slice * n_tiles + n_tile): still one launch; bytes 4 M N + 6 M R + 8 N R x slices.
    BLOCKED_G: G[j] holds each branch's dB_s as a contiguous (N, r_s) block (``_g_offsets``).
    """
    pid = tl.program_id(0)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    if ONE_PASS:
        _grad_s_rows(dy_ptr, b_ptr, s_ptr, ds_ptr, g_ptr, bounds_ptr, pid, rr, M, N, R,
                     stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, stride_dsm, stride_dsr,
                     stride_gs, stride_gn, stride_gr, BLOCKED_G, True, BLOCK_M, BLOCK_N, BLOCK_R,
                     DOT_PRECISION, ACC_DTYPE)
    else:
        if pid < ds_programs:
            _grad_s_rows(dy_ptr, b_ptr, s_ptr, ds_ptr, g_ptr, bounds_ptr, pid, rr, M, N, R,
                         stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, stride_dsm,
                         stride_dsr, stride_gs, stride_gn, stride_gr, BLOCKED_G, False, BLOCK_M, BLOCK_N, BLOCK_R,
                         DOT_PRECISION, ACC_DTYPE)
        else:
            _grad_b_slice(dy_ptr, s_ptr, g_ptr, bounds_ptr, pid - ds_programs, rr, M, N, R, rows_per_slice,
                          stride_dym, stride_dyn, stride_sm, stride_sr, stride_gs, stride_gn, stride_gr,
                          BLOCKED_G, BLOCK_M, BLOCK_N, BLOCK_R, DOT_PRECISION, ACC_DTYPE)


@triton.jit
def _sum_slices(p_ptr, out_ptr, tile, numel, pieces, BLOCK: tl.constexpr):
    offsets = tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    ptrs = p_ptr + offsets
    acc = tl.load(ptrs, mask=inside, other=0.0)
    for _ in range(1, pieces):
        ptrs += numel  # 64-bit pointers: pieces x numel may pass 2^31
        acc += tl.load(ptrs, mask=inside, other=0.0)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _sum_partials_kernel(pa_ptr, a_out_ptr, a_numel, a_pieces, pb_ptr, b_out_ptr, b_numel, b_pieces,
                         BLOCK: tl.constexpr):
    """out[e] = sum over j = 0, 1, ... of partial[j, e] (contiguous (pieces, numel) partial sums, added in
    that order in their dtype: deterministic), stored in out's dtype, for two reductions in one launch
    (dA's and dB's): programs below cdiv(a_numel, BLOCK) sum A's, the others B's. Memory-bound:
    bytes = pieces x numel x 4 read + numel x 2 written, per reduction."""
    pid = tl.program_id(0)
    a_programs = tl.cdiv(a_numel, BLOCK)
    if pid < a_programs:
        _sum_slices(pa_ptr, a_out_ptr, pid, a_numel, a_pieces, BLOCK)
    else:
        _sum_slices(pb_ptr, b_out_ptr, pid - a_programs, b_numel, b_pieces, BLOCK)
