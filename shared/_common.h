/* What the compiled loops share (`_scan.c`, the decision scan; `_decode.c`, the one-token step): the
 * dimensions, the score (`dla_shared.policy.score_from_terms`) and the policy step of one cache
 * (`dla_shared.policy.plan` for one row and head). The C mirror of metal_kernels/dla_common.h. */
#ifndef DLA_COMMON_H
#define DLA_COMMON_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { SINGLE = 0, FENWICK = 1, FIXED = 2, DLA = 3 };  /* dla_shared.policy.POLICY_IDS */

typedef struct {
    int policy, state_drift, merge_oldest, scored;  /* scored: `DLAConfig.scored`, else every score is 0 */
    long block_size;
    double eps;
    Py_ssize_t B, T, H, Dk, Dv, L, C;
} Dims;

static inline int trailing_ones(int64_t x) {
    int j = 0;
    while (x & 1) { x >>= 1; j++; }
    return j;
}

/* The policy step of one cache (`dla_shared.policy.plan` for one row and head): fills dest [L] and
 * returns whether the token opens a state, or -1 when a fenwick cache has no level left.  pair_sum [L - 1]
 * holds ibar[i] + ibar[i + 1], summed in ibar's dtype as numpy does. */
static inline int plan_step(const Dims *d, const int64_t *n, const double *pair_sum, int64_t pos, double score,
                     double tau, int on, Py_ssize_t *dest) {
    Py_ssize_t L = d->L, m = 0;
    for (Py_ssize_t i = 0; i < L; i++) { dest[i] = i; m += n[i] > 0; }
    int empty = m == 0, opens;
    if (!on) return 0;
    if (empty) return 1;
    switch (d->policy) {
        case SINGLE: opens = 0; break;
        case FENWICK: opens = 1; break;
        case FIXED: opens = pos % d->block_size == 0; break;
        default: opens = score >= tau;
    }
    if (!opens) return 0;
    if (d->policy == FENWICK) {  /* levels 0..j fold into level j + 1 */
        int j = trailing_ones(pos - 1);
        if (j + 1 >= L) return -1;
        for (int i = 0; i <= j; i++) dest[i] = j + 1;
        return 1;
    }
    Py_ssize_t pair = L;  /* no merge unless full */
    if (m == L) {
        if (d->merge_oldest) pair = m - 2;
        else {  /* the least dense adjacent pair, ties to the oldest; a NaN is least, as in numpy's argmin */
            double best = INFINITY;
            pair = L - 2;
            for (Py_ssize_t i = m - 2; i >= 0; i--) {
                int64_t total = n[i] + n[i + 1];
                double density = pair_sum[i] / (double)(total > 1 ? total : 1);
                if (isnan(density)) { pair = i; break; }
                if (density < best) { best = density; pair = i; }
            }
        }
    }
    for (Py_ssize_t i = 0; i < L; i++) {
        Py_ssize_t merged = i > pair ? i - 1 : i;
        dest[i] = merged + 1 < L - 1 ? merged + 1 : L - 1;
    }
    return 1;
}

/* Eq. 13 from ||S~||^2, ||s_t||^2 and <S~, s_t> (summed in double, rounded to the compute dtype first, as
 * numpy computes in the state's dtype); `real` is float or double. */
#define DEFINE_SCORE(NAME, real, SQRT)                                                                   \
static inline real NAME(const Dims *d, double state_sq, double token_sq, double cross, real size) {     \
    real ss = (real)state_sq, ts = (real)token_sq, cs = (real)cross, eps = (real)d->eps, other_sq, other_cross; \
    if (d->state_drift) { other_sq = ss + ts + 2 * cs; other_cross = ss + cs; }                        \
    else { other_sq = ts; other_cross = cs; }                                                          \
    real r_state = (real)1 / SQRT(ss / size + eps), r_other = (real)1 / SQRT(other_sq / size + eps);   \
    real dist_sq = r_other * r_other * other_sq + r_state * r_state * ss - 2 * r_other * r_state * other_cross; \
    return SQRT(dist_sq > 0 ? dist_sq : 0) / (r_state * SQRT(ss) + eps);                              \
}

DEFINE_SCORE(score_f32, float, sqrtf)
DEFINE_SCORE(score_f64, double, sqrt)

/* The newest state after the transition, S~ = decay (X - beta k kX^T) with kX = k^T X (decay X for the diagonal
 * transition: kX NULL), into S [Dk, Dv], and the token's score; acc [3 Dv] is scratch. The three sums are
 * taken per column first, so that the loop vectorizes without reordering. */
#define DEFINE_NEWEST(NAME, real, SCORE)                                                                 \
static inline real NAME(const Dims *d, const real *X, const real *kt, const real *vt, const real *kX, real bt, \
                        real decay, real *S, double *acc) {                                              \
    Py_ssize_t Dk = d->Dk, Dv = d->Dv;                                                                 \
    for (Py_ssize_t j = 0; j < 3 * Dv; j++) acc[j] = 0;                                               \
    for (Py_ssize_t i = 0; i < Dk; i++) {                                                              \
        real bk = bt * kt[i];                                                                          \
        for (Py_ssize_t j = 0; j < Dv; j++) {                                                          \
            real s = kX ? decay * (X[i * Dv + j] - bk * kX[j]) : decay * X[i * Dv + j];                \
            real tok = kX ? bt * (kt[i] * vt[j]) : kt[i] * vt[j];                                      \
            S[i * Dv + j] = s;                                                                         \
            acc[j] += (double)s * s; acc[Dv + j] += (double)tok * tok; acc[2 * Dv + j] += (double)s * tok; \
        }                                                                                              \
    }                                                                                                  \
    double state_sq = 0, token_sq = 0, cross = 0;                                                      \
    for (Py_ssize_t j = 0; j < Dv; j++) { state_sq += acc[j]; token_sq += acc[Dv + j]; cross += acc[2 * Dv + j]; } \
    return SCORE(d, state_sq, token_sq, cross, (real)(Dk * Dv));                                      \
}

DEFINE_NEWEST(newest_f32, float, score_f32)
DEFINE_NEWEST(newest_f64, double, score_f64)

/* The bookkeeping of one cache moved by dest (n, ibar [L] in place; n_new, ibar_new [L] scratch), summing what
 * merges, as `dla_shared.policy.plan` moves it. */
#define DEFINE_MOVE_BOOKS(NAME, real)                                                                    \
static inline void NAME(Py_ssize_t L, const Py_ssize_t *dest, int64_t *n, real *ibar, int64_t *n_new,   \
                        real *ibar_new) {                                                                \
    for (Py_ssize_t i = 0; i < L; i++) { n_new[i] = 0; ibar_new[i] = 0; }                              \
    for (Py_ssize_t j = 0; j < L; j++) { n_new[dest[j]] += n[j]; ibar_new[dest[j]] += ibar[j]; }       \
    memcpy(n, n_new, sizeof(int64_t) * L);                                                             \
    memcpy(ibar, ibar_new, sizeof(real) * L);                                                          \
}

DEFINE_MOVE_BOOKS(move_books_f32, float)
DEFINE_MOVE_BOOKS(move_books_f64, double)

#endif
