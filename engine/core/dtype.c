/* engine/core/dtype.c: element sizes and names, bf16/f16 bit conversions, and bulk conversion between dtypes. */
#include "internal.h"

#include <math.h>

static const size_t sizes[FL_NDTYPES] = {4, 8, 2, 2, 4, 8, 1, 1};
static const char *const names[FL_NDTYPES] = {"f32", "f64", "bf16", "f16", "i32", "i64", "u8", "bool"};

size_t fl_dtype_size(int32_t dt) { return dt >= 0 && dt < FL_NDTYPES ? sizes[dt] : 0; }
const char *fl_dtype_name(int32_t dt) { return dt >= 0 && dt < FL_NDTYPES ? names[dt] : "?"; }
int32_t fl_dtype_from_name(const char *name) {
    for (int32_t i = 0; i < FL_NDTYPES; i++)
        if (strcmp(name, names[i]) == 0) return i;
    return -1;
}

float fl_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t fl_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                          /* round to nearest even */
    return (uint16_t)(u >> 16);
}

float fl_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0) {
        if (man == 0) u = sign;
        else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400u)) { man <<= 1; exp--; }
            u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) u = sign | 0x7f800000u | (man << 13);
    else u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t fl_f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    int32_t exp = (int32_t)((u >> 23) & 0xff) - 127 + 15;
    uint32_t man = u & 0x7fffffu;
    if (((u >> 23) & 0xff) == 0xff) return (uint16_t)(sign | 0x7c00u | (man ? 0x200u : 0)); /* inf, NaN */
    if (exp >= 31) return (uint16_t)(sign | 0x7c00u);                                        /* overflow */
    if (exp <= 0) {                                                                          /* subnormal */
        if (exp < -10) return (uint16_t)sign;
        man |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - exp);
        uint32_t half = 1u << (shift - 1), rest = man & ((1u << shift) - 1);
        uint32_t r = man >> shift;
        if (rest > half || (rest == half && (r & 1u))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = ((uint32_t)exp << 10) | (man >> 13), rest = man & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (r & 1u))) r++; /* may carry into the exponent: still right */
    return (uint16_t)(sign | r);
}

static double load(const void *p, int32_t dt, int64_t i) {
    switch (dt) {
    case FL_F32: return ((const float *)p)[i];
    case FL_F64: return ((const double *)p)[i];
    case FL_BF16: return fl_bf16_to_f32(((const uint16_t *)p)[i]);
    case FL_F16: return fl_f16_to_f32(((const uint16_t *)p)[i]);
    case FL_I32: return ((const int32_t *)p)[i];
    case FL_I64: return (double)((const int64_t *)p)[i];
    case FL_U8: return ((const uint8_t *)p)[i];
    case FL_BOOL: return ((const uint8_t *)p)[i] != 0;
    }
    return 0;
}

static void store(void *p, int32_t dt, int64_t i, double v) {
    switch (dt) {
    case FL_F32: ((float *)p)[i] = (float)v; break;
    case FL_F64: ((double *)p)[i] = v; break;
    case FL_BF16: ((uint16_t *)p)[i] = fl_f32_to_bf16((float)v); break;
    case FL_F16: ((uint16_t *)p)[i] = fl_f32_to_f16((float)v); break;
    case FL_I32: ((int32_t *)p)[i] = (int32_t)v; break;
    case FL_I64: ((int64_t *)p)[i] = (int64_t)v; break;
    case FL_U8: ((uint8_t *)p)[i] = (uint8_t)v; break;
    case FL_BOOL: ((uint8_t *)p)[i] = v != 0; break;
    }
}

double fl_load_elem(const void *p, int32_t dt, int64_t i) { return load(p, dt, i); }
void fl_store_elem(void *p, int32_t dt, int64_t i, double v) { store(p, dt, i, v); }

/* The hot pairs (f32 <-> bf16/f16/f64, i64 <-> i32) get their own loops; i64 never goes through double. */
void fl_convert(const void *src, int32_t sd, void *dst, int32_t dd, int64_t n) {
    if (sd == dd) { memcpy(dst, src, (size_t)n * fl_dtype_size(sd)); return; }
    const float *fs = src;
    float *fd = dst;
#define PAR _Pragma("omp parallel for schedule(static) if (n > FL_PAR_MIN)")
    if (sd == FL_F32 && dd == FL_BF16) { uint16_t *d = dst; PAR for (int64_t i = 0; i < n; i++) d[i] = fl_f32_to_bf16(fs[i]); }
    else if (sd == FL_BF16 && dd == FL_F32) { const uint16_t *s = src; PAR for (int64_t i = 0; i < n; i++) fd[i] = fl_bf16_to_f32(s[i]); }
    else if (sd == FL_F32 && dd == FL_F16) { uint16_t *d = dst; PAR for (int64_t i = 0; i < n; i++) d[i] = fl_f32_to_f16(fs[i]); }
    else if (sd == FL_F16 && dd == FL_F32) { const uint16_t *s = src; PAR for (int64_t i = 0; i < n; i++) fd[i] = fl_f16_to_f32(s[i]); }
    else if (sd == FL_F32 && dd == FL_F64) { double *d = dst; PAR for (int64_t i = 0; i < n; i++) d[i] = fs[i]; }
    else if (sd == FL_F64 && dd == FL_F32) { const double *s = src; PAR for (int64_t i = 0; i < n; i++) fd[i] = (float)s[i]; }
    else if (sd == FL_I64 && dd == FL_I32) { const int64_t *s = src; int32_t *d = dst; for (int64_t i = 0; i < n; i++) d[i] = (int32_t)s[i]; }
    else if (sd == FL_I32 && dd == FL_I64) { const int32_t *s = src; int64_t *d = dst; for (int64_t i = 0; i < n; i++) d[i] = s[i]; }
    else for (int64_t i = 0; i < n; i++) store(dst, dd, i, load(src, sd, i));
#undef PAR
}
