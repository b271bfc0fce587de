/* engine/core/storage.c: refcounted byte buffers that can be freed and re-allocated under live tensors, the
 * per-category memory accounting (current, peak) plus the allocation counter that drives Lua's collector, and a
 * caching host allocator.
 *
 * The cache: a training step allocates and frees the same large buffers every step (activations, gradients,
 * gathered weights). From malloc each is a fresh mmap whose pages the kernel faults in and clears again on every
 * step. Blocks of CACHE_MIN bytes or more are therefore kept on free lists by size class (log2 of the size) when
 * freed, and an allocation takes the smallest cached block of its class or the next that is at most 1/8 larger,
 * as PyTorch's CUDA caching allocator does on the device: steady-state steps touch no fresh pages. The cache holds
 * at most `limit` bytes (FSDP_CACHE_LIMIT_MB, default 4096; 0 turns it off); an allocation that fails empties it
 * and tries again. Accounting counts tensors' bytes, not cached ones (fl_mem_cached). Sanitizer builds do not
 * cache, so that a use after free is still caught. */
#include "internal.h"

#include <pthread.h>
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
static void *alloc_raw(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64) != 0) return NULL;
    return p;
}

#if defined(__SANITIZE_ADDRESS__)
#define FL_NO_ALLOC_CACHE 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FL_NO_ALLOC_CACHE 1
#endif
#endif

enum { CACHE_MIN = 256 * 1024, CACHE_CLASSES = 48 };

typedef struct cached_block {
    void *p;
    size_t cap;
    struct cached_block *next;
} cached_block;

static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;
static cached_block *cache_class[CACHE_CLASSES];   /* each sorted by size, smallest first */
static int64_t cache_bytes, cache_limit = -1;

static int size_class(size_t n) {
    int c = 0;
    while (c < CACHE_CLASSES - 1 && ((size_t)1 << (c + 1)) <= n) c++;
    return c;
}

static int64_t limit_bytes(void) {
    if (cache_limit < 0) {
        const char *e = getenv("FSDP_CACHE_LIMIT_MB");
        long mb = e && *e ? strtol(e, NULL, 10) : 4096;
        cache_limit = (mb > 0 ? (int64_t)mb : 0) << 20;
    }
    return cache_limit;
}

/* A cached block of at least n bytes (at most n + n/8), removed from the cache; NULL when none. */
static void *cache_take(size_t n, size_t *cap) {
    void *p = NULL;
    pthread_mutex_lock(&cache_lock);
    for (int c = size_class(n); c < CACHE_CLASSES && !p; c++) {
        for (cached_block **b = &cache_class[c]; *b; b = &(*b)->next) {
            if ((*b)->cap < n) continue;
            if ((*b)->cap > n + n / 8) break;   /* sorted: every later block is larger still */
            cached_block *hit = *b;
            *b = hit->next;
            p = hit->p;
            *cap = hit->cap;
            cache_bytes -= (int64_t)hit->cap;
            free(hit);
            break;
        }
        if (c > size_class(n + n / 8)) break;
    }
    pthread_mutex_unlock(&cache_lock);
    return p;
}

/* Keeps a freed block for reuse; false (the caller frees it) when it is small or the cache is full. */
static bool cache_put(void *p, size_t cap) {
#ifdef FL_NO_ALLOC_CACHE
    (void)p; (void)cap;
    return false;
#else
    if (cap < CACHE_MIN) return false;
    cached_block *nb = malloc(sizeof *nb);
    if (!nb) return false;
    pthread_mutex_lock(&cache_lock);
    if (cache_bytes + (int64_t)cap > limit_bytes()) {
        pthread_mutex_unlock(&cache_lock);
        free(nb);
        return false;
    }
    nb->p = p;
    nb->cap = cap;
    cached_block **b = &cache_class[size_class(cap)];
    while (*b && (*b)->cap < cap) b = &(*b)->next;
    nb->next = *b;
    *b = nb;
    cache_bytes += (int64_t)cap;
    pthread_mutex_unlock(&cache_lock);
    return true;
#endif
}

bool fl_mem_cache_enabled(void) {
#ifdef FL_NO_ALLOC_CACHE
    return false;
#else
    pthread_mutex_lock(&cache_lock);
    bool on = limit_bytes() > 0;
    pthread_mutex_unlock(&cache_lock);
    return on;
#endif
}

int64_t fl_mem_cached(void) {
    pthread_mutex_lock(&cache_lock);
    int64_t n = cache_bytes;
    pthread_mutex_unlock(&cache_lock);
    return n;
}

void fl_mem_empty_cache(void) {
    pthread_mutex_lock(&cache_lock);
    for (int c = 0; c < CACHE_CLASSES; c++) {
        while (cache_class[c]) {
            cached_block *b = cache_class[c];
            cache_class[c] = b->next;
            free(b->p);
            free(b);
        }
    }
    cache_bytes = 0;
    pthread_mutex_unlock(&cache_lock);
}

static _Atomic int64_t fresh_bytes;   /* large blocks that came from the system, not the cache */

int64_t fl_mem_fresh_bytes(void) { return atomic_load(&fresh_bytes); }

static void *alloc_bytes(size_t n, size_t *cap) {
    *cap = n;
    if (n >= CACHE_MIN) {
        void *p = cache_take(n, cap);
        if (p) return p;
        atomic_fetch_add(&fresh_bytes, (int64_t)n);
    }
    void *p = alloc_raw(n);
    if (!p && fl_mem_cached() > 0) {   /* memory is short: give the cache back and try once more */
        fl_mem_empty_cache();
        p = alloc_raw(n);
    }
    *cap = n;
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
        if (!cache_put(s->data, s->cap)) free(s->data);
        s->data = NULL;
        account(s->category, -(int64_t)s->nbytes);
    }
    return FL_OK;
}

int fl_storage_alloc_data(fl_storage *s) {
    if (s->data) return FL_OK;
    if (s->device == FL_CUDA) return fl_fail(FL_EUNSUPPORTED, "storage: this build has no CUDA device memory");
    s->data = alloc_bytes(s->nbytes, &s->cap);
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
