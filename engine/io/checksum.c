/* engine/io/checksum.c: CRC32C (Castagnoli), the per-file checksum of training checkpoints — computed by the writers
 * over the bytes they write (safetensors.c, async_write.c) and over a whole file when a checkpoint is verified.
 * Which files are checked, and what a mismatch means, are left to lua/fsdp/checkpoint/train.lua and inspect.lua. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

/* Reflected CRC32C polynomial (iSCSI, ext4, SSE4.2's crc32 instruction). */
enum { CRC32C_POLY = 0x82F63B78u };
/* Bytes one read of a verification pass takes. */
enum { VERIFY_CHUNK = 8 * 1024 * 1024 };

/* Slice-by-8 tables: table[k][b] is the CRC of byte b followed by k zero bytes, so eight bytes fold in one step. */
static uint32_t table[8][256];
static pthread_once_t table_once = PTHREAD_ONCE_INIT;
static bool have_sse42;

static void table_init(void) {
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = b;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (CRC32C_POLY & (0u - (c & 1u)));
        table[0][b] = c;
    }
    for (uint32_t b = 0; b < 256; b++)
        for (int k = 1; k < 8; k++) table[k][b] = (table[k - 1][b] >> 8) ^ table[0][table[k - 1][b] & 0xFF];
#if defined(__x86_64__)
    have_sse42 = __builtin_cpu_supports("sse4.2");
#endif
}

static uint32_t crc_table(uint32_t c, const uint8_t *p, size_t n) {
    for (; n && ((uintptr_t)p & 7); n--) c = (c >> 8) ^ table[0][(c ^ *p++) & 0xFF];
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= c;   /* little-endian: the CRC folds into the first four bytes */
        c = table[7][w & 0xFF] ^ table[6][(w >> 8) & 0xFF] ^ table[5][(w >> 16) & 0xFF] ^ table[4][(w >> 24) & 0xFF] ^
            table[3][(w >> 32) & 0xFF] ^ table[2][(w >> 40) & 0xFF] ^ table[1][(w >> 48) & 0xFF] ^ table[0][w >> 56];
    }
    for (; n; n--) c = (c >> 8) ^ table[0][(c ^ *p++) & 0xFF];
    return c;
}

#if defined(__x86_64__)
/* The crc32 instruction: chosen at run time, so a build for an older CPU still runs (on the table). */
__attribute__((target("sse4.2"))) static uint32_t crc_sse42(uint32_t c, const uint8_t *p, size_t n) {
    for (; n && ((uintptr_t)p & 7); n--) c = _mm_crc32_u8(c, *p++);
    uint64_t c64 = c;
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c64 = _mm_crc32_u64(c64, w);
    }
    c = (uint32_t)c64;
    for (; n; n--) c = _mm_crc32_u8(c, *p++);
    return c;
}
#endif

uint32_t fl_crc32c(uint32_t crc, const void *data, int64_t n) {
    pthread_once(&table_once, table_init);
    if (n <= 0) return crc;
    uint32_t c = ~crc;
#if defined(__x86_64__)
    if (have_sse42) return ~crc_sse42(c, data, (size_t)n);
#endif
    return ~crc_table(c, data, (size_t)n);
}

int fl_file_crc32c(const char *path, uint32_t *crc, int64_t *size) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fl_fail(FL_EIO, "cannot open '%s' to verify it: %s", path, strerror(errno));
    uint8_t *buf = malloc(VERIFY_CHUNK);
    if (!buf) {
        close(fd);
        return fl_fail(FL_ENOMEM, "cannot allocate a %d-byte buffer to verify '%s'", VERIFY_CHUNK, path);
    }
    int rc = FL_OK;
    uint32_t c = 0;
    int64_t total = 0;
    for (;;) {
        ssize_t r = read(fd, buf, VERIFY_CHUNK);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            rc = fl_fail(FL_EIO, "cannot read '%s' at offset %" PRId64 " to verify it: %s", path, total, strerror(errno));
            break;
        }
        if (r == 0) break;
        c = fl_crc32c(c, buf, r);
        total += r;
    }
    free(buf);
    close(fd);
    if (rc == FL_OK) {
        if (crc) *crc = c;
        if (size) *size = total;
    }
    return rc;
}
