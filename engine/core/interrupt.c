/* engine/core/interrupt.c: the interrupt request (Ctrl-C in the REPL) and the one thread it stops. The signal
 * handler is engine/cli/main.c's; the checks are between autograd nodes (core/autograd.c), in the waits for
 * collectives (dist/comm_queue.c) and at every op's entry in Lua (lua/fsdp/tensor.lua). */
#include "internal.h"

#include <pthread.h>
#include <stdatomic.h>

static atomic_int requested = 0;   /* lock-free, so setting it is async-signal-safe */
static atomic_bool armed = false;
static pthread_t owner;            /* written before armed is set, by the thread that arms */

void fl_interrupt_arm(bool on) {
    if (on) owner = pthread_self();
    atomic_store(&armed, on);
}

void fl_interrupt_request(void) { atomic_store(&requested, 1); }

/* Only the armed thread takes it: an OpenMP worker or the communication thread entering a check must not
 * swallow the request meant for the statement the user is running. */
bool fl_interrupt_take(void) {
    if (!atomic_load(&requested) || !atomic_load(&armed) || !pthread_equal(pthread_self(), owner)) return false;
    return atomic_exchange(&requested, 0) != 0;
}

void fl_interrupt_clear(void) { atomic_store(&requested, 0); }
