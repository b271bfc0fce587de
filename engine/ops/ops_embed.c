/* engine/ops/ops_embed.c: embedding lookup (backward: deterministic scatter-add of rows) and rotary position
 * embedding in the Hugging Face rotate_half convention, with backward, f32/f64 and bf16/f16 (the lookup copies
 * rows of any float dtype; its bf16 gradient is summed in f32 and rounded once; RoPE in bf16 rounds where
 * Hugging Face's torch code does). Attention is ops_attn.c. */
#include "internal.h"

#include <math.h>

static int64_t id_at(const void *p, int32_t dt, int64_t i) {
    return dt == FL_I64 ? ((const int64_t *)p)[i] : (int64_t)((const int32_t *)p)[i];
}

/* ---- embedding: weight [V, H], ids any shape -> [..., H] ---- */

enum { EMB_COL_BLOCK = 64 };  /* columns per task in backward: each dW element is summed in id order */

static int embedding_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0] || !fl_node_needs(n, 0)) return FL_OK;
    const fl_tensor *ids = n->saved[0];
    int64_t h = n->in_shape[0][1], cnt = fl_tensor_numel(ids);
    fl_tensor *g = fl_contiguous(go[0]);
    bool lowp = g && fl_lowp_any(1, (const fl_tensor *const *)&g);
    if (lowp) {   /* bf16/f16: rows summed in f32, the result rounded once below */
        fl_tensor *g32 = fl_lowp_to(g, FL_F32);
        fl_tensor_release(g);
        g = g32;
    }
    fl_tensor *dw = g ? fl_tensor_zeros(2, n->in_shape[0], g->dtype, FL_CPU) : NULL;
    if (!dw) { fl_tensor_release(g); return FL_ENOMEM; }
    const void *pi = fl_tensor_data(ids);
    int64_t pad = n->i[0];   /* -1: none; else that row gets no gradient (torch's padding_idx) */
    int64_t nblk = (h + EMB_COL_BLOCK - 1) / EMB_COL_BLOCK;
    int32_t dt = g->dtype;
    /* Parallel over column blocks, rows added in id order: the same bits for any thread count. */
    #pragma omp parallel for schedule(static) if (cnt * h > FL_PAR_MIN && nblk > 1)
    for (int64_t cb = 0; cb < nblk; cb++) {
        int64_t c0 = cb * EMB_COL_BLOCK, c1 = fl_min64(h, c0 + EMB_COL_BLOCK);
        for (int64_t i = 0; i < cnt; i++) {
            int64_t r = id_at(pi, ids->dtype, i);
            if (r == pad) continue;
            if (dt == FL_F32) {
                float *d = (float *)fl_tensor_data(dw) + r * h;
                const float *s = (const float *)fl_tensor_data(g) + i * h;
                for (int64_t c = c0; c < c1; c++) d[c] += s[c];
            } else {
                double *d = (double *)fl_tensor_data(dw) + r * h;
                const double *s = (const double *)fl_tensor_data(g) + i * h;
                for (int64_t c = c0; c < c1; c++) d[c] += s[c];
            }
        }
    }
    fl_tensor_release(g);
    if (lowp) {
        fl_tensor *r = fl_lowp_to(dw, n->in_dtype[0]);
        fl_tensor_release(dw);
        if (!(dw = r)) return FL_ENOMEM;
    }
    gi[0] = dw;
    return FL_OK;
}

fl_tensor *fl_embedding(const fl_tensor *weight, const fl_tensor *ids) { return fl_embedding_padded(weight, ids, -1); }

fl_tensor *fl_embedding_padded(const fl_tensor *weight, const fl_tensor *ids, int64_t padding_idx) {
    if (fl_check_cpu_data("embedding", weight) < 0 || fl_check_cpu_data("embedding", ids) < 0 ||
        (!fl_lowp_any(1, &weight) && fl_check_float("embedding", weight) < 0))
        return NULL;
    if (weight->ndim != 2) return fl_fail_null(FL_EINVAL, "embedding: weight must be [V, H], got %s", fl_shape_str(weight));
    if (ids->dtype != FL_I64 && ids->dtype != FL_I32)
        return fl_fail_null(FL_EINVAL, "embedding: ids must be i64 or i32, got %s", fl_dtype_name(ids->dtype));
    if (ids->ndim + 1 > FL_MAX_DIMS) return fl_fail_null(FL_EINVAL, "embedding: ids %s have too many dims", fl_shape_str(ids));
    int64_t v = weight->shape[0], h = weight->shape[1], cnt = fl_tensor_numel(ids);
    if (padding_idx < -1 || padding_idx >= v)
        return fl_fail_null(FL_EINVAL, "embedding: padding_idx %" PRId64 " is out of range [0, %" PRId64 ") for weight %s",
                            padding_idx, v, fl_shape_str(weight));
    fl_tensor *ic = fl_contiguous(ids), *wc = fl_contiguous(weight), *out = NULL;
    if (!ic || !wc) goto done;
    const void *pi = fl_tensor_data(ic);
    for (int64_t i = 0; i < cnt; i++) {
        int64_t r = id_at(pi, ids->dtype, i);
        if (r < 0 || r >= v) {
            fl_fail(FL_EINVAL, "embedding: id %" PRId64 " at position %" PRId64 " is out of range [0, %" PRId64 ") for weight %s", r, i, v,
                    fl_shape_str(weight));
            goto done;
        }
    }
    int64_t oshape[FL_MAX_DIMS];
    memcpy(oshape, ids->shape, sizeof(int64_t) * (size_t)ids->ndim);
    oshape[ids->ndim] = h;
    if (!(out = fl_tensor_empty(ids->ndim + 1, oshape, weight->dtype, FL_CPU))) goto done;
    size_t row = (size_t)h * fl_dtype_size(weight->dtype);
    const char *pw = fl_tensor_data(wc);
    char *po = fl_tensor_data(out);
    #pragma omp parallel for schedule(static) if (cnt * h > FL_PAR_MIN)
    for (int64_t i = 0; i < cnt; i++) memcpy(po + (size_t)i * row, pw + (size_t)id_at(pi, ids->dtype, i) * row, row);
    const fl_tensor *ins[2] = {weight, ids};
    fl_node *n = fl_record("embedding", embedding_backward, 2, ins, out);
    if (n) {
        fl_node_save(n, ic);
        n->i[0] = padding_idx;
    }
done:
    fl_tensor_release(ic);
    fl_tensor_release(wc);
    return out;
}

/* ---- RoPE ---- */

/* cos/sin [T, rot/2] in f32 as Hugging Face: inv_freq = 1 / theta^((2i)/rot) in f32 (or the given table: scaled
 * RoPE), freq = pos * inv_freq in f32, then cos/sin of the f32 angle, times the attention scaling in f32. */
static int rope_tables(const fl_tensor *pos, int64_t t, double theta, const float *inv_freq, double scale, int64_t rot,
                       float *cs, float *sn) {
    int64_t half = rot / 2;
    float sc = (float)scale;
    for (int64_t ti = 0; ti < t; ti++) {
        float p = pos ? (float)id_at(fl_tensor_data(pos), pos->dtype, ti) : (float)ti;
        for (int64_t i = 0; i < half; i++) {
            float inv = inv_freq ? inv_freq[i] : 1.0f / powf((float)theta, (float)(2 * i) / (float)rot);
            float f = p * inv;
            cs[ti * half + i] = scale == 1.0 ? cosf(f) : cosf(f) * sc;
            sn[ti * half + i] = scale == 1.0 ? sinf(f) : sinf(f) * sc;
        }
    }
    return FL_OK;
}

static float lp_up(int32_t dt, uint16_t h) { return dt == FL_BF16 ? fl_bf16_to_f32(h) : fl_f16_to_f32(h); }
static uint16_t lp_down(int32_t dt, float f) { return dt == FL_BF16 ? fl_f32_to_bf16(f) : fl_f32_to_f16(f); }
static float lp_round(int32_t dt, float f) { return lp_up(dt, lp_down(dt, f)); }

/* out = x rotated (dir = +1) or rotated back (dir = -1, the transpose: backward). x has any strides with
 * the last dim contiguous; out is contiguous [B, T, heads, hd]. */
static void rope_apply(const fl_tensor *x, void *out, const float *cs, const float *sn, int64_t rot, int dir) {
    int64_t b = x->shape[0], t = x->shape[1], nh = x->shape[2], hd = x->shape[3], half = rot / 2;
    int32_t dt = x->dtype;
    size_t es = fl_dtype_size(dt);
    const char *px = fl_tensor_data(x);
    int64_t rows = b * t * nh;
    #pragma omp parallel for schedule(static) if (rows * hd > FL_PAR_MIN)
    for (int64_t r = 0; r < rows; r++) {
        int64_t bi = r / (t * nh), ti = (r / nh) % t, hi = r % nh;
        const void *src = px + (size_t)(bi * x->stride[0] + ti * x->stride[1] + hi * x->stride[2]) * es;
        const float *c = cs + ti * half, *s = sn + ti * half;
        if (dt == FL_F32) {
            const float *a = (const float *)src;
            float *o = (float *)out + r * hd, sg = (float)dir;
            /* HF: q * cos + rotate_half(q) * sin, rotate_half(q) = cat(-q2, q1) */
            for (int64_t i = 0; i < half; i++) {
                o[i] = a[i] * c[i] - sg * (a[i + half] * s[i]);
                o[i + half] = a[i + half] * c[i] + sg * (a[i] * s[i]);
            }
            for (int64_t i = rot; i < hd; i++) o[i] = a[i];
        } else if (dt == FL_BF16 || dt == FL_F16) {
            /* Hugging Face in bf16: q * cos + rotate_half(q) * sin is three torch ops, each rounded to x's dtype
             * (cos/sin come rounded from rope_raw). Backward (dir -1) is the same pattern: autograd rounds
             * g * cos and g * sin, then their sum. */
            const uint16_t *a = (const uint16_t *)src;
            uint16_t *o = (uint16_t *)out + r * hd;
            float sg = (float)dir;
            for (int64_t i = 0; i < half; i++) {
                float a1 = lp_up(dt, a[i]), a2 = lp_up(dt, a[i + half]);
                o[i] = lp_down(dt, lp_round(dt, a1 * c[i]) - sg * lp_round(dt, a2 * s[i]));
                o[i + half] = lp_down(dt, lp_round(dt, a2 * c[i]) + sg * lp_round(dt, a1 * s[i]));
            }
            for (int64_t i = rot; i < hd; i++) o[i] = a[i];
        } else {
            const double *a = (const double *)src;
            double *o = (double *)out + r * hd, sg = (double)dir;
            for (int64_t i = 0; i < half; i++) {
                o[i] = a[i] * (double)c[i] - sg * (a[i + half] * (double)s[i]);
                o[i + half] = a[i + half] * (double)c[i] + sg * (a[i] * (double)s[i]);
            }
            for (int64_t i = rot; i < hd; i++) o[i] = a[i];
        }
    }
}

static fl_tensor *rope_raw(const fl_tensor *x, const fl_tensor *pos, double theta, const fl_tensor *inv_freq, double scale,
                           int64_t rot, int dir) {
    int64_t t = x->shape[1], half = rot / 2;
    float *cs = malloc(sizeof(float) * (size_t)(t * half + 1)), *sn = malloc(sizeof(float) * (size_t)(t * half + 1));
    fl_tensor *out = cs && sn ? fl_tensor_empty(4, x->shape, x->dtype, FL_CPU) : NULL;
    if (out) {
        rope_tables(pos, t, theta, inv_freq ? (const float *)fl_tensor_data(inv_freq) : NULL, scale, rot, cs, sn);
        if (x->dtype == FL_BF16 || x->dtype == FL_F16)   /* HF: cos.to(x.dtype), sin.to(x.dtype) */
            for (int64_t i = 0; i < t * half; i++) { cs[i] = lp_round(x->dtype, cs[i]); sn[i] = lp_round(x->dtype, sn[i]); }
        rope_apply(x, fl_tensor_data(out), cs, sn, rot, dir);
    } else if (!cs || !sn) {
        fl_fail(FL_ENOMEM, "rope: tables for %" PRId64 " positions", t);
    }
    free(cs);
    free(sn);
    return out;
}

/* saved: pos (when i[1]), then inv_freq (when i[2]); f[0] theta, f[1] scale, i[0] rot_dim */
static int rope_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0] || !fl_node_needs(n, 0)) return FL_OK;
    fl_tensor *g = fl_contiguous(go[0]);
    if (!g) return FL_ENOMEM;
    const fl_tensor *pos = n->i[1] ? n->saved[0] : NULL, *inv = n->i[2] ? n->saved[n->i[1] ? 1 : 0] : NULL;
    gi[0] = rope_raw(g, pos, n->f[0], inv, n->f[1], n->i[0], -1);  /* rotation by -angle = transpose */
    fl_tensor_release(g);
    return gi[0] ? FL_OK : FL_ENOMEM;
}

/* inv_freq NULL: the frequencies of theta; else an f32 [rot_dim/2] table, with scale on cos and sin. */
static fl_tensor *rope_impl(const fl_tensor *x, const fl_tensor *pos, double theta, const fl_tensor *inv_freq,
                            double scale, int32_t rot_dim) {
    if (fl_check_cpu_data("rope", x) < 0 || (!fl_lowp_any(1, &x) && fl_check_float("rope", x) < 0)) return NULL;
    if (x->ndim != 4) return fl_fail_null(FL_EINVAL, "rope: x must be [B, T, heads, hd], got %s", fl_shape_str(x));
    int64_t t = x->shape[1], hd = x->shape[3];
    if (rot_dim <= 0 || rot_dim > hd || rot_dim % 2)
        return fl_fail_null(FL_EINVAL, "rope: rot_dim %d must be even and in (0, %" PRId64 "] for x %s", rot_dim, hd, fl_shape_str(x));
    if (!(theta > 0)) return fl_fail_null(FL_EINVAL, "rope: theta must be positive, got %g", theta);
    if (!(scale > 0)) return fl_fail_null(FL_EINVAL, "rope: attention scaling must be positive, got %g", scale);
    if (pos) {
        if (fl_check_cpu_data("rope", pos) < 0) return NULL;
        if ((pos->dtype != FL_I64 && pos->dtype != FL_I32) || pos->ndim != 1 || pos->shape[0] != t)
            return fl_fail_null(FL_EINVAL, "rope: pos must be i64 [%" PRId64 "], got %s %s", t, fl_dtype_name(pos->dtype), fl_shape_str(pos));
    }
    if (inv_freq) {
        if (fl_check_cpu_data("rope", inv_freq) < 0) return NULL;
        if (inv_freq->dtype != FL_F32 || inv_freq->ndim != 1 || inv_freq->shape[0] != rot_dim / 2)
            return fl_fail_null(FL_EINVAL, "rope: inv_freq must be f32 [%d] (rot_dim / 2), got %s %s", rot_dim / 2,
                                fl_dtype_name(inv_freq->dtype), fl_shape_str(inv_freq));
    }
    fl_tensor *xs = NULL, *pc = pos ? fl_contiguous(pos) : NULL, *ic = inv_freq ? fl_contiguous(inv_freq) : NULL;
    fl_tensor *out = NULL;
    if ((pos && !pc) || (inv_freq && !ic)) goto done;
    if (hd > 1 && x->stride[3] != 1) { if (!(xs = fl_contiguous(x))) goto done; }  /* last dim must be contiguous to read rows */
    out = rope_raw(xs ? xs : x, pc, theta, ic, scale, rot_dim, +1);
    if (!out) goto done;
    const fl_tensor *ins[1] = {x};
    fl_node *n = fl_record("rope", rope_backward, 1, ins, out);
    if (n) {
        if (pc) fl_node_save(n, pc);
        if (ic) fl_node_save(n, ic);
        n->f[0] = theta;
        n->f[1] = scale;
        n->i[0] = rot_dim;
        n->i[1] = pc != NULL;
        n->i[2] = ic != NULL;
    }
done:
    fl_tensor_release(xs);
    fl_tensor_release(pc);
    fl_tensor_release(ic);
    return out;
}

fl_tensor *fl_rope(const fl_tensor *x, const fl_tensor *pos, double theta, int32_t rot_dim) {
    return rope_impl(x, pos, theta, NULL, 1.0, rot_dim);
}

fl_tensor *fl_rope_freqs(const fl_tensor *x, const fl_tensor *pos, const fl_tensor *inv_freq, double scale) {
    if (!inv_freq) return fl_fail_null(FL_EINVAL, "rope: inv_freq is required");
    if (inv_freq->ndim != 1 || inv_freq->shape[0] < 1 || inv_freq->shape[0] > INT32_MAX / 2)
        return fl_fail_null(FL_EINVAL, "rope: inv_freq must be f32 [rot_dim / 2], got %s", fl_shape_str(inv_freq));
    return rope_impl(x, pos, 1.0, inv_freq, scale, (int32_t)(2 * inv_freq->shape[0]));
}
