/* kernels/fl_math.h: scalar math of activations and norms, and the Philox generator, shared by the CPU loops
 * (engine/ops/ops_act.c, engine/ops/ops_norm.c, engine/core/rng.c) and the CUDA kernels, so both sides compute
 * the same formula. f32 and f64 variants; the f32 ones compute in f32 like PyTorch's CPU kernels (same formulas up
 * to rounding). */
#ifndef FL_MATH_H
#define FL_MATH_H

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define FL_HD __host__ __device__ __forceinline__
#else
#define FL_HD static inline
#endif

/* ---- exp in f32, vectorisable ----
 * libm's expf is a call per element, so loops calling it never vectorise. This is Cephes' expf
 * (x = k ln2 + r, |r| <= ln2/2 with ln2 split in two constants, a degree-7 polynomial for e^r, 2^k from the
 * exponent bits) with every branch written as an integer bit-select: GCC if-converts float selects only
 * when nothing trapping can be sunk into them (-ftrapping-math), so a plain `?:` blocks vectorisation.
 * Max relative error 8.2e-8 (~1.4 ulp) on [-87.2, 88.7]; below -87.3 it returns 0 (true results there
 * are subnormal), above 88.72 +inf, NaN stays NaN. A pure function of x: same bits for any thread count
 * or vector width. */
FL_HD float fl_i2f(int32_t b) {
#ifdef __CUDA_ARCH__   /* device pass of nvcc; its host pass and plain C take the union */
    return __int_as_float(b);
#else
    union { int32_t i; float f; } u;
    u.i = b;
    return u.f;
#endif
}
FL_HD int32_t fl_f2i(float f) {
#ifdef __CUDA_ARCH__
    return __float_as_int(f);
#else
    union { int32_t i; float f; } u;
    u.f = f;
    return u.i;
#endif
}
/* a where mask m is all ones, b where it is zero */
FL_HD float fl_select(int32_t m, float a, float b) { return fl_i2f((fl_f2i(a) & m) | (fl_f2i(b) & ~m)); }
FL_HD float fl_expf(float x) {
    int32_t under = -(int32_t)(x < -87.3f), over = -(int32_t)(x > 88.72f), nan = -(int32_t)(x != x);
    float xc = fl_select(under, -87.3f, fl_select(over, 88.72f, fl_select(nan, 0.0f, x)));
    float t = xc * 1.44269504088896341f + 12582912.0f;   /* 1.5 * 2^23: t's low mantissa bits hold round(x log2 e) */
    float k = t - 12582912.0f;
    float r = xc - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    int32_t ki = fl_f2i(t) - 0x4B400000, k1 = ki >> 1;   /* ki in [-126, 128]: 2^ki = 2^k1 2^(ki-k1), both normal */
    float y = (p * r * r + r + 1.0f) * fl_i2f((k1 + 127) << 23) * fl_i2f((ki - k1 + 127) << 23);
    return fl_select(under, 0.0f, fl_select(over, INFINITY, fl_select(nan, x, y)));
}

/* GELU, exact: 0.5 x (1 + erf(x / sqrt 2)). */
FL_HD float fl_gelu_erf_f(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f)); }
FL_HD double fl_gelu_erf_d(double x) { return 0.5 * x * (1.0 + erf(x * 0.70710678118654752440)); }
/* d/dx: Phi(x) + x phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi). */
FL_HD float fl_gelu_erf_grad_f(float x) {
    float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752440f));
    return cdf + x * 0.39894228040143267794f * fl_expf(-0.5f * x * x);
}
FL_HD double fl_gelu_erf_grad_d(double x) {
    double cdf = 0.5 * (1.0 + erf(x * 0.70710678118654752440));
    return cdf + x * 0.39894228040143267794 * exp(-0.5 * x * x);
}

/* GELU, tanh approximation (GPT-2's gelu_new, torch approximate="tanh"):
 * 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3). Computed as x * sigmoid(2u), the same function
 * (1 + tanh(u) = 2 sigmoid(2u)): one exp instead of libm's tanhf (a slow scalar call), and no
 * cancellation in 1 + tanh(u) for u << 0.
 * d/dx = s + 2 x s (1 - s) u', s = sigmoid(2u). */
FL_HD float fl_gelu_tanh_f(float x) {
    float u = 0.79788456080286535588f * (x + 0.044715f * x * x * x);
    return x / (1.0f + fl_expf(-2.0f * u));
}
FL_HD double fl_gelu_tanh_d(double x) {
    double u = 0.79788456080286535588 * (x + 0.044715 * x * x * x);
    return 0.5 * x * (1.0 + tanh(u));
}
FL_HD float fl_gelu_tanh_grad_f(float x) {
    float u = 0.79788456080286535588f * (x + 0.044715f * x * x * x), s = 1.0f / (1.0f + fl_expf(-2.0f * u));
    float du = 0.79788456080286535588f * (1.0f + 3.0f * 0.044715f * x * x);
    return s + 2.0f * x * s * (1.0f - s) * du;
}
FL_HD double fl_gelu_tanh_grad_d(double x) {
    double u = 0.79788456080286535588 * (x + 0.044715 * x * x * x), t = tanh(u);
    double du = 0.79788456080286535588 * (1.0 + 3.0 * 0.044715 * x * x);
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du;
}

/* SiLU: x sigmoid(x); d/dx = s (1 + x (1 - s)). */
FL_HD float fl_sigmoid_f(float x) { return 1.0f / (1.0f + fl_expf(-x)); }
FL_HD double fl_sigmoid_d(double x) { return 1.0 / (1.0 + exp(-x)); }
FL_HD float fl_silu_f(float x) { return x / (1.0f + fl_expf(-x)); }
FL_HD double fl_silu_d(double x) { return x / (1.0 + exp(-x)); }
FL_HD float fl_silu_grad_f(float x) { float s = fl_sigmoid_f(x); return s * (1.0f + x * (1.0f - s)); }
FL_HD double fl_silu_grad_d(double x) { double s = fl_sigmoid_d(x); return s * (1.0 + x * (1.0 - s)); }

/* Norm backward per element, given the row statistics (xhat = (x - mean) * rstd, g = dy * w):
 * LayerNorm dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); RMSNorm is the same without the mean(g) term. */
FL_HD double fl_norm_dx(double g, double xhat, double rstd, double mean_g, double mean_gx) {
    return rstd * (g - mean_g - xhat * mean_gx);
}

/* ---- Philox4x32-10 (Salmon et al., SC'11): counter (4 words) x key (2 words) -> 4 random words ----
 * Branch-free 32x32->64 multiplies, so a loop over counters vectorises (one mask word per element of
 * attention dropout stays cheap) and a CUDA thread computes the same words. */
typedef struct { uint32_t c[4]; } fl_philox_ctr;

FL_HD fl_philox_ctr fl_philox(fl_philox_ctr ctr, uint32_t k0, uint32_t k1) {
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)0xD2511F53u * ctr.c[0], p1 = (uint64_t)0xCD9E8D57u * ctr.c[2];
        fl_philox_ctr n = {{(uint32_t)(p1 >> 32) ^ ctr.c[1] ^ k0, (uint32_t)p1, (uint32_t)(p0 >> 32) ^ ctr.c[3] ^ k1, (uint32_t)p0}};
        ctr = n;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return ctr;
}

#endif
