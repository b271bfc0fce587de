/* engine/core/parallel.c: the thread count of our OpenMP loops. OpenBLAS must never thread (its split changes
 * results with the thread count): every BLAS call is made from inside an active OpenMP parallel region,
 * where the OpenMP build of OpenBLAS runs single-threaded (see ops_matmul.c). openblas_set_num_threads also
 * sets OpenMP's count, hence the order below. */
#include "internal.h"

#include <omp.h>
#include <unistd.h>

void openblas_set_num_threads(int num_threads);

static int32_t num_threads = 0;

void fl_set_num_threads(int32_t n) {
    if (n <= 0) n = (int32_t)sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1) n = 1;
    num_threads = n;
    openblas_set_num_threads(1);
    omp_set_num_threads(n);
}

__attribute__((constructor)) static void init_threads(void) {
    int32_t n = omp_get_max_threads();
    fl_set_num_threads(n);
}

int32_t fl_get_num_threads(void) {
    if (num_threads == 0) num_threads = omp_get_max_threads();
    return num_threads;
}
