/* engine/dist/reduce.c: the reduction behind all_reduce and reduce_scatter, an all-to-all of chunks then the
 * sum/avg/max in rank order. Argument checks are comm.c's, the thread that runs it comm_queue.c's, MPI comm_mpi.c's.
 *
 * Reductions are deterministic and the same for all_reduce and reduce_scatter: each rank receives its chunk from
 * every rank (all-to-all) and sums them in rank order 0, 1, ..., N-1 (bf16/f16 in f32, rounded once at the end;
 * avg divides that sum by N). An element of all_reduce therefore has the same bits as the same element of a
 * reduce_scatter, whatever MPI's own algorithms are. */
#include "comm_internal.h"

/* The bf16/f16 accumulator of the communication thread (a float per element of one chunk), grown as needed and
 * kept. The receive buffer (every rank's chunk: a whole unit's gradient under FSDP) comes from the caching
 * allocator for each reduction and goes back after, counted as "other": at the end of backward, when the root
 * unit's gradient is reduced, it reuses the pages the freed activations left instead of holding its own. */
static void *scratch_acc = NULL;
static size_t scratch_acc_n = 0;

static void *scratch(void **buf, size_t *have, size_t need) {
    if (need <= *have) return *buf;
    void *p = NULL;
    if (posix_memalign(&p, 64, need) != 0) return NULL;
    free(*buf);
    *buf = p;
    *have = need;
    return p;
}

/* Elements per block: the output block stays in L1 while every rank's slice is added to it. */
enum { RED_BLOCK = 2048 };

/* One block of o[i] (op)= s_p[i] for p = 1..n-1 in rank order, after o[i] = s_0[i]: the same per-element order
 * (((x0 + x1) + x2) + ...) whatever the block size. NaN wins a max, as in torch. */
#define REDUCE_BLOCK(T, o, s, stride, n, i0, i1, op)                                                    \
    do {                                                                                                \
        for (int64_t i = i0; i < i1; i++) o[i] = s[i];                                                  \
        for (int32_t p = 1; p < n; p++) {                                                               \
            const T *sp = s + (int64_t)p * stride;                                                      \
            if (op == FL_REDUCE_MAX)                                                                    \
                for (int64_t i = i0; i < i1; i++) o[i] = (sp[i] > o[i] || sp[i] != sp[i]) ? sp[i] : o[i]; \
            else                                                                                        \
                for (int64_t i = i0; i < i1; i++) o[i] = (T)(o[i] + sp[i]);                             \
        }                                                                                               \
    } while (0)

/* out[i] = reduce over p of src[p * stride + i] in order p = 0..n-1, i < len; avg divides the sum by n. bf16/f16
 * accumulate in f32 (acc: len floats) and round once at the end. Integer sums wrap (unsigned arithmetic). */
static void reduce_ranks(void *restrict out, const void *restrict src, int64_t stride, int32_t n, int64_t len,
                         int32_t dtype, int32_t op, float *restrict acc) {
    for (int64_t i0 = 0; i0 < len; i0 += RED_BLOCK) {
        int64_t i1 = fl_min64(len, i0 + RED_BLOCK);
        switch (dtype) {
        case FL_F32: {
            float *o = out;
            const float *s = src;
            REDUCE_BLOCK(float, o, s, stride, n, i0, i1, op);
            if (op == FL_REDUCE_AVG) for (int64_t i = i0; i < i1; i++) o[i] /= (float)n;
            break;
        }
        case FL_F64: {
            double *o = out;
            const double *s = src;
            REDUCE_BLOCK(double, o, s, stride, n, i0, i1, op);
            if (op == FL_REDUCE_AVG) for (int64_t i = i0; i < i1; i++) o[i] /= (double)n;
            break;
        }
        case FL_BF16:
        case FL_F16: {
            uint16_t *o = out;
            const uint16_t *s = src;
            bool bf = dtype == FL_BF16;
            for (int64_t i = i0; i < i1; i++) acc[i] = bf ? fl_bf16_to_f32(s[i]) : fl_f16_to_f32(s[i]);
            for (int32_t p = 1; p < n; p++) {
                const uint16_t *sp = s + (int64_t)p * stride;
                for (int64_t i = i0; i < i1; i++) {
                    float b = bf ? fl_bf16_to_f32(sp[i]) : fl_f16_to_f32(sp[i]);
                    if (op == FL_REDUCE_MAX) acc[i] = (b > acc[i] || b != b) ? b : acc[i];
                    else acc[i] += b;
                }
            }
            for (int64_t i = i0; i < i1; i++) {
                float a = op == FL_REDUCE_AVG ? acc[i] / (float)n : acc[i];
                o[i] = bf ? fl_f32_to_bf16(a) : fl_f32_to_f16(a);
            }
            break;
        }
        case FL_I32: {
            uint32_t *o = out;   /* unsigned: wrapping sums, no UB; max compares as signed below */
            const uint32_t *s = src;
            if (op == FL_REDUCE_MAX) {
                int32_t *oi = out;
                const int32_t *si = src;
                REDUCE_BLOCK(int32_t, oi, si, stride, n, i0, i1, op);
            } else {
                REDUCE_BLOCK(uint32_t, o, s, stride, n, i0, i1, op);
            }
            break;
        }
        case FL_I64: {
            uint64_t *o = out;
            const uint64_t *s = src;
            if (op == FL_REDUCE_MAX) {
                int64_t *oi = out;
                const int64_t *si = src;
                REDUCE_BLOCK(int64_t, oi, si, stride, n, i0, i1, op);
            } else {
                REDUCE_BLOCK(uint64_t, o, s, stride, n, i0, i1, op);
            }
            break;
        }
        default: assert(!"reduce_ranks: dtype checked at issue");
        }
    }
}

/* Receives chunk `me` of every rank's `in` (chunk p of rank p's buffer at p*len(me)) and reduces in rank order. */
int fl_reduce_chunks(fl_comm *c, const void *in, int64_t n, void *out, int32_t dtype, int32_t op,
                     bool equal_chunks) {
    int32_t N = c->size, me = c->rank;
    size_t es = fl_dtype_size(dtype);
    int *sc = malloc(sizeof(int) * 4 * (size_t)N);
    if (!sc) return fl_fail(FL_ENOMEM, "out of memory");
    int *sd = sc + N, *rcnt = sc + 2 * N, *rd = sc + 3 * N;
    int64_t my_start, my_len;
    if (equal_chunks) { my_len = n / N; my_start = (int64_t)me * my_len; }
    else fl_shard_rows(n, N, me, &my_start, &my_len);   /* the one shard geometry (dist/fsdp.c) */
    for (int32_t p = 0; p < N; p++) {
        int64_t s, l;
        if (equal_chunks) { l = n / N; s = (int64_t)p * l; }
        else fl_shard_rows(n, N, p, &s, &l);
        sc[p] = (int)l;
        sd[p] = (int)s;
        rcnt[p] = (int)my_len;
        rd[p] = (int)((int64_t)p * my_len);
    }
    int rc = FL_OK;
    size_t need = es * (size_t)(my_len * N);
    fl_storage *recv = fl_storage_new(need + 64, FL_CPU);
    if (recv) fl_storage_set_category(recv, FL_MEM_OTHER);
    void *buf = recv ? recv->data : NULL;
    float *acc = es == 2 ? scratch(&scratch_acc, &scratch_acc_n, sizeof(float) * (size_t)my_len + 64) : NULL;
    if (!buf || (es == 2 && !acc)) { rc = fl_fail(FL_ENOMEM, "out of memory for %zu bytes of receive buffer", need); goto done; }
    rc = fl_mpi_alltoallv(c->mpi, in, sc, sd, buf, rcnt, rd, es);
    if (rc < 0) goto done;
    reduce_ranks((char *)out + (equal_chunks ? 0 : (size_t)my_start * es), buf, my_len, N, my_len, dtype, op, acc);
    if (!equal_chunks) rc = fl_mpi_allgatherv_inplace(c->mpi, out, sc, sd, es);
done:
    fl_storage_release(recv);
    free(sc);
    return rc;
}

void fl_reduce_scratch_free(void) {
    free(scratch_acc);
    scratch_acc = NULL;
    scratch_acc_n = 0;
}
