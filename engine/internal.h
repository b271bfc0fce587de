/* engine/internal.h: declarations shared inside the engine; not part of the FFI surface.
 * Storage layout, the autograd node and the helpers every op file uses live here. */
#ifndef FL_INTERNAL_H
#define FL_INTERNAL_H

#include "fsdp.h"

#include <assert.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* ---- errors (error.c) ---- */
int fl_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void *fl_fail_null(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The code (negative enum fl_status) of this thread's last fl_fail / fl_fail_null: what a NULL return meant. */
int fl_last_status(void);
/* Prefixes the current message with "what: " (for errors passed up through a caller). */
void fl_error_prefix(const char *what);

/* ---- storage (storage.c) ---- */
struct fl_storage {
    int32_t refcount;
    int32_t device;
    int32_t category;   /* enum fl_mem_category */
    void *data;         /* NULL when released or meta */
    size_t nbytes;
    size_t cap;         /* bytes of the block behind data (>= nbytes: a cached block is rounded up) */
    void *block;        /* its block in the caching allocator (storage.c), NULL when it came from malloc */
};
fl_storage *fl_storage_new(size_t nbytes, int32_t device); /* refcount 1, data allocated unless meta */
void fl_storage_retain(fl_storage *s);
void fl_storage_release(fl_storage *s);
int fl_storage_free_data(fl_storage *s);
int fl_storage_alloc_data(fl_storage *s);
void fl_storage_set_category(fl_storage *s, int32_t category);

/* ---- tensor helpers (tensor.c) ---- */
/* A new tensor header viewing `s` (retained) with the given geometry. */
fl_tensor *fl_tensor_view_of(fl_storage *s, int32_t dtype, int32_t device, int32_t ndim, const int64_t *shape,
                             const int64_t *stride, int64_t offset);
fl_tensor *fl_tensor_empty_like(const fl_tensor *t);
fl_tensor *fl_tensor_zeros_like(const fl_tensor *t);
void fl_contiguous_strides(int32_t ndim, const int64_t *shape, int64_t *stride);
int64_t fl_shape_numel(int32_t ndim, const int64_t *shape);
/* FL_OK when the element count and byte size of shape fit in int64, else an error naming op and the shape. */
int fl_shape_check_size(const char *op, int32_t ndim, const int64_t *shape, int32_t dtype);
bool fl_same_shape(const fl_tensor *a, const fl_tensor *b);
/* "[2, 3]" into a thread-local ring of buffers: safe for a few uses in one message. */
const char *fl_shape_str(const fl_tensor *t);
const char *fl_shape_str_n(int32_t ndim, const int64_t *shape);
/* Copies any strided view into a contiguous buffer of the same dtype. */
void fl_copy_strided(const fl_tensor *src, void *dst);
/* Normalises a possibly negative dim; returns -1 when out of range. */
int32_t fl_wrap_dim(int32_t dim, int32_t ndim);
/* Common checks; they return FL_OK or set the error naming `op`. */
int fl_check_cpu_data(const char *op, const fl_tensor *t);
int fl_check_float(const char *op, const fl_tensor *t);   /* f32 or f64 */
int fl_check_same_dtype(const char *op, const fl_tensor *a, const fl_tensor *b);
static inline bool fl_is_float_compute(int32_t dt) { return dt == FL_F32 || dt == FL_F64; }
static inline int64_t fl_min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t fl_max64(int64_t a, int64_t b) { return a > b ? a : b; }
/* Converts n elements between any two dtypes. */
void fl_convert(const void *src, int32_t src_dtype, void *dst, int32_t dst_dtype, int64_t n);
double fl_load_elem(const void *p, int32_t dtype, int64_t i);
void fl_store_elem(void *p, int32_t dtype, int64_t i, double v);

/* ---- BLAS (ops_matmul.c) ---- */
/* One BLAS call, C[m,n] = alpha op(A) op(B) + beta C, row-major, f32/f64. Call it only from inside an active
 * OpenMP parallel region (or with one OpenMP thread): elsewhere OpenBLAS threads itself and the bits then
 * depend on the thread count. */
void fl_gemm_call(int32_t dtype, bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const void *a,
                  int64_t lda, const void *b, int64_t ldb, double beta, void *c, int64_t ldc);
/* C = alpha op(A) op(B) + beta C split into fixed blocks of rows (or columns) of C, one BLAS call each, over the
 * OpenMP threads: the same bits for any thread count (ops_matmul.c). */
void fl_gemm(int32_t dt, bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const void *a, int64_t lda,
             const void *b, int64_t ldb, double beta, void *c, int64_t ldc);

/* ---- counter-based RNG (rng.c) ---- */
double fl_rng_uniform_at(uint64_t seed, uint64_t stream, uint64_t i);
double fl_rng_normal_at(uint64_t seed, uint64_t stream, uint64_t i);
/* out[k] = 32 random bits of element first + k (k < n), a pure function of (seed, stream, element index). */
void fl_rng_bits_at(uint64_t seed, uint64_t stream, uint64_t first, int64_t n, uint32_t *out);

/* ---- low precision (lowp.c): bf16/f16 ops computed by their f32 code ---- */
/* fn(args, converted inputs, aux) calls the op's own function on f32 (or f64) tensors. */
typedef fl_tensor *(*fl_lowp_fn)(const void *args, fl_tensor *const *ins, fl_tensor **aux);
bool fl_lowp_any(int32_t n, const fl_tensor *const *ins);       /* any input bf16/f16 */
int32_t fl_lowp_promote(int32_t a, int32_t b);                  /* torch.result_type for float dtypes */
fl_tensor *fl_lowp_to(const fl_tensor *t, int32_t dtype);       /* converted copy, no autograd */
/* Runs fn on f32 copies of ins[0..n) and returns its result rounded to out_dtype, with a node on the real
 * inputs whose backward rounds each gradient once to its input's dtype. */
fl_tensor *fl_lowp_apply(const char *op, fl_lowp_fn fn, const void *args, int32_t n, const fl_tensor *const *ins,
                         int32_t out_dtype, fl_tensor **aux);

/* ---- parallelism (parallel.c) ---- */
/* Elementwise loops are split only above this many elements; below it the thread start costs more. */
enum { FL_PAR_MIN = 32768 };
/* Fixed reduction block: the same bits for 1 and N threads. */
enum { FL_SUM_BLOCK = 4096 };

/* ---- autograd (autograd.c) ---- */
typedef struct fl_edge {
    fl_node *node;      /* producer of this input's gradient (retained), NULL when it needs none */
    int32_t slot;       /* which output of that node */
} fl_edge;

/* backward: grad_out[n_out] (entries may be NULL = zero); fills grad_in[n_in] with owned refs (NULL = none).
 * Only inputs whose edge is set need a gradient; fl_node_needs(n, i) tells. */
typedef int (*fl_backward_fn)(fl_node *n, fl_tensor *const *grad_out, fl_tensor **grad_in);

enum { FL_NODE_MAX_SAVED = 8 };

struct fl_node {
    int32_t refcount;
    int32_t n_in, n_out;
    int64_t seq;                        /* creation order; backward runs highest first */
    const char *name;                   /* static string, e.g. "matmul" */
    fl_backward_fn backward;
    void (*destroy)(fl_node *n);        /* frees ctx; optional */
    fl_edge *next;                      /* [n_in] */
    fl_tensor *saved[FL_NODE_MAX_SAVED];/* released after the node ran (unless retain_graph) */
    int32_t n_saved;
    bool released;                      /* saved tensors already freed */
    double f[6];                        /* scalar arguments kept for backward */
    int64_t i[6];
    int32_t in_dtype[4];                /* input metadata kept for backward */
    int32_t in_ndim[4];
    int64_t in_shape[4][FL_MAX_DIMS];
    void *ctx;
    fl_tensor *leaf;                    /* accumulate nodes: the leaf (weak: the leaf owns the node) */
    fl_custom_backward_fn custom;       /* custom nodes */
    int64_t custom_id;
};

/* Makes a node for an op with inputs `ins` when grad mode is on and some input requires grad; NULL
 * otherwise (no error). Input shapes/dtypes of the first 4 inputs are recorded in in_shape/in_dtype. */
fl_node *fl_node_make(const char *name, fl_backward_fn fn, int32_t n_in, const fl_tensor *const *ins, int32_t n_out);
/* Makes `out` the slot-th output of n (out takes a reference to n). */
void fl_node_set_output(fl_node *n, int32_t slot, fl_tensor *out);
/* Keeps t (retained) for backward; returns its index in saved[]. */
int32_t fl_node_save(fl_node *n, const fl_tensor *t);
void fl_node_retain(fl_node *n);
void fl_node_release(fl_node *n);
static inline bool fl_node_needs(const fl_node *n, int32_t i) { return n->next[i].node != NULL; }
/* Convenience for one-output ops: records the node if needed and attaches out. Returns the node (borrowed,
 * owned by out) or NULL. */
fl_node *fl_record(const char *name, fl_backward_fn fn, int32_t n_in, const fl_tensor *const *ins, fl_tensor *out);

/* Callbacks run at the end of every outermost backward (nested backwards, e.g. checkpoint recomputes, do not
 * fire them), in registration order: DDP's gradient all-reduce, FSDP's final pass. Registration is
 * permanent until removed. A negative return fails the backward with the callback's message. */
typedef int (*fl_backward_end_fn)(void *ctx);
int fl_autograd_add_end_hook(fl_backward_end_fn fn, void *ctx);
void fl_autograd_remove_end_hook(fl_backward_end_fn fn, void *ctx);
int32_t fl_autograd_depth(void);

/* A leaf's hook (fl_tensor.hook points at one): `reachable` runs for every leaf whose accumulate node a
 * backward's graph reaches, before any node runs; `ready` runs right after that leaf's gradient has been
 * accumulated. FSDP counts a unit's pending gradients with them and reduce-scatters when the last arrives. */
typedef struct fl_leaf_hook {
    void (*reachable)(struct fl_leaf_hook *h);
    int (*ready)(struct fl_leaf_hook *h);
} fl_leaf_hook;             /* backwards running now on this thread (0 outside backward) */

#endif
