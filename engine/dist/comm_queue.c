/* engine/dist/comm_queue.c: the communication thread and its queue, the life of an fl_work (issue, completion,
 * wait), timeouts and the departure checks. What each operation does is comm.c's; the MPI calls are comm_mpi.c's.
 *
 * Under mpirun one communication thread per process runs every queued operation in issue order, so collectives
 * progress while the caller computes and every rank sees the same order. A wait that outlives its group's timeout,
 * or whose group has lost a member to the departure channel, ends the job with a message instead of hanging
 * (with timeout errors on, the multi-rank REPL's mode, a timed-out or interrupted wait fails instead and leaves
 * its work to the queue). For fl_comm_resync (comm_resync.c) the queue also keeps the registry of live groups,
 * counts each group's operations and posts the resync placeholders. */
#include "comm_internal.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

/* ---- process state: the queue and its thread, timing ---- */
static bool running = false;               /* the thread runs (MPI is up): fl_queue_start until fl_queue_end */
static pthread_t comm_thread;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t q_cond, done_cond;   /* work queued / work completed; CLOCK_MONOTONIC */
static fl_work *q_head = NULL, *q_tail = NULL;
static bool q_stop = false;
static int64_t inflight = 0;               /* queued or posted, not yet complete (under mu) */
static double comm_time = 0;               /* under mu: the calling threads' time in collectives */
static double busy_time = 0;               /* under mu: the communication thread's time executing them */
static bool timeout_errors = false;        /* fl_comm_set_timeout_errors */
static fl_work *graveyard = NULL;          /* under mu: abandoned works that completed, for fl_queue_reap */
static fl_comm *registry = NULL;           /* under mu: live MPI groups (control groups excluded) */

/* Resync placeholders to post on one group: header exchanges of kind OP_RESYNC, which meet the collectives its
 * peers issued and this rank did not. The main thread adds jobs; the communication thread posts, tests and frees
 * them (reqs and bufs are its own once posted). */
typedef struct placeholder_job {
    fl_comm *c;
    int64_t n, left;   /* placeholders, and of those not complete */
    bool posted;
    void **reqs;       /* [n] */
    int64_t *bufs;     /* [n][HEADER_LEN * (1 + size)]: this rank's header, then everyone's */
    struct placeholder_job *next;
} placeholder_job;
static placeholder_job *jobs = NULL;       /* under mu */
static atomic_int njobs = 0;               /* a lock-free "anything to post?" for the thread's wait loops */
static void service_placeholders(void);

/* Peers that have left the job (comm_mpi.c's departure channel), by world rank. A wait that involves one of
 * them fails once DEPARTURE_GRACE_S have passed since both the departure and the wait began: long enough for a
 * collective the peer did finish before leaving to complete here too, short against the timeout. */
static const double DEPARTURE_GRACE_S = 2.0, WAIT_SLICE_S = 0.1;
static pthread_mutex_t departed_mu = PTHREAD_MUTEX_INITIALIZER;   /* serialises polls of the channel */
static double *departed_at = NULL;                                 /* [world size]: 0, or when it was seen */
static double aborting_since = 0;   /* when a peer announced that it aborts the job (0: none has) */
static int32_t departed_member(const fl_comm *c, double *since);
static void departed_abort(int32_t gone, const char *what, const char *group);

double fl_comm_now(void) {
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

/* ---- the communication thread ---- */

static void complete(fl_work *w, int rc) {
    pthread_mutex_lock(&mu);
    w->rc = rc;
    if (rc < 0) {
        const char *what = w->kind == OP_CHECK ? w->what : fl_op_names[w->kind];
        snprintf(w->err, sizeof w->err, "%s on group '%s': %s", what, w->comm->name, fl_last_error());
    }
    w->done = true;
    inflight--;
    if (fl_op_has_header(w->kind)) w->comm->outstanding--;
    if (w->abandoned) { w->next = graveyard; graveyard = w; }   /* nobody waits for it any more */
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
    case OP_FREE:
        pthread_mutex_lock(&mu);
        for (fl_comm **p = &registry; *p; p = &(*p)->reg_next)
            if (*p == w->comm) { *p = w->comm->reg_next; break; }
        /* Placeholders still owed on a group this rank has freed cannot be posted any more; a peer that waits for
         * them fails at resync's deadline, naming the group. */
        for (placeholder_job **p = &jobs; *p;) {
            placeholder_job *j = *p;
            if (j->c == w->comm && !j->posted) {
                *p = j->next;
                free(j);
                atomic_fetch_sub(&njobs, 1);
            } else {
                p = &j->next;
            }
        }
        pthread_mutex_unlock(&mu);
        fl_comm_destroy(w->comm);
        free(w);   /* nobody waits for a release */
        pthread_mutex_lock(&mu);
        inflight--;
        pthread_cond_broadcast(&done_cond);
        pthread_mutex_unlock(&mu);
        return;
    default: rc = fl_comm_run(w); break;   /* a collective or a split */
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
            double t0 = fl_comm_now();
            execute(w, &pl);
            if (pl.n) progress_p2p(&pl);
            double dt = fl_comm_now() - t0;
            pthread_mutex_lock(&mu);
            busy_time += dt;
            continue;
        }
        if (pl.n || atomic_load(&njobs)) {
            pthread_mutex_unlock(&mu);
            int32_t k = pl.n ? progress_p2p(&pl) : 0;
            service_placeholders();
            pthread_mutex_lock(&mu);
            if (k > 0 || q_head) { idle = 0; continue; }
            idle = idle == 0 ? 1e-5 : fmin(idle * 2, 1e-3);
            struct timespec ts = abs_time(fl_comm_now() + idle);
            pthread_cond_timedwait(&q_cond, &mu, &ts);
            continue;
        }
        if (q_stop) break;
        pthread_cond_wait(&q_cond, &mu);
    }
    pthread_mutex_unlock(&mu);
    free(pl.w);
    fl_reduce_scratch_free();
    return NULL;
}

void fl_queue_push(fl_work *w) {
    pthread_mutex_lock(&mu);
    if (fl_op_has_header(w->kind)) { w->comm->issued++; w->comm->outstanding++; }
    w->next = NULL;
    if (q_tail) q_tail->next = w; else q_head = w;
    q_tail = w;
    inflight++;
    pthread_cond_signal(&q_cond);
    pthread_mutex_unlock(&mu);
}

/* ---- start and finalize ---- */

int fl_queue_start(int32_t world_size) {
    departed_at = calloc((size_t)world_size, sizeof *departed_at);
    if (!departed_at) return fl_fail(FL_ENOMEM, "dist_init: out of memory");
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&q_cond, &ca);
    pthread_cond_init(&done_cond, &ca);
    pthread_condattr_destroy(&ca);
    q_stop = false;
    int err = pthread_create(&comm_thread, NULL, comm_main, NULL);   /* returns the error; errno is not set */
    if (err != 0) {
        pthread_cond_destroy(&q_cond);
        pthread_cond_destroy(&done_cond);
        free(departed_at);
        departed_at = NULL;
        return fl_fail(FL_ECOMM, "dist_init: cannot start the communication thread: %s", strerror(err));
    }
    running = true;
    return FL_OK;
}

bool fl_queue_running(void) { return running; }

void fl_queue_drain(void) {
    const fl_comm *world = fl_comm_world();
    /* The thread finishes what was issued first (operations nobody waited for included); one still pending
     * past the world's timeout aborts the job like a wait would. */
    double start = fl_comm_now(), deadline = start + world->timeout;
    pthread_mutex_lock(&mu);
    q_stop = true;
    pthread_cond_signal(&q_cond);
    while (inflight > 0 && fl_comm_now() < deadline) {
        double since = 0;
        pthread_mutex_unlock(&mu);
        int32_t gone = departed_member(NULL, &since);
        pthread_mutex_lock(&mu);
        if (gone >= 0 && inflight > 0 && fl_comm_now() >= fmax(since, start) + DEPARTURE_GRACE_S) {
            pthread_mutex_unlock(&mu);
            departed_abort(gone, "finalize (operations issued but not waited for)", "world");
        }
        struct timespec ts = abs_time(fmin(deadline, fl_comm_now() + WAIT_SLICE_S));
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
            if (fl_comm_now() > aborting_since + 10) _exit(1);
        } else if (missing < 0) {
            break;
        }
        if (fl_comm_now() >= deadline) {
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
}

void fl_queue_end(void) {
    running = false;
    registry = NULL;   /* the groups outlive MPI only to be freed */
    free(departed_at);
    departed_at = NULL;
}

/* ---- work records, waits, timeouts and departures ---- */

fl_work *fl_work_new(op_kind kind, fl_comm *c) {
    if (graveyard) fl_queue_reap();   /* a racy peek is fine: the next call frees what this one misses */
    fl_work *w = calloc(1, sizeof *w);
    if (!w) return fl_fail_null(FL_ENOMEM, "%s: out of memory", fl_op_names[kind]);
    w->kind = kind;
    w->comm = c;
    w->peer = -1;
    w->t_issue = fl_comm_now();
    return w;
}

void fl_work_free(fl_work *w) {
    fl_tensor_release(w->out);
    fl_tensor_release(w->in);
    free(w);
}

/* "fsdp: barrier on group 'world' did not complete after 5 s": the abort's message, and with timeout errors
 * on the wait's error. */
static void timeout_message(const fl_work *w, char *msg, size_t n) {
    const char *what = w->kind == OP_CHECK ? w->what : fl_op_names[w->kind];
    if (w->kind == OP_SEND || w->kind == OP_RECV)
        snprintf(msg, n, "fsdp: %s %s rank %d (tag %d) on group '%s' did not complete after %g s", what,
                 w->kind == OP_SEND ? "to" : "from", w->peer, w->tag, w->comm->name, w->comm->timeout);
    else
        snprintf(msg, n, "fsdp: %s on group '%s' did not complete after %g s", what, w->comm->name,
                 w->comm->timeout);
}

static void timeout_abort(const fl_work *w) {
    char msg[ERR_LEN];
    timeout_message(w, msg, sizeof msg);
    fl_dist_abort(1, msg);
}

/* Reads the departure channel; returns the first member of c (or of the world, c NULL) known to have left,
 * as a world rank, with *since the time it was seen; -1 when none has. */
static int32_t departed_member(const fl_comm *c, double *since) {
    if (!running || !departed_at) return -1;
    const fl_comm *world = fl_comm_world();
    pthread_mutex_lock(&departed_mu);
    int32_t kind = 0;
    for (int32_t r; (r = fl_mpi_poll_announced(&kind)) >= 0;) {
        /* a peer aborts the job and has printed why; mpirun is ending the job. Finalize must then not enter
         * MPI_Finalize's fence, which would hang Open MPI's launcher while it tears the job down. */
        if (kind == 1 && aborting_since == 0) aborting_since = fl_comm_now();
        if (r < world->size && departed_at[r] == 0) departed_at[r] = fl_comm_now();
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
    const fl_comm *world = fl_comm_world();
    char msg[ERR_LEN];
    snprintf(msg, sizeof msg, "fsdp: rank %d has exited while rank %d waits in %s on group '%s' (every rank must run "
             "the same collectives: e.g. the same number of steps)", gone, world->rank, what, group);
    /* Not MPI_Abort: with the peer inside MPI_Finalize, Open MPI's abort can hang the launcher. A rank that exits
     * non-zero without finalizing makes mpirun end the job by itself. */
    fl_dist_exit(1, msg, false);
}

void fl_queue_check_departed(const fl_comm *c, double start, const char *what) {
    double since = 0;
    int32_t gone = departed_member(c, &since);
    if (gone >= 0 && fl_comm_now() >= fmax(since, start) + DEPARTURE_GRACE_S)
        departed_abort(gone, what, c ? c->name : "world");
}

/* Blocks until w is done; aborts the job when its group's timeout (from issue) passes, or a member of the group
 * has left the job and the collective has not completed within the grace period. Returns w's rc. With timeout
 * errors on, a timeout or an interrupt abandons w instead (see comm_internal.h). */
int fl_work_wait_done(fl_work *w) {
    double start = fl_comm_now();
    pthread_mutex_lock(&mu);
    while (!w->done) {
        double t = fl_comm_now(), deadline = w->t_issue + w->comm->timeout;
        if (t >= deadline) {
            if (!timeout_errors) {
                pthread_mutex_unlock(&mu);
                timeout_abort(w);
            }
            w->abandoned = true;
            pthread_mutex_unlock(&mu);
            char msg[ERR_LEN];
            timeout_message(w, msg, sizeof msg);
            return fl_fail(FL_ECOMM, "%s", msg);
        }
        if (timeout_errors && fl_interrupt_take()) {
            w->abandoned = true;
            pthread_mutex_unlock(&mu);
            return fl_fail(FL_EINTERRUPTED, "interrupted (waiting for %s on group '%s')",
                           w->kind == OP_CHECK ? w->what : fl_op_names[w->kind], w->comm->name);
        }
        if (w->comm->mpi) {
            double since = 0;
            pthread_mutex_unlock(&mu);
            int32_t gone = departed_member(w->comm, &since);
            pthread_mutex_lock(&mu);
            if (gone >= 0 && !w->done && fl_comm_now() >= fmax(since, start) + DEPARTURE_GRACE_S) {
                pthread_mutex_unlock(&mu);
                departed_abort(gone, w->kind == OP_CHECK ? w->what : fl_op_names[w->kind], w->comm->name);
            }
        }
        struct timespec ts = abs_time(fmin(deadline, t + WAIT_SLICE_S));
        if (!w->done) pthread_cond_timedwait(&done_cond, &mu, &ts);
    }
    pthread_mutex_unlock(&mu);
    if (w->rc < 0) return fl_fail(w->rc, "%s", w->err);
    return FL_OK;
}

int fl_work_wait(fl_work *w) {
    if (!w) return FL_OK;
    double t0 = fl_comm_now();
    int rc = fl_work_wait_done(w);
    fl_queue_add_time(t0);
    if (!w->abandoned) fl_work_free(w);   /* an abandoned one is the queue's (this thread set the flag) */
    return rc;
}

void fl_queue_reap(void) {
    pthread_mutex_lock(&mu);
    fl_work *dead = graveyard;
    graveyard = NULL;
    pthread_mutex_unlock(&mu);
    while (dead) {
        fl_work *next = dead->next;
        if (dead->kind == OP_SPLIT && dead->result) fl_comm_release(dead->result);   /* made, but nobody took it */
        fl_work_free(dead);
        dead = next;
    }
}

void fl_comm_set_timeout_errors(bool on) { timeout_errors = on; }

/* ---- waits for nonblocking collectives ---- */

/* Spins briefly (header exchanges usually complete within microseconds), then yields for a millisecond (what
 * MPI's own wait does with mpi_yield_when_idle), then sleeps up to cap_s: a late peer costs at most that much
 * latency (200 us in the queue), and a long wait (the REPL's ranks waiting for the next line, 10 ms) little CPU. */
static void backoff(int64_t *spins, double start, double cap_s) {
    (*spins)++;
    if (*spins < 64) return;
    double waited = fl_comm_now() - start;
    if (waited < 1e-3) { sched_yield(); return; }
    struct timespec ts = {0, (long)(fmin(cap_s, waited / 8) * 1e9)};
    nanosleep(&ts, NULL);
}

int fl_queue_wait_request(void **req) {
    double start = fl_comm_now();
    int64_t spins = 0;
    for (;;) {
        bool done = false;
        int rc = fl_mpi_test_coll(req, &done);
        if (done) return rc;
        if (atomic_load(&njobs)) service_placeholders();
        backoff(&spins, start, 2e-4);
    }
}

int fl_queue_wait_direct(const fl_comm *c, void **req, const char *what) {
    double start = fl_comm_now();
    int64_t spins = 0;
    for (;;) {
        bool done = false;
        int rc = fl_mpi_test_coll(req, &done);
        if (done) return rc;
        if (spins % 16 == 0) fl_queue_check_departed(c, start, what);
        backoff(&spins, start, 1e-2);
    }
}

/* ---- the registry and the resync placeholders ---- */

void fl_registry_add(fl_comm *c) {
    pthread_mutex_lock(&mu);
    c->reg_next = registry;
    registry = c;
    pthread_mutex_unlock(&mu);
}

void fl_registry_each(void (*fn)(fl_comm *c, void *arg), void *arg) {
    pthread_mutex_lock(&mu);
    for (fl_comm *c = registry; c; c = c->reg_next) fn(c, arg);
    pthread_mutex_unlock(&mu);
}

int fl_queue_add_placeholders_locked(fl_comm *c, int64_t n) {
    if (n <= 0) return FL_OK;
    placeholder_job *j = calloc(1, sizeof *j);
    if (!j) return fl_fail(FL_ENOMEM, "resync: out of memory");
    j->c = c;
    j->n = j->left = n;
    c->issued += n;
    j->next = jobs;
    jobs = j;
    atomic_fetch_add(&njobs, 1);
    pthread_cond_signal(&q_cond);
    return FL_OK;
}

/* Communication thread: posts the jobs whose group has nothing of this rank's pending (the placeholders then
 * come after everything this rank issued on it, as they must), tests the posted ones, frees the finished. */
static void service_placeholders(void) {
    enum { BATCH = 32 };
    placeholder_job *mine[BATCH];
    int32_t k = 0;
    pthread_mutex_lock(&mu);
    for (placeholder_job *j = jobs; j && k < BATCH; j = j->next)
        if (j->posted || j->c->outstanding == 0) { j->posted = true; mine[k++] = j; }
    pthread_mutex_unlock(&mu);
    for (int32_t i = 0; i < k; i++) {
        placeholder_job *j = mine[i];
        size_t per = (size_t)HEADER_LEN * (size_t)(1 + j->c->size);
        if (!j->reqs) {
            j->reqs = calloc((size_t)j->n, sizeof *j->reqs);
            j->bufs = calloc((size_t)j->n * per, sizeof *j->bufs);
            if (!j->reqs || !j->bufs) { free(j->reqs); free(j->bufs); j->reqs = NULL; j->bufs = NULL; continue; }
            for (int64_t p = 0; p < j->n; p++) {
                int64_t *h = j->bufs + (size_t)p * per;
                h[0] = OP_RESYNC; h[1] = 0; h[2] = 0; h[3] = 0; h[4] = -1;
                /* a failed post leaves its slot NULL: counted done, and the peers' resync reports the group */
                if (fl_mpi_iallgather(j->c->mpi, h, h + HEADER_LEN, HEADER_LEN, sizeof(int64_t), &j->reqs[p]) < 0)
                    j->reqs[p] = NULL;
            }
        }
        int64_t left = 0;
        for (int64_t p = 0; p < j->n; p++) {
            if (!j->reqs[p]) continue;
            bool done = false;
            fl_mpi_test_coll(&j->reqs[p], &done);
            if (!done) left++;
        }
        pthread_mutex_lock(&mu);
        j->left = left;
        if (left == 0) {
            for (placeholder_job **p = &jobs; *p; p = &(*p)->next)
                if (*p == j) { *p = j->next; break; }
            atomic_fetch_sub(&njobs, 1);
            pthread_cond_broadcast(&done_cond);
        }
        pthread_mutex_unlock(&mu);
        if (left == 0) { free(j->reqs); free(j->bufs); free(j); }
    }
}

int fl_queue_wait_quiet(double deadline) {
    double start = fl_comm_now();
    pthread_mutex_lock(&mu);
    for (;;) {
        const fl_comm *busy = NULL;
        for (const fl_comm *c = registry; c && !busy; c = c->reg_next)
            if (c->outstanding > 0) busy = c;
        const placeholder_job *owed = jobs;
        if (!busy && !owed) break;
        if (fl_comm_now() >= deadline) {
            char name[NAME_MAX_LEN];
            int64_t n = busy ? busy->outstanding : owed->left;
            snprintf(name, sizeof name, "%s", busy ? busy->name : owed->c->name);
            pthread_mutex_unlock(&mu);
            return fl_fail(FL_ECOMM, "group '%s' still has %" PRId64 " %s pending (%s)", name, n,
                           busy ? "collectives" : "resync placeholders",
                           busy ? "issued in another order than on its peers, or waiting for a rank that freed the "
                                  "group"
                                : "behind an operation that does not complete");
        }
        pthread_mutex_unlock(&mu);
        fl_queue_check_departed(NULL, start, "resync");
        pthread_mutex_lock(&mu);
        struct timespec ts = abs_time(fmin(deadline, fl_comm_now() + WAIT_SLICE_S));
        pthread_cond_timedwait(&done_cond, &mu, &ts);
    }
    pthread_mutex_unlock(&mu);
    return FL_OK;
}

bool fl_work_test(fl_work *w) {
    if (!w) return true;
    pthread_mutex_lock(&mu);
    bool d = w->done;
    pthread_mutex_unlock(&mu);
    return d;
}

/* ---- accounting ---- */
void fl_queue_add_time(double t0) {
    double dt = fl_comm_now() - t0;
    pthread_mutex_lock(&mu);
    comm_time += dt;
    pthread_mutex_unlock(&mu);
}

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
