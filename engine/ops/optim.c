/* engine/ops/optim.c: fused AdamW and SGD steps over one (local shard of a) parameter, reproducing the f32
 * operations of torch.optim's single-tensor path (foreach=False) bit for bit. State allocation, param groups,
 * schedules and clipping are the Lua front end's (lua/fsdp/optim.lua).
 *
 * How torch's CPU kernels round. Each in-place op of _single_tensor_adamw is a TensorIterator loop that runs
 * whole chunks of 2 x 8 floats with AVX2 vectors and the remaining n % 16 elements with the scalar lambda
 * (aten/src/ATen/native/cpu/Loops.h, vectorized_loop). The two differ where a multiply feeds an add:
 *   - lerp and add(alpha) vectors use vec::fmadd (one rounding); their scalar lambdas, compiled with
 *     -mfma and GCC's default -ffp-contract=fast, contract to the same fma;
 *   - addcmul's vector is `self + value * t1 * t2` with separate mul and add (two roundings), while its
 *     scalar lambda contracts the final multiply-add into an fma.
 * So element i of an f32 tensor of n elements follows the vector rounding when i < n - n % 16 and the scalar
 * one after that, as torch with one intra-op thread does (the fixtures' setting; with several threads torch
 * splits only tensors above 32768 elements, into chunks whose tails move). This is read from torch's kernels
 * and GCC's defaults; the 12-element op fixture runs only the scalar path, where every variant agrees, so a
 * build of torch without contraction would differ by at most 1 ulp of exp_avg_sq on the last n % 16
 * elements. f64 parameters (tests) use the vector rounding everywhere. Scalars (bias corrections, step size, 1 - lr*wd) are computed in double
 * on the host, as Python does, and rounded once to the parameter's dtype, as the kernels do. */
#include "internal.h"

#include <math.h>
#include <omp.h>

enum { TORCH_VEC_CHUNK_F32 = 16 };  /* 2 * Vectorized<float>::size() on AVX2 */

static int check_operand(const char *op, const char *what, const fl_tensor *p, const fl_tensor *t) {
    if (!t) return fl_fail(FL_EINVAL, "%s: missing %s for parameter %s", op, what, fl_shape_str(p));
    if (fl_check_cpu_data(op, t) < 0) {
        fl_error_prefix(what);
        return FL_ESTATE;
    }
    if (t->dtype != p->dtype)
        return fl_fail(FL_EINVAL, "%s: %s is %s %s but the parameter is %s %s", op, what, fl_dtype_name(t->dtype),
                       fl_shape_str(t), fl_dtype_name(p->dtype), fl_shape_str(p));
    if (fl_tensor_numel(t) != fl_tensor_numel(p))
        return fl_fail(FL_EINVAL, "%s: %s %s has %" PRId64 " elements, the parameter %s has %" PRId64, op, what,
                       fl_shape_str(t), fl_tensor_numel(t), fl_shape_str(p), fl_tensor_numel(p));
    if (!fl_tensor_is_contiguous(t))
        return fl_fail(FL_EINVAL, "%s: %s %s is not contiguous", op, what, fl_shape_str(t));
    return FL_OK;
}

static int check_param(const char *op, const fl_tensor *p) {
    if (!p) return fl_fail(FL_EINVAL, "%s: missing parameter", op);
    if (fl_check_cpu_data(op, p) < 0) return FL_ESTATE;
    if (p->dtype != FL_F32 && p->dtype != FL_F64)
        return fl_fail(FL_EINVAL, "%s: parameter %s is %s; optimizer steps need f32 (or f64) parameters", op,
                       fl_shape_str(p), fl_dtype_name(p->dtype));
    if (!fl_tensor_is_contiguous(p))
        return fl_fail(FL_EINVAL, "%s: parameter %s is not contiguous", op, fl_shape_str(p));
    return FL_OK;
}

/* a * b + c with one rounding (fused) or two. The file is compiled as ISO C11, so GCC does not contract
 * the unfused form on its own. */
static inline float madd_f(float a, float b, float c, bool fused) { return fused ? fmaf(a, b, c) : a * b + c; }

/* ---- AdamW ---- */

typedef struct {
    double decay, w1, b2, omb2, bc2_sqrt, eps, neg_step_size;
    bool decay_on, small_w1;
} adam_scalars;

/* exp_avg.lerp_(grad, w1) in torch's form: vec::fmadd(coeff, end - start, base). */
#define ADAM_LERP(T, FMA, m, g, w1, small) \
    ((small) ? FMA((w1), (g) - (m), (m)) : FMA((w1) - (T)1, (g) - (m), (g)))

/* Elements [lo, hi) of one AdamW step, every branch decided outside the loop so that GCC vectorises it (the
 * per-element operations, and so the bits, are the same at any vector width). fused: torch's scalar-lambda
 * rounding (addcmul contracted to an fma); small: which of lerp's two forms. A weight decay of 0 multiplies by
 * 1, which is exact. */
static inline __attribute__((always_inline)) void adamw_f32_range(float *restrict p, const float *restrict g,
        float *restrict m, float *restrict v, int64_t lo, int64_t hi, bool fused, bool small, float decay, float w1,
        float b2, float omb2, float bc2s, float eps, float nss) {
    for (int64_t i = lo; i < hi; i++) {
        float gi = g[i];
        float pi = p[i] * decay;                                         /* param.mul_(1 - lr * wd) */
        float mi = ADAM_LERP(float, fmaf, m[i], gi, w1, small);          /* exp_avg.lerp_(grad, 1 - beta1) */
        float vi = madd_f(omb2 * gi, gi, v[i] * b2, fused);              /* exp_avg_sq.mul_(beta2).addcmul_(g, g, 1-beta2) */
        float denom = sqrtf(vi) / bc2s + eps;                            /* (sqrt(v) / bc2_sqrt).add_(eps) */
        p[i] = pi + nss * mi / denom;                                    /* param.addcdiv_(m, denom, -step_size) */
        m[i] = mi;
        v[i] = vi;
    }
}

/* vec_end: local elements below it take torch's vector rounding (computed from the position in the whole
 * parameter, so a shard rounds each element exactly as the unsharded tensor would). */
static void adamw_f32(float *p, const float *g, float *m, float *v, int64_t n, int64_t vec_end, const adam_scalars *s) {
    const float decay = s->decay_on ? (float)s->decay : 1.0f, w1 = (float)s->w1, b2 = (float)s->b2;
    const float omb2 = (float)s->omb2, bc2s = (float)s->bc2_sqrt, eps = (float)s->eps, nss = (float)s->neg_step_size;
    int64_t split = vec_end < 0 ? 0 : vec_end > n ? n : vec_end;
    #pragma omp parallel if (n > FL_PAR_MIN)
    {
        /* the same static split as `omp for` would make; the tail beyond `split` is < 16 elements */
        int nt = omp_get_num_threads(), t = omp_get_thread_num();
        int64_t lo = split * t / nt, hi = split * (t + 1) / nt;
        if (s->small_w1) adamw_f32_range(p, g, m, v, lo, hi, false, true, decay, w1, b2, omb2, bc2s, eps, nss);
        else adamw_f32_range(p, g, m, v, lo, hi, false, false, decay, w1, b2, omb2, bc2s, eps, nss);
        if (t == nt - 1)
            adamw_f32_range(p, g, m, v, split, n, true, s->small_w1, decay, w1, b2, omb2, bc2s, eps, nss);
    }
}

static void adamw_f64(double *p, const double *g, double *m, double *v, int64_t n, const adam_scalars *s) {
    #pragma omp parallel for schedule(static) if (n > FL_PAR_MIN)
    for (int64_t i = 0; i < n; i++) {
        double pi = p[i], gi = g[i];
        if (s->decay_on) pi = pi * s->decay;
        double mi = ADAM_LERP(double, fma, m[i], gi, s->w1, s->small_w1);
        double vi = v[i] * s->b2;
        vi = vi + s->omb2 * gi * gi;
        double denom = sqrt(vi) / s->bc2_sqrt + s->eps;
        pi = pi + s->neg_step_size * mi / denom;
        p[i] = pi; m[i] = mi; v[i] = vi;
    }
}

int fl_adamw_step(fl_tensor *p, const fl_tensor *g, fl_tensor *m, fl_tensor *v, int64_t step, double lr,
                  double beta1, double beta2, double eps, double weight_decay, int64_t full_offset,
                  int64_t full_numel) {
    const char *op = "adamw_step";
    if (check_param(op, p) < 0 || check_operand(op, "grad", p, g) < 0 || check_operand(op, "exp_avg", p, m) < 0 ||
        check_operand(op, "exp_avg_sq", p, v) < 0)
        return FL_EINVAL;
    if (step < 1) return fl_fail(FL_EINVAL, "%s: step is %" PRId64 " for parameter %s; steps count from 1", op, step, fl_shape_str(p));
    if (!(beta1 >= 0 && beta1 < 1) || !(beta2 >= 0 && beta2 < 1))
        return fl_fail(FL_EINVAL, "%s: betas (%g, %g) must be in [0, 1)", op, beta1, beta2);
    if (!(lr >= 0) || !(eps >= 0) || !(weight_decay >= 0))
        return fl_fail(FL_EINVAL, "%s: lr %g, eps %g and weight_decay %g must be >= 0", op, lr, eps, weight_decay);
    /* _single_tensor_adam: Python floats (double) for every scalar; step is step_t.item() */
    double bc1 = 1 - pow(beta1, (double)step), bc2 = 1 - pow(beta2, (double)step);
    adam_scalars s = {
        .decay = 1 - lr * weight_decay, .decay_on = weight_decay != 0,
        .w1 = 1 - beta1, .b2 = beta2, .omb2 = 1 - beta2,
        .bc2_sqrt = pow(bc2, 0.5), .eps = eps, .neg_step_size = -(lr / bc1),
    };
    /* is_lerp_weight_small compares the weight in the tensor's dtype */
    s.small_w1 = p->dtype == FL_F32 ? fabsf((float)s.w1) < 0.5f : fabs(s.w1) < 0.5;
    int64_t n = fl_tensor_numel(p);
    if (full_numel == 0) full_numel = n;
    if (full_offset < 0 || full_numel < 0 || full_offset > full_numel - n)
        return fl_fail(FL_EINVAL, "%s: parameter %s (%" PRId64 " elements) at offset %" PRId64
                       " does not fit in a whole parameter of %" PRId64 " elements", op, fl_shape_str(p), n,
                       full_offset, full_numel);
    if (p->dtype == FL_F32)
        adamw_f32(fl_tensor_data(p), fl_tensor_data(g), fl_tensor_data(m), fl_tensor_data(v), n,
                  full_numel - full_numel % TORCH_VEC_CHUNK_F32 - full_offset, &s);
    else
        adamw_f64(fl_tensor_data(p), fl_tensor_data(g), fl_tensor_data(m), fl_tensor_data(v), n, &s);
    return FL_OK;
}

/* ---- SGD ---- */

typedef struct {
    double lr, momentum, dampening, weight_decay;
    bool nesterov, first;
} sgd_scalars;

/* _single_tensor_sgd. Every `x.add(y, alpha=a)` is fmadd(y, a, x) in torch's vector loop and in its
 * contracted scalar lambda, so all elements round the same way. */
#define SGD_BODY(T, FMA)                                                                               \
    do {                                                                                               \
        const T wd = (T)s->weight_decay, mom = (T)s->momentum, omd = (T)(1 - s->dampening);           \
        const T neg_lr = (T)(-s->lr);                                                                  \
        const bool use_wd = s->weight_decay != 0, use_mom = s->momentum != 0;                          \
        _Pragma("omp parallel for schedule(static) if (n > FL_PAR_MIN)")                               \
        for (int64_t i = 0; i < n; i++) {                                                              \
            T gi = g[i];                                                                               \
            if (use_wd) gi = FMA(p[i], wd, gi);                     /* grad.add(param, alpha=wd) */    \
            if (use_mom) {                                                                             \
                T bi = s->first ? gi : FMA(gi, omd, buf[i] * mom); /* buf.mul_(m).add_(g, 1-damp) */  \
                buf[i] = bi;                                                                           \
                gi = s->nesterov ? FMA(bi, mom, gi) : bi;           /* grad.add(buf, alpha=m) */       \
            }                                                                                          \
            p[i] = FMA(gi, neg_lr, p[i]);                           /* param.add_(grad, alpha=-lr) */  \
        }                                                                                              \
    } while (0)

static void sgd_f32(float *p, const float *g, float *buf, int64_t n, const sgd_scalars *s) { SGD_BODY(float, fmaf); }
static void sgd_f64(double *p, const double *g, double *buf, int64_t n, const sgd_scalars *s) { SGD_BODY(double, fma); }

int fl_sgd_step(fl_tensor *p, const fl_tensor *g, fl_tensor *buf, int64_t step, double lr, double momentum,
                double dampening, double weight_decay, bool nesterov) {
    const char *op = "sgd_step";
    if (check_param(op, p) < 0 || check_operand(op, "grad", p, g) < 0) return FL_EINVAL;
    if (step < 1) return fl_fail(FL_EINVAL, "%s: step is %" PRId64 " for parameter %s; steps count from 1", op, step, fl_shape_str(p));
    if (!(lr >= 0) || !(momentum >= 0) || !(weight_decay >= 0))
        return fl_fail(FL_EINVAL, "%s: lr %g, momentum %g and weight_decay %g must be >= 0", op, lr, momentum, weight_decay);
    if (nesterov && (momentum <= 0 || dampening != 0))
        return fl_fail(FL_EINVAL, "%s: nesterov needs momentum > 0 and dampening 0 (got momentum %g, dampening %g)", op,
                       momentum, dampening);
    if (momentum != 0 && check_operand(op, "momentum_buffer", p, buf) < 0) return FL_EINVAL;
    sgd_scalars s = {.lr = lr, .momentum = momentum, .dampening = dampening, .weight_decay = weight_decay,
                     .nesterov = nesterov, .first = step == 1};
    int64_t n = fl_tensor_numel(p);
    if (p->dtype == FL_F32)
        sgd_f32(fl_tensor_data(p), fl_tensor_data(g), momentum != 0 ? fl_tensor_data(buf) : NULL, n, &s);
    else
        sgd_f64(fl_tensor_data(p), fl_tensor_data(g), momentum != 0 ? fl_tensor_data(buf) : NULL, n, &s);
    return FL_OK;
}
