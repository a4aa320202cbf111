/* The complement-sparse dropout corrections of the PyTorch backend (torch_backend's docstring has the maths),
 * one pass over the dropped positions each, for CPU tensors.
 *
 * A dropped position f = (i K + j) n + s (sorted ascending) names element (i, j) of x in branch s, and
 * f - i K n = j n + s is its row of A_E, the (K n, P) matrix whose row j n + s holds A'_s[:, j] in branch s's
 * columns and zeros elsewhere (A' = the coefficient-scaled A; P = R padded to a multiple of 4 with zero
 * columns), in the work type W (double for double x, else float). Every position then does the same
 * P-long loop (no branch on s: a data-dependent trip count mispredicts about once per position):
 *
 *   forward:   S[i, t]        -= x[i, j] A_E[j n + s, t]               t < R
 *   backward:  dx[i, j]       -= sum_t dS[i, t] A_E[j n + s, t]        (when dx is given)
 *              dA_E[j n + s, t] += x[i, j] dS[i, t]                    all t < P; the caller keeps branch s's
 *                                                                      columns of row j n + s (K n x P, W)
 *
 * Rows are visited in order (the positions are sorted), so each row of S is corrected once from a W
 * accumulator, and each (i, j) of dx once for all its branches. Index arithmetic: e = i K + j = floor(f / n)
 * by the fp64 rule of torch_backend._floor_div (exact below 2^50; f < 2^31 here), i by walking the sorted rows.
 * Element types: f32 (W = float), f64 (W = double), bf16 (W = float, round to nearest even on store).
 */
#include <stdint.h>
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

#define DEFINE(NAME, W, LD, ST)                                                                                 \
    int msplora_forward_##NAME(const int32_t *pos, int64_t npos, const void *x, int64_t k, int64_t n,         \
                               const W *ae, int64_t r, int64_t pr, void *s) {                                 \
        if (n < 1 || pr > MAX_RANK || pr < r || pr % 4) return 1;                                                       \
        W acc[MAX_RANK];                                                                                      \
        const double inv_n = 1.0 / (double)n;                                                                 \
        int64_t row = -1, row_end = 0, row_f = 0;                                                             \
        for (int64_t q = 0; q < npos; ++q) {                                                                  \
            const int64_t f = pos[q];                                                                         \
            const int64_t e = (int64_t)(((double)f + 0.5) * inv_n);                                           \
            if (e >= row_end) {                                                                               \
                if (row >= 0)                                                                                 \
                    for (int64_t t = 0; t < r; ++t) ST(s, row * r + t, LD(s, row * r + t) - acc[t]);          \
                row = e / k;                                                                                  \
                row_end = (row + 1) * k;                                                                      \
                row_f = row * k * n;                                                                          \
                for (int64_t t = 0; t < pr; ++t) acc[t] = 0;                                                  \
            }                                                                                                 \
            const W xv = (W)LD(x, e);                                                                         \
            const W *a = ae + (f - row_f) * pr;                                                               \
            for (int64_t t = 0; t < pr; ++t) acc[t] += xv * a[t];                                             \
        }                                                                                                     \
        if (row >= 0)                                                                                         \
            for (int64_t t = 0; t < r; ++t) ST(s, row * r + t, LD(s, row * r + t) - acc[t]);                  \
        return 0;                                                                                             \
    }                                                                                                         \
                                                                                                              \
    int msplora_backward_##NAME(const int32_t *pos, int64_t npos, const void *x, int64_t k, int64_t n,        \
                                const W *ae, int64_t r, int64_t pr, const void *ds, void *dx, W *dae) {       \
        if (n < 1 || pr > MAX_RANK || pr < r || pr % 4) return 1;                                                       \
        W dsrow[MAX_RANK];                                                                                    \
        const double inv_n = 1.0 / (double)n;                                                                 \
        int64_t row = -1, row_end = 0, row_f = 0, pending = -1;                                               \
        W dx_acc = 0;                                                                                         \
        for (int64_t t = r; t < pr; ++t) dsrow[t] = 0;                                                        \
        for (int64_t q = 0; q < npos; ++q) {                                                                  \
            const int64_t f = pos[q];                                                                         \
            const int64_t e = (int64_t)(((double)f + 0.5) * inv_n);                                           \
            if (e != pending) {                                                                               \
                if (dx && pending >= 0) ST(dx, pending, LD(dx, pending) - dx_acc);                            \
                pending = e;                                                                                  \
                dx_acc = 0;                                                                                   \
            }                                                                                                 \
            if (e >= row_end) {                                                                               \
                row = e / k;                                                                                  \
                row_end = (row + 1) * k;                                                                      \
                row_f = row * k * n;                                                                          \
                for (int64_t t = 0; t < r; ++t) dsrow[t] = (W)LD(ds, row * r + t);                            \
            }                                                                                                 \
            const W xv = (W)LD(x, e);                                                                         \
            const W *a = ae + (f - row_f) * pr;                                                               \
            W *d = dae + (f - row_f) * pr;                                                                    \
            W l0 = 0, l1 = 0, l2 = 0, l3 = 0; /* four lanes (P is a multiple of 4) */                         \
            for (int64_t t = 0; t < pr; t += 4) {                                                             \
                l0 += dsrow[t] * a[t];                                                                        \
                l1 += dsrow[t + 1] * a[t + 1];                                                                \
                l2 += dsrow[t + 2] * a[t + 2];                                                                \
                l3 += dsrow[t + 3] * a[t + 3];                                                                \
                d[t] += xv * dsrow[t];                                                                        \
                d[t + 1] += xv * dsrow[t + 1];                                                                \
                d[t + 2] += xv * dsrow[t + 2];                                                                \
                d[t + 3] += xv * dsrow[t + 3];                                                                \
            }                                                                                                 \
            dx_acc += (l0 + l1) + (l2 + l3);                                                                  \
        }                                                                                                     \
        if (dx && pending >= 0) ST(dx, pending, LD(dx, pending) - dx_acc);                                    \
        return 0;                                                                                             \
    }

DEFINE(f32, float, ld_f32, st_f32)
DEFINE(f64, double, ld_f64, st_f64)
DEFINE(bf16, float, ld_bf16, st_bf16)
