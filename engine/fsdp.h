/* engine/fsdp.h: the one public header of the fsdp-lua engine (all symbols fl_*).
 * It is read by C and, preprocessed with -DFL_FFI, by LuaJIT's FFI (lua/fsdp/_cdef.lua is generated from
 * it by the build; nobody edits that file). Keep it FFI-readable: no macros in signatures, constants as enums.
 *
 * A worked example (C):
 *     int64_t shape[2] = {2, 3};
 *     fl_tensor *a = fl_tensor_full(2, shape, FL_F32, 1.5);
 *     fl_tensor_set_requires_grad(a, true);
 *     fl_tensor *b = fl_mul(a, a);                 // records a grad_fn node
 *     fl_tensor *s = fl_sum(b);                    // scalar
 *     fl_backward(s, NULL, false);                 // a->grad == 2a
 *     fl_tensor_release(s); fl_tensor_release(b); fl_tensor_release(a);
 *
 * Ownership: functions returning fl_tensor * return an owned reference (refcount 1 or a retained existing
 * tensor); the caller releases it with fl_tensor_release. `const fl_tensor *` parameters are borrowed.
 * Errors: a negative int (enum fl_status) or NULL, with the message in fl_last_error().
 *
 * Global state, each defined in one file (paths under engine/): the thread-local error buffer (core/error.c), the
 * thread count (core/parallel.c), grad mode, backward depth, the node counters and the end-of-backward hooks
 * (core/autograd.c), the allocation counters (core/storage.c), the world communicator and the bench's skip switch
 * (dist/comm.c), the communication thread with its queue, time counters and the record of departed peers
 * (dist/comm_queue.c), that thread's reduction buffers (dist/reduce.c), MPI's element types and departure channel
 * (dist/comm_mpi.c), the list of live DDP reducers behind one end-of-backward hook (dist/ddp.c), the interrupt
 * request and its thread (core/interrupt.c), the registry of live groups and the timeout mode (dist/comm.c,
 * dist/comm_queue.c).
 */
#ifndef FSDP_H
#define FSDP_H

#ifndef FL_FFI
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#endif

enum fl_status {
    FL_OK = 0,
    FL_EINVAL = -1,       /* bad argument: shape, dtype, option */
    FL_ENOMEM = -2,
    FL_EIO = -3,          /* file missing, truncated or malformed */
    FL_ESTATE = -4,       /* called in the wrong state (backward twice, released storage) */
    FL_EUNSUPPORTED = -5, /* valid request this build cannot do (device, dtype) */
    FL_ECOMM = -6,        /* a collective failed or timed out */
    FL_EINTERRUPTED = -7  /* stopped by fl_interrupt_request (Ctrl-C in the REPL) */
};

/* Pinned numbers: they are written into checkpoints' metadata. New ones go at the end. */
enum fl_dtype {
    FL_F32 = 0,
    FL_F64 = 1,
    FL_BF16 = 2,
    FL_F16 = 3,
    FL_I32 = 4,
    FL_I64 = 5,
    FL_U8 = 6,
    FL_BOOL = 7,
    FL_NDTYPES = 8
};

enum fl_device { FL_CPU = 0, FL_META = 1, FL_CUDA = 2 };

/* What a storage's bytes are for, in memory accounting (fl_mem_*). */
enum fl_mem_category {
    FL_MEM_OTHER = 0,
    FL_MEM_PARAM = 1,           /* parameters (sharded when FSDP is on) */
    FL_MEM_PARAM_UNSHARDED = 2, /* gathered full weights */
    FL_MEM_GRAD = 3,
    FL_MEM_OPTIM = 4,
    FL_MEM_ACTIVATION = 5,
    FL_MEM_NCATEGORIES = 6
};

enum { FL_MAX_DIMS = 8 };

typedef struct fl_storage fl_storage;
typedef struct fl_node fl_node;

/* A view on a storage. Fields are public for cheap reads from Lua; write them only through functions. */
typedef struct fl_tensor {
    int32_t refcount;
    int32_t dtype;                 /* enum fl_dtype */
    int32_t device;                /* enum fl_device */
    int32_t ndim;
    int64_t shape[FL_MAX_DIMS];
    int64_t stride[FL_MAX_DIMS];   /* in elements */
    int64_t offset;                /* in elements, from the start of the storage */
    fl_storage *storage;           /* NULL only on meta tensors */
    int32_t requires_grad;
    int32_t out_index;             /* which output of grad_fn this is */
    fl_node *grad_fn;              /* producer node (owned ref); NULL for leaves */
    fl_node *grad_acc;             /* a leaf's accumulate node (owned ref), made on first use */
    struct fl_tensor *grad;        /* a leaf's accumulated gradient (owned ref) */
    void *hook;                    /* owner data for FSDP (not touched by the engine core) */
} fl_tensor;

/* ---- errors, version, threads ---- */
const char *fl_last_error(void);            /* message of the last failure on this thread */
const char *fl_version(void);
void fl_set_num_threads(int32_t n);         /* OpenMP and OpenBLAS threads; n <= 0 means all cores */
int32_t fl_get_num_threads(void);

/* ---- interrupts (core/interrupt.c): Ctrl-C in the REPL ----
 * A signal handler calls fl_interrupt_request (async-signal-safe). While the thread that called
 * fl_interrupt_arm(true) is armed, a backward fails at its next autograd node, and a wait for a collective (with
 * timeout errors on) fails, with FL_EINTERRUPTED and "interrupted (in <what>)"; the Lua layer takes the request at
 * every op's entry (lua/fsdp/tensor.lua's ptr). Never inside an op: internal helpers do not all check what they
 * call, and an op stopped halfway would leave a wrong result, not an error. Taking the request clears it: one
 * Ctrl-C, one error. Disarmed, a request just stays pending (the REPL disarms between statements). */
void fl_interrupt_arm(bool on);             /* on: the calling thread is the one that gets interrupted */
void fl_interrupt_request(void);            /* async-signal-safe */
bool fl_interrupt_take(void);               /* true (and cleared) when armed, on that thread, and one is pending */
void fl_interrupt_clear(void);

/* ---- dtypes ---- */
size_t fl_dtype_size(int32_t dtype);
const char *fl_dtype_name(int32_t dtype);   /* "f32", ...; "?" when unknown */
int32_t fl_dtype_from_name(const char *name); /* -1 when unknown */
float fl_bf16_to_f32(uint16_t h);
uint16_t fl_f32_to_bf16(float f);           /* round to nearest even, NaN stays NaN */
float fl_f16_to_f32(uint16_t h);
uint16_t fl_f32_to_f16(float f);

/* ---- tensor lifecycle (tensor.c) ---- */
fl_tensor *fl_tensor_empty(int32_t ndim, const int64_t *shape, int32_t dtype, int32_t device); /* uninitialised; meta allocates nothing */
fl_tensor *fl_tensor_zeros(int32_t ndim, const int64_t *shape, int32_t dtype, int32_t device);
fl_tensor *fl_tensor_full(int32_t ndim, const int64_t *shape, int32_t dtype, double value);
fl_tensor *fl_tensor_from_data(int32_t ndim, const int64_t *shape, int32_t dtype, const void *data); /* copies */
fl_tensor *fl_tensor_arange(int64_t start, int64_t end, int32_t dtype);
void fl_tensor_retain(fl_tensor *t);
void fl_tensor_release(fl_tensor *t);       /* NULL-safe */
int64_t fl_tensor_numel(const fl_tensor *t);
bool fl_tensor_is_contiguous(const fl_tensor *t);
void *fl_tensor_data(const fl_tensor *t);   /* address of element 0; NULL on meta or released storage */
bool fl_tensor_has_data(const fl_tensor *t);
/* Element read/write by flat row-major index, through the view's strides (slow; for Lua tolist/item). */
double fl_tensor_get_flat(const fl_tensor *t, int64_t i);
int fl_tensor_set_flat(fl_tensor *t, int64_t i, double v);
int fl_tensor_copy_to_buffer(const fl_tensor *t, void *dst); /* row-major bytes of the view, in t's dtype */

/* ---- storage: release and re-allocate under live tensors (FSDP reshard/unshard) ---- */
int fl_tensor_storage_release(fl_tensor *t);    /* frees the bytes; every view of the storage keeps its metadata */
int fl_tensor_storage_alloc(fl_tensor *t);      /* (re)allocates the bytes (uninitialised); meta becomes cpu */
int fl_tensor_materialize(fl_tensor *t, int32_t device); /* meta -> device, zero-filled */
void fl_tensor_set_category(fl_tensor *t, int32_t category); /* memory accounting of its storage */
bool fl_tensor_same_storage(const fl_tensor *a, const fl_tensor *b);

/* ---- memory accounting (storage.c) ---- */
int64_t fl_mem_current(int32_t category);   /* bytes now allocated in that category */
int64_t fl_mem_peak(int32_t category);
void fl_mem_reset_peak(void);
int64_t fl_mem_total_current(void);
int64_t fl_mem_total_peak(void);
/* Bytes the caching host allocator keeps for reuse (freed blocks not yet given back), and giving them back. */
int64_t fl_mem_cached(void);
void fl_mem_empty_cache(void);
bool fl_mem_cache_enabled(void);    /* false in sanitizer builds (a use after free must stay visible) or when limited to 0 */
int64_t fl_mem_fresh_bytes(void);   /* bytes of large blocks taken from the system so far (not from the cache) */
int64_t fl_alloc_bytes_pending(void);       /* bytes allocated since the last fl_alloc_reset_pending: drives Lua's GC */
void fl_alloc_reset_pending(void);

/* ---- in-place data operations (no autograd) ---- */
int fl_tensor_fill_(fl_tensor *t, double value);
int fl_tensor_copy_(fl_tensor *dst, const fl_tensor *src); /* same shape (src may broadcast), casts dtype */
/* Counter-based RNG: element i of a tensor named `name` depends only on (seed, name, elem_offset + i), so a
 * rank filling rows [r0, r1) of a row-major tensor with elem_offset = r0 * row_len gets exactly those rows
 * of the full initialisation. */
int fl_tensor_normal_(fl_tensor *t, uint64_t seed, const char *name, int64_t elem_offset, double mean, double std);
int fl_tensor_uniform_(fl_tensor *t, uint64_t seed, const char *name, int64_t elem_offset, double lo, double hi);
uint64_t fl_rng_hash_name(const char *name);

/* ---- autograd (autograd.c) ---- */
void fl_grad_set_enabled(bool on);
bool fl_grad_is_enabled(void);
int fl_tensor_set_requires_grad(fl_tensor *t, bool on); /* leaves only */
fl_tensor *fl_tensor_get_grad(const fl_tensor *t);      /* owned ref or NULL */
int fl_tensor_set_grad(fl_tensor *t, fl_tensor *grad);  /* retains grad; NULL clears */
fl_tensor *fl_detach(const fl_tensor *t);               /* shares storage, no grad_fn */
/* Runs the graph below `root`. grad NULL means ones (root must then have one element). */
int fl_backward(fl_tensor *root, const fl_tensor *grad, bool retain_graph);
const char *fl_tensor_grad_fn_name(const fl_tensor *t); /* NULL for leaves */
int64_t fl_autograd_live_nodes(void);                  /* nodes alive now (leak checks) */

/* Custom nodes whose backward is a callback (activation checkpointing from Lua). The callback gets the
 * node id, the output gradients (entries may be NULL = zero) and fills owned input gradients (NULL = none). */
typedef int (*fl_custom_backward_fn)(int64_t id, int32_t n_out, fl_tensor *const *grad_out,
                                     int32_t n_in, fl_tensor **grad_in);
/* Records a node with inputs `ins` and outputs `outs` (the outputs get it as grad_fn). Returns 1 when
 * recorded, 0 when no input needs grad or grad mode is off, negative on error. */
int fl_custom_node(const char *name, int64_t id, fl_custom_backward_fn fn, int32_t n_in, fl_tensor *const *ins,
                   int32_t n_out, fl_tensor *const *outs);

/* ---- shape and copy ops, with autograd (ops_shape.c) ---- */
fl_tensor *fl_view(const fl_tensor *t, int32_t ndim, const int64_t *shape);   /* one dim may be -1; copies when the strides do not allow a view */
fl_tensor *fl_transpose(const fl_tensor *t, int32_t d0, int32_t d1);
fl_tensor *fl_permute(const fl_tensor *t, int32_t ndim, const int32_t *dims);
fl_tensor *fl_narrow(const fl_tensor *t, int32_t dim, int64_t start, int64_t length);
fl_tensor *fl_expand(const fl_tensor *t, int32_t ndim, const int64_t *shape);
fl_tensor *fl_contiguous(const fl_tensor *t);   /* retains t when already contiguous */
fl_tensor *fl_cast(const fl_tensor *t, int32_t dtype);
fl_tensor *fl_cat(int32_t n, fl_tensor *const *ts, int32_t dim);
fl_tensor *fl_index_select(const fl_tensor *t, int32_t dim, const fl_tensor *index); /* index i64/i32 1-D */

/* ---- elementwise (ops_elementwise.c); binary ops broadcast ---- */
fl_tensor *fl_add(const fl_tensor *a, const fl_tensor *b);
fl_tensor *fl_sub(const fl_tensor *a, const fl_tensor *b);
fl_tensor *fl_mul(const fl_tensor *a, const fl_tensor *b);
fl_tensor *fl_div(const fl_tensor *a, const fl_tensor *b);
fl_tensor *fl_add_scaled(const fl_tensor *a, const fl_tensor *b, double alpha); /* a + alpha*b */
fl_tensor *fl_scale(const fl_tensor *a, double s);     /* a * s */
fl_tensor *fl_add_scalar(const fl_tensor *a, double s);
fl_tensor *fl_pow_scalar(const fl_tensor *a, double p);
fl_tensor *fl_neg(const fl_tensor *a);
fl_tensor *fl_exp(const fl_tensor *a);
fl_tensor *fl_log(const fl_tensor *a);
fl_tensor *fl_sqrt(const fl_tensor *a);
fl_tensor *fl_rsqrt(const fl_tensor *a);
fl_tensor *fl_tanh(const fl_tensor *a);
fl_tensor *fl_sigmoid(const fl_tensor *a);
fl_tensor *fl_relu(const fl_tensor *a);
int fl_add_(fl_tensor *a, const fl_tensor *b, double alpha);         /* in place, no autograd: a += alpha*b */
int fl_scale_(fl_tensor *a, double s);       /* in place, no autograd: a *= s (s rounded to a's dtype, as fl_scale) */

/* ---- reductions (ops_reduce.c): fixed blocking, same bits for any thread count ---- */
fl_tensor *fl_sum(const fl_tensor *t);                          /* all elements -> [] */
fl_tensor *fl_mean(const fl_tensor *t);
fl_tensor *fl_sum_dim(const fl_tensor *t, int32_t dim, bool keepdim);
fl_tensor *fl_mean_dim(const fl_tensor *t, int32_t dim, bool keepdim);
fl_tensor *fl_max_dim(const fl_tensor *t, int32_t dim, bool keepdim, fl_tensor **indices); /* indices optional (i64) */
fl_tensor *fl_sum_to_shape(const fl_tensor *t, int32_t ndim, const int64_t *shape); /* reverse of broadcasting */
double fl_sum_squares(const fl_tensor *t);   /* exact, rounded once to f64 (exact_sum.c); NaN on error */


/* ---- matmul (ops_matmul.c, OpenBLAS) ---- */
fl_tensor *fl_matmul(const fl_tensor *a, const fl_tensor *b);   /* [..., m, k] x [..., k, n] with batch broadcast; 1-D promoted */
/* y = x W^T + b for Linear (w [out, in]); with w_in_out, y = x W + b for GPT-2's Conv1D (w [in, out]). b may be NULL. */
fl_tensor *fl_linear(const fl_tensor *x, const fl_tensor *w, const fl_tensor *b, bool w_in_out);

/* ---- normalisation and activations (ops_norm.c, ops_act.c) ---- */
/* LayerNorm over the last dim (biased variance). w, b may be NULL. */
fl_tensor *fl_layer_norm(const fl_tensor *x, const fl_tensor *w, const fl_tensor *b, double eps);
/* RMSNorm as Hugging Face: x * rsqrt(mean(x^2) + eps), cast back to x's dtype, then times w (may be NULL). */
fl_tensor *fl_rms_norm(const fl_tensor *x, const fl_tensor *w, double eps);
fl_tensor *fl_gelu(const fl_tensor *x, bool tanh_approx);  /* exact erf GELU, or gelu_new / gelu_pytorch_tanh */
fl_tensor *fl_silu(const fl_tensor *x);
fl_tensor *fl_swiglu(const fl_tensor *gate, const fl_tensor *up); /* silu(gate) * up, fused */
/* Dropout with a counter-based mask: element i is kept iff uniform(seed, key, i) >= p; kept values * 1/(1-p). */
fl_tensor *fl_dropout(const fl_tensor *x, double p, uint64_t seed, uint64_t key);

/* ---- softmax and losses (ops_softmax.c) ---- */
fl_tensor *fl_softmax(const fl_tensor *x, int32_t dim);
fl_tensor *fl_log_softmax(const fl_tensor *x, int32_t dim);
/* Mean cross-entropy of logits [N, C] against targets [N] (i64/i32); targets equal to ignore_index are
 * skipped; the mean is over the others (0/0 gives NaN, as PyTorch). Computed in f32 (f64 for f64 input). */
fl_tensor *fl_cross_entropy(const fl_tensor *logits, const fl_tensor *targets, int64_t ignore_index);
/* The head and its loss in one op: mean cross-entropy of h [N, H] W^T (W [V, H], Linear layout) over targets
 * != ignore_index, never holding the [N, V] logits (chunks of rows); the gradients are made in the forward. */
fl_tensor *fl_linear_cross_entropy(const fl_tensor *h, const fl_tensor *w, const fl_tensor *targets, int64_t ignore_index);

/* ---- embedding, RoPE, attention (ops_embed.c, ops_attn.c) ---- */
fl_tensor *fl_embedding(const fl_tensor *weight, const fl_tensor *ids); /* weight [V, H], ids any shape -> [..., H] */
/* The same; row padding_idx (-1: none) gets no gradient, as torch's nn.Embedding(padding_idx =). */
fl_tensor *fl_embedding_padded(const fl_tensor *weight, const fl_tensor *ids, int64_t padding_idx);
/* RoPE, first-half/second-half convention (GPT-NeoX / HF rotate_half). x is [B, T, heads, hd] (any strides
 * with the last dim contiguous); pos [T] i64 or NULL for 0..T-1; rotates the first rot_dim channels. */
fl_tensor *fl_rope(const fl_tensor *x, const fl_tensor *pos, double theta, int32_t rot_dim);
/* Scaled RoPE (HF rope_type linear, dynamic, yarn, llama3, longrope): inv_freq an f32 [rot_dim/2] table of the
 * frequencies, cos and sin multiplied by scale (HF's attention_scaling) before they meet x; rot_dim = 2 * its length. */
fl_tensor *fl_rope_freqs(const fl_tensor *x, const fl_tensor *pos, const fl_tensor *inv_freq, double scale);
/* Causal scaled-dot-product attention with GQA. q [B, T, nH, hd], k and v [B, T, nKV, hd] (strided views
 * allowed, last dim contiguous), nH a multiple of nKV (query head h uses kv head h / (nH/nKV)).
 * window > 0 limits keys to i - window < j <= i. Returns [B, T, nH, hd] contiguous. */
fl_tensor *fl_attention(const fl_tensor *q, const fl_tensor *k, const fl_tensor *v, double scale, int64_t window);
/* Generation: queries at cache positions q_start.. over a key/value cache k, v [B, Tk, nKV, hd] (causal in cache
 * positions, an optional window, valid u8/bool [B, >= Tk] marking real (non-padding) keys, or NULL); no autograd. */
fl_tensor *fl_attention_cached(const fl_tensor *q, const fl_tensor *k, const fl_tensor *v, double scale,
                               int64_t q_start, int64_t window, const fl_tensor *valid);
/* The same with dropout on the attention probabilities, as torch eager: out = dropout_p(softmax(scale QK^T + mask)) V.
 * Probability (b, h, i, j) is kept iff the uniform (32 bits) of element ((b nH + h) T + i) T + j of the stream
 * (seed, key) is >= p; kept values times 1/(1-p). The mask is regenerated in backward, never stored, and depends
 * on (seed, key, b, h, i, j) only. p in [0, 1) (else FL_EINVAL); p = 0 is exactly fl_attention. */
fl_tensor *fl_attention_dropout(const fl_tensor *q, const fl_tensor *k, const fl_tensor *v, double scale, int64_t window,
                                double p, uint64_t seed, uint64_t key);

/* ---- indexing for MoE (ops_index.c) ---- */
fl_tensor *fl_topk(const fl_tensor *x, int64_t k, fl_tensor **indices);  /* over the last dim, sorted descending */
fl_tensor *fl_gather(const fl_tensor *x, int32_t dim, const fl_tensor *index);
fl_tensor *fl_scatter_add(const fl_tensor *base, int32_t dim, const fl_tensor *index, const fl_tensor *src);

/* ---- optimizers (optim.c): fused loops over one parameter, the same f32 operation order as torch ---- */
/* AdamW step on p (f32) with grad g and states m, v (f32, same numel). step is the 1-based step count.
 * p may be a shard: its elements are elements [full_offset, full_offset + numel) of a whole parameter of
 * full_numel elements (0: p is the whole parameter). torch's rounding of an element depends on its position
 * in the whole tensor, so a shard then steps exactly as the unsharded parameter would. */
int fl_adamw_step(fl_tensor *p, const fl_tensor *g, fl_tensor *m, fl_tensor *v, int64_t step, double lr,
                  double beta1, double beta2, double eps, double weight_decay, int64_t full_offset,
                  int64_t full_numel);
/* SGD with momentum (buf may be NULL when momentum == 0); first step copies g into buf, as torch. */
int fl_sgd_step(fl_tensor *p, const fl_tensor *g, fl_tensor *buf, int64_t step, double lr, double momentum,
                double dampening, double weight_decay, bool nesterov);

/* ---- safetensors (safetensors.c): bulk bytes in C, the JSON header is parsed in Lua ---- */
/* Reads the 8-byte length and the JSON header; *header_len gets its size; returns a malloc'd string (free
 * with fl_free) or NULL. */
char *fl_st_read_header(const char *path, int64_t *header_len);
/* Reads nbytes at byte offset `offset` of the file into t's storage (t contiguous, nbytes = its size in
 * `file_dtype`), converting file_dtype -> t's dtype. */
int fl_st_read_into(const char *path, int64_t offset, int32_t file_dtype, fl_tensor *t);
/* Writes t's bytes (converted to file_dtype) at byte `offset` of an open-for-writing file (created if missing). */
int fl_st_write_at(const char *path, int64_t offset, int32_t file_dtype, const fl_tensor *t);
/* fl_st_write_at that also extends *crc, the CRC32C of the file's bytes before `offset`, with the bytes it writes:
 * a file written in order from offset 0 has its checksum when the last write returns, with no second pass. */
int fl_st_write_at_crc32c(const char *path, int64_t offset, int32_t file_dtype, const fl_tensor *t, uint32_t *crc);
int fl_file_write_at(const char *path, int64_t offset, const void *data, int64_t nbytes);
/* Bytes read from safetensors files by this process since the start (or the last reset): headers and data. */
int64_t fl_st_bytes_read(void);
void fl_st_reset_bytes_read(void);

/* ---- checksums (io/checksum.c): CRC32C, the per-file checksum of training checkpoints ---- */
/* The CRC32C of a stream extended by n bytes of data, `crc` being the stream's so far (0 for an empty one):
 * fl_crc32c(fl_crc32c(0, a, na), b, nb) is the CRC32C of a then b. The CPU's crc32 instruction when it has one. */
uint32_t fl_crc32c(uint32_t crc, const void *data, int64_t n);
/* Reads the whole file once: *crc gets its CRC32C and *size its length in bytes. */
int fl_file_crc32c(const char *path, uint32_t *crc, int64_t *size);

/* ---- files and directories (io/files.c): what publishing a checkpoint atomically needs ---- */
int fl_file_sync(const char *path);   /* fsync: the bytes written so far are on disk before a rename publishes them */
int fl_dir_sync(const char *path);    /* fsync of a directory: the renames inside it are on disk */
int fl_mkdir_p(const char *path);     /* mkdir -p (mode 0755); an existing directory is fine */
/* Swaps two existing paths atomically (renameat2 RENAME_EXCHANGE): a reader sees the old or the new, never
 * neither. Returns FL_EINVAL when the filesystem cannot exchange (the caller falls back to two renames). */
int fl_path_exchange(const char *a, const char *b);
int fl_remove_tree(const char *path); /* rm -rf, not following symbolic links; a missing path is fine */
/* 1 when path is a directory, 0 when it does not exist, an error when it is something else. */
int fl_is_dir(const char *path);
int fl_link(const char *from, const char *to);   /* a hard link: carries a file into a new directory, no copy */
/* The names in a directory (not . and ..), each followed by '\n'; malloc'd (fl_free) or NULL. */
char *fl_dir_list(const char *path);
/* 1 when process `pid` runs on this host (kill(pid, 0) succeeds or is refused), 0 when there is none, or an error. */
int fl_process_alive(int64_t pid);
void fl_free(void *p);

/* ---- background checkpoint writes (io/async_write.c) ----
 * A writer holds host copies of whole files. Stage every byte of each file first (add_file, then put_bytes /
 * put_tensor, which copy and convert at once, so the tensors may change right after), then start: a thread of the
 * writer's own creates, writes and fsyncs the files, in order, and frees each copy once written. The thread does
 * file I/O only (no communication, no Lua); the caller agrees with its peers and publishes after wait. Each writer
 * owns its thread and memory: no global state. */
typedef struct fl_async_write fl_async_write;
fl_async_write *fl_async_write_new(void);          /* owned (fl_async_write_release); NULL on error */
/* Stages a file of `size` bytes at `path` (written with O_TRUNC); returns its index, or negative. */
int32_t fl_async_write_add_file(fl_async_write *w, const char *path, int64_t size);
int fl_async_write_put_bytes(fl_async_write *w, int32_t file, int64_t offset, const void *data, int64_t n);
/* Copies t's elements (any strides) into the file's bytes at `offset`, converted to file_dtype. */
int fl_async_write_put_tensor(fl_async_write *w, int32_t file, int64_t offset, int32_t file_dtype, const fl_tensor *t);
/* Starts the writer thread. delay_s > 0 makes it wait that long before writing: a test hook, so that a spec can
 * watch training go on during a write or kill a rank in the middle of one; 0 in normal use. */
int fl_async_write_start(fl_async_write *w, double delay_s);
bool fl_async_write_done(const fl_async_write *w); /* true once the thread has finished (then wait to learn how) */
int fl_async_write_wait(fl_async_write *w);        /* joins the thread; its error (file, offset, errno) if it failed */
int64_t fl_async_write_bytes(const fl_async_write *w); /* host bytes staged */
/* The CRC32C of staged file `file`, computed by the thread as it wrote it; only after a successful wait. */
int fl_async_write_crc32c(const fl_async_write *w, int32_t file, uint32_t *crc);
void fl_async_write_release(fl_async_write *w);    /* NULL-safe; joins a running thread first, then frees */

/* ---- communication (dist/comm.c: groups, checks, world-size-1 copies; dist/comm_queue.c: the communication
 * thread, waits and timeouts; dist/reduce.c: rank-order reductions; dist/comm_mpi.c: Open MPI) ----
 * A process group. Collectives take contiguous CPU tensors; a mismatch of dtype or size between ranks is an
 * error naming the rank (see fl_comm_check), never a hang. A collective that has not completed after the
 * group's timeout aborts the whole job with a message naming the collective, the group and the rank (with
 * fl_comm_set_timeout_errors on, the multi-rank REPL's mode, the wait fails instead: see below). */
typedef struct fl_comm fl_comm;
typedef struct fl_work fl_work;
enum fl_reduce_op { FL_REDUCE_SUM = 0, FL_REDUCE_AVG = 1, FL_REDUCE_MAX = 2 };

int fl_dist_init(double timeout_s);         /* joins the ranks started by mpirun (or world size 1 without MPI); idempotent */
int fl_dist_finalize(void);
bool fl_dist_is_initialized(void);
void fl_dist_abort(int32_t code, const char *msg); /* prints msg with the rank prefix and ends every rank */
fl_comm *fl_comm_world(void);                /* borrowed; NULL before fl_dist_init */
int32_t fl_comm_rank(const fl_comm *c);
int32_t fl_comm_size(const fl_comm *c);
const char *fl_comm_name(const fl_comm *c);
int32_t fl_comm_global_rank(const fl_comm *c, int32_t group_rank);
/* Splits c: ranks with the same color form a group, ordered by key. Collective over c. Owned. */
fl_comm *fl_comm_split(fl_comm *c, int32_t color, int32_t key, const char *name);
void fl_comm_release(fl_comm *c);            /* NULL-safe; never releases the world */
void fl_comm_set_timeout(fl_comm *c, double seconds);
double fl_comm_get_timeout(const fl_comm *c);
/* Every rank of c passes the same dtype and element count for `what`, or all fail with a message naming the
 * first rank that differs. Collective over c. */
int fl_comm_check(fl_comm *c, const char *what, int32_t dtype, int64_t numel);

/* Async collectives return a handle (NULL on error); fl_work_wait completes and frees it.
 * all_gather: out has size * numel(in) elements, rank-major. reduce_scatter: in has size * numel(out)
 * elements, rank r receives chunk r. bf16/f16 sums accumulate in f32. */
fl_work *fl_all_gather_async(fl_comm *c, fl_tensor *out, const fl_tensor *in);
fl_work *fl_reduce_scatter_async(fl_comm *c, fl_tensor *out, const fl_tensor *in, int32_t op);
fl_work *fl_all_reduce_async(fl_comm *c, fl_tensor *t, int32_t op);
fl_work *fl_broadcast_async(fl_comm *c, fl_tensor *t, int32_t root);
fl_work *fl_barrier_async(fl_comm *c);
fl_work *fl_send_async(fl_comm *c, const fl_tensor *t, int32_t dst, int32_t tag);
fl_work *fl_recv_async(fl_comm *c, fl_tensor *t, int32_t src, int32_t tag);
int fl_work_wait(fl_work *w);                /* NULL-safe; frees w */
bool fl_work_test(fl_work *w);               /* true when complete (then still wait to free) */
/* Blocking forms. */
int fl_all_gather(fl_comm *c, fl_tensor *out, const fl_tensor *in);
int fl_reduce_scatter(fl_comm *c, fl_tensor *out, const fl_tensor *in, int32_t op);
int fl_all_reduce(fl_comm *c, fl_tensor *t, int32_t op);
int fl_broadcast(fl_comm *c, fl_tensor *t, int32_t root);
int fl_barrier(fl_comm *c);
int fl_send(fl_comm *c, const fl_tensor *t, int32_t dst, int32_t tag);
int fl_recv(fl_comm *c, fl_tensor *t, int32_t src, int32_t tag);
/* Time spent inside collectives (waiting included) since the last reset, for the bench's exposed-comm figure. */
double fl_comm_time_total(void);
/* Time the communication thread spent executing collectives (the total communication time; with prefetch
 * most of it overlaps compute). Reset with fl_comm_time_reset. */
double fl_comm_busy_time(void);
void fl_comm_time_reset(void);
/* When set, collectives return immediately without communicating (the bench's "communication skipped" run). */
void fl_comm_set_skip(bool skip);

/* ---- the multi-rank REPL: timeouts that raise, a control group and resynchronisation ----
 * With timeout errors on, a wait that outlives its group's timeout returns FL_ECOMM ("fsdp: barrier on group
 * 'world' did not complete after 5 s") instead of aborting the job, and a wait interrupted by fl_interrupt_request
 * returns FL_EINTERRUPTED. Either way the operation is left to the communication thread (its tensors stay
 * retained until it completes), and its group is out of step: a rank has issued collectives that its peers have
 * not. fl_comm_resync puts every group back in step. */
void fl_comm_set_timeout_errors(bool on);
/* Sets the timeout of every live group (not control groups); later splits inherit their parent's. */
void fl_comm_set_timeout_all(double seconds);
/* A duplicate of c whose operations (all_gather, broadcast, barrier) run on the calling thread, outside the
 * communication thread's queue, never time out, and end the job when a member leaves it: the REPL's channel
 * between ranks, usable while the queue waits on a collective that some ranks never entered. Collective over c.
 * Owned (fl_comm_release). */
fl_comm *fl_comm_control_new(fl_comm *c, const char *name);
/* Collective over the control group ctrl (every rank of the world): the ranks exchange how many collectives they
 * have issued on each group; a rank that issued fewer on a group issues as many "resync" placeholders, which
 * its peers' pending collectives meet, so those fail with a mismatch (naming the op) and complete on every
 * rank. Then every group's operations have completed and its next collective matches again. Fails on every
 * rank, naming the rank and group, when operations are still pending after timeout_s (e.g. collectives issued
 * in a different order on two groups). */
int fl_comm_resync(fl_comm *ctrl, double timeout_s);

/* ---- exact sums of squares (exact_sum.c) ----
 * An accumulator is a contiguous i64 tensor of FL_EXACT_SUM_SIZE elements, zero-initialised: a fixed-point
 * integer wide enough for the square of any f64 (FL_EXACT_SUM_LIMBS limbs) plus a flag word (NaN/Inf seen).
 * Adds are exact and associative, so the rounded value does not depend on how the terms were split or
 * ordered, across tensors, threads or ranks: the gradient norm is the same bits for any sharding. */
enum { FL_EXACT_SUM_LIMBS = 67, FL_EXACT_SUM_SIZE = 68 };
int fl_exact_sum_add_squares(fl_tensor *acc, const fl_tensor *t);  /* acc += sum of t^2 (f32/f64/bf16/f16) */
int fl_exact_sum_merge(fl_tensor *acc, const fl_tensor *other);    /* acc += other */
double fl_exact_sum_value(const fl_tensor *acc);                   /* rounded to nearest, NaN/Inf when seen */
/* acc becomes the sum of every rank's acc (the same bits on all ranks). Collective over c. */
int fl_exact_sum_all_reduce(fl_comm *c, fl_tensor *acc);

/* ---- FSDP units (fsdp.c) ----
 * A unit is what one fully_shard call makes: parameters sharded on dim 0 over a shard group (ceil(d0/N) rows
 * per rank, the last chunks short or empty, zero-padded in the collectives), gathered together through one
 * flat buffer and reduced together. Units belong to a group (one per model) that records the forward order
 * for prefetching and runs the final pass at the end of backward. */
/* Dim-0 shard geometry, the one definition every row range in C and Lua uses: returns rows per rank,
 * ceil(rows / world), and sets [*row0, *row0 + *nrows), the rows `rank` holds (short or empty on the last
 * ranks; the collectives pad them with zeros). Negative (FL_EINVAL) for rows < 0 or a rank outside the world. */
int64_t fl_shard_rows(int64_t rows, int32_t world, int32_t rank, int64_t *row0, int64_t *nrows);

typedef struct fl_fsdp_group fl_fsdp_group;
typedef struct fl_fsdp_unit fl_fsdp_unit;

fl_fsdp_group *fl_fsdp_group_new(void);       /* owned; registers the end-of-backward pass */
void fl_fsdp_group_release(fl_fsdp_group *g); /* releases its units too */
/* Moves src's units into dst (fully_shard on blocks made groups the root's call then joins). Before any forward. */
int fl_fsdp_group_merge(fl_fsdp_group *dst, fl_fsdp_group *src);
/* `full` are the module's parameters (leaves, cpu with data or meta). The unit makes the local shards (f32
 * leaves that require grad: what the optimizer steps), copying their rows from `full` when it has data, then
 * frees the full storages. replicate may be NULL (no HSDP). param_dtype is the dtype of the gathered weights
 * (the full tensors take it: mixed precision computes in bf16 while the shards stay f32), reduce_dtype that of
 * the reduce-scatter. Collective over the shard group (checks sizes agree). */
fl_fsdp_unit *fl_fsdp_unit_new(fl_fsdp_group *g, const char *name, fl_comm *shard, fl_comm *replicate, int32_t n,
                               fl_tensor *const *full, int32_t param_dtype, int32_t reduce_dtype,
                               bool reshard_after_forward);
fl_tensor *fl_fsdp_unit_shard(fl_fsdp_unit *u, int32_t i);  /* owned ref to parameter i's local shard */
int64_t fl_fsdp_unit_shard_row0(const fl_fsdp_unit *u, int32_t i); /* first full row this rank holds */
int fl_fsdp_pre_forward(fl_fsdp_unit *u);      /* reshard finished units, unshard u, prefetch the next */
/* Returns a view of out whose backward unshards u before u's backward runs (and prefetches the unit before
 * it); marks u to be resharded when forward moves on. Owned. */
fl_tensor *fl_fsdp_post_forward(fl_fsdp_unit *u, fl_tensor *out);
int fl_fsdp_unshard(fl_fsdp_unit *u, bool async); /* async: issue the all-gather and return */
/* Gathers parameter i's f32 shards (the master weights, also under mixed precision) into out: a contiguous
 * f32 tensor of the full shape. Collective over the shard group; leaves the unit as it is. */
int fl_fsdp_gather_param(fl_fsdp_unit *u, int32_t i, fl_tensor *out);
int fl_fsdp_reshard(fl_fsdp_unit *u);
void fl_fsdp_set_sync(fl_fsdp_unit *u, bool sync);  /* off: keep unsharded grads across micro-steps */
bool fl_fsdp_is_unsharded(const fl_fsdp_unit *u);
int32_t fl_fsdp_group_unsharded_count(const fl_fsdp_group *g, bool freeing_only); /* units holding full weights now; freeing_only: only reshard_after_forward units */
int32_t fl_fsdp_group_peak_unsharded(fl_fsdp_group *g, bool reset); /* most reshard_after_forward units holding full weights at once in forward */

/* ---- DDP (ddp.c) ----
 * Replication over a process group, as torch's DistributedDataParallel. Creation is collective over c:
 * every rank must pass the same number of parameters with the same dtypes and shapes, or every rank fails
 * with a message naming the first differing parameter and rank; rank 0's values are then broadcast.
 * Gradients are averaged at the end of a backward that follows fl_ddp_prepare_backward (called by the
 * model's forward), while sync is on: flat buckets of up to bucket_cap_bytes (f32; f64 for f64 parameters),
 * parameters in reverse order, one async all-reduce per bucket. A parameter with a grad on some rank but not
 * on this one is reduced as zeros here (and gets the averaged grad); one with no grad on any rank keeps none.
 * Every reducing backward is a collective over c: all ranks must run it. Global state: ddp.c's list of live
 * DDP objects, which share one end-of-backward hook. */
typedef struct fl_ddp fl_ddp;
/* params: n leaves (retained), names: n strings for messages (copied; NULL or NULL entries use "#i").
 * c is borrowed and must outlive the ddp. bucket_cap_bytes < 0 means 25 MiB (torch's default), 0 one
 * parameter per bucket. Owned (fl_ddp_release); NULL on error. */
fl_ddp *fl_ddp_new(fl_comm *c, int32_t n, fl_tensor *const *params, const char *const *names, int64_t bucket_cap_bytes);
void fl_ddp_release(fl_ddp *d);              /* NULL-safe; leaves the hook (removed with the last ddp), releases the params */
/* The next outermost backward reduces (counted: two forwards, two reducing backwards). No effect with grad
 * mode off or inside a running backward (activation-checkpoint recomputes). */
void fl_ddp_prepare_backward(fl_ddp *d);
void fl_ddp_set_sync(fl_ddp *d, bool on);    /* off: backwards keep their grads local (accumulation micro-steps) */
bool fl_ddp_get_sync(const fl_ddp *d);
int fl_ddp_sync_grads(fl_ddp *d);            /* averages the grads now, as the hook does; collective over c */
int32_t fl_ddp_num_buckets(const fl_ddp *d);
/* Number of parameters in bucket b; with idx non-NULL also their 0-based indices, in bucket order. */
int32_t fl_ddp_bucket_params(const fl_ddp *d, int32_t b, int32_t *idx);

#endif
