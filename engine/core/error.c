/* engine/core/error.c: the thread-local error message, the only writer of it.
 * Every failing entry point returns a negative code or NULL after calling fl_fail; Lua reads fl_last_error. */
#include "internal.h"

#include <stdio.h>

static _Thread_local char fl_err[1024];
static _Thread_local int fl_err_code = FL_OK;   /* the code of the last failure: what a NULL return meant */

int fl_fail(int code, const char *fmt, ...) {
    fl_err_code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(fl_err, sizeof fl_err, fmt, ap);
    va_end(ap);
    return code;
}

void *fl_fail_null(int code, const char *fmt, ...) {
    fl_err_code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(fl_err, sizeof fl_err, fmt, ap);
    va_end(ap);
    return NULL;
}

void fl_error_prefix(const char *what) {
    char tmp[sizeof fl_err + 256];
    snprintf(tmp, sizeof tmp, "%s: %s", what, fl_err);
    memcpy(fl_err, tmp, sizeof fl_err - 1);
    fl_err[sizeof fl_err - 1] = 0;
}

const char *fl_last_error(void) { return fl_err; }

int fl_last_status(void) { return fl_err_code < 0 ? fl_err_code : FL_EINVAL; }

const char *fl_version(void) { return "0.1.0"; }
