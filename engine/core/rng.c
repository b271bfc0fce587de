/* engine/core/rng.c: counter-based random numbers (Philox-4x32-10). A value depends only on
 * (seed, name hash, element index), never on thread count or on how a tensor is split across ranks. */
#include "internal.h"

#include <math.h>
#include <string.h>

#include "fl_math.h"  /* fl_philox, shared with the CUDA kernels */

/* FNV-1a, 64 bit: stable across builds, so a name always picks the same stream. */
uint64_t fl_rng_hash_name(const char *name) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (const unsigned char *p = (const unsigned char *)(name ? name : ""); *p; p++) h = (h ^ *p) * 0x100000001b3ull;
    return h;
}

/* Four words for element i of stream (seed, stream). The stream hash goes into the counter's high words so
 * that different names never share counters; the seed is the key. */
static fl_philox_ctr draw(uint64_t seed, uint64_t stream, uint64_t i) {
    fl_philox_ctr c = {{(uint32_t)i, (uint32_t)(i >> 32), (uint32_t)stream, (uint32_t)(stream >> 32)}};
    return fl_philox(c, (uint32_t)seed, (uint32_t)(seed >> 32));
}

/* Uniform in [0, 1) with 24 (f32) or 53 (f64) random bits. */
static inline double u01_53(uint32_t a, uint32_t b) { return ((double)(((uint64_t)a << 21) ^ (b >> 11))) * 0x1p-53; }

double fl_rng_uniform_at(uint64_t seed, uint64_t stream, uint64_t i) {
    fl_philox_ctr r = draw(seed, stream, i);
    return u01_53(r.c[0], r.c[1]);
}

/* Word e & 3 of draw(seed, stream, e >> 2) for e in [first, first + n): 32 random bits per element at a
 * quarter of a Philox call each. Counters are generated in chunks into a stack buffer by a branch-free loop
 * (it vectorises), then the wanted words are copied out; the words depend only on the element index. */
enum { RNG_CHUNK = 64 };  /* counters per chunk: 1 KiB of words on the stack */

void fl_rng_bits_at(uint64_t seed, uint64_t stream, uint64_t first, int64_t n, uint32_t *out) {
    uint32_t buf[4 * RNG_CHUNK], k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32), s0 = (uint32_t)stream, s1 = (uint32_t)(stream >> 32);
    uint64_t c0 = first >> 2;
    int64_t skip = (int64_t)(first & 3), done = 0;
    while (done < n) {
        int64_t nc = (skip + (n - done) + 3) / 4;
        if (nc > RNG_CHUNK) nc = RNG_CHUNK;
        for (int64_t c = 0; c < nc; c++) {
            uint64_t x = c0 + (uint64_t)c;
            fl_philox_ctr r = fl_philox((fl_philox_ctr){{(uint32_t)x, (uint32_t)(x >> 32), s0, s1}}, k0, k1);
            buf[4 * c] = r.c[0]; buf[4 * c + 1] = r.c[1]; buf[4 * c + 2] = r.c[2]; buf[4 * c + 3] = r.c[3];
        }
        int64_t take = 4 * nc - skip;
        if (take > n - done) take = n - done;
        memcpy(out + done, buf + skip, (size_t)take * sizeof *out);
        done += take;
        c0 += (uint64_t)nc;
        skip = 0;
    }
}

/* Box-Muller on one element's own four words: one normal per element, so any element range is independent. */
double fl_rng_normal_at(uint64_t seed, uint64_t stream, uint64_t i) {
    fl_philox_ctr r = draw(seed, stream, i);
    double u1 = 1.0 - u01_53(r.c[0], r.c[1]); /* (0, 1]: log is finite */
    double u2 = u01_53(r.c[2], r.c[3]);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

static int fill_random(fl_tensor *t, uint64_t seed, const char *name, int64_t off, double a, double b, bool normal) {
    if (fl_check_cpu_data(normal ? "normal_" : "uniform_", t) < 0) return FL_ESTATE;
    if (!fl_is_float_compute(t->dtype) && t->dtype != FL_BF16 && t->dtype != FL_F16)
        return fl_fail(FL_EINVAL, "%s: tensor must be floating point, got %s", normal ? "normal_" : "uniform_", fl_dtype_name(t->dtype));
    if (!fl_tensor_is_contiguous(t))
        return fl_fail(FL_EINVAL, "%s: tensor %s must be contiguous", normal ? "normal_" : "uniform_", fl_shape_str(t));
    uint64_t stream = fl_rng_hash_name(name);
    int64_t n = fl_tensor_numel(t);
    void *p = fl_tensor_data(t);
    int32_t dt = t->dtype;
    #pragma omp parallel for schedule(static) if (n > 4096)
    for (int64_t i = 0; i < n; i++) {
        double x = normal ? a + b * fl_rng_normal_at(seed, stream, (uint64_t)(off + i))
                          : a + (b - a) * fl_rng_uniform_at(seed, stream, (uint64_t)(off + i));
        if (dt == FL_F32) ((float *)p)[i] = (float)x;
        else fl_store_elem(p, dt, i, x);
    }
    return FL_OK;
}

int fl_tensor_normal_(fl_tensor *t, uint64_t seed, const char *name, int64_t off, double mean, double std) {
    return fill_random(t, seed, name, off, mean, std, true);
}

int fl_tensor_uniform_(fl_tensor *t, uint64_t seed, const char *name, int64_t off, double lo, double hi) {
    return fill_random(t, seed, name, off, lo, hi, false);
}
