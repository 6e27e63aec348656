/*
 * Serial console on COM1 (0x3F8), output only.
 *
 * Every line is formatted into a buffer first and then written out.  The
 * line status register is never polled: the VMMs this guest runs under
 * accept data as fast as it is written.
 *
 * Line buffers are 256-byte aligned and 256 bytes long, so a line never
 * straddles a page boundary.
 */
#include "guest.h"

#define COM1_DATA       0x3F8
#define LINE_MAX        256
#define WARN_MAX        16

static char line_buf[LINE_MAX] __attribute__((aligned(LINE_MAX)));
static char panic_buf[LINE_MAX] __attribute__((aligned(LINE_MAX)));

/* Warnings collected before the banner is printed. */
static char warn_buf[WARN_MAX][LINE_MAX / 2];
static int warn_count;
static int warn_dropped;

void con_write(const char *buf, size_t len)
{
    /*
     * One OUT per byte, not "rep outsb": under KVM both cost one exit per
     * byte, but a string OUT that is interrupted by a pause is completed
     * by KVM's emulator in a way a saved vCPU state does not capture, so a
     * migrated guest would print that byte twice.  A plain OUT completes
     * before the vCPU parks.
     */
    for (size_t i = 0; i < len; i++)
        __asm__ volatile("outb %0, %1" : : "a"(buf[i]), "Nd"((uint16_t)COM1_DATA));
}

/* Format one line into buf, force a trailing newline, and emit it. */
static void emit_line(char *buf, size_t cap, const char *fmt, va_list ap)
{
    int n = kvsnprintf(buf, cap, fmt, ap);
    size_t len = (size_t)n < cap - 1 ? (size_t)n : cap - 1;

    if (len == 0 || buf[len - 1] != '\n') {
        if (len == cap - 1)
            len--;
        buf[len++] = '\n';
    }
    con_write(buf, len);
}

/* Lines from several CPUs (smp.c) come out whole, one at a time. */
static volatile int line_lock;

/* Print one line ("\n" is appended if the format does not end in one). */
void kprintf(const char *fmt, ...)
{
    va_list ap;

    while (__atomic_exchange_n(&line_lock, 1, __ATOMIC_ACQUIRE))
        cpu_relax();
    va_start(ap, fmt);
    emit_line(line_buf, sizeof(line_buf), fmt, ap);
    va_end(ap);
    __atomic_store_n(&line_lock, 0, __ATOMIC_RELEASE);
}

/*
 * Queue a warning line to be printed after the banner (so the banner is
 * always the first line of output).
 */
void warn_defer(const char *fmt, ...)
{
    va_list ap;

    if (warn_count == WARN_MAX) {
        warn_dropped++;
        return;
    }
    va_start(ap, fmt);
    kvsnprintf(warn_buf[warn_count++], sizeof(warn_buf[0]), fmt, ap);
    va_end(ap);
}

void warn_flush(void)
{
    for (int i = 0; i < warn_count; i++)
        kprintf("%s\n", warn_buf[i]);
    if (warn_dropped)
        kprintf("WARN %d more warnings dropped\n", warn_dropped);
    warn_count = warn_dropped = 0;
}

/* Print a fatal message (its own buffer: may run from a fault) and stop. */
void panic(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    emit_line(panic_buf, sizeof(panic_buf), fmt, ap);
    va_end(ap);
    halt_forever();
}
