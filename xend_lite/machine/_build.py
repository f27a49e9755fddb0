"""cffi API-mode builder for the machine layer's native helpers: on host memory, laying a
file's page over a mapping in place, finding the pages of a private mapping that hold their
own copy, and punching holes in a memfd; for guest images, decoding LZ4 legacy frames (the
compression of Debian's kernels).

Built at install time (setup.py ``cffi_modules``) into ``xend_lite.machine._machine``;
``xend_lite.machine.native`` is the only reader.
"""

from cffi import FFI

CDEF = r"""
int xl_map_shared_fixed(uintptr_t addr, size_t length, int fd, int64_t offset);
int64_t xl_written_runs(uintptr_t addr, uint64_t pages, uint64_t *runs, uint64_t max_runs);
int xl_punch_hole(int fd, int64_t offset, int64_t length);
int xl_mmap_threshold(int bytes);
int64_t xl_lz4_legacy(const uint8_t *in, size_t n, uint8_t *out, size_t cap, uint64_t *trailer,
                      uint64_t *err_at);
"""

SOURCE = r"""
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <malloc.h>
#include <sys/mman.h>
#include <unistd.h>

/* Replace host pages in place with a shared mapping of fd at offset (MAP_FIXED): KVM's
 * MMU notifier makes the guest see the new pages on its next access, with no slot change. */
static int xl_map_shared_fixed(uintptr_t addr, size_t length, int fd, int64_t offset) {
    void *p = mmap((void *)addr, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd,
                   (off_t)offset);
    return p == MAP_FAILED ? -errno : 0;
}

/* Pages of a private file mapping that now hold their own copy (written since mapped, by
 * the guest through KVM or by the host), from /proc/self/pagemap: present or swapped, and
 * not a file page. Fills runs with (first page, count) pairs; returns the number of runs,
 * or -errno. A run list that would overflow max_runs returns -E2BIG. */
static int64_t xl_written_runs(uintptr_t addr, uint64_t pages, uint64_t *runs, uint64_t max_runs) {
    enum { CHUNK = 4096 };
    uint64_t buf[CHUNK];
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int64_t n = 0;
    int in_run = 0;
    for (uint64_t done = 0; done < pages;) {
        uint64_t want = pages - done < CHUNK ? pages - done : CHUNK;
        ssize_t got = pread(fd, buf, want * 8, (off_t)((addr / 4096 + done) * 8));
        if (got <= 0) {
            int err = got < 0 ? errno : EIO;
            close(fd);
            return -err;
        }
        uint64_t k = (uint64_t)got / 8;
        for (uint64_t i = 0; i < k; i++) {
            uint64_t e = buf[i];
            int own = (e & (3ULL << 62)) && !(e & (1ULL << 61));
            if (own && !in_run) {
                if ((uint64_t)n >= max_runs) {
                    close(fd);
                    return -E2BIG;
                }
                runs[2 * n] = done + i;
                runs[2 * n + 1] = 0;
                n++;
                in_run = 1;
            } else if (!own) {
                in_run = 0;
            }
            if (own)
                runs[2 * n - 1]++;
        }
        done += k;
    }
    close(fd);
    return n;
}

/* glibc's threshold above which an allocation gets a mapping of its own (mallopt). */
static int xl_mmap_threshold(int bytes) {
    return mallopt(M_MMAP_THRESHOLD, bytes);
}

/* Release the pages of [offset, offset + length) of fd (they read back as zeros). */
static int xl_punch_hole(int fd, int64_t offset, int64_t length) {
    return fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, length) == 0 ? 0 : -errno;
}

/* LZ4 legacy frames, as `lz4 -l` writes them and Linux's build compresses its kernel: the
 * magic 0x184C2102 (little-endian), then blocks, each a little-endian u32 compressed size and
 * an LZ4 block that decodes on its own to at most 8 MiB. Another magic may start a new frame.
 * Linux appends the total decoded size as one more u32: four bytes left after a block are
 * that trailer (*trailer gets it, bit 32 set to say it was there).
 *
 * An LZ4 block is a run of sequences: a token (high nibble: literal count, low nibble: match
 * length - 4; 15 means more length bytes follow, each added, until one is not 255), the
 * literals, then a little-endian u16 distance back into what this block has decoded and the
 * match, copied byte by byte (it may overlap itself). The last sequence has literals only.
 *
 * The input is hostile: every read is checked against the block's end, every length against
 * the room left, every distance against what was decoded; the output never passes cap.
 * Returns the decoded length or an XL_LZ4_E* code; *err_at gets the input offset of an error. */
#define XL_LZ4_MAGIC 0x184C2102u
#define XL_LZ4_BLOCK_MAX ((size_t)8 << 20)
#define XL_LZ4_CBLOCK_MAX (XL_LZ4_BLOCK_MAX + XL_LZ4_BLOCK_MAX / 255 + 16)
enum {
    XL_LZ4_EMAGIC = -1,    /* no legacy-frame magic */
    XL_LZ4_ETRUNC = -2,    /* the input ends inside a block or its size */
    XL_LZ4_ECORRUPT = -3,  /* a bad distance, length or block size */
    XL_LZ4_EBIG = -4,      /* the output would pass cap */
    XL_LZ4_EBLOCK = -5,    /* a block decodes to more than 8 MiB */
    XL_LZ4_EEMPTY = -6,    /* a frame with no block */
};

static uint32_t xl_le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Adds LZ4's extended length bytes to *len; returns 0, or an error at in[*ip]. */
static int xl_lz4_length(const uint8_t *in, size_t n, size_t *ip, size_t *len, size_t limit) {
    uint8_t b;
    do {
        if (*ip >= n)
            return XL_LZ4_ETRUNC;
        b = in[(*ip)++];
        *len += b;
        if (*len > limit)   /* longer than anything that can still fit: stop reading early */
            return XL_LZ4_EBIG;
    } while (b == 255);
    return 0;
}

/* One block of n bytes into out (room cap); returns the decoded length or an error. */
static int64_t xl_lz4_block(const uint8_t *in, size_t n, uint8_t *out, size_t cap, size_t *ip) {
    size_t op = 0;
    *ip = 0;
    for (;;) {
        if (*ip >= n)
            return XL_LZ4_ETRUNC;
        uint8_t token = in[(*ip)++];
        size_t lit = token >> 4;
        if (lit == 15) {
            int e = xl_lz4_length(in, n, ip, &lit, n);
            if (e)
                return e == XL_LZ4_EBIG ? XL_LZ4_ECORRUPT : e;   /* more literals than input */
        }
        if (lit > n - *ip)
            return XL_LZ4_ECORRUPT;
        if (lit > cap - op)
            return XL_LZ4_EBIG;
        memcpy(out + op, in + *ip, lit);
        *ip += lit;
        op += lit;
        if (*ip == n)
            return (int64_t)op;
        if (n - *ip < 2)
            return XL_LZ4_ETRUNC;
        size_t dist = (size_t)in[*ip] | (size_t)in[*ip + 1] << 8;
        if (dist == 0 || dist > op)
            return XL_LZ4_ECORRUPT;
        *ip += 2;
        size_t mlen = token & 15;
        if (mlen == 15) {
            int e = xl_lz4_length(in, n, ip, &mlen, cap);
            if (e)
                return e;
        }
        mlen += 4;
        if (mlen > cap - op)
            return XL_LZ4_EBIG;
        uint8_t *dst = out + op;
        const uint8_t *src = dst - dist;
        if (dist >= mlen) {
            memcpy(dst, src, mlen);
        } else {
            for (size_t i = 0; i < mlen; i++)
                dst[i] = src[i];
        }
        op += mlen;
    }
}

static int64_t xl_lz4_legacy(const uint8_t *in, size_t n, uint8_t *out, size_t cap,
                             uint64_t *trailer, uint64_t *err_at) {
    size_t ip = 4, op = 0, blocks = 0;
    *trailer = 0;
    *err_at = 0;
    if (n < 4 || xl_le32(in) != XL_LZ4_MAGIC)
        return XL_LZ4_EMAGIC;
    while (ip < n) {
        *err_at = ip;
        if (n - ip < 4)
            return XL_LZ4_ETRUNC;
        uint32_t csize = xl_le32(in + ip);
        if (csize == XL_LZ4_MAGIC) {
            ip += 4;
            continue;
        }
        if (n - ip == 4 && blocks) {
            *trailer = (uint64_t)csize | (1ULL << 32);
            break;
        }
        ip += 4;
        if (csize == 0 || csize > XL_LZ4_CBLOCK_MAX)
            return XL_LZ4_ECORRUPT;
        if (csize > n - ip)
            return XL_LZ4_ETRUNC;
        size_t room = cap - op < XL_LZ4_BLOCK_MAX ? cap - op : XL_LZ4_BLOCK_MAX;
        size_t bip;
        int64_t got = xl_lz4_block(in + ip, csize, out + op, room, &bip);
        if (got < 0) {
            *err_at = ip + bip;
            return got == XL_LZ4_EBIG && room == XL_LZ4_BLOCK_MAX ? XL_LZ4_EBLOCK : got;
        }
        op += (size_t)got;
        ip += csize;
        blocks++;
    }
    if (!blocks)
        return XL_LZ4_EEMPTY;
    return (int64_t)op;
}
"""

ffi = FFI()
ffi.cdef(CDEF)
ffi.set_source("xend_lite.machine._machine", SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffi.compile(verbose=True)
