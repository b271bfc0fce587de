/* engine/ops/ops_reduce.c: sums, means and maxima. Every reduction uses fixed blocks combined in index order,
 * so 1 thread and N threads give the same bits. bf16/f16 inputs run the f32 code and round once (ops_shape.c). */
#include "internal.h"

#include <math.h>

/* Sum of n contiguous values: blocks of FL_SUM_BLOCK summed in f64, blocks combined in order. */
static double sum_contig(const void *p, int32_t dt, int64_t n) {
    int64_t nb = (n + FL_SUM_BLOCK - 1) / FL_SUM_BLOCK;
    double stack_part[64], *part = nb <= 64 ? stack_part : malloc(sizeof(double) * (size_t)nb);
    if (!part) {
        /* No room for the partial sums (this returns a value, not an error): the same blocks one after another,
         * combined in the same order, give the same bits on one thread. */
        double s = 0;
        for (int64_t b = 0; b < nb; b++) {
            int64_t lo = b * FL_SUM_BLOCK, hi = fl_min64(n, lo + FL_SUM_BLOCK);
            double bs = 0;
            if (dt == FL_F32) for (int64_t i = lo; i < hi; i++) bs += ((const float *)p)[i];
            else for (int64_t i = lo; i < hi; i++) bs += ((const double *)p)[i];
            s += bs;
        }
        return s;
    }
    #pragma omp parallel for schedule(static) if (n > FL_PAR_MIN)
    for (int64_t b = 0; b < nb; b++) {
        int64_t lo = b * FL_SUM_BLOCK, hi = fl_min64(n, lo + FL_SUM_BLOCK);
        double s = 0;
        if (dt == FL_F32) for (int64_t i = lo; i < hi; i++) s += ((const float *)p)[i];
        else for (int64_t i = lo; i < hi; i++) s += ((const double *)p)[i];
        part[b] = s;
    }
    double s = 0;
    for (int64_t b = 0; b < nb; b++) s += part[b];
    if (part != stack_part) free(part);
    return s;
}

static int sum_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0]) return FL_OK;
    double g = fl_tensor_get_flat(go[0], 0) * n->f[0];
    gi[0] = fl_tensor_full(n->in_ndim[0], n->in_shape[0], go[0]->dtype, g);
    return gi[0] ? FL_OK : FL_ENOMEM;
}

static fl_tensor *sum_all(const char *name, const fl_tensor *t, bool mean) {
    if (fl_check_float(name, t) < 0) return NULL;
    fl_tensor *c = fl_contiguous(t);
    if (!c) return NULL;
    int64_t n = fl_tensor_numel(t);
    double s = sum_contig(fl_tensor_data(c), t->dtype, n);
    fl_tensor_release(c);
    if (mean) s /= (double)n;
    fl_tensor *out = fl_tensor_full(0, NULL, t->dtype, s);
    if (!out) return NULL;
    const fl_tensor *ins[1] = {t};
    fl_node *nd = fl_record(name, sum_backward, 1, ins, out);
    if (nd) nd->f[0] = mean ? 1.0 / (double)n : 1.0;
    return out;
}

typedef struct { const char *name; int32_t dim; bool keepdim, mean; } reduce_args;

static fl_tensor *sum_all_f32(const void *p, fl_tensor *const *ins, fl_tensor **aux) {
    const reduce_args *a = p;
    return sum_all(a->name, ins[0], a->mean);
}

static fl_tensor *sum_all_any(const char *name, const fl_tensor *t, bool mean) {
    if (t && fl_lowp_any(1, &t)) {
        reduce_args args = {name, 0, false, mean};
        return fl_lowp_apply(name, sum_all_f32, &args, 1, &t, t->dtype, NULL);
    }
    return sum_all(name, t, mean);
}

fl_tensor *fl_sum(const fl_tensor *t) { return sum_all_any("sum", t, false); }
fl_tensor *fl_mean(const fl_tensor *t) { return sum_all_any("mean", t, true); }

/* Sums dim `d` of a contiguous tensor viewed as [outer, n, inner] into [outer, inner]. Each output sums its
 * n inputs in order; columns are processed in chunks so the inner loop runs along memory. */
enum { COL_CHUNK = 256 };
static void sum_dim_kernel(const void *x, void *y, int32_t dt, int64_t outer, int64_t n, int64_t inner, double scale) {
    int64_t chunks = (inner + COL_CHUNK - 1) / COL_CHUNK, work = outer * chunks;
    #pragma omp parallel for schedule(static) if (outer * n * inner > FL_PAR_MIN)
    for (int64_t w = 0; w < work; w++) {
        int64_t o = w / chunks, c0 = (w % chunks) * COL_CHUNK, c1 = fl_min64(inner, c0 + COL_CHUNK);
        double acc[COL_CHUNK] = {0};
        for (int64_t k = 0; k < n; k++) {
            int64_t base = (o * n + k) * inner;
            if (dt == FL_F32) for (int64_t i = c0; i < c1; i++) acc[i - c0] += ((const float *)x)[base + i];
            else for (int64_t i = c0; i < c1; i++) acc[i - c0] += ((const double *)x)[base + i];
        }
        for (int64_t i = c0; i < c1; i++) {
            if (dt == FL_F32) ((float *)y)[o * inner + i] = (float)(acc[i - c0] * scale);
            else ((double *)y)[o * inner + i] = acc[i - c0] * scale;
        }
    }
}

static int sum_dim_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0]) return FL_OK;
    /* Re-insert the reduced dim as 1, then expand and scale. */
    int32_t d = (int32_t)n->i[0], nd = n->in_ndim[0];
    int64_t kshape[FL_MAX_DIMS];
    memcpy(kshape, n->in_shape[0], sizeof kshape);
    kshape[d] = 1;
    fl_tensor *g = fl_view(go[0], nd, kshape);
    fl_tensor *e = g ? fl_expand(g, nd, n->in_shape[0]) : NULL;
    fl_tensor *r = e ? (n->f[0] == 1.0 ? fl_contiguous(e) : fl_scale(e, n->f[0])) : NULL;
    fl_tensor_release(g); fl_tensor_release(e);
    gi[0] = r;
    return r ? FL_OK : FL_EINVAL;
}

/* Geometry of reducing dim d: t viewed as [outer, n, inner]; the result's shape (with or without the dim). */
static void reduced_geometry(const fl_tensor *t, int32_t d, bool keepdim, int64_t *outer, int64_t *n, int64_t *inner,
                             int64_t *shape, int32_t *nd) {
    *outer = 1;
    *inner = 1;
    *n = t->shape[d];
    for (int32_t k = 0; k < d; k++) *outer *= t->shape[k];
    for (int32_t k = d + 1; k < t->ndim; k++) *inner *= t->shape[k];
    *nd = 0;
    for (int32_t k = 0; k < t->ndim; k++) {
        if (k != d) shape[(*nd)++] = t->shape[k];
        else if (keepdim) shape[(*nd)++] = 1;
    }
}

static fl_tensor *reduce_dim(const char *name, const fl_tensor *t, int32_t dim, bool keepdim, bool mean) {
    if (fl_check_float(name, t) < 0) return NULL;
    int32_t d = fl_wrap_dim(dim, t->ndim);
    if (d < 0) return fl_fail_null(FL_EINVAL, "%s: dim %d out of range for %s", name, dim, fl_shape_str(t));
    fl_tensor *c = fl_contiguous(t);
    if (!c) return NULL;
    int64_t outer, inner, n, shape[FL_MAX_DIMS];
    int32_t nd;
    reduced_geometry(t, d, keepdim, &outer, &n, &inner, shape, &nd);
    fl_tensor *out = fl_tensor_empty(nd, shape, t->dtype, FL_CPU);
    if (out) sum_dim_kernel(fl_tensor_data(c), fl_tensor_data(out), t->dtype, outer, n, inner, mean ? 1.0 / (double)n : 1.0);
    fl_tensor_release(c);
    if (!out) return NULL;
    const fl_tensor *ins[1] = {t};
    fl_node *nd_ = fl_record(name, sum_dim_backward, 1, ins, out);
    if (nd_) { nd_->i[0] = d; nd_->f[0] = mean ? 1.0 / (double)n : 1.0; }
    return out;
}

static fl_tensor *reduce_dim_f32(const void *p, fl_tensor *const *ins, fl_tensor **aux) {
    const reduce_args *a = p;
    return reduce_dim(a->name, ins[0], a->dim, a->keepdim, a->mean);
}

static fl_tensor *reduce_dim_any(const char *name, const fl_tensor *t, int32_t dim, bool keepdim, bool mean) {
    if (t && fl_lowp_any(1, &t)) {
        reduce_args args = {name, dim, keepdim, mean};
        return fl_lowp_apply(name, reduce_dim_f32, &args, 1, &t, t->dtype, NULL);
    }
    return reduce_dim(name, t, dim, keepdim, mean);
}

fl_tensor *fl_sum_dim(const fl_tensor *t, int32_t dim, bool keepdim) { return reduce_dim_any("sum_dim", t, dim, keepdim, false); }
fl_tensor *fl_mean_dim(const fl_tensor *t, int32_t dim, bool keepdim) { return reduce_dim_any("mean_dim", t, dim, keepdim, true); }

fl_tensor *fl_sum_to_shape(const fl_tensor *t, int32_t ndim, const int64_t *shape) {
    if (t->ndim == ndim && memcmp(t->shape, shape, sizeof(int64_t) * (size_t)ndim) == 0) {
        fl_tensor_retain((fl_tensor *)t);
        return (fl_tensor *)t;
    }
    if (ndim > t->ndim) return fl_fail_null(FL_EINVAL, "sum_to_shape: %s has fewer dims than %s", fl_shape_str(t), fl_shape_str_n(ndim, shape));
    fl_tensor *cur = (fl_tensor *)t;
    fl_tensor_retain(cur);
    /* Leading dims that the target lacks: flatten them into one and sum it away. */
    int32_t lead = t->ndim - ndim;
    if (lead > 0) {
        int64_t fl[FL_MAX_DIMS + 1];
        fl[0] = 1;
        for (int32_t k = 0; k < lead; k++) fl[0] *= t->shape[k];
        for (int32_t k = 0; k < ndim; k++) fl[k + 1] = t->shape[lead + k];
        fl_tensor *v = fl_view(cur, ndim + 1, fl);
        fl_tensor_release(cur);
        if (!v) return NULL;
        cur = fl_sum_dim(v, 0, false);
        fl_tensor_release(v);
        if (!cur) return NULL;
    }
    for (int32_t k = 0; k < ndim; k++) {
        if (shape[k] == cur->shape[k]) continue;
        if (shape[k] != 1) { fl_tensor_release(cur); return fl_fail_null(FL_EINVAL, "sum_to_shape: cannot reduce %s to %s", fl_shape_str(t), fl_shape_str_n(ndim, shape)); }
        fl_tensor *s = fl_sum_dim(cur, k, true);
        fl_tensor_release(cur);
        if (!s) return NULL;
        cur = s;
    }
    return cur;
}

/* ---- max over a dim ---- */

static int max_dim_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0]) return FL_OK;
    const fl_tensor *idx = n->saved[0];  /* [outer, inner] i64 argmax */
    int32_t d = (int32_t)n->i[0];
    int64_t outer = 1, inner = 1, len = n->in_shape[0][d];
    for (int32_t k = 0; k < d; k++) outer *= n->in_shape[0][k];
    for (int32_t k = d + 1; k < n->in_ndim[0]; k++) inner *= n->in_shape[0][k];
    fl_tensor *g = fl_contiguous(go[0]);
    fl_tensor *r = fl_tensor_zeros(n->in_ndim[0], n->in_shape[0], go[0]->dtype, FL_CPU);
    if (!g || !r) { fl_tensor_release(g); fl_tensor_release(r); return FL_ENOMEM; }
    const int64_t *ip = fl_tensor_data(idx);
    for (int64_t o = 0; o < outer; o++)
        for (int64_t i = 0; i < inner; i++) {
            int64_t src = o * inner + i, dst = (o * len + ip[src]) * inner + i;
            if (g->dtype == FL_F32) ((float *)fl_tensor_data(r))[dst] = ((const float *)fl_tensor_data(g))[src];
            else ((double *)fl_tensor_data(r))[dst] = ((const double *)fl_tensor_data(g))[src];
        }
    fl_tensor_release(g);
    gi[0] = r;
    return FL_OK;
}

static fl_tensor *max_dim_f32(const void *p, fl_tensor *const *ins, fl_tensor **aux) {
    const reduce_args *a = p;
    return fl_max_dim(ins[0], a->dim, a->keepdim, aux);
}

fl_tensor *fl_max_dim(const fl_tensor *t, int32_t dim, bool keepdim, fl_tensor **indices) {
    if (t && fl_lowp_any(1, &t)) {   /* exact: the maximum is one of the inputs */
        reduce_args args = {"max_dim", dim, keepdim, false};
        return fl_lowp_apply("max_dim", max_dim_f32, &args, 1, &t, t->dtype, indices);
    }
    if (fl_check_float("max_dim", t) < 0) return NULL;
    int32_t d = fl_wrap_dim(dim, t->ndim);
    if (d < 0) return fl_fail_null(FL_EINVAL, "max_dim: dim %d out of range for %s", dim, fl_shape_str(t));
    if (t->shape[d] == 0) return fl_fail_null(FL_EINVAL, "max_dim: dim %d of %s is empty", d, fl_shape_str(t));
    fl_tensor *c = fl_contiguous(t);
    if (!c) return NULL;
    int64_t outer, inner, n, shape[FL_MAX_DIMS];
    int32_t nd;
    reduced_geometry(t, d, keepdim, &outer, &n, &inner, shape, &nd);
    fl_tensor *out = fl_tensor_empty(nd, shape, t->dtype, FL_CPU), *idx = fl_tensor_empty(nd, shape, FL_I64, FL_CPU);
    if (!out || !idx) {   /* fl_tensor_empty set the message */
        fl_tensor_release(out); fl_tensor_release(idx); fl_tensor_release(c);
        return NULL;
    }
    int64_t *ip = fl_tensor_data(idx);
    const void *x = fl_tensor_data(c);
    for (int64_t o = 0; o < outer; o++)
        for (int64_t i = 0; i < inner; i++) {
            int64_t best = 0;
            double bv = fl_load_elem(x, t->dtype, o * n * inner + i);
            for (int64_t k = 1; k < n; k++) {
                double v = fl_load_elem(x, t->dtype, (o * n + k) * inner + i);
                if (v > bv || (isnan(v) && !isnan(bv))) { bv = v; best = k; }
            }
            ip[o * inner + i] = best;
            fl_store_elem(fl_tensor_data(out), t->dtype, o * inner + i, bv);
        }
    fl_tensor_release(c);
    const fl_tensor *ins[1] = {t};
    fl_node *nd_ = fl_record("max_dim", max_dim_backward, 1, ins, out);
    if (nd_) { nd_->i[0] = d; fl_node_save(nd_, idx); }
    if (indices) *indices = idx;
    else fl_tensor_release(idx);
    return out;
}
