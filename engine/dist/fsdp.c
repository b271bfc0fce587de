/* engine/dist/fsdp.c: FSDP units — dim-0 sharding, unshard through one flat all-gather, reshard, the backward hooks
 * (a pre-backward node on each unit's outputs, a per-parameter ready hook that reduce-scatters a unit as soon
 * as its last gradient lands) and the final pass at the end of backward. Plans and module wiring are Lua
 * (lua/fsdp/parallel/); collectives are fl_comm's.
 *
 * Flat layout: every rank's chunk holds, parameter after parameter, that rank's rows of each parameter padded
 * to ceil(d0/N) rows. The all-gather output and the reduce-scatter input are N chunks, rank-major. */
#include "internal.h"

#include <stdio.h>

/* Where a unit's parameters are. FSDP2's ShardedState, plus the all-gather in flight that FSDP2 keeps apart (there
 * is no SHARDED_POST_FORWARD: a unit reshards to the same shards it came from). 0 is SHARDED: a unit is
 * calloc'ed sharded. What happens in a forward or backward is two flags beside it: `reshard_pending` (forward
 * is done with an unsharded unit, which reshards when the next unit's forward begins) and `reduced` (its
 * reduce-scatter was issued in this backward; the end-of-backward pass clears it). */
typedef enum {
    UNIT_SHARDED = 0,     /* the full storages hold no bytes, the f32 shards are the weights; unshard gathers */
    UNIT_GATHERING = 1,   /* the all-gather is in flight (prefetch); the full storages are allocated, not filled */
    UNIT_UNSHARDED = 2    /* the full parameters hold the gathered weights; fl_fsdp_reshard frees them */
} fsdp_unit_state;

/* [Note: a unit's tensors]
 * Per parameter i of n (fsdp_param):
 *   shard    f32 leaf of this rank's rows [nrows, ...] (no padding). Always allocated (FL_MEM_PARAM), from
 *            fl_fsdp_unit_new to the group's release: the master weights, what the optimizer steps.
 *   full     the module's own parameter, full shape, in param_dtype. The unit takes it over: its storage holds
 *            bytes only from the start of a gather to the reshard (FL_MEM_PARAM_UNSHARDED), and its leaf hook
 *            (p->hook) tells the unit when a gradient is reachable and when it has landed.
 *   full->grad   the unsharded gradient autograd accumulates, in full's shape and dtype. Alive from its first
 *            contribution in backward until start_reduce has copied it into rs_in and drops it.
 *   shard->grad  f32, the shard's shape (FL_MEM_GRAD): made by the first finish_reduce, then accumulated into
 *            (+=) until the user zeroes it; what the optimizer reads.
 * Per unit, flat buffers of `chunk` elements per rank, laid out as the top of this file says:
 *   gather_out   [world * chunk] in param_dtype (FL_MEM_PARAM_UNSHARDED): the all-gather's output. Allocated by
 *            start_gather, released by finish_gather once copied into the full parameters, so while GATHERING
 *            a unit holds its weights twice (this buffer and the full storages).
 *   gather_in    a view of this rank's block of gather_out, no memory of its own: the shards, converted to
 *            param_dtype, with zeroed padding rows. The gather runs in place, so there is no second buffer.
 *   rs_in    [world * chunk] in reduce_dtype (FL_MEM_GRAD): every rank's rows of each full->grad, zeros in
 *            the padding. Allocated by start_reduce; released by finish_reduce as soon as the collective is done.
 *   rs_out   [chunk] in reduce_dtype (FL_MEM_GRAD): this rank's averaged chunk (averaged again over the replicas
 *            under HSDP, in place), added into the shards' grads and released by finish_reduce.
 * A group keeps one reduce-scatter in flight (fl_fsdp_group.reducing), so backward holds at most two units'
 * rs buffers. Forward and backward prefetch one unit ahead in the recorded order and a unit reshards once done
 * with, so of the units that reshard, at most two hold full weights at a time (spec/dist/fsdp_memory_spec). */

typedef struct fsdp_param {
    fl_leaf_hook hook;        /* first member: the engine hands us this pointer */
    fl_fsdp_unit *unit;
    fl_tensor *full;          /* the module's parameter: full shape, storage present only while unsharded */
    fl_tensor *shard;         /* this rank's rows, f32 leaf: what the optimizer steps */
    int64_t rows, row_numel;  /* full dim 0 and elements per row */
    int64_t rows_per_rank, row0, nrows;
    int64_t flat_off;         /* offset inside a rank's chunk */
} fsdp_param;

struct fl_fsdp_unit {
    fl_fsdp_group *group;
    char name[128];
    fl_comm *shard_comm, *rep_comm;
    int32_t rank, world;
    int32_t n;
    fsdp_param *p;
    int64_t chunk;            /* elements per rank */
    int32_t param_dtype, reduce_dtype;
    bool reshard_after_forward, sync;
    fsdp_unit_state state;
    fl_tensor *gather_in, *gather_out;
    fl_work *gather_work;
    int32_t pending;          /* gradients still to land in this backward */
    bool reduced;             /* reduce-scatter issued in this backward */
    bool reshard_pending;     /* forward finished with it; reshard when forward moves on */
    fl_tensor *rs_in, *rs_out;
    fl_work *rs_work;
    int32_t order;            /* position in the recorded forward order, -1 before */
};

struct fl_fsdp_group {
    fl_fsdp_unit **units;
    int32_t n, cap;
    fl_fsdp_unit **order;     /* forward order of first use, recorded during the first forward */
    int32_t n_order;
    bool recorded;            /* one full forward+backward seen: order is final */
    fl_fsdp_unit *reducing;   /* the unit whose reduce-scatter is in flight (at most one, as FSDP2) */
    int32_t peak_unsharded;
};

static size_t esize(int32_t dt) { return fl_dtype_size(dt); }

/* The one shard geometry (every row range in C and Lua comes from here): ceil(rows / world) rows per rank;
 * rank r holds [min(r * per, rows), min((r + 1) * per, rows)), so the last ranks may hold fewer rows or none. */
int64_t fl_shard_rows(int64_t rows, int32_t world, int32_t rank, int64_t *row0, int64_t *nrows) {
    if (rows < 0 || world < 1 || rank < 0 || rank >= world) {
        if (row0) *row0 = 0;
        if (nrows) *nrows = 0;
        return fl_fail(FL_EINVAL, "shard_rows: %" PRId64 " rows over world %d, rank %d", rows, world, rank);
    }
    int64_t per = rows / world + (rows % world != 0);
    int64_t r0 = fl_min64(rows, (int64_t)rank * per);
    if (row0) *row0 = r0;
    if (nrows) *nrows = fl_min64(rows, r0 + per) - r0;
    return per;
}

/* ---- group ---- */

static int final_pass(void *ctx);

fl_fsdp_group *fl_fsdp_group_new(void) {
    fl_fsdp_group *g = calloc(1, sizeof *g);
    if (!g) return fl_fail_null(FL_ENOMEM, "fsdp: out of memory");
    if (fl_autograd_add_end_hook(final_pass, g) < 0) { free(g); return NULL; }
    return g;
}

static void unit_free(fl_fsdp_unit *u) {
    fl_work_wait(u->gather_work);
    fl_work_wait(u->rs_work);
    for (int32_t i = 0; i < u->n; i++) {
        fsdp_param *p = &u->p[i];
        if (p->full && p->full->hook == &p->hook) p->full->hook = NULL;
        fl_tensor_release(p->full);
        fl_tensor_release(p->shard);
    }
    fl_tensor_release(u->gather_in);
    fl_tensor_release(u->gather_out);
    fl_tensor_release(u->rs_in);
    fl_tensor_release(u->rs_out);
    free(u->p);
    free(u);
}

void fl_fsdp_group_release(fl_fsdp_group *g) {
    if (!g) return;
    fl_autograd_remove_end_hook(final_pass, g);
    for (int32_t i = 0; i < g->n; i++) unit_free(g->units[i]);
    free(g->units);
    free(g->order);
    free(g);
}

int fl_fsdp_group_merge(fl_fsdp_group *dst, fl_fsdp_group *src) {
    if (dst == src || src->n == 0) return FL_OK;
    if (dst->n_order || src->n_order)
        return fl_fail(FL_ESTATE, "fsdp: cannot merge groups after a forward has run (shard every module first)");
    fl_fsdp_unit **nu = realloc(dst->units, sizeof *nu * (size_t)(dst->n + src->n));
    if (!nu) return fl_fail(FL_ENOMEM, "fsdp: out of memory");
    dst->units = nu;
    dst->cap = dst->n + src->n;
    for (int32_t i = 0; i < src->n; i++) {
        src->units[i]->group = dst;
        dst->units[dst->n++] = src->units[i];
    }
    src->n = 0;
    return FL_OK;
}

static int32_t count_unsharded(const fl_fsdp_group *g, bool freeing_only) {
    int32_t c = 0;
    for (int32_t i = 0; i < g->n; i++) {
        const fl_fsdp_unit *u = g->units[i];
        if (u->state != UNIT_SHARDED && (!freeing_only || u->reshard_after_forward)) c++;
    }
    return c;
}

int32_t fl_fsdp_group_unsharded_count(const fl_fsdp_group *g, bool freeing_only) { return count_unsharded(g, freeing_only); }

int32_t fl_fsdp_group_peak_unsharded(fl_fsdp_group *g, bool reset) {
    int32_t p = g->peak_unsharded;
    if (reset) g->peak_unsharded = count_unsharded(g, true);
    return p;
}

static void note_peak(fl_fsdp_group *g) {
    int32_t c = count_unsharded(g, true);
    if (c > g->peak_unsharded) g->peak_unsharded = c;
}

/* ---- units ---- */

static void param_reachable(fl_leaf_hook *h) { ((fsdp_param *)h)->unit->pending++; }
static int param_ready(fl_leaf_hook *h);

fl_fsdp_unit *fl_fsdp_unit_new(fl_fsdp_group *g, const char *name, fl_comm *shard, fl_comm *replicate, int32_t n,
                               fl_tensor *const *full, int32_t param_dtype, int32_t reduce_dtype,
                               bool reshard_after_forward) {
    if (!g || !shard) return fl_fail_null(FL_EINVAL, "fully_shard %s: needs a group and a shard process group", name);
    bool float_dt = param_dtype == FL_F32 || param_dtype == FL_F64 || param_dtype == FL_BF16 || param_dtype == FL_F16;
    if (!float_dt) return fl_fail_null(FL_EINVAL, "fully_shard %s: param_dtype %s (f32, f64, bf16 or f16)", name, fl_dtype_name(param_dtype));
    if (reduce_dtype != FL_F32 && reduce_dtype != FL_F64 && reduce_dtype != FL_BF16 && reduce_dtype != FL_F16)
        return fl_fail_null(FL_EINVAL, "fully_shard %s: reduce_dtype %s (f32, f64, bf16 or f16)", name, fl_dtype_name(reduce_dtype));
    for (int32_t i = 0; i < n; i++) {
        const fl_tensor *t = full[i];
        if (t->grad_fn || !t->requires_grad)
            return fl_fail_null(FL_EINVAL, "fully_shard %s: parameter %d %s is not a leaf that requires grad", name, i, fl_shape_str(t));
        if (t->hook) return fl_fail_null(FL_EINVAL, "fully_shard %s: parameter %d %s already belongs to a unit", name, i, fl_shape_str(t));
        if (t->dtype != FL_F32 && t->dtype != FL_F64 && t->dtype != FL_BF16 && t->dtype != FL_F16)
            return fl_fail_null(FL_EINVAL, "fully_shard %s: parameter %d %s is %s, not floating point", name, i,
                                fl_shape_str(t), fl_dtype_name(t->dtype));
        if (t->device != FL_META && !fl_tensor_is_contiguous(t))
            return fl_fail_null(FL_EINVAL, "fully_shard %s: parameter %d %s is not contiguous", name, i, fl_shape_str(t));
        for (int32_t j = 0; j < i; j++)
            if (full[j] == t) return fl_fail_null(FL_EINVAL, "fully_shard %s: parameter %d listed twice", name, i);
    }
    fl_fsdp_unit *u = calloc(1, sizeof *u);
    fsdp_param *ps = calloc((size_t)(n > 0 ? n : 1), sizeof *ps);
    if (!u || !ps) { free(u); free(ps); return fl_fail_null(FL_ENOMEM, "fully_shard %s: out of memory", name); }
    if (g->n == g->cap) {
        int32_t cap = g->cap ? g->cap * 2 : 16;
        fl_fsdp_unit **nu = realloc(g->units, sizeof *nu * (size_t)cap);
        if (!nu) { free(u); free(ps); return fl_fail_null(FL_ENOMEM, "fully_shard %s: out of memory", name); }
        g->units = nu;
        g->cap = cap;
    }
    snprintf(u->name, sizeof u->name, "%s", name ? name : "");
    u->group = g;
    u->shard_comm = shard;
    u->rep_comm = replicate;
    u->rank = fl_comm_rank(shard);
    u->world = fl_comm_size(shard);
    u->n = n;
    u->p = ps;
    u->param_dtype = param_dtype;
    u->reduce_dtype = reduce_dtype;
    u->reshard_after_forward = reshard_after_forward;
    u->sync = true;
    u->order = -1;
    int64_t off = 0;
    for (int32_t i = 0; i < n; i++) {
        fsdp_param *p = &ps[i];
        fl_tensor *t = full[i];
        p->unit = u;
        p->hook.reachable = param_reachable;
        p->hook.ready = param_ready;
        p->rows = t->ndim ? t->shape[0] : 1;
        p->row_numel = t->ndim ? fl_shape_numel(t->ndim - 1, t->shape + 1) : 1;
        p->rows_per_rank = fl_shard_rows(p->rows, u->world, u->rank, &p->row0, &p->nrows);
        p->flat_off = off;
        off += p->rows_per_rank * p->row_numel;
        int64_t sshape[FL_MAX_DIMS];
        int32_t snd = t->ndim ? t->ndim : 1;
        if (t->ndim) memcpy(sshape, t->shape, sizeof(int64_t) * (size_t)t->ndim);
        sshape[0] = p->nrows;
        p->shard = fl_tensor_zeros(snd, sshape, FL_F32, FL_CPU);
        if (!p->shard) { u->n = i; unit_free(u); return NULL; }
        fl_tensor_set_category(p->shard, FL_MEM_PARAM);
        if (fl_tensor_has_data(t) && p->nrows > 0) {
            int64_t s1[2] = {p->rows, p->row_numel};
            fl_tensor *flat = fl_view(t, 2, s1);
            bool was = fl_grad_is_enabled();
            fl_grad_set_enabled(false);
            fl_tensor *rows = flat ? fl_narrow(flat, 0, p->row0, p->nrows) : NULL;
            fl_grad_set_enabled(was);
            int rc = rows ? fl_tensor_copy_(p->shard, rows) : FL_EINVAL;
            fl_tensor_release(rows);
            fl_tensor_release(flat);
            if (rc < 0) { u->n = i + 1; p->full = NULL; unit_free(u); return NULL; }
        }
        fl_tensor_set_requires_grad(p->shard, true);
        fl_tensor_retain(t);
        p->full = t;
    }
    u->chunk = off;
    if (fl_comm_check(shard, u->name, param_dtype, u->chunk) < 0) {
        fl_error_prefix("fully_shard");
        for (int32_t i = 0; i < n; i++) ps[i].full = (fl_tensor_release(ps[i].full), NULL);
        unit_free(u);
        return NULL;
    }
    /* Now own the full tensors: sharded state frees their bytes; they come back on unshard, in param_dtype
     * (mixed precision: the module computes with bf16 copies of the f32 shards). */
    for (int32_t i = 0; i < n; i++) {
        fsdp_param *p = &ps[i];
        p->full->hook = &p->hook;
        if (p->full->storage) {
            fl_storage_free_data(p->full->storage);
            p->full->dtype = param_dtype;
            p->full->storage->nbytes = (size_t)fl_tensor_numel(p->full) * esize(param_dtype);
            p->full->storage->device = FL_CPU;
            p->full->device = FL_CPU;
            fl_storage_set_category(p->full->storage, FL_MEM_PARAM_UNSHARDED);
        }
    }
    g->units[g->n++] = u;
    return u;
}

fl_tensor *fl_fsdp_unit_shard(fl_fsdp_unit *u, int32_t i) {
    if (i < 0 || i >= u->n) return fl_fail_null(FL_EINVAL, "fsdp %s: no parameter %d", u->name, i);
    fl_tensor_retain(u->p[i].shard);
    return u->p[i].shard;
}

int64_t fl_fsdp_unit_shard_row0(const fl_fsdp_unit *u, int32_t i) { return i >= 0 && i < u->n ? u->p[i].row0 : -1; }
bool fl_fsdp_is_unsharded(const fl_fsdp_unit *u) { return u->state == UNIT_UNSHARDED; }
void fl_fsdp_set_sync(fl_fsdp_unit *u, bool sync) { u->sync = sync; }

/* Gathers parameter i's f32 shards into out (f32, the full shape): the master weights, also under mixed
 * precision where the unsharded weights are bf16. Collective over the shard group; the unit's state is left
 * as it is. */
int fl_fsdp_gather_param(fl_fsdp_unit *u, int32_t i, fl_tensor *out) {
    if (i < 0 || i >= u->n) return fl_fail(FL_EINVAL, "fsdp %s: no parameter %d", u->name, i);
    fsdp_param *p = &u->p[i];
    if (out->dtype != FL_F32 || !fl_tensor_is_contiguous(out) || fl_tensor_numel(out) != p->rows * p->row_numel)
        return fl_fail(FL_EINVAL, "fsdp %s: gather_param %d needs a contiguous f32 tensor of %" PRId64 " elements, got %s %s",
                       u->name, i, p->rows * p->row_numel, fl_dtype_name(out->dtype), fl_shape_str(out));
    int64_t n1 = p->rows_per_rank * p->row_numel, nw = n1 * u->world;
    fl_tensor *in = fl_tensor_zeros(1, &n1, FL_F32, FL_CPU), *all = fl_tensor_empty(1, &nw, FL_F32, FL_CPU);
    int rc = in && all ? FL_OK : fl_fail(FL_ENOMEM, "fsdp %s: out of memory", u->name);
    if (rc == FL_OK && p->nrows) memcpy(fl_tensor_data(in), fl_tensor_data(p->shard), sizeof(float) * (size_t)(p->nrows * p->row_numel));
    if (rc == FL_OK) rc = fl_all_gather(u->shard_comm, all, in);
    if (rc == FL_OK) {
        /* rank r's padded block starts at r * n1; its real rows are the first nr of them */
        const float *src = fl_tensor_data(all);
        float *dst = fl_tensor_data(out);
        for (int32_t r = 0; r < u->world; r++) {
            int64_t r0, nr;
            fl_shard_rows(p->rows, u->world, r, &r0, &nr);
            if (nr > 0) memcpy(dst + r0 * p->row_numel, src + r * n1, sizeof(float) * (size_t)(nr * p->row_numel));
        }
    }
    fl_tensor_release(in);
    fl_tensor_release(all);
    return rc;
}

/* ---- unshard / reshard ---- */

static int start_gather(fl_fsdp_unit *u) {
    if (u->state != UNIT_SHARDED) return FL_OK;
    int64_t nw = u->chunk * u->world;
    u->gather_out = fl_tensor_empty(1, &nw, u->param_dtype, FL_CPU);
    if (!u->gather_out) return fl_fail(FL_ENOMEM, "fsdp %s: out of memory for the all-gather", u->name);
    fl_tensor_set_category(u->gather_out, FL_MEM_PARAM_UNSHARDED);
    /* In place: this rank's input is its own block of the output (no second buffer). */
    u->gather_in = fl_narrow(u->gather_out, 0, (int64_t)u->rank * u->chunk, u->chunk);
    if (!u->gather_in) return FL_ENOMEM;
    char *in = fl_tensor_data(u->gather_in);
    memset(in, 0, (size_t)u->chunk * esize(u->param_dtype));   /* the padding rows */
    size_t es = esize(u->param_dtype);
    for (int32_t i = 0; i < u->n; i++) {
        fsdp_param *p = &u->p[i];
        if (p->nrows) fl_convert(fl_tensor_data(p->shard), FL_F32, in + (size_t)p->flat_off * es, u->param_dtype, p->nrows * p->row_numel);
        /* allocate the full storage now: copying out after the gather needs it */
        if (fl_tensor_storage_alloc(p->full) < 0) return FL_ENOMEM;
    }
    u->gather_work = fl_all_gather_async(u->shard_comm, u->gather_out, u->gather_in);
    if (!u->gather_work) { fl_error_prefix(u->name); return FL_ECOMM; }
    u->state = UNIT_GATHERING;
    note_peak(u->group);
    return FL_OK;
}

static int finish_gather(fl_fsdp_unit *u) {
    if (u->state != UNIT_GATHERING) return FL_OK;
    int rc = fl_work_wait(u->gather_work);
    u->gather_work = NULL;
    if (rc < 0) return rc;
    const char *out = fl_tensor_data(u->gather_out);
    size_t es = esize(u->param_dtype);
    for (int32_t i = 0; i < u->n; i++) {
        fsdp_param *p = &u->p[i];
        char *dst = fl_tensor_data(p->full);
        for (int32_t r = 0; r < u->world; r++) {
            int64_t r0, nr;
            fl_shard_rows(p->rows, u->world, r, &r0, &nr);
            if (nr > 0)
                memcpy(dst + (size_t)(r0 * p->row_numel) * es, out + (size_t)(r * u->chunk + p->flat_off) * es,
                       (size_t)(nr * p->row_numel) * es);
        }
    }
    fl_tensor_release(u->gather_in);
    fl_tensor_release(u->gather_out);
    u->gather_in = u->gather_out = NULL;
    u->state = UNIT_UNSHARDED;
    return FL_OK;
}

int fl_fsdp_unshard(fl_fsdp_unit *u, bool async) {
    int rc = start_gather(u);
    if (rc == FL_OK && !async) rc = finish_gather(u);
    return rc;
}

int fl_fsdp_reshard(fl_fsdp_unit *u) {
    int rc = finish_gather(u);   /* a prefetch in flight must complete before its buffers go */
    for (int32_t i = 0; i < u->n; i++)
        if (u->p[i].full->storage) fl_storage_free_data(u->p[i].full->storage);
    u->state = UNIT_SHARDED;
    u->reshard_pending = false;
    return rc;
}

/* ---- forward hooks ---- */

static fl_fsdp_unit *neighbour(fl_fsdp_unit *u, int32_t step) {
    fl_fsdp_group *g = u->group;
    if (!g->recorded || u->order < 0) return NULL;
    int32_t k = u->order + step;
    return k >= 0 && k < g->n_order ? g->order[k] : NULL;
}

int fl_fsdp_pre_forward(fl_fsdp_unit *u) {
    fl_fsdp_group *g = u->group;
    int rc = FL_OK;
    if (fl_autograd_depth() == 0) {
        /* Forward has moved on: free the units it finished with (keep_full_weight units never get here). */
        for (int32_t i = 0; i < g->n && rc == FL_OK; i++)
            if (g->units[i] != u && g->units[i]->reshard_pending) rc = fl_fsdp_reshard(g->units[i]);
        if (!g->recorded && u->order < 0) {
            fl_fsdp_unit **no = realloc(g->order, sizeof *no * (size_t)(g->n_order + 1));
            if (!no) return fl_fail(FL_ENOMEM, "fsdp: out of memory");
            g->order = no;
            u->order = g->n_order;
            g->order[g->n_order++] = u;
        }
    }
    u->reshard_pending = false;
    if (rc == FL_OK) rc = fl_fsdp_unshard(u, false);
    if (rc == FL_OK && fl_autograd_depth() == 0) {
        fl_fsdp_unit *next = neighbour(u, 1);
        if (next) rc = fl_fsdp_unshard(next, true);
    }
    return rc;
}

static int pre_backward(fl_node *n, fl_tensor *const *go, fl_tensor **gi) {
    fl_fsdp_unit *u = n->ctx;
    int rc = fl_fsdp_unshard(u, false);
    if (rc == FL_OK) {
        fl_fsdp_unit *prev = neighbour(u, -1);
        if (prev && !prev->reduced) rc = fl_fsdp_unshard(prev, true);
    }
    if (rc < 0) return rc;
    if (go[0]) { fl_tensor_retain(go[0]); gi[0] = go[0]; }
    return FL_OK;
}

fl_tensor *fl_fsdp_post_forward(fl_fsdp_unit *u, fl_tensor *out) {
    if (fl_autograd_depth() == 0 && u->reshard_after_forward) u->reshard_pending = true;
    fl_tensor *v = fl_tensor_view_of(out->storage, out->dtype, out->device, out->ndim, out->shape, out->stride, out->offset);
    if (!v) return NULL;
    const fl_tensor *ins[1] = {out};
    fl_node *n = fl_record("FSDPPreBackward", pre_backward, 1, ins, v);
    if (n) n->ctx = u;   /* the group outlives graphs it made: release the group only between steps */
    return v;
}

/* ---- backward: reduce-scatter ---- */

static int finish_reduce(fl_fsdp_unit *u);

static int start_reduce(fl_fsdp_unit *u) {
    if (u->reduced || !u->sync) return FL_OK;
    /* One reduce-scatter in flight: finishing the previous one first frees its buffers, so backward never
     * holds more than two units' flat gradient buffers. */
    if (u->group->reducing && u->group->reducing != u) {
        int rc = finish_reduce(u->group->reducing);
        if (rc < 0) return rc;
    }
    bool any = false;
    for (int32_t i = 0; i < u->n; i++) any |= u->p[i].full->grad != NULL;
    if (!any) return FL_OK;
    int64_t n1 = u->chunk, nw = u->chunk * u->world;
    u->rs_in = fl_tensor_zeros(1, &nw, u->reduce_dtype, FL_CPU);
    u->rs_out = fl_tensor_empty(1, &n1, u->reduce_dtype, FL_CPU);
    if (!u->rs_in || !u->rs_out) return fl_fail(FL_ENOMEM, "fsdp %s: out of memory for the reduce-scatter", u->name);
    fl_tensor_set_category(u->rs_in, FL_MEM_GRAD);
    fl_tensor_set_category(u->rs_out, FL_MEM_GRAD);
    char *in = fl_tensor_data(u->rs_in);
    size_t es = esize(u->reduce_dtype);
    for (int32_t i = 0; i < u->n; i++) {
        fsdp_param *p = &u->p[i];
        fl_tensor *gr = p->full->grad;
        if (!gr) continue;
        const char *src = fl_tensor_data(gr);
        size_t ges = esize(gr->dtype);
        for (int32_t r = 0; r < u->world; r++) {
            int64_t r0, nr;
            fl_shard_rows(p->rows, u->world, r, &r0, &nr);
            if (nr > 0)
                fl_convert(src + (size_t)(r0 * p->row_numel) * ges, gr->dtype,
                           in + (size_t)(r * u->chunk + p->flat_off) * es, u->reduce_dtype, nr * p->row_numel);
        }
        fl_tensor_set_grad(p->full, NULL);   /* the unsharded gradient is done with */
    }
    u->rs_work = fl_reduce_scatter_async(u->shard_comm, u->rs_out, u->rs_in, FL_REDUCE_AVG);
    if (!u->rs_work) { fl_error_prefix(u->name); return FL_ECOMM; }
    u->reduced = true;
    u->group->reducing = u;
    return FL_OK;
}

/* Waits for the reduce-scatter, averages over the replicas (HSDP) and accumulates into the shards' grads. */
static int finish_reduce(fl_fsdp_unit *u) {
    if (!u->rs_work) return FL_OK;
    int rc = fl_work_wait(u->rs_work);
    u->rs_work = NULL;
    if (u->group->reducing == u) u->group->reducing = NULL;
    fl_tensor_release(u->rs_in);   /* the input is done with as soon as the collective is */
    u->rs_in = NULL;
    if (rc == FL_OK && u->rep_comm && fl_comm_size(u->rep_comm) > 1) rc = fl_all_reduce(u->rep_comm, u->rs_out, FL_REDUCE_AVG);
    const char *out = fl_tensor_data(u->rs_out);
    size_t es = esize(u->reduce_dtype);
    for (int32_t i = 0; rc == FL_OK && i < u->n; i++) {
        fsdp_param *p = &u->p[i];
        int64_t cnt = p->nrows * p->row_numel;
        fl_tensor *g = p->shard->grad;
        if (p->nrows == 0) {
            /* an empty shard (fewer rows than ranks) gets an empty gradient: its optimizer steps with the others',
             * so every rank's state (AdamW's step) stays the same and reshards */
            if (!g) {
                if (!(g = fl_tensor_empty(p->shard->ndim, p->shard->shape, FL_F32, FL_CPU))) { rc = FL_ENOMEM; break; }
                fl_tensor_set_category(g, FL_MEM_GRAD);
                fl_tensor_set_grad(p->shard, g);
                fl_tensor_release(g);
            }
            continue;
        }
        if (!g) {
            g = fl_tensor_empty(p->shard->ndim, p->shard->shape, FL_F32, FL_CPU);
            if (!g) { rc = FL_ENOMEM; break; }
            fl_convert(out + (size_t)p->flat_off * es, u->reduce_dtype, fl_tensor_data(g), FL_F32, cnt);
            fl_tensor_set_category(g, FL_MEM_GRAD);
            fl_tensor_set_grad(p->shard, g);
            fl_tensor_release(g);
        } else {
            float *d = fl_tensor_data(g);
            if (u->reduce_dtype == FL_F32) {
                const float *s = (const float *)fl_tensor_data(u->rs_out) + p->flat_off;
                for (int64_t k = 0; k < cnt; k++) d[k] += s[k];
            } else {
                for (int64_t k = 0; k < cnt; k++) d[k] += (float)fl_load_elem(out, u->reduce_dtype, p->flat_off + k);
            }
        }
    }
    fl_tensor_release(u->rs_in);
    fl_tensor_release(u->rs_out);
    u->rs_in = u->rs_out = NULL;
    return rc;
}

/* The last gradient of the unit landed: reduce it now, overlapping the rest of backward, and free the weights. */
static int param_ready(fl_leaf_hook *h) {
    fl_fsdp_unit *u = ((fsdp_param *)h)->unit;
    if (--u->pending > 0) return FL_OK;
    int rc = start_reduce(u);
    if (rc == FL_OK) rc = fl_fsdp_reshard(u);
    return rc;
}

/* End of the outermost backward: reduce what the ready hooks did not (units reached only through a nested
 * backward, or whose parameters got no gradient here), wait for every reduction, reshard everything. */
static int final_pass(void *ctx) {
    fl_fsdp_group *g = ctx;
    int rc = FL_OK;
    for (int32_t i = 0; i < g->n; i++) {
        fl_fsdp_unit *u = g->units[i];
        int r = finish_gather(u);
        if (r == FL_OK) r = start_reduce(u);
        if (rc == FL_OK) rc = r;
    }
    for (int32_t i = 0; i < g->n; i++) {
        fl_fsdp_unit *u = g->units[i];
        int r = finish_reduce(u);
        if (r == FL_OK) r = fl_fsdp_reshard(u);
        if (rc == FL_OK) rc = r;
        u->pending = 0;
        u->reduced = false;
    }
    if (g->n_order > 0) g->recorded = true;
    return rc;
}
