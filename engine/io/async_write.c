/* engine/io/async_write.c: checkpoint files written by a background thread from a host staging copy. The caller
 * stages every byte of each file (header and tensors, converted to the file dtype) while it still owns the tensors,
 * starts the thread and goes on computing; the thread writes and fsyncs the files. Agreeing with the other ranks and
 * publishing the directory are left to the caller's thread (lua/fsdp/checkpoint/train.lua): this thread touches
 * files only, never the communicator, which is not for arbitrary threads. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

/* One pwrite moves at most this many bytes, so a signal or a slow disk never makes one call huge. */
enum { AW_CHUNK = 64 * 1024 * 1024 };

typedef struct staged_file {
    char *path;
    uint8_t *bytes;   /* the whole file: freed by the thread once written */
    int64_t size;
    uint32_t crc;     /* CRC32C of the bytes written so far: the file's once it is written */
} staged_file;

enum aw_state { AW_STAGING = 0, AW_RUNNING = 1, AW_JOINED = 2 };

struct fl_async_write {
    staged_file *files;
    int32_t n, cap;
    int64_t staged_bytes;
    int32_t state;          /* enum aw_state; read and written by the owning thread only */
    pthread_t thread;
    atomic_int finished;    /* set by the writer as its last act: fl_async_write_done reads it */
    double delay_s;
    int status;             /* the writer's result, read after the join */
    char err[1024];         /* its message: fl_last_error is per thread, so it is carried over at the join */
};

fl_async_write *fl_async_write_new(void) {
    fl_async_write *w = calloc(1, sizeof *w);
    if (!w) return fl_fail_null(FL_ENOMEM, "async write: out of memory");
    atomic_init(&w->finished, 0);
    return w;
}

int32_t fl_async_write_add_file(fl_async_write *w, const char *path, int64_t size) {
    if (!w || !path) return fl_fail(FL_EINVAL, "async write: add_file needs a writer and a path");
    if (w->state != AW_STAGING) return fl_fail(FL_ESTATE, "async write: '%s' added after the write started", path);
    if (size < 0) return fl_fail(FL_EINVAL, "async write: '%s' with a negative size %" PRId64, path, size);
    if (w->n == w->cap) {
        int32_t cap = w->cap ? 2 * w->cap : 4;
        staged_file *grown = realloc(w->files, sizeof *grown * (size_t)cap);
        if (!grown) return fl_fail(FL_ENOMEM, "async write: out of memory");
        w->files = grown;
        w->cap = cap;
    }
    staged_file *f = &w->files[w->n];
    f->path = strdup(path);
    f->bytes = malloc((size_t)(size > 0 ? size : 1));
    f->size = size;
    f->crc = 0;
    if (!f->path || !f->bytes) {
        free(f->path);
        free(f->bytes);
        return fl_fail(FL_ENOMEM, "async write: cannot stage %" PRId64 " bytes of host memory for '%s'", size, path);
    }
    w->staged_bytes += size;
    return w->n++;
}

static int staged_range(fl_async_write *w, int32_t file, int64_t offset, int64_t n, uint8_t **dst) {
    if (!w || file < 0 || file >= w->n) return fl_fail(FL_EINVAL, "async write: no staged file %d", file);
    if (w->state != AW_STAGING)
        return fl_fail(FL_ESTATE, "async write: '%s' changed after the write started", w->files[file].path);
    staged_file *f = &w->files[file];
    if (offset < 0 || n < 0 || offset + n > f->size)
        return fl_fail(FL_EINVAL, "async write: bytes [%" PRId64 ", %" PRId64 ") are outside '%s' (%" PRId64 " bytes)",
                       offset, offset + n, f->path, f->size);
    *dst = f->bytes + offset;
    return FL_OK;
}

int fl_async_write_put_bytes(fl_async_write *w, int32_t file, int64_t offset, const void *data, int64_t n) {
    uint8_t *dst = NULL;
    int rc = staged_range(w, file, offset, n, &dst);
    if (rc < 0) return rc;
    if (n > 0) memcpy(dst, data, (size_t)n);
    return FL_OK;
}

int fl_async_write_put_tensor(fl_async_write *w, int32_t file, int64_t offset, int32_t file_dtype, const fl_tensor *t) {
    if (file_dtype < 0 || file_dtype >= FL_NDTYPES)
        return fl_fail(FL_EINVAL, "async write: unknown file dtype %d", file_dtype);
    const void *src = fl_tensor_data(t);
    if (!src) return fl_fail(FL_ESTATE, "async write: tensor %s has no data (meta or released)", fl_shape_str(t));
    int64_t n = fl_tensor_numel(t);
    uint8_t *dst = NULL;
    int rc = staged_range(w, file, offset, n * (int64_t)fl_dtype_size(file_dtype), &dst);
    if (rc < 0 || n == 0) return rc;
    void *packed = NULL;
    if (!fl_tensor_is_contiguous(t)) {
        packed = malloc((size_t)n * fl_dtype_size(t->dtype));
        if (!packed) return fl_fail(FL_ENOMEM, "async write: cannot pack tensor %s", fl_shape_str(t));
        fl_copy_strided(t, packed);
        src = packed;
    }
    if (file_dtype == t->dtype) memcpy(dst, src, (size_t)n * fl_dtype_size(file_dtype));
    else fl_convert(src, t->dtype, dst, file_dtype, n);
    free(packed);
    return FL_OK;
}

static int write_file(staged_file *f) {
    int fd = open(f->path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return fl_fail(FL_EIO, "async write: cannot create '%s': %s", f->path, strerror(errno));
    int rc = FL_OK;
    int64_t done = 0;
    while (done < f->size && rc == FL_OK) {
        size_t want = (size_t)fl_min64(AW_CHUNK, f->size - done);
        ssize_t r = pwrite(fd, f->bytes + done, want, (off_t)done);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) rc = fl_fail(FL_EIO, "async write: cannot write '%s' at offset %" PRId64 ": %s", f->path, done,
                                 r < 0 ? strerror(errno) : "no progress");
        else {
            f->crc = fl_crc32c(f->crc, f->bytes + done, r);   /* computed as it is written: no second pass */
            done += r;
        }
    }
    if (rc == FL_OK && fsync(fd) < 0) rc = fl_fail(FL_EIO, "async write: cannot sync '%s': %s", f->path, strerror(errno));
    if (close(fd) < 0 && rc == FL_OK) rc = fl_fail(FL_EIO, "async write: closing '%s' failed: %s", f->path, strerror(errno));
    return rc;
}

static void *writer(void *arg) {
    fl_async_write *w = arg;
    if (w->delay_s > 0) {
        struct timespec ts = {(time_t)w->delay_s, (long)((w->delay_s - (double)(time_t)w->delay_s) * 1e9)};
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
    }
    int rc = FL_OK;
    for (int32_t i = 0; i < w->n && rc == FL_OK; i++) {
        rc = write_file(&w->files[i]);
        free(w->files[i].bytes);   /* the host copy is done with: give the memory back while training goes on */
        w->files[i].bytes = NULL;
    }
    w->status = rc;
    if (rc < 0) snprintf(w->err, sizeof w->err, "%s", fl_last_error());
    atomic_store(&w->finished, 1);
    return NULL;
}

int fl_async_write_start(fl_async_write *w, double delay_s) {
    if (!w) return fl_fail(FL_EINVAL, "async write: start needs a writer");
    if (w->state != AW_STAGING) return fl_fail(FL_ESTATE, "async write: started twice");
    w->delay_s = delay_s > 0 ? delay_s : 0;
    int e = pthread_create(&w->thread, NULL, writer, w);
    if (e != 0) return fl_fail(FL_EIO, "async write: cannot start the writer thread: %s", strerror(e));
    w->state = AW_RUNNING;
    return FL_OK;
}

bool fl_async_write_done(const fl_async_write *w) {
    if (!w) return true;
    return w->state == AW_JOINED || atomic_load(&((fl_async_write *)w)->finished) != 0;
}

int fl_async_write_wait(fl_async_write *w) {
    if (!w) return fl_fail(FL_EINVAL, "async write: wait needs a writer");
    if (w->state == AW_STAGING) return fl_fail(FL_ESTATE, "async write: wait before start");
    if (w->state == AW_RUNNING) {
        int e = pthread_join(w->thread, NULL);
        if (e != 0) return fl_fail(FL_EIO, "async write: cannot join the writer thread: %s", strerror(e));
        w->state = AW_JOINED;
    }
    if (w->status < 0) return fl_fail(w->status, "%s", w->err);
    return FL_OK;
}

int fl_async_write_crc32c(const fl_async_write *w, int32_t file, uint32_t *crc) {
    if (!w || file < 0 || file >= w->n || !crc) return fl_fail(FL_EINVAL, "async write: no staged file %d", file);
    if (w->state != AW_JOINED || w->status < 0)
        return fl_fail(FL_ESTATE, "async write: the checksum of '%s' before a successful wait", w->files[file].path);
    *crc = w->files[file].crc;
    return FL_OK;
}

int64_t fl_async_write_bytes(const fl_async_write *w) { return w ? w->staged_bytes : 0; }

void fl_async_write_release(fl_async_write *w) {
    if (!w) return;
    if (w->state == AW_RUNNING) pthread_join(w->thread, NULL);   /* never free what the writer still reads */
    for (int32_t i = 0; i < w->n; i++) {
        free(w->files[i].path);
        free(w->files[i].bytes);
    }
    free(w->files);
    free(w);
}
