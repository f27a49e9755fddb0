"""cffi API-mode builder for the snapshot writer's and reader's helpers: the guest memory
chunk checksum and starting writeback of a file range.

Built at install time into ``xend_lite.snapshot._snapshot``; ``xend_lite.snapshot.checksum`` is the only reader.

The chunk checksum (snapshot format 2) is CRC-32C (Castagnoli, as in iSCSI and ext4) taken
over four lanes of the chunk at once, so the CPU's CRC instruction is kept busy on four
independent streams instead of waiting on one: the chunk of n bytes is cut into four
contiguous lanes, the first three of L = (n / 4) rounded down to a multiple of 8 bytes, the
last one the rest; each lane gets its own CRC-32C, and the checksum is the CRC-32C of the
four lane CRCs written as little-endian u32s, in lane order. With SSE4.2 the lanes run on the
``crc32`` instruction; elsewhere a table-driven CRC-32C gives the same values.
"""

from cffi import FFI

CDEF = """
uint32_t xl_chunk_sum(const uint8_t *p, size_t n);
uint32_t xl_crc32c(uint32_t crc, const uint8_t *p, size_t n);
uint32_t xl_crc32c_zeros(uint32_t crc, uint64_t n);
int xl_hw_crc(void);
int xl_set_hw(int on);
int xl_writeback(int fd, int64_t offset, int64_t nbytes);
"""

SOURCE = r"""
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>

#define POLY 0x82F63B78u   /* CRC-32C, reflected */

static uint32_t table[8][256];
static int have_hw, hw_present;

__attribute__((constructor))
static void setup(void)
{
#if defined(__x86_64__)
    __builtin_cpu_init();
    hw_present = have_hw = __builtin_cpu_supports("sse4.2") != 0;
#endif
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (POLY & (0u - (c & 1u)));
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xff];
}

static inline uint64_t load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* Running CRC-32C state (no pre- or post-inversion), eight bytes a step. */
static uint32_t sw_update(uint32_t c, const uint8_t *p, size_t n)
{
    while (n >= 8) {
        uint64_t v = load64(p) ^ c;
        c = table[7][v & 0xff] ^ table[6][(v >> 8) & 0xff] ^ table[5][(v >> 16) & 0xff]
          ^ table[4][(v >> 24) & 0xff] ^ table[3][(v >> 32) & 0xff]
          ^ table[2][(v >> 40) & 0xff] ^ table[1][(v >> 48) & 0xff] ^ table[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        c = (c >> 8) ^ table[0][(c ^ *p++) & 0xff];
    return c;
}

static void sw_lanes(const uint8_t *p, size_t lane, size_t n, uint32_t out[4])
{
    for (int k = 0; k < 4; k++) {
        size_t len = k < 3 ? lane : n - 3 * lane;
        out[k] = ~sw_update(~0u, p + k * lane, len);
    }
}

#if defined(__x86_64__)
#include <nmmintrin.h>

__attribute__((target("sse4.2")))
static uint32_t hw_update(uint32_t c, const uint8_t *p, size_t n)
{
    uint64_t c64 = c;
    while (n >= 8) {
        c64 = _mm_crc32_u64(c64, load64(p));
        p += 8;
        n -= 8;
    }
    c = (uint32_t)c64;
    while (n--)
        c = _mm_crc32_u8(c, *p++);
    return c;
}

__attribute__((target("sse4.2")))
static void hw_lanes(const uint8_t *p, size_t lane, size_t n, uint32_t out[4])
{
    const uint8_t *p0 = p, *p1 = p + lane, *p2 = p + 2 * lane, *p3 = p + 3 * lane;
    uint64_t c0 = 0xffffffffu, c1 = 0xffffffffu, c2 = 0xffffffffu, c3 = 0xffffffffu;
    for (size_t i = 0; i < lane; i += 8) {
        c0 = _mm_crc32_u64(c0, load64(p0 + i));
        c1 = _mm_crc32_u64(c1, load64(p1 + i));
        c2 = _mm_crc32_u64(c2, load64(p2 + i));
        c3 = _mm_crc32_u64(c3, load64(p3 + i));
    }
    out[0] = ~(uint32_t)c0;
    out[1] = ~(uint32_t)c1;
    out[2] = ~(uint32_t)c2;
    out[3] = ~hw_update((uint32_t)c3, p3 + lane, n - 4 * lane);
}

#endif

int xl_hw_crc(void)
{
    return have_hw;
}

/* Tests only: take the table-driven path (on = 0) or the CPU's, where it has one. */
int xl_set_hw(int on)
{
    int was = have_hw;
    have_hw = on && hw_present;
    return was;
}

static uint32_t update(uint32_t c, const uint8_t *p, size_t n)
{
#if defined(__x86_64__)
    if (have_hw)
        return hw_update(c, p, n);
#endif
    return sw_update(c, p, n);
}

uint32_t xl_crc32c(uint32_t crc, const uint8_t *p, size_t n)
{
    return ~update(~crc, p, n);
}

/* Polynomials over GF(2) modulo the CRC-32C polynomial P, in the bit order the reflected
   CRC register uses: bit 31 holds the coefficient of x^0, bit 0 that of x^31. One step of
   the register with a zero input bit multiplies its polynomial by x (mod P), so running it
   over n zero bytes multiplies it by x^(8n) mod P. */
static uint32_t gf_mul(uint32_t a, uint32_t b)
{
    uint32_t r = 0;
    for (int i = 0; i < 32; i++) {
        if (a & (0x80000000u >> i))
            r ^= b;
        b = (b >> 1) ^ (POLY & (0u - (b & 1u)));     /* b = b * x mod P */
    }
    return r;
}

static uint32_t xpow8[64];       /* x^(8 * 2^k) mod P */

__attribute__((constructor))
static void setup_zeros(void)
{
    xpow8[0] = 0x80000000u >> 8;                       /* x^8 */
    for (int k = 1; k < 64; k++)
        xpow8[k] = gf_mul(xpow8[k - 1], xpow8[k - 1]);
}

/* CRC-32C continued from crc over n zero bytes, without touching n bytes. */
uint32_t xl_crc32c_zeros(uint32_t crc, uint64_t n)
{
    uint32_t m = 0x80000000u;                          /* x^0 */
    for (int k = 0; n; k++, n >>= 1)
        if (n & 1)
            m = gf_mul(m, xpow8[k]);
    return ~gf_mul(m, ~crc);
}

uint32_t xl_chunk_sum(const uint8_t *p, size_t n)
{
    size_t lane = (n / 4) & ~(size_t)7;
    uint32_t c[4];
    uint8_t le[16];
#if defined(__x86_64__)
    if (have_hw)
        hw_lanes(p, lane, n, c);
    else
#endif
        sw_lanes(p, lane, n, c);
    for (int k = 0; k < 4; k++)
        for (int b = 0; b < 4; b++)
            le[4 * k + b] = (uint8_t)(c[k] >> (8 * b));
    return xl_crc32c(0, le, sizeof le);
}

int xl_writeback(int fd, int64_t offset, int64_t nbytes)
{
    return sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE) == 0 ? 0 : -errno;
}
"""

ffi = FFI()
ffi.cdef(CDEF)
ffi.set_source("xend_lite.snapshot._snapshot", SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffi.compile(verbose=True)
