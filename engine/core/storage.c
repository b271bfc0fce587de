/* engine/core/storage.c: refcounted byte buffers that can be freed and re-allocated under live tensors, the
 * per-category memory accounting (current, peak) plus the allocation counter that drives Lua's collector, and a
 * caching host allocator.
 *
 * The cache: a training step allocates and frees the same large buffers every step (activations, gradients,
 * gathered weights). From malloc each is a fresh mmap whose pages the kernel faults in and clears again on every
 * step. Blocks of CACHE_MIN bytes or more therefore come from cached segments that a freed block goes back to
 * (block splitting and merging, as PyTorch's CUDA caching allocator does on the device, below): steady-state
 * steps touch no fresh pages. The cache keeps at most `limit` free bytes (FSDP_CACHE_LIMIT_MB, default 4096; 0
 * turns it off); an allocation that fails gives the free segments back and tries again. Accounting counts
 * tensors' bytes, not cached ones (fl_mem_cached). Sanitizer builds do not cache, so that a use after free is
 * still caught. */
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

#if defined(__SANITIZE_ADDRESS__)
#define FL_NO_ALLOC_CACHE 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FL_NO_ALLOC_CACHE 1
#endif
#endif

/* Blocks of CACHE_MIN bytes or more come from segments: regions taken from the system in multiples of SEGMENT
 * bytes and cut into blocks. A request takes the smallest free block that holds it (its size rounded up to
 * BLOCK_ROUND) and splits off the rest when that is CACHE_MIN or more; a freed block merges with free neighbours
 * of its segment. So one region serves every size a step asks for (as PyTorch's CUDA caching allocator splits
 * its segments), where whole blocks kept per size would hold the union of every size ever freed. Only a wholly
 * free segment goes back to the system (past the limit, on empty_cache, or when the system is out of memory). */
enum { CACHE_MIN = 256 * 1024, SEGMENT = 2 * 1024 * 1024, BLOCK_ROUND = 512, CACHE_CLASSES = 48 };

typedef struct cblock {
    char *p;
    size_t size;
    bool free;
    uint64_t age;                   /* when it was freed (cache_clock): the oldest free segments go first */
    struct cblock *prev, *next;     /* neighbours in its segment, by address; both NULL: a whole segment */
    struct cblock *fprev, *fnext;   /* its free list (while free), by size */
} cblock;

static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;
static cblock *free_class[CACHE_CLASSES];   /* free blocks by size class (log2), each sorted smallest first */
static int64_t cache_bytes, cache_limit = -1;   /* cache_bytes: free bytes inside segments */
static uint64_t cache_clock;
static _Atomic int64_t fresh_bytes;   /* large blocks that came from the system, not the cache */

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

/* Free-list bookkeeping; the caller holds cache_lock. */
static void free_insert(cblock *b) {
    b->free = true;
    cblock **at = &free_class[size_class(b->size)], *prev = NULL;
    while (*at && (*at)->size < b->size) { prev = *at; at = &(*at)->fnext; }
    b->fnext = *at;
    b->fprev = prev;
    if (*at) (*at)->fprev = b;
    *at = b;
    cache_bytes += (int64_t)b->size;
}

static void free_remove(cblock *b) {
    if (b->fprev) b->fprev->fnext = b->fnext;
    else free_class[size_class(b->size)] = b->fnext;
    if (b->fnext) b->fnext->fprev = b->fprev;
    b->fprev = b->fnext = NULL;
    b->free = false;
    cache_bytes -= (int64_t)b->size;
}

/* The smallest free block of at least n bytes, off its free list; NULL when none. */
static cblock *best_fit(size_t n) {
    for (int c = size_class(n); c < CACHE_CLASSES; c++)
        for (cblock *b = free_class[c]; b; b = b->fnext)
            if (b->size >= n) { free_remove(b); return b; }
    return NULL;
}

/* Gives wholly free segments back to the system, the least recently freed first, until the cache holds at most
 * keep bytes (or no free segment is left). */
static void release_segments(int64_t keep) {
    while (cache_bytes > keep) {
        cblock *oldest = NULL;
        for (int c = 0; c < CACHE_CLASSES; c++)
            for (cblock *b = free_class[c]; b; b = b->fnext)
                if (!b->prev && !b->next && (!oldest || b->age < oldest->age)) oldest = b;
        if (!oldest) return;
        free_remove(oldest);
        free(oldest->p);
        free(oldest);
    }
}

/* 64-byte alignment: whole cache lines, and AVX-512 loads never split. */
static void *alloc_raw(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64) != 0) return NULL;
    return p;
}

/* From the system; when memory is short, the cache's free segments go back first and it tries once more. */
static void *alloc_system(size_t n) {
    void *p = alloc_raw(n);
    if (!p) {
        pthread_mutex_lock(&cache_lock);
        release_segments(0);
        pthread_mutex_unlock(&cache_lock);
        p = alloc_raw(n);
    }
    return p;
}

/* n bytes from the cache (its block in *blk, its size in *cap), or from the system (*blk NULL). */
static void *alloc_bytes(size_t n, size_t *cap, cblock **blk) {
    *cap = n;
    *blk = NULL;
    if (n < CACHE_MIN) return alloc_system(n);
#ifndef FL_NO_ALLOC_CACHE
    if (limit_bytes() > 0) {
        size_t want = (n + BLOCK_ROUND - 1) / BLOCK_ROUND * BLOCK_ROUND;
        pthread_mutex_lock(&cache_lock);
        cblock *b = best_fit(want);
        if (!b) {
            size_t seg = (want + SEGMENT - 1) / SEGMENT * SEGMENT;
            void *p = alloc_raw(seg);
            if (!p) {   /* memory is short: give the free segments back and try once more */
                release_segments(0);
                p = alloc_raw(seg);
            }
            if (p) b = calloc(1, sizeof *b);
            if (!b) {
                pthread_mutex_unlock(&cache_lock);
                free(p);
                return NULL;
            }
            b->p = p;
            b->size = seg;
            atomic_fetch_add(&fresh_bytes, (int64_t)seg);
        }
        if (b->size - want >= CACHE_MIN) {   /* split: the rest stays free */
            cblock *r = calloc(1, sizeof *r);
            if (r) {
                r->p = b->p + want;
                r->size = b->size - want;
                r->prev = b;
                r->next = b->next;
                if (b->next) b->next->prev = r;
                b->next = r;
                b->size = want;
                r->age = cache_clock++;
                free_insert(r);
            }
        }
        pthread_mutex_unlock(&cache_lock);
        *cap = b->size;
        *blk = b;
        return b->p;
    }
#endif
    atomic_fetch_add(&fresh_bytes, (int64_t)n);
    return alloc_system(n);
}

/* a absorbs b, its next neighbour in the segment; neither is on a free list. */
static void absorb_next(cblock *a, cblock *b) {
    a->size += b->size;
    a->next = b->next;
    if (b->next) b->next->prev = a;
    free(b);
}

/* Returns a block to its segment, merged with its free neighbours; past the limit, the oldest free segments go. */
static void free_block(cblock *b) {
    pthread_mutex_lock(&cache_lock);
    if (b->next && b->next->free) {
        free_remove(b->next);
        absorb_next(b, b->next);
    }
    if (b->prev && b->prev->free) {
        cblock *pv = b->prev;
        free_remove(pv);
        absorb_next(pv, b);
        b = pv;
    }
    b->age = cache_clock++;
    free_insert(b);
    release_segments(limit_bytes());
    pthread_mutex_unlock(&cache_lock);
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
    release_segments(0);
    pthread_mutex_unlock(&cache_lock);
}

int64_t fl_mem_fresh_bytes(void) { return atomic_load(&fresh_bytes); }

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
        if (s->block) free_block(s->block);
        else free(s->data);
        s->data = NULL;
        s->block = NULL;
        account(s->category, -(int64_t)s->nbytes);
    }
    return FL_OK;
}

int fl_storage_alloc_data(fl_storage *s) {
    if (s->data) return FL_OK;
    if (s->device == FL_CUDA) return fl_fail(FL_EUNSUPPORTED, "storage: this build has no CUDA device memory");
    s->data = alloc_bytes(s->nbytes, &s->cap, (cblock **)&s->block);
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
