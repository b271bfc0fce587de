/* engine/ops/ops_elementwise.c: broadcasting binary ops (add, sub, mul, div), scalar ops and unary math, each
 * with its backward. f32 and f64 kernels; bf16/f16 inputs run the f32 kernels and round once (ops_shape.c),
 * mixed dtypes promote as torch.result_type. Integer tensors must be cast first (the error says so). */
#include "internal.h"

#include <math.h>

typedef enum { BIN_ADD, BIN_SUB, BIN_MUL, BIN_DIV } binop;

/* Computes the broadcast shape of a and b into out_shape; strides of a and b aligned to it (0 = broadcast). */
static int broadcast(const char *op, const fl_tensor *a, const fl_tensor *b, int32_t *nd, int64_t *shape,
                     int64_t *sa, int64_t *sb) {
    int32_t n = a->ndim > b->ndim ? a->ndim : b->ndim;
    for (int32_t d = 0; d < n; d++) {
        int32_t da = d - (n - a->ndim), db = d - (n - b->ndim);
        int64_t xa = da >= 0 ? a->shape[da] : 1, xb = db >= 0 ? b->shape[db] : 1;
        if (xa != xb && xa != 1 && xb != 1)
            return fl_fail(FL_EINVAL, "%s: shapes %s and %s do not broadcast (dim %d: %" PRId64 " vs %" PRId64 ")", op,
                           fl_shape_str(a), fl_shape_str(b), d, xa, xb);
        shape[d] = xa > xb ? xa : xb;
        if (xa == 0 || xb == 0) shape[d] = 0;
        sa[d] = (da >= 0 && xa == shape[d]) ? a->stride[da] : 0;
        sb[d] = (db >= 0 && xb == shape[d]) ? b->stride[db] : 0;
    }
    *nd = n;
    return FL_OK;
}

#define BIN_APPLY(op, x, y, alpha) \
    ((op) == BIN_ADD ? (x) + (alpha) * (y) : (op) == BIN_SUB ? (x) - (alpha) * (y) : (op) == BIN_MUL ? (x) * (y) : (x) / (y))

#define DEFINE_BINARY_KERNEL(T, NAME)                                                                              \
    static void NAME(binop op, T alpha, int32_t nd, const int64_t *shape, const T *pa, const int64_t *sa,         \
                     const T *pb, const int64_t *sb, T *out) {                                                     \
        int64_t inner = nd ? shape[nd - 1] : 1, n = fl_shape_numel(nd, shape), outer = inner ? n / inner : 0;     \
        int64_t ia = nd ? sa[nd - 1] : 0, ib = nd ? sb[nd - 1] : 0;                                               \
        _Pragma("omp parallel for schedule(static) if (n > FL_PAR_MIN)")                                          \
        for (int64_t o = 0; o < outer; o++) {                                                                      \
            int64_t rem = o, oa = 0, ob = 0;                                                                       \
            for (int32_t d = nd - 2; d >= 0; d--) {                                                                \
                int64_t k = rem % shape[d];                                                                        \
                rem /= shape[d];                                                                                   \
                oa += k * sa[d];                                                                                   \
                ob += k * sb[d];                                                                                   \
            }                                                                                                      \
            const T *x = pa + oa, *y = pb + ob;                                                                    \
            T *z = out + o * inner;                                                                                \
            if (ia == 1 && ib == 1) {                                                                              \
                switch (op) {                                                                                      \
                case BIN_ADD: for (int64_t i = 0; i < inner; i++) z[i] = x[i] + alpha * y[i]; break;               \
                case BIN_SUB: for (int64_t i = 0; i < inner; i++) z[i] = x[i] - alpha * y[i]; break;               \
                case BIN_MUL: for (int64_t i = 0; i < inner; i++) z[i] = x[i] * y[i]; break;                       \
                case BIN_DIV: for (int64_t i = 0; i < inner; i++) z[i] = x[i] / y[i]; break;                       \
                }                                                                                                  \
            } else {                                                                                               \
                for (int64_t i = 0; i < inner; i++) z[i] = BIN_APPLY(op, x[i * ia], y[i * ib], alpha);             \
            }                                                                                                      \
        }                                                                                                          \
    }
DEFINE_BINARY_KERNEL(float, binary_f32)
DEFINE_BINARY_KERNEL(double, binary_f64)

/* The raw computation, no autograd: out = a (op) b with broadcasting. */
static fl_tensor *binary_raw(const char *name, binop op, const fl_tensor *a, const fl_tensor *b, double alpha) {
    if (fl_check_float(name, a) < 0 || fl_check_float(name, b) < 0 || fl_check_same_dtype(name, a, b) < 0) return NULL;
    int32_t nd = 0;
    int64_t shape[FL_MAX_DIMS], sa[FL_MAX_DIMS], sb[FL_MAX_DIMS];
    if (broadcast(name, a, b, &nd, shape, sa, sb) < 0) return NULL;
    fl_tensor *out = fl_tensor_empty(nd, shape, a->dtype, FL_CPU);
    if (!out) return NULL;
    if (a->dtype == FL_F32) binary_f32(op, (float)alpha, nd, shape, fl_tensor_data(a), sa, fl_tensor_data(b), sb, fl_tensor_data(out));
    else binary_f64(op, alpha, nd, shape, fl_tensor_data(a), sa, fl_tensor_data(b), sb, fl_tensor_data(out));
    return out;
}

static fl_tensor *reduce_to(fl_tensor *g, int32_t slot, const fl_node *n) {
    /* g is owned; returns an owned tensor of input `slot`'s shape. */
    if (!g) return NULL;
    fl_tensor *r = fl_sum_to_shape(g, n->in_ndim[slot], n->in_shape[slot]);
    fl_tensor_release(g);
    return r;
}

static int add_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    const fl_tensor *g = go[0];
    if (!g) return FL_OK;
    if (fl_node_needs(n, 0)) { fl_tensor_retain((fl_tensor *)g); gi[0] = reduce_to((fl_tensor *)g, 0, n); if (!gi[0]) return FL_EINVAL; }
    if (fl_node_needs(n, 1)) {
        double s = n->f[0];  /* alpha, negated for sub */
        fl_tensor *x = s == 1.0 ? (fl_tensor_retain((fl_tensor *)g), (fl_tensor *)g) : fl_scale(g, s);
        gi[1] = reduce_to(x, 1, n);
        if (!gi[1]) return FL_EINVAL;
    }
    return FL_OK;
}

static int mul_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    const fl_tensor *g = go[0];
    if (!g) return FL_OK;
    const fl_tensor *a = n->saved[0], *b = n->saved[1];
    if (fl_node_needs(n, 0) && !(gi[0] = reduce_to(binary_raw("mul", BIN_MUL, g, b, 1), 0, n))) return FL_EINVAL;
    if (fl_node_needs(n, 1) && !(gi[1] = reduce_to(binary_raw("mul", BIN_MUL, g, a, 1), 1, n))) return FL_EINVAL;
    return FL_OK;
}

static int div_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    const fl_tensor *g = go[0];
    if (!g) return FL_OK;
    const fl_tensor *a = n->saved[0], *b = n->saved[1];
    if (fl_node_needs(n, 0) && !(gi[0] = reduce_to(binary_raw("div", BIN_DIV, g, b, 1), 0, n))) return FL_EINVAL;
    if (fl_node_needs(n, 1)) { /* -g * a / b^2 = -(g / b) * (a / b) */
        fl_tensor *q = binary_raw("div", BIN_DIV, g, b, 1), *r = binary_raw("div", BIN_DIV, a, b, 1);
        fl_tensor *p = q && r ? binary_raw("mul", BIN_MUL, q, r, 1) : NULL;
        fl_tensor_release(q); fl_tensor_release(r);
        fl_tensor *m = p ? fl_scale(p, -1.0) : NULL;
        fl_tensor_release(p);
        if (!(gi[1] = reduce_to(m, 1, n))) return FL_EINVAL;
    }
    return FL_OK;
}

static fl_tensor *binary(const char *name, binop op, const fl_tensor *a, const fl_tensor *b, double alpha) {
    fl_tensor *out = binary_raw(name, op, a, b, alpha);
    if (!out) return NULL;
    const fl_tensor *ins[2] = {a, b};
    fl_backward_fn fn = op == BIN_MUL ? mul_backward : op == BIN_DIV ? div_backward : add_backward;
    fl_node *n = fl_record(name, fn, 2, ins, out);
    if (n) {
        n->f[0] = op == BIN_SUB ? -alpha : alpha;
        if (op == BIN_MUL || op == BIN_DIV) { fl_node_save(n, a); fl_node_save(n, b); }
    }
    return out;
}

typedef struct { const char *name; binop op; double alpha; } binary_args;

static fl_tensor *binary_op_f32(const void *p, fl_tensor *const *ins, fl_tensor **aux) {
    const binary_args *a = p;
    return binary(a->name, a->op, ins[0], ins[1], a->alpha);
}

/* A bf16/f16 operand: compute in f32 (f64 with an f64 operand), round once to the promoted dtype. */
static fl_tensor *binary_any(const char *name, binop op, const fl_tensor *a, const fl_tensor *b, double alpha) {
    const fl_tensor *ins[2] = {a, b};
    if (a && b && fl_lowp_any(2, ins)) {
        binary_args args = {name, op, alpha};
        return fl_lowp_apply(name, binary_op_f32, &args, 2, ins, fl_lowp_promote(a->dtype, b->dtype), NULL);
    }
    return binary(name, op, a, b, alpha);
}

fl_tensor *fl_add(const fl_tensor *a, const fl_tensor *b) { return binary_any("add", BIN_ADD, a, b, 1.0); }
fl_tensor *fl_sub(const fl_tensor *a, const fl_tensor *b) { return binary_any("sub", BIN_SUB, a, b, 1.0); }
fl_tensor *fl_mul(const fl_tensor *a, const fl_tensor *b) { return binary_any("mul", BIN_MUL, a, b, 1.0); }
fl_tensor *fl_div(const fl_tensor *a, const fl_tensor *b) { return binary_any("div", BIN_DIV, a, b, 1.0); }
fl_tensor *fl_add_scaled(const fl_tensor *a, const fl_tensor *b, double alpha) { return binary_any("add", BIN_ADD, a, b, alpha); }

static bool lowp_mixable(int32_t dt) { return dt == FL_F32 || dt == FL_BF16 || dt == FL_F16; }

/* a += alpha*b where a or b is bf16/f16 (the other f32, bf16 or f16): f32 arithmetic, a rounded once per
 * element (gradient accumulation into bf16 leaves). Chunks go through f32 stack buffers. */
enum { ADD_CHUNK = 1024 };
static void add_lowp(fl_tensor *a, const void *pb, int32_t bdt, int64_t n, double alpha) {
    char *pa = fl_tensor_data(a);
    int32_t adt = a->dtype;
    size_t esa = fl_dtype_size(adt), esb = fl_dtype_size(bdt);
    float al = (float)alpha;
    int64_t nc = (n + ADD_CHUNK - 1) / ADD_CHUNK;
    #pragma omp parallel for schedule(static) if (n > FL_PAR_MIN)
    for (int64_t c = 0; c < nc; c++) {
        float x[ADD_CHUNK], y[ADD_CHUNK];
        int64_t lo = c * ADD_CHUNK, len = fl_min64(ADD_CHUNK, n - lo);
        fl_convert(pa + (size_t)lo * esa, adt, x, FL_F32, len);
        fl_convert((const char *)pb + (size_t)lo * esb, bdt, y, FL_F32, len);
        if (alpha == 1.0) for (int64_t i = 0; i < len; i++) x[i] += y[i];
        else for (int64_t i = 0; i < len; i++) x[i] += al * y[i];
        fl_convert(x, FL_F32, pa + (size_t)lo * esa, adt, len);
    }
}

int fl_add_(fl_tensor *a, const fl_tensor *b, double alpha) {
    const fl_tensor *ab[2] = {a, b};
    bool lowp = a && b && fl_lowp_any(2, ab) && lowp_mixable(a->dtype) && lowp_mixable(b->dtype);
    if (lowp) {
        if (fl_check_cpu_data("add_", a) < 0 || fl_check_cpu_data("add_", b) < 0) return FL_ESTATE;
    } else if (fl_check_float("add_", a) < 0 || fl_check_float("add_", b) < 0 || fl_check_same_dtype("add_", a, b) < 0)
        return FL_EINVAL;
    int64_t n = fl_tensor_numel(a);
    if (!fl_same_shape(a, b) && fl_tensor_numel(b) != n)
        return fl_fail(FL_EINVAL, "add_: shapes %s and %s differ", fl_shape_str(a), fl_shape_str(b));
    if (!fl_tensor_is_contiguous(a)) return fl_fail(FL_EINVAL, "add_: destination %s is not contiguous", fl_shape_str(a));
    fl_tensor *bc = NULL;
    if (!fl_tensor_is_contiguous(b)) {   /* strided source: read it through one contiguous copy */
        if (!(bc = fl_tensor_empty(b->ndim, b->shape, b->dtype, FL_CPU))) return fl_fail(FL_ENOMEM, "add_: out of memory for a copy of %s", fl_shape_str(b));
        fl_copy_strided(b, fl_tensor_data(bc));
    }
    const void *pb = fl_tensor_data(bc ? bc : b);
    if (lowp) add_lowp(a, pb, b->dtype, n, alpha);
    else if (a->dtype == FL_F32) {
        float *x = fl_tensor_data(a), al = (float)alpha;
        const float *y = pb;
        if (alpha == 1.0) {
            #pragma omp parallel for schedule(static) if (n > FL_PAR_MIN)
            for (int64_t i = 0; i < n; i++) x[i] += y[i];
        } else {
            #pragma omp parallel for schedule(static) if (n > FL_PAR_MIN)
            for (int64_t i = 0; i < n; i++) x[i] += al * y[i];
        }
    } else {
        double *x = fl_tensor_data(a);
        const double *y = pb;
        #pragma omp parallel for schedule(static) if (n > FL_PAR_MIN)
        for (int64_t i = 0; i < n; i++) x[i] += alpha * y[i];
    }
    fl_tensor_release(bc);
    return FL_OK;
}

/* ---- unary ops ---- */

typedef enum { UN_SCALE, UN_ADDS, UN_POW, UN_NEG, UN_EXP, UN_LOG, UN_SQRT, UN_RSQRT, UN_TANH, UN_SIGMOID, UN_RELU } unop;

#define UN_APPLY(T, op, x, s)                                                                                       \
    ((op) == UN_SCALE ? (x) * (T)(s) : (op) == UN_ADDS ? (x) + (T)(s) : (op) == UN_POW ? pow_##T(x, (T)(s))        \
     : (op) == UN_NEG ? -(x) : (op) == UN_EXP ? exp_##T(x) : (op) == UN_LOG ? log_##T(x)                          \
     : (op) == UN_SQRT ? sqrt_##T(x) : (op) == UN_RSQRT ? (T)1 / sqrt_##T(x) : (op) == UN_TANH ? tanh_##T(x)        \
     : (op) == UN_SIGMOID ? (T)1 / ((T)1 + exp_##T(-(x))) : ((x) > 0 ? (x) : (T)0))

static inline float pow_float(float x, float p) { return powf(x, p); }
static inline double pow_double(double x, double p) { return pow(x, p); }
static inline float exp_float(float x) { return expf(x); }
static inline double exp_double(double x) { return exp(x); }
static inline float log_float(float x) { return logf(x); }
static inline double log_double(double x) { return log(x); }
static inline float sqrt_float(float x) { return sqrtf(x); }
static inline double sqrt_double(double x) { return sqrt(x); }
static inline float tanh_float(float x) { return tanhf(x); }
static inline double tanh_double(double x) { return tanh(x); }

#define DEFINE_UNARY_KERNEL(T)                                                                   \
    static void unary_##T(unop op, double s, const T *x, T *y, int64_t n) {                      \
        _Pragma("omp parallel for schedule(static) if (n > FL_PAR_MIN)")                         \
        for (int64_t i = 0; i < n; i++) y[i] = UN_APPLY(T, op, x[i], s);                         \
    }
DEFINE_UNARY_KERNEL(float)
DEFINE_UNARY_KERNEL(double)

static fl_tensor *unary_raw(const char *name, unop op, const fl_tensor *a, double s) {
    if (fl_check_float(name, a) < 0) return NULL;
    fl_tensor *x = fl_contiguous(a);
    if (!x) return NULL;
    fl_tensor *out = fl_tensor_empty(a->ndim, a->shape, a->dtype, FL_CPU);
    if (out) {
        if (a->dtype == FL_F32) unary_float(op, s, fl_tensor_data(x), fl_tensor_data(out), fl_tensor_numel(a));
        else unary_double(op, s, fl_tensor_data(x), fl_tensor_data(out), fl_tensor_numel(a));
    }
    fl_tensor_release(x);
    return out;
}

/* d out / d x as a tensor, from the saved input x (saved[0]) and/or output y (saved[1]). */
#define DEFINE_UNARY_GRAD(T)                                                                                      \
    static void unary_grad_##T(unop op, double s, const T *g, const T *x, const T *y, T *r, int64_t n) {          \
        _Pragma("omp parallel for schedule(static) if (n > FL_PAR_MIN)")                                          \
        for (int64_t i = 0; i < n; i++) {                                                                          \
            T d;                                                                                                   \
            switch (op) {                                                                                          \
            case UN_SCALE: d = (T)s; break;                                                                        \
            case UN_ADDS: d = 1; break;                                                                            \
            case UN_POW: d = (T)s * pow_##T(x[i], (T)(s - 1)); break;                                             \
            case UN_NEG: d = -1; break;                                                                            \
            case UN_EXP: d = y[i]; break;                                                                          \
            case UN_LOG: d = (T)1 / x[i]; break;                                                                   \
            case UN_SQRT: d = (T)0.5 / y[i]; break;                                                                \
            case UN_RSQRT: d = (T)-0.5 * y[i] * y[i] * y[i]; break;                                                \
            case UN_TANH: d = (T)1 - y[i] * y[i]; break;                                                           \
            case UN_SIGMOID: d = y[i] * ((T)1 - y[i]); break;                                                      \
            default: d = x[i] > 0 ? (T)1 : (T)0; break;                                                            \
            }                                                                                                      \
            r[i] = g[i] * d;                                                                                       \
        }                                                                                                          \
    }
DEFINE_UNARY_GRAD(float)
DEFINE_UNARY_GRAD(double)

static int unary_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0]) return FL_OK;
    unop op = (unop)n->i[0];
    fl_tensor *g = fl_contiguous(go[0]);
    fl_tensor *r = g ? fl_tensor_empty(g->ndim, g->shape, g->dtype, FL_CPU) : NULL;
    if (!r) { fl_tensor_release(g); return FL_ENOMEM; }
    const fl_tensor *x = n->saved[0], *y = n->n_saved > 1 ? n->saved[1] : NULL;
    const void *px = x ? fl_tensor_data(x) : NULL, *py = y ? fl_tensor_data(y) : NULL;
    if (g->dtype == FL_F32) unary_grad_float(op, n->f[0], fl_tensor_data(g), px, py, fl_tensor_data(r), fl_tensor_numel(g));
    else unary_grad_double(op, n->f[0], fl_tensor_data(g), px, py, fl_tensor_data(r), fl_tensor_numel(g));
    fl_tensor_release(g);
    gi[0] = r;
    return FL_OK;
}

static fl_tensor *unary(const char *name, unop op, const fl_tensor *a, double s) {
    fl_tensor *out = unary_raw(name, op, a, s);
    if (!out) return NULL;
    const fl_tensor *ins[1] = {a};
    fl_node *n = fl_record(name, unary_backward, 1, ins, out);
    if (n) {
        n->i[0] = op;
        n->f[0] = s;
        /* Keep only what the derivative reads: x for pow/log/relu, y for exp/sqrt/rsqrt/tanh/sigmoid. The
         * saved x must be contiguous: the kernel indexes it flat. */
        fl_tensor *xc = NULL;
        if (op == UN_POW || op == UN_LOG || op == UN_RELU) xc = fl_contiguous(a);
        if (xc) { fl_tensor *d = fl_detach(xc); fl_node_save(n, d); fl_tensor_release(d); fl_tensor_release(xc); }
        else n->saved[n->n_saved++] = NULL;
        if (op == UN_EXP || op == UN_SQRT || op == UN_RSQRT || op == UN_TANH || op == UN_SIGMOID) {
            fl_tensor *d = fl_detach(out);   /* detached: saving out itself would make a reference cycle */
            fl_node_save(n, d);
            fl_tensor_release(d);
        }
    }
    return out;
}

typedef struct { const char *name; unop op; double s; } unary_args;

static fl_tensor *unary_f32(const void *p, fl_tensor *const *ins, fl_tensor **aux) {
    const unary_args *a = p;
    return unary(a->name, a->op, ins[0], a->s);
}

static fl_tensor *unary_any(const char *name, unop op, const fl_tensor *a, double s) {
    if (a && fl_lowp_any(1, &a)) {
        unary_args args = {name, op, s};
        return fl_lowp_apply(name, unary_f32, &args, 1, &a, a->dtype, NULL);
    }
    return unary(name, op, a, s);
}

fl_tensor *fl_scale(const fl_tensor *a, double s) { return unary_any("scale", UN_SCALE, a, s); }

int fl_scale_(fl_tensor *a, double s) {
    /* bf16/f16 (the f32 op, rounded once) and strided views: through a scaled copy */
    if (a && (fl_lowp_any(1, (const fl_tensor *const *)&a) || !fl_tensor_is_contiguous(a))) {
        fl_tensor *r = fl_scale(a, s);
        int rc = r ? fl_tensor_copy_(a, r) : FL_EINVAL;
        fl_tensor_release(r);
        return rc;
    }
    if (fl_check_float("scale_", a) < 0) return FL_EINVAL;
    void *d = fl_tensor_data(a);
    if (a->dtype == FL_F32) unary_float(UN_SCALE, s, d, d, fl_tensor_numel(a));
    else unary_double(UN_SCALE, s, d, d, fl_tensor_numel(a));
    return FL_OK;
}
fl_tensor *fl_add_scalar(const fl_tensor *a, double s) { return unary_any("add_scalar", UN_ADDS, a, s); }
fl_tensor *fl_pow_scalar(const fl_tensor *a, double p) { return unary_any("pow", UN_POW, a, p); }
fl_tensor *fl_neg(const fl_tensor *a) { return unary_any("neg", UN_NEG, a, 0); }
fl_tensor *fl_exp(const fl_tensor *a) { return unary_any("exp", UN_EXP, a, 0); }
fl_tensor *fl_log(const fl_tensor *a) { return unary_any("log", UN_LOG, a, 0); }
fl_tensor *fl_sqrt(const fl_tensor *a) { return unary_any("sqrt", UN_SQRT, a, 0); }
fl_tensor *fl_rsqrt(const fl_tensor *a) { return unary_any("rsqrt", UN_RSQRT, a, 0); }
fl_tensor *fl_tanh(const fl_tensor *a) { return unary_any("tanh", UN_TANH, a, 0); }
fl_tensor *fl_sigmoid(const fl_tensor *a) { return unary_any("sigmoid", UN_SIGMOID, a, 0); }
fl_tensor *fl_relu(const fl_tensor *a) { return unary_any("relu", UN_RELU, a, 0); }
