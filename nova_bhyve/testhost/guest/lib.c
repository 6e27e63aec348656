/*
 * Minimal freestanding C library: memory/string helpers (which GCC may
 * emit calls to even with -ffreestanding) and a small snprintf.
 */
#include "guest.h"

void *memset(void *dst, int c, size_t n)
{
    void *ret = dst;

    if ((((uintptr_t)dst | n) & 7) == 0) {
        uint64_t v = (uint8_t)c * 0x0101010101010101ULL;

        n /= 8;
        __asm__ volatile("rep stosq" : "+D"(dst), "+c"(n) : "a"(v) : "memory");
    } else {
        __asm__ volatile("rep stosb" : "+D"(dst), "+c"(n) : "a"(c) : "memory");
    }
    return ret;
}

void *memcpy(void *dst, const void *src, size_t n)
{
    void *ret = dst;

    __asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
    return ret;
}

void *memmove(void *dst, const void *src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;

    if (d <= s || d >= s + n)
        return memcpy(dst, src, n);
    while (n--)
        d[n] = s[n];
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;

    for (; n; n--, x++, y++) {
        if (*x != *y)
            return *x - *y;
    }
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;

    while (s[n])
        n++;
    return n;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b)
            return (unsigned char)*a - (unsigned char)*b;
        if (!*a)
            break;
    }
    return 0;
}

/* ---- snprintf ----------------------------------------------------------- */

struct outbuf {
    char *buf;
    size_t size;    /* capacity including the terminating NUL */
    size_t len;     /* characters produced so far (may exceed size) */
};

static void out_char(struct outbuf *o, char c)
{
    if (o->len + 1 < o->size)
        o->buf[o->len] = c;
    o->len++;
}

static void out_str(struct outbuf *o, const char *s)
{
    if (!s)
        s = "(null)";
    while (*s)
        out_char(o, *s++);
}

static void out_num(struct outbuf *o, uint64_t v, unsigned base, int width,
                    char pad)
{
    static const char digits[] = "0123456789abcdef";
    char tmp[24];
    int n = 0;

    do {
        tmp[n++] = digits[v % base];
        v /= base;
    } while (v);
    for (; width > n; width--)
        out_char(o, pad);
    while (n)
        out_char(o, tmp[--n]);
}

/*
 * Supported conversions: %s %c %d %i %u %x and %%, with optional '0' flag,
 * field width and 'l'/'ll'/'z' length modifiers.  Output is always NUL
 * terminated; the return value is the untruncated length, like snprintf.
 */
int kvsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct outbuf o = { buf, size, 0 };

    for (; *fmt; fmt++) {
        char pad = ' ';
        int width = 0, lng = 0;

        if (*fmt != '%') {
            out_char(&o, *fmt);
            continue;
        }
        fmt++;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l' || *fmt == 'z') {
            lng = 1;
            fmt++;
        }

        switch (*fmt) {
        case 's':
            out_str(&o, va_arg(ap, const char *));
            break;
        case 'c':
            out_char(&o, (char)va_arg(ap, int));
            break;
        case 'd':
        case 'i': {
            int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);

            if (v < 0) {
                out_char(&o, '-');
                out_num(&o, -(uint64_t)v, 10, width, pad);
            } else {
                out_num(&o, (uint64_t)v, 10, width, pad);
            }
            break;
        }
        case 'u':
        case 'x': {
            uint64_t v = lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);

            out_num(&o, v, *fmt == 'x' ? 16 : 10, width, pad);
            break;
        }
        case '%':
            out_char(&o, '%');
            break;
        case '\0':
            fmt--;      /* stray '%' at the end of the format */
            break;
        default:
            out_char(&o, '%');
            out_char(&o, *fmt);
            break;
        }
    }
    if (size)
        buf[o.len < size ? o.len : size - 1] = '\0';
    return (int)o.len;
}

int ksnprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = kvsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}
