/* engine/ops/ops_linear_ce.c: the language-model head and its loss in one op — mean cross-entropy of
 * logits = h W^T over the non-ignored targets — without the [N, V] logits: rows go through in chunks of a fixed
 * number of rows (from V alone, so neither the thread count nor the batch changes the blocking), each chunk's
 * logits live only while that chunk is processed. When a gradient is needed the forward computes it at once
 * (as Liger's fused linear cross-entropy): per chunk, dlogits = (softmax - onehot) / count, dh = dlogits W and
 * dW += dlogits^T h; backward only scales them by the upstream gradient (no recompute: three matmuls in all, as
 * the unfused head). The per-row arithmetic is cross_entropy's (exp in f32 for f32, row sums in f64); the sums
 * over rows of dW run chunk by chunk, so bits differ from the unfused head's single matmul at rounding level.
 * bf16/f16 inputs run the f32 code (core/lowp.c). */
#include "internal.h"

#include <math.h>

#include "fl_math.h"
#include "row_exp.h"

/* Elements of one chunk's logits: 8 Mi (32 MiB in f32). */
enum { LCE_CHUNK_ELEMS = 8 * 1024 * 1024 };

static int64_t target_at(const fl_tensor *t, int64_t i) {
    const void *p = fl_tensor_data(t);
    return t->dtype == FL_I64 ? ((const int64_t *)p)[i] : (int64_t)((const int32_t *)p)[i];
}

/* logsumexp of a row of v >= 1 values: exp in f32 for f32 (as torch), the sum in f64 (as cross_entropy: the
 * same row_exp.h lanes, so the same bits). */
static double row_lse_f32(const float *x, int64_t v) {
    float m = fl_row_max_f32(x, v);
    double s = fl_row_sum_exp_f32(x, v, m);
    // cppcheck-suppress invalidFunctionArg ; s >= 1: the maximum's own term is exp(0)
    return m + log(s);
}

static double row_lse_f64(const double *x, int64_t v) {
    double m = x[0], s = 0;
    for (int64_t j = 1; j < v; j++) m = x[j] > m ? x[j] : m;
    for (int64_t j = 0; j < v; j++) s += exp(x[j] - m);
    // cppcheck-suppress invalidFunctionArg ; s >= 1: the maximum's own term is exp(0)
    return m + log(s);
}

static int64_t chunk_rows(int64_t v) {
    int64_t r = LCE_CHUNK_ELEMS / (v > 0 ? v : 1);
    return r < 1 ? 1 : r;
}

/* saved: dh [N, H], dw [V, H], the gradients for an upstream gradient of 1. With that upstream gradient (the usual
 * loss.backward()) they are handed over as they are: the node releases its reference right after running, so
 * autograd can keep the buffer as the parameter's gradient without a copy (with retain_graph it copies). */
static int linear_ce_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0]) return FL_OK;
    double g = fl_tensor_get_flat(go[0], 0);
    for (int k = 0; k < 2; k++) {
        if (!fl_node_needs(n, k)) continue;
        fl_tensor *saved = n->saved[k];
        if (g == 1.0) {
            fl_tensor_retain(saved);
            gi[k] = saved;
        } else if (!(gi[k] = fl_scale(saved, g))) {
            return FL_ENOMEM;
        }
    }
    return FL_OK;
}

static fl_tensor *linear_ce_f32(const void *p, fl_tensor *const *ins, fl_tensor **aux) {
    return fl_linear_cross_entropy(ins[0], ins[1], ins[2], *(const int64_t *)p);
}

fl_tensor *fl_linear_cross_entropy(const fl_tensor *h, const fl_tensor *w, const fl_tensor *targets, int64_t ignore_index) {
    const char *op = "linear_cross_entropy";
    const fl_tensor *hw[3] = {h, w, targets};
    if (h && w && fl_lowp_any(2, hw))
        return fl_lowp_apply(op, linear_ce_f32, &ignore_index, 3, hw, FL_F32, NULL);
    if (fl_check_cpu_data(op, h) < 0 || fl_check_cpu_data(op, w) < 0 || fl_check_cpu_data(op, targets) < 0 ||
        fl_check_float(op, h) < 0 || fl_check_same_dtype(op, h, w) < 0)
        return NULL;
    if (h->ndim != 2 || w->ndim != 2 || h->shape[1] != w->shape[1])
        return fl_fail_null(FL_EINVAL, "%s: hidden states %s and weight %s must be [N, H] and [V, H]", op, fl_shape_str(h),
                            fl_shape_str(w));
    if ((targets->dtype != FL_I64 && targets->dtype != FL_I32) || targets->ndim != 1 || targets->shape[0] != h->shape[0])
        return fl_fail_null(FL_EINVAL, "%s: targets must be i64/i32 [%" PRId64 "], got %s %s", op, h->shape[0],
                            fl_dtype_name(targets->dtype), fl_shape_str(targets));
    int64_t N = h->shape[0], H = h->shape[1], V = w->shape[0];
    if (V == 0) return fl_fail_null(FL_EINVAL, "%s: weight %s has no rows (an empty vocabulary)", op, fl_shape_str(w));
    fl_tensor *hc = fl_contiguous(h), *wc = fl_contiguous(w), *tc = fl_contiguous(targets);
    fl_tensor *logits = NULL, *dh = NULL, *dw = NULL, *out = NULL;
    double *rowloss = NULL;
    if (!hc || !wc || !tc) goto done;
    int64_t count = 0;
    for (int64_t i = 0; i < N; i++) {
        int64_t t = target_at(tc, i);
        if (t == ignore_index) continue;
        if (t < 0 || t >= V) {
            fl_fail(FL_EINVAL, "%s: target %" PRId64 " at row %" PRId64 " is out of range [0, %" PRId64 ") (ignore_index %" PRId64 ")",
                    op, t, i, V, ignore_index);
            goto done;
        }
        count++;
    }
    bool grad = fl_grad_is_enabled() && (h->requires_grad || w->requires_grad);
    int32_t dt = h->dtype;
    size_t es = fl_dtype_size(dt);
    int64_t R = fl_min64(chunk_rows(V), N > 0 ? N : 1);
    int64_t lshape[2] = {R, V};
    if (!(logits = fl_tensor_empty(2, lshape, dt, FL_CPU)) || !(rowloss = malloc(sizeof(double) * (size_t)(N + 1)))) goto done;
    if (grad && (!(dh = fl_tensor_zeros(2, h->shape, dt, FL_CPU)) || !(dw = fl_tensor_zeros(2, w->shape, dt, FL_CPU))))
        goto done;
    fl_tensor_set_category(logits, FL_MEM_ACTIVATION);
    const char *ph = fl_tensor_data(hc), *pw = fl_tensor_data(wc);
    void *pl = fl_tensor_data(logits);
    double scale = count > 0 ? 1.0 / (double)count : 0.0;
    for (int64_t r0 = 0; r0 < N; r0 += R) {
        int64_t rows = fl_min64(R, N - r0);
        fl_gemm(dt, false, true, rows, V, H, 1.0, ph + (size_t)(r0 * H) * es, H, pw, H, 0.0, pl, V);
        /* per row: logsumexp, the loss term, and (grad) the row of dlogits in place of its logits */
        #pragma omp parallel for schedule(static) if (rows * V > FL_PAR_MIN)
        for (int64_t i = 0; i < rows; i++) {
            int64_t t = target_at(tc, r0 + i);
            double lse;
            if (dt == FL_F32) {
                float *x = (float *)pl + i * V;
                lse = row_lse_f32(x, V);
                rowloss[r0 + i] = t == ignore_index ? 0.0 : lse - x[t];
                if (grad) {
                    float l = (float)lse, sc = (float)scale;
                    if (t == ignore_index) for (int64_t j = 0; j < V; j++) x[j] = 0;
                    else {
                        for (int64_t j = 0; j < V; j++) x[j] = fl_expf(x[j] - l) * sc;
                        x[t] -= sc;
                    }
                }
            } else {
                double *x = (double *)pl + i * V;
                lse = row_lse_f64(x, V);
                rowloss[r0 + i] = t == ignore_index ? 0.0 : lse - x[t];
                if (grad) {
                    if (t == ignore_index) for (int64_t j = 0; j < V; j++) x[j] = 0;
                    else {
                        for (int64_t j = 0; j < V; j++) x[j] = exp(x[j] - lse) * scale;
                        x[t] -= scale;
                    }
                }
            }
        }
        if (grad) {
            /* dh rows = dlogits W;  dW += dlogits^T h (the chunks add up in order) */
            fl_gemm(dt, false, false, rows, H, V, 1.0, pl, V, pw, H, 0.0, (char *)fl_tensor_data(dh) + (size_t)(r0 * H) * es, H);
            fl_gemm(dt, true, false, V, H, rows, 1.0, pl, V, ph + (size_t)(r0 * H) * es, H, 1.0, fl_tensor_data(dw), H);
        }
    }
    double total = 0;
    for (int64_t i = 0; i < N; i++)
        if (target_at(tc, i) != ignore_index) total += rowloss[i];
    out = fl_tensor_full(0, NULL, dt, total / (double)count);   /* 0/0 = NaN when every row is ignored, as torch */
    if (!out) goto done;
    if (grad) {
        const fl_tensor *ins[2] = {h, w};
        fl_node *n = fl_record(op, linear_ce_backward, 2, ins, out);
        if (n) {
            fl_tensor_set_category(dh, FL_MEM_ACTIVATION);
            fl_tensor_set_category(dw, FL_MEM_ACTIVATION);
            fl_node_save(n, dh);
            fl_node_save(n, dw);
        }
    }
done:
    free(rowloss);
    fl_tensor_release(logits);
    fl_tensor_release(dh);
    fl_tensor_release(dw);
    fl_tensor_release(hc);
    fl_tensor_release(wc);
    fl_tensor_release(tc);
    return out;
}
