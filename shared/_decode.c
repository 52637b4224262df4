/* One token of DLA for every (batch row, head), compiled: the decode step of `dla_torch.ops.step` and
 * `dla_mlx.ops.step` on the CPU (the C mirror of metal_kernels/dla_decode.metal), so that a token reads the
 * K states once and writes them once with no array temporaries.
 *
 * Per cache: the reads q^T S_0 and k^T S_0 of the newest state, the newest state after the transition and the
 * score (`_common.h`; 0 where no decision reads it, `scored`); the decisions (`plan_step`); then each new
 * slot m = the sum of the old states j with dest[j] = m, each carried by the transition (decay
 * (S_j - beta k (k^T S_j)), or decay S_j), plus the token in slot 0; the output from the moved reads. The
 * states are updated in place: every move sends slot j to a slot m >= j, so the old states are taken from the
 * oldest down, each read and carried while it is in cache, and a slot is overwritten only after its old state
 * was taken. `decode_f32` / `decode_f64` compute in float / double. Every array is C-contiguous and checked
 * by the Python wrapper (`dla_shared.decode`):
 *   q, k [B, H, Dk], v [B, H, Dv], g and beta [B, H] (beta an empty buffer for the diagonal transition),
 *   lam [B, H, L], active uint8 [B], tau float64 [H]; written: o [B, H, Dv]; updated in place:
 *   S [B, H, L, Dk, Dv], n int64 [B, H, L], ibar [B, H, L], pos int64 [B], opened int64 [B, H].
 * Returns the position at which a fenwick cache runs out of levels (the wrapper raises), else 0.
 */
#include "_common.h"

/* q^T X and k^T X of one state X [Dk, Dv] into rq, rk [Dv]. */
#define DEFINE_READS(NAME, real)                                                                         \
static inline void NAME(Py_ssize_t Dk, Py_ssize_t Dv, const real *restrict X, const real *restrict qt,   \
                        const real *restrict kt, real *restrict rq, real *restrict rk) {                 \
    for (Py_ssize_t c = 0; c < Dv; c++) { rq[c] = 0; rk[c] = 0; }                                      \
    for (Py_ssize_t a = 0; a < Dk; a++) {                                                              \
        const real *row = X + a * Dv, x = qt[a], y = kt[a];                                            \
        for (Py_ssize_t c = 0; c < Dv; c++) { rq[c] += x * row[c]; rk[c] += y * row[c]; }              \
    }                                                                                                  \
}

/* out (+)= the transition of X [Dk, Dv]: decay (X - beta k rk^T), or decay X for the diagonal transition
 * (rk NULL); `add` sums into out, which may be X. Inlined with constant flags, so each case is its own
 * branch-free loop. */
#define DEFINE_CARRY(NAME, real)                                                                         \
static inline void NAME(Py_ssize_t Dk, Py_ssize_t Dv, const real *X, const real *restrict kt,            \
                        const real *restrict rk, real bt, real decay, int add, real *out) {              \
    for (Py_ssize_t a = 0; a < Dk; a++) {                                                              \
        real bk = bt * kt[a];                                                                          \
        const real *x = X + a * Dv;                                                                    \
        real *y = out + a * Dv;                                                                        \
        for (Py_ssize_t c = 0; c < Dv; c++) {                                                          \
            real z = rk ? decay * (x[c] - bk * rk[c]) : decay * x[c];                                  \
            y[c] = add ? y[c] + z : z;                                                                 \
        }                                                                                              \
    }                                                                                                  \
}

#define DEFINE_DECODE(SUFFIX, real, EXP)                                                                  \
DEFINE_READS(reads_##SUFFIX, real)                                                                       \
DEFINE_CARRY(carry_##SUFFIX, real)                                                                       \
static int64_t decode_##SUFFIX(const Dims *d, real scale, const real *q, const real *k, const real *v,    \
                               const real *g, const real *beta, const real *lam, const uint8_t *active,   \
                               real *S, const double *tau, int64_t *n_all,                                \
                               real *ibar_all, int64_t *pos_all, int64_t *opened, real *o) {              \
    Py_ssize_t H = d->H, Dk = d->Dk, Dv = d->Dv, L = d->L, size = Dk * Dv;                             \
    real *rq0 = malloc(sizeof(real) * (4 * Dv + size)), *rk0 = rq0 + Dv, *rq = rk0 + Dv, *rk = rq + Dv;  \
    real *newest = rk + Dv;                                                                            \
    Py_ssize_t *dest = malloc(sizeof(Py_ssize_t) * L);                                                 \
    double *pair_sum = malloc(sizeof(double) * L), *acc = malloc(sizeof(double) * 3 * Dv);             \
    int64_t *n_new = malloc(sizeof(int64_t) * L);                                                      \
    real *ibar_new = malloc(sizeof(real) * L);                                                         \
    char *seen = malloc(L);                                                                            \
    int64_t overflow = 0;                                                                              \
    for (Py_ssize_t b = 0; b < d->B && !overflow; b++) {                                               \
        int on = active[b];                                                                            \
        for (Py_ssize_t h = 0; h < H && !overflow; h++) {                                              \
            Py_ssize_t bh = b * H + h;                                                                 \
            const real *qt = q + bh * Dk, *kt = k + bh * Dk, *vt = v + bh * Dv;                        \
            real *Sh = S + bh * L * size, *ot = o + bh * Dv, *ibar = ibar_all + bh * L;                \
            int64_t *n = n_all + bh * L;                                                               \
            real decay = EXP(g[bh]), bt = beta ? beta[bh] : (real)1, qk = 0;                           \
            for (Py_ssize_t a = 0; a < Dk; a++) qk += qt[a] * kt[a];                                   \
            reads_##SUFFIX(Dk, Dv, Sh, qt, kt, rq0, rk0);  /* of slot 0, which the score needs */      \
            real score = 0;                                                                            \
            if (d->scored) score = newest_##SUFFIX(d, Sh, kt, vt, beta ? rk0 : NULL, bt, decay, newest, acc); \
            int empty = 1;                                                                             \
            for (Py_ssize_t i = 0; i < L; i++) empty &= n[i] == 0;                                   \
            for (Py_ssize_t i = 0; i + 1 < L; i++) pair_sum[i] = (double)(ibar[i] + ibar[i + 1]);      \
            if (empty) score = 0;                                                                      \
            int opens = plan_step(d, n, pair_sum, pos_all[b], score, tau[h], on, dest);               \
            if (opens < 0) { overflow = pos_all[b]; break; }                                           \
            if (opens && pos_all[b] > 0) opened[bh]++;                                                 \
            move_books_##SUFFIX(L, dest, n, ibar, n_new, ibar_new);                                    \
            for (Py_ssize_t c = 0; c < Dv; c++) ot[c] = 0;                                             \
            if (!on) continue;  /* padding: nothing changes, the output is zero */                    \
            n[0] += 1; ibar[0] += score;                                                               \
            /* the old states from the oldest down; the first into a slot sets it */                   \
            memset(seen, 0, L);                                                                        \
            for (Py_ssize_t j = L - 1; j >= 0; j--) {                                                  \
                Py_ssize_t m = dest[j];                                                                \
                real *X = Sh + j * size, *out = Sh + m * size, *jq = j ? rq : rq0, *jk = j ? rk : rk0; \
                if (j > 0) reads_##SUFFIX(Dk, Dv, X, qt, kt, rq, rk);                                  \
                if (beta && seen[m]) carry_##SUFFIX(Dk, Dv, X, kt, jk, bt, decay, 1, out);             \
                else if (beta) carry_##SUFFIX(Dk, Dv, X, kt, jk, bt, decay, 0, out);                   \
                else if (seen[m]) carry_##SUFFIX(Dk, Dv, X, kt, NULL, bt, decay, 1, out);              \
                else carry_##SUFFIX(Dk, Dv, X, kt, NULL, bt, decay, 0, out);                           \
                seen[m] = 1;                                                                           \
                /* the output reads the moved state: lam[m] q^T (carried S_j) */                      \
                real w = lam[bh * L + m];                                                              \
                for (Py_ssize_t c = 0; c < Dv; c++)                                                    \
                    ot[c] += w * (beta ? decay * (jq[c] - bt * qk * jk[c]) : decay * jq[c]);           \
            }                                                                                          \
            for (Py_ssize_t m = 0; m < L; m++)                                                         \
                if (!seen[m]) memset(Sh + m * size, 0, sizeof(real) * size);                           \
            for (Py_ssize_t a = 0; a < Dk; a++) {  /* the token into slot 0 */                        \
                real bk = bt * kt[a];                                                                  \
                for (Py_ssize_t c = 0; c < Dv; c++) Sh[a * Dv + c] += bk * vt[c];                      \
            }                                                                                          \
            for (Py_ssize_t c = 0; c < Dv; c++) ot[c] = scale * (ot[c] + lam[bh * L] * bt * qk * vt[c]); \
        }                                                                                              \
        if (!overflow) pos_all[b] += on;                                                               \
    }                                                                                                  \
    free(rq0); free(dest); free(pair_sum); free(acc); free(n_new); free(ibar_new); free(seen);          \
    return overflow;                                                                                   \
}

DEFINE_DECODE(f32, float, expf)
DEFINE_DECODE(f64, double, exp)

/* decode(policy, state_drift, merge_oldest, scored, is_double, block_size, eps, scale, dims (B, H, Dk, Dv, L), q,
 *        k, v, g, beta, lam, active, S, tau, n, ibar, pos, opened, o) -> overflow position (0 if none) */
static PyObject *py_decode(PyObject *self, PyObject *args) {
    Dims d;
    Py_buffer buf[14];
    memset(buf, 0, sizeof buf);
    int is_double;
    double scale;
    d.T = 1;
    d.C = 1;
    if (!PyArg_ParseTuple(args, "iiiiildd(nnnnn)y*y*y*y*y*y*y*w*y*w*w*w*w*w*", &d.policy, &d.state_drift,
                          &d.merge_oldest, &d.scored, &is_double, &d.block_size, &d.eps, &scale, &d.B, &d.H, &d.Dk,
                          &d.Dv, &d.L, &buf[0], &buf[1], &buf[2], &buf[3], &buf[4], &buf[5], &buf[6], &buf[7], &buf[8],
                          &buf[9], &buf[10], &buf[11], &buf[12], &buf[13]))
        return NULL;
    const void *beta = buf[4].len ? buf[4].buf : NULL;
    int64_t overflow;
    Py_BEGIN_ALLOW_THREADS
    if (is_double)
        overflow = decode_f64(&d, scale, buf[0].buf, buf[1].buf, buf[2].buf, buf[3].buf, beta, buf[5].buf,
                              buf[6].buf, buf[7].buf, buf[8].buf, buf[9].buf, buf[10].buf, buf[11].buf,
                              buf[12].buf, buf[13].buf);
    else
        overflow = decode_f32(&d, (float)scale, buf[0].buf, buf[1].buf, buf[2].buf, buf[3].buf, beta,
                              buf[5].buf, buf[6].buf, buf[7].buf, buf[8].buf, buf[9].buf, buf[10].buf,
                              buf[11].buf, buf[12].buf, buf[13].buf);
    Py_END_ALLOW_THREADS
    for (int i = 0; i < 14; i++) PyBuffer_Release(&buf[i]);
    return PyLong_FromLongLong(overflow);
}

static PyMethodDef methods[] = {
    {"decode", py_decode, METH_VARARGS, "One token of DLA for every row and head, compiled (see _decode.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_decode", NULL, -1, methods};

PyMODINIT_FUNC PyInit__decode(void) { return PyModule_Create(&module); }
