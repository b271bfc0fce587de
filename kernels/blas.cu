/* kernels/blas.cu: matrix products on the GPU through cuBLAS — one handle per host thread, made on first use,
 * and row-major sgemm wrappers matching the CPU path's cblas calls. Not reachable from the CPU path yet: the
 * engine has no CUDA storage, so nothing calls these functions (their declarations are in kernels/fl_cuda.h). */
#include "fl_cuda.h"

#include <climits>

namespace {

/* Per thread: a cuBLAS handle must not be used by two threads at once, and each rank drives its GPU from one
 * thread, so there is one handle per thread and no lock. */
thread_local cublasHandle_t handle = nullptr;

int get_handle(const char *op, void *stream, cublasHandle_t *out) {
    if (!handle) {
        FL_CUBLAS_CHECK(op, cublasCreate(&handle));
        /* Plain FP32 (no TF32 tensor cores): the CUDA spec compares against the CPU path. */
        FL_CUBLAS_CHECK(op, cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH));
    }
    FL_CUBLAS_CHECK(op, cublasSetStream(handle, (cudaStream_t)stream));
    *out = handle;
    return FL_OK;
}

bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

int check_dims(const char *op, bool ta, bool tb, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
               int64_t batch) {
    if (!fits_int(m) || !fits_int(n) || !fits_int(k) || !fits_int(batch))
        return fl_fail(FL_EINVAL, "%s: sizes m=%lld n=%lld k=%lld batch=%lld must be in [0, %d] for cuBLAS", op,
                       (long long)m, (long long)n, (long long)k, (long long)batch, INT_MAX);
    /* Row-major leading dimensions: the stored row length of A is k (or m when transposed), and so on. */
    int64_t need_a = ta ? m : k, need_b = tb ? k : n;
    if (!fits_int(lda) || !fits_int(ldb) || !fits_int(ldc) || lda < (need_a > 1 ? need_a : 1) ||
        ldb < (need_b > 1 ? need_b : 1) || ldc < (n > 1 ? n : 1))
        return fl_fail(FL_EINVAL,
                       "%s: row strides lda=%lld ldb=%lld ldc=%lld too small for A %s[%lld, %lld], B %s[%lld, %lld], "
                       "C [%lld, %lld]",
                       op, (long long)lda, (long long)ldb, (long long)ldc, ta ? "^T " : "", (long long)(ta ? k : m),
                       (long long)(ta ? m : k), tb ? "^T " : "", (long long)(tb ? n : k), (long long)(tb ? k : n),
                       (long long)m, (long long)n);
    return FL_OK;
}

} // namespace

extern "C" {

/* Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands and m with n. */
int fl_cuda_sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                  int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc, void *stream) {
    const char *op = "sgemm (cuda)";
    int rc = check_dims(op, trans_a, trans_b, m, n, k, lda, ldb, ldc, 1);
    if (rc < 0) return rc;
    if (m == 0 || n == 0) return FL_OK;
    cublasHandle_t h;
    if ((rc = get_handle(op, stream, &h)) < 0) return rc;
    FL_CUBLAS_CHECK(op, cublasSgemm(h, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                                    (int)n, (int)m, (int)k, &alpha, b, (int)ldb, a, (int)lda, &beta, c, (int)ldc));
    return FL_OK;
}

int fl_cuda_sgemm_batched(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                          int64_t lda, int64_t stride_a, const float *b, int64_t ldb, int64_t stride_b, float beta,
                          float *c, int64_t ldc, int64_t stride_c, int64_t batch, void *stream) {
    const char *op = "sgemm_batched (cuda)";
    int rc = check_dims(op, trans_a, trans_b, m, n, k, lda, ldb, ldc, batch);
    if (rc < 0) return rc;
    if (m == 0 || n == 0 || batch == 0) return FL_OK;
    cublasHandle_t h;
    if ((rc = get_handle(op, stream, &h)) < 0) return rc;
    FL_CUBLAS_CHECK(op, cublasSgemmStridedBatched(h, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                                                  trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, (int)n, (int)m, (int)k, &alpha,
                                                  b, (int)ldb, (long long)stride_b, a, (int)lda, (long long)stride_a,
                                                  &beta, c, (int)ldc, (long long)stride_c, (int)batch));
    return FL_OK;
}

void fl_cuda_blas_shutdown(void) {
    if (handle) {
        cublasDestroy(handle);
        handle = nullptr;
    }
}

} // extern "C"
