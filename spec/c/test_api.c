/* spec/c/test_api.c: the public API (engine/fsdp.h) called from C as a C user calls it: the header's worked
 * example, error reporting, tensor lifecycle and views, exact sums of squares, file writes and the world-size-1
 * collectives. Prints TAP lines (ok / not ok); spec/run.sh compiles it against libfsdp.so and counts them. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fsdp.h"

static int n_run, n_failed;

static void ok(bool cond, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("%s %d - ", cond ? "ok" : "not ok", ++n_run);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    if (!cond) n_failed++;
}

/* A failing call must return its failure and leave a message that names `what`. */
static bool names(const char *what) { return strstr(fl_last_error(), what) != NULL; }

static void test_worked_example(void) {
    int64_t nodes0 = fl_autograd_live_nodes(), mem0 = fl_mem_total_current();
    bool grad_ok = false;
    /* The example at the top of engine/fsdp.h, line for line; the check goes where its comment says
     * a->grad == 2a, before a is released. */
    int64_t shape[2] = {2, 3};
    fl_tensor *a = fl_tensor_full(2, shape, FL_F32, 1.5);
    fl_tensor_set_requires_grad(a, true);
    fl_tensor *b = fl_mul(a, a);                 // records a grad_fn node
    fl_tensor *s = fl_sum(b);                    // scalar
    fl_backward(s, NULL, false);                 // a->grad == 2a
    {
        fl_tensor *g = fl_tensor_get_grad(a);
        grad_ok = g && fl_tensor_numel(g) == 6;
        for (int64_t i = 0; grad_ok && i < 6; i++) grad_ok = fl_tensor_get_flat(g, i) == 2 * 1.5;  /* exact in f32 */
        fl_tensor_release(g);
    }
    fl_tensor_release(s); fl_tensor_release(b); fl_tensor_release(a);
    ok(grad_ok, "worked example: the gradient of sum(a * a) is 2a (3.0 in every element)");
    ok(fl_autograd_live_nodes() == nodes0, "worked example: releasing its tensors frees every autograd node (%lld left)",
       (long long)(fl_autograd_live_nodes() - nodes0));
    ok(fl_mem_total_current() == mem0, "worked example: releasing its tensors frees their storage");
}

static void test_errors(void) {
    int64_t s23[2] = {2, 3}, s45[2] = {4, 5}, neg[1] = {-2};
    fl_tensor *a = fl_tensor_zeros(2, s23, FL_F32, FL_CPU), *b = fl_tensor_zeros(2, s45, FL_F32, FL_CPU);
    fl_tensor *m = fl_matmul(a, b);
    ok(m == NULL && names("matmul") && names("[2, 3]") && names("[4, 5]"),
       "matmul of [2,3] and [4,5] returns NULL and names both shapes: %s", fl_last_error());
    fl_tensor_release(m);
    ok(fl_tensor_set_flat(a, 6, 1.0) == FL_EINVAL && names("index 6"),
       "set_flat past the end returns FL_EINVAL and names the index: %s", fl_last_error());
    fl_tensor *e = fl_tensor_empty(1, neg, FL_F32, FL_CPU);
    ok(e == NULL && names("negative size -2"), "a negative size returns NULL and names it: %s", fl_last_error());
    e = fl_tensor_empty(2, s23, 99, FL_CPU);
    ok(e == NULL && names("dtype 99"), "an unknown dtype id returns NULL and names it: %s", fl_last_error());
    ok(fl_dtype_from_name("f33") == -1 && strcmp(fl_dtype_name(99), "?") == 0 && fl_dtype_from_name("bf16") == FL_BF16,
       "dtype names: unknown names give -1 and '?', known ones their id");
    fl_tensor *ids = fl_tensor_zeros(2, s23, FL_I64, FL_CPU);
    ok(fl_tensor_set_requires_grad(ids, true) == FL_EINVAL && names("floating point") && names("i64"),
       "requires_grad on an i64 tensor returns FL_EINVAL and names the dtype: %s", fl_last_error());
    fl_tensor_release(ids);
    /* backward twice without retain_graph: the first frees the graph, the second must say so, not crash */
    fl_tensor_set_requires_grad(a, true);
    fl_tensor *sq = fl_mul(a, a), *y = fl_sum(sq);
    int rc1 = fl_backward(y, NULL, false), rc2 = fl_backward(y, NULL, false);
    ok(rc1 == 0 && rc2 < 0 && names("backward"), "a second backward through a freed graph fails (%d): %s", rc2,
       fl_last_error());
    fl_tensor_release(y); fl_tensor_release(sq);
    ok(fl_backward(a, NULL, false) < 0 && names("backward"),
       "backward with no gradient from a 6-element root fails: %s", fl_last_error());
    fl_tensor_release(a); fl_tensor_release(b);
}

static void test_lifecycle(void) {
    int64_t mem0 = fl_mem_total_current(), s23[2] = {2, 3};
    float src[6] = {0, 1, 2, 3, 4, 5};
    fl_tensor *a = fl_tensor_from_data(2, s23, FL_F32, src);
    src[0] = 99;   /* from_data copies: the tensor must not see this */
    ok(a && a->refcount == 1 && fl_tensor_get_flat(a, 0) == 0 && fl_tensor_get_flat(a, 5) == 5,
       "from_data copies the caller's buffer and returns refcount 1");
    fl_tensor_retain(a);
    ok(a->refcount == 2, "retain adds a reference");
    fl_tensor_release(a);
    ok(a->refcount == 1, "release drops one");
    fl_tensor_release(NULL);   /* NULL-safe by contract: reaching the next line is the test */
    ok(true, "release(NULL) does nothing");
    /* a transposed view shares the storage and keeps it alive after the base is released */
    fl_tensor *t = fl_transpose(a, 0, 1);
    ok(t && fl_tensor_same_storage(a, t) && !fl_tensor_is_contiguous(t), "transpose is a view over the same storage");
    fl_tensor *c = fl_contiguous(t);
    ok(c && !fl_tensor_same_storage(a, c), "contiguous of a transposed view copies into new storage");
    fl_tensor_release(a);
    float rows[6];
    ok(fl_tensor_copy_to_buffer(t, rows) == 0 && rows[0] == 0 && rows[1] == 3 && rows[2] == 1 && rows[5] == 5,
       "a view outlives its base and copies out row-major through its strides ([0,3,1,4,2,5])");
    fl_tensor_release(t); fl_tensor_release(c);
    ok(fl_mem_total_current() == mem0, "releasing the last view frees the storage (%lld bytes left)",
       (long long)(fl_mem_total_current() - mem0));
    fl_tensor *m = fl_tensor_empty(2, s23, FL_F32, FL_META);
    ok(m && !fl_tensor_has_data(m) && fl_tensor_data(m) == NULL && fl_mem_total_current() == mem0,
       "a meta tensor allocates nothing");
    ok(fl_tensor_materialize(m, FL_CPU) == 0 && fl_tensor_get_flat(m, 5) == 0, "materialize gives zeros on cpu");
    ok(fl_tensor_storage_release(m) == 0 && !fl_tensor_has_data(m) && fl_tensor_set_flat(m, 0, 1) < 0 && names("released"),
       "after storage_release the tensor keeps its shape and refuses writes: %s", fl_last_error());
    fl_tensor_release(m);
}

static void test_exact_sum(void) {
    /* Integers below 2^31: each square and the sum below 2^64 are exact in uint64, and converting that to double
     * rounds once to nearest even, which is what fl_exact_sum_value promises. A left-to-right f64 sum rounds at
     * every add: next to a square near 2^62 (ulp 1024) each 15^2 = 225 is lost, while their sum, 1125, is not. */
    double x[6] = {2147483647.0, 15.0, -15.0, 15.0, 15.0, -15.0};
    uint64_t exact = 0;
    double naive = 0;
    for (int i = 0; i < 6; i++) { exact += (uint64_t)(x[i] * x[i]); naive += x[i] * x[i]; }
    int64_t n6[1] = {6}, n3[1] = {3}, na[1] = {FL_EXACT_SUM_SIZE};
    fl_tensor *t = fl_tensor_from_data(1, n6, FL_F64, x);
    fl_tensor *acc = fl_tensor_zeros(1, na, FL_I64, FL_CPU);
    int rc = fl_exact_sum_add_squares(acc, t);
    double got = fl_exact_sum_value(acc);
    ok(rc == 0 && got == (double)exact && naive != (double)exact,
       "exact sum of squares is the integer sum rounded once (%.17g), which a running f64 sum misses (%.17g)",
       got, naive);
    ok(fl_sum_squares(t) == (double)exact, "fl_sum_squares gives the same value");
    /* the same terms split and in the opposite order: the same bits */
    double lo[3] = {x[5], x[4], x[3]}, hi[3] = {x[2], x[1], x[0]};
    fl_tensor *tl = fl_tensor_from_data(1, n3, FL_F64, lo), *th = fl_tensor_from_data(1, n3, FL_F64, hi);
    fl_tensor *a1 = fl_tensor_zeros(1, na, FL_I64, FL_CPU), *a2 = fl_tensor_zeros(1, na, FL_I64, FL_CPU);
    fl_exact_sum_add_squares(a1, tl);
    fl_exact_sum_add_squares(a2, th);
    ok(fl_exact_sum_merge(a1, a2) == 0 && fl_exact_sum_value(a1) == fl_exact_sum_value(acc),
       "split in two, reversed and merged: the same value");
    float fnan[3] = {1, NAN, 2};
    fl_tensor *tn = fl_tensor_from_data(1, n3, FL_F32, fnan);
    ok(fl_exact_sum_add_squares(a1, tn) == 0 && isnan(fl_exact_sum_value(a1)), "a NaN term makes the value NaN");
    int64_t bad[1] = {FL_EXACT_SUM_SIZE - 1};
    fl_tensor *short_acc = fl_tensor_zeros(1, bad, FL_I64, FL_CPU);
    ok(fl_exact_sum_add_squares(short_acc, t) < 0, "an accumulator of the wrong size is refused: %s", fl_last_error());
    fl_tensor_release(t); fl_tensor_release(acc); fl_tensor_release(tl); fl_tensor_release(th);
    fl_tensor_release(a1); fl_tensor_release(a2); fl_tensor_release(tn); fl_tensor_release(short_acc);
}

static void test_file_write(void) {
    char path[] = "/tmp/fsdp-test-api-XXXXXX";
    int fd = mkstemp(path);
    if (fd >= 0) close(fd);
    const char hello[] = "hello", world[] = "WORLD";
    int rc1 = fl_file_write_at(path, 0, hello, 5), rc2 = fl_file_write_at(path, 8, world, 5);
    char got[14] = {0};
    FILE *f = fopen(path, "rb");
    size_t n = f ? fread(got, 1, sizeof got, f) : 0;
    if (f) fclose(f);
    ok(fd >= 0 && rc1 == 0 && rc2 == 0 && n == 13 && memcmp(got, "hello", 5) == 0 && memcmp(got + 8, "WORLD", 5) == 0,
       "file_write_at writes at both offsets of one file (%zu bytes)", n);
    unlink(path);
    ok(fl_file_write_at("/nonexistent-dir/x", 0, hello, 5) < 0 && names("/nonexistent-dir/x"),
       "file_write_at into a missing directory fails and names the path: %s", fl_last_error());
}

/* Not under mpirun, fl_dist_init makes a world of one rank (fl_mpi_launched looks at Open MPI's variables). */
static void test_world_of_one(void) {
    unsetenv("OMPI_COMM_WORLD_SIZE");
    unsetenv("PMIX_RANK");
    ok(fl_comm_world() == NULL && !fl_dist_is_initialized(), "no world before fl_dist_init");
    ok(fl_dist_init(30) == 0 && fl_dist_init(30) == 0 && fl_dist_is_initialized(), "fl_dist_init without MPI, twice");
    fl_comm *w = fl_comm_world();
    ok(w && fl_comm_rank(w) == 0 && fl_comm_size(w) == 1 && strcmp(fl_comm_name(w), "world") == 0 &&
       fl_comm_global_rank(w, 0) == 0, "the world is rank 0 of 1, named 'world'");
    fl_comm_set_timeout(w, 12.5);
    ok(fl_comm_get_timeout(w) == 12.5, "the timeout reads back");
    int64_t n4[1] = {4}, n8[1] = {8};
    float v[4] = {1, -2, 3.5f, 4};
    fl_tensor *in = fl_tensor_from_data(1, n4, FL_F32, v), *out = fl_tensor_zeros(1, n4, FL_F32, FL_CPU);
    bool same = fl_all_gather(w, out, in) == 0;
    for (int i = 0; same && i < 4; i++) same = fl_tensor_get_flat(out, i) == v[i];
    ok(same, "all_gather over one rank copies in to out");
    fl_tensor_fill_(out, 0);
    same = fl_reduce_scatter(w, out, in, FL_REDUCE_AVG) == 0;
    for (int i = 0; same && i < 4; i++) same = fl_tensor_get_flat(out, i) == v[i];
    ok(same, "reduce_scatter (avg) over one rank copies in to out");
    same = fl_all_reduce(w, in, FL_REDUCE_SUM) == 0 && fl_broadcast(w, in, 0) == 0 && fl_barrier(w) == 0;
    for (int i = 0; same && i < 4; i++) same = fl_tensor_get_flat(in, i) == v[i];
    ok(same, "all_reduce, broadcast from 0 and barrier leave the values");
    fl_work *wk = fl_all_reduce_async(w, in, FL_REDUCE_MAX);
    ok(wk && fl_work_test(wk) && fl_work_wait(wk) == 0, "an async all_reduce is complete at once and waits to 0");
    ok(fl_broadcast(w, in, 1) < 0 && names("1"), "broadcast from rank 1 of 1 fails: %s", fl_last_error());
    fl_tensor *big = fl_tensor_zeros(1, n8, FL_F32, FL_CPU);
    ok(fl_all_gather(w, big, in) < 0, "all_gather into an out of the wrong size fails: %s", fl_last_error());
    ok(fl_send(w, in, 0, 0) < 0 && names("mpirun") && fl_recv(w, out, 0, 0) < 0 && names("mpirun"),
       "send and recv need MPI and say so: %s", fl_last_error());
    /* the blocking forms return the async call's own code, not a generic one */
    ok(fl_send(w, in, 0, 0) == FL_EUNSUPPORTED && fl_recv(w, out, 0, 0) == FL_EUNSUPPORTED,
       "blocking send/recv keep the async call's FL_EUNSUPPORTED");
    ok(fl_comm_check(w, "x", FL_F32, 4) == 0, "comm_check over one rank passes");
    fl_tensor *acc = fl_tensor_zeros(1, (int64_t[1]){FL_EXACT_SUM_SIZE}, FL_I64, FL_CPU);
    fl_exact_sum_add_squares(acc, in);
    double before = fl_exact_sum_value(acc);
    ok(fl_exact_sum_all_reduce(w, acc) == 0 && fl_exact_sum_value(acc) == before && before == 1 + 4 + 12.25 + 16,
       "exact_sum_all_reduce over one rank keeps the value (33.25)");
    fl_comm *sub = fl_comm_split(w, 0, 0, "sub");
    ok(sub && fl_comm_size(sub) == 1 && strcmp(fl_comm_name(sub), "sub") == 0, "split gives a group of one named 'sub'");
    fl_comm_release(sub);
    fl_comm_release(w);   /* never releases the world: it must still work */
    ok(fl_barrier(fl_comm_world()) == 0, "releasing the world is a no-op");
    fl_tensor_release(in); fl_tensor_release(out); fl_tensor_release(big); fl_tensor_release(acc);
    ok(fl_dist_finalize() == 0, "fl_dist_finalize");
}

int main(void) {
    fl_set_num_threads(2);
    test_worked_example();
    test_errors();
    test_lifecycle();
    test_exact_sum();
    test_file_write();
    test_world_of_one();
    printf("1..%d\n", n_run);
    return n_failed ? 1 : 0;
}
