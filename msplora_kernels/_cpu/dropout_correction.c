/* The complement-sparse dropout corrections of the PyTorch backend (torch_backend's docstring has the maths),
 * one pass over the dropped positions each, for CPU tensors.
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

/* Up to ``threads`` jobs over whole rows (row = position / width), about equal in positions; their count. */
static int64_t split(const int32_t *pos, int64_t npos, int64_t width, int64_t threads, job_t *jobs) {
    int64_t t_used = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    if (npos / MIN_PER_THREAD < t_used) t_used = npos / MIN_PER_THREAD > 1 ? npos / MIN_PER_THREAD : 1;
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
static void run_jobs(void *(*fn)(void *), job_t *jobs, int64_t t_used) {
#ifdef _OPENMP
    if (t_used > 1) {
#pragma omp parallel for num_threads((int)t_used) schedule(static, 1)
        for (int64_t t = 0; t < t_used; ++t) fn(&jobs[t]);
    } else {
        fn(&jobs[0]);
    }
#else
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int64_t t = 1; t < t_used; ++t) started[t] = pthread_create(&ids[t], NULL, fn, &jobs[t]) == 0;
    fn(&jobs[0]);
    for (int64_t t = 1; t < t_used; ++t) {
        if (started[t]) pthread_join(ids[t], NULL);
        else fn(&jobs[t]);
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
        run_jobs(forward_job_##NAME, jobs, t_used);                                                           \
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
        run_jobs(backward_job_##NAME, jobs, t_used);                                                          \
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

/* Dropped positions from geometric gaps (torch_backend.dropped_positions): with l[q] = log(u_q), the gaps are
 * ceil(l[q] * inv_log) (clamped to total + 1 when clamp is set), and the positions their running sum from
 * start - 1, in double, in the same operations and order as that function's PyTorch ops (so the same bits).
 * Writes the positions below total to out (int32) and returns their count; *last is the final running sum
 * (the next chunk starts after it). */
int64_t msplora_gap_positions(const double *l, int64_t count, double inv_log, int64_t start, int64_t total,
                              int clamp, int32_t *out, double *last) {
    double acc = 0.0;
    int64_t made = 0;
    const double limit = (double)total + 1.0, end = (double)total;
    for (int64_t q = 0; q < count; ++q) {
        const double y = l[q] * inv_log; /* > 0; below 2^63 unless clamp (p < 1e-15) */
        double gap;
        if (clamp && y > limit) {
            gap = limit; /* = min(ceil(y), limit): limit is an integer */
        } else {
            gap = (double)(int64_t)y; /* ceil(y) without libm's call (SSE2 has no rounding instruction) */
            if (gap < y) gap += 1.0;
        }
        if (q == 0) gap += (double)(start - 1);
        acc = q == 0 ? gap : acc + gap;
        if (acc < end) out[made++] = (int32_t)acc;
    }
    *last = acc;
    return made;
}
