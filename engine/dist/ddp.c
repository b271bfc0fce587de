/* engine/dist/ddp.c: data parallelism by replication, as torch's DistributedDataParallel: parameters are checked
 * and broadcast from rank 0 at creation, and gradients are averaged over the group in flat buckets at the end
 * of a backward. The collectives are comm.c's; the Lua wrapper (lua/fsdp/parallel/ddp.lua) decides which
 * backwards reduce, by calling fl_ddp_prepare_backward from a forward pre-hook on the model. */
#include "internal.h"

#include <stdio.h>

enum { DESC_LEN = 2 + FL_MAX_DIMS };            /* per parameter, in the creation check: dtype, ndim, shape */
static const int64_t DEFAULT_CAP = 25 * 1024 * 1024; /* torch's bucket_cap_mb = 25 */

typedef struct {
    int32_t dtype;        /* FL_F32 (f32, bf16, f16 parameters: exact and averaged in f32) or FL_F64 */
    int32_t first, count; /* its parameters: order[first .. first + count) */
    int64_t numel;
    fl_tensor *buf;       /* [numel] flat, made on first use and kept (as torch's reducer) */
} bucket;

struct fl_ddp {
    fl_comm *comm;        /* borrowed: the caller keeps it alive */
    int32_t n;
    fl_tensor **params;   /* [n] retained, registration order */
    char **names;         /* [n] copies, for messages */
    int32_t *order;       /* [n] parameter indices in bucket order: reverse registration, as torch */
    int64_t *offset;      /* [n] element offset of parameter i in its bucket */
    bucket *buckets;
    int32_t n_buckets;
    int64_t cap_bytes;
    bool sync;
    int64_t pending;      /* forwards (in grad mode) whose backward has not ended yet */
    bool live;            /* in the list below */
    fl_ddp *prev, *next;
    fl_tensor *mask;      /* [n] f32: how many ranks hold a grad for parameter i */
};

/* The live DDP objects, in creation order, share one end-of-backward hook (the engine has few hook slots, and
 * a script may build many models): it is registered with the first and removed with the last. */
static fl_ddp *live_first, *live_last;

static const char *pname(const fl_ddp *d, int32_t i) { return d->names[i]; }

static int32_t bucket_dtype(int32_t dtype) { return dtype == FL_F64 ? FL_F64 : FL_F32; }

/* A view of parameter i's slice of its bucket buffer, shaped like the parameter. */
static fl_tensor *slice_of(const fl_ddp *d, const bucket *b, int32_t i) {
    const fl_tensor *p = d->params[i];
    return fl_tensor_view_of(b->buf->storage, b->dtype, FL_CPU, p->ndim, p->shape, NULL, d->offset[i]);
}

static int ensure_buf(bucket *b) {
    if (b->buf) return FL_OK;
    b->buf = fl_tensor_empty(1, &b->numel, b->dtype, FL_CPU);
    if (!b->buf) return fl_fail(FL_ENOMEM, "ddp: out of memory for a bucket of %" PRId64 " elements", b->numel);
    fl_tensor_set_category(b->buf, FL_MEM_GRAD);   /* gradient memory, kept between steps as torch's buckets */
    return FL_OK;
}

/* Waits every issued handle (they must all complete before the buffers are touched), keeping the first error. */
static int wait_all(fl_work **works, int32_t n, int rc) {
    for (int32_t k = 0; k < n; k++) {
        if (!works[k]) continue;
        int wrc = fl_work_wait(works[k]);
        works[k] = NULL;
        if (wrc < 0 && rc == FL_OK) rc = wrc;
    }
    return rc;
}

/* Torch's bucket assignment: walk the parameters in reverse registration order, one open bucket per bucket
 * dtype; a bucket closes when adding the next parameter would pass the cap (a parameter larger than the cap
 * gets a bucket of its own). Buckets are numbered in the order they were opened. */
static int assign_buckets(fl_ddp *d) {
    d->buckets = calloc((size_t)(d->n > 0 ? d->n : 1), sizeof *d->buckets);
    if (!d->buckets) return fl_fail(FL_ENOMEM, "ddp: out of memory for buckets");
    int32_t open[2] = {-1, -1};        /* open bucket per dtype class (f32, f64) */
    int64_t open_bytes[2] = {0, 0};
    /* First pass: which bucket each parameter lands in. */
    int32_t *bucket_of = malloc(sizeof *bucket_of * (size_t)(d->n > 0 ? d->n : 1));
    if (!bucket_of) return fl_fail(FL_ENOMEM, "ddp: out of memory for buckets");
    for (int32_t k = 0; k < d->n; k++) {
        int32_t i = d->n - 1 - k;
        int32_t bd = bucket_dtype(d->params[i]->dtype), cls = bd == FL_F64;
        int64_t numel = fl_tensor_numel(d->params[i]);
        int64_t bytes = numel * (int64_t)fl_dtype_size(bd);
        if (open[cls] >= 0 && open_bytes[cls] > 0 && open_bytes[cls] + bytes > d->cap_bytes) open[cls] = -1;
        if (open[cls] < 0) {
            open[cls] = d->n_buckets++;
            open_bytes[cls] = 0;
            d->buckets[open[cls]].dtype = bd;
        }
        bucket *b = &d->buckets[open[cls]];
        bucket_of[i] = open[cls];
        d->offset[i] = b->numel;
        b->numel += numel;
        b->count++;
        open_bytes[cls] += bytes;
    }
    /* Second pass: order[] lists each bucket's parameters contiguously, in the order they were added. */
    int32_t pos = 0;
    for (int32_t bi = 0; bi < d->n_buckets; bi++) {
        d->buckets[bi].first = pos;
        for (int32_t k = 0; k < d->n; k++) {
            int32_t i = d->n - 1 - k;
            if (bucket_of[i] == bi) d->order[pos++] = i;
        }
    }
    free(bucket_of);
    return FL_OK;
}

/* Checks, on this rank alone, what the broadcast and the hook rely on. */
static int check_local(fl_ddp *d) {
    for (int32_t i = 0; i < d->n; i++) {
        const fl_tensor *p = d->params[i];
        if (p->grad_fn)
            return fl_fail(FL_EINVAL, "ddp: parameter '%s' is the result of %s, not a leaf", pname(d, i), p->grad_fn->name);
        if (p->dtype != FL_F32 && p->dtype != FL_F64 && p->dtype != FL_BF16 && p->dtype != FL_F16)
            return fl_fail(FL_EINVAL, "ddp: parameter '%s' is %s; only floating point parameters can be replicated",
                           pname(d, i), fl_dtype_name(p->dtype));
        if (p->device != FL_CPU || !fl_tensor_has_data(p))
            return fl_fail(FL_ESTATE, "ddp: parameter '%s' %s has no data on the CPU (materialize the model first)",
                           pname(d, i), fl_shape_str(p));
        for (int32_t j = 0; j < i; j++)
            if (d->params[j] == p)
                return fl_fail(FL_EINVAL, "ddp: parameter '%s' is passed twice (also as '%s')", pname(d, i), pname(d, j));
    }
    return FL_OK;
}

/* Every rank must pass the same number of parameters with the same dtypes and shapes: one all-gather of
 * each rank's count (or -1 when its local check failed), then one of every parameter's descriptor. All
 * ranks see the same gathered data, so all of them fail, with the same message, or none does. */
static int check_replicas(fl_ddp *d, int local_rc) {
    int32_t size = fl_comm_size(d->comm);
    int rc = FL_OK;
    int64_t one = 1, all = size;
    fl_tensor *mine = fl_tensor_full(1, &one, FL_I64, local_rc < 0 ? -1.0 : (double)d->n);
    fl_tensor *counts = fl_tensor_empty(1, &all, FL_I64, FL_CPU);
    fl_tensor *desc = NULL, *descs = NULL;
    if (!mine || !counts) { rc = fl_fail(FL_ENOMEM, "ddp: out of memory"); goto done; }
    if ((rc = fl_all_gather(d->comm, counts, mine)) < 0) { fl_error_prefix("ddp: checking the replicas"); goto done; }
    const int64_t *cnt = fl_tensor_data(counts);
    for (int32_t r = 0; r < size; r++)
        if (cnt[r] < 0) {
            if (local_rc < 0) rc = local_rc;   /* keep this rank's own message */
            else rc = fl_fail(FL_EINVAL, "ddp: rank %d could not create its replica (its error names the cause)", r);
            goto done;
        }
    for (int32_t r = 1; r < size; r++)
        if (cnt[r] != cnt[0]) {
            rc = fl_fail(FL_EINVAL, "ddp: rank 0 has %" PRId64 " parameters but rank %d has %" PRId64
                         " (every rank must build the same model)", cnt[0], r, cnt[r]);
            goto done;
        }
    int64_t len = (int64_t)d->n * DESC_LEN, all_len = len * size;
    if (len == 0) goto done;
    desc = fl_tensor_zeros(1, &len, FL_I64, FL_CPU);
    descs = fl_tensor_empty(1, &all_len, FL_I64, FL_CPU);
    if (!desc || !descs) { rc = fl_fail(FL_ENOMEM, "ddp: out of memory"); goto done; }
    int64_t *dp = fl_tensor_data(desc);
    for (int32_t i = 0; i < d->n; i++) {
        const fl_tensor *p = d->params[i];
        dp[i * DESC_LEN] = p->dtype;
        dp[i * DESC_LEN + 1] = p->ndim;
        for (int32_t k = 0; k < p->ndim; k++) dp[i * DESC_LEN + 2 + k] = p->shape[k];
    }
    if ((rc = fl_all_gather(d->comm, descs, desc)) < 0) { fl_error_prefix("ddp: checking the replicas"); goto done; }
    const int64_t *ds = fl_tensor_data(descs);
    for (int32_t i = 0; i < d->n; i++)
        for (int32_t r = 1; r < size; r++) {
            const int64_t *a = ds + i * DESC_LEN, *b = ds + (int64_t)r * len + i * DESC_LEN;
            if (memcmp(a, b, sizeof(int64_t) * DESC_LEN) == 0) continue;
            char sa[160], sb[160];
            snprintf(sa, sizeof sa, "%s %s", fl_dtype_name((int32_t)a[0]), fl_shape_str_n((int32_t)a[1], a + 2));
            snprintf(sb, sizeof sb, "%s %s", fl_dtype_name((int32_t)b[0]), fl_shape_str_n((int32_t)b[1], b + 2));
            rc = fl_fail(FL_EINVAL, "ddp: parameter '%s' (#%d) is %s on rank 0 but %s on rank %d "
                         "(every rank must build the same model)", pname(d, i), i + 1, sa, sb, r);
            goto done;
        }
done:
    fl_tensor_release(mine); fl_tensor_release(counts); fl_tensor_release(desc); fl_tensor_release(descs);
    return rc;
}

/* Rank 0's values to every rank, bucket by bucket (bf16/f16 round-trip exactly through f32). */
static int broadcast_params(fl_ddp *d) {
    int rc = FL_OK;
    int32_t rank = fl_comm_rank(d->comm);
    fl_work **works = calloc((size_t)(d->n_buckets > 0 ? d->n_buckets : 1), sizeof *works);
    if (!works) return fl_fail(FL_ENOMEM, "ddp: out of memory");
    for (int32_t bi = 0; bi < d->n_buckets && rc == FL_OK; bi++) {
        bucket *b = &d->buckets[bi];
        if ((rc = ensure_buf(b)) < 0) break;
        if (rank == 0)
            for (int32_t k = 0; k < b->count && rc == FL_OK; k++) {
                int32_t i = d->order[b->first + k];
                fl_tensor *s = slice_of(d, b, i);
                rc = s ? fl_tensor_copy_(s, d->params[i]) : FL_ENOMEM;
                fl_tensor_release(s);
            }
        if (rc < 0) break;
        works[bi] = fl_broadcast_async(d->comm, b->buf, 0);
        if (!works[bi]) rc = FL_ECOMM;
    }
    rc = wait_all(works, d->n_buckets, rc);
    free(works);
    if (rc < 0) { fl_error_prefix("ddp: broadcasting the parameters from rank 0"); return rc; }
    if (rank != 0)
        for (int32_t bi = 0; bi < d->n_buckets && rc == FL_OK; bi++) {
            bucket *b = &d->buckets[bi];
            for (int32_t k = 0; k < b->count && rc == FL_OK; k++) {
                int32_t i = d->order[b->first + k];
                fl_tensor *s = slice_of(d, b, i);
                rc = s ? fl_tensor_copy_(d->params[i], s) : FL_ENOMEM;
                fl_tensor_release(s);
            }
        }
    return rc;
}

int fl_ddp_sync_grads(fl_ddp *d) {
    if (!d) return fl_fail(FL_EINVAL, "ddp: sync_grads on a NULL ddp");
    if (fl_comm_size(d->comm) == 1 || d->n == 0) return FL_OK;   /* the average over one rank is the grad */
    int rc = FL_OK;
    fl_work **works = calloc((size_t)d->n_buckets, sizeof *works);
    if (!works) return fl_fail(FL_ENOMEM, "ddp: out of memory");
    /* Which parameters have a grad on some rank: those are reduced (missing ones count as zeros), the rest
     * keep no grad anywhere, as torch leaves the grad of a parameter no rank used as None. */
    float *mask = fl_tensor_data(d->mask);
    for (int32_t i = 0; i < d->n; i++) mask[i] = d->params[i]->grad ? 1.0f : 0.0f;
    if ((rc = fl_all_reduce(d->comm, d->mask, FL_REDUCE_SUM)) < 0) {
        fl_error_prefix("ddp: agreeing which parameters have gradients");
        goto done;
    }
    /* Pack bucket k+1 while bucket k is in flight. */
    for (int32_t bi = 0; bi < d->n_buckets && rc == FL_OK; bi++) {
        bucket *b = &d->buckets[bi];
        bool any = false;
        for (int32_t k = 0; k < b->count; k++) any = any || mask[d->order[b->first + k]] > 0;
        if (!any) continue;   /* the same decision on every rank: the mask is global */
        if ((rc = ensure_buf(b)) < 0) break;
        for (int32_t k = 0; k < b->count && rc == FL_OK; k++) {
            int32_t i = d->order[b->first + k];
            fl_tensor *s = slice_of(d, b, i);
            if (!s) { rc = FL_ENOMEM; break; }
            const fl_tensor *g = d->params[i]->grad;
            if (g && !fl_same_shape(g, d->params[i]))
                rc = fl_fail(FL_EINVAL, "ddp: grad of '%s' is %s, parameter is %s", pname(d, i), fl_shape_str(g),
                             fl_shape_str(d->params[i]));
            else rc = g ? fl_tensor_copy_(s, g) : fl_tensor_fill_(s, 0.0);
            fl_tensor_release(s);
        }
        if (rc < 0) break;
        works[bi] = fl_all_reduce_async(d->comm, b->buf, FL_REDUCE_AVG);
        if (!works[bi]) rc = FL_ECOMM;
    }
    rc = wait_all(works, d->n_buckets, rc);
    if (rc < 0) { fl_error_prefix("ddp: averaging gradients"); goto done; }
    for (int32_t bi = 0; bi < d->n_buckets && rc == FL_OK; bi++) {
        bucket *b = &d->buckets[bi];
        for (int32_t k = 0; k < b->count && rc == FL_OK; k++) {
            int32_t i = d->order[b->first + k];
            if (!(mask[i] > 0)) continue;
            fl_tensor *p = d->params[i];
            if (!p->grad) {   /* unused here, used elsewhere: it gets the average of the others and our zeros */
                fl_tensor *g = fl_tensor_empty(p->ndim, p->shape, p->dtype, FL_CPU);
                if (!g) { rc = fl_fail(FL_ENOMEM, "ddp: out of memory for the grad of '%s'", pname(d, i)); break; }
                fl_tensor_set_category(g, FL_MEM_GRAD);
                rc = fl_tensor_set_grad(p, g);
                fl_tensor_release(g);
                if (rc < 0) break;
            }
            fl_tensor *s = slice_of(d, b, i);
            rc = s ? fl_tensor_copy_(p->grad, s) : FL_ENOMEM;
            fl_tensor_release(s);
        }
    }
done:
    free(works);
    return rc;
}

static int end_hook(void *ctx) {
    (void)ctx;
    for (fl_ddp *d = live_first; d; d = d->next) {
        if (d->pending == 0) continue;   /* this backward did not start from that model's forward */
        d->pending--;
        if (!d->sync) continue;          /* accumulation micro-step: grads stay local */
        int rc = fl_ddp_sync_grads(d);
        if (rc < 0) return rc;
    }
    return FL_OK;
}

static int link_live(fl_ddp *d) {
    if (!live_first) {
        int rc = fl_autograd_add_end_hook(end_hook, NULL);
        if (rc < 0) { fl_error_prefix("ddp"); return rc; }
    }
    d->prev = live_last;
    if (live_last) live_last->next = d; else live_first = d;
    live_last = d;
    d->live = true;
    return FL_OK;
}

static void unlink_live(fl_ddp *d) {
    if (!d->live) return;
    if (d->prev) d->prev->next = d->next; else live_first = d->next;
    if (d->next) d->next->prev = d->prev; else live_last = d->prev;
    d->live = false;
    if (!live_first) fl_autograd_remove_end_hook(end_hook, NULL);
}

void fl_ddp_release(fl_ddp *d) {
    if (!d) return;
    unlink_live(d);
    for (int32_t i = 0; i < d->n; i++) {
        if (d->params) fl_tensor_release(d->params[i]);
        if (d->names) free(d->names[i]);
    }
    for (int32_t bi = 0; bi < d->n_buckets; bi++) fl_tensor_release(d->buckets[bi].buf);
    fl_tensor_release(d->mask);
    free(d->params); free(d->names); free(d->order); free(d->offset); free(d->buckets);
    free(d);
}

fl_ddp *fl_ddp_new(fl_comm *c, int32_t n, fl_tensor *const *params, const char *const *names, int64_t bucket_cap_bytes) {
    if (!c) return fl_fail_null(FL_ESTATE, "ddp: no communicator (call fsdp.init first)");
    if (n < 0 || (n > 0 && !params)) return fl_fail_null(FL_EINVAL, "ddp: bad parameter list (n = %d)", n);
    for (int32_t i = 0; i < n; i++)
        if (!params[i]) return fl_fail_null(FL_EINVAL, "ddp: parameter #%d is NULL", i + 1);
    fl_ddp *d = calloc(1, sizeof *d);
    if (!d) return fl_fail_null(FL_ENOMEM, "ddp: out of memory");
    d->comm = c;
    d->sync = true;
    d->cap_bytes = bucket_cap_bytes < 0 ? DEFAULT_CAP : bucket_cap_bytes;
    size_t nn = (size_t)(n > 0 ? n : 1);
    d->params = calloc(nn, sizeof *d->params);
    d->names = calloc(nn, sizeof *d->names);
    d->order = calloc(nn, sizeof *d->order);
    d->offset = calloc(nn, sizeof *d->offset);
    int64_t nm = n;
    d->mask = fl_tensor_zeros(1, &nm, FL_F32, FL_CPU);
    if (!d->params || !d->names || !d->order || !d->offset || !d->mask) {
        fl_fail(FL_ENOMEM, "ddp: out of memory");
        fl_ddp_release(d);
        return NULL;
    }
    d->n = n;
    int rc = FL_OK;
    for (int32_t i = 0; i < n; i++) {
        fl_tensor_retain(params[i]);
        d->params[i] = params[i];
        char buf[32];
        if (!names || !names[i]) snprintf(buf, sizeof buf, "#%d", i + 1);
        d->names[i] = strdup(names && names[i] ? names[i] : buf);
        if (!d->names[i]) rc = fl_fail(FL_ENOMEM, "ddp: out of memory");
    }
    int local_rc = rc < 0 ? rc : check_local(d);
    /* Collective from here on: every rank reaches check_replicas, even one whose local check failed. */
    if ((rc = check_replicas(d, local_rc)) < 0) goto fail;
    if ((rc = assign_buckets(d)) < 0) goto fail;
    if (fl_comm_size(c) > 1 && (rc = broadcast_params(d)) < 0) goto fail;
    if ((rc = link_live(d)) < 0) goto fail;
    return d;
fail:
    fl_ddp_release(d);
    return NULL;
}

void fl_ddp_prepare_backward(fl_ddp *d) {
    if (d && fl_grad_is_enabled() && fl_autograd_depth() == 0) d->pending++;
}

void fl_ddp_set_sync(fl_ddp *d, bool on) { if (d) d->sync = on; }
bool fl_ddp_get_sync(const fl_ddp *d) { return d && d->sync; }
int32_t fl_ddp_num_buckets(const fl_ddp *d) { return d ? d->n_buckets : 0; }

int32_t fl_ddp_bucket_params(const fl_ddp *d, int32_t bi, int32_t *idx) {
    if (!d || bi < 0 || bi >= d->n_buckets)
        return fl_fail(FL_EINVAL, "ddp: no bucket %d (there are %d)", bi, d ? d->n_buckets : 0);
    const bucket *b = &d->buckets[bi];
    if (idx)
        for (int32_t k = 0; k < b->count; k++) idx[k] = d->order[b->first + k];
    return b->count;
}
