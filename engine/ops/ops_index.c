/* engine/ops/ops_index.c: top-k over the last dim, gather and scatter-add along a dim (MoE routing), with
 * backward, f32/f64 values and i64/i32 indices. Scatters run in parallel only over positions that write
 * disjoint outputs, each adding along `dim` in index order, so results do not depend on the thread count.
 * bf16/f16 values run the f32 code and round once (ops_shape.c). */
#include "internal.h"

#include <math.h>

static int64_t idx_at(const void *p, int32_t dt, int64_t i) {
    return dt == FL_I64 ? ((const int64_t *)p)[i] : (int64_t)((const int32_t *)p)[i];
}
static double ld(const void *p, int32_t dt, int64_t i) { return dt == FL_F32 ? (double)((const float *)p)[i] : ((const double *)p)[i]; }
static void add_at(void *p, int32_t dt, int64_t i, double v) {
    if (dt == FL_F32) ((float *)p)[i] += (float)v;
    else ((double *)p)[i] += v;
}

/* ---- shared walk of an index tensor [.., L (dim), ..] over a contiguous target ---- */

/* Offsets into contiguous tensors of shapes `ishape` (the index, also the gathered side) and `tshape` (the
 * indexed side) of line c (all coords but dim), with the dim coordinate 0. */
static void line_offsets(int32_t nd, const int64_t *ishape, const int64_t *tshape, int32_t dim, int64_t c, int64_t *oi, int64_t *ot,
                         int64_t *step_i, int64_t *step_t) {
    int64_t si = 1, st = 1, a = 0, b = 0;
    for (int32_t d = nd - 1; d >= 0; d--) {
        if (d == dim) { *step_i = si; *step_t = st; }
        else { int64_t x = c % ishape[d]; c /= ishape[d]; a += x * si; b += x * st; }
        si *= ishape[d];
        st *= tshape[d];
    }
    *oi = a;
    *ot = b;
}

/* dst[tshape] += src[ishape] scattered along dim by index (contiguous, same shape as src). */
static void scatter_add_raw(int32_t dt, int32_t nd, const int64_t *ishape, const int64_t *tshape, int32_t dim, const void *index,
                            int32_t idt, const void *src, void *dst) {
    int64_t len = ishape[dim], lines = len ? fl_shape_numel(nd, ishape) / len : 0;
    /* Lines write disjoint dst lines (their non-dim coords differ), each in index order. */
    #pragma omp parallel for schedule(static) if (lines * len > FL_PAR_MIN)
    for (int64_t c = 0; c < lines; c++) {
        int64_t oi, ot, si = 0, st = 0;
        line_offsets(nd, ishape, tshape, dim, c, &oi, &ot, &si, &st);
        for (int64_t j = 0; j < len; j++) add_at(dst, dt, ot + idx_at(index, idt, oi + j * si) * st, ld(src, dt, oi + j * si));
    }
}

static void gather_raw(int32_t dt, int32_t nd, const int64_t *ishape, const int64_t *tshape, int32_t dim, const void *index, int32_t idt,
                       const void *src, void *dst) {
    int64_t len = ishape[dim], lines = len ? fl_shape_numel(nd, ishape) / len : 0;
    size_t es = fl_dtype_size(dt);
    #pragma omp parallel for schedule(static) if (lines * len > FL_PAR_MIN)
    for (int64_t c = 0; c < lines; c++) {
        int64_t oi, ot, si = 0, st = 0;
        line_offsets(nd, ishape, tshape, dim, c, &oi, &ot, &si, &st);
        for (int64_t j = 0; j < len; j++)
            memcpy((char *)dst + (size_t)(oi + j * si) * es, (const char *)src + (size_t)(ot + idx_at(index, idt, oi + j * si) * st) * es, es);
    }
}

/* Checks index against the indexed tensor's shape (ndim, sizes, range along dim). */
static int check_index(const char *op, const fl_tensor *t, int32_t dim, const fl_tensor *index, const fl_tensor *ic) {
    if (index->dtype != FL_I64 && index->dtype != FL_I32)
        return fl_fail(FL_EINVAL, "%s: index must be i64 or i32, got %s", op, fl_dtype_name(index->dtype));
    if (index->ndim != t->ndim)
        return fl_fail(FL_EINVAL, "%s: index %s must have as many dims as %s", op, fl_shape_str(index), fl_shape_str(t));
    for (int32_t d = 0; d < t->ndim; d++)
        if (d != dim && index->shape[d] > t->shape[d])
            return fl_fail(FL_EINVAL, "%s: index %s is larger than %s in dim %d", op, fl_shape_str(index), fl_shape_str(t), d);
    int64_t n = fl_tensor_numel(ic), lim = t->shape[dim];
    const void *p = fl_tensor_data(ic);
    for (int64_t i = 0; i < n; i++) {
        int64_t x = idx_at(p, ic->dtype, i);
        if (x < 0 || x >= lim)
            return fl_fail(FL_EINVAL, "%s: index %" PRId64 " out of range [0, %" PRId64 ") in dim %d of %s", op, x, lim, dim, fl_shape_str(t));
    }
    return FL_OK;
}

/* ---- gather: out[..i..] = x[..index[..i..]..] along dim; out has index's shape ---- */

static int gather_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0] || !fl_node_needs(n, 0)) return FL_OK;
    const fl_tensor *ic = n->saved[0];
    fl_tensor *g = fl_contiguous(go[0]);
    fl_tensor *dx = g ? fl_tensor_zeros(n->in_ndim[0], n->in_shape[0], g->dtype, FL_CPU) : NULL;
    if (!dx) { fl_tensor_release(g); return FL_ENOMEM; }
    scatter_add_raw(g->dtype, ic->ndim, ic->shape, dx->shape, (int32_t)n->i[0], fl_tensor_data(ic), ic->dtype, fl_tensor_data(g),
                    fl_tensor_data(dx));
    fl_tensor_release(g);
    gi[0] = dx;
    return FL_OK;
}

static fl_tensor *gather_f32(const void *p, fl_tensor *const *ins, fl_tensor **aux) {
    return fl_gather(ins[0], *(const int32_t *)p, ins[1]);
}

fl_tensor *fl_gather(const fl_tensor *x, int32_t dim, const fl_tensor *index) {
    if (x && fl_lowp_any(1, &x)) {
        const fl_tensor *ins[2] = {x, index};
        return fl_lowp_apply("gather", gather_f32, &dim, 2, ins, x->dtype, NULL);
    }
    if (fl_check_cpu_data("gather", x) < 0 || fl_check_cpu_data("gather", index) < 0 || fl_check_float("gather", x) < 0) return NULL;
    int32_t d = fl_wrap_dim(dim, x->ndim);
    if (d < 0) return fl_fail_null(FL_EINVAL, "gather: dim %d out of range for %s", dim, fl_shape_str(x));
    fl_tensor *xc = fl_contiguous(x), *ic = fl_contiguous(index), *out = NULL;
    if (!xc || !ic || check_index("gather", x, d, index, ic) < 0) goto done;
    if (!(out = fl_tensor_empty(index->ndim, index->shape, x->dtype, FL_CPU))) goto done;
    gather_raw(x->dtype, x->ndim, index->shape, x->shape, d, fl_tensor_data(ic), ic->dtype, fl_tensor_data(xc), fl_tensor_data(out));
    const fl_tensor *ins[2] = {x, index};
    fl_node *n = fl_record("gather", gather_backward, 2, ins, out);
    if (n) { fl_node_save(n, ic); n->i[0] = d; }
done:
    fl_tensor_release(xc);
    fl_tensor_release(ic);
    return out;
}

/* ---- scatter_add: out = base; out[..index[..i..]..] += src[..i..] along dim ---- */

static int scatter_add_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0]) return FL_OK;
    const fl_tensor *ic = n->saved[0];
    fl_tensor *g = fl_contiguous(go[0]);
    if (!g) return FL_ENOMEM;
    int rc = FL_OK;
    if (fl_node_needs(n, 0)) { fl_tensor_retain(g); gi[0] = g; }   /* d out / d base = identity */
    if (fl_node_needs(n, 2)) {   /* d src = grad gathered at the scattered positions */
        fl_tensor *ds = fl_tensor_zeros(n->in_ndim[2], n->in_shape[2], g->dtype, FL_CPU);
        if (!ds) rc = FL_ENOMEM;
        else {
            /* index may be smaller than src: positions outside it got no gradient (zeros) */
            fl_tensor *tmp = fl_tensor_empty(ic->ndim, ic->shape, g->dtype, FL_CPU);
            if (!tmp) rc = FL_ENOMEM;
            else {
                gather_raw(g->dtype, ic->ndim, ic->shape, g->shape, (int32_t)n->i[0], fl_tensor_data(ic), ic->dtype, fl_tensor_data(g),
                           fl_tensor_data(tmp));
                /* place tmp (index's shape) into ds (src's shape) */
                int64_t cnt = fl_tensor_numel(tmp);
                size_t es = fl_dtype_size(g->dtype);
                for (int64_t i = 0; i < cnt; i++) {
                    int64_t rem = i, off = 0, stride = 1;
                    for (int32_t d = ic->ndim - 1; d >= 0; d--) { off += (rem % ic->shape[d]) * stride; rem /= ic->shape[d]; stride *= ds->shape[d]; }
                    memcpy((char *)fl_tensor_data(ds) + (size_t)off * es, (char *)fl_tensor_data(tmp) + (size_t)i * es, es);
                }
                fl_tensor_release(tmp);
                gi[2] = ds;
            }
        }
    }
    fl_tensor_release(g);
    return rc;
}

static fl_tensor *scatter_add_f32(const void *p, fl_tensor *const *ins, fl_tensor **aux) {
    return fl_scatter_add(ins[0], *(const int32_t *)p, ins[1], ins[2]);
}

fl_tensor *fl_scatter_add(const fl_tensor *base, int32_t dim, const fl_tensor *index, const fl_tensor *src) {
    const char *op = "scatter_add";
    if (base && src && (fl_lowp_any(1, &base) || fl_lowp_any(1, &src))) {   /* sums in f32, rounded once */
        if (fl_check_same_dtype(op, base, src) < 0) return NULL;
        const fl_tensor *bis[3] = {base, index, src};
        return fl_lowp_apply(op, scatter_add_f32, &dim, 3, bis, base->dtype, NULL);
    }
    if (fl_check_cpu_data(op, base) < 0 || fl_check_cpu_data(op, index) < 0 || fl_check_cpu_data(op, src) < 0 ||
        fl_check_float(op, base) < 0 || fl_check_same_dtype(op, base, src) < 0)
        return NULL;
    int32_t d = fl_wrap_dim(dim, base->ndim);
    if (d < 0) return fl_fail_null(FL_EINVAL, "scatter_add: dim %d out of range for %s", dim, fl_shape_str(base));
    if (src->ndim != index->ndim) return fl_fail_null(FL_EINVAL, "scatter_add: src %s and index %s differ in dims", fl_shape_str(src), fl_shape_str(index));
    for (int32_t k = 0; k < src->ndim; k++)
        if (index->shape[k] > src->shape[k])
            return fl_fail_null(FL_EINVAL, "scatter_add: index %s is larger than src %s in dim %d", fl_shape_str(index), fl_shape_str(src), k);
    fl_tensor *out = NULL, *ic = fl_contiguous(index), *sc = NULL;
    if (!ic || check_index(op, base, d, index, ic) < 0) goto done;
    /* the part of src that index covers, contiguous in index's shape */
    fl_tensor *sv = NULL;
    if (!fl_same_shape(src, index)) {
        fl_tensor *cur = (fl_tensor *)src;
        fl_tensor_retain(cur);
        for (int32_t k = 0; k < src->ndim && cur; k++) {
            fl_tensor *nx = fl_narrow(cur, k, 0, index->shape[k]);
            fl_tensor_release(cur);
            cur = nx;
        }
        sv = cur;
        if (!sv) goto done;
    }
    sc = fl_contiguous(sv ? sv : src);
    fl_tensor_release(sv);
    if (!sc) goto done;
    if (!(out = fl_tensor_empty(base->ndim, base->shape, base->dtype, FL_CPU))) goto done;
    fl_copy_strided(base, fl_tensor_data(out));
    scatter_add_raw(base->dtype, base->ndim, index->shape, base->shape, d, fl_tensor_data(ic), ic->dtype, fl_tensor_data(sc), fl_tensor_data(out));
    const fl_tensor *ins[3] = {base, index, src};
    fl_node *n = fl_record(op, scatter_add_backward, 3, ins, out);
    if (n) { fl_node_save(n, ic); n->i[0] = d; }
done:
    fl_tensor_release(ic);
    fl_tensor_release(sc);
    return out;
}

/* ---- topk over the last dim: values descending; ties keep the lower index first; NaN counts as largest ---- */

static bool before(double a, int64_t ia, double b, int64_t ib) {
    if (isnan(a) != isnan(b)) return isnan(a);
    if (a != b && !isnan(a)) return a > b;
    return ia < ib;
}

static int topk_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0] || !fl_node_needs(n, 0)) return FL_OK;
    const fl_tensor *ic = n->saved[0];
    fl_tensor *g = fl_contiguous(go[0]);
    fl_tensor *dx = g ? fl_tensor_zeros(n->in_ndim[0], n->in_shape[0], g->dtype, FL_CPU) : NULL;
    if (!dx) { fl_tensor_release(g); return FL_ENOMEM; }
    scatter_add_raw(g->dtype, ic->ndim, ic->shape, dx->shape, ic->ndim - 1, fl_tensor_data(ic), ic->dtype, fl_tensor_data(g), fl_tensor_data(dx));
    fl_tensor_release(g);
    gi[0] = dx;
    return FL_OK;
}

static fl_tensor *topk_f32(const void *p, fl_tensor *const *ins, fl_tensor **aux) {
    return fl_topk(ins[0], *(const int64_t *)p, aux);
}

fl_tensor *fl_topk(const fl_tensor *x, int64_t k, fl_tensor **indices) {
    if (x && fl_lowp_any(1, &x)) return fl_lowp_apply("topk", topk_f32, &k, 1, &x, x->dtype, indices);
    if (fl_check_cpu_data("topk", x) < 0 || fl_check_float("topk", x) < 0) return NULL;
    if (x->ndim < 1) return fl_fail_null(FL_EINVAL, "topk: input must have at least 1 dim, got %s", fl_shape_str(x));
    int64_t c = x->shape[x->ndim - 1];
    if (k < 0 || k > c) return fl_fail_null(FL_EINVAL, "topk: k = %" PRId64 " out of range [0, %" PRId64 "] for %s", k, c, fl_shape_str(x));
    int64_t oshape[FL_MAX_DIMS];
    memcpy(oshape, x->shape, sizeof(int64_t) * (size_t)x->ndim);
    oshape[x->ndim - 1] = k;
    fl_tensor *xc = fl_contiguous(x), *val = NULL, *idx = NULL;
    if (!xc) return NULL;
    val = fl_tensor_empty(x->ndim, oshape, x->dtype, FL_CPU);
    idx = fl_tensor_empty(x->ndim, oshape, FL_I64, FL_CPU);
    if (!val || !idx) goto fail;
    int64_t rows = c ? fl_tensor_numel(x) / c : 0;
    int32_t dt = x->dtype;
    const void *px = fl_tensor_data(xc);
    void *pv = fl_tensor_data(val);
    int64_t *pi = fl_tensor_data(idx);
    /* Partial insertion sort of the k best per row: O(c k), fine for router widths (experts, k small). */
    #pragma omp parallel for schedule(static) if (rows * c > FL_PAR_MIN)
    for (int64_t r = 0; r < rows; r++) {
        int64_t *bi = pi + r * k, cnt = 0;
        for (int64_t j = 0; j < c && k > 0; j++) {
            double v = ld(px, dt, r * c + j);
            if (cnt == k && !before(v, j, ld(px, dt, r * c + bi[k - 1]), bi[k - 1])) continue;
            int64_t p = cnt < k ? cnt++ : k - 1;
            while (p > 0 && before(v, j, ld(px, dt, r * c + bi[p - 1]), bi[p - 1])) { bi[p] = bi[p - 1]; p--; }
            bi[p] = j;
        }
        for (int64_t j = 0; j < k; j++) {
            if (dt == FL_F32) ((float *)pv)[r * k + j] = ((const float *)px)[r * c + bi[j]];
            else ((double *)pv)[r * k + j] = ((const double *)px)[r * c + bi[j]];
        }
    }
    const fl_tensor *ins[1] = {x};
    fl_node *n = fl_record("topk", topk_backward, 1, ins, val);
    if (n) fl_node_save(n, idx);
    fl_tensor_release(xc);
    if (indices) *indices = idx;
    else fl_tensor_release(idx);
    return val;
fail:
    fl_tensor_release(xc); fl_tensor_release(val); fl_tensor_release(idx);
    return NULL;
}
