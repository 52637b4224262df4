/* The decision scan of `dla_shared.scan` compiled: the same computation as its numpy loop, one
 * (batch row, head) at a time, so one token costs O(Dk Dv) with no array temporaries.
 *
 * `scan_f32` and `scan_f64` compute in float or double (the dtype of X, k, v, g, beta and ibar), as the
 * numpy scan computes in X's dtype; the three norms are summed in double.  Every array is C-contiguous
 * and checked by the Python wrapper (`dla_shared.scan._compiled`):
 *   k [B, T, H, Dk], v [B, T, H, Dv], g and beta [B, T, H] (beta an empty buffer for the diagonal
 *   transition), active uint8 [B, T], X [B, H, Dk, Dv], tau float64 [H]; updated in place: n int64 [B, H, L],
 *   ibar [B, H, L], opened int64 [B, H]; written: sigma int16 [B, H, T, L + C].  pos int64 [B] is read only.
 * Where no decision reads a score (`scored`, `DLAConfig.scored`), k, v, g and beta are empty buffers, X is
 * not carried and every score is 0.
 * Returns the position at which a fenwick cache runs out of levels (the wrapper raises), else 0.
 */
#include "_common.h"

#define DEFINE_SCAN(SUFFIX, real, EXP)                                                              \
static int64_t scan_##SUFFIX(const Dims *d, const real *k, const real *v, const real *g, const real *beta,       \
                    const uint8_t *active, real *X, const double *tau, int64_t *n_all, real *ibar_all, \
                    const int64_t *pos_all, int64_t *opened, int16_t *sigma) {                         \
    Py_ssize_t T = d->T, H = d->H, Dk = d->Dk, Dv = d->Dv, L = d->L, C = d->C, W = L + C;              \
    real *S = malloc(sizeof(real) * (Dk * Dv + Dv)), *kX = S + Dk * Dv;                                \
    Py_ssize_t *dest = malloc(sizeof(Py_ssize_t) * L), *slot_of = malloc(sizeof(Py_ssize_t) * W);     \
    double *pair_sum = malloc(sizeof(double) * L), *acc = malloc(sizeof(double) * 3 * Dv);             \
    int64_t *n_new = malloc(sizeof(int64_t) * L);                                                      \
    real *ibar_new = malloc(sizeof(real) * L);                                                         \
    int64_t overflow = 0;                                                                              \
    for (Py_ssize_t b = 0; b < d->B && !overflow; b++)                                                 \
    for (Py_ssize_t h = 0; h < H && !overflow; h++) {                                                  \
        real *Xh = X + (b * H + h) * Dk * Dv, *ibar = ibar_all + (b * H + h) * L;                      \
        int64_t *n = n_all + (b * H + h) * L, pos = pos_all[b];                                        \
        for (Py_ssize_t t = 0; t < T; t++) {                                                           \
            if (t % C == 0)                                                                            \
                for (Py_ssize_t i = 0; i < W; i++) slot_of[i] = i < L ? i : -1;                        \
            Py_ssize_t at = (b * T + t) * H + h;                                                       \
            const real *kt = NULL, *vt = NULL;  /* the data is read only where a decision reads a score */ \
            real decay = 1, bt = beta ? beta[at] : (real)1, score = 0;                                 \
            if (d->scored) { kt = k + at * Dk; vt = v + at * Dv; decay = EXP(g[at]); }                 \
            if (d->scored && beta) {                                                                   \
                for (Py_ssize_t j = 0; j < Dv; j++) kX[j] = 0;                                         \
                for (Py_ssize_t i = 0; i < Dk; i++)                                                    \
                    for (Py_ssize_t j = 0; j < Dv; j++) kX[j] += kt[i] * Xh[i * Dv + j];               \
            }                                                                                          \
            if (d->scored) score = newest_##SUFFIX(d, Xh, kt, vt, beta ? kX : NULL, bt, decay, S, acc);    \
            int empty = 1, on = active[b * T + t];                                                     \
            for (Py_ssize_t i = 0; i < L; i++) empty &= n[i] == 0;                                   \
            for (Py_ssize_t i = 0; i + 1 < L; i++) pair_sum[i] = (double)(ibar[i] + ibar[i + 1]);      \
            if (empty) score = 0;                                                                      \
            int opens = plan_step(d, n, pair_sum, pos, score, tau[h], on, dest);                       \
            if (opens < 0) { overflow = pos; break; }                                                  \
            if (opens && pos > 0) opened[b * H + h]++;                                                 \
            move_books_##SUFFIX(L, dest, n, ibar, n_new, ibar_new);                                    \
            if (on) {                                                                                  \
                n[0] += 1; ibar[0] += score; pos += 1;                                                 \
                for (Py_ssize_t i = 0; i < (d->scored ? Dk : 0); i++)                                  \
                    for (Py_ssize_t j = 0; j < Dv; j++) {                                              \
                        real tok = beta ? bt * (kt[i] * vt[j]) : kt[i] * vt[j];                        \
                        Xh[i * Dv + j] = opens ? tok : S[i * Dv + j] + tok;                            \
                    }                                                                                  \
            }                                                                                          \
            for (Py_ssize_t i = 0; i < W; i++) if (slot_of[i] >= 0) slot_of[i] = dest[slot_of[i]];   \
            if (on) slot_of[L + t % C] = 0;                                                            \
            int16_t *row = sigma + ((b * H + h) * T + t) * W;                                          \
            for (Py_ssize_t i = 0; i < W; i++) row[i] = (int16_t)slot_of[i];                           \
        }                                                                                              \
    }                                                                                                  \
    free(S); free(dest); free(slot_of); free(pair_sum); free(acc); free(n_new); free(ibar_new);        \
    return overflow;                                                                                   \
}

DEFINE_SCAN(f32, float, expf)
DEFINE_SCAN(f64, double, exp)

/* scan(policy, state_drift, merge_oldest, scored, is_double, block_size, eps, dims (B, T, H, Dk, Dv, L, C), k, v,
 *      g, beta, active, X, tau, n, ibar, pos, opened, sigma) -> overflow position (0 if none) */
static PyObject *py_scan(PyObject *self, PyObject *args) {
    Dims d;
    Py_buffer buf[12];
    memset(buf, 0, sizeof buf);
    int is_double;
    if (!PyArg_ParseTuple(args, "iiiiild(nnnnnnn)y*y*y*y*y*w*y*w*w*y*w*w*", &d.policy, &d.state_drift,
                          &d.merge_oldest, &d.scored, &is_double, &d.block_size, &d.eps, &d.B, &d.T, &d.H, &d.Dk,
                          &d.Dv, &d.L, &d.C, &buf[0], &buf[1], &buf[2], &buf[3], &buf[4], &buf[5], &buf[6], &buf[7],
                          &buf[8], &buf[9], &buf[10], &buf[11]))
        return NULL;
    const void *beta = buf[3].len ? buf[3].buf : NULL;
    int64_t overflow;
    Py_BEGIN_ALLOW_THREADS
    if (is_double)
        overflow = scan_f64(&d, buf[0].buf, buf[1].buf, buf[2].buf, beta, buf[4].buf, buf[5].buf, buf[6].buf,
                            buf[7].buf, buf[8].buf, buf[9].buf, buf[10].buf, buf[11].buf);
    else
        overflow = scan_f32(&d, buf[0].buf, buf[1].buf, buf[2].buf, beta, buf[4].buf, buf[5].buf, buf[6].buf,
                            buf[7].buf, buf[8].buf, buf[9].buf, buf[10].buf, buf[11].buf);
    Py_END_ALLOW_THREADS
    for (int i = 0; i < 12; i++) PyBuffer_Release(&buf[i]);
    return PyLong_FromLongLong(overflow);
}

static PyMethodDef methods[] = {
    {"scan", py_scan, METH_VARARGS, "The decision scan of dla_shared.scan, compiled (see _scan.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_scan", NULL, -1, methods};

PyMODINIT_FUNC PyInit__scan(void) { return PyModule_Create(&module); }
