/* kernels/act.cu: GELU (exact and tanh) and SiLU forward and backward as elementwise CUDA kernels. The math
 * per element is kernels/fl_math.h, the same functions engine/ops/ops_act.c runs on the CPU; this file only
 * launches it. Not reachable from the CPU path yet: the engine has no CUDA storage, so nothing calls these
 * functions (their declarations are in kernels/fl_cuda.h). */
#include "fl_cuda.h"
#include "fl_math.h"

namespace {

enum { BLOCK = 256 };
/* Grid-stride loops: enough blocks to fill any current GPU, each thread then strides over the rest. */
enum { MAX_BLOCKS = 65535 * 4 };

/* Overloads, so one template serves f32 and f64 with each precision's own formula. */
__device__ __forceinline__ float gelu(float x, bool t) { return t ? fl_gelu_tanh_f(x) : fl_gelu_erf_f(x); }
__device__ __forceinline__ double gelu(double x, bool t) { return t ? fl_gelu_tanh_d(x) : fl_gelu_erf_d(x); }
__device__ __forceinline__ float gelu_grad(float x, bool t) {
    return t ? fl_gelu_tanh_grad_f(x) : fl_gelu_erf_grad_f(x);
}
__device__ __forceinline__ double gelu_grad(double x, bool t) {
    return t ? fl_gelu_tanh_grad_d(x) : fl_gelu_erf_grad_d(x);
}
__device__ __forceinline__ float silu(float x) { return fl_silu_f(x); }
__device__ __forceinline__ double silu(double x) { return fl_silu_d(x); }
__device__ __forceinline__ float silu_grad(float x) { return fl_silu_grad_f(x); }
__device__ __forceinline__ double silu_grad(double x) { return fl_silu_grad_d(x); }

template <typename T>
__global__ void gelu_kernel(const T *__restrict__ x, T *__restrict__ y, int64_t n, bool tanh_approx) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        y[i] = gelu(x[i], tanh_approx);
}

template <typename T>
__global__ void gelu_backward_kernel(const T *__restrict__ x, const T *__restrict__ dy, T *__restrict__ dx, int64_t n,
                                     bool tanh_approx, bool acc) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        T g = dy[i] * gelu_grad(x[i], tanh_approx);
        dx[i] = acc ? dx[i] + g : g;
    }
}

template <typename T>
__global__ void silu_kernel(const T *__restrict__ x, T *__restrict__ y, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        y[i] = silu(x[i]);
}

template <typename T>
__global__ void silu_backward_kernel(const T *__restrict__ x, const T *__restrict__ dy, T *__restrict__ dx, int64_t n,
                                     bool acc) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        T g = dy[i] * silu_grad(x[i]);
        dx[i] = acc ? dx[i] + g : g;
    }
}

unsigned grid_for(int64_t n) {
    int64_t b = (n + BLOCK - 1) / BLOCK;
    return (unsigned)(b < (int64_t)MAX_BLOCKS ? b : (int64_t)MAX_BLOCKS);
}

int check_args(const char *op, int64_t n, const void *x, const void *y) {
    if (n < 0) return fl_fail(FL_EINVAL, "%s: negative element count %lld", op, (long long)n);
    if (n > 0 && (!x || !y)) return fl_fail(FL_EINVAL, "%s: NULL device pointer for %lld elements", op, (long long)n);
    return FL_OK;
}

template <typename T>
int launch_gelu(const char *op, const T *x, T *y, int64_t n, bool t, void *stream) {
    int rc = check_args(op, n, x, y);
    if (rc < 0 || n == 0) return rc;
    gelu_kernel<T><<<grid_for(n), BLOCK, 0, (cudaStream_t)stream>>>(x, y, n, t);
    FL_CUDA_CHECK_LAUNCH(op);
    return FL_OK;
}

template <typename T>
int launch_gelu_backward(const char *op, const T *x, const T *dy, T *dx, int64_t n, bool t, bool acc, void *stream) {
    int rc = check_args(op, n, x, dx);
    if (rc == FL_OK) rc = check_args(op, n, dy, dx);
    if (rc < 0 || n == 0) return rc;
    gelu_backward_kernel<T><<<grid_for(n), BLOCK, 0, (cudaStream_t)stream>>>(x, dy, dx, n, t, acc);
    FL_CUDA_CHECK_LAUNCH(op);
    return FL_OK;
}

template <typename T>
int launch_silu(const char *op, const T *x, T *y, int64_t n, void *stream) {
    int rc = check_args(op, n, x, y);
    if (rc < 0 || n == 0) return rc;
    silu_kernel<T><<<grid_for(n), BLOCK, 0, (cudaStream_t)stream>>>(x, y, n);
    FL_CUDA_CHECK_LAUNCH(op);
    return FL_OK;
}

template <typename T>
int launch_silu_backward(const char *op, const T *x, const T *dy, T *dx, int64_t n, bool acc, void *stream) {
    int rc = check_args(op, n, x, dx);
    if (rc == FL_OK) rc = check_args(op, n, dy, dx);
    if (rc < 0 || n == 0) return rc;
    silu_backward_kernel<T><<<grid_for(n), BLOCK, 0, (cudaStream_t)stream>>>(x, dy, dx, n, acc);
    FL_CUDA_CHECK_LAUNCH(op);
    return FL_OK;
}

} // namespace

extern "C" {

int fl_cuda_gelu_f32(const float *x, float *y, int64_t n, bool tanh_approx, void *stream) {
    return launch_gelu("gelu (cuda, f32)", x, y, n, tanh_approx, stream);
}
int fl_cuda_gelu_f64(const double *x, double *y, int64_t n, bool tanh_approx, void *stream) {
    return launch_gelu("gelu (cuda, f64)", x, y, n, tanh_approx, stream);
}
int fl_cuda_gelu_backward_f32(const float *x, const float *dy, float *dx, int64_t n, bool tanh_approx, bool accumulate,
                              void *stream) {
    return launch_gelu_backward("gelu backward (cuda, f32)", x, dy, dx, n, tanh_approx, accumulate, stream);
}
int fl_cuda_gelu_backward_f64(const double *x, const double *dy, double *dx, int64_t n, bool tanh_approx,
                              bool accumulate, void *stream) {
    return launch_gelu_backward("gelu backward (cuda, f64)", x, dy, dx, n, tanh_approx, accumulate, stream);
}
int fl_cuda_silu_f32(const float *x, float *y, int64_t n, void *stream) {
    return launch_silu("silu (cuda, f32)", x, y, n, stream);
}
int fl_cuda_silu_f64(const double *x, double *y, int64_t n, void *stream) {
    return launch_silu("silu (cuda, f64)", x, y, n, stream);
}
int fl_cuda_silu_backward_f32(const float *x, const float *dy, float *dx, int64_t n, bool accumulate, void *stream) {
    return launch_silu_backward("silu backward (cuda, f32)", x, dy, dx, n, accumulate, stream);
}
int fl_cuda_silu_backward_f64(const double *x, const double *dy, double *dx, int64_t n, bool accumulate, void *stream) {
    return launch_silu_backward("silu backward (cuda, f64)", x, dy, dx, n, accumulate, stream);
}

} // extern "C"
