/* engine/dist/comm_internal.h: what the communication files of engine/dist/ share: the group and work records,
 * the MPI transport (comm_mpi.c), the rank-order reduction (reduce.c), the queue and its thread (comm_queue.c)
 * and what the thread calls back in comm.c. Nothing outside engine/dist/ includes it. */
#ifndef FL_COMM_INTERNAL_H
#define FL_COMM_INTERNAL_H

#include "internal.h"

enum { NAME_MAX_LEN = 64, ERR_LEN = 1024 };

struct fl_comm {
    char name[NAME_MAX_LEN];
    int32_t rank, size;
    int32_t *granks;   /* [size]: world rank of each group rank */
    double timeout;    /* seconds a wait may block before the job is aborted (or the wait fails) */
    void *mpi;         /* comm_mpi.c's group; NULL for a local (no MPI) group */
    bool world;
    bool control;      /* fl_comm_control_new: operations run on the calling thread, outside the queue */
    /* For fl_comm_resync (comm_resync.c). uid names the group alike on every member: the world is 1, a split's is
     * mixed from its parent's uid, the parent's count of splits and the color. */
    uint64_t uid;
    int32_t nsplits;     /* successful splits of this group (communication thread) */
    int64_t issued;      /* header-exchanging operations queued on this rank (under the queue's mutex) */
    int64_t outstanding; /* of those, not yet complete (under the queue's mutex) */
    fl_comm *reg_next;   /* the registry of live MPI groups, control groups excluded (under the queue's mutex) */
};

/* Pinned like the header's enums: the number is what the header exchange compares. */
typedef enum {
    OP_ALL_GATHER, OP_REDUCE_SCATTER, OP_ALL_REDUCE, OP_BROADCAST, OP_BARRIER, OP_SEND, OP_RECV, OP_CHECK,
    OP_SPLIT, OP_FREE, OP_RESYNC
} op_kind;
enum { OP_KINDS = 11, HEADER_LEN = 5 /* int64s: kind, dtype, numel, op, root */ };
extern const char *const fl_op_names[OP_KINDS];   /* by op_kind, as the messages name them (comm.c) */
/* The operations that begin with the header exchange, and so count in issued/outstanding. */
static inline bool fl_op_has_header(op_kind k) { return k != OP_SEND && k != OP_RECV && k != OP_FREE; }

struct fl_work {
    op_kind kind;
    fl_comm *comm;
    fl_tensor *out, *in;    /* retained until the wait; `out` is the tensor written (t for in-place ops) */
    int32_t dtype, op, peer, tag;
    int64_t numel;          /* elements of `in` (all_gather), of `out` (reduce_scatter), of t otherwise */
    int32_t color, key;     /* split */
    bool color_control;     /* split: the new group is a control group (fl_comm_control_new) */
    char what[NAME_MAX_LEN * 2]; /* check: the caller's label; split: the new group's name */
    fl_comm *result;        /* split */
    void *req;              /* send/recv: the posted MPI request */
    double t_issue;
    bool done;
    bool abandoned;         /* its waiter gave up (timeout errors, interrupt): the queue frees it when done */
    int rc;
    char err[ERR_LEN];
    fl_work *next;
};

/* ---- the MPI transport (comm_mpi.c). Groups and requests are opaque (MPI_Comm, MPI_Request) so that nothing
 * else includes mpi.h. Negative returns carry fl_fail messages. ---- */
bool fl_mpi_launched(void);
int fl_mpi_init(void **world, int32_t *rank, int32_t *size);
int fl_mpi_finalize(void *world);
void fl_mpi_abort(int32_t code);
int fl_mpi_split(void *g, int32_t color, int32_t key, void **out, int32_t *rank, int32_t *size);
int fl_mpi_global_ranks(void *g, int32_t size, int32_t *out);
void fl_mpi_free(void *g);
int fl_mpi_allgather(void *g, const void *in, void *out, int64_t count, size_t esz);
int fl_mpi_allgatherv_inplace(void *g, void *buf, const int *counts, const int *displs, size_t esz);
int fl_mpi_alltoallv(void *g, const void *in, const int *sc, const int *sd, void *out, const int *rc, const int *rd,
                     size_t esz);
int fl_mpi_bcast(void *g, void *buf, int64_t count, size_t esz, int32_t root);
int fl_mpi_barrier(void *g);
/* Nonblocking collectives; fl_mpi_test_coll tests one and frees the request once done (*done true). */
int fl_mpi_iallgather(void *g, const void *in, void *out, int64_t count, size_t esz, void **req);
int fl_mpi_ibcast(void *g, void *buf, int64_t count, size_t esz, int32_t root, void **req);
int fl_mpi_ibarrier(void *g, void **req);
int fl_mpi_test_coll(void **req, bool *done);
int fl_mpi_isend(void *g, const void *buf, int64_t count, size_t esz, int32_t dst, int32_t tag, void **req);
int fl_mpi_irecv(void *g, void *buf, int64_t count, size_t esz, int32_t src, int32_t tag, void **req);
int fl_mpi_test(void **req, bool *done, int64_t *bytes);
/* The departure channel: this rank tells every other that it leaves the job (kind 0) or aborts it (kind 1);
 * poll returns a peer's announcement (world rank, *kind), or -1. */
void fl_mpi_announce(int32_t kind);
int32_t fl_mpi_poll_announced(int32_t *kind);

/* ---- the rank-order reduction (reduce.c; communication thread only) ---- */
/* all_reduce (equal_chunks false: n elements, chunked ceil(n/N), in place allowed) or reduce_scatter (true: in
 * holds N blocks of n/N, out one block): the all-to-all of the chunks, then the sum/avg/max in rank order. */
int fl_reduce_chunks(fl_comm *c, const void *in, int64_t n, void *out, int32_t dtype, int32_t op, bool equal_chunks);
/* Frees the receive and accumulator buffers that fl_reduce_chunks keeps between calls. */
void fl_reduce_scratch_free(void);

/* ---- the queue and the communication thread (comm_queue.c) ---- */
double fl_comm_now(void);   /* CLOCK_MONOTONIC seconds */
/* A new record of one operation on c, issued now; NULL (message set) when out of memory. */
fl_work *fl_work_new(op_kind kind, fl_comm *c);
void fl_work_free(fl_work *w);   /* releases out and in */
/* Blocks until w is done and returns its rc (w stays the caller's). Aborts the job when the group's timeout,
 * counted from the issue, passes, or when a member of the group has left the job (comm_mpi.c's departure
 * channel) and w has not completed within a grace period. With timeout errors on, a timeout (or an interrupt)
 * instead marks w abandoned and fails: w then belongs to the queue, and the caller must not free it. */
int fl_work_wait_done(fl_work *w);
/* Frees abandoned works that have completed since (main thread: they release tensors). */
void fl_queue_reap(void);
/* The communication thread's wait for a nonblocking collective of a header exchange: it posts the resync
 * placeholders other groups need meanwhile, so that no group's recovery waits behind another's. */
int fl_queue_wait_request(void **req);
/* A control group's wait on the calling thread: no timeout; ends the job when a member has left it. */
int fl_queue_wait_direct(const fl_comm *c, void **req, const char *what);
/* The registry of live MPI groups (comm_resync.c walks it; comm.c adds at creation, the queue removes at free). */
void fl_registry_add(fl_comm *c);
/* Calls fn for every registered group, under the queue's mutex (fn must not block or call back in). */
void fl_registry_each(void (*fn)(fl_comm *c, void *arg), void *arg);
/* Queues n resync placeholders on c, posted by the communication thread once c has no operation of this rank
 * pending, and raises c->issued by n. Under the queue's mutex: from an fl_registry_each callback, so that c
 * cannot be freed meanwhile. */
int fl_queue_add_placeholders_locked(fl_comm *c, int64_t n);
/* Waits until every placeholder has completed and no registered group has an operation of this rank pending,
 * until `deadline` (fl_comm_now time); FL_OK, or FL_ECOMM naming the first group still pending. */
int fl_queue_wait_quiet(double deadline);
/* Ends the job naming `gone` when a member of c (NULL: the world) has left it; used by long waits. */
void fl_queue_check_departed(const fl_comm *c, double since_start, const char *what);
/* Hands w to the communication thread, which runs queued operations in issue order. */
void fl_queue_push(fl_work *w);
/* Adds now - t0 to the calling threads' time in collectives (fl_comm_time_total). */
void fl_queue_add_time(double t0);
/* Starts the communication thread for a world of world_size ranks. */
int fl_queue_start(int32_t world_size);
/* True from a successful fl_queue_start until fl_queue_end: MPI is up and the thread runs. */
bool fl_queue_running(void);
/* Finalize's part: lets the thread finish what was issued, waits until every peer has left the job, then joins
 * the thread. Aborts the job when an operation or a peer is still missing after the world's timeout, or a peer
 * has left with operations pending. */
void fl_queue_drain(void);
void fl_queue_end(void);   /* after fl_mpi_finalize: frees the departure record */

/* ---- what the communication thread calls back (comm.c) ---- */
/* Runs a collective, header check first, or a split; returns its rc. */
int fl_comm_run(fl_work *w);
/* Frees a group and its MPI communicator (a queued fl_comm_release). */
void fl_comm_destroy(fl_comm *c);
/* Exits the process with code after printing msg on stderr, each line prefixed with the rank; with mpi_abort
 * false it does not call MPI_Abort (fl_dist_abort is this with true). */
void fl_dist_exit(int32_t code, const char *msg, bool mpi_abort) __attribute__((noreturn));

#endif
