/* engine/dist/comm_mpi.c: the Open MPI transport under fl_comm — init/finalize/abort, communicator split, and one
 * blocking function per data movement. It moves bytes only: reductions are reduce.c's, checks comm.c's, queueing
 * and timeouts comm_queue.c's. Every function but fl_mpi_abort runs on comm_queue.c's communication thread (or on
 * the main thread while that thread is not running: init, finalize), so MPI calls never overlap except an abort,
 * hence MPI_THREAD_MULTIPLE. */
#include "comm_internal.h"

#include <limits.h>
#include <mpi.h>
#include <stdio.h>
#include <time.h>


typedef struct mpi_group {
    MPI_Comm comm;
} mpi_group;

/* One committed contiguous type per element size (1, 2, 4, 8 bytes): counts are then elements, not bytes, so a
 * buffer may hold up to INT_MAX elements. */
static MPI_Datatype elem_types[4];
static bool mpi_up = false;

/* The departure channel: a communicator of its own on which a rank that leaves the job (end of script,
 * os.exit(0)) tells every other rank, so that a peer still waiting for it in a collective fails within seconds
 * instead of after the timeout. One receive from any rank is always posted; the main thread tests it while it
 * waits (MPI_THREAD_MULTIPLE), never concurrently with itself (comm_queue.c serialises the calls). */
enum { TAG_LEFT = 1 };
static MPI_Comm ctl = MPI_COMM_NULL;
static MPI_Request ctl_req = MPI_REQUEST_NULL;
static int ctl_buf = 0;

static int mpi_fail(int err, const char *call) {
    char s[MPI_MAX_ERROR_STRING];
    int n = 0;
    if (MPI_Error_string(err, s, &n) != MPI_SUCCESS) snprintf(s, sizeof s, "error code %d", err);
    return fl_fail(FL_ECOMM, "%s failed: %s", call, s);
}

static MPI_Datatype elem_type(size_t esz) {
    switch (esz) {
    case 1: return elem_types[0];
    case 2: return elem_types[1];
    case 4: return elem_types[2];
    default: return elem_types[3];
    }
}

static MPI_Comm comm_of(void *g) { return ((mpi_group *)g)->comm; }

/* Open MPI's mpirun sets OMPI_COMM_WORLD_SIZE; PMIx (srun --mpi=pmix) sets PMIX_RANK. */
bool fl_mpi_launched(void) {
    const char *s = getenv("OMPI_COMM_WORLD_SIZE");
    if (s && *s) return true;
    s = getenv("PMIX_RANK");
    return s && *s;
}

int fl_mpi_init(void **world, int32_t *rank, int32_t *size) {
    int inited = 0, provided = 0, rc;
    MPI_Initialized(&inited);
    if (!inited) {
        rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_MULTIPLE, &provided);
        if (rc != MPI_SUCCESS) return mpi_fail(rc, "MPI_Init_thread");
    } else {
        MPI_Query_thread(&provided);
    }
    if (provided < MPI_THREAD_MULTIPLE)
        return fl_fail(FL_EUNSUPPORTED,
                       "dist_init: MPI provides thread level %d but fsdp-lua needs MPI_THREAD_MULTIPLE (%d): a "
                       "communication thread runs the collectives while the main thread may abort the job",
                       provided, MPI_THREAD_MULTIPLE);
    static const int sizes[4] = {1, 2, 4, 8};
    for (int i = 0; i < 4; i++) {
        MPI_Type_contiguous(sizes[i], MPI_BYTE, &elem_types[i]);
        MPI_Type_commit(&elem_types[i]);
    }
    mpi_group *g = calloc(1, sizeof *g);
    if (!g) return fl_fail(FL_ENOMEM, "dist_init: out of memory");
    /* Our own communicator: user MPI code on MPI_COMM_WORLD can never match our messages. */
    rc = MPI_Comm_dup(MPI_COMM_WORLD, &g->comm);
    if (rc != MPI_SUCCESS) { free(g); return mpi_fail(rc, "MPI_Comm_dup"); }
    MPI_Comm_set_errhandler(g->comm, MPI_ERRORS_RETURN);
    int r = 0, s = 1;
    MPI_Comm_rank(g->comm, &r);
    MPI_Comm_size(g->comm, &s);
    rc = MPI_Comm_dup(MPI_COMM_WORLD, &ctl);
    if (rc != MPI_SUCCESS) { MPI_Comm_free(&g->comm); free(g); return mpi_fail(rc, "MPI_Comm_dup"); }
    MPI_Comm_set_errhandler(ctl, MPI_ERRORS_RETURN);
    rc = MPI_Irecv(&ctl_buf, 1, MPI_INT, MPI_ANY_SOURCE, TAG_LEFT, ctl, &ctl_req);
    if (rc != MPI_SUCCESS) { MPI_Comm_free(&ctl); MPI_Comm_free(&g->comm); free(g); return mpi_fail(rc, "MPI_Irecv"); }
    *world = g;
    *rank = r;
    *size = s;
    mpi_up = true;
    return FL_OK;
}

/* Tells every other rank that this one leaves (kind 0) or aborts the job (kind 1). Best effort within about a
 * second: the 4-byte messages go out eagerly, so their sends complete at once unless the job is coming down. */
void fl_mpi_announce(int32_t kind) {
    if (!mpi_up) return;
    int me = 0, n = 1;
    MPI_Comm_rank(ctl, &me);
    MPI_Comm_size(ctl, &n);
    int msg = me * 2 + (kind ? 1 : 0);
    MPI_Request *reqs = calloc((size_t)n, sizeof *reqs);
    if (!reqs) return;
    int posted = 0;
    for (int r = 0; r < n; r++)
        if (r != me && MPI_Isend(&msg, 1, MPI_INT, r, TAG_LEFT, ctl, &reqs[posted]) == MPI_SUCCESS) posted++;
    for (int tries = 0; tries < 1000; tries++) {
        int all = 0;
        if (MPI_Testall(posted, reqs, &all, MPI_STATUSES_IGNORE) != MPI_SUCCESS || all) break;
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    free(reqs);
}

/* A peer's announcement since the last call: its world rank, with *kind 0 (left) or 1 (aborts); -1 for none. */
int32_t fl_mpi_poll_announced(int32_t *kind) {
    if (!mpi_up || ctl_req == MPI_REQUEST_NULL) return -1;
    int flag = 0;
    MPI_Status st;
    if (MPI_Test(&ctl_req, &flag, &st) != MPI_SUCCESS || !flag) return -1;
    int32_t who = ctl_buf / 2;
    *kind = ctl_buf % 2;
    if (MPI_Irecv(&ctl_buf, 1, MPI_INT, MPI_ANY_SOURCE, TAG_LEFT, ctl, &ctl_req) != MPI_SUCCESS)
        ctl_req = MPI_REQUEST_NULL;
    return who;
}

int fl_mpi_finalize(void *world) {
    if (!mpi_up) return FL_OK;
    fl_mpi_free(world);
    if (ctl_req != MPI_REQUEST_NULL) {
        MPI_Cancel(&ctl_req);
        MPI_Wait(&ctl_req, MPI_STATUS_IGNORE);
    }
    MPI_Comm_free(&ctl);
    for (int i = 0; i < 4; i++) MPI_Type_free(&elem_types[i]);
    mpi_up = false;
    int rc = MPI_Finalize();
    return rc == MPI_SUCCESS ? FL_OK : mpi_fail(rc, "MPI_Finalize");
}

void fl_mpi_abort(int32_t code) {
    if (mpi_up) MPI_Abort(MPI_COMM_WORLD, code);
}

int fl_mpi_split(void *g, int32_t color, int32_t key, void **out, int32_t *rank, int32_t *size) {
    mpi_group *n = calloc(1, sizeof *n);
    if (!n) return fl_fail(FL_ENOMEM, "comm_split: out of memory");
    int rc = MPI_Comm_split(comm_of(g), color, key, &n->comm);
    if (rc != MPI_SUCCESS) { free(n); return mpi_fail(rc, "MPI_Comm_split"); }
    MPI_Comm_set_errhandler(n->comm, MPI_ERRORS_RETURN);
    int r = 0, s = 1;
    MPI_Comm_rank(n->comm, &r);
    MPI_Comm_size(n->comm, &s);
    *out = n;
    *rank = r;
    *size = s;
    return FL_OK;
}

/* out[i] = the MPI_COMM_WORLD rank of group rank i. */
int fl_mpi_global_ranks(void *g, int32_t size, int32_t *out) {
    MPI_Group grp, wgrp;
    MPI_Comm_group(comm_of(g), &grp);
    MPI_Comm_group(MPI_COMM_WORLD, &wgrp);
    int *in = malloc((size_t)size * sizeof *in), *res = malloc((size_t)size * sizeof *res);
    int rc = FL_OK;
    if (!in || !res) { rc = fl_fail(FL_ENOMEM, "comm_split: out of memory"); goto done; }
    for (int32_t i = 0; i < size; i++) in[i] = i;
    int e = MPI_Group_translate_ranks(grp, size, in, wgrp, res);
    if (e != MPI_SUCCESS) { rc = mpi_fail(e, "MPI_Group_translate_ranks"); goto done; }
    for (int32_t i = 0; i < size; i++) out[i] = res[i];
done:
    free(in);
    free(res);
    MPI_Group_free(&grp);
    MPI_Group_free(&wgrp);
    return rc;
}

void fl_mpi_free(void *g) {
    if (!g) return;
    if (mpi_up) MPI_Comm_free(&((mpi_group *)g)->comm);
    free(g);
}

/* in == NULL: in place (this rank's block of out already holds its contribution). */
int fl_mpi_allgather(void *g, const void *in, void *out, int64_t count, size_t esz) {
    MPI_Datatype t = elem_type(esz);
    int rc = in ? MPI_Allgather(in, (int)count, t, out, (int)count, t, comm_of(g))
                : MPI_Allgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, out, (int)count, t, comm_of(g));
    return rc == MPI_SUCCESS ? FL_OK : mpi_fail(rc, "MPI_Allgather");
}

int fl_mpi_allgatherv_inplace(void *g, void *buf, const int *counts, const int *displs, size_t esz) {
    int rc = MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, counts, displs, elem_type(esz), comm_of(g));
    return rc == MPI_SUCCESS ? FL_OK : mpi_fail(rc, "MPI_Allgatherv");
}

int fl_mpi_alltoallv(void *g, const void *in, const int *sc, const int *sd, void *out, const int *rc_, const int *rd,
                     size_t esz) {
    MPI_Datatype t = elem_type(esz);
    int rc = MPI_Alltoallv(in, sc, sd, t, out, rc_, rd, t, comm_of(g));
    return rc == MPI_SUCCESS ? FL_OK : mpi_fail(rc, "MPI_Alltoallv");
}

int fl_mpi_bcast(void *g, void *buf, int64_t count, size_t esz, int32_t root) {
    int rc = MPI_Bcast(buf, (int)count, elem_type(esz), root, comm_of(g));
    return rc == MPI_SUCCESS ? FL_OK : mpi_fail(rc, "MPI_Bcast");
}

int fl_mpi_barrier(void *g) {
    int rc = MPI_Barrier(comm_of(g));
    return rc == MPI_SUCCESS ? FL_OK : mpi_fail(rc, "MPI_Barrier");
}

/* Nonblocking collectives: *req is an opaque request for fl_mpi_test_coll, which frees it once it completes.
 * They let the communication thread wait for a header exchange while it posts other groups' placeholders, and
 * a control group's operations wait on the main thread with the departure checks in between. */
static int post_coll(int rc, MPI_Request *r, void **req, const char *call) {
    if (rc != MPI_SUCCESS) { free(r); return mpi_fail(rc, call); }
    *req = r;
    return FL_OK;
}

int fl_mpi_iallgather(void *g, const void *in, void *out, int64_t count, size_t esz, void **req) {
    MPI_Request *r = malloc(sizeof *r);
    if (!r) return fl_fail(FL_ENOMEM, "all_gather: out of memory");
    MPI_Datatype t = elem_type(esz);
    return post_coll(MPI_Iallgather(in, (int)count, t, out, (int)count, t, comm_of(g), r), r, req, "MPI_Iallgather");
}

int fl_mpi_ibcast(void *g, void *buf, int64_t count, size_t esz, int32_t root, void **req) {
    MPI_Request *r = malloc(sizeof *r);
    if (!r) return fl_fail(FL_ENOMEM, "broadcast: out of memory");
    return post_coll(MPI_Ibcast(buf, (int)count, elem_type(esz), root, comm_of(g), r), r, req, "MPI_Ibcast");
}

int fl_mpi_ibarrier(void *g, void **req) {
    MPI_Request *r = malloc(sizeof *r);
    if (!r) return fl_fail(FL_ENOMEM, "barrier: out of memory");
    return post_coll(MPI_Ibarrier(comm_of(g), r), r, req, "MPI_Ibarrier");
}

int fl_mpi_test_coll(void **req, bool *done) {
    MPI_Request *r = *req;
    int flag = 0;
    int rc = MPI_Test(r, &flag, MPI_STATUS_IGNORE);
    *done = flag != 0 || rc != MPI_SUCCESS;
    if (*done) { free(r); *req = NULL; }
    return rc == MPI_SUCCESS ? FL_OK : mpi_fail(rc, "MPI_Test");
}

int fl_mpi_isend(void *g, const void *buf, int64_t count, size_t esz, int32_t dst, int32_t tag, void **req) {
    MPI_Request *r = malloc(sizeof *r);
    if (!r) return fl_fail(FL_ENOMEM, "send: out of memory");
    int rc = MPI_Isend(buf, (int)count, elem_type(esz), dst, tag, comm_of(g), r);
    if (rc != MPI_SUCCESS) { free(r); return mpi_fail(rc, "MPI_Isend"); }
    *req = r;
    return FL_OK;
}

int fl_mpi_irecv(void *g, void *buf, int64_t count, size_t esz, int32_t src, int32_t tag, void **req) {
    MPI_Request *r = malloc(sizeof *r);
    if (!r) return fl_fail(FL_ENOMEM, "recv: out of memory");
    int rc = MPI_Irecv(buf, (int)count, elem_type(esz), src, tag, comm_of(g), r);
    if (rc != MPI_SUCCESS) { free(r); return mpi_fail(rc, "MPI_Irecv"); }
    *req = r;
    return FL_OK;
}

/* Tests a request from isend/irecv; when done, frees it and sets *bytes to the bytes received (recv). */
int fl_mpi_test(void **req, bool *done, int64_t *bytes) {
    MPI_Request *r = *req;
    MPI_Status st;
    int flag = 0;
    int rc = MPI_Test(r, &flag, &st);
    *done = flag != 0;
    if (rc == MPI_ERR_IN_STATUS) rc = st.MPI_ERROR;
    if (rc != MPI_SUCCESS) {
        *done = true;
        free(r);
        *req = NULL;
        return mpi_fail(rc, "MPI_Test");
    }
    if (flag) {
        int n = 0;
        MPI_Get_count(&st, MPI_BYTE, &n);
        *bytes = n;
        free(r);
        *req = NULL;
    }
    return FL_OK;
}
