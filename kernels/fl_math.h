/* kernels/fl_math.h: scalar math of activations and norms, shared by the CPU loops (engine/ops_act.c,
 * engine/ops_norm.c) and the CUDA kernels, so both sides compute the same formula. f32 and f64 variants;
 * the f32 ones compute in f32 like PyTorch's CPU kernels (same formulas up to rounding). */
#ifndef FL_MATH_H
#define FL_MATH_H

#ifdef __CUDACC__
#define FL_HD __host__ __device__ __forceinline__
#else
#include <math.h>
#define FL_HD static inline
#endif

/* GELU, exact: 0.5 x (1 + erf(x / sqrt 2)). */
FL_HD float fl_gelu_erf_f(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f)); }
FL_HD double fl_gelu_erf_d(double x) { return 0.5 * x * (1.0 + erf(x * 0.70710678118654752440)); }
/* d/dx: Phi(x) + x phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi). */
FL_HD float fl_gelu_erf_grad_f(float x) {
    float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752440f));
    return cdf + x * 0.39894228040143267794f * expf(-0.5f * x * x);
}
FL_HD double fl_gelu_erf_grad_d(double x) {
    double cdf = 0.5 * (1.0 + erf(x * 0.70710678118654752440));
    return cdf + x * 0.39894228040143267794 * exp(-0.5 * x * x);
}

/* GELU, tanh approximation (GPT-2's gelu_new, torch approximate="tanh"):
 * 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3). Computed as x * sigmoid(2u), the same function
 * (1 + tanh(u) = 2 sigmoid(2u)): one expf instead of libm's tanhf (about twice as slow here), and no
 * cancellation in 1 + tanh(u) for u << 0.
 * d/dx = s + 2 x s (1 - s) u', s = sigmoid(2u). */
FL_HD float fl_gelu_tanh_f(float x) {
    float u = 0.79788456080286535588f * (x + 0.044715f * x * x * x);
    return x / (1.0f + expf(-2.0f * u));
}
FL_HD double fl_gelu_tanh_d(double x) {
    double u = 0.79788456080286535588 * (x + 0.044715 * x * x * x);
    return 0.5 * x * (1.0 + tanh(u));
}
FL_HD float fl_gelu_tanh_grad_f(float x) {
    float u = 0.79788456080286535588f * (x + 0.044715f * x * x * x), s = 1.0f / (1.0f + expf(-2.0f * u));
    float du = 0.79788456080286535588f * (1.0f + 3.0f * 0.044715f * x * x);
    return s + 2.0f * x * s * (1.0f - s) * du;
}
FL_HD double fl_gelu_tanh_grad_d(double x) {
    double u = 0.79788456080286535588 * (x + 0.044715 * x * x * x), t = tanh(u);
    double du = 0.79788456080286535588 * (1.0 + 3.0 * 0.044715 * x * x);
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du;
}

/* SiLU: x sigmoid(x); d/dx = s (1 + x (1 - s)). */
FL_HD float fl_sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }
FL_HD double fl_sigmoid_d(double x) { return 1.0 / (1.0 + exp(-x)); }
FL_HD float fl_silu_f(float x) { return x / (1.0f + expf(-x)); }
FL_HD double fl_silu_d(double x) { return x / (1.0 + exp(-x)); }
FL_HD float fl_silu_grad_f(float x) { float s = fl_sigmoid_f(x); return s * (1.0f + x * (1.0f - s)); }
FL_HD double fl_silu_grad_d(double x) { double s = fl_sigmoid_d(x); return s * (1.0 + x * (1.0 - s)); }

/* Norm backward per element, given the row statistics (xhat = (x - mean) * rstd, g = dy * w):
 * LayerNorm dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); RMSNorm is the same without the mean(g) term. */
FL_HD double fl_norm_dx(double g, double xhat, double rstd, double mean_g, double mean_gx) {
    return rstd * (g - mean_g - xhat * mean_gx);
}

#endif
