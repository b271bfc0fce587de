/* engine/ops/ops_attn_cache.c: attention of new queries over a key/value cache, for generation (no autograd).
 * q [B, Tq, nH, hd] holds the queries at cache positions q_start .. q_start + Tq - 1; k, v [B, Tk, nKV, hd] the
 * whole cache so far (Tk >= q_start + Tq). Query i of row b sees key j iff j <= q_start + i, the key is valid
 * (valid[b, j] != 0: not padding) and, with a window W > 0, q_start + i - j < W: transformers' causal, padding and
 * sliding-window masks in cache coordinates. Scores, softmax and the weighted sum are computed in f64 and rounded
 * once; a query that sees no key (a padding query) gets zeros. Tasks are (b, h, i), each with a fixed order of
 * operations: the thread count never changes the bits. bf16/f16 inputs are read as f32 and the output rounded. */
#include "internal.h"

#include <math.h>
#include <omp.h>

static double elem(const void *p, int32_t dt, int64_t i) {
    switch (dt) {
    case FL_F32: return ((const float *)p)[i];
    case FL_F64: return ((const double *)p)[i];
    case FL_BF16: return fl_bf16_to_f32(((const uint16_t *)p)[i]);
    default: return fl_f16_to_f32(((const uint16_t *)p)[i]);
    }
}

static void store(void *p, int32_t dt, int64_t i, double x) {
    switch (dt) {
    case FL_F32: ((float *)p)[i] = (float)x; break;
    case FL_F64: ((double *)p)[i] = x; break;
    case FL_BF16: ((uint16_t *)p)[i] = fl_f32_to_bf16((float)x); break;
    default: ((uint16_t *)p)[i] = fl_f32_to_f16((float)x); break;
    }
}

static bool attn_float(int32_t dt) { return dt == FL_F32 || dt == FL_F64 || dt == FL_BF16 || dt == FL_F16; }

fl_tensor *fl_attention_cached(const fl_tensor *q, const fl_tensor *k, const fl_tensor *v, double scale,
                               int64_t q_start, int64_t window, const fl_tensor *valid) {
    const char *op = "attention_cached";
    const fl_tensor *all[3] = {q, k, v};
    for (int i = 0; i < 3; i++) {
        if (fl_check_cpu_data(op, all[i]) < 0) return NULL;
        if (!attn_float(all[i]->dtype))
            return fl_fail_null(FL_EINVAL, "%s: %s must be a float tensor, got %s", op, i == 0 ? "q" : i == 1 ? "k" : "v",
                                fl_dtype_name(all[i]->dtype));
        if (all[i]->ndim != 4)
            return fl_fail_null(FL_EINVAL, "%s: %s must be [B, T, heads, hd], got %s", op, i == 0 ? "q" : i == 1 ? "k" : "v",
                                fl_shape_str(all[i]));
    }
    if (fl_check_same_dtype(op, q, k) < 0 || fl_check_same_dtype(op, q, v) < 0) return NULL;
    int64_t B = q->shape[0], Tq = q->shape[1], nh = q->shape[2], hd = q->shape[3];
    int64_t Tk = k->shape[1], nkv = k->shape[2];
    if (!fl_same_shape(k, v) || k->shape[0] != B || k->shape[3] != hd)
        return fl_fail_null(FL_EINVAL, "%s: q %s, k %s, v %s do not agree (k and v equal, same B and hd as q)", op,
                            fl_shape_str(q), fl_shape_str(k), fl_shape_str(v));
    if (nkv == 0 || nh % nkv != 0)
        return fl_fail_null(FL_EINVAL, "%s: %" PRId64 " query heads is not a multiple of %" PRId64 " kv heads", op, nh, nkv);
    if (q_start < 0 || q_start + Tq > Tk)
        return fl_fail_null(FL_EINVAL, "%s: queries at cache positions [%" PRId64 ", %" PRId64 ") past the %" PRId64
                            " cached keys", op, q_start, q_start + Tq, Tk);
    if (window < 0) return fl_fail_null(FL_EINVAL, "%s: window must be >= 0 (0 = none), got %" PRId64, op, window);
    if (valid && (fl_check_cpu_data(op, valid) < 0 || valid->ndim != 2 || valid->shape[0] != B ||
                  valid->shape[1] < Tk || (valid->dtype != FL_U8 && valid->dtype != FL_BOOL)))
        return fl_fail_null(FL_EINVAL, "%s: valid must be u8/bool [B, >= %" PRId64 "] for B = %" PRId64 ", got %s %s", op,
                            Tk, B, valid ? fl_dtype_name(valid->dtype) : "", valid ? fl_shape_str(valid) : "");
    fl_tensor *qc = fl_contiguous(q), *kc = fl_contiguous(k), *vc = fl_contiguous(v), *mc = NULL, *out = NULL;
    double *scratch = NULL;
    if (!qc || !kc || !vc) goto done;
    if (valid && !(mc = fl_contiguous(valid))) goto done;
    if (!(out = fl_tensor_empty(4, q->shape, q->dtype, FL_CPU))) goto done;
    int threads = omp_get_max_threads();
    scratch = malloc(sizeof(double) * (size_t)(Tk + hd) * (size_t)threads);
    if (!scratch) {
        fl_tensor_release(out);
        out = NULL;
        fl_fail(FL_ENOMEM, "%s: scratch of %" PRId64 " doubles per thread", op, Tk + hd);
        goto done;
    }
    int32_t dt = q->dtype;
    const void *pq = fl_tensor_data(qc), *pk = fl_tensor_data(kc), *pv = fl_tensor_data(vc);
    const uint8_t *pm = mc ? fl_tensor_data(mc) : NULL;
    int64_t mstride = mc ? mc->shape[1] : 0, rep = nh / nkv;
    void *po = fl_tensor_data(out);
    int64_t tasks = B * nh * Tq;
    #pragma omp parallel for schedule(static) num_threads(threads) if (tasks * Tk * hd > FL_PAR_MIN)
    for (int64_t task = 0; task < tasks; task++) {
        double *s = scratch + (size_t)omp_get_thread_num() * (size_t)(Tk + hd), *acc = s + Tk;
        int64_t b = task / (nh * Tq), h = (task / Tq) % nh, i = task % Tq, kh = h / rep;
        int64_t qi = q_start + i, lo = window > 0 ? fl_max64(0, qi - window + 1) : 0;
        int64_t qoff = ((b * Tq + i) * nh + h) * hd;
        double m = -INFINITY;
        for (int64_t j = lo; j <= qi; j++) {
            if (pm && !pm[b * mstride + j]) { s[j] = -INFINITY; continue; }
            int64_t koff = ((b * Tk + j) * nkv + kh) * hd;
            double d = 0;
            for (int64_t c = 0; c < hd; c++) d += elem(pq, dt, qoff + c) * elem(pk, dt, koff + c);
            s[j] = d * scale;
            if (s[j] > m) m = s[j];
        }
        for (int64_t c = 0; c < hd; c++) acc[c] = 0;
        if (m > -INFINITY) {
            double sum = 0;
            for (int64_t j = lo; j <= qi; j++) {
                s[j] = s[j] == -INFINITY ? 0 : exp(s[j] - m);
                sum += s[j];
            }
            for (int64_t j = lo; j <= qi; j++) {
                if (s[j] == 0) continue;
                int64_t voff = ((b * Tk + j) * nkv + kh) * hd;
                double w = s[j] / sum;
                for (int64_t c = 0; c < hd; c++) acc[c] += w * elem(pv, dt, voff + c);
            }
        }
        for (int64_t c = 0; c < hd; c++) store(po, dt, qoff + c, acc[c]);
    }
done:
    free(scratch);
    fl_tensor_release(qc);
    fl_tensor_release(kc);
    fl_tensor_release(vc);
    fl_tensor_release(mc);
    return out;
}
