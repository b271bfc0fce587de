/* engine/dist/comm.c: process groups (fl_comm), collectives and their async handles (fl_work). World size 1 without
 * mpirun runs locally (collectives are copies, no MPI). Under mpirun, one communication thread per process runs
 * every queued operation in issue order, so collectives progress while the caller computes and every rank sees
 * the same order; the MPI calls themselves are comm_mpi.c's.
 *
 * Reductions are deterministic and the same for all_reduce and reduce_scatter: each rank receives its chunk from
 * every rank (all-to-all) and sums them in rank order 0, 1, ..., N-1 (bf16/f16 in f32, rounded once at the end;
 * avg divides that sum by N). An element of all_reduce therefore has the same bits as the same element of a
 * reduce_scatter, whatever MPI's own algorithms are. Before each collective the ranks all-gather a small header
 * (kind, dtype, element count, op, root): a rank that disagrees makes the collective fail on every rank with a
 * message naming it, instead of hanging or corrupting memory. */
#include "internal.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>


enum { NAME_MAX_LEN = 64, ERR_LEN = 1024, TAG_MAX = 32767 /* the MPI_TAG_UB every MPI guarantees */ };
static const double DEFAULT_TIMEOUT_S = 600.0;

struct fl_comm {
    char name[NAME_MAX_LEN];
    int32_t rank, size;
    int32_t *granks;   /* [size]: world rank of each group rank */
    double timeout;    /* seconds a wait may block before the job is aborted */
    void *mpi;         /* comm_mpi.c's group; NULL for a local (no MPI) group */
    bool world;
};

typedef enum {
    OP_ALL_GATHER, OP_REDUCE_SCATTER, OP_ALL_REDUCE, OP_BROADCAST, OP_BARRIER, OP_SEND, OP_RECV, OP_CHECK,
    OP_SPLIT, OP_FREE
} op_kind;
static const char *const op_names[] = {"all_gather", "reduce_scatter", "all_reduce", "broadcast", "barrier",
                                       "send", "recv", "comm_check", "comm_split", "comm_release"};
static const char *const reduce_names[] = {"sum", "avg", "max"};

struct fl_work {
    op_kind kind;
    fl_comm *comm;
    fl_tensor *out, *in;    /* retained until the wait; `out` is the tensor written (t for in-place ops) */
    int32_t dtype, op, peer, tag;
    int64_t numel;          /* elements of `in` (all_gather), of `out` (reduce_scatter), of t otherwise */
    int32_t color, key;     /* split */
    char what[NAME_MAX_LEN * 2]; /* check: the caller's label; split: the new group's name */
    fl_comm *result;        /* split */
    void *req;              /* send/recv: the posted MPI request */
    double t_issue;
    bool done;
    int rc;
    char err[ERR_LEN];
    fl_work *next;
};

/* ---- process state: the world group, the queue and its thread, timing ---- */
static bool initialized = false;
static bool use_mpi = false;
static fl_comm *world = NULL;
static pthread_t comm_thread;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t q_cond, done_cond;   /* work queued / work completed; CLOCK_MONOTONIC */
static fl_work *q_head = NULL, *q_tail = NULL;
static bool q_stop = false;
static int64_t inflight = 0;               /* queued or posted, not yet complete (under mu) */
static double comm_time = 0;               /* under mu: the calling threads' time in collectives */
static double busy_time = 0;               /* under mu: the communication thread's time executing them */
static volatile bool skip_comm = false;

/* Peers that have left the job (comm_mpi.c's departure channel), by world rank. A wait that involves one of
 * them fails once DEPARTURE_GRACE_S have passed since both the departure and the wait began: long enough for a
 * collective the peer did finish before leaving to complete here too, short against the timeout. */
static const double DEPARTURE_GRACE_S = 2.0, WAIT_SLICE_S = 0.1;
static pthread_mutex_t departed_mu = PTHREAD_MUTEX_INITIALIZER;   /* serialises polls of the channel */
static double *departed_at = NULL;                                 /* [world size]: 0, or when it was seen */
static double aborting_since = 0;   /* when a peer announced that it aborts the job (0: none has) */
static int32_t departed_member(const fl_comm *c, double *since);
static void departed_abort(int32_t gone, const char *what, const char *group);

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static struct timespec abs_time(double t) {
    struct timespec ts;
    ts.tv_sec = (time_t)t;
    ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
    return ts;
}

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

/* ---- local reductions (communication thread) ---- */

/* Scratch buffers of the communication thread, grown as needed and kept: a fresh allocation per collective
 * would page-fault its way through every byte again. */
static void *scratch_recv = NULL, *scratch_acc = NULL;
static size_t scratch_recv_n = 0, scratch_acc_n = 0;

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

/* ---- execution of one operation on an MPI group (communication thread) ---- */

static const char *dtype_str(int64_t d) { return d >= 0 && d < FL_NDTYPES ? fl_dtype_name((int32_t)d) : "?"; }

/* Every rank all-gathers (kind, dtype, numel, op, root) and compares with rank 0's; all fail alike on a mismatch. */
static int header_check(fl_work *w) {
    fl_comm *c = w->comm;
    enum { H = 5 };
    int64_t mine[H] = {w->kind, w->dtype, w->numel, w->op, w->peer};
    int64_t *all = malloc(sizeof(int64_t) * H * (size_t)c->size);
    if (!all) return fl_fail(FL_ENOMEM, "out of memory");
    int rc = fl_mpi_allgather(c->mpi, mine, all, H, sizeof(int64_t));
    if (rc < 0) goto done;
    /* complete() prefixes "<what> on group '<name>': " */
    for (int32_t r = 1; r < c->size && rc == 0; r++) {
        const int64_t *h = all + (size_t)r * H, *h0 = all;
        if (h[0] != h0[0]) {
            rc = fl_fail(FL_EINVAL, "rank %d called %s while rank 0 called %s", r, op_names[h[0] % 10],
                         op_names[h0[0] % 10]);
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

/* Chunk r of n elements split N ways: rows [r*c, min(n, (r+1)*c)) with c = ceil(n/N). */
static void chunk(int64_t n, int32_t N, int32_t r, int64_t *start, int64_t *len) {
    int64_t c = (n + N - 1) / N;
    int64_t s = fl_min64(n, (int64_t)r * c), e = fl_min64(n, (int64_t)(r + 1) * c);
    *start = s;
    *len = e - s;
}

/* Receives chunk `me` of every rank's `in` (chunk p of rank p's buffer at p*len(me)) and reduces in rank order. */
static int reduce_chunks(fl_comm *c, const void *in, int64_t n, void *out, int32_t dtype, int32_t op,
                         bool equal_chunks) {
    int32_t N = c->size, me = c->rank;
    size_t es = fl_dtype_size(dtype);
    int *sc = malloc(sizeof(int) * 4 * (size_t)N);
    if (!sc) return fl_fail(FL_ENOMEM, "out of memory");
    int *sd = sc + N, *rcnt = sc + 2 * N, *rd = sc + 3 * N;
    int64_t my_start, my_len;
    if (equal_chunks) { my_len = n / N; my_start = (int64_t)me * my_len; }
    else chunk(n, N, me, &my_start, &my_len);
    for (int32_t p = 0; p < N; p++) {
        int64_t s, l;
        if (equal_chunks) { l = n / N; s = (int64_t)p * l; }
        else chunk(n, N, p, &s, &l);
        sc[p] = (int)l;
        sd[p] = (int)s;
        rcnt[p] = (int)my_len;
        rd[p] = (int)((int64_t)p * my_len);
    }
    int rc = FL_OK;
    size_t need = es * (size_t)(my_len * N);
    void *buf = scratch(&scratch_recv, &scratch_recv_n, need + 64);
    float *acc = es == 2 ? scratch(&scratch_acc, &scratch_acc_n, sizeof(float) * (size_t)my_len + 64) : NULL;
    if (!buf || (es == 2 && !acc)) { rc = fl_fail(FL_ENOMEM, "out of memory for %zu bytes of receive buffer", need); goto done; }
    rc = fl_mpi_alltoallv(c->mpi, in, sc, sd, buf, rcnt, rd, es);
    if (rc < 0) goto done;
    reduce_ranks((char *)out + (equal_chunks ? 0 : (size_t)my_start * es), buf, my_len, N, my_len, dtype, op, acc);
    if (!equal_chunks) rc = fl_mpi_allgatherv_inplace(c->mpi, out, sc, sd, es);
done:
    free(sc);
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
        return reduce_chunks(c, fl_tensor_data(w->in), w->numel * c->size, fl_tensor_data(w->out), w->dtype, w->op,
                             true);
    case OP_ALL_REDUCE: {
        void *t = fl_tensor_data(w->out);
        return reduce_chunks(c, t, w->numel, t, w->dtype, w->op, false);
    }
    case OP_BROADCAST: return fl_mpi_bcast(c->mpi, fl_tensor_data(w->out), w->numel, es, w->peer);
    case OP_BARRIER: return fl_mpi_barrier(c->mpi);
    case OP_CHECK: return FL_OK;   /* the header check was the whole job */
    default: assert(!"run_collective: not a collective"); return FL_ECOMM;
    }
}

static int run_split(fl_work *w) {
    void *g = NULL;
    int32_t rank = 0, size = 1;
    int rc = fl_mpi_split(w->comm->mpi, w->color, w->key, &g, &rank, &size);
    if (rc < 0) return rc;
    fl_comm *n = comm_new(w->what, rank, size, w->comm->timeout, g);
    if (!n) { fl_mpi_free(g); return FL_ENOMEM; }
    rc = fl_mpi_global_ranks(g, size, n->granks);
    if (rc < 0) { fl_mpi_free(g); comm_free(n); return rc; }
    w->result = n;
    return FL_OK;
}

/* ---- the communication thread ---- */

static void complete(fl_work *w, int rc) {
    pthread_mutex_lock(&mu);
    w->rc = rc;
    if (rc < 0) {
        const char *what = w->kind == OP_CHECK ? w->what : op_names[w->kind];
        snprintf(w->err, sizeof w->err, "%s on group '%s': %s", what, w->comm->name, fl_last_error());
    }
    w->done = true;
    inflight--;
    pthread_cond_broadcast(&done_cond);
    pthread_mutex_unlock(&mu);
}

/* Posted sends/receives, owned by the communication thread; MPI progresses them inside every MPI call. */
typedef struct { fl_work **w; int32_t n, cap; } pending_list;

static int post_p2p(fl_work *w, pending_list *pl) {
    size_t es = fl_dtype_size(w->dtype);
    if (pl->n == pl->cap) {
        int32_t cap = pl->cap ? 2 * pl->cap : 16;
        fl_work **nw = realloc(pl->w, sizeof *nw * (size_t)cap);
        if (!nw) return fl_fail(FL_ENOMEM, "out of memory");
        pl->w = nw;
        pl->cap = cap;
    }
    int rc = w->kind == OP_SEND
                 ? fl_mpi_isend(w->comm->mpi, fl_tensor_data(w->in), w->numel, es, w->peer, w->tag, &w->req)
                 : fl_mpi_irecv(w->comm->mpi, fl_tensor_data(w->out), w->numel, es, w->peer, w->tag, &w->req);
    if (rc == 0) pl->w[pl->n++] = w;
    return rc;
}

/* Tests every posted send/receive once; returns how many completed. */
static int32_t progress_p2p(pending_list *pl) {
    int32_t finished = 0;
    for (int32_t i = 0; i < pl->n;) {
        fl_work *w = pl->w[i];
        bool done = false;
        int64_t bytes = 0;
        int rc = fl_mpi_test(&w->req, &done, &bytes);
        if (!done) { i++; continue; }
        int64_t want = w->numel * (int64_t)fl_dtype_size(w->dtype);
        if (rc == 0 && w->kind == OP_RECV && bytes != want)
            rc = fl_fail(FL_EINVAL, "expected %" PRId64 " elements of %s (%" PRId64 " bytes) from rank %d (tag %d), "
                         "got %" PRId64 " bytes", w->numel, fl_dtype_name(w->dtype), want, w->peer, w->tag, bytes);
        pl->w[i] = pl->w[--pl->n];
        complete(w, rc);
        finished++;
    }
    return finished;
}

static void execute(fl_work *w, pending_list *pl) {
    int rc;
    switch (w->kind) {
    case OP_SEND:
    case OP_RECV:
        rc = post_p2p(w, pl);
        if (rc < 0) complete(w, rc);
        return;
    case OP_SPLIT: rc = run_split(w); break;
    case OP_FREE:
        fl_mpi_free(w->comm->mpi);
        comm_free(w->comm);
        free(w);   /* nobody waits for a release */
        pthread_mutex_lock(&mu);
        inflight--;
        pthread_cond_broadcast(&done_cond);
        pthread_mutex_unlock(&mu);
        return;
    default: rc = run_collective(w); break;
    }
    complete(w, rc);
}

static void *comm_main(void *arg) {
    (void)arg;
    pending_list pl = {0};
    double idle = 0;   /* back-off between tests of posted sends/receives when nothing else is queued */
    pthread_mutex_lock(&mu);
    for (;;) {
        if (q_head) {
            fl_work *w = q_head;
            q_head = w->next;
            if (!q_head) q_tail = NULL;
            pthread_mutex_unlock(&mu);
            double t0 = now_s();
            execute(w, &pl);
            if (pl.n) progress_p2p(&pl);
            double dt = now_s() - t0;
            pthread_mutex_lock(&mu);
            busy_time += dt;
            continue;
        }
        if (pl.n) {
            pthread_mutex_unlock(&mu);
            int32_t k = progress_p2p(&pl);
            pthread_mutex_lock(&mu);
            if (k > 0 || q_head) { idle = 0; continue; }
            idle = idle == 0 ? 1e-5 : fmin(idle * 2, 1e-3);
            struct timespec ts = abs_time(now_s() + idle);
            pthread_cond_timedwait(&q_cond, &mu, &ts);
            continue;
        }
        if (q_stop) break;
        pthread_cond_wait(&q_cond, &mu);
    }
    pthread_mutex_unlock(&mu);
    free(pl.w);
    free(scratch_recv);
    free(scratch_acc);
    scratch_recv = scratch_acc = NULL;
    scratch_recv_n = scratch_acc_n = 0;
    return NULL;
}

static void enqueue(fl_work *w) {
    pthread_mutex_lock(&mu);
    w->next = NULL;
    if (q_tail) q_tail->next = w; else q_head = w;
    q_tail = w;
    inflight++;
    pthread_cond_signal(&q_cond);
    pthread_mutex_unlock(&mu);
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
    if (!world) return FL_ENOMEM;
    for (int32_t i = 0; i < size; i++) world->granks[i] = i;
    world->world = true;
    departed_at = calloc((size_t)size, sizeof *departed_at);
    if (!departed_at) return fl_fail(FL_ENOMEM, "dist_init: out of memory");
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&q_cond, &ca);
    pthread_cond_init(&done_cond, &ca);
    pthread_condattr_destroy(&ca);
    q_stop = false;
    if (pthread_create(&comm_thread, NULL, comm_main, NULL) != 0)
        return fl_fail(FL_ECOMM, "dist_init: cannot start the communication thread: %s", strerror(errno));
    use_mpi = true;
    initialized = true;
    return FL_OK;
}

bool fl_dist_is_initialized(void) { return initialized; }

fl_comm *fl_comm_world(void) { return world; }

int fl_dist_finalize(void) {
    if (!initialized) return FL_OK;
    int rc = FL_OK;
    if (use_mpi) {
        /* The thread finishes what was issued first (operations nobody waited for included); one still pending
         * past the world's timeout aborts the job like a wait would. */
        fl_mpi_announce(0);   /* first: a peer waiting for us in a collective fails now, not at its timeout */
        double start = now_s(), deadline = start + world->timeout;
        pthread_mutex_lock(&mu);
        q_stop = true;
        pthread_cond_signal(&q_cond);
        while (inflight > 0 && now_s() < deadline) {
            double since = 0;
            pthread_mutex_unlock(&mu);
            int32_t gone = departed_member(NULL, &since);
            pthread_mutex_lock(&mu);
            if (gone >= 0 && inflight > 0 && now_s() >= fmax(since, start) + DEPARTURE_GRACE_S) {
                pthread_mutex_unlock(&mu);
                departed_abort(gone, "finalize (operations issued but not waited for)", "world");
            }
            struct timespec ts = abs_time(fmin(deadline, now_s() + WAIT_SLICE_S));
            if (inflight > 0) pthread_cond_timedwait(&done_cond, &mu, &ts);
        }
        int64_t stuck = inflight;
        pthread_mutex_unlock(&mu);
        if (stuck > 0) {
            char msg[256];
            snprintf(msg, sizeof msg, "fsdp: finalize: %" PRId64 " issued operations did not complete after %g s",
                     stuck, world->timeout);
            fl_dist_abort(1, msg);
        }
        /* Then wait until every peer has left too, before MPI_Finalize: its fence would block here while a
         * peer that still waits for us aborts, and Open MPI's launcher then hangs tearing the job down. A peer
         * that aborts tells us (departed_member exits); one that never finishes hits the world's timeout. */
        for (;;) {
            double since = 0;
            departed_member(NULL, &since);
            int32_t missing = -1;
            for (int32_t r = 0; r < world->size && missing < 0; r++)
                if (r != world->rank && departed_at[r] == 0) missing = r;
            if (aborting_since > 0) {
                /* mpirun kills this rank at once; should it not, leave without its exit code counting first */
                if (now_s() > aborting_since + 10) _exit(1);
            } else if (missing < 0) {
                break;
            }
            if (now_s() >= deadline) {
                char msg[256];
                snprintf(msg, sizeof msg, "fsdp: finalize: rank %d did not finish its script within %g s of this rank",
                         missing, world->timeout);
                fl_dist_abort(1, msg);
            }
            struct timespec ts = {0, 2000000};
            nanosleep(&ts, NULL);
        }
        pthread_join(comm_thread, NULL);
        pthread_cond_destroy(&q_cond);
        pthread_cond_destroy(&done_cond);
        rc = fl_mpi_finalize(world->mpi);
        use_mpi = false;
        free(departed_at);
        departed_at = NULL;
    }
    comm_free(world);
    world = NULL;
    initialized = false;
    return rc;
}

static int32_t abort_code = 1;
static bool skip_mpi_abort = false;   /* departed_abort: exit without MPI_Abort (see there) */
static void *abort_watchdog(void *arg) {
    (void)arg;
    struct timespec ts = {5, 0};
    nanosleep(&ts, NULL);
    _exit(abort_code);
    return NULL;
}

void fl_dist_abort(int32_t code, const char *msg) {
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
    if (use_mpi) fl_mpi_announce(1);   /* peers waiting for us in finalize leave instead of hanging */
    if (use_mpi && !skip_mpi_abort) {
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

/* ---- groups ---- */

int32_t fl_comm_rank(const fl_comm *c) { return c ? c->rank : -1; }
int32_t fl_comm_size(const fl_comm *c) { return c ? c->size : 0; }
const char *fl_comm_name(const fl_comm *c) { return c ? c->name : ""; }
void fl_comm_set_timeout(fl_comm *c, double seconds) { if (c && seconds > 0) c->timeout = seconds; }
double fl_comm_get_timeout(const fl_comm *c) { return c ? c->timeout : 0; }

int32_t fl_comm_global_rank(const fl_comm *c, int32_t group_rank) {
    if (!c || group_rank < 0 || group_rank >= c->size) return -1;
    return c->granks[group_rank];
}

static fl_work *work_new(op_kind kind, fl_comm *c) {
    fl_work *w = calloc(1, sizeof *w);
    if (!w) return fl_fail_null(FL_ENOMEM, "%s: out of memory", op_names[kind]);
    w->kind = kind;
    w->comm = c;
    w->peer = -1;
    w->t_issue = now_s();
    return w;
}

static void work_free(fl_work *w) {
    fl_tensor_release(w->out);
    fl_tensor_release(w->in);
    free(w);
}

static void timeout_abort(const fl_work *w) {
    char msg[ERR_LEN];
    const char *what = w->kind == OP_CHECK ? w->what : op_names[w->kind];
    if (w->kind == OP_SEND || w->kind == OP_RECV)
        snprintf(msg, sizeof msg, "fsdp: %s %s rank %d (tag %d) on group '%s' did not complete after %g s", what,
                 w->kind == OP_SEND ? "to" : "from", w->peer, w->tag, w->comm->name, w->comm->timeout);
    else
        snprintf(msg, sizeof msg, "fsdp: %s on group '%s' did not complete after %g s", what, w->comm->name,
                 w->comm->timeout);
    fl_dist_abort(1, msg);
}

/* Reads the departure channel; returns the first member of c (or of the world, c NULL) known to have left,
 * as a world rank, with *since the time it was seen; -1 when none has. */
static int32_t departed_member(const fl_comm *c, double *since) {
    if (!use_mpi || !departed_at) return -1;
    pthread_mutex_lock(&departed_mu);
    int32_t kind = 0;
    for (int32_t r; (r = fl_mpi_poll_announced(&kind)) >= 0;) {
        /* a peer aborts the job and has printed why; mpirun is ending the job. Finalize must then not enter
         * MPI_Finalize's fence, which would hang Open MPI's launcher while it tears the job down. */
        if (kind == 1 && aborting_since == 0) aborting_since = now_s();
        if (r < world->size && departed_at[r] == 0) departed_at[r] = now_s();
    }
    int32_t gone = -1;
    int32_t n = c ? c->size : world->size;
    for (int32_t i = 0; i < n && gone < 0; i++) {
        int32_t g = c ? c->granks[i] : i;
        if (departed_at[g] > 0) { gone = g; *since = departed_at[g]; }
    }
    pthread_mutex_unlock(&departed_mu);
    return gone;
}

static void departed_abort(int32_t gone, const char *what, const char *group) {
    char msg[ERR_LEN];
    snprintf(msg, sizeof msg, "fsdp: rank %d has exited while rank %d waits in %s on group '%s' (every rank must run "
             "the same collectives: e.g. the same number of steps)", gone, world->rank, what, group);
    /* Not MPI_Abort: with the peer inside MPI_Finalize, Open MPI's abort can hang the launcher. A rank that exits
     * non-zero without finalizing makes mpirun end the job by itself. */
    skip_mpi_abort = true;
    fl_dist_abort(1, msg);
}

/* Blocks until w is done; aborts the job when its group's timeout (from issue) passes, or a member of the group
 * has left the job and the collective has not completed within the grace period. Returns w's rc. */
static int wait_done(fl_work *w) {
    double start = now_s();
    pthread_mutex_lock(&mu);
    while (!w->done) {
        double t = now_s(), deadline = w->t_issue + w->comm->timeout;
        if (t >= deadline) {
            pthread_mutex_unlock(&mu);
            timeout_abort(w);
        }
        if (w->comm->mpi) {
            double since = 0;
            pthread_mutex_unlock(&mu);
            int32_t gone = departed_member(w->comm, &since);
            pthread_mutex_lock(&mu);
            if (gone >= 0 && !w->done && now_s() >= fmax(since, start) + DEPARTURE_GRACE_S) {
                pthread_mutex_unlock(&mu);
                departed_abort(gone, w->kind == OP_CHECK ? w->what : op_names[w->kind], w->comm->name);
            }
        }
        struct timespec ts = abs_time(fmin(deadline, t + WAIT_SLICE_S));
        if (!w->done) pthread_cond_timedwait(&done_cond, &mu, &ts);
    }
    pthread_mutex_unlock(&mu);
    if (w->rc < 0) return fl_fail(w->rc, "%s", w->err);
    return FL_OK;
}

fl_comm *fl_comm_split(fl_comm *c, int32_t color, int32_t key, const char *name) {
    if (!c) return fl_fail_null(FL_EINVAL, "comm_split: no group (call fl_dist_init first)");
    if (color < 0) return fl_fail_null(FL_EINVAL, "comm_split: color %d is negative", color);
    if (!name || !*name) return fl_fail_null(FL_EINVAL, "comm_split: the new group needs a name");
    if (strlen(name) >= NAME_MAX_LEN)
        return fl_fail_null(FL_EINVAL, "comm_split: name '%s' is longer than %d characters", name, NAME_MAX_LEN - 1);
    if (!c->mpi) {
        fl_comm *n = comm_new(name, 0, 1, c->timeout, NULL);
        if (n) n->granks[0] = c->granks[0];
        return n;
    }
    fl_work *w = work_new(OP_SPLIT, c);
    if (!w) return NULL;
    w->color = color;
    w->key = key;
    snprintf(w->what, sizeof w->what, "%s", name);
    enqueue(w);
    fl_comm *n = wait_done(w) < 0 ? NULL : w->result;
    work_free(w);
    return n;
}

void fl_comm_release(fl_comm *c) {
    if (!c || c->world) return;
    if (!c->mpi || !use_mpi) {
        fl_mpi_free(c->mpi);   /* local, or MPI already finalized: only our memory is left to free */
        comm_free(c);
        return;
    }
    /* Queued, so that operations still in flight on c finish first; nobody waits for it. */
    fl_work *w = work_new(OP_FREE, c);
    if (!w) return;
    enqueue(w);
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

/* Queues w (MPI) or runs it now (local); with skip set, completes it untouched. */
static fl_work *issue(fl_work *w) {
    if (skip_comm && w->kind != OP_CHECK) {
        w->done = true;
        return w;
    }
    if (w->comm->mpi) {
        enqueue(w);
        return w;
    }
    if (w->kind == OP_SEND || w->kind == OP_RECV) {
        /* One local rank: a message to oneself would need a matching pair posted by this same thread. */
        fl_fail(FL_EUNSUPPORTED, "%s: group '%s' has one rank and no MPI; send/recv need mpirun (fsdp-lua -n N)",
                op_names[w->kind], w->comm->name);
        work_free(w);
        return NULL;
    }
    int rc = run_local(w);
    w->rc = rc;
    w->done = true;
    return w;
}

static void add_time(double t0) {
    double dt = now_s() - t0;
    pthread_mutex_lock(&mu);
    comm_time += dt;
    pthread_mutex_unlock(&mu);
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
    double t0 = now_s();
    fl_work *w = work_new(OP_ALL_GATHER, c);
    if (!w) return NULL;
    fl_tensor_retain(out);
    fl_tensor_retain((fl_tensor *)in);
    w->out = out;
    w->in = (fl_tensor *)in;
    w->dtype = in->dtype;
    w->numel = n;
    w = issue(w);
    add_time(t0);
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
    double t0 = now_s();
    fl_work *w = work_new(OP_REDUCE_SCATTER, c);
    if (!w) return NULL;
    fl_tensor_retain(out);
    fl_tensor_retain((fl_tensor *)in);
    w->out = out;
    w->in = (fl_tensor *)in;
    w->dtype = in->dtype;
    w->numel = n;
    w->op = rop;
    w = issue(w);
    add_time(t0);
    return w;
}

/* Queues a collective that works in place on t (all_reduce, broadcast). */
static fl_work *issue_in_place(op_kind kind, fl_comm *c, fl_tensor *t, int32_t rop, int32_t peer) {
    double t0 = now_s();
    fl_work *w = work_new(kind, c);
    if (!w) return NULL;
    fl_tensor_retain(t);
    w->out = t;
    w->dtype = t->dtype;
    w->numel = fl_tensor_numel(t);
    w->op = rop;
    w->peer = peer;
    w = issue(w);
    add_time(t0);
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
    double t0 = now_s();
    fl_work *w = work_new(OP_BARRIER, c);
    if (!w) return NULL;
    w = issue(w);
    add_time(t0);
    return w;
}

static fl_work *p2p(op_kind kind, fl_comm *c, fl_tensor *t, int32_t peer, int32_t tag) {
    const char *op = op_names[kind];
    if (check_comm(op, c) < 0 || check_tensor(op, t, "") < 0) return NULL;
    if (peer < 0 || peer >= c->size)
        return fl_fail_null(FL_EINVAL, "%s: rank %d is not in group '%s' (size %d)", op, peer, c->name, c->size);
    if (tag < 0 || tag > TAG_MAX) return fl_fail_null(FL_EINVAL, "%s: tag %d is outside 0..%d", op, tag, TAG_MAX);
    double t0 = now_s();
    fl_work *w = work_new(kind, c);
    if (!w) return NULL;
    fl_tensor_retain(t);
    if (kind == OP_SEND) w->in = t; else w->out = t;
    w->dtype = t->dtype;
    w->numel = fl_tensor_numel(t);
    w->peer = peer;
    w->tag = tag;
    w = issue(w);
    add_time(t0);
    return w;
}

fl_work *fl_send_async(fl_comm *c, const fl_tensor *t, int32_t dst, int32_t tag) {
    return p2p(OP_SEND, c, (fl_tensor *)t, dst, tag);
}

fl_work *fl_recv_async(fl_comm *c, fl_tensor *t, int32_t src, int32_t tag) { return p2p(OP_RECV, c, t, src, tag); }

int fl_work_wait(fl_work *w) {
    if (!w) return FL_OK;
    double t0 = now_s();
    int rc = wait_done(w);
    add_time(t0);
    work_free(w);
    return rc;
}

bool fl_work_test(fl_work *w) {
    if (!w) return true;
    pthread_mutex_lock(&mu);
    bool d = w->done;
    pthread_mutex_unlock(&mu);
    return d;
}

int fl_comm_check(fl_comm *c, const char *what, int32_t dtype, int64_t numel) {
    if (check_comm("comm_check", c) < 0) return FL_EINVAL;
    fl_work *w = work_new(OP_CHECK, c);
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

/* ---- accounting and the bench's switch ---- */
double fl_comm_time_total(void) {
    pthread_mutex_lock(&mu);
    double t = comm_time;
    pthread_mutex_unlock(&mu);
    return t;
}

double fl_comm_busy_time(void) {
    pthread_mutex_lock(&mu);
    double t = busy_time;
    pthread_mutex_unlock(&mu);
    return t;
}

void fl_comm_time_reset(void) {
    pthread_mutex_lock(&mu);
    comm_time = 0;
    busy_time = 0;
    pthread_mutex_unlock(&mu);
}

void fl_comm_set_skip(bool skip) { skip_comm = skip; }
