/* kernels/fl_cuda.h: what the CUDA side of the engine shares. The C entry points of the kernels/ .cu files (callable
 * from the engine .c files, which include this header when built with `make CUDA=1`) and, for nvcc only, the checks
 * that turn CUDA and cuBLAS failures into fl_fail messages quoting the library's own error string.
 * Not reachable from the CPU path yet: no engine file calls these functions, and storage.c still refuses
 * FL_CUDA memory. All pointers are device pointers; `stream` is a cudaStream_t (NULL = the default stream).
 * Every function returns FL_OK or a negative enum fl_status with the message in fl_last_error(). */
#ifndef FL_CUDA_H
#define FL_CUDA_H

#ifdef __cplusplus
#include <cstdint>
extern "C" {
#else
#include <stdbool.h>
#include <stdint.h>
#endif

/* ---- activations (act.cu): n elements, contiguous; the per-element math is kernels/fl_math.h ---- */
/* y = gelu(x): exact erf form, or the tanh approximation (gelu_new / gelu_pytorch_tanh). */
int fl_cuda_gelu_f32(const float *x, float *y, int64_t n, bool tanh_approx, void *stream);
int fl_cuda_gelu_f64(const double *x, double *y, int64_t n, bool tanh_approx, void *stream);
/* dx = dy * gelu'(x); accumulate adds into dx instead of overwriting it. */
int fl_cuda_gelu_backward_f32(const float *x, const float *dy, float *dx, int64_t n, bool tanh_approx, bool accumulate,
                              void *stream);
int fl_cuda_gelu_backward_f64(const double *x, const double *dy, double *dx, int64_t n, bool tanh_approx,
                              bool accumulate, void *stream);
int fl_cuda_silu_f32(const float *x, float *y, int64_t n, void *stream);
int fl_cuda_silu_f64(const double *x, double *y, int64_t n, void *stream);
int fl_cuda_silu_backward_f32(const float *x, const float *dy, float *dx, int64_t n, bool accumulate, void *stream);
int fl_cuda_silu_backward_f64(const double *x, const double *dy, double *dx, int64_t n, bool accumulate, void *stream);

/* ---- cuBLAS (blas.cu): row-major, as the CPU path's cblas calls ---- */
/* C[m, n] = alpha * op(A) op(B) + beta * C, op(A) [m, k], op(B) [k, n]; lda/ldb/ldc are row strides in elements.
 * Plain FP32 math (no TF32), so results stay comparable with the CPU path. */
int fl_cuda_sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                  int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc, void *stream);
/* The same for `batch` independent products, matrix i at a + i * stride_a (and so on). */
int fl_cuda_sgemm_batched(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                          int64_t lda, int64_t stride_a, const float *b, int64_t ldb, int64_t stride_b, float beta,
                          float *c, int64_t ldc, int64_t stride_c, int64_t batch, void *stream);
/* Destroys this thread's cuBLAS handle (made on first use); safe to call when there is none. */
void fl_cuda_blas_shutdown(void);

#ifdef __cplusplus
}
#endif

/* ---- nvcc-only helpers ---- */
#ifdef __CUDACC__
#include <cublas_v2.h>
#include <cuda_runtime.h>

extern "C" {
#include "fsdp.h"
/* engine/core/error.c: the one writer of the thread-local message (internal.h declares it for C). */
int fl_fail(int code, const char *fmt, ...);
}

/* The status an engine caller sees for a CUDA error: out of memory stays ENOMEM, a missing device, driver or
 * kernel image is a request this build/machine cannot do, the rest is a failed call in a bad state. */
static inline int fl_cuda_status(cudaError_t e) {
    switch (e) {
    case cudaErrorMemoryAllocation: return FL_ENOMEM;
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorNoKernelImageForDevice:
    case cudaErrorInvalidDevice: return FL_EUNSUPPORTED;
    case cudaErrorInvalidValue: return FL_EINVAL;
    default: return FL_ESTATE;
    }
}

/* FL_CUDA_CHECK("gelu", cudaMemcpy(...)): returns from the enclosing int function on failure, naming the op,
 * the failed call and CUDA's message. */
#define FL_CUDA_CHECK(op, call)                                                                              \
    do {                                                                                                     \
        cudaError_t fl_e_ = (call);                                                                          \
        if (fl_e_ != cudaSuccess)                                                                            \
            return fl_fail(fl_cuda_status(fl_e_), "%s: %s failed: %s (%s)", (op), #call,                     \
                           cudaGetErrorString(fl_e_), cudaGetErrorName(fl_e_));                              \
    } while (0)

/* After a kernel launch: launch errors (bad configuration, no image for this GPU) are reported here;
 * errors while the kernel runs surface at the next synchronising call. */
#define FL_CUDA_CHECK_LAUNCH(op) FL_CUDA_CHECK(op, cudaGetLastError())

#define FL_CUBLAS_CHECK(op, call)                                                                            \
    do {                                                                                                     \
        cublasStatus_t fl_s_ = (call);                                                                       \
        if (fl_s_ != CUBLAS_STATUS_SUCCESS)                                                                  \
            return fl_fail(fl_s_ == CUBLAS_STATUS_ALLOC_FAILED ? FL_ENOMEM                                   \
                           : fl_s_ == CUBLAS_STATUS_INVALID_VALUE ? FL_EINVAL                                \
                           : fl_s_ == CUBLAS_STATUS_NOT_SUPPORTED || fl_s_ == CUBLAS_STATUS_ARCH_MISMATCH    \
                               ? FL_EUNSUPPORTED                                                             \
                               : FL_ESTATE,                                                                  \
                           "%s: %s failed: %s (%s)", (op), #call, cublasGetStatusString(fl_s_),              \
                           cublasGetStatusName(fl_s_));                                                      \
    } while (0)
#endif

#endif
