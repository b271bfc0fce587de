/* engine/ops/ops_matmul.c: matmul (batched, broadcasting) and linear (Linear [out, in] and GPT-2 Conv1D
 * [in, out] layouts) through OpenBLAS, with backward.
 * Determinism: OpenBLAS picks kernels and splits work by its thread count, which changes the bits. So we
 * never let it thread: every GEMM is cut into fixed blocks of rows (or columns) of C, independent of the
 * thread count, and each block is one single-threaded BLAS call (OpenBLAS runs single-threaded inside an
 * OpenMP parallel region). The same blocks give the same bits whether 1 or N threads run them.
 * bf16/f16: operands are converted to f32, multiplied by sgemm (f32 accumulation) and rounded once, as torch
 * on CPU (ops_shape.c); mixed f32/bf16 operands give f32. */
#include "internal.h"

#include <cblas.h>

/* One BLAS call: C[m,n] = alpha * op(A) op(B) + beta * C for f32/f64, row-major with leading dims. */
void fl_gemm_call(int32_t dt, bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const void *a, int64_t lda,
                 const void *b, int64_t ldb, double beta, void *c, int64_t ldc) {
    if (m == 0 || n == 0) return;
    if (k == 0) {  /* an empty sum: C = beta * C, and beta = 0 never reads C (it may be uninitialised) */
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) {
                if (dt == FL_F32) { float *x = (float *)c + i * ldc + j; *x = beta == 0 ? 0.0f : *x * (float)beta; }
                else { double *x = (double *)c + i * ldc + j; *x = beta == 0 ? 0.0 : *x * beta; }
            }
        return;
    }
    if (dt == FL_F32)
        cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (blasint)m, (blasint)n,
                    (blasint)k, (float)alpha, a, (blasint)lda, b, (blasint)ldb, (float)beta, c, (blasint)ldc);
    else
        cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (blasint)m, (blasint)n,
                    (blasint)k, alpha, a, (blasint)lda, b, (blasint)ldb, beta, c, (blasint)ldc);
}

/* Rows (or columns) of C per BLAS call, from the length of the split dimension alone: the blocking must not
 * depend on the thread count. Each call packs the whole other operand again (OpenBLAS threading itself would
 * share one packing, but its split, and so the bits, follows the thread count), so blocks are as long as they
 * can be, up to GEMM_BLOCK_MAX, while their count stays a multiple of 4, which 1, 2 and 4 threads split evenly:
 * at GPT-2 124M, 64-row blocks spent ~20% of the step repacking, 128 ~13%, 256-512 ~8% (tokens/s 159 -> 188
 * -> 205). More than 4 threads on one rank leave threads idle on products below 4 x 512 rows; 2-D tiles would
 * serve them. Multiples of 16 keep blocks on the kernels' register tiles, and at least GEMM_BLOCK_MIN, so that
 * small products are not cut into calls too short to pay for their packing. */
enum { GEMM_BLOCK_MIN = 64, GEMM_BLOCK_MAX = 512, GEMM_BLOCK_ALIGN = 16, GEMM_BLOCKS_EVEN = 4 };

static int64_t gemm_block(int64_t len) {
    int64_t nblk = GEMM_BLOCKS_EVEN * ((len + GEMM_BLOCKS_EVEN * GEMM_BLOCK_MAX - 1) / (GEMM_BLOCKS_EVEN * GEMM_BLOCK_MAX));
    int64_t blk = (len + nblk - 1) / nblk;
    blk = (blk + GEMM_BLOCK_ALIGN - 1) / GEMM_BLOCK_ALIGN * GEMM_BLOCK_ALIGN;
    return blk < GEMM_BLOCK_MIN ? GEMM_BLOCK_MIN : blk;
}

void fl_gemm(int32_t dt, bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const void *a, int64_t lda,
             const void *b, int64_t ldb, double beta, void *c, int64_t ldc) {
    size_t es = fl_dtype_size(dt);
    bool by_rows = m >= n;
    int64_t len = by_rows ? m : n, blk = gemm_block(len), nblk = (len + blk - 1) / blk;
    /* Always an active parallel region, even for one block: OpenMP-built OpenBLAS threads itself whenever
     * omp_in_parallel() is false and OpenMP allows more than one thread (it ignores its own thread count). */
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < nblk; i++) {
        int64_t lo = i * blk, cnt = fl_min64(blk, len - lo);
        if (by_rows) {  /* rows lo.. of C come from rows lo.. of op(A) */
            const char *ap = (const char *)a + (size_t)(ta ? lo : lo * lda) * es;
            fl_gemm_call(dt, ta, tb, cnt, n, k, alpha, ap, lda, b, ldb, beta, (char *)c + (size_t)(lo * ldc) * es, ldc);
        } else {        /* columns lo.. of C come from columns lo.. of op(B) */
            const char *bp = (const char *)b + (size_t)(tb ? lo * ldb : lo) * es;
            fl_gemm_call(dt, ta, tb, m, cnt, k, alpha, a, lda, bp, ldb, beta, (char *)c + (size_t)lo * es, ldc);
        }
    }
}


/* ---- matmul ---- */

/* Raw batched product of contiguous a [Ba..., m, k] and b [Bb..., k, n] (batch dims broadcast), no autograd.
 * ta/tb transpose the last two dims of a/b as stored. */
static fl_tensor *matmul_raw(const fl_tensor *a0, const fl_tensor *b0, bool ta, bool tb) {
    fl_tensor *a = fl_contiguous(a0), *b = fl_contiguous(b0);
    fl_tensor *out = NULL;
    if (!a || !b) goto done;
    int32_t na = a->ndim, nb = b->ndim;
    int64_t m = ta ? a->shape[na - 1] : a->shape[na - 2], k = ta ? a->shape[na - 2] : a->shape[na - 1];
    int64_t kb = tb ? b->shape[nb - 1] : b->shape[nb - 2], n = tb ? b->shape[nb - 2] : b->shape[nb - 1];
    if (k != kb) { fl_fail(FL_EINVAL, "matmul: shapes %s and %s do not align (%" PRId64 " vs %" PRId64 ")", fl_shape_str(a0), fl_shape_str(b0), k, kb); goto done; }
    int32_t bd = (na > nb ? na : nb) - 2;
    /* oshape: the broadcast batch dims [0, bd), then m, n */
    int64_t oshape[FL_MAX_DIMS], sa[FL_MAX_DIMS], sb[FL_MAX_DIMS], nbatch = 1;
    int64_t stra = m * k, strb = k * n;
    /* batch strides in units of matrices */
    for (int32_t d = bd - 1, da = na - 3, db = nb - 3, acc_a = 1, acc_b = 1; d >= 0; d--, da--, db--) {
        int64_t xa = da >= 0 ? a->shape[da] : 1, xb = db >= 0 ? b->shape[db] : 1;
        if (xa != xb && xa != 1 && xb != 1) { fl_fail(FL_EINVAL, "matmul: batch dims of %s and %s do not broadcast", fl_shape_str(a0), fl_shape_str(b0)); goto done; }
        oshape[d] = xa > xb ? xa : xb;
        sa[d] = xa == 1 ? 0 : acc_a;
        sb[d] = xb == 1 ? 0 : acc_b;
        acc_a *= (int32_t)xa;
        acc_b *= (int32_t)xb;
        nbatch *= oshape[d];
    }
    oshape[bd] = m;
    oshape[bd + 1] = n;
    out = fl_tensor_empty(bd + 2, oshape, a->dtype, FL_CPU);
    if (!out) goto done;
    size_t es = fl_dtype_size(a->dtype);
    const char *pa = fl_tensor_data(a), *pb = fl_tensor_data(b);
    char *po = fl_tensor_data(out);
    int64_t lda = a->shape[na - 1], ldb = b->shape[nb - 1];
    /* Many small matrices: one BLAS call per thread's batch, BLAS single-threaded inside the parallel region. */
    /* Many matrices: parallel over the batch, one BLAS call each (the same calls for any thread count). */
    bool par_batch = nbatch > 1;
    #pragma omp parallel for schedule(static) if (par_batch)
    for (int64_t i = 0; i < nbatch; i++) {
        int64_t rem = i, ia = 0, ib = 0;
        for (int32_t d = bd - 1; d >= 0; d--) { int64_t x = rem % oshape[d]; rem /= oshape[d]; ia += x * sa[d]; ib += x * sb[d]; }
        if (par_batch)
            fl_gemm_call(a->dtype, ta, tb, m, n, k, 1.0, pa + (size_t)(ia * stra) * es, lda, pb + (size_t)(ib * strb) * es, ldb, 0.0,
                      po + (size_t)(i * m * n) * es, n);
        else
            fl_gemm(a->dtype, ta, tb, m, n, k, 1.0, pa + (size_t)(ia * stra) * es, lda, pb + (size_t)(ib * strb) * es, ldb, 0.0,
                 po + (size_t)(i * m * n) * es, n);
    }
done:
    fl_tensor_release(a);
    fl_tensor_release(b);
    return out;
}

static fl_tensor *reduce_into(fl_tensor *g, const fl_node *n, int32_t slot) {
    if (!g) return NULL;
    fl_tensor *r = fl_sum_to_shape(g, n->in_ndim[slot], n->in_shape[slot]);
    fl_tensor_release(g);
    return r;
}

static int matmul_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0]) return FL_OK;
    const fl_tensor *a = n->saved[0], *b = n->saved[1];
    if (fl_node_needs(n, 0) && !(gi[0] = reduce_into(matmul_raw(go[0], b, false, true), n, 0))) return FL_EINVAL;
    if (fl_node_needs(n, 1) && !(gi[1] = reduce_into(matmul_raw(a, go[0], true, false), n, 1))) return FL_EINVAL;
    return FL_OK;
}

static fl_tensor *matmul_f32(const void *p, fl_tensor *const *ins, fl_tensor **aux) { return fl_matmul(ins[0], ins[1]); }

fl_tensor *fl_matmul(const fl_tensor *a, const fl_tensor *b) {
    const fl_tensor *ab[2] = {a, b};
    bool lowp = a && b && fl_lowp_any(2, ab);
    if (!lowp && (fl_check_float("matmul", a) < 0 || fl_check_float("matmul", b) < 0 || fl_check_same_dtype("matmul", a, b) < 0)) return NULL;
    if (a->ndim == 0 || b->ndim == 0) return fl_fail_null(FL_EINVAL, "matmul: scalar operand (%s, %s)", fl_shape_str(a), fl_shape_str(b));
    /* 1-D operands: promote to matrices, then drop the added dim, as torch.matmul. */
    fl_tensor *a2 = NULL, *b2 = NULL, *out = NULL;
    if (a->ndim == 1) { int64_t s[2] = {1, a->shape[0]}; a2 = fl_view(a, 2, s); }
    else { a2 = (fl_tensor *)a; fl_tensor_retain(a2); }
    if (b->ndim == 1) { int64_t s[2] = {b->shape[0], 1}; b2 = fl_view(b, 2, s); }
    else { b2 = (fl_tensor *)b; fl_tensor_retain(b2); }
    if (!a2 || !b2) goto done;
    if (a2->ndim > FL_MAX_DIMS || b2->ndim > FL_MAX_DIMS) goto done;
    const fl_tensor *ins[2] = {a2, b2};
    if (lowp) {   /* the 1-D promotion above and below stays on the bf16 tensors; the f32 matmul sees >= 2-D */
        if (!(out = fl_lowp_apply("matmul", matmul_f32, NULL, 2, ins, fl_lowp_promote(a->dtype, b->dtype), NULL))) goto done;
    } else {
        out = matmul_raw(a2, b2, false, false);
        if (!out) goto done;
        fl_node *n = fl_record("matmul", matmul_backward, 2, ins, out);
        if (n) { fl_node_save(n, a2); fl_node_save(n, b2); }
    }
    if (a->ndim == 1 || b->ndim == 1) {
        int64_t s[FL_MAX_DIMS];
        int32_t nd = 0;
        for (int32_t d = 0; d < out->ndim; d++) {
            if (a->ndim == 1 && d == out->ndim - 2) continue;
            if (b->ndim == 1 && d == out->ndim - 1) continue;
            s[nd++] = out->shape[d];
        }
        fl_tensor *v = fl_view(out, nd, s);
        fl_tensor_release(out);
        out = v;
    }
done:
    fl_tensor_release(a2);
    fl_tensor_release(b2);
    return out;
}

/* ---- linear ---- */

/* x [M, in] contiguous; w [out, in] (or [in, out] when in_out); y [M, out]. */
static int linear_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    if (!go[0]) return FL_OK;
    const fl_tensor *x = n->saved[0], *w = n->saved[1];
    bool in_out = n->i[0] != 0;
    int32_t dt = go[0]->dtype;
    fl_tensor *g = fl_contiguous(go[0]);
    if (!g) return FL_ENOMEM;
    int64_t in = x->shape[x->ndim - 1], M = fl_tensor_numel(x) / (in ? in : 1), out = g->shape[g->ndim - 1];
    int rc = FL_OK;
    if (fl_node_needs(n, 0)) {  /* dx = dy W  ([M,out] x [out,in]), Conv1D: dy W^T */
        fl_tensor *dx = fl_tensor_empty(n->in_ndim[0], n->in_shape[0], dt, FL_CPU);
        if (!dx) { rc = FL_ENOMEM; goto done; }
        fl_gemm(dt, false, in_out, M, in, out, 1.0, fl_tensor_data(g), out, fl_tensor_data(w), in_out ? out : in, 0.0, fl_tensor_data(dx), in);
        gi[0] = dx;
    }
    if (fl_node_needs(n, 1)) {  /* dW = dy^T x ([out,M] x [M,in]); Conv1D: x^T dy */
        fl_tensor *dw = fl_tensor_empty(w->ndim, w->shape, dt, FL_CPU);
        if (!dw) { rc = FL_ENOMEM; goto done; }
        if (in_out) fl_gemm(dt, true, false, in, out, M, 1.0, fl_tensor_data(x), in, fl_tensor_data(g), out, 0.0, fl_tensor_data(dw), out);
        else fl_gemm(dt, true, false, out, in, M, 1.0, fl_tensor_data(g), out, fl_tensor_data(x), in, 0.0, fl_tensor_data(dw), in);
        gi[1] = dw;
    }
    if (n->n_in > 2 && fl_node_needs(n, 2)) {  /* db = column sums of dy */
        int64_t s2[2] = {M, out};
        fl_tensor *g2 = fl_view(g, 2, s2);
        gi[2] = g2 ? fl_sum_dim(g2, 0, false) : NULL;
        fl_tensor_release(g2);
        if (!gi[2]) rc = FL_EINVAL;
    }
done:
    fl_tensor_release(g);
    return rc;
}

static fl_tensor *linear_f32(const void *p, fl_tensor *const *ins, fl_tensor **aux) {
    return fl_linear(ins[0], ins[1], ins[2], *(const bool *)p);
}

fl_tensor *fl_linear(const fl_tensor *x, const fl_tensor *w, const fl_tensor *b, bool w_in_out) {
    const fl_tensor *xwb[3] = {x, w, b};
    if (x && w && fl_lowp_any(3, xwb)) {   /* bias added in f32 before the one rounding, as torch's addmm */
        int32_t dt = fl_lowp_promote(x->dtype, w->dtype);
        if (b) dt = fl_lowp_promote(dt, b->dtype);
        return fl_lowp_apply("linear", linear_f32, &w_in_out, b ? 3 : 2, xwb, dt, NULL);
    }
    if (fl_check_float("linear", x) < 0 || fl_check_float("linear", w) < 0 || fl_check_same_dtype("linear", x, w) < 0) return NULL;
    if (b && (fl_check_float("linear", b) < 0 || fl_check_same_dtype("linear", x, b) < 0)) return NULL;
    if (w->ndim != 2) return fl_fail_null(FL_EINVAL, "linear: weight must be 2-D, got %s", fl_shape_str(w));
    if (x->ndim < 1) return fl_fail_null(FL_EINVAL, "linear: input must have at least 1 dim");
    int64_t in = x->shape[x->ndim - 1], out = w_in_out ? w->shape[1] : w->shape[0], win = w_in_out ? w->shape[0] : w->shape[1];
    if (in != win)
        return fl_fail_null(FL_EINVAL, "linear: input %s has %" PRId64 " features, weight %s (%s) expects %" PRId64,
                            fl_shape_str(x), in, fl_shape_str(w), w_in_out ? "Conv1D [in, out]" : "Linear [out, in]", win);
    if (b && (b->ndim != 1 || b->shape[0] != out))
        return fl_fail_null(FL_EINVAL, "linear: bias %s does not match %" PRId64 " outputs", fl_shape_str(b), out);
    fl_tensor *xc = fl_contiguous(x), *wc = fl_contiguous(w), *bc = b ? fl_contiguous(b) : NULL, *y = NULL;
    if (!xc || !wc || (b && !bc)) goto done;
    int64_t M = fl_tensor_numel(x) / (in ? in : 1);
    int64_t yshape[FL_MAX_DIMS];
    memcpy(yshape, x->shape, sizeof(int64_t) * (size_t)x->ndim);
    yshape[x->ndim - 1] = out;
    y = fl_tensor_empty(x->ndim, yshape, x->dtype, FL_CPU);
    if (!y) goto done;
    size_t es = fl_dtype_size(x->dtype);
    char *py = fl_tensor_data(y);
    if (bc) {
        #pragma omp parallel for schedule(static) if (M * out > FL_PAR_MIN)
        for (int64_t r = 0; r < M; r++) memcpy(py + (size_t)(r * out) * es, fl_tensor_data(bc), (size_t)out * es);
    }
    fl_gemm(x->dtype, false, !w_in_out, M, out, in, 1.0, fl_tensor_data(xc), in, fl_tensor_data(wc), w_in_out ? out : in,
         bc ? 1.0 : 0.0, py, out);
    const fl_tensor *ins[3] = {x, w, b};
    fl_node *n = fl_record("linear", linear_backward, b ? 3 : 2, ins, y);
    if (n) {
        fl_tensor *xd = fl_detach(xc), *wd = fl_detach(wc);
        fl_node_save(n, xd);
        fl_node_save(n, wd);
        fl_tensor_release(xd);
        fl_tensor_release(wd);
        n->i[0] = w_in_out;
    }
done:
    fl_tensor_release(xc);
    fl_tensor_release(wc);
    fl_tensor_release(bc);
    return y;
}
