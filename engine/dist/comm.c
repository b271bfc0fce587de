/* engine/dist/comm.c: process groups (fl_comm) and the collective API: argument and header checks, what each
 * operation does, dist init/finalize/abort. The queue and waits are comm_queue.c's, the reduction reduce.c's.
 *
 * World size 1 without mpirun runs locally (collectives are copies, no MPI). Under mpirun every operation is
 * queued for the communication thread (comm_queue.c), which calls back fl_comm_run here. Before each collective
 * the ranks all-gather a small header (kind, dtype, element count, op, root): a rank that disagrees makes the
 * collective fail on every rank with a message naming it, instead of hanging or corrupting memory. */
#include "comm_internal.h"

#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

enum { TAG_MAX = 32767 /* the MPI_TAG_UB every MPI guarantees */ };
static const double DEFAULT_TIMEOUT_S = 600.0;

const char *const fl_op_names[OP_KINDS] = {"all_gather", "reduce_scatter", "all_reduce", "broadcast", "barrier",
                                           "send", "recv", "comm_check", "comm_split", "comm_release", "resync"};
static const char *const reduce_names[] = {"sum", "avg", "max"};

/* ---- process state: the world group and the bench's switch ---- */
static bool initialized = false;
static fl_comm *world = NULL;
static volatile bool skip_comm = false;

static int32_t world_rank(void) {
    if (world) return world->rank;
    const char *s = getenv("OMPI_COMM_WORLD_RANK");
    return s ? (int32_t)atoi(s) : 0;
}

static fl_comm *comm_new(const char *name, int32_t rank, int32_t size, double timeout, void *mpi) {
    fl_comm *c = calloc(1, sizeof *c);
    int32_t *g = calloc((size_t)size, sizeof *g);
    if (!c || !g) { free(c); free(g); return fl_fail_null(FL_ENOMEM, "comm: out of memory"); }
    snprintf(c->name, sizeof c->name, "%.*s", NAME_MAX_LEN - 1, name ? name : "");
    c->rank = rank;
    c->size = size;
    c->granks = g;
    c->timeout = timeout;
    c->mpi = mpi;
    return c;
}

static void comm_free(fl_comm *c) {
    if (!c) return;
    free(c->granks);
    free(c);
}

/* ---- execution of one operation on an MPI group (communication thread) ---- */

static const char *dtype_str(int64_t d) { return d >= 0 && d < FL_NDTYPES ? fl_dtype_name((int32_t)d) : "?"; }

/* Every rank all-gathers (kind, dtype, numel, op, root) and compares with rank 0's; all fail alike on a mismatch.
 * Nonblocking, so that the thread can post other groups' resync placeholders while a peer has not arrived; a
 * placeholder (OP_RESYNC) from a peer that never issued this collective makes it fail here on every rank. */
static int header_check(fl_work *w) {
    fl_comm *c = w->comm;
    enum { H = HEADER_LEN };
    int64_t mine[H] = {w->kind, w->dtype, w->numel, w->op, w->peer};
    int64_t *all = malloc(sizeof(int64_t) * H * (size_t)c->size);
    if (!all) return fl_fail(FL_ENOMEM, "out of memory");
    void *req = NULL;
    int rc = fl_mpi_iallgather(c->mpi, mine, all, H, sizeof(int64_t), &req);
    if (rc == 0) rc = fl_queue_wait_request(&req);
    if (rc < 0) goto done;
    /* comm_queue.c's complete() prefixes "<what> on group '<name>': " */
    for (int32_t r = 1; r < c->size && rc == 0; r++) {
        const int64_t *h = all + (size_t)r * H, *h0 = all;
        if (h[0] != h0[0]) {
            rc = fl_fail(FL_EINVAL, "rank %d called %s while rank 0 called %s", r, fl_op_names[h[0] % OP_KINDS],
                         fl_op_names[h0[0] % OP_KINDS]);
        } else if (h[1] != h0[1]) {
            rc = fl_fail(FL_EINVAL, "rank %d has dtype %s but rank 0 has %s", r, dtype_str(h[1]), dtype_str(h0[1]));
        } else if (h[2] != h0[2]) {
            rc = fl_fail(FL_EINVAL, "rank %d has %" PRId64 " elements but rank 0 has %" PRId64, r, h[2], h0[2]);
        } else if (h[3] != h0[3]) {
            rc = fl_fail(FL_EINVAL, "rank %d reduces with %s but rank 0 with %s", r, reduce_names[h[3] % 3],
                         reduce_names[h0[3] % 3]);
        } else if (h[4] != h0[4]) {
            rc = fl_fail(FL_EINVAL, "rank %d names root %" PRId64 " but rank 0 names root %" PRId64, r, h[4], h0[4]);
        }
    }
done:
    free(all);
    return rc;
}

/* At world size 1 (or a group of one rank) every collective is a copy or nothing. */
static int run_local(fl_work *w) {
    size_t es = fl_dtype_size(w->dtype);
    switch (w->kind) {
    case OP_ALL_GATHER:
    case OP_REDUCE_SCATTER:
        /* one rank: gather = copy, sum/avg/max of one value = the value (x / 1 is exact) */
        if (fl_tensor_data(w->out) != fl_tensor_data(w->in))
            memmove(fl_tensor_data(w->out), fl_tensor_data(w->in), es * (size_t)w->numel);
        return FL_OK;
    default: return FL_OK;   /* all_reduce, broadcast from 0, barrier, check, split */
    }
}

static int run_collective(fl_work *w) {
    fl_comm *c = w->comm;
    size_t es = fl_dtype_size(w->dtype);
    int rc = header_check(w);
    if (rc < 0 || c->size == 1) return rc < 0 ? rc : run_local(w);
    switch (w->kind) {
    case OP_ALL_GATHER: {
        /* FSDP's shard may be this rank's block of the gathered buffer: MPI then needs MPI_IN_PLACE */
        char *o = fl_tensor_data(w->out);
        const char *i = fl_tensor_data(w->in);
        bool in_place = i == o + (size_t)c->rank * (size_t)w->numel * es;
        return fl_mpi_allgather(c->mpi, in_place ? NULL : i, o, w->numel, es);
    }
    case OP_REDUCE_SCATTER:
        return fl_reduce_chunks(c, fl_tensor_data(w->in), w->numel * c->size, fl_tensor_data(w->out), w->dtype, w->op,
                             true);
    case OP_ALL_REDUCE: {
        void *t = fl_tensor_data(w->out);
        return fl_reduce_chunks(c, t, w->numel, t, w->dtype, w->op, false);
    }
    case OP_BROADCAST: return fl_mpi_bcast(c->mpi, fl_tensor_data(w->out), w->numel, es, w->peer);
    case OP_BARRIER: return fl_mpi_barrier(c->mpi);
    case OP_CHECK: return FL_OK;   /* the header check was the whole job */
    default: assert(!"run_collective: not a collective"); return FL_ECOMM;
    }
}

/* The same 64 bits on every member of the new group: the parent's uid, its split count and the color. */
static uint64_t split_uid(uint64_t parent, int32_t nth, int32_t color) {
    uint64_t x = parent * 0x9e3779b97f4a7c15ull + ((uint64_t)(uint32_t)nth << 32 | (uint32_t)color);
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27; x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static int run_split(fl_work *w) {
    /* The header first: MPI_Comm_split blocks, so it may only start once every rank is known to be in it. */
    int rc = header_check(w);
    if (rc < 0) return rc;
    void *g = NULL;
    int32_t rank = 0, size = 1;
    rc = fl_mpi_split(w->comm->mpi, w->color, w->key, &g, &rank, &size);
    if (rc < 0) return rc;
    fl_comm *n = comm_new(w->what, rank, size, w->comm->timeout, g);
    if (!n) { fl_mpi_free(g); return FL_ENOMEM; }
    rc = fl_mpi_global_ranks(g, size, n->granks);
    if (rc < 0) { fl_mpi_free(g); comm_free(n); return rc; }
    n->uid = split_uid(w->comm->uid, ++w->comm->nsplits, w->color);
    if (w->color_control) n->control = true;
    else fl_registry_add(n);
    w->result = n;
    return FL_OK;
}

int fl_comm_run(fl_work *w) { return w->kind == OP_SPLIT ? run_split(w) : run_collective(w); }

void fl_comm_destroy(fl_comm *c) {
    fl_mpi_free(c->mpi);
    comm_free(c);
}

/* ---- lifecycle ---- */

int fl_dist_init(double timeout_s) {
    if (initialized) return FL_OK;
    double timeout = timeout_s > 0 ? timeout_s : DEFAULT_TIMEOUT_S;
    if (!fl_mpi_launched()) {
        world = comm_new("world", 0, 1, timeout, NULL);
        if (!world) return FL_ENOMEM;
        world->world = true;
        initialized = true;
        return FL_OK;
    }
    void *g = NULL;
    int32_t rank = 0, size = 1;
    int rc = fl_mpi_init(&g, &rank, &size);
    if (rc < 0) return rc;
    world = comm_new("world", rank, size, timeout, g);
    if (!world) { fl_mpi_free(g); return FL_ENOMEM; }   /* comm_new set the message */
    for (int32_t i = 0; i < size; i++) world->granks[i] = i;
    world->world = true;
    world->uid = 1;
    rc = fl_queue_start(size);
    if (rc == 0) fl_registry_add(world);
    if (rc < 0) {   /* the world group does not outlive a failed init (MPI itself stays up) */
        fl_mpi_free(g);
        comm_free(world);
        world = NULL;
        return rc;
    }
    initialized = true;
    return FL_OK;
}

bool fl_dist_is_initialized(void) { return initialized; }

fl_comm *fl_comm_world(void) { return world; }

int fl_dist_finalize(void) {
    if (!initialized) return FL_OK;
    int rc = FL_OK;
    if (fl_queue_running()) {
        fl_mpi_announce(0);   /* first: a peer waiting for us in a collective fails now, not at its timeout */
        fl_queue_drain();
        rc = fl_mpi_finalize(world->mpi);
        fl_queue_end();
    }
    comm_free(world);
    world = NULL;
    initialized = false;
    return rc;
}

static int32_t abort_code = 1;
static void *abort_watchdog(void *arg) {
    (void)arg;
    struct timespec ts = {5, 0};
    nanosleep(&ts, NULL);
    _exit(abort_code);
    return NULL;
}

void fl_dist_exit(int32_t code, const char *msg, bool mpi_abort) {
    if (code == 0) code = 1;
    fflush(stdout);
    if (msg) {
        /* every line prefixed, so that interleaved output of several ranks stays attributable */
        int32_t r = world_rank();
        const char *p = msg;
        while (*p) {
            const char *nl = strchr(p, '\n');
            int len = nl ? (int)(nl - p) : (int)strlen(p);
            fprintf(stderr, "[rank %d] %.*s\n", r, len, p);
            p += len + (nl ? 1 : 0);
        }
        fflush(stderr);
    }
    bool use_mpi = fl_queue_running();
    if (use_mpi) fl_mpi_announce(1);   /* peers waiting for us in finalize leave instead of hanging */
    if (use_mpi && mpi_abort) {
        /* MPI_Abort can block when a peer sits in MPI_Finalize; exiting without finalize also makes mpirun end
         * the job, so a watchdog does that if the abort has not returned within a few seconds. */
        pthread_t t;
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        abort_code = code;
        pthread_create(&t, &a, abort_watchdog, NULL);
        pthread_attr_destroy(&a);
        fl_mpi_abort(code);
    }
    _exit(code);
}

void fl_dist_abort(int32_t code, const char *msg) { fl_dist_exit(code, msg, true); }

/* ---- groups ---- */

/* Every live group's timeout (the REPL's short interactive timeout); control groups keep theirs. */
static void set_timeout_of(fl_comm *c, void *arg) { c->timeout = *(const double *)arg; }
void fl_comm_set_timeout_all(double seconds) {
    if (!(seconds > 0) || !world) return;
    world->timeout = seconds;   /* also a world of one rank, which is in no registry */
    fl_registry_each(set_timeout_of, &seconds);
}

int32_t fl_comm_rank(const fl_comm *c) { return c ? c->rank : -1; }
int32_t fl_comm_size(const fl_comm *c) { return c ? c->size : 0; }
const char *fl_comm_name(const fl_comm *c) { return c ? c->name : ""; }
void fl_comm_set_timeout(fl_comm *c, double seconds) { if (c && seconds > 0) c->timeout = seconds; }
double fl_comm_get_timeout(const fl_comm *c) { return c ? c->timeout : 0; }

int32_t fl_comm_global_rank(const fl_comm *c, int32_t group_rank) {
    if (!c || group_rank < 0 || group_rank >= c->size) return -1;
    return c->granks[group_rank];
}

static fl_comm *split(fl_comm *c, int32_t color, int32_t key, const char *name, bool control) {
    if (!c) return fl_fail_null(FL_EINVAL, "comm_split: no group (call fl_dist_init first)");
    if (color < 0) return fl_fail_null(FL_EINVAL, "comm_split: color %d is negative", color);
    if (!name || !*name) return fl_fail_null(FL_EINVAL, "comm_split: the new group needs a name");
    if (strlen(name) >= NAME_MAX_LEN)
        return fl_fail_null(FL_EINVAL, "comm_split: name '%s' is longer than %d characters", name, NAME_MAX_LEN - 1);
    if (c->control) return fl_fail_null(FL_EINVAL, "comm_split: group '%s' is a control group", c->name);
    if (!c->mpi) {
        fl_comm *n = comm_new(name, 0, 1, c->timeout, NULL);
        if (n) { n->granks[0] = c->granks[0]; n->control = control; }
        return n;
    }
    fl_work *w = fl_work_new(OP_SPLIT, c);
    if (!w) return NULL;
    w->color = color;
    w->key = key;
    w->color_control = control;
    snprintf(w->what, sizeof w->what, "%s", name);
    fl_queue_push(w);
    fl_comm *n = fl_work_wait_done(w) < 0 ? NULL : w->result;
    if (!w->abandoned) fl_work_free(w);   /* an abandoned split is the queue's, and so is the group it makes */
    return n;
}

fl_comm *fl_comm_split(fl_comm *c, int32_t color, int32_t key, const char *name) {
    return split(c, color, key, name, false);
}

fl_comm *fl_comm_control_new(fl_comm *c, const char *name) {
    fl_comm *n = split(c, 0, c ? c->rank : 0, name, true);
    if (n) n->timeout = 1e300;   /* the REPL's other ranks wait here while rank 0's user types */
    return n;
}

void fl_comm_release(fl_comm *c) {
    if (!c || c->world) return;
    if (!c->mpi || !fl_queue_running()) {
        fl_mpi_free(c->mpi);   /* local, or MPI already finalized: only our memory is left to free */
        comm_free(c);
        return;
    }
    /* Queued, so that operations still in flight on c finish first; nobody waits for it. */
    fl_work *w = fl_work_new(OP_FREE, c);
    if (!w) return;
    fl_queue_push(w);
}

/* ---- issuing ---- */

static int check_tensor(const char *op, const fl_tensor *t, const char *which) {
    if (!t) return fl_fail(FL_EINVAL, "%s: missing %s tensor", op, which);
    if (t->device != FL_CPU)
        return fl_fail(FL_EUNSUPPORTED, "%s: %s tensor %s is on %s; the MPI backend takes CPU tensors", op, which,
                       fl_shape_str(t), t->device == FL_META ? "meta" : "cuda");
    if (fl_check_cpu_data(op, t) < 0) return FL_ESTATE;
    if (!fl_tensor_is_contiguous(t))
        return fl_fail(FL_EINVAL, "%s: %s tensor %s is not contiguous", op, which, fl_shape_str(t));
    if (fl_tensor_numel(t) > INT_MAX)
        return fl_fail(FL_EUNSUPPORTED, "%s: %s tensor has %" PRId64 " elements; MPI counts stop at %d", op, which,
                       fl_tensor_numel(t), INT_MAX);
    return FL_OK;
}

static int check_reduce(const char *op, int32_t dtype, int32_t rop) {
    if (rop != FL_REDUCE_SUM && rop != FL_REDUCE_AVG && rop != FL_REDUCE_MAX)
        return fl_fail(FL_EINVAL, "%s: unknown reduce op %d (sum, avg, max)", op, rop);
    bool fl = dtype == FL_F32 || dtype == FL_F64 || dtype == FL_BF16 || dtype == FL_F16;
    if (!fl && dtype != FL_I32 && dtype != FL_I64)
        return fl_fail(FL_EINVAL, "%s: cannot reduce %s tensors (f32, f64, bf16, f16, i32, i64)", op,
                       fl_dtype_name(dtype));
    if (!fl && rop == FL_REDUCE_AVG)
        return fl_fail(FL_EINVAL, "%s: avg needs a floating dtype, got %s", op, fl_dtype_name(dtype));
    return FL_OK;
}

static int check_comm(const char *op, const fl_comm *c) {
    if (!c) return fl_fail(FL_EINVAL, "%s: no group (call fl_dist_init first)", op);
    return FL_OK;
}

/* A control group's operation, on the calling thread with nonblocking MPI (no header exchange: the REPL's own
 * protocol is the only user, and a header would queue behind nothing here anyway). */
static int run_control(fl_work *w) {
    fl_comm *c = w->comm;
    size_t es = fl_dtype_size(w->dtype);
    void *req = NULL;
    int rc;
    switch (w->kind) {
    case OP_ALL_GATHER: {
        char *o = fl_tensor_data(w->out);
        const char *i = fl_tensor_data(w->in);
        if (i == o + (size_t)c->rank * (size_t)w->numel * es)
            return fl_fail(FL_EINVAL, "in-place all_gather is not supported on a control group");
        rc = fl_mpi_iallgather(c->mpi, i, o, w->numel, es, &req);
        break;
    }
    case OP_BROADCAST: rc = fl_mpi_ibcast(c->mpi, fl_tensor_data(w->out), w->numel, es, w->peer, &req); break;
    case OP_BARRIER: rc = fl_mpi_ibarrier(c->mpi, &req); break;
    default:
        return fl_fail(FL_EUNSUPPORTED, "a control group runs all_gather, broadcast and barrier only");
    }
    if (rc < 0) return rc;
    return fl_queue_wait_direct(c, &req, fl_op_names[w->kind]);
}

/* Queues w (MPI) or runs it now (local); with skip set, completes it untouched. */
static fl_work *issue(fl_work *w) {
    if (skip_comm && w->kind != OP_CHECK && !w->comm->control) {
        w->done = true;
        return w;
    }
    if (w->comm->control && w->comm->mpi) {
        w->rc = run_control(w);
        if (w->rc < 0)
            snprintf(w->err, sizeof w->err, "%s on group '%s': %s", fl_op_names[w->kind], w->comm->name,
                     fl_last_error());
        w->done = true;
        return w;
    }
    if (w->comm->mpi) {
        fl_queue_push(w);
        return w;
    }
    if (w->kind == OP_SEND || w->kind == OP_RECV) {
        /* One local rank: a message to oneself would need a matching pair posted by this same thread. */
        fl_fail(FL_EUNSUPPORTED, "%s: group '%s' has one rank and no MPI; send/recv need mpirun (fsdp-lua -n N)",
                fl_op_names[w->kind], w->comm->name);
        fl_work_free(w);
        return NULL;
    }
    int rc = run_local(w);
    w->rc = rc;
    w->done = true;
    return w;
}

fl_work *fl_all_gather_async(fl_comm *c, fl_tensor *out, const fl_tensor *in) {
    const char *op = "all_gather";
    if (check_comm(op, c) < 0 || check_tensor(op, out, "output") < 0 || check_tensor(op, in, "input") < 0) return NULL;
    if (fl_check_same_dtype(op, out, in) < 0) return NULL;
    int64_t n = fl_tensor_numel(in);
    if (fl_tensor_numel(out) != n * c->size)
        return fl_fail_null(FL_EINVAL, "all_gather: output %s has %" PRId64 " elements, expected %d ranks x %" PRId64
                            " (input %s) on group '%s'", fl_shape_str(out), fl_tensor_numel(out), c->size, n,
                            fl_shape_str(in), c->name);
    /* The input may be this rank's block of the output (in place), or apart from it. */
    size_t es = fl_dtype_size(in->dtype), ib = es * (size_t)n, ob = ib * (size_t)c->size;
    const char *ip = fl_tensor_data(in), *op_ = fl_tensor_data(out);
    if (n > 0 && ip < op_ + ob && op_ < ip + ib && ip != op_ + (size_t)c->rank * ib)
        return fl_fail_null(FL_EINVAL, "all_gather: input %s overlaps output %s other than as rank %d's block",
                            fl_shape_str(in), fl_shape_str(out), c->rank);
    double t0 = fl_comm_now();
    fl_work *w = fl_work_new(OP_ALL_GATHER, c);
    if (!w) return NULL;
    fl_tensor_retain(out);
    fl_tensor_retain((fl_tensor *)in);
    w->out = out;
    w->in = (fl_tensor *)in;
    w->dtype = in->dtype;
    w->numel = n;
    w = issue(w);
    fl_queue_add_time(t0);
    return w;
}

fl_work *fl_reduce_scatter_async(fl_comm *c, fl_tensor *out, const fl_tensor *in, int32_t rop) {
    const char *op = "reduce_scatter";
    if (check_comm(op, c) < 0 || check_tensor(op, out, "output") < 0 || check_tensor(op, in, "input") < 0) return NULL;
    if (fl_check_same_dtype(op, out, in) < 0 || check_reduce(op, in->dtype, rop) < 0) return NULL;
    int64_t n = fl_tensor_numel(out);
    if (fl_tensor_numel(in) != n * c->size)
        return fl_fail_null(FL_EINVAL, "reduce_scatter: input %s has %" PRId64 " elements, expected %d ranks x %" PRId64
                            " (output %s) on group '%s'", fl_shape_str(in), fl_tensor_numel(in), c->size, n,
                            fl_shape_str(out), c->name);
    double t0 = fl_comm_now();
    fl_work *w = fl_work_new(OP_REDUCE_SCATTER, c);
    if (!w) return NULL;
    fl_tensor_retain(out);
    fl_tensor_retain((fl_tensor *)in);
    w->out = out;
    w->in = (fl_tensor *)in;
    w->dtype = in->dtype;
    w->numel = n;
    w->op = rop;
    w = issue(w);
    fl_queue_add_time(t0);
    return w;
}

/* Queues a collective that works in place on t (all_reduce, broadcast). */
static fl_work *issue_in_place(op_kind kind, fl_comm *c, fl_tensor *t, int32_t rop, int32_t peer) {
    double t0 = fl_comm_now();
    fl_work *w = fl_work_new(kind, c);
    if (!w) return NULL;
    fl_tensor_retain(t);
    w->out = t;
    w->dtype = t->dtype;
    w->numel = fl_tensor_numel(t);
    w->op = rop;
    w->peer = peer;
    w = issue(w);
    fl_queue_add_time(t0);
    return w;
}

fl_work *fl_all_reduce_async(fl_comm *c, fl_tensor *t, int32_t rop) {
    const char *op = "all_reduce";
    if (check_comm(op, c) < 0 || check_tensor(op, t, "") < 0 || check_reduce(op, t->dtype, rop) < 0) return NULL;
    return issue_in_place(OP_ALL_REDUCE, c, t, rop, 0);
}

fl_work *fl_broadcast_async(fl_comm *c, fl_tensor *t, int32_t root) {
    const char *op = "broadcast";
    if (check_comm(op, c) < 0 || check_tensor(op, t, "") < 0) return NULL;
    if (root < 0 || root >= c->size)
        return fl_fail_null(FL_EINVAL, "broadcast: root %d is not a rank of group '%s' (size %d)", root, c->name, c->size);
    return issue_in_place(OP_BROADCAST, c, t, 0, root);
}

fl_work *fl_barrier_async(fl_comm *c) {
    if (check_comm("barrier", c) < 0) return NULL;
    double t0 = fl_comm_now();
    fl_work *w = fl_work_new(OP_BARRIER, c);
    if (!w) return NULL;
    w = issue(w);
    fl_queue_add_time(t0);
    return w;
}

static fl_work *p2p(op_kind kind, fl_comm *c, fl_tensor *t, int32_t peer, int32_t tag) {
    const char *op = fl_op_names[kind];
    if (check_comm(op, c) < 0 || check_tensor(op, t, "") < 0) return NULL;
    if (peer < 0 || peer >= c->size)
        return fl_fail_null(FL_EINVAL, "%s: rank %d is not in group '%s' (size %d)", op, peer, c->name, c->size);
    if (tag < 0 || tag > TAG_MAX) return fl_fail_null(FL_EINVAL, "%s: tag %d is outside 0..%d", op, tag, TAG_MAX);
    double t0 = fl_comm_now();
    fl_work *w = fl_work_new(kind, c);
    if (!w) return NULL;
    fl_tensor_retain(t);
    if (kind == OP_SEND) w->in = t; else w->out = t;
    w->dtype = t->dtype;
    w->numel = fl_tensor_numel(t);
    w->peer = peer;
    w->tag = tag;
    w = issue(w);
    fl_queue_add_time(t0);
    return w;
}

fl_work *fl_send_async(fl_comm *c, const fl_tensor *t, int32_t dst, int32_t tag) {
    return p2p(OP_SEND, c, (fl_tensor *)t, dst, tag);
}

fl_work *fl_recv_async(fl_comm *c, fl_tensor *t, int32_t src, int32_t tag) { return p2p(OP_RECV, c, t, src, tag); }

int fl_comm_check(fl_comm *c, const char *what, int32_t dtype, int64_t numel) {
    if (check_comm("comm_check", c) < 0) return FL_EINVAL;
    fl_work *w = fl_work_new(OP_CHECK, c);
    if (!w) return FL_ENOMEM;
    snprintf(w->what, sizeof w->what, "%s", what && *what ? what : "comm_check");
    w->dtype = dtype;
    w->numel = numel;
    w = issue(w);
    return fl_work_wait(w);
}

/* ---- blocking forms ---- */
int fl_all_gather(fl_comm *c, fl_tensor *out, const fl_tensor *in) {
    fl_work *w = fl_all_gather_async(c, out, in);
    return w ? fl_work_wait(w) : fl_last_status();   /* the async call's own code */
}
int fl_reduce_scatter(fl_comm *c, fl_tensor *out, const fl_tensor *in, int32_t op) {
    fl_work *w = fl_reduce_scatter_async(c, out, in, op);
    return w ? fl_work_wait(w) : fl_last_status();   /* the async call's own code */
}
int fl_all_reduce(fl_comm *c, fl_tensor *t, int32_t op) {
    fl_work *w = fl_all_reduce_async(c, t, op);
    return w ? fl_work_wait(w) : fl_last_status();   /* the async call's own code */
}
int fl_broadcast(fl_comm *c, fl_tensor *t, int32_t root) {
    fl_work *w = fl_broadcast_async(c, t, root);
    return w ? fl_work_wait(w) : fl_last_status();   /* the async call's own code */
}
int fl_barrier(fl_comm *c) {
    fl_work *w = fl_barrier_async(c);
    return w ? fl_work_wait(w) : fl_last_status();   /* the async call's own code */
}
int fl_send(fl_comm *c, const fl_tensor *t, int32_t dst, int32_t tag) {
    fl_work *w = fl_send_async(c, t, dst, tag);
    return w ? fl_work_wait(w) : fl_last_status();   /* the async call's own code */
}
int fl_recv(fl_comm *c, fl_tensor *t, int32_t src, int32_t tag) {
    fl_work *w = fl_recv_async(c, t, src, tag);
    return w ? fl_work_wait(w) : fl_last_status();   /* the async call's own code */
}

/* ---- the bench's switch ---- */
void fl_comm_set_skip(bool skip) { skip_comm = skip; }
