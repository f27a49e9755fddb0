"""cffi API-mode builder for the machine layer's helpers on host memory: laying a file's page
over a mapping in place, finding the pages of a private mapping that hold their own copy, and
punching holes in a memfd.

Built at install time (setup.py ``cffi_modules``) into ``xend_lite.machine._machine``;
``xend_lite.machine.native`` is the only reader.
"""

from cffi import FFI

CDEF = r"""
int xl_map_shared_fixed(uintptr_t addr, size_t length, int fd, int64_t offset);
int64_t xl_written_runs(uintptr_t addr, uint64_t pages, uint64_t *runs, uint64_t max_runs);
int xl_punch_hole(int fd, int64_t offset, int64_t length);
"""

SOURCE = r"""
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
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

/* Release the pages of [offset, offset + length) of fd (they read back as zeros). */
static int xl_punch_hole(int fd, int64_t offset, int64_t length) {
    return fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, length) == 0 ? 0 : -errno;
}
"""

ffi = FFI()
ffi.cdef(CDEF)
ffi.set_source("xend_lite.machine._machine", SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffi.compile(verbose=True)
