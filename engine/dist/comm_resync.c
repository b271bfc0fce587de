/* engine/dist/comm_resync.c: puts every group back in step after the multi-rank REPL gave up on a collective (a
 * timeout, Ctrl-C): the ranks compare, over a control group, how many collectives each issued on each group, and
 * the ranks behind post resync placeholders (comm_queue.c posts them) for their peers' pending collectives to
 * meet. What a collective does is comm.c's; the placeholders, waits and the registry are comm_queue.c's.
 *
 * Why this works: every collective starts with a header exchange (an all-gather of five numbers) whose result is
 * the same on every rank, and MPI matches a group's collectives in the order each rank posts them. A placeholder
 * posted where a peer posted collective k completes that exchange; both see a mismatch, so k fails alike on every
 * rank and no rank goes on to its data phase. Once every rank has posted as many exchanges on a group as the most
 * any rank issued, every pending operation there completes and the group's next collective matches again. */
#include "comm_internal.h"

#include <stdio.h>

typedef struct { int64_t uid, issued; } entry;
typedef struct { entry *e; int32_t n, cap; int rc; } snapshot;

static void take(fl_comm *c, void *arg) {
    snapshot *s = arg;
    if (s->rc < 0) return;
    if (s->n == s->cap) {
        int32_t cap = s->cap ? 2 * s->cap : 16;
        entry *ne = realloc(s->e, sizeof *ne * (size_t)cap);
        if (!ne) { s->rc = fl_fail(FL_ENOMEM, "resync: out of memory"); return; }
        s->e = ne;
        s->cap = cap;
    }
    s->e[s->n++] = (entry){(int64_t)c->uid, c->issued};
}

static int allgather_direct(fl_comm *ctrl, const void *in, void *out, int64_t bytes) {
    void *req = NULL;
    int rc = fl_mpi_iallgather(ctrl->mpi, in, out, bytes, 1, &req);
    if (rc == 0) rc = fl_queue_wait_direct(ctrl, &req, "resync");
    return rc;
}

typedef struct { const entry *all; int64_t total; int rc; } owed;

/* For one group of this rank (under the queue's mutex): as many placeholders as it issued fewer collectives than
 * the most any member did (the ranks listing its uid are its members). */
static void owe(fl_comm *c, void *arg) {
    owed *o = arg;
    if (o->rc < 0) return;
    int64_t most = c->issued;
    for (int64_t i = 0; i < o->total; i++)
        if (o->all[i].uid == (int64_t)c->uid && o->all[i].issued > most) most = o->all[i].issued;
    if (most > c->issued) o->rc = fl_queue_add_placeholders_locked(c, most - c->issued);
}

/* The three exchanges happen on every rank whatever fails locally, so that the control group stays in step;
 * a local failure travels in the last one, and every rank then returns the same error. Out of memory for the
 * exchanges themselves ends the job: a rank that left them would leave its peers waiting. */
int fl_comm_resync(fl_comm *ctrl, double timeout_s) {
    if (!ctrl || !ctrl->control) return fl_fail(FL_EINVAL, "resync: needs a control group (fl_comm_control_new)");
    if (!ctrl->mpi) return FL_OK;   /* one rank: nothing can be out of step */
    int32_t n = ctrl->size;
    if (n != fl_comm_world()->size)
        return fl_fail(FL_EINVAL, "resync: control group '%s' has %d of the world's %d ranks", ctrl->name, n,
                       fl_comm_world()->size);
    char local[256] = "";
    snapshot s = {0};
    fl_registry_each(take, &s);
    if (s.rc < 0) { snprintf(local, sizeof local, "%s", fl_last_error()); s.n = 0; }
    /* 1. Every rank's (uid, issued) list: the lengths, then the lists padded to the longest (uid 0 is no group). */
    int64_t len = s.n, most = 0, *counts = calloc((size_t)n, sizeof *counts);
    if (!counts) fl_dist_abort(1, "fsdp: resync: out of memory");
    int rc = allgather_direct(ctrl, &len, counts, sizeof len);
    for (int32_t r = 0; rc == 0 && r < n; r++) if (counts[r] > most) most = counts[r];
    entry *mine = NULL, *all = NULL;
    if (rc == 0 && most > 0) {
        mine = calloc((size_t)most, sizeof *mine);
        all = calloc((size_t)(most * n), sizeof *all);
        if (!mine || !all) fl_dist_abort(1, "fsdp: resync: out of memory");   /* as above */
        for (int32_t i = 0; i < s.n; i++) mine[i] = s.e[i];
        rc = allgather_direct(ctrl, mine, all, most * (int64_t)sizeof *mine);
    }
    /* 2. Placeholders where this rank is behind; then wait until every group is quiet here. */
    if (rc == 0 && !local[0] && most > 0) {
        owed o = {all, most * n, FL_OK};
        fl_registry_each(owe, &o);
        if (o.rc < 0) snprintf(local, sizeof local, "%s", fl_last_error());
    }
    /* the deadline counts from here: the first exchange waited for the slowest rank to finish its statement */
    double deadline = fl_comm_now() + (timeout_s > 0 ? timeout_s : 5.0);
    if (rc == 0 && !local[0] && fl_queue_wait_quiet(deadline) < 0) snprintf(local, sizeof local, "%s", fl_last_error());
    fl_queue_reap();
    /* 3. Agree: every rank learns every other's outcome, so all fail (or succeed) together. */
    char (*msgs)[256] = rc == 0 ? calloc((size_t)n, sizeof *msgs) : NULL;
    if (rc == 0 && !msgs) fl_dist_abort(1, "fsdp: resync: out of memory");
    if (rc == 0) rc = allgather_direct(ctrl, local, msgs, sizeof local);
    for (int32_t r = 0; rc == 0 && r < n; r++)
        if (msgs[r][0]) rc = fl_fail(FL_ECOMM, "resync: rank %d: %.200s", r, msgs[r]);
    free(s.e);
    free(counts);
    free(mine);
    free(all);
    free(msgs);
    return rc;
}
