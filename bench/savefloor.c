/* The save floor: the same guest bytes written to a file by the plainest fast C writer,
 * with the writeback pattern xend-lite's snapshot writer uses.
 *
 *   savefloor SRC DST [CHUNK_BYTES [WRITEBACK_STEP_BYTES]]
 *
 * SRC is the guest's RAM (a memfd, opened through /proc/PID/fd/N). Its data extents are
 * found with SEEK_DATA/SEEK_HOLE (holes are never read), read chunk by chunk, and every
 * 4 KiB page that is not all zero is written at its own offset of a temporary file beside
 * DST, so DST is as sparse as a snapshot's memory. Every WRITEBACK_STEP bytes the kernel is
 * asked to start writing back (sync_file_range SYNC_FILE_RANGE_WRITE); at the end the file
 * is fsynced, renamed over DST and the directory fsynced. No checksums, no header: what is
 * left is the I/O a save cannot avoid.
 *
 * Prints "<nanoseconds> <bytes written>" on stdout, timed from the open of DST's temporary
 * file to the directory fsync.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int zero_page(const unsigned char *p)
{
    static const unsigned char zeros[PAGE];
    return memcmp(p, zeros, PAGE) == 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: savefloor SRC DST [CHUNK [WRITEBACK_STEP]]\n");
        return 2;
    }
    size_t chunk = argc > 3 ? strtoull(argv[3], NULL, 0) : (size_t)1 << 20;
    off_t step = argc > 4 ? strtoll(argv[4], NULL, 0) : (off_t)8 << 20;
    if (chunk < PAGE || chunk % PAGE)
        chunk = (size_t)1 << 20;
    int src = open(argv[1], O_RDONLY | O_CLOEXEC);
    if (src < 0)
        die("open SRC");
    off_t size = lseek(src, 0, SEEK_END);
    unsigned char *buf = aligned_alloc(PAGE, chunk);
    if (!buf)
        die("aligned_alloc");

    char tmp[4096], dirbuf[4096];
    snprintf(tmp, sizeof tmp, "%s.floor.tmp", argv[2]);
    snprintf(dirbuf, sizeof dirbuf, "%s", argv[2]);
    const char *dir = dirname(dirbuf);

    long long t0 = now_ns();
    int dst = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (dst < 0)
        die("open DST");
    if (ftruncate(dst, size) < 0)
        die("ftruncate");
    long long written = 0;
    off_t wb_from = 0, wb_to = 0;
    off_t pos = 0;
    for (;;) {
        off_t data = lseek(src, pos, SEEK_DATA);
        if (data < 0) {
            if (errno == ENXIO)
                break;
            die("SEEK_DATA");
        }
        off_t hole = lseek(src, data, SEEK_HOLE);
        if (hole < 0)
            die("SEEK_HOLE");
        for (off_t at = data; at < hole;) {
            size_t n = (size_t)(hole - at) < chunk ? (size_t)(hole - at) : chunk;
            ssize_t got = pread(src, buf, n, at);
            if (got <= 0)
                die("pread");
            for (ssize_t p = 0; p < got; p += PAGE) {
                /* runs of non-zero pages go out in one write */
                if (zero_page(buf + p))
                    continue;
                ssize_t q = p + PAGE;
                while (q < got && !zero_page(buf + q))
                    q += PAGE;
                if (pwrite(dst, buf + p, q - p, at + p) != q - p)
                    die("pwrite");
                written += q - p;
                if (at + q > wb_to)
                    wb_to = at + q;
                p = q;
            }
            at += got;
            if (wb_to - wb_from >= step) {
                sync_file_range(dst, wb_from, wb_to - wb_from, SYNC_FILE_RANGE_WRITE);
                wb_from = wb_to;
            }
        }
        pos = hole;
    }
    if (fsync(dst) < 0)
        die("fsync");
    close(dst);
    if (rename(tmp, argv[2]) < 0)
        die("rename");
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0 || fsync(dfd) < 0)
        die("fsync dir");
    close(dfd);
    long long t1 = now_ns();
    printf("%lld %lld\n", t1 - t0, written);
    return 0;
}
