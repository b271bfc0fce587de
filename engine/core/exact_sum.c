/* engine/core/exact_sum.c: sums of squares accumulated exactly, so that the gradient norm does not depend on how
 * the parameters are split (one process, DDP, FSDP with any plan or world size give the same bits). Combining
 * accumulators across ranks is in comm.c terms (one all-gather); nothing here communicates.
 *
 * The accumulator is an unsigned fixed-point integer of FL_EXACT_SUM_LIMBS 64-bit limbs (limb 0 least
 * significant) whose unit is 2^-2148, the square of the smallest f64 subnormal, plus one word of flags
 * (NaN seen, Inf seen). The square of any f64 is an integer multiple of that unit, and the largest (~2^2048)
 * leaves 92 bits of headroom, so every add is exact and addition is associative: the only rounding is the
 * final one, to the nearest double.
 *
 * f32 (and bf16/f16, exact in f32) squares go through per-thread buckets indexed by the f32 exponent: an f32
 * x = M * 2^(e-150), M < 2^24, has x^2 = M^2 * 2^(2e-300), so bucket e sums the integers M^2 < 2^48, and
 * each bucket is shifted into the limbs once at the end. That keeps the per-element cost to an integer
 * multiply and add. */
#include "internal.h"

#include <math.h>

enum { FLAG_NAN = 1, FLAG_INF = 2 };
enum { FLAGS = FL_EXACT_SUM_LIMBS };          /* index of the flag word in the accumulator tensor */
/* Unit 2^-2148: an f32 of biased exponent e (e >= 1; subnormals use e = 1) squared is M^2 * 2^(2e + 1848) units. */
enum { F32_SHIFT0 = 1848 };
/* Elements per bucket pass: each u64 bucket then takes at most 2^16 squares below 2^48 and cannot overflow. */
enum { PASS = 65536 };

typedef unsigned __int128 u128;

/* acc += v * 2^shift (shift in bits above the unit). */
static void add_shifted(uint64_t *acc, u128 v, int64_t shift) {
    if (v == 0) return;
    int64_t limb = shift / 64, bit = shift % 64;
    uint64_t w[3] = {(uint64_t)v, (uint64_t)(v >> 64), 0};
    if (bit) {
        w[2] = w[1] >> (64 - bit);
        w[1] = (w[1] << bit) | (w[0] >> (64 - bit));
        w[0] <<= bit;
    }
    uint64_t carry = 0;
    for (int64_t i = limb; i < FL_EXACT_SUM_LIMBS; i++) {
        uint64_t add = i - limb < 3 ? w[i - limb] : 0;
        if (i - limb >= 3 && carry == 0) break;
        u128 s = (u128)acc[i] + add + carry;
        acc[i] = (uint64_t)s;
        carry = (uint64_t)(s >> 64);
    }
}

/* a += b over the limbs (the flag words are the callers'). */
static void add_limbs(uint64_t *a, const uint64_t *b) {
    uint64_t carry = 0;
    for (int i = 0; i < FL_EXACT_SUM_LIMBS; i++) {
        u128 s = (u128)a[i] + b[i] + carry;
        a[i] = (uint64_t)s;
        carry = (uint64_t)(s >> 64);
    }
}

static int check_acc(const char *op, const fl_tensor *acc) {
    if (!acc) return fl_fail(FL_EINVAL, "%s: accumulator is NULL", op);
    if (acc->dtype != FL_I64 || fl_tensor_numel(acc) != FL_EXACT_SUM_SIZE || !fl_tensor_is_contiguous(acc))
        return fl_fail(FL_EINVAL, "%s: accumulator must be a contiguous i64 tensor of %d elements, got %s %s", op,
                       (int)FL_EXACT_SUM_SIZE, fl_dtype_name(acc->dtype), fl_shape_str(acc));
    return fl_check_cpu_data(op, acc);
}

/* Squares of n f32 values given by their bit patterns (bf16 is the top half of an f32; f16 is converted). */
static inline uint32_t f32_bits_at(const void *p, int32_t dt, int64_t i) {
    uint32_t u;
    if (dt == FL_F32) memcpy(&u, (const float *)p + i, 4);
    else if (dt == FL_BF16) u = (uint32_t)((const uint16_t *)p)[i] << 16;
    else { float f = fl_f16_to_f32(((const uint16_t *)p)[i]); memcpy(&u, &f, 4); }
    return u;
}

/* One element into bucket set b: bucket index max(e, 1), value M^2 (M with its implicit bit). */
#define SQUARE_INTO(b, u)                                                       \
    do {                                                                        \
        uint32_t e_ = ((u) >> 23) & 0xff, m_ = (u) & 0x7fffff;                  \
        if (e_ == 0xff) flags |= m_ ? FLAG_NAN : FLAG_INF;                      \
        else {                                                                  \
            uint64_t mm_ = e_ ? (m_ | 0x800000u) : m_;                          \
            (b)[e_ ? e_ : 1] += mm_ * mm_;                                      \
        }                                                                       \
    } while (0)

static void add_f32_squares(uint64_t *acc, const void *p, int32_t dt, int64_t n) {
    uint32_t flags = 0;
    #pragma omp parallel if (n > FL_PAR_MIN) reduction(|:flags)
    {
        u128 total[256] = {0};
        /* four bucket sets, one per element of a group of four: neighbours usually share an exponent, and
         * with one set each add would wait for the previous store to the same bucket */
        uint64_t b0[256], b1[256], b2[256], b3[256];
        int64_t passes = (n + PASS - 1) / PASS;
        #pragma omp for schedule(static)
        for (int64_t ps = 0; ps < passes; ps++) {
            memset(b0, 0, sizeof b0); memset(b1, 0, sizeof b1);
            memset(b2, 0, sizeof b2); memset(b3, 0, sizeof b3);
            int64_t lo = ps * PASS, hi = fl_min64(n, lo + PASS), i = lo;
            if (dt == FL_F32) {
                const uint32_t *x = (const uint32_t *)p;
                for (; i + 4 <= hi; i += 4) {
                    uint32_t u0 = x[i], u1 = x[i + 1], u2 = x[i + 2], u3 = x[i + 3];
                    SQUARE_INTO(b0, u0); SQUARE_INTO(b1, u1); SQUARE_INTO(b2, u2); SQUARE_INTO(b3, u3);
                }
            }
            for (; i < hi; i++) { uint32_t u = f32_bits_at(p, dt, i); SQUARE_INTO(b0, u); }
            for (int b = 1; b < 255; b++) total[b] += (u128)b0[b] + b1[b] + b2[b] + b3[b];
        }
        uint64_t local[FL_EXACT_SUM_LIMBS] = {0};
        for (int b = 1; b < 255; b++) add_shifted(local, total[b], F32_SHIFT0 + 2 * (int64_t)b);
        #pragma omp critical(fl_exact_sum)
        add_limbs(acc, local);   /* integer addition: the order the threads arrive in does not matter */
    }
    acc[FLAGS] |= flags;
}

/* f64 (tests, gradcheck): x = M * 2^(e-1075), M < 2^53, x^2 = M^2 * 2^(2e-2150) = M^2 * 2^(2e-2) units. */
static void add_f64_squares(uint64_t *acc, const double *p, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint64_t u;
        memcpy(&u, p + i, 8);
        uint64_t e = (u >> 52) & 0x7ff, m = u & 0xfffffffffffffull;
        if (e == 0x7ff) { acc[FLAGS] |= m ? FLAG_NAN : FLAG_INF; continue; }
        uint64_t mm = e ? (m | (1ull << 52)) : m;
        add_shifted(acc, (u128)mm * mm, 2 * (int64_t)(e ? e : 1) - 2);
    }
}

int fl_exact_sum_add_squares(fl_tensor *acc, const fl_tensor *t) {
    if (check_acc("exact_sum_add_squares", acc) < 0) return FL_EINVAL;
    if (!t) return fl_fail(FL_EINVAL, "exact_sum_add_squares: tensor is NULL");
    int32_t dt = t->dtype;
    if (dt != FL_F32 && dt != FL_F64 && dt != FL_BF16 && dt != FL_F16)
        return fl_fail(FL_EINVAL, "exact_sum_add_squares: expected a floating-point tensor, got %s", fl_dtype_name(dt));
    if (fl_check_cpu_data("exact_sum_add_squares", t) < 0) return FL_EINVAL;
    fl_tensor *c = fl_contiguous(t);
    if (!c) return FL_ENOMEM;
    uint64_t *a = fl_tensor_data(acc);
    int64_t n = fl_tensor_numel(c);
    if (dt == FL_F64) add_f64_squares(a, fl_tensor_data(c), n);
    else add_f32_squares(a, fl_tensor_data(c), dt, n);
    fl_tensor_release(c);
    return FL_OK;
}

int fl_exact_sum_merge(fl_tensor *acc, const fl_tensor *other) {
    if (check_acc("exact_sum_merge", acc) < 0 || check_acc("exact_sum_merge", other) < 0) return FL_EINVAL;
    uint64_t *a = fl_tensor_data(acc);
    const uint64_t *b = fl_tensor_data(other);
    add_limbs(a, b);
    a[FLAGS] |= b[FLAGS];
    return FL_OK;
}

/* Bit `i` of the fixed-point number. */
static inline int bit_at(const uint64_t *a, int64_t i) { return (int)((a[i / 64] >> (i % 64)) & 1); }

/* Any bit set below bit `i`. */
static bool any_below(const uint64_t *a, int64_t i) {
    if (i <= 0) return false;
    for (int64_t l = 0; l < i / 64; l++) if (a[l]) return true;
    return (i % 64) && (a[i / 64] & ((1ull << (i % 64)) - 1));
}

/* The value rounded once to the nearest double (ties to even); NaN when a NaN was added, +Inf for an Inf. */
double fl_exact_sum_value(const fl_tensor *acc) {
    if (check_acc("exact_sum_value", acc) < 0) return NAN;
    const uint64_t *a = fl_tensor_data(acc);
    if (a[FLAGS] & FLAG_NAN) return NAN;
    if (a[FLAGS] & FLAG_INF) return INFINITY;
    int64_t top = -1;                          /* index of the most significant set bit */
    for (int64_t l = FL_EXACT_SUM_LIMBS - 1; l >= 0 && top < 0; l--)
        if (a[l]) top = l * 64 + 63 - __builtin_clzll(a[l]);
    if (top < 0) return 0.0;
    /* keep 53 bits from the top, but none below 2^-1074 (bit 1074 of the unit 2^-2148): subnormal results */
    int64_t low = fl_max64(top - 52, 1074);   /* low > top: below the smallest subnormal, mant stays 0 */
    uint64_t mant = 0;
    for (int64_t i = top; i >= low; i--) mant = (mant << 1) | (uint64_t)bit_at(a, i);
    int half = low >= 1 ? bit_at(a, low - 1) : 0;
    bool sticky = any_below(a, low - 1);
    if (half && (sticky || (mant & 1))) mant++;
    return ldexp((double)mant, (int)(low - 2148));   /* exact: mant fits in 54 bits; overflow gives +Inf */
}

/* Sums the accumulators of every rank of c into acc on every rank: one all-gather, then integer adds. */
int fl_exact_sum_all_reduce(fl_comm *c, fl_tensor *acc) {
    if (check_acc("exact_sum_all_reduce", acc) < 0) return FL_EINVAL;
    int32_t world = fl_comm_size(c);
    if (world <= 1) return FL_OK;
    int64_t shape[2] = {world, FL_EXACT_SUM_SIZE};
    fl_tensor *all = fl_tensor_empty(2, shape, FL_I64, FL_CPU);
    if (!all) return FL_ENOMEM;
    int rc = fl_all_gather(c, all, acc);
    if (rc == FL_OK) {
        fl_tensor_fill_(acc, 0);
        for (int32_t r = 0; r < world && rc == FL_OK; r++) {
            fl_tensor *row = fl_narrow(all, 0, r, 1);
            rc = row ? fl_exact_sum_merge(acc, row) : FL_ENOMEM;
            fl_tensor_release(row);
        }
    }
    fl_tensor_release(all);
    return rc;
}

double fl_sum_squares(const fl_tensor *t) {
    int64_t n = FL_EXACT_SUM_SIZE;
    fl_tensor *acc = fl_tensor_zeros(1, &n, FL_I64, FL_CPU);
    if (!acc) return NAN;
    double v = fl_exact_sum_add_squares(acc, t) < 0 ? NAN : fl_exact_sum_value(acc);
    fl_tensor_release(acc);
    return v;
}
