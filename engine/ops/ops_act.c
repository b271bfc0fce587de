/* engine/ops/ops_act.c: activations (GELU erf/tanh, SiLU, fused SwiGLU) and dropout, with backward, f32/f64.
 * The scalar formulas live in kernels/fl_math.h (shared with CUDA); this file only loops and records.
 * bf16/f16 inputs run the f32 loops and round once (ops_shape.c); SwiGLU then rounds twice, as torch does. */
#include "internal.h"

#include "fl_math.h"

enum { ACT_GELU_ERF, ACT_GELU_TANH, ACT_SILU };

/* One loop per kind (the kind is not tested inside the loop): the f32 loops then vectorise. */
#define ACT_LOOP(T, F) \
    _Pragma("omp parallel for schedule(static) if (n > FL_PAR_MIN)") for (int64_t i = 0; i < n; i++) b[i] = F(a[i])
#define ACT_GRAD_LOOP(T, F) \
    _Pragma("omp parallel for schedule(static) if (n > FL_PAR_MIN)") for (int64_t i = 0; i < n; i++) r[i] = d[i] * F(a[i])

static void act_fwd(int32_t kind, int32_t dt, const void *x, void *y, int64_t n) {
    if (dt == FL_F32) {
        const float *a = x; float *b = y;
        if (kind == ACT_GELU_ERF) { ACT_LOOP(float, fl_gelu_erf_f); }
        else if (kind == ACT_GELU_TANH) { ACT_LOOP(float, fl_gelu_tanh_f); }
        else { ACT_LOOP(float, fl_silu_f); }
    } else {
        const double *a = x; double *b = y;
        if (kind == ACT_GELU_ERF) { ACT_LOOP(double, fl_gelu_erf_d); }
        else if (kind == ACT_GELU_TANH) { ACT_LOOP(double, fl_gelu_tanh_d); }
        else { ACT_LOOP(double, fl_silu_d); }
    }
}

/* dx = dy * act'(x), all contiguous. */
static void act_bwd(int32_t kind, int32_t dt, const void *x, const void *g, void *dx, int64_t n) {
    if (dt == FL_F32) {
        const float *a = x, *d = g; float *r = dx;
        if (kind == ACT_GELU_ERF) { ACT_GRAD_LOOP(float, fl_gelu_erf_grad_f); }
        else if (kind == ACT_GELU_TANH) { ACT_GRAD_LOOP(float, fl_gelu_tanh_grad_f); }
        else { ACT_GRAD_LOOP(float, fl_silu_grad_f); }
    } else {
        const double *a = x, *d = g; double *r = dx;
        if (kind == ACT_GELU_ERF) { ACT_GRAD_LOOP(double, fl_gelu_erf_grad_d); }
        else if (kind == ACT_GELU_TANH) { ACT_GRAD_LOOP(double, fl_gelu_tanh_grad_d); }
        else { ACT_GRAD_LOOP(double, fl_silu_grad_d); }
    }
}

static int act_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0] || !fl_node_needs(n, 0)) return FL_OK;
    const fl_tensor *x = n->saved[0];
    fl_tensor *g = fl_contiguous(go[0]);
    fl_tensor *dx = g ? fl_tensor_empty(x->ndim, x->shape, x->dtype, FL_CPU) : NULL;
    if (!dx) { fl_tensor_release(g); return FL_ENOMEM; }
    act_bwd((int32_t)n->i[0], x->dtype, fl_tensor_data(x), fl_tensor_data(g), fl_tensor_data(dx), fl_tensor_numel(x));
    fl_tensor_release(g);
    gi[0] = dx;
    return FL_OK;
}

static fl_tensor *activation(const char *name, int32_t kind, const fl_tensor *x) {
    if (fl_check_cpu_data(name, x) < 0 || fl_check_float(name, x) < 0) return NULL;
    fl_tensor *xc = fl_contiguous(x);
    fl_tensor *y = xc ? fl_tensor_empty(x->ndim, x->shape, x->dtype, FL_CPU) : NULL;
    if (!y) { fl_tensor_release(xc); return NULL; }
    act_fwd(kind, x->dtype, fl_tensor_data(xc), fl_tensor_data(y), fl_tensor_numel(x));
    const fl_tensor *ins[1] = {x};
    fl_node *n = fl_record(name, act_backward, 1, ins, y);
    if (n) {
        fl_tensor *d = fl_detach(xc);  /* the input, not the output: the derivatives read x */
        fl_node_save(n, d);
        fl_tensor_release(d);
        n->i[0] = kind;
    }
    fl_tensor_release(xc);
    return y;
}

typedef struct { const char *name; int32_t kind; } act_args;

static fl_tensor *activation_f32(const void *p, fl_tensor *const *ins, fl_tensor **aux) {
    const act_args *a = p;
    return activation(a->name, a->kind, ins[0]);
}

static fl_tensor *activation_any(const char *name, int32_t kind, const fl_tensor *x) {
    if (x && fl_lowp_any(1, &x)) {
        act_args args = {name, kind};
        return fl_lowp_apply(name, activation_f32, &args, 1, &x, x->dtype, NULL);
    }
    return activation(name, kind, x);
}

fl_tensor *fl_gelu(const fl_tensor *x, bool tanh_approx) {
    return activation_any(tanh_approx ? "gelu_tanh" : "gelu", tanh_approx ? ACT_GELU_TANH : ACT_GELU_ERF, x);
}
fl_tensor *fl_silu(const fl_tensor *x) { return activation_any("silu", ACT_SILU, x); }

/* ---- SwiGLU: y = silu(gate) * up; dgate = dy * up * silu'(gate), dup = dy * silu(gate) ---- */

static int swiglu_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0]) return FL_OK;
    const fl_tensor *gate = n->saved[0], *up = n->saved[1];
    fl_tensor *g = fl_contiguous(go[0]);
    if (!g) return FL_ENOMEM;
    int64_t cnt = fl_tensor_numel(gate);
    fl_tensor *dg = fl_node_needs(n, 0) ? fl_tensor_empty(gate->ndim, gate->shape, gate->dtype, FL_CPU) : NULL;
    fl_tensor *du = fl_node_needs(n, 1) ? fl_tensor_empty(gate->ndim, gate->shape, gate->dtype, FL_CPU) : NULL;
    if ((fl_node_needs(n, 0) && !dg) || (fl_node_needs(n, 1) && !du)) {
        fl_tensor_release(g); fl_tensor_release(dg); fl_tensor_release(du);
        return FL_ENOMEM;
    }
    if (gate->dtype == FL_F32) {
        const float *a = fl_tensor_data(gate), *b = fl_tensor_data(up), *d = fl_tensor_data(g);
        float *pg = dg ? fl_tensor_data(dg) : NULL, *pu = du ? fl_tensor_data(du) : NULL;
        if (pg) {
            #pragma omp parallel for schedule(static) if (cnt > FL_PAR_MIN)
            for (int64_t i = 0; i < cnt; i++) pg[i] = d[i] * b[i] * fl_silu_grad_f(a[i]);
        }
        if (pu) {
            #pragma omp parallel for schedule(static) if (cnt > FL_PAR_MIN)
            for (int64_t i = 0; i < cnt; i++) pu[i] = d[i] * fl_silu_f(a[i]);
        }
    } else {
        const double *a = fl_tensor_data(gate), *b = fl_tensor_data(up), *d = fl_tensor_data(g);
        double *pg = dg ? fl_tensor_data(dg) : NULL, *pu = du ? fl_tensor_data(du) : NULL;
        if (pg) {
            #pragma omp parallel for schedule(static) if (cnt > FL_PAR_MIN)
            for (int64_t i = 0; i < cnt; i++) pg[i] = d[i] * b[i] * fl_silu_grad_d(a[i]);
        }
        if (pu) {
            #pragma omp parallel for schedule(static) if (cnt > FL_PAR_MIN)
            for (int64_t i = 0; i < cnt; i++) pu[i] = d[i] * fl_silu_d(a[i]);
        }
    }
    fl_tensor_release(g);
    gi[0] = dg;
    gi[1] = du;
    return FL_OK;
}

/* bf16/f16: Hugging Face's act_fn(gate) * up is two torch ops, each rounded to the input dtype; run them as
 * such (silu, then mul with torch's promotion), so forward and backward round exactly where torch does. */
static fl_tensor *swiglu_lowp(const fl_tensor *gate, const fl_tensor *up) {
    if (fl_check_cpu_data("swiglu", gate) < 0 || fl_check_cpu_data("swiglu", up) < 0) return NULL;
    if (!fl_same_shape(gate, up))
        return fl_fail_null(FL_EINVAL, "swiglu: gate %s and up %s must have the same shape", fl_shape_str(gate), fl_shape_str(up));
    fl_tensor *s = fl_silu(gate);
    if (!s) return NULL;
    fl_tensor *y = fl_mul(s, up);
    fl_tensor_release(s);
    return y;
}

fl_tensor *fl_swiglu(const fl_tensor *gate, const fl_tensor *up) {
    const fl_tensor *gu[2] = {gate, up};
    if (gate && up && fl_lowp_any(2, gu)) return swiglu_lowp(gate, up);
    if (fl_check_cpu_data("swiglu", gate) < 0 || fl_check_cpu_data("swiglu", up) < 0 || fl_check_float("swiglu", gate) < 0 ||
        fl_check_same_dtype("swiglu", gate, up) < 0)
        return NULL;
    if (!fl_same_shape(gate, up))
        return fl_fail_null(FL_EINVAL, "swiglu: gate %s and up %s must have the same shape", fl_shape_str(gate), fl_shape_str(up));
    fl_tensor *gc = fl_contiguous(gate), *uc = fl_contiguous(up), *y = NULL;
    if (!gc || !uc) goto done;
    y = fl_tensor_empty(gate->ndim, gate->shape, gate->dtype, FL_CPU);
    if (!y) goto done;
    int64_t cnt = fl_tensor_numel(gate);
    if (gate->dtype == FL_F32) {
        const float *a = fl_tensor_data(gc), *b = fl_tensor_data(uc); float *o = fl_tensor_data(y);
        #pragma omp parallel for schedule(static) if (cnt > FL_PAR_MIN)
        for (int64_t i = 0; i < cnt; i++) o[i] = fl_silu_f(a[i]) * b[i];   /* HF: act_fn(gate_proj(x)) * up_proj(x) */
    } else {
        const double *a = fl_tensor_data(gc), *b = fl_tensor_data(uc); double *o = fl_tensor_data(y);
        #pragma omp parallel for schedule(static) if (cnt > FL_PAR_MIN)
        for (int64_t i = 0; i < cnt; i++) o[i] = fl_silu_d(a[i]) * b[i];
    }
    const fl_tensor *ins[2] = {gate, up};
    fl_node *n = fl_record("swiglu", swiglu_backward, 2, ins, y);
    if (n) {
        fl_tensor *a = fl_detach(gc), *b = fl_detach(uc);
        fl_node_save(n, a);
        fl_node_save(n, b);
        fl_tensor_release(a);
        fl_tensor_release(b);
    }
done:
    fl_tensor_release(gc);
    fl_tensor_release(uc);
    return y;
}

/* ---- dropout: the mask is recomputed from (seed, key, i) in backward, never stored ---- */

/* The stream mixes the key into a fixed "dropout" hash, so layers/steps with different keys draw
 * independent masks and no stream collides with a named parameter initialisation. */
static uint64_t dropout_stream(uint64_t key) { return fl_rng_hash_name("dropout") ^ (key * 0x9E3779B97F4A7C15ull); }

static void dropout_apply(int32_t dt, const void *x, void *y, int64_t cnt, double p, uint64_t seed, uint64_t key) {
    uint64_t stream = dropout_stream(key);
    double scale = 1.0 / (1.0 - p);
    if (dt == FL_F32) {
        const float *a = x; float *b = y; float s = (float)scale;
        #pragma omp parallel for schedule(static) if (cnt > 4096)
        for (int64_t i = 0; i < cnt; i++) b[i] = fl_rng_uniform_at(seed, stream, (uint64_t)i) >= p ? a[i] * s : 0.0f;
    } else {
        const double *a = x; double *b = y;
        #pragma omp parallel for schedule(static) if (cnt > 4096)
        for (int64_t i = 0; i < cnt; i++) b[i] = fl_rng_uniform_at(seed, stream, (uint64_t)i) >= p ? a[i] * scale : 0.0;
    }
}

static int dropout_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0] || !fl_node_needs(n, 0)) return FL_OK;
    fl_tensor *g = fl_contiguous(go[0]);
    fl_tensor *dx = g ? fl_tensor_empty(g->ndim, g->shape, g->dtype, FL_CPU) : NULL;
    if (!dx) { fl_tensor_release(g); return FL_ENOMEM; }
    dropout_apply(g->dtype, fl_tensor_data(g), fl_tensor_data(dx), fl_tensor_numel(g), n->f[0], (uint64_t)n->i[0], (uint64_t)n->i[1]);
    fl_tensor_release(g);
    gi[0] = dx;
    return FL_OK;
}

typedef struct { double p; uint64_t seed, key; } dropout_args;

static fl_tensor *dropout_f32(const void *a, fl_tensor *const *ins, fl_tensor **aux) {
    const dropout_args *d = a;
    return fl_dropout(ins[0], d->p, d->seed, d->key);
}

fl_tensor *fl_dropout(const fl_tensor *x, double p, uint64_t seed, uint64_t key) {
    bool lowp = x && fl_lowp_any(1, &x);
    if (fl_check_cpu_data("dropout", x) < 0 || (!lowp && fl_check_float("dropout", x) < 0)) return NULL;
    if (!(p >= 0.0 && p <= 1.0)) return fl_fail_null(FL_EINVAL, "dropout: p must be in [0, 1], got %g (input %s)", p, fl_shape_str(x));
    if (p == 0.0) { fl_tensor_retain((fl_tensor *)x); return (fl_tensor *)x; }  /* identity, as torch: no copy */
    if (lowp) {   /* the same mask; kept values x * (1/(1-p)) in f32, rounded once */
        dropout_args args = {p, seed, key};
        return fl_lowp_apply("dropout", dropout_f32, &args, 1, &x, x->dtype, NULL);
    }
    fl_tensor *xc = fl_contiguous(x);
    fl_tensor *y = xc ? (p == 1.0 ? fl_tensor_zeros(x->ndim, x->shape, x->dtype, FL_CPU) : fl_tensor_empty(x->ndim, x->shape, x->dtype, FL_CPU)) : NULL;
    if (!y) { fl_tensor_release(xc); return NULL; }
    if (p < 1.0) dropout_apply(x->dtype, fl_tensor_data(xc), fl_tensor_data(y), fl_tensor_numel(x), p, seed, key);
    fl_tensor_release(xc);
    const fl_tensor *ins[1] = {x};
    fl_node *n = fl_record("dropout", dropout_backward, 1, ins, y);
    if (n) {
        n->f[0] = p;
        n->i[0] = (int64_t)seed;
        n->i[1] = (int64_t)key;
    }
    return y;
}
