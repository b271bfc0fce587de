/* engine/ops/row_exp.h: the max and the sum of exps of a contiguous f32 row, shared by softmax, cross_entropy
 * and linear_cross_entropy so that all three compute a row's logsumexp with the same bits.
 *
 * Both run in 16 fixed lanes (element j goes to lane j % 16), which GCC vectorises; the lanes are then combined
 * in a fixed order. The result depends on the row alone, never on the thread count or the vector width. The sum
 * is in f64 (the exps in f32, as torch), so the lane split changes it only at f64 rounding level. */
#ifndef FL_ROW_EXP_H
#define FL_ROW_EXP_H

#include <math.h>
#include <stdint.h>

#include "fl_math.h"

enum { ROW_LANES = 16 };

/* max over x[0], x[st], ..., x[(n-1) st] of the non-NaN values (-inf when there are none): a NaN never wins, as
 * `x > m ? x : m`. st: the stride between the row's elements (1: contiguous, the case that vectorises). */
static inline float fl_row_max_strided_f32(const float *x, int64_t n, int64_t st) {
    float lane[ROW_LANES];
    for (int l = 0; l < ROW_LANES; l++) lane[l] = -INFINITY;
    int64_t j = 0;
    for (; j + ROW_LANES <= n; j += ROW_LANES)
        for (int l = 0; l < ROW_LANES; l++) lane[l] = x[(j + l) * st] > lane[l] ? x[(j + l) * st] : lane[l];
    float m = -INFINITY;
    for (int l = 0; l < ROW_LANES; l++) m = lane[l] > m ? lane[l] : m;
    for (; j < n; j++) m = x[j * st] > m ? x[j * st] : m;
    return m;
}
static inline float fl_row_max_f32(const float *x, int64_t n) { return fl_row_max_strided_f32(x, n, 1); }

/* sum over the same elements of exp(x - m): exps in f32 (fl_expf), the sum in f64 */
static inline double fl_row_sum_exp_strided_f32(const float *x, int64_t n, int64_t st, float m) {
    double lane[ROW_LANES];
    for (int l = 0; l < ROW_LANES; l++) lane[l] = 0;
    int64_t j = 0;
    for (; j + ROW_LANES <= n; j += ROW_LANES)
        for (int l = 0; l < ROW_LANES; l++) lane[l] += (double)fl_expf(x[(j + l) * st] - m);
    /* a fixed pairwise tree over the lanes, then the tail in order */
    for (int w = ROW_LANES / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) lane[l] += lane[l + w];
    double s = lane[0];
    for (; j < n; j++) s += (double)fl_expf(x[j * st] - m);
    return s;
}
static inline double fl_row_sum_exp_f32(const float *x, int64_t n, float m) {
    return fl_row_sum_exp_strided_f32(x, n, 1, m);
}

#endif
