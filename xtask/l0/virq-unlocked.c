/*
 * Preloaded into the rig's L0 emulator (QEMU TCG), never into tern.
 *
 * QEMU's x86 TCG raises the SVM virtual interrupt line (CPU_INTERRUPT_VIRQ) from its CR8 write
 * helper without holding the global lock, and tcg_handle_interrupt asserts that the lock is
 * held. L1's KVM sets V_IRQ whenever it waits for an interrupt window of L2; OVMF writes CR8 on
 * the way out of every interrupt handler; in an L2 as slow as the rig's the next timer
 * interrupt is often pending by then, and the emulator aborts with
 * "tcg_handle_interrupt: assertion failed: (bql_locked())" (QEMU 7.2 and 10.0).
 *
 * This library replaces glib's g_assertion_message_expr, which the emulator calls through its
 * PLT, and lets exactly that one assertion pass: the helper then does what it would do with the
 * lock held (it sets the request bit on its own vCPU and kicks the TCG loop). Every other
 * failed assertion goes to glib as before and aborts. What remains is a narrow race on the
 * request word between this vCPU thread and a thread raising another interrupt under the lock
 * (see shared/design/TESTING.md).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

typedef void (*assertion_fn)(const char *domain, const char *file, int line,
                             const char *func, const char *expr);

static int is_unlocked_virq(const char *func, const char *expr)
{
    if (!func || !expr || strcmp(func, "tcg_handle_interrupt") != 0)
        return 0;
    return strcmp(expr, "bql_locked()") == 0 ||
           strcmp(expr, "qemu_mutex_iothread_locked()") == 0;
}

void g_assertion_message_expr(const char *domain, const char *file, int line,
                              const char *func, const char *expr)
{
    if (is_unlocked_virq(func, expr))
        return;
    assertion_fn next = (assertion_fn)dlsym(RTLD_NEXT, "g_assertion_message_expr");
    if (next)
        next(domain, file, line, func, expr);
    abort();
}
