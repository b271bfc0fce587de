/* engine/core/storage.c: refcounted byte buffers that can be freed and re-allocated under live tensors, and the
 * per-category memory accounting (current, peak) plus the allocation counter that drives Lua's collector. */
#include "internal.h"

#include <stdatomic.h>

static _Atomic int64_t mem_cur[FL_MEM_NCATEGORIES];
static _Atomic int64_t mem_peak[FL_MEM_NCATEGORIES];
static _Atomic int64_t mem_total_cur, mem_total_peak;
static _Atomic int64_t alloc_pending;

static void account(int32_t cat, int64_t delta) {
    int64_t c = atomic_fetch_add(&mem_cur[cat], delta) + delta;
    int64_t p = atomic_load(&mem_peak[cat]);
    while (c > p && !atomic_compare_exchange_weak(&mem_peak[cat], &p, c)) {}
    int64_t t = atomic_fetch_add(&mem_total_cur, delta) + delta;
    p = atomic_load(&mem_total_peak);
    while (t > p && !atomic_compare_exchange_weak(&mem_total_peak, &p, t)) {}
    if (delta > 0) atomic_fetch_add(&alloc_pending, delta);
}

int64_t fl_mem_current(int32_t c) { return c >= 0 && c < FL_MEM_NCATEGORIES ? atomic_load(&mem_cur[c]) : 0; }
int64_t fl_mem_peak(int32_t c) { return c >= 0 && c < FL_MEM_NCATEGORIES ? atomic_load(&mem_peak[c]) : 0; }
int64_t fl_mem_total_current(void) { return atomic_load(&mem_total_cur); }
int64_t fl_mem_total_peak(void) { return atomic_load(&mem_total_peak); }
void fl_mem_reset_peak(void) {
    for (int c = 0; c < FL_MEM_NCATEGORIES; c++) atomic_store(&mem_peak[c], atomic_load(&mem_cur[c]));
    atomic_store(&mem_total_peak, atomic_load(&mem_total_cur));
}
int64_t fl_alloc_bytes_pending(void) { return atomic_load(&alloc_pending); }
void fl_alloc_reset_pending(void) { atomic_store(&alloc_pending, 0); }

/* 64-byte alignment: whole cache lines, and AVX-512 loads never split. */
static void *alloc_bytes(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64) != 0) return NULL;
    return p;
}

fl_storage *fl_storage_new(size_t nbytes, int32_t device) {
    fl_storage *s = calloc(1, sizeof *s);
    if (!s) return fl_fail_null(FL_ENOMEM, "storage: out of memory for the header");
    s->refcount = 1;
    s->device = device;
    s->nbytes = nbytes;
    s->category = FL_MEM_ACTIVATION;
    if (device == FL_CPU && fl_storage_alloc_data(s) < 0) {
        free(s);
        return NULL;
    }
    return s;
}

void fl_storage_retain(fl_storage *s) { if (s) s->refcount++; }

void fl_storage_release(fl_storage *s) {
    if (!s || --s->refcount > 0) return;
    fl_storage_free_data(s);
    free(s);
}

int fl_storage_free_data(fl_storage *s) {
    if (s->data) {
        free(s->data);
        s->data = NULL;
        account(s->category, -(int64_t)s->nbytes);
    }
    return FL_OK;
}

int fl_storage_alloc_data(fl_storage *s) {
    if (s->data) return FL_OK;
    if (s->device == FL_CUDA) return fl_fail(FL_EUNSUPPORTED, "storage: this build has no CUDA device memory");
    s->data = alloc_bytes(s->nbytes);
    if (!s->data) return fl_fail(FL_ENOMEM, "storage: cannot allocate %zu bytes", s->nbytes);
    if (s->device == FL_META) s->device = FL_CPU;
    account(s->category, (int64_t)s->nbytes);
    return FL_OK;
}

void fl_storage_set_category(fl_storage *s, int32_t category) {
    if (!s || category < 0 || category >= FL_MEM_NCATEGORIES || category == s->category) return;
    if (s->data) {
        account(s->category, -(int64_t)s->nbytes);
        s->category = category;
        account(category, (int64_t)s->nbytes);
        atomic_fetch_sub(&alloc_pending, (int64_t)s->nbytes); /* a move, not a new allocation */
    } else {
        s->category = category;
    }
}
