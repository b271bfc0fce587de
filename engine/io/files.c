/* engine/io/files.c: the filesystem steps of publishing a checkpoint atomically — fsync of files and directories,
 * mkdir -p, the atomic exchange of two directories, removing a staging tree, and telling whether the process that
 * named a staging tree still runs. lua/fsdp/checkpoint/publish.lua puts them in order. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <ftw.h>
#include <signal.h>
#include <limits.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)
#endif

static int sync_path(const char *path, int flags, const char *what) {
    int fd = open(path, flags | O_CLOEXEC);
    if (fd < 0) return fl_fail(FL_EIO, "cannot open %s '%s' to sync it: %s", what, path, strerror(errno));
    int rc = fsync(fd) == 0 ? FL_OK : fl_fail(FL_EIO, "cannot sync %s '%s': %s", what, path, strerror(errno));
    close(fd);
    return rc;
}

int fl_file_sync(const char *path) { return sync_path(path, O_WRONLY, "file"); }
int fl_dir_sync(const char *path) { return sync_path(path, O_RDONLY | O_DIRECTORY, "directory"); }

int fl_is_dir(const char *path) {
    struct stat st;
    if (stat(path, &st) < 0) {
        if (errno == ENOENT) return 0;
        return fl_fail(FL_EIO, "cannot stat '%s': %s", path, strerror(errno));
    }
    if (!S_ISDIR(st.st_mode)) return fl_fail(FL_EINVAL, "'%s' exists and is not a directory", path);
    return 1;
}

int fl_mkdir_p(const char *path) {
    char buf[PATH_MAX];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf) return fl_fail(FL_EINVAL, "mkdir: bad path '%s'", path);
    memcpy(buf, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] != '/' && buf[i] != 0) continue;
        char c = buf[i];
        buf[i] = 0;
        if (mkdir(buf, 0755) < 0 && errno != EEXIST)
            return fl_fail(FL_EIO, "cannot create directory '%s': %s", buf, strerror(errno));
        buf[i] = c;
    }
    int d = fl_is_dir(path);
    return d == 1 ? FL_OK : d < 0 ? d : fl_fail(FL_EIO, "cannot create directory '%s'", path);
}

int fl_path_exchange(const char *a, const char *b) {
    if (syscall(SYS_renameat2, AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) == 0) return FL_OK;
    if (errno == EINVAL || errno == ENOSYS || errno == ENOTSUP)
        return fl_fail(FL_EINVAL, "the filesystem of '%s' cannot exchange paths atomically: %s", b, strerror(errno));
    return fl_fail(FL_EIO, "cannot exchange '%s' and '%s': %s", a, b, strerror(errno));
}

static int remove_entry(const char *path, const struct stat *st, int type, struct FTW *ftw) {
    (void)st, (void)ftw;
    int r = type == FTW_DP ? rmdir(path) : unlink(path);
    if (r < 0 && errno != ENOENT) {
        fl_fail(FL_EIO, "cannot remove '%s': %s", path, strerror(errno));
        return 1;   /* stops the walk; nftw returns it */
    }
    return 0;
}

int fl_remove_tree(const char *path) {
    struct stat st;
    if (lstat(path, &st) < 0) return errno == ENOENT ? FL_OK : fl_fail(FL_EIO, "cannot stat '%s': %s", path, strerror(errno));
    int r = nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    if (r == 1) return fl_last_status();
    if (r != 0) return fl_fail(FL_EIO, "cannot remove '%s': %s", path, strerror(errno));
    return FL_OK;
}

int fl_link(const char *from, const char *to) {
    if (link(from, to) == 0) return FL_OK;
    return fl_fail(FL_EIO, "cannot link '%s' to '%s': %s", from, to, strerror(errno));
}

char *fl_dir_list(const char *path) {
    DIR *d = opendir(path);
    if (!d) return fl_fail_null(FL_EIO, "cannot list directory '%s': %s", path, strerror(errno));
    size_t cap = 256, len = 0;
    char *out = malloc(cap);
    if (!out) {
        closedir(d);
        return fl_fail_null(FL_ENOMEM, "cannot list directory '%s': out of memory", path);
    }
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        size_t n = strlen(e->d_name);
        if (len + n + 3 > cap) {
            while (len + n + 3 > cap) cap *= 2;
            char *grown = realloc(out, cap);
            if (!grown) {
                free(out);
                closedir(d);
                return fl_fail_null(FL_ENOMEM, "cannot list directory '%s': out of memory", path);
            }
            out = grown;
        }
        memcpy(out + len, e->d_name, n);
        len += n;
        out[len++] = '\n';
    }
    out[len] = 0;
    closedir(d);
    return out;
}

int fl_process_alive(int64_t pid) {
    if (pid <= 0 || pid != (int64_t)(pid_t)pid) return fl_fail(FL_EINVAL, "process id %" PRId64 " is not one", pid);
    if (kill((pid_t)pid, 0) == 0) return 1;
    if (errno == ESRCH) return 0;
    if (errno == EPERM) return 1;   /* another user's process: alive, and not ours to judge */
    return fl_fail(FL_EIO, "cannot tell whether process %" PRId64 " runs: %s", pid, strerror(errno));
}
