/* engine/core/tensor.c: tensor headers (shape, strides, offset over a refcounted storage), their lifecycle,
 * strided copies and element access. Ops live in ops_*.c; autograd bookkeeping in autograd.c. */
#include "internal.h"

#include <math.h>
#include <stdio.h>

void fl_contiguous_strides(int32_t ndim, const int64_t *shape, int64_t *stride) {
    int64_t s = 1;
    for (int32_t d = ndim - 1; d >= 0; d--) {
        stride[d] = s;
        s *= shape[d] > 0 ? shape[d] : 1;
    }
}

int64_t fl_shape_numel(int32_t ndim, const int64_t *shape) {
    int64_t n = 1;
    for (int32_t d = 0; d < ndim; d++) n *= shape[d];
    return n;
}

int32_t fl_wrap_dim(int32_t dim, int32_t ndim) {
    if (dim < 0) dim += ndim;
    return dim >= 0 && dim < ndim ? dim : -1;
}

const char *fl_shape_str_n(int32_t ndim, const int64_t *shape) {
    static _Thread_local char ring[8][160];
    static _Thread_local int next;
    char *b = ring[next++ & 7];
    int off = snprintf(b, 160, "[");
    for (int32_t d = 0; d < ndim && off < 150; d++)
        off += snprintf(b + off, (size_t)(160 - off), d ? ", %" PRId64 : "%" PRId64, shape[d]);
    snprintf(b + off, (size_t)(160 - off), "]");
    return b;
}

const char *fl_shape_str(const fl_tensor *t) { return fl_shape_str_n(t->ndim, t->shape); }

bool fl_same_shape(const fl_tensor *a, const fl_tensor *b) {
    if (a->ndim != b->ndim) return false;
    for (int32_t d = 0; d < a->ndim; d++)
        if (a->shape[d] != b->shape[d]) return false;
    return true;
}

static int check_shape(int32_t ndim, const int64_t *shape, int32_t dtype) {
    if (ndim < 0 || ndim > FL_MAX_DIMS)
        return fl_fail(FL_EINVAL, "tensor: %d dimensions (at most %d)", ndim, FL_MAX_DIMS);
    if (dtype < 0 || dtype >= FL_NDTYPES) return fl_fail(FL_EINVAL, "tensor: unknown dtype %d", dtype);
    for (int32_t d = 0; d < ndim; d++)
        if (shape[d] < 0) return fl_fail(FL_EINVAL, "tensor: negative size %" PRId64 " in dim %d of %s",
                                          shape[d], d, fl_shape_str_n(ndim, shape));
    return fl_shape_check_size("tensor", ndim, shape, dtype);
}

/* Element count and byte size must fit in int64 (every later size, offset and stride product then does). */
int fl_shape_check_size(const char *op, int32_t ndim, const int64_t *shape, int32_t dtype) {
    int64_t n = 1;
    for (int32_t d = 0; d < ndim; d++)
        if (__builtin_mul_overflow(n, shape[d], &n))
            return fl_fail(FL_EINVAL, "%s: shape %s has more than 2^63 elements", op, fl_shape_str_n(ndim, shape));
    int64_t bytes;
    if (__builtin_mul_overflow(n, (int64_t)fl_dtype_size(dtype), &bytes))
        return fl_fail(FL_EINVAL, "%s: shape %s of %s is more than 2^63 bytes", op, fl_shape_str_n(ndim, shape),
                       fl_dtype_name(dtype));
    return FL_OK;
}

fl_tensor *fl_tensor_view_of(fl_storage *s, int32_t dtype, int32_t device, int32_t ndim, const int64_t *shape,
                             const int64_t *stride, int64_t offset) {
    fl_tensor *t = calloc(1, sizeof *t);
    if (!t) return fl_fail_null(FL_ENOMEM, "tensor: out of memory for a header");
    t->refcount = 1;
    t->dtype = dtype;
    t->device = device;
    t->ndim = ndim;
    if (ndim > 0) memcpy(t->shape, shape, sizeof(int64_t) * (size_t)ndim);
    if (stride && ndim > 0) memcpy(t->stride, stride, sizeof(int64_t) * (size_t)ndim);
    else fl_contiguous_strides(ndim, shape, t->stride);
    t->offset = offset;
    t->storage = s;
    fl_storage_retain(s);
    return t;
}

fl_tensor *fl_tensor_empty(int32_t ndim, const int64_t *shape, int32_t dtype, int32_t device) {
    if (check_shape(ndim, shape, dtype) < 0) return NULL;
    if (device != FL_CPU && device != FL_META)
        return fl_fail_null(FL_EUNSUPPORTED, "tensor: device %d is not available in this build", device);
    size_t nbytes = (size_t)fl_shape_numel(ndim, shape) * fl_dtype_size(dtype);
    fl_storage *s = fl_storage_new(nbytes, device);
    if (!s) return NULL;
    fl_tensor *t = fl_tensor_view_of(s, dtype, device, ndim, shape, NULL, 0);
    fl_storage_release(s);
    return t;
}

fl_tensor *fl_tensor_zeros(int32_t ndim, const int64_t *shape, int32_t dtype, int32_t device) {
    fl_tensor *t = fl_tensor_empty(ndim, shape, dtype, device);
    if (t && t->storage->data) memset(t->storage->data, 0, t->storage->nbytes);
    return t;
}

fl_tensor *fl_tensor_full(int32_t ndim, const int64_t *shape, int32_t dtype, double value) {
    fl_tensor *t = fl_tensor_empty(ndim, shape, dtype, FL_CPU);
    if (t) fl_tensor_fill_(t, value);
    return t;
}

fl_tensor *fl_tensor_from_data(int32_t ndim, const int64_t *shape, int32_t dtype, const void *data) {
    fl_tensor *t = fl_tensor_empty(ndim, shape, dtype, FL_CPU);
    if (t) memcpy(t->storage->data, data, t->storage->nbytes);
    return t;
}

fl_tensor *fl_tensor_arange(int64_t start, int64_t end, int32_t dtype) {
    int64_t n = end > start ? end - start : 0;
    fl_tensor *t = fl_tensor_empty(1, &n, dtype, FL_CPU);
    if (!t) return NULL;
    for (int64_t i = 0; i < n; i++) fl_store_elem(t->storage->data, dtype, i, (double)(start + i));
    return t;
}

fl_tensor *fl_tensor_empty_like(const fl_tensor *t) { return fl_tensor_empty(t->ndim, t->shape, t->dtype, t->device); }
fl_tensor *fl_tensor_zeros_like(const fl_tensor *t) { return fl_tensor_zeros(t->ndim, t->shape, t->dtype, t->device); }

void fl_tensor_retain(fl_tensor *t) { if (t) t->refcount++; }

void fl_tensor_release(fl_tensor *t) {
    if (!t || --t->refcount > 0) return;
    fl_tensor_release(t->grad);
    if (t->grad_acc) {
        t->grad_acc->leaf = NULL;   /* the graph may outlive the leaf */
        fl_node_release(t->grad_acc);
    }
    fl_node_release(t->grad_fn);
    fl_storage_release(t->storage);
    free(t);
}

int64_t fl_tensor_numel(const fl_tensor *t) { return fl_shape_numel(t->ndim, t->shape); }

bool fl_tensor_is_contiguous(const fl_tensor *t) {
    int64_t s = 1;
    for (int32_t d = t->ndim - 1; d >= 0; d--) {
        if (t->shape[d] != 1 && t->stride[d] != s) return false;
        s *= t->shape[d];
    }
    return true;
}

bool fl_tensor_has_data(const fl_tensor *t) { return t && t->storage && t->storage->data; }

void *fl_tensor_data(const fl_tensor *t) {
    if (!fl_tensor_has_data(t)) return NULL;
    return (char *)t->storage->data + (size_t)t->offset * fl_dtype_size(t->dtype);
}

int fl_check_cpu_data(const char *op, const fl_tensor *t) {
    if (!t) return fl_fail(FL_EINVAL, "%s: missing tensor argument", op);
    if (t->device == FL_META) return fl_fail(FL_ESTATE, "%s: tensor %s is on meta (materialise it first)", op, fl_shape_str(t));
    if (!fl_tensor_has_data(t)) return fl_fail(FL_ESTATE, "%s: tensor %s has released storage", op, fl_shape_str(t));
    return FL_OK;
}

int fl_check_float(const char *op, const fl_tensor *t) {
    if (fl_check_cpu_data(op, t) < 0) return FL_ESTATE;
    if (!fl_is_float_compute(t->dtype))
        return fl_fail(FL_EINVAL, "%s: expected an f32 or f64 tensor, got %s %s", op, fl_dtype_name(t->dtype), fl_shape_str(t));
    return FL_OK;
}

int fl_check_same_dtype(const char *op, const fl_tensor *a, const fl_tensor *b) {
    if (a->dtype != b->dtype)
        return fl_fail(FL_EINVAL, "%s: dtypes differ (%s %s and %s %s)", op, fl_dtype_name(a->dtype), fl_shape_str(a),
                       fl_dtype_name(b->dtype), fl_shape_str(b));
    return FL_OK;
}

/* Calls fn(src_offset, dst_index, run) for each innermost run of a strided view, row-major order. */
void fl_copy_strided(const fl_tensor *src, void *dst) {
    size_t es = fl_dtype_size(src->dtype);
    const char *base = (const char *)fl_tensor_data(src);
    int64_t n = fl_tensor_numel(src);
    if (n == 0) return;
    if (fl_tensor_is_contiguous(src)) { memcpy(dst, base, (size_t)n * es); return; }
    int32_t nd = src->ndim;
    int64_t inner = src->shape[nd - 1], istride = src->stride[nd - 1], outer = n / inner;
    #pragma omp parallel for schedule(static) if (n > FL_PAR_MIN)
    for (int64_t o = 0; o < outer; o++) {
        int64_t rem = o, off = 0;
        for (int32_t d = nd - 2; d >= 0; d--) {
            off += (rem % src->shape[d]) * src->stride[d];
            rem /= src->shape[d];
        }
        char *out = (char *)dst + (size_t)(o * inner) * es;
        const char *in = base + (size_t)off * es;
        if (istride == 1) memcpy(out, in, (size_t)inner * es);
        else if (es == 4) for (int64_t i = 0; i < inner; i++) ((uint32_t *)out)[i] = *(const uint32_t *)(in + (size_t)(i * istride) * 4);
        else for (int64_t i = 0; i < inner; i++) memcpy(out + (size_t)i * es, in + (size_t)(i * istride) * es, es);
    }
}

static int64_t flat_offset(const fl_tensor *t, int64_t i) {
    int64_t off = 0;
    for (int32_t d = t->ndim - 1; d >= 0; d--) {
        off += (i % t->shape[d]) * t->stride[d];
        i /= t->shape[d];
    }
    return off;
}

double fl_tensor_get_flat(const fl_tensor *t, int64_t i) {
    if (!fl_tensor_has_data(t) || i < 0 || i >= fl_tensor_numel(t)) return NAN;
    double v = fl_load_elem(fl_tensor_data(t), t->dtype, flat_offset(t, i));
    return isnan(v) ? NAN : v;   /* canonical NaN: LuaJIT reads some NaN payloads as other values (nil) */
}

int fl_tensor_set_flat(fl_tensor *t, int64_t i, double v) {
    if (fl_check_cpu_data("set", t) < 0) return FL_ESTATE;
    if (i < 0 || i >= fl_tensor_numel(t))
        return fl_fail(FL_EINVAL, "set: index %" PRId64 " out of range for %s", i, fl_shape_str(t));
    fl_store_elem(fl_tensor_data(t), t->dtype, flat_offset(t, i), v);
    return FL_OK;
}

int fl_tensor_copy_to_buffer(const fl_tensor *t, void *dst) {
    if (fl_check_cpu_data("copy_to_buffer", t) < 0) return FL_ESTATE;
    fl_copy_strided(t, dst);
    return FL_OK;
}

int fl_tensor_fill_(fl_tensor *t, double v) {
    if (fl_check_cpu_data("fill_", t) < 0) return FL_ESTATE;
    int64_t n = fl_tensor_numel(t);
    if (fl_tensor_is_contiguous(t)) {
        void *p = fl_tensor_data(t);
        if (t->dtype == FL_F32) { float f = (float)v; float *q = p; for (int64_t i = 0; i < n; i++) q[i] = f; }
        else { for (int64_t i = 0; i < n; i++) fl_store_elem(p, t->dtype, i, v); }
    } else {
        for (int64_t i = 0; i < n; i++) fl_store_elem(fl_tensor_data(t), t->dtype, flat_offset(t, i), v);
    }
    return FL_OK;
}

int fl_tensor_copy_(fl_tensor *dst, const fl_tensor *src) {
    if (fl_check_cpu_data("copy_", dst) < 0 || fl_check_cpu_data("copy_", src) < 0) return FL_ESTATE;
    int64_t n = fl_tensor_numel(dst);
    if (fl_tensor_numel(src) != n)
        return fl_fail(FL_EINVAL, "copy_: destination %s and source %s differ in size", fl_shape_str(dst), fl_shape_str(src));
    if (fl_tensor_is_contiguous(dst) && fl_tensor_is_contiguous(src)) {
        fl_convert(fl_tensor_data(src), src->dtype, fl_tensor_data(dst), dst->dtype, n);
        return FL_OK;
    }
    const void *sp = fl_tensor_data(src);
    void *buf = NULL;
    if (!fl_tensor_is_contiguous(src)) {
        buf = malloc((size_t)n * fl_dtype_size(src->dtype) + 1);
        if (!buf) return fl_fail(FL_ENOMEM, "copy_: out of memory");
        fl_copy_strided(src, buf);
        sp = buf;
    }
    int32_t nd = dst->ndim;
    if (fl_tensor_is_contiguous(dst)) fl_convert(sp, src->dtype, fl_tensor_data(dst), dst->dtype, n);
    else if (nd > 0 && dst->stride[nd - 1] == 1) {
        /* Rows of the destination are contiguous runs (a narrowed slice, a transposed block): convert
         * run by run. Each run is written by one thread; the bytes are the same for any thread count. */
        int64_t inner = dst->shape[nd - 1], outer = n / inner;
        size_t ses = fl_dtype_size(src->dtype), des = fl_dtype_size(dst->dtype);
        char *dbase = fl_tensor_data(dst);
        #pragma omp parallel for schedule(static) if (n > FL_PAR_MIN)
        for (int64_t o = 0; o < outer; o++) {
            int64_t rem = o, off = 0;
            for (int32_t d = nd - 2; d >= 0; d--) {
                off += (rem % dst->shape[d]) * dst->stride[d];
                rem /= dst->shape[d];
            }
            fl_convert((const char *)sp + (size_t)(o * inner) * ses, src->dtype, dbase + (size_t)off * des, dst->dtype, inner);
        }
    } else for (int64_t i = 0; i < n; i++)
        fl_store_elem(fl_tensor_data(dst), dst->dtype, flat_offset(dst, i), fl_load_elem(sp, src->dtype, i));
    free(buf);
    return FL_OK;
}

int fl_tensor_storage_release(fl_tensor *t) {
    if (!t->storage) return FL_OK;
    return fl_storage_free_data(t->storage);
}

int fl_tensor_storage_alloc(fl_tensor *t) {
    if (!t->storage) return fl_fail(FL_ESTATE, "storage_alloc: tensor %s has no storage", fl_shape_str(t));
    int rc = fl_storage_alloc_data(t->storage);
    if (rc == FL_OK) t->device = t->storage->device;
    return rc;
}

int fl_tensor_materialize(fl_tensor *t, int32_t device) {
    if (device != FL_CPU) return fl_fail(FL_EUNSUPPORTED, "materialize: device %d is not available in this build", device);
    if (t->device != FL_META) return FL_OK;
    bool fresh = !t->storage->data;   /* a tied weight's storage may already be materialised by its twin */
    int rc = fl_tensor_storage_alloc(t);
    if (rc < 0) return rc;
    if (fresh) memset(t->storage->data, 0, t->storage->nbytes);
    return FL_OK;
}

void fl_tensor_set_category(fl_tensor *t, int32_t category) { if (t) fl_storage_set_category(t->storage, category); }

bool fl_tensor_same_storage(const fl_tensor *a, const fl_tensor *b) { return a->storage && a->storage == b->storage; }

void fl_free(void *p) { free(p); }
