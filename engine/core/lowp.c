/* engine/core/lowp.c: bf16/f16 support for every op — inputs converted to f32, the op's f32 code run, each output
 * and gradient rounded once. The ops call fl_lowp_apply from their entry points; nothing else lives here. */
#include "internal.h"

/* ---- low precision: bf16/f16 ops run by their f32 code ----
 * As PyTorch on CPU: an op on bf16/f16 inputs computes in f32 and rounds its output once (round to nearest
 * even); mixed inputs promote like torch.result_type (bf16 with f32 gives f32, with f64 gives f64). Each float
 * input becomes an f32 copy (an f32 input a detached alias), the op's own f32 function runs on those, and its
 * result is rounded to out_dtype. When a gradient is needed, the f32 function records its node on the copies;
 * its backward function, scalars and saved tensors move to a node on the real inputs, with saved copies of
 * inputs swapped back for the inputs themselves, so the graph keeps no f32 copy of a weight (FSDP frees the
 * unsharded bf16 storage after forward and brings it back before backward). That node's backward converts
 * saved tensors and the output gradient to f32, runs the f32 backward, and rounds each gradient once to its
 * input's dtype. f32 and f64 ops never come here, so their bits do not change. */

static bool is_lowp(int32_t dt) { return dt == FL_BF16 || dt == FL_F16; }
static bool is_float(int32_t dt) { return dt == FL_F32 || dt == FL_F64 || is_lowp(dt); }

bool fl_lowp_any(int32_t n, const fl_tensor *const *ins) {
    for (int32_t i = 0; i < n; i++)
        if (ins[i] && is_lowp(ins[i]->dtype)) return true;
    return false;
}

int32_t fl_lowp_promote(int32_t a, int32_t b) {
    if (a == b || !is_float(b)) return a;
    if (!is_float(a)) return b;
    return a == FL_F64 || b == FL_F64 ? FL_F64 : FL_F32;   /* bf16 with f16 is f32, as torch */
}

/* bf16 <-> f32 of contiguous buffers, the rounding of fl_f32_to_bf16 written inline so that the loops
 * vectorise (every op converts its operands and results: this is the hot part of the bf16 path). */
static void bf16_to_f32_n(const uint16_t *s, float *d, int64_t n) {
    #pragma omp parallel for schedule(static) if (n > FL_PAR_MIN)
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)s[i] << 16;
        memcpy(d + i, &u, 4);
    }
}

static void f32_to_bf16_n(const float *s, uint16_t *d, int64_t n) {
    #pragma omp parallel for schedule(static) if (n > FL_PAR_MIN)
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, s + i, 4);
        d[i] = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40u)         /* quiet NaN */
                                               : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16); /* nearest even */
    }
}

fl_tensor *fl_lowp_to(const fl_tensor *t, int32_t dtype) {
    fl_tensor *o = fl_tensor_empty(t->ndim, t->shape, dtype, FL_CPU);
    if (!o) return NULL;
    bool contig = fl_tensor_is_contiguous(t) && fl_tensor_has_data(t);
    if (contig && t->dtype == FL_BF16 && dtype == FL_F32) bf16_to_f32_n(fl_tensor_data(t), fl_tensor_data(o), fl_tensor_numel(t));
    else if (contig && t->dtype == FL_F32 && dtype == FL_BF16) f32_to_bf16_n(fl_tensor_data(t), fl_tensor_data(o), fl_tensor_numel(t));
    else if (fl_tensor_copy_(o, t) < 0) { fl_tensor_release(o); o = NULL; }
    return o;
}


typedef struct {
    fl_backward_fn fn;   /* the f32 op's backward */
    int32_t compute;     /* f32, or f64 when an input is f64 */
    uint32_t inputs;     /* bit s: saved[s] is one of the op's inputs, to convert to `compute` for backward */
} lowp_ctx;

static void lowp_destroy(fl_node *n) { free(n->ctx); }

static int lowp_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    const lowp_ctx *c = n->ctx;
    fl_node tmp = *n;   /* what the f32 backward reads: its saved tensors in f32, the same scalars and edges */
    fl_tensor *g[1] = {NULL};
    int rc = FL_OK;
    for (int32_t s = 0; s < n->n_saved; s++)
        if ((c->inputs >> s & 1u) && n->saved[s]->dtype != c->compute && !(tmp.saved[s] = fl_lowp_to(n->saved[s], c->compute)))
            rc = FL_ENOMEM;
    for (int32_t i = 0; i < n->n_in && i < 4; i++)
        if (is_lowp(n->in_dtype[i])) tmp.in_dtype[i] = c->compute;
    if (go[0]) {
        if (go[0]->dtype == c->compute) { g[0] = go[0]; fl_tensor_retain(g[0]); }
        else if (!(g[0] = fl_lowp_to(go[0], c->compute))) rc = FL_ENOMEM;
    }
    if (rc == FL_OK) rc = c->fn(&tmp, g, gi);
    fl_tensor_release(g[0]);
    for (int32_t s = 0; s < n->n_saved; s++)
        if (tmp.saved[s] != n->saved[s]) fl_tensor_release(tmp.saved[s]);
    for (int32_t i = 0; rc == FL_OK && i < n->n_in; i++) {
        if (!gi[i] || gi[i]->dtype == n->in_dtype[i]) continue;
        fl_tensor *r = fl_lowp_to(gi[i], n->in_dtype[i]);   /* the one rounding of this gradient */
        fl_tensor_release(gi[i]);
        gi[i] = r;
        if (!r) rc = FL_ENOMEM;
    }
    return rc;
}

static bool same_view(const fl_tensor *a, const fl_tensor *b) {
    if (a->storage != b->storage || a->offset != b->offset || a->ndim != b->ndim || a->dtype != b->dtype) return false;
    for (int32_t d = 0; d < a->ndim; d++)
        if (a->shape[d] != b->shape[d] || a->stride[d] != b->stride[d]) return false;
    return true;
}

/* fn(args, converted inputs, aux) calls the op's public function on f32 (or f64) tensors; ins[0..n) are the
 * op's inputs in the order its node records them (n <= 4; NULL and integer inputs pass through unchanged).
 * Returns the result in out_dtype with the node described above, or NULL with fn's message. */
fl_tensor *fl_lowp_apply(const char *op, fl_lowp_fn fn, const void *args, int32_t n, const fl_tensor *const *ins,
                         int32_t out_dtype, fl_tensor **aux) {
    assert(n <= 4);
    fl_tensor *cv[4] = {NULL, NULL, NULL, NULL}, *y32 = NULL, *y = NULL;
    int32_t compute = FL_F32;
    bool grad = false;
    for (int32_t i = 0; i < n; i++) {
        if (!ins[i]) continue;
        if (fl_check_cpu_data(op, ins[i]) < 0) return NULL;
        if (ins[i]->dtype == FL_F64) compute = FL_F64;
        grad |= ins[i]->requires_grad && is_float(ins[i]->dtype);
    }
    grad = grad && fl_grad_is_enabled();
    for (int32_t i = 0; i < n; i++) {
        const fl_tensor *t = ins[i];
        if (!t) continue;
        if (!is_float(t->dtype)) { cv[i] = (fl_tensor *)t; fl_tensor_retain(cv[i]); continue; }
        if (!(cv[i] = t->dtype == compute ? fl_detach(t) : fl_lowp_to(t, compute))) goto done;
        if (grad && t->requires_grad) fl_tensor_set_requires_grad(cv[i], true);   /* so that fn records its node */
    }
    if (!(y32 = fn(args, cv, aux))) goto done;
    if (!(y = y32->dtype == out_dtype ? fl_detach(y32) : fl_lowp_to(y32, out_dtype))) goto done;
    if (!grad || !y32->grad_fn) goto done;
    const fl_node *src = y32->grad_fn;
    assert(!src->ctx && src->n_out == 1);
    fl_node *nl = fl_node_make(src->name, lowp_backward, n, ins, 1);
    lowp_ctx *c = nl ? malloc(sizeof *c) : NULL;
    if (!c) {
        fl_node_release(nl);
        fl_tensor_release(y);
        y = fl_fail_null(FL_ENOMEM, "%s: out of memory for a node", op);
        goto done;
    }
    c->fn = src->backward;
    c->compute = compute;
    c->inputs = 0;
    nl->ctx = c;
    nl->destroy = lowp_destroy;
    memcpy(nl->f, src->f, sizeof nl->f);
    memcpy(nl->i, src->i, sizeof nl->i);
    for (int32_t s = 0; s < src->n_saved; s++) {
        const fl_tensor *sv = src->saved[s];
        int32_t j = -1;
        for (int32_t k = 0; sv && k < n; k++)
            if (cv[k] && same_view(sv, cv[k])) j = k;
        fl_tensor *keep = sv ? fl_detach(j >= 0 ? ins[j] : sv) : NULL;   /* detached: no f32 graph behind it */
        if (j >= 0 && is_float(ins[j]->dtype)) c->inputs |= 1u << nl->n_saved;
        nl->saved[nl->n_saved++] = keep;
        if (sv && !keep) {   /* the node frees what it holds; y goes without a grad_fn */
            fl_node_release(nl);
            fl_tensor_release(y);
            y = fl_fail_null(FL_ENOMEM, "%s: out of memory for a node", op);
            goto done;
        }
    }
    fl_node_set_output(nl, 0, y);
    fl_node_release(nl);
done:
    fl_tensor_release(y32);
    for (int32_t i = 0; i < n; i++) fl_tensor_release(cv[i]);
    return y;
}
