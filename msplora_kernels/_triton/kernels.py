"""Triton kernels of the MSPLoRA linear layer (launched by ``msplora_kernels.triton_backend``).

Notation: x (M, K), W (N, K), A = [A_1; ...; A_n] (R, K) with each branch's rows already multiplied by its
coefficient c_s = scaling_s / (1 - p) on the host, B = [B_1 | ... | B_n] (N, R), S (M, R), dy (M, N).
Branch s owns the rank columns ``bounds[s]:bounds[s + 1]`` (``bounds`` is an int32 tensor of n + 1 entries).

Dropout: one Philox4x32 draw per pair of elements x[m, 2j], x[m, 2j + 1], at counter (m*ceil(K/2) + j as two
32-bit words, 0, 0) under the 32-bit ``seed``, gives four 32-bit words; branch s (n <= 4) keeps x[m, 2j]
when the low 16 bits of word s are >= round(p * 2^16), and x[m, 2j + 1] by the high 16 bits. So every
kernel that touches an element draws once for all branches, and one draw serves two elements. Masks live
in registers only (``_dropout_mask_kernel`` writes them out, for tests).

Kernels (all accumulate in fp32, fp64 for fp64 inputs, and store in the output's dtype):

    _matmul_lowrank_kernel   C (+)= P Q + bias + sum_s keep_s ⊙ (L_s U_s)        (one write of C)
        forward:  P = x,  Q = W^T,  L = S,  U = B^T,  unmasked                    ->  y
        dx:       P = dy, Q = W,    L = dS, U = A,    masked per branch           ->  dx
        plain:    dS = dy B,  dB = dy^T S (split over M),  x W^T (``linear``),  y += S B^T (unfused)
    _shrink_kernel           S[:, s] = (keep_s ⊙ x) A_s^T                          (M, R)
    _lowrank_grad_a_kernel   G[j, s] = dS_s^T (keep_s ⊙ x) over the rows of slice j   (splits, R, K)
                             (the launcher sums the slices and multiplies by c_s: dA_s = c_s dS_s^T D_s(x))
    _dropout_mask_kernel     keep[s, m, k]                                        (n, M, K)

Row offsets are 64-bit, so M*K or M*N beyond 2^31 elements are addressed correctly.
"""
import triton
import triton.language as tl

# Philox4x32 with 7 rounds passes BigCrush (Salmon et al., SC'11); 3 fewer rounds than the default.
_PHILOX_ROUNDS = tl.constexpr(7)


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
def _keeps(w0, w1, w2, w3, branch, threshold):
    """Branch ``branch``'s keep-mask (len(rows), 2 * HALF_COLS) from the four words of ``_philox_words``."""
    bits = tl.where(branch == 0, w0, tl.where(branch == 1, w1, tl.where(branch == 2, w2, w3)))
    even = (bits & 0xFFFF).to(tl.int32)
    odd = (bits >> 16).to(tl.int32)
    return tl.interleave(even, odd) >= threshold


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
    acc, l_ptr, u_ptr, rm, rn, M, N, r_lo, r_hi,
    stride_lm, stride_lr, stride_ur, stride_un,
    BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """acc + L[rm, r_lo:r_hi] U[r_lo:r_hi, rn], the rank range walked in BLOCK_R steps.

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
        u_tile = tl.load(
            u_ptr + rr[:, None] * stride_ur + rn[None, :] * stride_un,
            mask=in_rank[:, None] & (rn < N)[None, :], other=0.0,
        )
        acc = tl.dot(l_tile, u_tile, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit
def _matmul_lowrank_kernel(
    p_ptr, q_ptr, c_ptr, bias_ptr, l_ptr, u_ptr, bounds_ptr,
    M, N, K, R, seed, threshold,
    stride_pm, stride_pk, stride_qk, stride_qn, stride_cs, stride_cm, stride_cn,
    stride_lm, stride_lr, stride_ur, stride_un,
    HAS_BIAS: tl.constexpr, HAS_LOW_RANK: tl.constexpr, MASKED_BRANCHES: tl.constexpr,
    ACCUMULATE: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """C[split] (+)= P[:, slice] Q[slice, :] (+ bias + low-rank term when SPLIT_K == 1).

    MASKED_BRANCHES == 0: the low-rank term is L U over all R columns; otherwise it is the sum over that
    many branches of keep_s ⊙ (L_s U_s), keep_s drawn at C's element (m, n) of an (M, N) x-shaped matrix.
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
                acc, l_ptr, u_ptr, rm, rn, M, N, 0, R,
                stride_lm, stride_lr, stride_ur, stride_un, BLOCK_R, DOT_PRECISION,
            )
        else:
            w0, w1, w2, w3 = _philox_words(seed, rm, pid_n * BLOCK_N, N, BLOCK_N // 2)
            for branch in tl.static_range(MASKED_BRANCHES):
                r_lo = tl.load(bounds_ptr + branch)
                r_hi = tl.load(bounds_ptr + branch + 1)
                part = _accumulate_low_rank(
                    tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE), l_ptr, u_ptr, rm, rn, M, N, r_lo, r_hi,
                    stride_lm, stride_lr, stride_ur, stride_un, BLOCK_R, DOT_PRECISION,
                )
                acc += tl.where(_keeps(w0, w1, w2, w3, branch, threshold), part, 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(ACC_DTYPE)[None, :]

    c_ptrs = c_ptr + tl.program_id(1).to(tl.int64) * stride_cs + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    in_c = (rm < M)[:, None] & (rn < N)[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=in_c, other=0.0).to(ACC_DTYPE)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=in_c)


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, s_ptr, bounds_ptr,
    M, K, R, seed, threshold,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    MASKED_BRANCHES: tl.constexpr, RANK_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """S[rows, r-tile] = sum_s (keep_s ⊙ x[rows]) A[r-tile ∩ branch s]^T  (no masks: x[rows] A[r-tile]^T).

    Program ``pid`` = row tile * RANK_TILES + rank tile. x's tile is loaded and its Philox words drawn
    once per step for every branch; each branch adds one product with the other branches' A rows zeroed.
    """
    pid_m = tl.program_id(0) // RANK_TILES
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = (tl.program_id(0) % RANK_TILES) * BLOCK_R + tl.arange(0, BLOCK_R)
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
            w0, w1, w2, w3 = _philox_words(seed, rm, k0, K, BLOCK_K // 2)
            for branch in tl.static_range(MASKED_BRANCHES):
                in_branch = (rr >= tl.load(bounds_ptr + branch)) & (rr < tl.load(bounds_ptr + branch + 1))
                acc = tl.dot(
                    tl.where(_keeps(w0, w1, w2, w3, branch, threshold), x_tile, 0.0),
                    tl.where(in_branch[None, :], a_tile, 0.0),
                    acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE,
                )
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    tl.store(
        s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
        acc.to(s_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rr < R)[None, :],
    )


@triton.jit
def _lowrank_grad_a_kernel(
    ds_ptr, x_ptr, g_ptr, bounds_ptr,
    M, K, R, seed, threshold,
    stride_dsm, stride_dsr, stride_xm, stride_xk, stride_gs, stride_gr, stride_gk,
    MASKED_BRANCHES: tl.constexpr, SPLIT_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """G[slice, r-tile, cols] = sum_s dS[rows, r-tile ∩ branch s]^T (keep_s ⊙ x[rows, cols]), rows of the slice.

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
            w0, w1, w2, w3 = _philox_words(seed, m0 + rows, tl.program_id(1) * BLOCK_K, K, BLOCK_K // 2)
            for branch in tl.static_range(MASKED_BRANCHES):
                in_branch = (rr >= tl.load(bounds_ptr + branch)) & (rr < tl.load(bounds_ptr + branch + 1))
                acc = tl.dot(
                    tl.where(in_branch[:, None], ds_tile, 0.0),
                    tl.where(_keeps(w0, w1, w2, w3, branch, threshold), x_tile, 0.0),
                    acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE,
                )
        ds_ptrs += BLOCK_M * stride_dsm
        x_ptrs += BLOCK_M * stride_xm
    tl.store(
        g_ptr + tl.program_id(2) * stride_gs + rr[:, None] * stride_gr + rk[None, :] * stride_gk,
        acc, mask=(rr < R)[:, None] & (rk < K)[None, :],
    )


@triton.jit
def _dropout_mask_kernel(
    keep_ptr, M, K, seed, threshold,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """keep[branch, rows, cols] as int8, exactly as the other kernels draw it; axis 2 = branch."""
    branch = tl.program_id(2)
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    w0, w1, w2, w3 = _philox_words(seed, rm, tl.program_id(1) * BLOCK_K, K, BLOCK_K // 2)
    keep = _keeps(w0, w1, w2, w3, branch, threshold)
    offsets = branch.to(tl.int64) * M * K + rm[:, None] * K + rk[None, :]
    tl.store(keep_ptr + offsets, keep.to(tl.int8), mask=(rm < M)[:, None] & (rk < K)[None, :])
