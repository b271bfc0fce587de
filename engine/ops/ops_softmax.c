/* engine/ops/ops_softmax.c: softmax and log-softmax over any dim, and the fused mean cross-entropy (log-softmax +
 * NLL with ignore_index), each with backward, f32/f64. Row sums run in f64 in index order, and the loss is
 * the ordered sum of per-row losses, so results do not depend on the thread count. bf16/f16 inputs run the
 * f32 code (ops_shape.c): softmax rounds once to the input dtype, cross-entropy returns an f32 loss (Hugging
 * Face upcasts logits before the loss) and a gradient rounded once to the logits' dtype. */
#include "internal.h"

#include <math.h>

#include "fl_math.h"
#include "row_exp.h"


static double ld(const void *p, int32_t dt, int64_t i) { return dt == FL_F32 ? (double)((const float *)p)[i] : ((const double *)p)[i]; }
static void st(void *p, int32_t dt, int64_t i, double v) {
    if (dt == FL_F32) ((float *)p)[i] = (float)v;
    else ((double *)p)[i] = v;
}

/* Geometry of a contiguous tensor seen as [outer, c, inner] around `dim`. */
static void split_dims(const fl_tensor *t, int32_t dim, int64_t *outer, int64_t *c, int64_t *inner) {
    *outer = 1; *inner = 1;
    for (int32_t d = 0; d < dim; d++) *outer *= t->shape[d];
    for (int32_t d = dim + 1; d < t->ndim; d++) *inner *= t->shape[d];
    *c = t->ndim ? t->shape[dim] : 1;
}

/* One row of c values at base + j*inner: y = softmax or log_softmax. */
static void softmax_row(int32_t dt, const void *x, void *y, int64_t base, int64_t c, int64_t inner, bool logsm) {
    if (c == 0) return;  /* an empty row has no values to write (and its sum, 0, has no log) */
    double m = -INFINITY, s = 0;
    if (dt == FL_F32 && inner == 1) {
        /* contiguous f32 row: exp in f32 (vectorised), the sum in f64 (row_exp.h) */
        const float *xr = (const float *)x + base;
        float *yr = (float *)y + base, mf = fl_row_max_f32(xr, c);
        s = fl_row_sum_exp_f32(xr, c, mf);
        if (logsm) {
            float ls = (float)log(s);
            for (int64_t j = 0; j < c; j++) yr[j] = (xr[j] - mf) - ls;
        } else {
            float inv = (float)(1.0 / s);
            for (int64_t j = 0; j < c; j++) yr[j] = fl_expf(xr[j] - mf) * inv;
        }
    } else if (dt == FL_F32) {
        /* the same lanes as a contiguous row, so softmax over any dim has the bits of the transposed row's */
        float mf = fl_row_max_strided_f32((const float *)x + base, c, inner);
        s = fl_row_sum_exp_strided_f32((const float *)x + base, c, inner, mf);
        /* cppcheck-suppress invalidFunctionArg ; c > 0 (checked on entry) and the max adds exp(0) = 1, so s >= 1 */
        float ls = (float)log(s), inv = (float)(1.0 / s);
        for (int64_t j = 0; j < c; j++) {
            float d = ((const float *)x)[base + j * inner] - mf;
            ((float *)y)[base + j * inner] = logsm ? d - ls : fl_expf(d) * inv;
        }
    } else {
        for (int64_t j = 0; j < c; j++) { double v = ld(x, dt, base + j * inner); if (v > m) m = v; }
        for (int64_t j = 0; j < c; j++) s += exp(ld(x, dt, base + j * inner) - m);
        /* cppcheck-suppress invalidFunctionArg ; c > 0 (checked on entry) and the max adds exp(0) = 1, so s >= 1 */
        double ls = log(s);
        for (int64_t j = 0; j < c; j++) {
            double d = ld(x, dt, base + j * inner) - m;
            st(y, dt, base + j * inner, logsm ? d - ls : exp(d) / s);
        }
    }
}

static int softmax_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0] || !fl_node_needs(n, 0)) return FL_OK;
    const fl_tensor *y = n->saved[0];
    bool logsm = n->i[1] != 0;
    int64_t outer, c, inner;
    split_dims(y, (int32_t)n->i[0], &outer, &c, &inner);
    fl_tensor *g = fl_contiguous(go[0]);
    fl_tensor *dx = g ? fl_tensor_empty(y->ndim, y->shape, y->dtype, FL_CPU) : NULL;
    if (!dx) { fl_tensor_release(g); return FL_ENOMEM; }
    int32_t dt = y->dtype;
    const void *py = fl_tensor_data(y), *pg = fl_tensor_data(g);
    void *pd = fl_tensor_data(dx);
    int64_t rows = outer * inner;
    #pragma omp parallel for schedule(static) if (rows * c > FL_PAR_MIN)
    for (int64_t r = 0; r < rows; r++) {
        int64_t base = (r / inner) * c * inner + r % inner;
        double s = 0;
        /* softmax: dx = y (dy - sum(dy y)); log_softmax: dx = dy - exp(y) sum(dy) */
        for (int64_t j = 0; j < c; j++) {
            double dy = ld(pg, dt, base + j * inner);
            s += logsm ? dy : dy * ld(py, dt, base + j * inner);
        }
        for (int64_t j = 0; j < c; j++) {
            int64_t k = base + j * inner;
            double yv = ld(py, dt, k), dy = ld(pg, dt, k);
            st(pd, dt, k, logsm ? dy - exp(yv) * s : yv * (dy - s));
        }
    }
    fl_tensor_release(g);
    gi[0] = dx;
    return FL_OK;
}

static fl_tensor *softmax_any(const char *name, const fl_tensor *x, int32_t dim, bool logsm) {
    if (fl_check_cpu_data(name, x) < 0 || fl_check_float(name, x) < 0) return NULL;
    int32_t d = fl_wrap_dim(dim, x->ndim > 0 ? x->ndim : 1);
    if (d < 0) return fl_fail_null(FL_EINVAL, "%s: dim %d out of range for %s", name, dim, fl_shape_str(x));
    fl_tensor *xc = fl_contiguous(x);
    fl_tensor *y = xc ? fl_tensor_empty(x->ndim, x->shape, x->dtype, FL_CPU) : NULL;
    if (!y) { fl_tensor_release(xc); return NULL; }
    int64_t outer, c, inner;
    split_dims(xc, d, &outer, &c, &inner);
    int64_t rows = outer * inner;
    const void *px = fl_tensor_data(xc);
    void *py = fl_tensor_data(y);
    #pragma omp parallel for schedule(static) if (rows * c > FL_PAR_MIN)
    for (int64_t r = 0; r < rows; r++) softmax_row(x->dtype, px, py, (r / inner) * c * inner + r % inner, c, inner, logsm);
    fl_tensor_release(xc);
    const fl_tensor *ins[1] = {x};
    fl_node *n = fl_record(name, softmax_backward, 1, ins, y);
    if (n) {
        fl_tensor *yd = fl_detach(y);   /* detached: saving y itself would be a reference cycle */
        fl_node_save(n, yd);
        fl_tensor_release(yd);
        n->i[0] = d;
        n->i[1] = logsm;
    }
    return y;
}

typedef struct { int32_t dim; bool logsm; } softmax_args;

static fl_tensor *softmax_f32(const void *p, fl_tensor *const *ins, fl_tensor **aux) {
    const softmax_args *a = p;
    return softmax_any(a->logsm ? "log_softmax" : "softmax", ins[0], a->dim, a->logsm);
}

/* bf16/f16: the f32 node keeps its f32 output for backward (what the f32 op would use), not the rounded one. */
static fl_tensor *softmax_lowp(const char *name, const fl_tensor *x, int32_t dim, bool logsm) {
    if (x && fl_lowp_any(1, &x)) {
        softmax_args args = {dim, logsm};
        return fl_lowp_apply(name, softmax_f32, &args, 1, &x, x->dtype, NULL);
    }
    return softmax_any(name, x, dim, logsm);
}

fl_tensor *fl_softmax(const fl_tensor *x, int32_t dim) { return softmax_lowp("softmax", x, dim, false); }
fl_tensor *fl_log_softmax(const fl_tensor *x, int32_t dim) { return softmax_lowp("log_softmax", x, dim, true); }

/* ---- cross-entropy: saved logits [N, C], targets, per-row logsumexp [N] (f64) ---- */

static int64_t target_at(const fl_tensor *t, int64_t i) {
    const void *p = fl_tensor_data(t);
    return t->dtype == FL_I64 ? ((const int64_t *)p)[i] : (int64_t)((const int32_t *)p)[i];
}

static int cross_entropy_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0] || !fl_node_needs(n, 0)) return FL_OK;
    const fl_tensor *x = n->saved[0], *tg = n->saved[1], *lse = n->saved[2];
    int64_t rows = x->shape[0], c = x->shape[1], ignore = n->i[0];
    double scale = fl_tensor_get_flat(go[0], 0) / n->f[0];   /* upstream / count of non-ignored rows */
    fl_tensor *dx = fl_tensor_empty(2, x->shape, x->dtype, FL_CPU);   /* the one [N, C] buffer */
    if (!dx) return FL_ENOMEM;
    int32_t dt = x->dtype;
    const void *px = fl_tensor_data(x);
    const double *pl = fl_tensor_data(lse);
    void *pd = fl_tensor_data(dx);
    #pragma omp parallel for schedule(static) if (rows * c > FL_PAR_MIN)
    for (int64_t i = 0; i < rows; i++) {
        int64_t t = target_at(tg, i);
        if (t == ignore) {
            for (int64_t j = 0; j < c; j++) st(pd, dt, i * c + j, 0.0);
            continue;
        }
        if (dt == FL_F32) {
            const float *xr = (const float *)px + i * c;
            float *dr = (float *)pd + i * c, l = (float)pl[i], sc = (float)scale;
            for (int64_t j = 0; j < c; j++) dr[j] = fl_expf(xr[j] - l) * sc;
            dr[t] -= sc;
        } else {
            const double *xr = (const double *)px + i * c;
            double *dr = (double *)pd + i * c;
            for (int64_t j = 0; j < c; j++) dr[j] = exp(xr[j] - pl[i]) * scale;
            dr[t] -= scale;
        }
    }
    gi[0] = dx;
    return FL_OK;
}

static fl_tensor *cross_entropy_f32(const void *p, fl_tensor *const *ins, fl_tensor **aux) {
    return fl_cross_entropy(ins[0], ins[1], *(const int64_t *)p);
}

fl_tensor *fl_cross_entropy(const fl_tensor *logits, const fl_tensor *targets, int64_t ignore_index) {
    if (logits && fl_lowp_any(1, &logits)) {
        const fl_tensor *ins[2] = {logits, targets};
        return fl_lowp_apply("cross_entropy", cross_entropy_f32, &ignore_index, 2, ins, FL_F32, NULL);
    }
    const char *op = "cross_entropy";
    if (fl_check_cpu_data(op, logits) < 0 || fl_check_cpu_data(op, targets) < 0 || fl_check_float(op, logits) < 0) return NULL;
    if (logits->ndim != 2) return fl_fail_null(FL_EINVAL, "cross_entropy: logits must be [N, C], got %s", fl_shape_str(logits));
    if (targets->dtype != FL_I64 && targets->dtype != FL_I32)
        return fl_fail_null(FL_EINVAL, "cross_entropy: targets must be i64 or i32, got %s", fl_dtype_name(targets->dtype));
    if (targets->ndim != 1 || targets->shape[0] != logits->shape[0])
        return fl_fail_null(FL_EINVAL, "cross_entropy: targets %s do not match logits %s (expected [%" PRId64 "])",
                            fl_shape_str(targets), fl_shape_str(logits), logits->shape[0]);
    int64_t rows = logits->shape[0], c = logits->shape[1];
    fl_tensor *xc = fl_contiguous(logits), *tc = fl_contiguous(targets), *lse = NULL, *out = NULL;
    double *rowloss = NULL;
    if (!xc || !tc) goto done;
    for (int64_t i = 0; i < rows; i++) {
        int64_t t = target_at(tc, i);
        if (t != ignore_index && (t < 0 || t >= c)) {
            fl_fail(FL_EINVAL, "cross_entropy: target %" PRId64 " at row %" PRId64 " is out of range [0, %" PRId64 ") for logits %s (ignore_index %" PRId64 ")",
                    t, i, c, fl_shape_str(logits), ignore_index);
            goto done;
        }
    }
    if (!(lse = fl_tensor_empty(1, &rows, FL_F64, FL_CPU)) || !(rowloss = malloc(sizeof(double) * (size_t)(rows + 1)))) goto done;
    int32_t dt = logits->dtype;
    const void *px = fl_tensor_data(xc);
    double *pl = fl_tensor_data(lse);
    #pragma omp parallel for schedule(static) if (rows * c > FL_PAR_MIN)
    for (int64_t i = 0; i < rows; i++) {
        double m = -INFINITY, s = 0;
        if (dt == FL_F32) {   /* exp in f32 (as torch), the row sum in f64 */
            const float *xr = (const float *)px + i * c;
            float mf = fl_row_max_f32(xr, c);
            s = fl_row_sum_exp_f32(xr, c, mf);
            m = mf;
        } else {
            const double *xr = (const double *)px + i * c;
            for (int64_t j = 0; j < c; j++) m = xr[j] > m ? xr[j] : m;
            for (int64_t j = 0; j < c; j++) s += exp(xr[j] - m);
        }
        pl[i] = m + log(s);
        int64_t t = target_at(tc, i);
        rowloss[i] = t == ignore_index ? 0.0 : pl[i] - ld(px, dt, i * c + t);
    }
    double total = 0;
    int64_t count = 0;
    for (int64_t i = 0; i < rows; i++)
        if (target_at(tc, i) != ignore_index) { total += rowloss[i]; count++; }
    out = fl_tensor_full(0, NULL, dt, total / (double)count);   /* 0/0 = NaN when every row is ignored, as torch */
    if (!out) goto done;
    const fl_tensor *ins[2] = {logits, targets};
    fl_node *n = fl_record(op, cross_entropy_backward, 2, ins, out);
    if (n) {
        fl_tensor *xd = fl_detach(xc);
        fl_node_save(n, xd);
        fl_node_save(n, tc);
        fl_node_save(n, lse);
        fl_tensor_release(xd);
        n->i[0] = ignore_index;
        n->f[0] = (double)count;
    }
done:
    free(rowloss);
    fl_tensor_release(xc);
    fl_tensor_release(tc);
    fl_tensor_release(lse);
    return out;
}
