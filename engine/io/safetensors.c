/* engine/io/safetensors.c: the bulk bytes of safetensors files — the 8-byte length and raw header, tensor data read
 * at a byte offset (with dtype conversion) and written at a byte offset. Parsing and validating the JSON header,
 * and deciding the layout, are left to lua/fsdp/safetensors.lua. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

/* The reference reader refuses headers above 100 MB; so do we (a corrupt length must not allocate 2^63 bytes). */
enum { ST_MAX_HEADER = 100 * 1000 * 1000 };
/* Conversions go through a bounce buffer of this many bytes of file data, so loading a 10 GB bf16 tensor
 * into f32 does not need another 10 GB. */
enum { ST_CHUNK = 16 * 1024 * 1024 };
/* Bytes written between two writeback starts (pwrite_all). */
enum { ST_WRITEBACK = 8 * 1024 * 1024 };

/* Bytes this process has read from safetensors files (headers and data): a sharded load is proven to read only
 * its own rows by this count. Atomic: loads may run from several threads. */
static _Atomic int64_t bytes_read;

int64_t fl_st_bytes_read(void) { return bytes_read; }
void fl_st_reset_bytes_read(void) { bytes_read = 0; }

/* Reads exactly n bytes at `off`; a short read means the file is truncated. */
static int pread_all(int fd, void *buf, size_t n, int64_t off, const char *path) {
    uint8_t *p = buf;
    size_t done = 0;
    while (done < n) {
        ssize_t r = pread(fd, p + done, n - done, (off_t)(off + (int64_t)done));
        if (r < 0) {
            if (errno == EINTR) continue;
            return fl_fail(FL_EIO, "safetensors: cannot read '%s' at offset %" PRId64 ": %s", path,
                           off + (int64_t)done, strerror(errno));
        }
        if (r == 0)
            return fl_fail(FL_EIO, "safetensors: '%s' is truncated: wanted %zu bytes at offset %" PRId64
                           ", the file ends after %zu", path, n, off, done);
        done += (size_t)r;
        bytes_read += r;
    }
    return FL_OK;
}

/* Writes exactly n bytes at `off`, in ST_WRITEBACK pieces, starting the writeback of each piece as soon as it is
 * in the page cache (sync_file_range WRITE: it queues the I/O and does not wait for it). The disk then works while
 * the next pieces are copied, instead of all of it waiting for the fsync that ends a save; that fsync still
 * decides durability, so a failed hint is ignored. crc, when not NULL, is extended with the bytes written. */
static int pwrite_all(int fd, const void *buf, size_t n, int64_t off, const char *path, uint32_t *crc) {
    const uint8_t *p = buf;
    size_t done = 0;
    while (done < n) {
        size_t want = n - done < ST_WRITEBACK ? n - done : ST_WRITEBACK;
        ssize_t r = pwrite(fd, p + done, want, (off_t)(off + (int64_t)done));
        if (r < 0) {
            if (errno == EINTR) continue;
            return fl_fail(FL_EIO, "safetensors: cannot write %zu bytes to '%s' at offset %" PRId64 ": %s", n - done,
                           path, off + (int64_t)done, strerror(errno));
        }
        (void)sync_file_range(fd, (off_t)(off + (int64_t)done), (off_t)r, SYNC_FILE_RANGE_WRITE);
        if (crc) *crc = fl_crc32c(*crc, p + done, r);   /* the bytes just written, while they are in cache */
        done += (size_t)r;
    }
    return FL_OK;
}

char *fl_st_read_header(const char *path, int64_t *header_len) {
    char *buf = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fl_fail_null(FL_EIO, "safetensors: cannot open '%s': %s", path, strerror(errno));
    struct stat st;
    uint8_t lenb[8];
    if (fstat(fd, &st) < 0) {
        fl_fail(FL_EIO, "safetensors: cannot stat '%s': %s", path, strerror(errno));
        goto done;
    }
    if (st.st_size < 8) {
        fl_fail(FL_EIO, "safetensors: '%s' is truncated: %" PRId64 " bytes, less than the 8-byte header length",
                path, (int64_t)st.st_size);
        goto done;
    }
    if (pread_all(fd, lenb, 8, 0, path) < 0) goto done;
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | lenb[i]; /* little-endian on any host */
    if (n > ST_MAX_HEADER) {
        fl_fail(FL_EIO, "safetensors: '%s' declares a header of %" PRIu64 " bytes (at most %d): not a safetensors file?",
                path, n, ST_MAX_HEADER);
        goto done;
    }
    if ((int64_t)n > (int64_t)st.st_size - 8) {
        fl_fail(FL_EIO, "safetensors: '%s' is truncated: header of %" PRIu64 " bytes but the file has %" PRId64
                " bytes after the length", path, n, (int64_t)st.st_size - 8);
        goto done;
    }
    buf = malloc((size_t)n + 1);
    if (!buf) {
        fl_fail(FL_ENOMEM, "safetensors: cannot allocate a header of %" PRIu64 " bytes for '%s'", n, path);
        goto done;
    }
    if (pread_all(fd, buf, (size_t)n, 8, path) < 0) {
        free(buf);
        buf = NULL;
        goto done;
    }
    buf[n] = 0;
    if (header_len) *header_len = (int64_t)n;
done:
    close(fd);
    return buf;
}

int fl_st_read_into(const char *path, int64_t offset, int32_t file_dtype, fl_tensor *t) {
    if (file_dtype < 0 || file_dtype >= FL_NDTYPES)
        return fl_fail(FL_EINVAL, "safetensors: read of '%s': unknown file dtype %d", path, file_dtype);
    if (offset < 0) return fl_fail(FL_EINVAL, "safetensors: read of '%s': negative offset %" PRId64, path, offset);
    if (!fl_tensor_is_contiguous(t))
        return fl_fail(FL_EINVAL, "safetensors: read of '%s' into a non-contiguous tensor %s", path, fl_shape_str(t));
    void *dst = fl_tensor_data(t);
    if (!dst)
        return fl_fail(FL_ESTATE, "safetensors: read of '%s' into tensor %s that has no data (meta or released)", path,
                       fl_shape_str(t));
    int64_t n = fl_tensor_numel(t);
    size_t fsz = fl_dtype_size(file_dtype), tsz = fl_dtype_size(t->dtype);
    int64_t nbytes = n * (int64_t)fsz;
    int rc = FL_OK;
    uint8_t *bounce = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fl_fail(FL_EIO, "safetensors: cannot open '%s': %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) < 0) {
        rc = fl_fail(FL_EIO, "safetensors: cannot stat '%s': %s", path, strerror(errno));
        goto done;
    }
    if (offset + nbytes > (int64_t)st.st_size) {
        rc = fl_fail(FL_EIO, "safetensors: '%s' is truncated: tensor %s (%s) needs bytes [%" PRId64 ", %" PRId64
                     ") but the file has %" PRId64, path, fl_shape_str(t), fl_dtype_name(file_dtype), offset,
                     offset + nbytes, (int64_t)st.st_size);
        goto done;
    }
    if (file_dtype == t->dtype) {
        rc = pread_all(fd, dst, (size_t)nbytes, offset, path);
        goto done;
    }
    int64_t per = ST_CHUNK / (int64_t)fsz;
    if (per > n) per = n;
    bounce = malloc((size_t)(per > 0 ? per : 1) * fsz);
    if (!bounce) {
        rc = fl_fail(FL_ENOMEM, "safetensors: cannot allocate a %" PRId64 "-byte read buffer", per * (int64_t)fsz);
        goto done;
    }
    for (int64_t i = 0; i < n; i += per) {
        int64_t m = fl_min64(per, n - i);
        if ((rc = pread_all(fd, bounce, (size_t)m * fsz, offset + i * (int64_t)fsz, path)) < 0) goto done;
        fl_convert(bounce, file_dtype, (uint8_t *)dst + (size_t)i * tsz, t->dtype, m);
    }
done:
    free(bounce);
    close(fd);
    return rc;
}

static int write_tensor(const char *path, int64_t offset, int32_t file_dtype, const fl_tensor *t, uint32_t *crc) {
    if (file_dtype < 0 || file_dtype >= FL_NDTYPES)
        return fl_fail(FL_EINVAL, "safetensors: write to '%s': unknown file dtype %d", path, file_dtype);
    if (offset < 0) return fl_fail(FL_EINVAL, "safetensors: write to '%s': negative offset %" PRId64, path, offset);
    const void *src = fl_tensor_data(t);
    if (!src)
        return fl_fail(FL_ESTATE, "safetensors: write to '%s' of tensor %s that has no data (meta or released)", path,
                       fl_shape_str(t));
    int64_t n = fl_tensor_numel(t);
    size_t fsz = fl_dtype_size(file_dtype), tsz = fl_dtype_size(t->dtype);
    int rc = FL_OK;
    uint8_t *packed = NULL, *bounce = NULL;
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return fl_fail(FL_EIO, "safetensors: cannot open '%s' for writing: %s", path, strerror(errno));
    if (!fl_tensor_is_contiguous(t)) {
        packed = malloc((size_t)(n > 0 ? n : 1) * tsz);
        if (!packed) {
            rc = fl_fail(FL_ENOMEM, "safetensors: cannot allocate %" PRId64 " bytes to pack tensor %s", n * (int64_t)tsz,
                         fl_shape_str(t));
            goto done;
        }
        fl_copy_strided(t, packed);
        src = packed;
    }
    if (file_dtype == t->dtype) {
        rc = pwrite_all(fd, src, (size_t)n * fsz, offset, path, crc);
        goto done;
    }
    int64_t per = ST_CHUNK / (int64_t)fsz;
    if (per > n) per = n;
    bounce = malloc((size_t)(per > 0 ? per : 1) * fsz);
    if (!bounce) {
        rc = fl_fail(FL_ENOMEM, "safetensors: cannot allocate a %" PRId64 "-byte write buffer", per * (int64_t)fsz);
        goto done;
    }
    for (int64_t i = 0; i < n; i += per) {
        int64_t m = fl_min64(per, n - i);
        fl_convert((const uint8_t *)src + (size_t)i * tsz, t->dtype, bounce, file_dtype, m);
        if ((rc = pwrite_all(fd, bounce, (size_t)m * fsz, offset + i * (int64_t)fsz, path, crc)) < 0) goto done;
    }
done:
    free(packed);
    free(bounce);
    if (close(fd) < 0 && rc == FL_OK)
        rc = fl_fail(FL_EIO, "safetensors: closing '%s' after writing failed: %s", path, strerror(errno));
    return rc;
}

int fl_st_write_at(const char *path, int64_t offset, int32_t file_dtype, const fl_tensor *t) {
    return write_tensor(path, offset, file_dtype, t, NULL);
}

int fl_st_write_at_crc32c(const char *path, int64_t offset, int32_t file_dtype, const fl_tensor *t, uint32_t *crc) {
    if (!crc) return fl_fail(FL_EINVAL, "safetensors: write to '%s': no checksum to extend", path);
    return write_tensor(path, offset, file_dtype, t, crc);
}

int fl_file_write_at(const char *path, int64_t offset, const void *data, int64_t nbytes) {
    if (offset < 0 || nbytes < 0)
        return fl_fail(FL_EINVAL, "file: write to '%s' with offset %" PRId64 " and size %" PRId64, path, offset, nbytes);
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return fl_fail(FL_EIO, "file: cannot open '%s' for writing: %s", path, strerror(errno));
    int rc = pwrite_all(fd, data, (size_t)nbytes, offset, path, NULL);
    if (close(fd) < 0 && rc == FL_OK)
        rc = fl_fail(FL_EIO, "file: closing '%s' after writing failed: %s", path, strerror(errno));
    return rc;
}

