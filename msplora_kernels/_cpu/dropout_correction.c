/* The complement-sparse dropout corrections of the PyTorch backend (torch_backend's docstring has the maths),
 * one pass over the dropped positions each, for CPU tensors; and the draw of those positions (at the end).
 *
 * A dropped position f = (i K + j) n + s (sorted ascending) names element (i, j) of x in branch s, and
 * f - i K n = j n + s is its row of A_E, the (K n, P) matrix whose row j n + s holds A'_s[:, j] in branch s's
 * columns off[s] .. off[s + 1] and zeros elsewhere (A' (R, K) = the coefficient-scaled A; P = R padded to a
 * multiple of 4 with zero columns), built here in the work type W (double for double x, else float). Every
 * position then runs the same P-long loop (no branch on s: a data-dependent trip count mispredicts about once
 * per position), with P a compile-time constant for P <= 16, in vectors of four (the accumulators and the
 * row of dS stay in registers; a runtime bound or scalar lanes kept them in memory, 2x slower):
 *
 *   forward:   S[i, t]        -= x[i, j] A_E[j n + s, t]                t < R
 *   backward:  dx[i, j]       -= sum_t dS[i, t] A_E[j n + s, t]         (when dx is given)
 *              G[j n + s, t]  += x[i, j] dS[i, t]                       all t < P; G (K n, P) in W
 *              dat[t, j]      -= G[j n + b(t), t]                       dat (R, K) = dS^T x, corrected in place;
 *                                                                       b(t) is the branch owning column t
 *
 * Rows are visited in order (the positions are sorted), so each row of S is corrected once from a W
 * accumulator, and each (i, j) of dx once for all its branches. Index arithmetic: e = i K + j = floor(f / n)
 * by the fp64 rule of torch_backend._floor_div (exact below 2^50; f < 2^31 here), i by walking the sorted rows.
 * Element types: f32 (W = float), f64 (W = double), bf16 (W = float, round to nearest even on store); x, A', S,
 * dS, dx and dat all have the element type. Return values: 0 done, 1 bad arguments, 2 out of memory (nothing
 * written in either case).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_RANK 4096

static inline float ld_f32(const void *p, int64_t k) { return ((const float *)p)[k]; }
static inline void st_f32(void *p, int64_t k, float v) { ((float *)p)[k] = v; }
static inline double ld_f64(const void *p, int64_t k) { return ((const double *)p)[k]; }
static inline void st_f64(void *p, int64_t k, double v) { ((double *)p)[k] = v; }
static inline float ld_bf16(const void *p, int64_t k) {
    uint32_t bits = (uint32_t)((const uint16_t *)p)[k] << 16;
    float v;
    memcpy(&v, &bits, 4);
    return v;
}
static inline void st_bf16(void *p, int64_t k, float v) {
    uint32_t bits;
    memcpy(&bits, &v, 4);
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu)) {
        bits |= 0x00400000u; /* NaN stays NaN (quiet) */
    } else {
        bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest, ties to even */
    }
    ((uint16_t *)p)[k] = (uint16_t)(bits >> 16);
}

/* Four W in one vector (GCC/Clang vector extensions: SSE2 registers on x86-64, NEON on arm64; the compiler
 * splits wider ones), loaded and stored by memcpy (no alignment assumed). The vector arithmetic is the same
 * per-element arithmetic as scalar code (no fused multiply-add: -ffp-contract=off), so results do not depend
 * on the vector width. */
typedef float v4f __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));
static inline void ld4_float(v4f *v, const float *p) { memcpy(v, p, sizeof *v); }
static inline void st4_float(float *p, const v4f *v) { memcpy(p, v, sizeof *v); }
static inline void ld4_double(v4d *v, const double *p) { memcpy(v, p, sizeof *v); }
static inline void st4_double(double *p, const v4d *v) { memcpy(p, v, sizeof *v); }

/* The loops, for a constant PR (4, 8, 12, 16) or the runtime pr (then the accumulators are a C99
 * variable-length array of pr / 4 vectors, pr at most MAX_RANK + 3). V is the vector of four W.
 * FLUSH_ROW (inside FORWARD_LOOP): S[row, t] -= acc[t] for t < r. */
#define FLUSH_ROW(W, LD, ST, PR)                                                                              \
    for (int64_t v = 0; v < (PR) / 4; ++v)                                                                    \
        for (int64_t u = 0; u < 4; ++u)                                                                       \
            if (4 * v + u < r) ST(s, row * r + 4 * v + u, LD(s, row * r + 4 * v + u) - acc[v][u])

#define FORWARD_LOOP(W, V, LD, ST, PR)                                                                        \
    do {                                                                                                      \
        V acc[(PR) / 4];                                                                                      \
        for (int64_t v = 0; v < (PR) / 4; ++v) acc[v] = (V){0, 0, 0, 0};                                      \
        int64_t row = -1, row_end = 0, row_f = 0;                                                             \
        for (int64_t q = q0; q < q1; ++q) {                                                                   \
            const int64_t f = pos[q];                                                                         \
            const int64_t e = (int64_t)(((double)f + 0.5) * inv_n);                                           \
            if (e >= row_end) {                                                                               \
                if (row >= 0) FLUSH_ROW(W, LD, ST, PR);                                                       \
                row = e / k;                                                                                  \
                row_end = (row + 1) * k;                                                                      \
                row_f = row * k * n;                                                                          \
                for (int64_t v = 0; v < (PR) / 4; ++v) acc[v] = (V){0, 0, 0, 0};                              \
            }                                                                                                 \
            const W xv = (W)LD(x, e);                                                                         \
            const V xs = {xv, xv, xv, xv};                                                                    \
            const W *arow = ae + (f - row_f) * (PR);                                                          \
            for (int64_t v = 0; v < (PR) / 4; ++v) {                                                          \
                V a4;                                                                                         \
                ld4_##W(&a4, arow + 4 * v);                                                                   \
                acc[v] += xs * a4;                                                                            \
            }                                                                                                 \
        }                                                                                                     \
        if (row >= 0) FLUSH_ROW(W, LD, ST, PR);                                                               \
    } while (0)

#define BACKWARD_LOOP(W, V, LD, ST, PR)                                                                       \
    do {                                                                                                      \
        V dsrow[(PR) / 4];                                                                                    \
        int64_t row_end = 0, row_f = 0, pending = -1;                                                         \
        W dx_acc = 0;                                                                                         \
        for (int64_t v = 0; v < (PR) / 4; ++v) dsrow[v] = (V){0, 0, 0, 0};                                    \
        for (int64_t q = q0; q < q1; ++q) {                                                                   \
            const int64_t f = pos[q];                                                                         \
            const int64_t e = (int64_t)(((double)f + 0.5) * inv_n);                                           \
            if (e != pending) {                                                                               \
                if (dx && pending >= 0) ST(dx, pending, LD(dx, pending) - dx_acc);                            \
                pending = e;                                                                                  \
                dx_acc = 0;                                                                                   \
            }                                                                                                 \
            if (e >= row_end) {                                                                               \
                const int64_t row = e / k;                                                                    \
                row_end = (row + 1) * k;                                                                      \
                row_f = row * k * n;                                                                          \
                for (int64_t v = 0; v < (PR) / 4; ++v)                                                        \
                    for (int64_t u = 0; u < 4; ++u)                                                           \
                        dsrow[v][u] = 4 * v + u < r ? (W)LD(ds, row * r + 4 * v + u) : (W)0;                  \
            }                                                                                                 \
            const W xv = (W)LD(x, e);                                                                         \
            const V xs = {xv, xv, xv, xv};                                                                    \
            const W *arow = ae + (f - row_f) * (PR);                                                          \
            W *grow = g + (f - row_f) * (PR);                                                                 \
            V lane = {0, 0, 0, 0};                                                                            \
            for (int64_t v = 0; v < (PR) / 4; ++v) {                                                          \
                V a4, g4;                                                                                     \
                ld4_##W(&a4, arow + 4 * v);                                                                   \
                ld4_##W(&g4, grow + 4 * v);                                                                   \
                lane += dsrow[v] * a4;                                                                        \
                g4 += xs * dsrow[v];                                                                          \
                st4_##W(grow + 4 * v, &g4);                                                                   \
            }                                                                                                 \
            dx_acc += (lane[0] + lane[1]) + (lane[2] + lane[3]);                                              \
        }                                                                                                     \
        if (dx && pending >= 0) ST(dx, pending, LD(dx, pending) - dx_acc);                                    \
    } while (0)

#define DISPATCH(LOOP, W, V, LD, ST)                                                                          \
    switch (pr) {                                                                                             \
        case 4: LOOP(W, V, LD, ST, 4); break;                                                                 \
        case 8: LOOP(W, V, LD, ST, 8); break;                                                                 \
        case 12: LOOP(W, V, LD, ST, 12); break;                                                               \
        case 16: LOOP(W, V, LD, ST, 16); break;                                                               \
        default: LOOP(W, V, LD, ST, pr); break;                                                               \
    }

/* Everything one call's workers share; each worker owns positions q0 .. q1, whole rows of x. */
typedef struct {
    const int32_t *pos;
    int64_t q0, q1, k, n, r, pr;
    const void *x, *ds;
    void *s, *dx;
    const void *ae; /* W */
    void *g;        /* W, this worker's own G (backward) */
    double inv_n;
} job_t;

#define MAX_THREADS 64
#define MIN_PER_THREAD 16384 /* positions: below this a thread costs more than it saves */

/* How many threads ``work`` items get: ``threads`` within 1 .. MAX_THREADS, and at least ``min_each`` each. */
static int64_t threads_for(int64_t work, int64_t threads, int64_t min_each) {
    int64_t t_used = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    if (work / min_each < t_used) t_used = work / min_each > 1 ? work / min_each : 1;
    return t_used;
}

/* Up to ``threads`` jobs over whole rows (row = position / width), about equal in positions; their count. */
static int64_t split(const int32_t *pos, int64_t npos, int64_t width, int64_t threads, job_t *jobs) {
    const int64_t t_used = threads_for(npos, threads, MIN_PER_THREAD);
    int64_t start = 0, made = 0;
    for (int64_t t = 0; t < t_used && start < npos; ++t) {
        int64_t end = t == t_used - 1 ? npos : npos * (t + 1) / t_used;
        if (end < start) end = start;
        while (end < npos && end > 0 && pos[end] / width == pos[end - 1] / width) ++end; /* whole rows */
        jobs[made].pos = pos, jobs[made].q0 = start, jobs[made].q1 = end;
        ++made;
        start = end;
    }
    if (made == 0) jobs[0].pos = pos, jobs[0].q0 = 0, jobs[0].q1 = 0, made = 1;
    return made;
}

/* Runs the jobs in parallel. Built with OpenMP (the loader hands this library the libgomp PyTorch has already
 * loaded, same soname), in PyTorch's own thread pool: after PyTorch's last parallel region its threads spin
 * for a while, and new threads would compete with them for the cores (on 2 cores that erased the second
 * thread's gain). Otherwise jobs 1 .. t_used - 1 run on new threads and job 0 on this one; a thread that
 * cannot start runs here. */
static void run_jobs(void *(*fn)(void *), void *jobs, size_t size, int64_t t_used) {
    char *job = (char *)jobs;
#ifdef _OPENMP
    if (t_used > 1) {
#pragma omp parallel for num_threads((int)t_used) schedule(static, 1)
        for (int64_t t = 0; t < t_used; ++t) fn(job + t * size);
    } else {
        fn(job);
    }
#else
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int64_t t = 1; t < t_used; ++t) started[t] = pthread_create(&ids[t], NULL, fn, job + t * size) == 0;
    fn(job);
    for (int64_t t = 1; t < t_used; ++t) {
        if (started[t]) pthread_join(ids[t], NULL);
        else fn(job + t * size);
    }
#endif
}

#define DEFINE(NAME, W, V, LD, ST)                                                                            \
    /* A_E (K n, P) from A' (R, K); NULL when out of memory. */                                               \
    static W *build_ae_##NAME(const void *a, int64_t k, int64_t n, const int64_t *off, int64_t pr) {          \
        W *ae = (W *)calloc((size_t)(k * n * pr), sizeof(W));                                                 \
        if (!ae) return NULL;                                                                                 \
        for (int64_t b = 0; b < n; ++b)                                                                       \
            for (int64_t t = off[b]; t < off[b + 1]; ++t)                                                     \
                for (int64_t j = 0; j < k; ++j) ae[(j * n + b) * pr + t] = (W)LD(a, t * k + j);               \
        return ae;                                                                                            \
    }                                                                                                         \
                                                                                                              \
    static void *forward_job_##NAME(void *arg) {                                                              \
        const job_t *job = (const job_t *)arg;                                                                \
        const int32_t *pos = job->pos;                                                                        \
        const int64_t q0 = job->q0, q1 = job->q1, k = job->k, n = job->n, r = job->r, pr = job->pr;           \
        const void *x = job->x;                                                                               \
        void *s = job->s;                                                                                     \
        const W *ae = (const W *)job->ae;                                                                     \
        const double inv_n = job->inv_n;                                                                      \
        DISPATCH(FORWARD_LOOP, W, V, LD, ST)                                                                  \
        return NULL;                                                                                          \
    }                                                                                                         \
                                                                                                              \
    static void *backward_job_##NAME(void *arg) {                                                             \
        const job_t *job = (const job_t *)arg;                                                                \
        const int32_t *pos = job->pos;                                                                        \
        const int64_t q0 = job->q0, q1 = job->q1, k = job->k, n = job->n, r = job->r, pr = job->pr;           \
        const void *x = job->x, *ds = job->ds;                                                                \
        void *dx = job->dx;                                                                                   \
        const W *ae = (const W *)job->ae;                                                                     \
        W *g = (W *)job->g;                                                                                   \
        const double inv_n = job->inv_n;                                                                      \
        DISPATCH(BACKWARD_LOOP, W, V, LD, ST)                                                                 \
        return NULL;                                                                                          \
    }                                                                                                         \
                                                                                                              \
    int msplora_forward_##NAME(const int32_t *pos, int64_t npos, const void *x, int64_t k, int64_t n,         \
                               const int64_t *off, const void *a, void *s, int64_t threads) {                 \
        const int64_t r = n >= 1 ? off[n] : 0, pr = (r + 3) / 4 * 4;                                          \
        if (n < 1 || k < 1 || r < 1 || r > MAX_RANK) return 1;                                                \
        W *ae = build_ae_##NAME(a, k, n, off, pr);                                                            \
        if (!ae) return 2;                                                                                    \
        job_t jobs[MAX_THREADS];                                                                              \
        const int64_t t_used = split(pos, npos, k * n, threads, jobs);                                        \
        for (int64_t t = 0; t < t_used; ++t) {                                                                \
            jobs[t].k = k, jobs[t].n = n, jobs[t].r = r, jobs[t].pr = pr, jobs[t].x = x, jobs[t].s = s;       \
            jobs[t].ae = ae, jobs[t].inv_n = 1.0 / (double)n;                                                 \
        }                                                                                                     \
        run_jobs(forward_job_##NAME, jobs, sizeof jobs[0], t_used);                                           \
        free(ae);                                                                                             \
        return 0;                                                                                             \
    }                                                                                                         \
                                                                                                              \
    int msplora_backward_##NAME(const int32_t *pos, int64_t npos, const void *x, int64_t k, int64_t n,        \
                                const int64_t *off, const void *a, const void *ds, void *dx, void *dat,       \
                                int64_t threads) {                                                            \
        const int64_t r = n >= 1 ? off[n] : 0, pr = (r + 3) / 4 * 4;                                          \
        if (n < 1 || k < 1 || r < 1 || r > MAX_RANK) return 1;                                                \
        job_t jobs[MAX_THREADS];                                                                              \
        const int64_t t_used = split(pos, npos, k * n, threads, jobs);                                        \
        W *ae = build_ae_##NAME(a, k, n, off, pr);                                                            \
        W *g = (W *)calloc((size_t)(t_used * k * n * pr), sizeof(W));                                         \
        if (!ae || !g) {                                                                                      \
            free(ae);                                                                                         \
            free(g);                                                                                          \
            return 2;                                                                                         \
        }                                                                                                     \
        for (int64_t t = 0; t < t_used; ++t) {                                                                \
            jobs[t].k = k, jobs[t].n = n, jobs[t].r = r, jobs[t].pr = pr, jobs[t].x = x, jobs[t].ds = ds;     \
            jobs[t].dx = dx, jobs[t].ae = ae, jobs[t].g = g + t * k * n * pr, jobs[t].inv_n = 1.0 / (double)n;\
        }                                                                                                     \
        run_jobs(backward_job_##NAME, jobs, sizeof jobs[0], t_used);                                          \
        for (int64_t b = 0; b < n; ++b)                                                                       \
            for (int64_t t = off[b]; t < off[b + 1]; ++t)                                                     \
                for (int64_t j = 0; j < k; ++j) {                                                             \
                    W sum = 0;                                                                                \
                    for (int64_t w = 0; w < t_used; ++w) sum += g[w * k * n * pr + (j * n + b) * pr + t];     \
                    ST(dat, t * k + j, LD(dat, t * k + j) - sum);                                             \
                }                                                                                             \
        free(ae);                                                                                             \
        free(g);                                                                                              \
        return 0;                                                                                             \
    }

DEFINE(f32, float, v4f, ld_f32, st_f32)
DEFINE(f64, double, v4d, ld_f64, st_f64)
DEFINE(bf16, float, v4f, ld_bf16, st_bf16)

/* The draw of the dropped positions (torch_backend.dropped_positions has the maths; torch_backend._log_uniforms
 * is its PyTorch mirror: the same integer and IEEE double operations in the same order, so the same bits).
 * Draw c of a stream is u_c = (mix64(key + (c + 1) G) >> 12 + 1/2) 2^-52, SplitMix64's output for counter c
 * (G its golden-ratio increment) on the 52-bit grid of midpoints; its geometric gap is
 * min(ceil(log_unit(u_c) inv_log), total + 1), and the positions the running sum of the gaps from start - 1.
 * Counter-based, so the draws split over threads: each computes its share's gaps and their sum, then (after
 * the partial sums are added up here) the positions of its share. */
#define MIX_G 0x9e3779b97f4a7c15ull
#define MIN_DRAWS_PER_THREAD 16384

/* DRAW_LANES draws at a time in vectors (vector extensions, no branches; SSE2 has no vector form of the integer
 * conversions, of ceil or of 64-bit compares, so those are exact bit tricks below). Sixteen: the loop is
 * latency-bound (three dependent 64-bit multiplies, a division, the polynomial), and more independent lanes
 * per iteration hide it (measured on one EPYC core: 1.9 ns per draw at 8 and at 16 lanes with AVX-512, 5.8
 * and 4.5 on SSE2). */
#ifndef DRAW_LANES
#define DRAW_LANES 16
#endif
/* One copy of pass 1 per instruction set, chosen when the library loads by the CPU it runs on (GCC 12's
 * function multi-versioning, by glibc's ifunc): x86-64-v4 (AVX-512) has 64-bit multiplies, v3 (AVX2) twice
 * SSE2's width. The same IEEE operations in each (no fused multiply-add: -ffp-contract=off), so the same bits.
 * MSPLORA_NO_CLONES (tests) builds the one copy the compiler's flags say. */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && \
    !defined(MSPLORA_NO_CLONES)
#define DRAW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DRAW_CLONES
#endif
typedef uint64_t vu64 __attribute__((vector_size(8 * DRAW_LANES)));
typedef double vf64 __attribute__((vector_size(8 * DRAW_LANES)));
typedef uint32_t vu32 __attribute__((vector_size(4 * DRAW_LANES))); /* DRAW_LANES: a power of two */
#define SQRT2_BITS 0x3ff6a09e667f3bcdull /* the bits of the double nearest sqrt(2), 0x1.6a09e667f3bcdp+0 */
#define SPLAT(T, v) ((T){0} + (v))

static inline vu64 mix64(vu64 z) {
    z = (z ^ (z >> 30)) * SPLAT(vu64, 0xbf58476d1ce4e5b9ull);
    z = (z ^ (z >> 27)) * SPLAT(vu64, 0x94d049bb133111ebull);
    return z ^ (z >> 31);
}

/* u = (k + 1/2) 2^-52 for the top 52 bits k of ``bits``: (1 + k 2^-52) - (1 - 2^-53), exact (Sterbenz). */
static inline vf64 unit_midpoint(vu64 bits) {
    return (vf64)((bits >> 12) | SPLAT(vu64, 0x3ff0000000000000ull)) - SPLAT(vf64, 1.0 - 0x1p-53);
}

/* log(u) for u in [2^-53, 1): u = 2^e m with m in (sqrt(1/2), sqrt(2)], log m = 2 atanh(s) with
 * s = (m - 1) / (m + 1), |s| < 0.172, summed as 2 s (1 + z/3 + ... + z^10/21), z = s^2, by Estrin's scheme (the
 * first term left out, z^11/23, is below 2^-60 of the sum); within a few ulps of log(u) (tests/test_dropout.py
 * has the error bound). */
static inline vf64 log_unit(vf64 u) {
    vu64 bits = (vu64)u, biased = bits >> 52; /* u > 0: no sign bit */
    vu64 mant = (bits & SPLAT(vu64, 0x000fffffffffffffull)) | SPLAT(vu64, 0x3ff0000000000000ull); /* m in [1, 2) */
    /* all ones where m > sqrt(2): positive doubles order as their bits, and SSE2 compares neither doubles
     * nor 64-bit integers lane-wise, so the sign of the difference of the bits */
    const vu64 big = SPLAT(vu64, 0) - ((SPLAT(vu64, SQRT2_BITS) - mant) >> 63);
    mant -= big & SPLAT(vu64, 1ull << 52); /* m / 2, exactly */
    biased -= big;                         /* e + 1 */
    const vf64 m = (vf64)mant;
    /* e = biased - 1023 as a double, exactly: (2^52 + biased) - (2^52 + 1023) */
    const vf64 e = (vf64)(biased | SPLAT(vu64, 0x4330000000000000ull)) - SPLAT(vf64, 0x1p52 + 1023.0);
    const vf64 f = m - 1.0; /* exact (Sterbenz) */
    const vf64 s = f / (f + 2.0), z = s * s;
    /* Estrin's scheme (a short dependency chain: this loop is latency-bound), c_k = 1 / (2k + 1) */
    const vf64 z2 = z * z, z4 = z2 * z2, z8 = z4 * z4;
    const vf64 p01 = z * (1.0 / 3.0) + 1.0, p23 = z * (1.0 / 7.0) + 1.0 / 5.0;
    const vf64 p45 = z * (1.0 / 11.0) + 1.0 / 9.0, p67 = z * (1.0 / 15.0) + 1.0 / 13.0;
    const vf64 p89 = z * (1.0 / 19.0) + 1.0 / 17.0, p810 = z2 * (1.0 / 21.0) + p89;
    const vf64 p03 = p23 * z2 + p01, p47 = p67 * z2 + p45;
    const vf64 poly = p810 * z8 + (p47 * z4 + p03);
    return e * 0x1.62e42fefa39efp-1 + (s + s) * poly;
}

typedef struct {
    uint64_t key, c0;
    int64_t q0, q1, total;
    double inv_log;
    int32_t *out;
    int64_t sum, made;
} draw_job_t;

/* SplitMix64's states key + (c + 1 + u) G of the counters c .. c + DRAW_LANES - 1; a step of DRAW_LANES counters
 * adds DRAW_LANES G to each lane. */
static inline vu64 counter_state(uint64_t key, uint64_t c) {
    uint64_t lanes[DRAW_LANES];
    for (int u = 0; u < DRAW_LANES; ++u) lanes[u] = key + (c + 1 + (uint64_t)u) * MIX_G;
    vu64 state;
    memcpy(&state, lanes, sizeof state);
    return state;
}

/* a < b as all ones or zeros, for non-negative doubles (their bits order as they do) */
static inline vu64 below(vf64 a, vf64 b) { return SPLAT(vu64, 0) - (((vu64)a - (vu64)b) >> 63); }

/* The gaps of the DRAW_LANES draws in ``state``: g = ceil(min(y, limit)) = min(ceil(y), limit) for
 * y = log(u) / log(1 - p) > 0 (limit = total + 1, an integer below 2^52), rounding to nearest by adding and
 * subtracting 2^52, then up by one where that fell below y; returned as integers (g < 2^32, from its bits). */
static inline vu64 gaps_of(vu64 state, vf64 inv_log, vf64 limit) {
    const vf64 two52 = SPLAT(vf64, 0x1p52);
    const vf64 y = log_unit(unit_midpoint(mix64(state))) * inv_log;
    const vu64 over = below(limit, y);
    const vf64 yc = (vf64)(((vu64)y & ~over) | ((vu64)limit & over));
    const vf64 r = (yc + two52) - two52;
    const vf64 g = r + (vf64)(below(r, yc) & (vu64)SPLAT(vf64, 1.0));
    return (vu64)(g + two52) & SPLAT(vu64, 0xffffffffull);
}

/* Pass 1: this share's gaps (as uint32 in out: at most total + 1 <= 2^31) and their sum. */
DRAW_CLONES static void *gaps_job(void *arg) {
    draw_job_t *job = (draw_job_t *)arg;
    uint32_t *gap = (uint32_t *)job->out;
    const vf64 limit = SPLAT(vf64, (double)job->total + 1.0), inv_log = SPLAT(vf64, job->inv_log);
    vu64 state = counter_state(job->key, job->c0 + (uint64_t)job->q0), sums = SPLAT(vu64, 0);
    int64_t q = job->q0;
    for (; q + DRAW_LANES <= job->q1; q += DRAW_LANES, state += SPLAT(vu64, DRAW_LANES * MIX_G)) {
        const vu64 g = gaps_of(state, inv_log, limit);
#if defined(__clang__) || __GNUC__ >= 9
        const vu32 packed = __builtin_convertvector(g, vu32);
        memcpy(gap + q, &packed, sizeof packed);
#else
        for (int u = 0; u < DRAW_LANES; ++u) gap[q + u] = (uint32_t)g[u];
#endif
        sums += g;
    }
    int64_t sum = 0;
    if (q < job->q1) { /* the last, partial vector */
        uint64_t g[DRAW_LANES];
        const vu64 last = gaps_of(state, inv_log, limit);
        memcpy(g, &last, sizeof g);
        for (int64_t u = 0; u < job->q1 - q; ++u) gap[q + u] = (uint32_t)g[u], sum += (int64_t)g[u];
    }
    uint64_t lanes[DRAW_LANES];
    memcpy(lanes, &sums, sizeof lanes);
    for (int u = 0; u < DRAW_LANES; ++u) sum += (int64_t)lanes[u];
    job->sum = sum;
    return NULL;
}

/* Pass 2: the positions, from the sum of the gaps before this share (in job->sum). */
static void *positions_job(void *arg) {
    draw_job_t *job = (draw_job_t *)arg;
    const uint32_t *gap = (const uint32_t *)job->out;
    int64_t acc = job->sum, made = 0;
    for (int64_t q = job->q0; q < job->q1; ++q) {
        acc += (int64_t)gap[q];
        made += acc < job->total;
        job->out[q] = acc < job->total ? (int32_t)acc : INT32_MAX;
    }
    job->made = made;
    return NULL;
}

/* The logs alone: out[q] = log_unit(u_{c0 + q}) for q < count, by the same vector code (tests compare its
 * bits with torch_backend._log_uniforms: the positions alone would hide a log that is a few ulps off). */
DRAW_CLONES void msplora_draw_logs(uint64_t key, uint64_t c0, int64_t count, double *out) {
    vu64 state = counter_state(key, c0);
    for (int64_t q = 0; q < count; q += DRAW_LANES, state += SPLAT(vu64, DRAW_LANES * MIX_G)) {
        const vf64 l = log_unit(unit_midpoint(mix64(state)));
        memcpy(out + q, &l, (size_t)(count - q < DRAW_LANES ? count - q : DRAW_LANES) * sizeof(double));
    }
}

/* Draws count gaps from counter c0 of the stream ``key`` (0 <= start <= total < 2^31); writes the positions
 * below total to out[0 .. made) (out holds count int32) and returns made; *last is the final running sum (the
 * next draw starts after it). */
int64_t msplora_draw_positions(uint64_t key, uint64_t c0, int64_t count, double inv_log, int64_t start,
                               int64_t total, int32_t *out, int64_t *last, int64_t threads) {
    if (count < 0 || start < 0 || total < start || total >= ((int64_t)1 << 31)) return -1;
    const int64_t t_used = threads_for(count, threads, MIN_DRAWS_PER_THREAD);
    draw_job_t jobs[MAX_THREADS];
    for (int64_t t = 0; t < t_used; ++t) {
        jobs[t].key = key, jobs[t].c0 = c0, jobs[t].total = total;
        jobs[t].inv_log = inv_log, jobs[t].out = out;
        jobs[t].q0 = count * t / t_used, jobs[t].q1 = count * (t + 1) / t_used;
    }
    run_jobs(gaps_job, jobs, sizeof jobs[0], t_used);
    int64_t acc = start - 1, made = 0;
    for (int64_t t = 0; t < t_used; ++t) {
        const int64_t sum = jobs[t].sum;
        jobs[t].sum = acc;
        acc += sum;
    }
    run_jobs(positions_job, jobs, sizeof jobs[0], t_used);
    for (int64_t t = 0; t < t_used; ++t) made += jobs[t].made;
    *last = acc;
    return made;
}
