/* engine/ops/ops_norm.c: LayerNorm and RMSNorm over the last dim, with backward (f32/f64). Row statistics are
 * accumulated in f64 and saved for backward (one mean/rstd per row); weight/bias gradients are summed over
 * fixed row blocks combined in order, so any thread count gives the same bits. bf16/f16: LayerNorm runs the
 * f32 code and rounds once (ops_shape.c); RMSNorm follows Hugging Face's two steps (below). */
#include "internal.h"

#include <math.h>

#include "fl_math.h"

enum { NORM_ROW_BLOCK = 64 };  /* rows per partial sum of dw/db: fixed, never from the thread count */

/* Sums partial[nb][C] (f64) over blocks in order into out (dtype dt). */
static void sum_blocks(const double *part, int64_t nb, int64_t c, int32_t dt, void *out) {
    #pragma omp parallel for schedule(static) if (nb * c > FL_PAR_MIN)
    for (int64_t j = 0; j < c; j++) {
        double s = 0;
        for (int64_t b = 0; b < nb; b++) s += part[b * c + j];
        if (dt == FL_F32) ((float *)out)[j] = (float)s;
        else ((double *)out)[j] = s;
    }
}

static double ld(const void *p, int32_t dt, int64_t i) { return dt == FL_F32 ? (double)((const float *)p)[i] : ((const double *)p)[i]; }

/* ---- LayerNorm: y = (x - mean) * rstd * w + b; stats [R, 2] f64 = (mean, rstd) ---- */

static int layer_norm_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0]) return FL_OK;
    const fl_tensor *x = n->saved[0], *w = n->saved[1], *st = n->saved[2];
    int32_t dt = x->dtype;
    int64_t c = x->shape[x->ndim - 1], r = c ? fl_tensor_numel(x) / c : 0, nb = (r + NORM_ROW_BLOCK - 1) / NORM_ROW_BLOCK;
    bool need_dx = fl_node_needs(n, 0), need_dw = n->n_in > 1 && fl_node_needs(n, 1), need_db = n->n_in > 2 && fl_node_needs(n, 2);
    fl_tensor *g = fl_contiguous(go[0]), *dx = NULL;
    double *part = NULL;
    int rc = FL_ENOMEM;
    if (!g) goto done;
    if (need_dx && !(dx = fl_tensor_empty(x->ndim, x->shape, dt, FL_CPU))) goto done;
    if ((need_dw || need_db) && !(part = calloc((size_t)(nb * c * 2 + 1), sizeof(double)))) {
        rc = fl_fail(FL_ENOMEM, "layer_norm backward: out of memory for %" PRId64 " partial sums", nb * c * 2);
        goto done;
    }
    const void *px = fl_tensor_data(x), *pg = fl_tensor_data(g), *pw = w ? fl_tensor_data(w) : NULL;
    const double *s = fl_tensor_data(st);
    void *pdx = dx ? fl_tensor_data(dx) : NULL;
    #pragma omp parallel for schedule(static) if (r * c > FL_PAR_MIN / 4)
    for (int64_t b = 0; b < nb; b++) {
        double *pw_part = part ? part + b * c : NULL, *pb_part = part ? part + (nb + b) * c : NULL;
        for (int64_t i = b * NORM_ROW_BLOCK; i < fl_min64(r, (b + 1) * NORM_ROW_BLOCK); i++) {
            double mean = s[2 * i], rstd = s[2 * i + 1], mg = 0, mgx = 0;
            for (int64_t j = 0; j < c; j++) {
                double xh = (ld(px, dt, i * c + j) - mean) * rstd, dy = ld(pg, dt, i * c + j);
                double gg = dy * (pw ? ld(pw, dt, j) : 1.0);
                mg += gg;
                mgx += gg * xh;
                if (pw_part) { pw_part[j] += dy * xh; pb_part[j] += dy; }
            }
            mg /= (double)c;
            mgx /= (double)c;
            if (pdx)
                for (int64_t j = 0; j < c; j++) {
                    double xh = (ld(px, dt, i * c + j) - mean) * rstd, gg = ld(pg, dt, i * c + j) * (pw ? ld(pw, dt, j) : 1.0);
                    double v = fl_norm_dx(gg, xh, rstd, mg, mgx);
                    if (dt == FL_F32) ((float *)pdx)[i * c + j] = (float)v;
                    else ((double *)pdx)[i * c + j] = v;
                }
        }
    }
    if (need_dw) {
        if (!(gi[1] = fl_tensor_empty(1, &c, dt, FL_CPU))) goto done;
        sum_blocks(part, nb, c, dt, fl_tensor_data(gi[1]));
    }
    if (need_db) {
        if (!(gi[2] = fl_tensor_empty(1, &c, dt, FL_CPU))) goto done;
        sum_blocks(part + nb * c, nb, c, dt, fl_tensor_data(gi[2]));
    }
    gi[0] = dx;
    dx = NULL;
    rc = FL_OK;
done:
    fl_tensor_release(g);
    fl_tensor_release(dx);
    free(part);
    return rc;
}

static int check_param(const char *op, const char *what, const fl_tensor *p, const fl_tensor *x, int64_t c) {
    if (!p) return FL_OK;
    if (fl_check_cpu_data(op, p) < 0 || fl_check_same_dtype(op, x, p) < 0) return FL_EINVAL;
    if (p->ndim != 1 || p->shape[0] != c)
        return fl_fail(FL_EINVAL, "%s: %s has shape %s, input %s has last dim %" PRId64, op, what, fl_shape_str(p), fl_shape_str(x), c);
    return FL_OK;
}

static fl_tensor *layer_norm_f32(const void *p, fl_tensor *const *ins, fl_tensor **aux) {
    return fl_layer_norm(ins[0], ins[1], ins[2], *(const double *)p);
}

fl_tensor *fl_layer_norm(const fl_tensor *x, const fl_tensor *w, const fl_tensor *b, double eps) {
    const fl_tensor *xwb[3] = {x, w, b};
    if (x && fl_lowp_any(3, xwb))   /* the output keeps x's dtype (torch's mixed bf16 input / f32 parameters) */
        return fl_lowp_apply("layer_norm", layer_norm_f32, &eps, 3, xwb, x->dtype, NULL);
    if (fl_check_cpu_data("layer_norm", x) < 0 || fl_check_float("layer_norm", x) < 0) return NULL;
    if (x->ndim < 1) return fl_fail_null(FL_EINVAL, "layer_norm: input must have at least 1 dim, got %s", fl_shape_str(x));
    int64_t c = x->shape[x->ndim - 1];
    if (check_param("layer_norm", "weight", w, x, c) < 0 || check_param("layer_norm", "bias", b, x, c) < 0) return NULL;
    int64_t r = c ? fl_tensor_numel(x) / c : 0;
    int64_t sshape[2] = {r, 2};
    fl_tensor *xc = fl_contiguous(x), *wc = w ? fl_contiguous(w) : NULL, *bc = b ? fl_contiguous(b) : NULL;
    fl_tensor *y = NULL, *st = NULL;
    if (!xc || (w && !wc) || (b && !bc)) goto done;
    y = fl_tensor_empty(x->ndim, x->shape, x->dtype, FL_CPU);
    st = fl_tensor_empty(2, sshape, FL_F64, FL_CPU);
    if (!y || !st) { fl_tensor_release(y); y = NULL; goto done; }
    int32_t dt = x->dtype;
    const void *px = fl_tensor_data(xc), *pw = wc ? fl_tensor_data(wc) : NULL, *pb = bc ? fl_tensor_data(bc) : NULL;
    void *py = fl_tensor_data(y);
    double *s = fl_tensor_data(st);
    #pragma omp parallel for schedule(static) if (r * c > FL_PAR_MIN)
    for (int64_t i = 0; i < r; i++) {
        double mean = 0, var = 0;
        for (int64_t j = 0; j < c; j++) mean += ld(px, dt, i * c + j);
        mean /= (double)c;
        for (int64_t j = 0; j < c; j++) { double d = ld(px, dt, i * c + j) - mean; var += d * d; }
        var /= (double)c;   /* biased, as torch */
        double rstd = 1.0 / sqrt(var + eps);
        s[2 * i] = mean;
        s[2 * i + 1] = rstd;
        for (int64_t j = 0; j < c; j++) {
            double v = (ld(px, dt, i * c + j) - mean) * rstd;
            if (pw) v *= ld(pw, dt, j);
            if (pb) v += ld(pb, dt, j);
            if (dt == FL_F32) ((float *)py)[i * c + j] = (float)v;
            else ((double *)py)[i * c + j] = v;
        }
    }
    const fl_tensor *ins[3] = {x, w, b};
    fl_node *n = fl_record("layer_norm", layer_norm_backward, 3, ins, y);
    if (n) {
        fl_tensor *xd = fl_detach(xc), *wd = wc ? fl_detach(wc) : NULL;
        fl_node_save(n, xd);
        if (wd) fl_node_save(n, wd); else n->saved[n->n_saved++] = NULL;
        fl_node_save(n, st);
        fl_tensor_release(xd);
        fl_tensor_release(wd);
    }
done:
    fl_tensor_release(xc);
    fl_tensor_release(wc);
    fl_tensor_release(bc);
    fl_tensor_release(st);
    return y;
}

/* ---- RMSNorm as Hugging Face: xn = x * rsqrt(mean(x^2) + eps) in the input dtype's math (f32 for f32),
 * then y = w * xn. rstd [R] f64 saved. ---- */

static int rms_norm_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0]) return FL_OK;
    const fl_tensor *x = n->saved[0], *w = n->saved[1], *st = n->saved[2];
    int32_t dt = x->dtype;
    int64_t c = x->shape[x->ndim - 1], r = c ? fl_tensor_numel(x) / c : 0, nb = (r + NORM_ROW_BLOCK - 1) / NORM_ROW_BLOCK;
    bool need_dx = fl_node_needs(n, 0), need_dw = n->n_in > 1 && fl_node_needs(n, 1);
    fl_tensor *g = fl_contiguous(go[0]), *dx = NULL;
    double *part = NULL;
    int rc = FL_ENOMEM;
    if (!g) goto done;
    if (need_dx && !(dx = fl_tensor_empty(x->ndim, x->shape, dt, FL_CPU))) goto done;
    if (need_dw && !(part = calloc((size_t)(nb * c + 1), sizeof(double)))) {
        rc = fl_fail(FL_ENOMEM, "rms_norm backward: out of memory for %" PRId64 " partial sums", nb * c);
        goto done;
    }
    const void *px = fl_tensor_data(x), *pg = fl_tensor_data(g), *pw = w ? fl_tensor_data(w) : NULL;
    const double *s = fl_tensor_data(st);
    void *pdx = dx ? fl_tensor_data(dx) : NULL;
    #pragma omp parallel for schedule(static) if (r * c > FL_PAR_MIN / 4)
    for (int64_t b = 0; b < nb; b++) {
        double *pw_part = part ? part + b * c : NULL;
        for (int64_t i = b * NORM_ROW_BLOCK; i < fl_min64(r, (b + 1) * NORM_ROW_BLOCK); i++) {
            double rstd = s[i], mgx = 0;
            for (int64_t j = 0; j < c; j++) {
                double xh = ld(px, dt, i * c + j) * rstd, dy = ld(pg, dt, i * c + j);
                mgx += dy * (pw ? ld(pw, dt, j) : 1.0) * xh;
                if (pw_part) pw_part[j] += dy * xh;
            }
            mgx /= (double)c;
            if (pdx)
                for (int64_t j = 0; j < c; j++) {
                    double xh = ld(px, dt, i * c + j) * rstd, gg = ld(pg, dt, i * c + j) * (pw ? ld(pw, dt, j) : 1.0);
                    double v = fl_norm_dx(gg, xh, rstd, 0.0, mgx);
                    if (dt == FL_F32) ((float *)pdx)[i * c + j] = (float)v;
                    else ((double *)pdx)[i * c + j] = v;
                }
        }
    }
    if (need_dw) {
        if (!(gi[1] = fl_tensor_empty(1, &c, dt, FL_CPU))) goto done;
        sum_blocks(part, nb, c, dt, fl_tensor_data(gi[1]));
    }
    gi[0] = dx;
    dx = NULL;
    rc = FL_OK;
done:
    fl_tensor_release(g);
    fl_tensor_release(dx);
    free(part);
    return rc;
}

static fl_tensor *rms_norm_f32(const void *p, fl_tensor *const *ins, fl_tensor **aux) {
    return fl_rms_norm(ins[0], NULL, *(const double *)p);
}

/* bf16/f16 as Hugging Face's LlamaRMSNorm: xn = x * rsqrt(mean(x^2) + eps) in f32, rounded to x's dtype, then
 * weight * xn as its own op (rounded again; an f32 weight times bf16 xn gives f32). Two roundings, as torch. */
static fl_tensor *rms_norm_lowp(const fl_tensor *x, const fl_tensor *w, double eps) {
    if (fl_check_cpu_data("rms_norm", x) < 0 || (w && fl_check_cpu_data("rms_norm", w) < 0)) return NULL;
    if (x->ndim < 1) return fl_fail_null(FL_EINVAL, "rms_norm: input must have at least 1 dim, got %s", fl_shape_str(x));
    int64_t c = x->shape[x->ndim - 1];
    if (w && (w->ndim != 1 || w->shape[0] != c))
        return fl_fail_null(FL_EINVAL, "rms_norm: weight has shape %s, input %s has last dim %" PRId64, fl_shape_str(w), fl_shape_str(x), c);
    fl_tensor *xn = fl_lowp_any(1, &x) ? fl_lowp_apply("rms_norm", rms_norm_f32, &eps, 1, &x, x->dtype, NULL) : fl_rms_norm(x, NULL, eps);
    if (!xn || !w) return xn;
    fl_tensor *y = fl_mul(w, xn);
    fl_tensor_release(xn);
    return y;
}

fl_tensor *fl_rms_norm(const fl_tensor *x, const fl_tensor *w, double eps) {
    const fl_tensor *xw[2] = {x, w};
    if (x && fl_lowp_any(2, xw)) return rms_norm_lowp(x, w, eps);
    if (fl_check_cpu_data("rms_norm", x) < 0 || fl_check_float("rms_norm", x) < 0) return NULL;
    if (x->ndim < 1) return fl_fail_null(FL_EINVAL, "rms_norm: input must have at least 1 dim, got %s", fl_shape_str(x));
    int64_t c = x->shape[x->ndim - 1];
    if (check_param("rms_norm", "weight", w, x, c) < 0) return NULL;
    int64_t r = c ? fl_tensor_numel(x) / c : 0;
    fl_tensor *xc = fl_contiguous(x), *wc = w ? fl_contiguous(w) : NULL, *y = NULL, *st = NULL;
    if (!xc || (w && !wc)) goto done;
    y = fl_tensor_empty(x->ndim, x->shape, x->dtype, FL_CPU);
    st = fl_tensor_empty(1, &r, FL_F64, FL_CPU);
    if (!y || !st) { fl_tensor_release(y); y = NULL; goto done; }
    int32_t dt = x->dtype;
    double *s = fl_tensor_data(st);
    if (dt == FL_F32) {
        const float *px = fl_tensor_data(xc), *pw = wc ? fl_tensor_data(wc) : NULL;
        float *py = fl_tensor_data(y);
        float e = (float)eps;
        #pragma omp parallel for schedule(static) if (r * c > FL_PAR_MIN)
        for (int64_t i = 0; i < r; i++) {
            double ms = 0;
            for (int64_t j = 0; j < c; j++) ms += (double)px[i * c + j] * px[i * c + j];
            float rstd = 1.0f / sqrtf((float)(ms / (double)c) + e);   /* torch.rsqrt(variance + eps) in f32 */
            s[i] = rstd;
            for (int64_t j = 0; j < c; j++) {
                float v = px[i * c + j] * rstd;                       /* cast back (f32: identity), then * w */
                py[i * c + j] = pw ? pw[j] * v : v;
            }
        }
    } else {
        const double *px = fl_tensor_data(xc), *pw = wc ? fl_tensor_data(wc) : NULL;
        double *py = fl_tensor_data(y);
        #pragma omp parallel for schedule(static) if (r * c > FL_PAR_MIN)
        for (int64_t i = 0; i < r; i++) {
            double ms = 0;
            for (int64_t j = 0; j < c; j++) ms += px[i * c + j] * px[i * c + j];
            double rstd = 1.0 / sqrt(ms / (double)c + eps);
            s[i] = rstd;
            for (int64_t j = 0; j < c; j++) py[i * c + j] = pw ? pw[j] * (px[i * c + j] * rstd) : px[i * c + j] * rstd;
        }
    }
    const fl_tensor *ins[2] = {x, w};
    fl_node *n = fl_record("rms_norm", rms_norm_backward, 2, ins, y);
    if (n) {
        fl_tensor *xd = fl_detach(xc), *wd = wc ? fl_detach(wc) : NULL;
        fl_node_save(n, xd);
        if (wd) fl_node_save(n, wd); else n->saved[n->n_saved++] = NULL;
        fl_node_save(n, st);
        fl_tensor_release(xd);
        fl_tensor_release(wd);
    }
done:
    fl_tensor_release(xc);
    fl_tensor_release(wc);
    fl_tensor_release(st);
    return y;
}
