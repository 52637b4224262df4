/* One token of DLA for every (batch row, head), compiled: the decode step of `dla_torch.ops.step` and
 * `dla_mlx.ops.step` on the CPU, reading the K states once and writing only what changes, with no array
 * temporaries.
 *
 * The states are kept in the physical layout of `DLAState` (`dla_shared.state`): slot i of a cache is
 * decay * S[slot[i]], one buffer per slot and one decay per cache. So a token
 *   - multiplies the cache's decay by exp(g) instead of rescaling its K states (DESIGN section 3), and
 *     rescales the buffers only when the decay falls below DECAY_MIN (or is 0: a reset);
 *   - moves no buffer: new slot m takes the buffer of the newest old slot j with dest[j] = m, the other such
 *     buffers are added into it (a merge) and freed, and freed buffers fill the new slots no old slot maps to
 *     (slot 0 when a state opens, which the token overwrites; a fenwick fold's emptied levels, zeroed).
 * The transitions are linear, so merging before the transition is the same as after. Per cache: the reads
 * q^T S_0 and k^T S_0 of the newest state, the newest state after the transition and the score (`_common.h`;
 * 0 where no decision reads it, `scored`); the decisions (`plan_step`); the merges; then per new slot its
 * buffer's reads (for the output) and, for the delta rule, its transition X - beta k (k^T X) in place (the
 * diagonal transition writes nothing); then the token, token / decay, into slot 0. `decode_f32` / `decode_f64`
 * compute in float / double. Every array is C-contiguous and checked by the Python wrapper
 * (`dla_shared.decode`):
 *   q, k [B, H, Dk], v [B, H, Dv], g and beta [B, H] (beta an empty buffer for the diagonal transition),
 *   lam [B, H, L], active uint8 [B], tau float64 [H]; written: o [B, H, Dv]; updated in place:
 *   S [B, H, L, Dk, Dv], slot int64 [B, H, L], decay [B, H], n int64 [B, H, L], ibar [B, H, L], pos int64 [B],
 *   opened int64 [B, H].
 * Returns the position at which a fenwick cache runs out of levels (the wrapper raises), else 0.
 */
#include "_common.h"

/* Below it the buffers take the decay in (2^-40: a buffer holds at most 2^40 times its slot's state). */
#define DECAY_MIN 0x1p-40

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

/* X = f (X - beta k rk^T) in place (the delta rule's transition, up to the decay), or X = f X (rk NULL). */
#define DEFINE_CARRY(NAME, real)                                                                         \
static inline void NAME(Py_ssize_t Dk, Py_ssize_t Dv, real *restrict X, const real *restrict kt,         \
                        const real *restrict rk, real bt, real f) {                                      \
    for (Py_ssize_t a = 0; a < Dk; a++) {                                                              \
        real bk = bt * kt[a], *x = X + a * Dv;                                                         \
        if (rk) for (Py_ssize_t c = 0; c < Dv; c++) x[c] = f * (x[c] - bk * rk[c]);                   \
        else for (Py_ssize_t c = 0; c < Dv; c++) x[c] *= f;                                            \
    }                                                                                                  \
}

/* X (+)= w beta k v^T: the token into its slot, overwriting (a new state) or adding. */
#define DEFINE_WRITE(NAME, real)                                                                         \
static inline void NAME(Py_ssize_t Dk, Py_ssize_t Dv, real *restrict X, const real *restrict kt,         \
                        const real *restrict vt, real w, int add) {                                      \
    for (Py_ssize_t a = 0; a < Dk; a++) {                                                              \
        real wk = w * kt[a], *x = X + a * Dv;                                                          \
        if (add) for (Py_ssize_t c = 0; c < Dv; c++) x[c] += wk * vt[c];                               \
        else for (Py_ssize_t c = 0; c < Dv; c++) x[c] = wk * vt[c];                                    \
    }                                                                                                  \
}

#define DEFINE_DECODE(SUFFIX, real, EXP)                                                                  \
DEFINE_READS(reads_##SUFFIX, real)                                                                       \
DEFINE_CARRY(carry_##SUFFIX, real)                                                                       \
DEFINE_WRITE(write_##SUFFIX, real)                                                                       \
static int64_t decode_##SUFFIX(const Dims *d, real scale, const real *q, const real *k, const real *v,    \
                               const real *g, const real *beta, const real *lam, const uint8_t *active,   \
                               real *S, int64_t *slot_all, real *decay_all, const double *tau,            \
                               int64_t *n_all, real *ibar_all, int64_t *pos_all, int64_t *opened,         \
                               real *o) {                                                                 \
    Py_ssize_t H = d->H, Dk = d->Dk, Dv = d->Dv, L = d->L, size = Dk * Dv;                             \
    real *rq0 = malloc(sizeof(real) * (4 * Dv + size)), *rk0 = rq0 + Dv, *rq = rk0 + Dv, *rk = rq + Dv;  \
    real *newest = rk + Dv;                                                                            \
    Py_ssize_t *dest = malloc(sizeof(Py_ssize_t) * L), *from = malloc(sizeof(Py_ssize_t) * L);         \
    double *pair_sum = malloc(sizeof(double) * L), *acc = malloc(sizeof(double) * 3 * Dv);             \
    int64_t *n_new = malloc(sizeof(int64_t) * 3 * L), *buffer = n_new + L, *freed = buffer + L;        \
    real *ibar_new = malloc(sizeof(real) * L);                                                         \
    int64_t overflow = 0;                                                                              \
    for (Py_ssize_t b = 0; b < d->B && !overflow; b++) {                                               \
        int on = active[b];                                                                            \
        for (Py_ssize_t h = 0; h < H && !overflow; h++) {                                              \
            Py_ssize_t bh = b * H + h;                                                                 \
            const real *qt = q + bh * Dk, *kt = k + bh * Dk, *vt = v + bh * Dv, *lt = lam + bh * L;    \
            real *Sh = S + bh * L * size, *ot = o + bh * Dv, *ibar = ibar_all + bh * L;                \
            int64_t *n = n_all + bh * L, *slot = slot_all + bh * L;                                    \
            /* the slots' states are c times their buffers after this token's transition */          \
            real c = decay_all[bh] * EXP(g[bh]), bt = beta ? beta[bh] : (real)1, qk = 0;               \
            for (Py_ssize_t a = 0; a < Dk; a++) qk += qt[a] * kt[a];                                   \
            reads_##SUFFIX(Dk, Dv, Sh + slot[0] * size, qt, kt, rq0, rk0);  /* the score needs them */ \
            real score = 0;                                                                            \
            if (d->scored)                                                                             \
                score = newest_##SUFFIX(d, Sh + slot[0] * size, kt, vt, beta ? rk0 : NULL, bt, c, newest, acc); \
            int empty = 1;                                                                             \
            for (Py_ssize_t i = 0; i < L; i++) empty &= n[i] == 0;                                   \
            for (Py_ssize_t i = 0; i + 1 < L; i++) pair_sum[i] = (double)(ibar[i] + ibar[i + 1]);      \
            if (empty) score = 0;                                                                      \
            int opens = plan_step(d, n, pair_sum, pos_all[b], score, tau[h], on, dest);               \
            if (opens < 0) { overflow = pos_all[b]; break; }                                           \
            if (opens && pos_all[b] > 0) opened[bh]++;                                                 \
            move_books_##SUFFIX(L, dest, n, ibar, n_new, ibar_new);                                    \
            for (Py_ssize_t i = 0; i < Dv; i++) ot[i] = 0;                                             \
            if (!on) continue;  /* padding: nothing changes, the output is zero */                    \
            n[0] += 1; ibar[0] += score;                                                               \
            /* new slot m takes the buffer of the newest old slot j with dest[j] = m; the others merge in */ \
            Py_ssize_t nfreed = 0;                                                                     \
            for (Py_ssize_t m = 0; m < L; m++) from[m] = -1;                                           \
            for (Py_ssize_t j = 0; j < L; j++) {                                                       \
                Py_ssize_t m = dest[j];                                                                \
                if (from[m] < 0) { from[m] = j; buffer[m] = slot[j]; continue; }                       \
                real *X = Sh + buffer[m] * size, *Y = Sh + slot[j] * size;                             \
                for (Py_ssize_t i = 0; i < size; i++) X[i] += Y[i];                                    \
                from[m] = L;  /* merged: its reads are not old slot 0's */                            \
                freed[nfreed++] = slot[j];                                                             \
            }                                                                                          \
            real creads = c, f = 1;  /* the new states are creads T(buffer) */                        \
            if (!(c >= (real)DECAY_MIN)) { f = c; c = 1; }  /* the buffers take the decay in */       \
            for (Py_ssize_t m = 0, next = 0; m < L; m++) {                                             \
                if (from[m] < 0) {  /* no old slot maps here: a freed buffer, empty (slot 0: the token's) */ \
                    buffer[m] = freed[next++];                                                         \
                    if (m) memset(Sh + buffer[m] * size, 0, sizeof(real) * size);                      \
                    continue;                                                                          \
                }                                                                                      \
                real *X = Sh + buffer[m] * size, *mq = rq0, *mk = rk0;                                 \
                if (from[m] != 0) { reads_##SUFFIX(Dk, Dv, X, qt, kt, rq, rk); mq = rq; mk = rk; }     \
                if (beta) carry_##SUFFIX(Dk, Dv, X, kt, mk, bt, f);                                    \
                else if (f != 1) carry_##SUFFIX(Dk, Dv, X, kt, NULL, bt, f);                           \
                real w = lt[m] * creads;  /* lam[m] q^T (new S_m) = lam[m] creads q^T T(X) */          \
                for (Py_ssize_t i = 0; i < Dv; i++) ot[i] += w * (beta ? mq[i] - bt * qk * mk[i] : mq[i]); \
            }                                                                                          \
            memcpy(slot, buffer, sizeof(int64_t) * L);                                                 \
            decay_all[bh] = c;                                                                         \
            write_##SUFFIX(Dk, Dv, Sh + slot[0] * size, kt, vt, bt / c, from[0] >= 0);                 \
            for (Py_ssize_t i = 0; i < Dv; i++) ot[i] = scale * (ot[i] + lt[0] * bt * qk * vt[i]);     \
        }                                                                                              \
        if (!overflow) pos_all[b] += on;                                                               \
    }                                                                                                  \
    free(rq0); free(dest); free(from); free(pair_sum); free(acc); free(n_new); free(ibar_new);         \
    return overflow;                                                                                   \
}

DEFINE_DECODE(f32, float, expf)
DEFINE_DECODE(f64, double, exp)

/* decode(policy, state_drift, merge_oldest, scored, is_double, block_size, eps, scale, dims (B, H, Dk, Dv, L), q,
 *        k, v, g, beta, lam, active, S, slot, decay, tau, n, ibar, pos, opened, o) -> overflow position (0 if none) */
static PyObject *py_decode(PyObject *self, PyObject *args) {
    Dims d;
    Py_buffer buf[16];
    memset(buf, 0, sizeof buf);
    int is_double;
    double scale;
    d.T = 1;
    d.C = 1;
    if (!PyArg_ParseTuple(args, "iiiiildd(nnnnn)y*y*y*y*y*y*y*w*w*w*y*w*w*w*w*w*", &d.policy, &d.state_drift,
                          &d.merge_oldest, &d.scored, &is_double, &d.block_size, &d.eps, &scale, &d.B, &d.H, &d.Dk,
                          &d.Dv, &d.L, &buf[0], &buf[1], &buf[2], &buf[3], &buf[4], &buf[5], &buf[6], &buf[7], &buf[8],
                          &buf[9], &buf[10], &buf[11], &buf[12], &buf[13], &buf[14], &buf[15]))
        return NULL;
    void *p[16];
    for (int i = 0; i < 16; i++) p[i] = buf[i].buf;
    const void *beta = buf[4].len ? p[4] : NULL;
    int64_t overflow;
    Py_BEGIN_ALLOW_THREADS
    if (is_double)
        overflow = decode_f64(&d, scale, p[0], p[1], p[2], p[3], beta, p[5], p[6], p[7], p[8], p[9], p[10], p[11],
                              p[12], p[13], p[14], p[15]);
    else
        overflow = decode_f32(&d, (float)scale, p[0], p[1], p[2], p[3], beta, p[5], p[6], p[7], p[8], p[9], p[10],
                              p[11], p[12], p[13], p[14], p[15]);
    Py_END_ALLOW_THREADS
    for (int i = 0; i < 16; i++) PyBuffer_Release(&buf[i]);
    return PyLong_FromLongLong(overflow);
}

static PyMethodDef methods[] = {
    {"decode", py_decode, METH_VARARGS, "One token of DLA for every row and head, compiled (see _decode.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_decode", NULL, -1, methods};

PyMODINIT_FUNC PyInit__decode(void) { return PyModule_Create(&module); }
