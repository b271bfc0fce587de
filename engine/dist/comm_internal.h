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
    double timeout;    /* seconds a wait may block before the job is aborted */
    void *mpi;         /* comm_mpi.c's group; NULL for a local (no MPI) group */
    bool world;
};

typedef enum {
    OP_ALL_GATHER, OP_REDUCE_SCATTER, OP_ALL_REDUCE, OP_BROADCAST, OP_BARRIER, OP_SEND, OP_RECV, OP_CHECK,
    OP_SPLIT, OP_FREE
} op_kind;
extern const char *const fl_op_names[10];   /* by op_kind, as the messages name them (comm.c) */

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
 * channel) and w has not completed within a grace period. */
int fl_work_wait_done(fl_work *w);
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
