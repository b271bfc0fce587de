/* engine/ops/ops_attn.c: causal scaled-dot-product attention with GQA, an optional sliding window and optional
 * dropout on the attention probabilities, f32/f64; the counter-based RNG is rng.c's.
 * Flash-style memory: forward keeps only the per-row logsumexp [B, nH, T]; backward recomputes P block by
 * block, and with dropout regenerates the mask from (seed, key, b, h, i, j) instead of storing it. q/k/v are read in place through their strides (e.g. narrowed out of GPT-2's fused c_attn output).
 * Work is split over (batch, head, query block) in forward and (batch, kv head) in backward; each output
 * element is computed by one task with a fixed order of operations, so the thread count never changes the
 * bits. BLAS runs single-threaded inside the OpenMP region (OpenBLAS's OpenMP build does so by itself).
 * bf16/f16: q, k, v are converted to f32, the f32 code runs, the output is rounded once (torch's CPU
 * attention computes in f32 too; ops_shape.c). The node keeps q/k/v as given (bf16) and the f32 output and
 * logsumexp, so backward computes exactly what the f32 op would on the same values. */
#include "internal.h"

#include <math.h>

#include "fl_math.h"

enum { ATTN_BQ = 64 };  /* query rows per block: bounds the score buffer to ATTN_BQ x T per task */

/* Geometry of one call. Strides are in elements; the last dim is contiguous. */
typedef struct {
    int32_t dt;
    int64_t b, t, nh, nkv, hd, window;
    double scale;
    /* dropout (p > 0 only): element (b, h, i, j) is kept iff its 32-bit word w >= thr, i.e. iff the uniform
     * w 2^-32 >= p (thr = ceil(p 2^32), exact); kept values times keep = 1/(1-p). */
    double p, keep;
    uint64_t seed, stream;
    uint32_t thr;
    const char *q, *k, *v;
    int64_t sq[3], sk[3], sv[3];   /* strides of dims 0..2 */
    size_t es;
} attn_geo;

/* Key range [lo, hi) a query block [i0, i1) can see. */
static void key_range(const attn_geo *g, int64_t i0, int64_t i1, int64_t *lo, int64_t *hi) {
    *lo = g->window > 0 ? fl_max64(0, i0 - g->window + 1) : 0;
    *hi = i1;
}
static int64_t row_lo(const attn_geo *g, int64_t i) { return g->window > 0 ? fl_max64(0, i - g->window + 1) : 0; }

/* The RNG element of probability (b, h, i, j): a function of the position only, so blocking, the split of tasks
 * over threads and the layout of q/k/v never change a mask bit. */
static uint64_t drop_elem(const attn_geo *g, int64_t b, int64_t h, int64_t i, int64_t j) {
    return (((uint64_t)b * (uint64_t)g->nh + (uint64_t)h) * (uint64_t)g->t + (uint64_t)i) * (uint64_t)g->t + (uint64_t)j;
}

/* Max and sum of a row in ATTN_LANES fixed lanes (element j in lane j % ATTN_LANES), combined in a fixed order:
 * GCC vectorises them, and the bits depend on the row alone, never on the thread count or the vector width. */
enum { ATTN_LANES = 16 };
#define DEFINE_ROW_LANES(T)                                                                                      \
    static inline T row_max_##T(const T *x, int64_t n) {                                                         \
        T lane[ATTN_LANES], m = -INFINITY;                                                                        \
        for (int l = 0; l < ATTN_LANES; l++) lane[l] = -INFINITY;                                                 \
        int64_t j = 0;                                                                                            \
        for (; j + ATTN_LANES <= n; j += ATTN_LANES)                                                              \
            for (int l = 0; l < ATTN_LANES; l++) lane[l] = x[j + l] > lane[l] ? x[j + l] : lane[l];               \
        for (int l = 0; l < ATTN_LANES; l++) m = lane[l] > m ? lane[l] : m;                                       \
        for (; j < n; j++) m = x[j] > m ? x[j] : m;                                                               \
        return m;                                                                                                 \
    }                                                                                                            \
    static inline T row_sum_##T(const T *x, int64_t n) {                                                         \
        T lane[ATTN_LANES];                                                                                       \
        for (int l = 0; l < ATTN_LANES; l++) lane[l] = 0;                                                         \
        int64_t j = 0;                                                                                            \
        for (; j + ATTN_LANES <= n; j += ATTN_LANES)                                                              \
            for (int l = 0; l < ATTN_LANES; l++) lane[l] += x[j + l];                                             \
        for (int w = ATTN_LANES / 2; w >= 1; w /= 2)                                                              \
            for (int l = 0; l < w; l++) lane[l] += lane[l + w];                                                   \
        T s = lane[0];                                                                                            \
        for (; j < n; j++) s += x[j];                                                                             \
        return s;                                                                                                 \
    }
DEFINE_ROW_LANES(float)
DEFINE_ROW_LANES(double)

/* In place over S [bq, klen] (scores of rows i0.., keys klo..): masked softmax rows; lse[r] = logsumexp.
 * The exp loop is separate from the (lane) max and sum so that all three vectorise. */
#define DEFINE_SOFTMAX_ROWS(T, EXP, LOG)                                                                         \
    static void softmax_rows_##T(const attn_geo *g, T *s, int64_t i0, int64_t bq, int64_t klo, int64_t klen,      \
                                 T *lse) {                                                                       \
        for (int64_t r = 0; r < bq; r++) {                                                                       \
            int64_t i = i0 + r, jlo = row_lo(g, i) - klo, jhi = i - klo; /* inclusive */                        \
            T *row = s + r * klen, m = row_max_##T(row + jlo, jhi - jlo + 1);                                     \
            for (int64_t j = jlo; j <= jhi; j++) row[j] = EXP(row[j] - m);                                        \
            T sum = row_sum_##T(row + jlo, jhi - jlo + 1);                                                        \
            T inv = (T)1 / sum;                                                                                   \
            for (int64_t j = 0; j < jlo; j++) row[j] = 0;                                                         \
            for (int64_t j = jlo; j <= jhi; j++) row[j] *= inv;                                                   \
            for (int64_t j = jhi + 1; j < klen; j++) row[j] = 0;                                                  \
            lse[r] = m + LOG(sum);                                                                                \
        }                                                                                                        \
    }
DEFINE_SOFTMAX_ROWS(float, fl_expf, logf)
DEFINE_SOFTMAX_ROWS(double, exp, log)

/* In place over the softmax rows of S [bq, klen] (rows i0.. of head (b, h), keys klo..): P -> P M / (1-p).
 * w holds one row's words (>= klen). Masked-out keys are already 0 and draw nothing. */
#define DEFINE_DROP_ROWS(T)                                                                                      \
    static void drop_rows_##T(const attn_geo *g, T *s, uint32_t *w, int64_t b, int64_t h, int64_t i0, int64_t bq, \
                              int64_t klo, int64_t klen) {                                                       \
        T keep = (T)g->keep;                                                                                      \
        uint32_t thr = g->thr;                                                                                    \
        for (int64_t r = 0; r < bq; r++) {                                                                       \
            int64_t i = i0 + r, lo = row_lo(g, i), n = i - lo + 1;                                               \
            fl_rng_bits_at(g->seed, g->stream, drop_elem(g, b, h, i, lo), n, w);                                   \
            T *row = s + r * klen + (lo - klo);                                                                   \
            for (int64_t j = 0; j < n; j++) row[j] = w[j] >= thr ? row[j] * keep : (T)0;                          \
        }                                                                                                        \
    }
DEFINE_DROP_ROWS(float)
DEFINE_DROP_ROWS(double)

/* Backward rows: s holds scaled scores -> P = exp(s - lse) (masked); dp holds dO V^T -> dS = P (dP - D). */
#define DEFINE_DS_ROWS(T, EXP)                                                                                   \
    static void ds_rows_##T(const attn_geo *g, T *s, T *dp, const T *lse, const T *dd, int64_t i0, int64_t bq,   \
                            int64_t klo, int64_t klen) {                                                         \
        for (int64_t r = 0; r < bq; r++) {                                                                       \
            int64_t i = i0 + r, jlo = row_lo(g, i) - klo, jhi = i - klo;                                         \
            T *ps = s + r * klen, *pd = dp + r * klen, l = lse[r], d = dd[r];                                     \
            for (int64_t j = 0; j < jlo; j++) ps[j] = pd[j] = 0;                                                  \
            for (int64_t j = jlo; j <= jhi; j++) {                                                                \
                T p = EXP(ps[j] - l);                                                                             \
                ps[j] = p;                                                                                        \
                pd[j] = p * (pd[j] - d);                                                                          \
            }                                                                                                    \
            for (int64_t j = jhi + 1; j < klen; j++) ps[j] = pd[j] = 0;                                           \
        }                                                                                                        \
    }
DEFINE_DS_ROWS(float, fl_expf)
DEFINE_DS_ROWS(double, exp)

/* The same with dropout (m = M / (1-p) regenerated from the key): s -> P m (for dV = (P m)^T dO); dp holds
 * dO V^T, the gradient of P m, so dP = dp m and dS = P (dP - D), where D = rowsum(dO O) = rowsum(P dP) still
 * (O = (P m) V gives rowsum(dO O) = sum_j (P m)_ij (dO V^T)_ij). */
#define DEFINE_DS_DROP_ROWS(T, EXP)                                                                              \
    static void ds_drop_rows_##T(const attn_geo *g, T *s, T *dp, const T *lse, const T *dd, uint32_t *w, int64_t b, \
                                 int64_t h, int64_t i0, int64_t bq, int64_t klo, int64_t klen) {                 \
        T keep = (T)g->keep;                                                                                      \
        uint32_t thr = g->thr;                                                                                    \
        for (int64_t r = 0; r < bq; r++) {                                                                       \
            int64_t i = i0 + r, lo = row_lo(g, i), jlo = lo - klo, jhi = i - klo;                                 \
            T *ps = s + r * klen, *pd = dp + r * klen, l = lse[r], d = dd[r];                                     \
            fl_rng_bits_at(g->seed, g->stream, drop_elem(g, b, h, i, lo), jhi - jlo + 1, w);                       \
            for (int64_t j = 0; j < jlo; j++) ps[j] = pd[j] = 0;                                                  \
            for (int64_t j = jlo; j <= jhi; j++) {                                                                \
                T p = EXP(ps[j] - l), m = w[j - jlo] >= thr ? keep : (T)0;                                        \
                ps[j] = p * m;                                                                                    \
                pd[j] = p * (pd[j] * m - d);                                                                      \
            }                                                                                                    \
            for (int64_t j = jhi + 1; j < klen; j++) ps[j] = pd[j] = 0;                                           \
        }                                                                                                        \
    }
DEFINE_DS_DROP_ROWS(float, fl_expf)
DEFINE_DS_DROP_ROWS(double, exp)

static const char *qptr(const attn_geo *g, int64_t b, int64_t h, int64_t i) { return g->q + (size_t)(b * g->sq[0] + i * g->sq[1] + h * g->sq[2]) * g->es; }
static const char *kptr(const attn_geo *g, int64_t b, int64_t h, int64_t i) { return g->k + (size_t)(b * g->sk[0] + i * g->sk[1] + h * g->sk[2]) * g->es; }
static const char *vptr(const attn_geo *g, int64_t b, int64_t h, int64_t i) { return g->v + (size_t)(b * g->sv[0] + i * g->sv[1] + h * g->sv[2]) * g->es; }

/* out [B, T, nH, hd] contiguous; lse [B, nH, T] in the compute dtype. */
static int attn_forward(const attn_geo *g, char *out, char *lse) {
    int64_t nblk = (g->t + ATTN_BQ - 1) / ATTN_BQ, tasks = g->b * g->nh * nblk, ldo = g->nh * g->hd;
    int rc = FL_OK;
    /* Always an active region, even for one task: BLAS must run single-threaded here (see ops_matmul.c). */
    #pragma omp parallel for schedule(dynamic)
    for (int64_t task = 0; task < tasks; task++) {
        int64_t b = task / (g->nh * nblk), h = (task / nblk) % g->nh, blk = task % nblk, kvh = h / (g->nh / g->nkv);
        int64_t i0 = blk * ATTN_BQ, i1 = fl_min64(g->t, i0 + ATTN_BQ), bq = i1 - i0, klo, khi;
        key_range(g, i0, i1, &klo, &khi);
        int64_t klen = khi - klo;
        void *s = malloc(g->es * (size_t)(bq * klen));
        uint32_t *w = g->p > 0 ? malloc(sizeof *w * (size_t)klen) : NULL;
        if (!s || (g->p > 0 && !w)) {
            #pragma omp atomic write
            rc = FL_ENOMEM;   /* any thread may fail: atomic, and reported once after the loop */
            free(s); free(w); continue;
        }
        /* S = scale Q K^T over the visible keys */
        fl_gemm_call(g->dt, false, true, bq, klen, g->hd, g->scale, qptr(g, b, h, i0), g->sq[1], kptr(g, b, kvh, klo), g->sk[1], 0.0, s, klen);
        void *l = lse + (size_t)((b * g->nh + h) * g->t + i0) * g->es;  /* rows of dtype dt: void, not char */
        if (g->dt == FL_F32) softmax_rows_float(g, s, i0, bq, klo, klen, (float *)l);
        else softmax_rows_double(g, s, i0, bq, klo, klen, (double *)l);
        if (g->p > 0) {  /* lse stays that of the un-dropped P: backward recomputes P, then the mask */
            if (g->dt == FL_F32) drop_rows_float(g, s, w, b, h, i0, bq, klo, klen);
            else drop_rows_double(g, s, w, b, h, i0, bq, klo, klen);
        }
        /* O = P V (P M / (1-p) with dropout) */
        fl_gemm_call(g->dt, false, false, bq, g->hd, klen, 1.0, s, klen, vptr(g, b, kvh, klo), g->sv[1], 0.0,
             out + (size_t)((b * g->t + i0) * ldo + h * g->hd) * g->es, ldo);
        free(s); free(w);
    }
    return rc;   /* fl_attention names the buffers */
}

/* dq [B,T,nH,hd], dk/dv [B,T,nKV,hd], all contiguous, dk/dv zeroed. dO and O contiguous [B,T,nH,hd]. */
static int attn_backward_raw(const attn_geo *g, const char *lse, const char *dout, const char *o, char *dq, char *dk, char *dv) {
    int64_t nblk = (g->t + ATTN_BQ - 1) / ATTN_BQ, group = g->nh / g->nkv, tasks = g->b * g->nkv;
    int64_t ldo = g->nh * g->hd, ldk = g->nkv * g->hd;
    int rc = FL_OK;
    /* Always an active region, even for one task: BLAS must run single-threaded here (see ops_matmul.c). */
    #pragma omp parallel for schedule(dynamic)
    for (int64_t task = 0; task < tasks; task++) {
        int64_t b = task / g->nkv, kvh = task % g->nkv;
        size_t cap = g->es * (size_t)(ATTN_BQ * g->t);
        void *s = malloc(cap), *dp = malloc(cap), *dd = malloc(g->es * ATTN_BQ);  /* of dtype dt */
        uint32_t *w = g->p > 0 ? malloc(sizeof *w * (size_t)g->t) : NULL;
        if (!s || !dp || !dd || (g->p > 0 && !w)) {
            #pragma omp atomic write
            rc = FL_ENOMEM;   /* any thread may fail: atomic, and reported once after the loop */
            free(s); free(dp); free(dd); free(w); continue;
        }
        char *dkb = dk + (size_t)(b * g->t * ldk + kvh * g->hd) * g->es, *dvb = dv + (size_t)(b * g->t * ldk + kvh * g->hd) * g->es;
        /* dK/dV of this kv head: the group's query heads in order, then query blocks in order */
        for (int64_t h = kvh * group; h < (kvh + 1) * group; h++)
            for (int64_t blk = 0; blk < nblk; blk++) {
                int64_t i0 = blk * ATTN_BQ, i1 = fl_min64(g->t, i0 + ATTN_BQ), bq = i1 - i0, klo, khi;
                key_range(g, i0, i1, &klo, &khi);
                int64_t klen = khi - klo;
                size_t off = (size_t)((b * g->t + i0) * ldo + h * g->hd);
                const void *dob = dout + off * g->es, *ob = o + off * g->es;
                const void *l = lse + (size_t)((b * g->nh + h) * g->t + i0) * g->es;
                /* D_i = rowsum(dO * O) */
                for (int64_t r = 0; r < bq; r++) {
                    double acc = 0;
                    for (int64_t d = 0; d < g->hd; d++)
                        acc += g->dt == FL_F32 ? (double)((const float *)dob)[r * ldo + d] * ((const float *)ob)[r * ldo + d]
                                               : ((const double *)dob)[r * ldo + d] * ((const double *)ob)[r * ldo + d];
                    if (g->dt == FL_F32) ((float *)dd)[r] = (float)acc;
                    else ((double *)dd)[r] = acc;
                }
                fl_gemm_call(g->dt, false, true, bq, klen, g->hd, g->scale, qptr(g, b, h, i0), g->sq[1], kptr(g, b, kvh, klo), g->sk[1], 0.0, s, klen);
                fl_gemm_call(g->dt, false, true, bq, klen, g->hd, 1.0, dob, ldo, vptr(g, b, kvh, klo), g->sv[1], 0.0, dp, klen);
                if (g->p > 0) {
                    if (g->dt == FL_F32)
                        ds_drop_rows_float(g, (float *)s, (float *)dp, (const float *)l, (const float *)dd, w, b, h, i0, bq, klo, klen);
                    else
                        ds_drop_rows_double(g, (double *)s, (double *)dp, (const double *)l, (const double *)dd, w, b, h, i0, bq, klo, klen);
                } else if (g->dt == FL_F32) {
                    ds_rows_float(g, (float *)s, (float *)dp, (const float *)l, (const float *)dd, i0, bq, klo, klen);
                } else {
                    ds_rows_double(g, (double *)s, (double *)dp, (const double *)l, (const double *)dd, i0, bq, klo, klen);
                }
                /* dQ = scale dS K;  dK += scale dS^T Q;  dV += P^T dO (P M / (1-p) with dropout) */
                fl_gemm_call(g->dt, false, false, bq, g->hd, klen, g->scale, dp, klen, kptr(g, b, kvh, klo), g->sk[1], 0.0, dq + off * g->es, ldo);
                fl_gemm_call(g->dt, true, false, klen, g->hd, bq, g->scale, dp, klen, qptr(g, b, h, i0), g->sq[1], 1.0,
                     dkb + (size_t)(klo * ldk) * g->es, ldk);
                fl_gemm_call(g->dt, true, false, klen, g->hd, bq, 1.0, s, klen, dob, ldo, 1.0, dvb + (size_t)(klo * ldk) * g->es, ldk);
            }
        free(s); free(dp); free(dd); free(w);
    }
    return rc < 0 ? fl_fail(FL_ENOMEM, "attention backward: score buffers of %d x %" PRId64, ATTN_BQ, g->t) : FL_OK;
}

/* A view is usable in place when its last dim is contiguous and rows do not overlap (BLAS lda >= hd). */
static bool usable(const fl_tensor *t) {
    return (t->shape[3] <= 1 || t->stride[3] == 1) && t->stride[1] >= t->shape[3] && t->stride[1] > 0;
}

/* Mixes the key into a fixed hash of its own (as ops_act.c's dropout does with "dropout"): calls with different
 * keys draw independent masks, and no key makes the stream of a plain dropout or a named initialisation. */
static uint64_t attn_stream(uint64_t key) { return fl_rng_hash_name("attention_dropout") ^ (key * 0x9E3779B97F4A7C15ull); }

static void geo_fill(attn_geo *g, const fl_tensor *q, const fl_tensor *k, const fl_tensor *v, double scale, int64_t window,
                     double p, uint64_t seed, uint64_t key) {
    g->dt = q->dtype;
    g->es = fl_dtype_size(q->dtype);
    g->b = q->shape[0]; g->t = q->shape[1]; g->nh = q->shape[2]; g->nkv = k->shape[2]; g->hd = q->shape[3];
    g->scale = scale; g->window = window;
    g->q = fl_tensor_data(q); g->k = fl_tensor_data(k); g->v = fl_tensor_data(v);
    for (int d = 0; d < 3; d++) { g->sq[d] = q->stride[d]; g->sk[d] = k->stride[d]; g->sv[d] = v->stride[d]; }
    g->p = p; g->seed = seed; g->stream = attn_stream(key);
    g->keep = p > 0 ? 1.0 / (1.0 - p) : 1.0;
    /* p 2^32 is exact in a double, so its ceiling is the exact threshold. Above 1 - 2^-32 nothing may be kept,
     * and no 32-bit threshold says so: keep the words >= 2^32 - 1 with factor 0 instead. */
    double thr = ceil(p * 4294967296.0);
    if (thr > 4294967295.0) { g->thr = 0xFFFFFFFFu; g->keep = 0; }
    else g->thr = (uint32_t)thr;
}

/* saved: q, k, v (the views as given, detached), out (detached), lse; f[0] scale, f[1] p, i[0] window, i[1] seed,
 * i[2] key */
static int attention_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0]) return FL_OK;
    const fl_tensor *q = n->saved[0], *k = n->saved[1], *v = n->saved[2], *o = n->saved[3], *lse = n->saved[4];
    fl_tensor *g = fl_contiguous(go[0]);
    fl_tensor *dq = g ? fl_tensor_empty(4, q->shape, q->dtype, FL_CPU) : NULL;
    fl_tensor *dk = dq ? fl_tensor_zeros(4, k->shape, k->dtype, FL_CPU) : NULL;
    fl_tensor *dv = dk ? fl_tensor_zeros(4, v->shape, v->dtype, FL_CPU) : NULL;
    int rc = FL_ENOMEM;
    if (dv) {
        attn_geo geo;
        geo_fill(&geo, q, k, v, n->f[0], n->i[0], n->f[1], (uint64_t)n->i[1], (uint64_t)n->i[2]);
        rc = attn_backward_raw(&geo, fl_tensor_data(lse), fl_tensor_data(g), fl_tensor_data(o), fl_tensor_data(dq), fl_tensor_data(dk),
                               fl_tensor_data(dv));
    }
    if (rc == FL_OK) {
        if (fl_node_needs(n, 0)) { gi[0] = dq; dq = NULL; }
        if (fl_node_needs(n, 1)) { gi[1] = dk; dk = NULL; }
        if (fl_node_needs(n, 2)) { gi[2] = dv; dv = NULL; }
    }
    fl_tensor_release(g); fl_tensor_release(dq); fl_tensor_release(dk); fl_tensor_release(dv);
    return rc;
}

typedef struct { double scale; int64_t window; double p; uint64_t seed, key; } attn_args;

static fl_tensor *attention_f32(const void *p, fl_tensor *const *ins, fl_tensor **aux) {
    const attn_args *a = p;
    return fl_attention_dropout(ins[0], ins[1], ins[2], a->scale, a->window, a->p, a->seed, a->key);
}

fl_tensor *fl_attention(const fl_tensor *q, const fl_tensor *k, const fl_tensor *v, double scale, int64_t window) {
    return fl_attention_dropout(q, k, v, scale, window, 0.0, 0, 0);
}

fl_tensor *fl_attention_dropout(const fl_tensor *q, const fl_tensor *k, const fl_tensor *v, double scale, int64_t window,
                                double p, uint64_t seed, uint64_t key) {
    const char *op = "attention";
    const fl_tensor *all[3] = {q, k, v};
    if (!(p >= 0.0 && p < 1.0)) return fl_fail_null(FL_EINVAL, "attention: dropout p must be in [0, 1), got %g", p);
    if (q && k && v && fl_lowp_any(3, all)) {
        if (fl_check_same_dtype(op, q, k) < 0 || fl_check_same_dtype(op, q, v) < 0) return NULL;
        attn_args args = {scale, window, p, seed, key};  /* the f32 op draws the same mask from the same key */
        return fl_lowp_apply(op, attention_f32, &args, 3, all, q->dtype, NULL);
    }
    for (int i = 0; i < 3; i++) {
        if (fl_check_cpu_data(op, all[i]) < 0 || fl_check_float(op, all[i]) < 0) return NULL;
        if (all[i]->ndim != 4) return fl_fail_null(FL_EINVAL, "attention: %s must be [B, T, heads, hd], got %s", i == 0 ? "q" : i == 1 ? "k" : "v", fl_shape_str(all[i]));
    }
    if (fl_check_same_dtype(op, q, k) < 0 || fl_check_same_dtype(op, q, v) < 0) return NULL;
    if (!fl_same_shape(k, v) || k->shape[0] != q->shape[0] || k->shape[1] != q->shape[1] || k->shape[3] != q->shape[3])
        return fl_fail_null(FL_EINVAL, "attention: q %s, k %s, v %s do not agree (k and v equal, same B, T and hd as q)", fl_shape_str(q),
                            fl_shape_str(k), fl_shape_str(v));
    if (k->shape[2] == 0 || q->shape[2] % k->shape[2] != 0)
        return fl_fail_null(FL_EINVAL, "attention: %" PRId64 " query heads is not a multiple of %" PRId64 " kv heads", q->shape[2], k->shape[2]);
    if (window < 0) return fl_fail_null(FL_EINVAL, "attention: window must be >= 0 (0 = none), got %" PRId64, window);
    fl_tensor *qc = NULL, *kc = NULL, *vc = NULL, *out = NULL, *lse = NULL;
    /* Views BLAS cannot read in place are copied once (transposed last dims, zero row strides). */
    if (!(qc = usable(q) ? (fl_tensor_retain((fl_tensor *)q), (fl_tensor *)q) : fl_contiguous(q))) goto fail;
    if (!(kc = usable(k) ? (fl_tensor_retain((fl_tensor *)k), (fl_tensor *)k) : fl_contiguous(k))) goto fail;
    if (!(vc = usable(v) ? (fl_tensor_retain((fl_tensor *)v), (fl_tensor *)v) : fl_contiguous(v))) goto fail;
    int64_t lshape[3] = {q->shape[0], q->shape[2], q->shape[1]};
    if (!(out = fl_tensor_empty(4, q->shape, q->dtype, FL_CPU)) || !(lse = fl_tensor_empty(3, lshape, q->dtype, FL_CPU))) goto fail;
    attn_geo geo;
    geo_fill(&geo, qc, kc, vc, scale, window, p, seed, key);
    if (attn_forward(&geo, fl_tensor_data(out), fl_tensor_data(lse)) < 0) {
        fl_fail(FL_ENOMEM, "attention: score buffers of %d x %" PRId64, ATTN_BQ, q->shape[1]);
        goto fail;
    }
    const fl_tensor *ins[3] = {q, k, v};
    fl_node *n = fl_record(op, attention_backward, 3, ins, out);
    if (n) {
        fl_tensor *sv[4] = {fl_detach(qc), fl_detach(kc), fl_detach(vc), fl_detach(out)};
        for (int i = 0; i < 4; i++) { fl_node_save(n, sv[i]); fl_tensor_release(sv[i]); }
        fl_node_save(n, lse);
        n->f[0] = scale;
        n->i[0] = window;
        n->f[1] = p;
        n->i[1] = (int64_t)seed;
        n->i[2] = (int64_t)key;
    }
    fl_tensor_release(qc); fl_tensor_release(kc); fl_tensor_release(vc); fl_tensor_release(lse);
    return out;
fail:
    fl_tensor_release(qc); fl_tensor_release(kc); fl_tensor_release(vc); fl_tensor_release(out); fl_tensor_release(lse);
    return NULL;
}
