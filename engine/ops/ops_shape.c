/* engine/ops/ops_shape.c: views and copies that change shape or dtype (view/reshape, transpose, permute, narrow,
 * expand, contiguous, cast, cat, index_select), each with its backward. */
#include "internal.h"

/* ---- view / reshape ---- */

static int view_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0]) return FL_OK;
    gi[0] = fl_view(go[0], n->in_ndim[0], n->in_shape[0]);
    return gi[0] ? FL_OK : FL_EINVAL;
}

fl_tensor *fl_view(const fl_tensor *t, int32_t ndim, const int64_t *shape_in) {
    if (ndim < 0 || ndim > FL_MAX_DIMS) return fl_fail_null(FL_EINVAL, "view: %d dimensions (at most %d)", ndim, FL_MAX_DIMS);
    int64_t shape[FL_MAX_DIMS], known = 1, n = fl_tensor_numel(t);
    int32_t infer = -1;
    for (int32_t d = 0; d < ndim; d++) {
        shape[d] = shape_in[d];
        if (shape[d] == -1) {
            if (infer >= 0) return fl_fail_null(FL_EINVAL, "view: more than one -1 in %s", fl_shape_str_n(ndim, shape_in));
            infer = d;
        } else if (shape[d] < 0) return fl_fail_null(FL_EINVAL, "view: bad size %" PRId64 " in %s", shape[d], fl_shape_str_n(ndim, shape_in));
        else if (__builtin_mul_overflow(known, shape[d], &known))
            return fl_fail_null(FL_EINVAL, "view: shape %s has more than 2^63 elements", fl_shape_str_n(ndim, shape_in));
    }
    if (infer >= 0) {
        if (known == 0 || n % known) return fl_fail_null(FL_EINVAL, "view: cannot view %s (%" PRId64 " elements) as %s", fl_shape_str(t), n, fl_shape_str_n(ndim, shape_in));
        shape[infer] = n / known;
    } else if (known != n)
        return fl_fail_null(FL_EINVAL, "view: cannot view %s (%" PRId64 " elements) as %s (%" PRId64 ")", fl_shape_str(t), n, fl_shape_str_n(ndim, shape_in), known);
    fl_tensor *src = fl_contiguous(t);   /* a view when t is contiguous, a copy (with its own grad_fn) otherwise */
    if (!src) return NULL;
    fl_tensor *out = fl_tensor_view_of(src->storage, src->dtype, src->device, ndim, shape, NULL, src->offset);
    if (out) {
        const fl_tensor *ins[1] = {src};
        fl_record("view", view_backward, 1, ins, out);
    }
    fl_tensor_release(src);
    return out;
}

/* ---- transpose / permute ---- */

static int permute_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0]) return FL_OK;
    int32_t inv[FL_MAX_DIMS];
    for (int32_t d = 0; d < n->in_ndim[0]; d++) inv[n->i[d]] = d;
    gi[0] = fl_permute(go[0], n->in_ndim[0], inv);
    return gi[0] ? FL_OK : FL_EINVAL;
}

fl_tensor *fl_permute(const fl_tensor *t, int32_t ndim, const int32_t *dims) {
    if (ndim != t->ndim) return fl_fail_null(FL_EINVAL, "permute: %d dims given for a %d-d tensor %s", ndim, t->ndim, fl_shape_str(t));
    if (ndim > 6) return fl_fail_null(FL_EINVAL, "permute: at most 6 dims");
    int64_t shape[FL_MAX_DIMS], stride[FL_MAX_DIMS];
    bool seen[FL_MAX_DIMS] = {0};
    for (int32_t d = 0; d < ndim; d++) {
        int32_t s = fl_wrap_dim(dims[d], ndim);
        if (s < 0 || seen[s]) return fl_fail_null(FL_EINVAL, "permute: bad or repeated dim %d for %s", dims[d], fl_shape_str(t));
        seen[s] = true;
        shape[d] = t->shape[s];
        stride[d] = t->stride[s];
    }
    fl_tensor *out = fl_tensor_view_of(t->storage, t->dtype, t->device, ndim, shape, stride, t->offset);
    if (!out) return NULL;
    const fl_tensor *ins[1] = {t};
    fl_node *n = fl_record("permute", permute_backward, 1, ins, out);
    if (n) for (int32_t d = 0; d < ndim; d++) n->i[d] = fl_wrap_dim(dims[d], ndim);
    return out;
}

fl_tensor *fl_transpose(const fl_tensor *t, int32_t d0, int32_t d1) {
    int32_t a = fl_wrap_dim(d0, t->ndim), b = fl_wrap_dim(d1, t->ndim);
    if (a < 0 || b < 0) return fl_fail_null(FL_EINVAL, "transpose: dims %d, %d out of range for %s", d0, d1, fl_shape_str(t));
    int32_t dims[FL_MAX_DIMS];
    for (int32_t d = 0; d < t->ndim; d++) dims[d] = d;
    dims[a] = b;
    dims[b] = a;
    if (t->ndim > 6) return fl_fail_null(FL_EINVAL, "transpose: at most 6 dims");
    return fl_permute(t, t->ndim, dims);
}

/* ---- narrow ---- */

static int narrow_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0]) return FL_OK;
    fl_tensor *g = fl_tensor_zeros(n->in_ndim[0], n->in_shape[0], go[0]->dtype, FL_CPU);
    if (!g) return FL_ENOMEM;
    fl_tensor *slice = fl_narrow(g, (int32_t)n->i[0], n->i[1], n->i[2]);
    int rc = slice ? fl_tensor_copy_(slice, go[0]) : FL_EINVAL;
    fl_tensor_release(slice);
    if (rc < 0) { fl_tensor_release(g); return rc; }
    gi[0] = g;
    return FL_OK;
}

fl_tensor *fl_narrow(const fl_tensor *t, int32_t dim, int64_t start, int64_t length) {
    int32_t d = fl_wrap_dim(dim, t->ndim);
    if (d < 0) return fl_fail_null(FL_EINVAL, "narrow: dim %d out of range for %s", dim, fl_shape_str(t));
    if (start < 0 || length < 0 || start > t->shape[d] || length > t->shape[d] - start)
        return fl_fail_null(FL_EINVAL, "narrow: rows [%" PRId64 ", %" PRId64 ") out of range for dim %d of %s", start, start + length, d, fl_shape_str(t));
    int64_t shape[FL_MAX_DIMS];
    memcpy(shape, t->shape, sizeof shape);
    shape[d] = length;
    fl_tensor *out = fl_tensor_view_of(t->storage, t->dtype, t->device, t->ndim, shape, t->stride, t->offset + start * t->stride[d]);
    if (!out) return NULL;
    const fl_tensor *ins[1] = {t};
    fl_node *n = fl_record("narrow", narrow_backward, 1, ins, out);
    if (n) { n->i[0] = d; n->i[1] = start; n->i[2] = length; }
    return out;
}

/* ---- expand ---- */

static int expand_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0]) return FL_OK;
    gi[0] = fl_sum_to_shape(go[0], n->in_ndim[0], n->in_shape[0]);
    return gi[0] ? FL_OK : FL_EINVAL;
}

fl_tensor *fl_expand(const fl_tensor *t, int32_t ndim, const int64_t *shape) {
    if (ndim < t->ndim || ndim > FL_MAX_DIMS) return fl_fail_null(FL_EINVAL, "expand: cannot expand %s to %s", fl_shape_str(t), fl_shape_str_n(ndim, shape));
    int64_t sh[FL_MAX_DIMS], st[FL_MAX_DIMS];
    int32_t lead = ndim - t->ndim;
    for (int32_t d = 0; d < ndim; d++) {
        int64_t want = shape[d], have = d < lead ? 1 : t->shape[d - lead];
        if (want == -1) want = have;
        if (want < 0) return fl_fail_null(FL_EINVAL, "expand: bad size %" PRId64 " in %s", want, fl_shape_str_n(ndim, shape));
        if (have != want && have != 1) return fl_fail_null(FL_EINVAL, "expand: cannot expand %s to %s (dim %d)", fl_shape_str(t), fl_shape_str_n(ndim, shape), d);
        sh[d] = want;
        st[d] = (d < lead || have != want) ? 0 : t->stride[d - lead];
    }
    if (fl_shape_check_size("expand", ndim, sh, t->dtype) < 0) return NULL;
    fl_tensor *out = fl_tensor_view_of(t->storage, t->dtype, t->device, ndim, sh, st, t->offset);
    if (!out) return NULL;
    const fl_tensor *ins[1] = {t};
    fl_record("expand", expand_backward, 1, ins, out);
    return out;
}

/* ---- contiguous ---- */

static int pass_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    (void)n;
    if (!go[0]) return FL_OK;
    fl_tensor_retain(go[0]);
    gi[0] = go[0];
    return FL_OK;
}

fl_tensor *fl_contiguous(const fl_tensor *t) {
    if (fl_tensor_is_contiguous(t)) { fl_tensor_retain((fl_tensor *)t); return (fl_tensor *)t; }
    if (fl_check_cpu_data("contiguous", t) < 0) return NULL;
    fl_tensor *out = fl_tensor_empty(t->ndim, t->shape, t->dtype, FL_CPU);
    if (!out) return NULL;
    fl_copy_strided(t, fl_tensor_data(out));
    const fl_tensor *ins[1] = {t};
    fl_record("contiguous", pass_backward, 1, ins, out);
    return out;
}

/* ---- cast ---- */

static int cast_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0]) return FL_OK;
    gi[0] = fl_cast(go[0], n->in_dtype[0]);
    return gi[0] ? FL_OK : FL_EINVAL;
}

fl_tensor *fl_cast(const fl_tensor *t, int32_t dtype) {
    if (dtype < 0 || dtype >= FL_NDTYPES) return fl_fail_null(FL_EINVAL, "cast: unknown dtype %d", dtype);
    if (t->dtype == dtype) { fl_tensor_retain((fl_tensor *)t); return (fl_tensor *)t; }
    if (fl_check_cpu_data("cast", t) < 0) return NULL;
    fl_tensor *out = fl_tensor_empty(t->ndim, t->shape, dtype, FL_CPU);
    if (!out) return NULL;
    if (fl_tensor_copy_(out, t) < 0) { fl_tensor_release(out); return NULL; }
    bool float_out = dtype == FL_F32 || dtype == FL_F64 || dtype == FL_BF16 || dtype == FL_F16;
    if (float_out) {
        const fl_tensor *ins[1] = {t};
        fl_record("cast", cast_backward, 1, ins, out);
    }
    return out;
}

/* ---- cat ---- */

typedef struct { int32_t n; int64_t *sizes; } cat_ctx;

static void cat_destroy(fl_node *n) { cat_ctx *c = n->ctx; if (c) free(c->sizes); free(c); }

static int cat_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0]) return FL_OK;
    cat_ctx *c = n->ctx;
    int64_t start = 0;
    for (int32_t i = 0; i < c->n; i++) {
        if (fl_node_needs(n, i)) {
            fl_tensor *s = fl_narrow(go[0], (int32_t)n->i[0], start, c->sizes[i]);
            gi[i] = s ? fl_contiguous(s) : NULL;
            fl_tensor_release(s);
            if (!gi[i]) return FL_EINVAL;
        }
        start += c->sizes[i];
    }
    return FL_OK;
}

fl_tensor *fl_cat(int32_t n, fl_tensor *const *ts, int32_t dim) {
    if (n < 1) return fl_fail_null(FL_EINVAL, "cat: no tensors");
    const fl_tensor *t0 = ts[0];
    int32_t d = fl_wrap_dim(dim, t0->ndim);
    if (d < 0) return fl_fail_null(FL_EINVAL, "cat: dim %d out of range for %s", dim, fl_shape_str(t0));
    int64_t shape[FL_MAX_DIMS];
    memcpy(shape, t0->shape, sizeof shape);
    shape[d] = 0;
    for (int32_t i = 0; i < n; i++) {
        const fl_tensor *t = ts[i];
        if (fl_check_cpu_data("cat", t) < 0) return NULL;
        bool ok = t->ndim == t0->ndim && t->dtype == t0->dtype;
        for (int32_t k = 0; ok && k < t->ndim; k++) ok = k == d || t->shape[k] == t0->shape[k];
        if (!ok) return fl_fail_null(FL_EINVAL, "cat: tensor %d is %s %s, tensor 0 is %s %s (along dim %d)", i,
                                     fl_dtype_name(t->dtype), fl_shape_str(t), fl_dtype_name(t0->dtype), fl_shape_str(t0), d);
        shape[d] += t->shape[d];
    }
    fl_tensor *out = fl_tensor_empty(t0->ndim, shape, t0->dtype, FL_CPU);
    if (!out) return NULL;
    int64_t start = 0;
    int rc = FL_OK;
    bool was = fl_grad_is_enabled();
    fl_grad_set_enabled(false);
    for (int32_t i = 0; rc == FL_OK && i < n; i++) {
        fl_tensor *slice = fl_narrow(out, d, start, ts[i]->shape[d]);   /* narrow and copy_ set the message */
        rc = slice ? fl_tensor_copy_(slice, ts[i]) : FL_ENOMEM;
        fl_tensor_release(slice);
        start += ts[i]->shape[d];
    }
    fl_grad_set_enabled(was);
    fl_node *nd = rc == FL_OK ? fl_node_make("cat", cat_backward, n, (const fl_tensor *const *)ts, 1) : NULL;
    if (nd) {
        cat_ctx *c = calloc(1, sizeof *c);
        int64_t *sizes = malloc(sizeof(int64_t) * (size_t)n);
        if (!c || !sizes) {
            free(c); free(sizes);
            rc = fl_fail(FL_ENOMEM, "cat: out of memory for the backward record of %d tensors", n);
        } else {
            c->n = n;
            c->sizes = sizes;
            for (int32_t i = 0; i < n; i++) c->sizes[i] = ts[i]->shape[d];
            nd->ctx = c;
            nd->destroy = cat_destroy;
            nd->i[0] = d;
            fl_node_set_output(nd, 0, out);
        }
        fl_node_release(nd);
    }
    if (rc < 0) { fl_tensor_release(out); return NULL; }
    return out;
}

/* ---- index_select ---- */

static int64_t index_at(const fl_tensor *idx, int64_t i) {
    const void *p = fl_tensor_data(idx);
    int64_t off = i * idx->stride[0];
    return idx->dtype == FL_I64 ? ((const int64_t *)p)[off] : ((const int32_t *)p)[off];
}

static int index_select_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0] || !fl_node_needs(n, 0)) return FL_OK;
    const fl_tensor *idx = n->saved[0];
    int32_t d = (int32_t)n->i[0];
    fl_tensor *g = fl_tensor_zeros(n->in_ndim[0], n->in_shape[0], go[0]->dtype, FL_CPU);
    if (!g) return FL_ENOMEM;
    if (d == 0 && fl_tensor_is_contiguous(go[0]) && (go[0]->dtype == FL_F32 || go[0]->dtype == FL_F64)) {
        /* rows of a contiguous gradient (MoE dispatch, embeddings of a gather): each output row adds its index's
         * rows in index order — the order of the general path below — split over columns, so any thread count
         * gives the same bits */
        int64_t rows = idx->shape[0], row = rows ? fl_tensor_numel(go[0]) / rows : 0;
        const void *src = fl_tensor_data(go[0]);
        void *dst = fl_tensor_data(g);
        enum { COLS = 256 };
        int64_t nblk = (row + COLS - 1) / COLS;
        bool f32 = go[0]->dtype == FL_F32;
        #pragma omp parallel for schedule(static) if (rows * row > FL_PAR_MIN && nblk > 1)
        for (int64_t cb = 0; cb < nblk; cb++) {
            int64_t c0 = cb * COLS, c1 = fl_min64(row, c0 + COLS);
            for (int64_t i = 0; i < rows; i++) {
                int64_t k = index_at(idx, i);
                if (f32) {
                    float *o = (float *)dst + k * row;
                    const float *x = (const float *)src + i * row;
                    for (int64_t c = c0; c < c1; c++) o[c] += x[c];
                } else {
                    double *o = (double *)dst + k * row;
                    const double *x = (const double *)src + i * row;
                    for (int64_t c = c0; c < c1; c++) o[c] += x[c];
                }
            }
        }
        gi[0] = g;
        return FL_OK;
    }
    /* Serial over the index: repeated indices add up in index order, the same bits every run. */
    for (int64_t i = 0; i < idx->shape[0]; i++) {
        fl_tensor *dst = fl_narrow(g, d, index_at(idx, i), 1), *src = fl_narrow(go[0], d, i, 1);
        fl_tensor *c = fl_contiguous(src);
        fl_tensor *dc = fl_contiguous(dst);
        if (dc == dst) fl_add_(dst, c, 1.0);
        else { fl_add_(dc, c, 1.0); fl_tensor_copy_(dst, dc); }
        fl_tensor_release(dc); fl_tensor_release(c); fl_tensor_release(src); fl_tensor_release(dst);
    }
    gi[0] = g;
    return FL_OK;
}

fl_tensor *fl_index_select(const fl_tensor *t, int32_t dim, const fl_tensor *index) {
    int32_t d = fl_wrap_dim(dim, t->ndim);
    if (d < 0) return fl_fail_null(FL_EINVAL, "index_select: dim %d out of range for %s", dim, fl_shape_str(t));
    if (fl_check_cpu_data("index_select", t) < 0 || fl_check_cpu_data("index_select", index) < 0) return NULL;
    if (index->ndim != 1 || (index->dtype != FL_I64 && index->dtype != FL_I32))
        return fl_fail_null(FL_EINVAL, "index_select: index must be 1-D i64 or i32, got %s %s", fl_dtype_name(index->dtype), fl_shape_str(index));
    int64_t shape[FL_MAX_DIMS];
    memcpy(shape, t->shape, sizeof shape);
    shape[d] = index->shape[0];
    for (int64_t i = 0; i < index->shape[0]; i++) {
        int64_t k = index_at(index, i);
        if (k < 0 || k >= t->shape[d]) return fl_fail_null(FL_EINVAL, "index_select: index %" PRId64 " out of range for dim %d of %s", k, d, fl_shape_str(t));
    }
    fl_tensor *out = fl_tensor_empty(t->ndim, shape, t->dtype, FL_CPU);
    if (!out) return NULL;
    bool was = fl_grad_is_enabled();
    fl_grad_set_enabled(false);
    for (int64_t i = 0; i < index->shape[0]; i++) {
        fl_tensor *dst = fl_narrow(out, d, i, 1), *src = fl_narrow(t, d, index_at(index, i), 1);
        fl_tensor_copy_(dst, src);
        fl_tensor_release(dst); fl_tensor_release(src);
    }
    fl_grad_set_enabled(was);
    const fl_tensor *ins[2] = {t, index};
    fl_node *n = fl_record("index_select", index_select_backward, 2, ins, out);
    if (n) { fl_node_save(n, index); n->i[0] = d; }
    return out;
}
