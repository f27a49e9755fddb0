/* overlayfloor: the floor of an in-place overlay change, with no Python.
 *
 * A KVM VM with guest RAM in a memfd mapped MAP_SHARED (one slot, an in-kernel irqchip, as
 * xend-lite's Machine sets it up) runs VCPUS vCPUs, each on its own thread, in a flat 32-bit
 * guest that never exits (bench/guests/spin.S, or the same five bytes built in). An owner
 * thread lays a one-page overlay (a page of a second memfd) over guest RAM exactly as
 * xend-lite's memory map does: mmap(MAP_SHARED | MAP_FIXED) of the overlay page over the RAM
 * page's host address; moving it maps the RAM page back where it was, then the overlay at
 * the new place; unmapping maps the RAM page back. No KVM slot changes, no vCPU pauses: KVM
 * follows through its MMU notifier.
 *
 * Each round does the three changes twice, in the order xend-lite's benchmark does: handed
 * to the owner thread one at a time from the main thread (request to done: mutex and
 * condition variable), then (with -p) pauses and resumes the vCPUs (each kicked out of
 * KVM_RUN by a signal, held until all are out, and with -P for HOLD_US more, as long as a
 * slower pause keeps them out, then let go), then runs the three back to back on the owner
 * (the change alone); then sleeps SLEEP_US. The guest addresses walk 64 pages at 8 MiB (map) and 64 MiB (move), as there.
 * Before the first round RAM pages get a marker; after the last the markers must be intact
 * and every vCPU must still be in its loop (its counter moved, no exit but our stop signal).
 *
 * Prints one line per round:
 *   "<map> <move> <unmap> <owner-map> <owner-move> <owner-unmap>" in nanoseconds.
 * Usage: overlayfloor [-n ROUNDS] [-w WARMUP] [-c VCPUS] [-i IMAGE] [-a LOAD_GPA]
 *                     [-M MEM_MIB] [-s SLEEP_US] [-p | -P HOLD_US]
 * Build: cc -O2 -o overlayfloor overlayfloor.c -lpthread */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define MAX_VCPUS 16
#define MAP_BASE 0x800000UL
#define MOVE_BASE 0x4000000UL
#define WALK 64

static const uint8_t spin[] = {0x31, 0xc0, 0x40, 0xeb, 0xfd}; /* xor eax,eax; 1: inc eax; jmp 1b */

static void fail(const char *what) {
    fprintf(stderr, "overlayfloor: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void xioctl(int fd, unsigned long req, void *arg, const char *name) {
    if (ioctl(fd, req, arg) < 0)
        fail(name);
}

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void flat32(struct kvm_sregs *s) {
    struct kvm_segment code = {.base = 0, .limit = 0xffffffff, .selector = 0x10, .type = 0xb,
                               .present = 1, .dpl = 0, .db = 1, .s = 1, .g = 1};
    struct kvm_segment data = code;
    data.selector = 0x18;
    data.type = 0x3;
    s->cs = code;
    s->ds = s->es = s->fs = s->gs = s->ss = data;
    struct kvm_segment tr = {.base = 0, .limit = 0x67, .selector = 0x20, .type = 0xb, .present = 1};
    s->tr = tr;
    s->cr0 = 0x11; /* PE | ET */
    s->cr3 = s->cr4 = 0;
    s->efer = 0;
}

static uint8_t *load_image(const char *path, size_t *len) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        fail(path);
    struct stat st;
    if (fstat(fd, &st) < 0)
        fail(path);
    uint8_t *buf = malloc(st.st_size ? st.st_size : 1);
    size_t got = 0;
    while (got < (size_t)st.st_size) {
        ssize_t r = read(fd, buf + got, st.st_size - got);
        if (r <= 0)
            fail(path);
        got += r;
    }
    close(fd);
    *len = got;
    return buf;
}

/* -- guest RAM and the overlay page ---------------------------------------------------- */

static uint8_t *ram;
static int ram_fd, ov_fd;

static void lay(uint64_t gpa, int fd, off_t off) {
    if (mmap(ram + gpa, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, off) == MAP_FAILED)
        fail("mmap MAP_FIXED");
}

static void op_map(uint64_t a) { lay(a, ov_fd, 0); }
static void op_move(uint64_t a, uint64_t b) { lay(a, ram_fd, (off_t)a); lay(b, ov_fd, 0); }
static void op_unmap(uint64_t b) { lay(b, ram_fd, (off_t)b); }

/* -- vCPU threads ------------------------------------------------------------------------ */

struct vcpu {
    int fd;
    struct kvm_run *run;
    pthread_t thread;
    long bad_exits;
    uint32_t last_exit;
    long kicks;               /* times KVM_RUN returned for our signal */
    long resumed;             /* times it went back in after one */
};

static volatile int stopping, holding;

static void on_signal(int sig) { (void)sig; }

static void *vcpu_loop(void *arg) {
    struct vcpu *v = arg;
    while (!stopping) {
        if (ioctl(v->fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR) {
                v->run->immediate_exit = 0;  /* before the owner may ask again */
                __atomic_add_fetch(&v->kicks, 1, __ATOMIC_SEQ_CST);
                while (__atomic_load_n(&holding, __ATOMIC_SEQ_CST) && !stopping)
                    sched_yield();          /* paused: out of the guest until let go */
                __atomic_add_fetch(&v->resumed, 1, __ATOMIC_SEQ_CST);
                continue;
            }
            fail("KVM_RUN");
        }
        v->bad_exits++;
        v->last_exit = v->run->exit_reason;
        return NULL;       /* the spin loop never exits on its own */
    }
    return NULL;
}

/* A pause + resume: every vCPU out of the guest, held there until all are out and then
 * hold_us longer, then let go, and back on its way in before this returns. */
static void pause_resume(struct vcpu *vcpus, int n, long hold_us) {
    long seen[MAX_VCPUS];
    __atomic_store_n(&holding, 1, __ATOMIC_SEQ_CST);
    for (int i = 0; i < n; i++) {
        seen[i] = __atomic_load_n(&vcpus[i].kicks, __ATOMIC_SEQ_CST);
        vcpus[i].run->immediate_exit = 1;   /* a signal landing just before KVM_RUN */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        pthread_kill(vcpus[i].thread, SIGUSR1);
    }
    for (int i = 0; i < n; i++)
        while (__atomic_load_n(&vcpus[i].kicks, __ATOMIC_SEQ_CST) == seen[i])
            sched_yield();
    if (hold_us > 0) {
        struct timespec h = {hold_us / 1000000, (hold_us % 1000000) * 1000L};
        nanosleep(&h, NULL);
    }
    __atomic_store_n(&holding, 0, __ATOMIC_SEQ_CST);
    for (int i = 0; i < n; i++)
        while (__atomic_load_n(&vcpus[i].resumed, __ATOMIC_SEQ_CST) != seen[i] + 1)
            sched_yield();
}

/* -- the owner thread -------------------------------------------------------------------- */

enum { JOB_NONE, JOB_MAP, JOB_MOVE, JOB_UNMAP, JOB_SEQUENCE, JOB_QUIT };

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t job_cv = PTHREAD_COND_INITIALIZER, done_cv = PTHREAD_COND_INITIALIZER;
static int job = JOB_NONE, done;
static uint64_t job_a, job_b, seq_ns[3];

static void *owner_loop(void *arg) {
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&lock);
        while (job == JOB_NONE)
            pthread_cond_wait(&job_cv, &lock);
        int j = job;
        uint64_t a = job_a, b = job_b;
        job = JOB_NONE;
        pthread_mutex_unlock(&lock);
        if (j == JOB_MAP) op_map(a);
        else if (j == JOB_MOVE) op_move(a, b);
        else if (j == JOB_UNMAP) op_unmap(b);
        else if (j == JOB_SEQUENCE) {
            uint64_t t0 = now_ns();
            op_map(a);
            uint64_t t1 = now_ns();
            op_move(a, b);
            uint64_t t2 = now_ns();
            op_unmap(b);
            seq_ns[0] = t1 - t0;
            seq_ns[1] = t2 - t1;
            seq_ns[2] = now_ns() - t2;
        }
        pthread_mutex_lock(&lock);
        done = 1;
        pthread_cond_signal(&done_cv);
        pthread_mutex_unlock(&lock);
        if (j == JOB_QUIT)
            return NULL;
    }
}

static void ask(int j, uint64_t a, uint64_t b) {
    pthread_mutex_lock(&lock);
    job = j;
    job_a = a;
    job_b = b;
    done = 0;
    pthread_cond_signal(&job_cv);
    while (!done)
        pthread_cond_wait(&done_cv, &lock);
    pthread_mutex_unlock(&lock);
}

int main(int argc, char **argv) {
    long rounds = 2000, warmup = 5, sleep_us = 500;
    int nvcpus = 2, opt;
    uint64_t load_gpa = 0x100000, mem_mib = 128;
    const char *image_path = NULL;

    int pause = 0;
    long hold_us = 0;
    while ((opt = getopt(argc, argv, "n:w:c:i:a:M:s:pP:")) != -1) {
        switch (opt) {
        case 'n': rounds = strtol(optarg, NULL, 0); break;
        case 'w': warmup = strtol(optarg, NULL, 0); break;
        case 'c': nvcpus = (int)strtol(optarg, NULL, 0); break;
        case 'i': image_path = optarg; break;
        case 'a': load_gpa = strtoull(optarg, NULL, 0); break;
        case 'M': mem_mib = strtoull(optarg, NULL, 0); break;
        case 's': sleep_us = strtol(optarg, NULL, 0); break;
        case 'p': pause = 1; break;
        case 'P': pause = 1; hold_us = strtol(optarg, NULL, 0); break;
        default:
            fprintf(stderr, "usage: overlayfloor [-n ROUNDS] [-w WARMUP] [-c VCPUS] [-i IMAGE]"
                            " [-a LOAD_GPA] [-M MEM_MIB] [-s SLEEP_US] [-p | -P HOLD_US]\n");
            return 2;
        }
    }
    size_t mem_len = (size_t)mem_mib << 20;
    size_t image_len = sizeof spin;
    const uint8_t *image = spin;
    if (image_path)
        image = load_image(image_path, &image_len);
    if (rounds <= 0 || warmup < 0 || nvcpus < 1 || nvcpus > MAX_VCPUS || sleep_us < 0
        || hold_us < 0 || hold_us > 10000000
        || load_gpa + image_len > mem_len || MOVE_BASE + WALK * PAGE > mem_len
        || (load_gpa < MOVE_BASE + WALK * PAGE && load_gpa + image_len > MAP_BASE)) {
        fprintf(stderr, "overlayfloor: bad arguments\n");
        return 2;
    }

    ram_fd = memfd_create("overlayfloor:ram", MFD_CLOEXEC);
    ov_fd = memfd_create("overlayfloor:overlay", MFD_CLOEXEC);
    if (ram_fd < 0 || ov_fd < 0) fail("memfd_create");
    if (ftruncate(ram_fd, (off_t)mem_len) < 0 || ftruncate(ov_fd, (off_t)PAGE) < 0) fail("ftruncate");
    ram = mmap(NULL, mem_len, PROT_READ | PROT_WRITE, MAP_SHARED, ram_fd, 0);
    if (ram == MAP_FAILED) fail("mmap guest RAM");
    memcpy(ram + load_gpa, image, image_len);
    for (uint64_t i = 0; i < WALK; i++) {      /* markers the overlay must not disturb */
        memset(ram + MAP_BASE + i * PAGE, 0x5a, PAGE);
        memset(ram + MOVE_BASE + i * PAGE, 0xa5, PAGE);
    }

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) fail("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) fail("KVM_CREATE_VM");
    if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000UL) < 0) fail("KVM_SET_TSS_ADDR");
    uint64_t ident = 0xfffbc000UL;
    xioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &ident, "KVM_SET_IDENTITY_MAP_ADDR");
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) fail("KVM_CREATE_IRQCHIP");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = mem_len, .userspace_addr = (uintptr_t)ram};
    xioctl(vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");

    struct sigaction sa = {.sa_handler = on_signal};   /* no SA_RESTART: KVM_RUN returns EINTR */
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR1, &sa, NULL) < 0) fail("sigaction");

    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < 0) fail("KVM_GET_VCPU_MMAP_SIZE");
    struct vcpu vcpus[MAX_VCPUS] = {0};
    for (int i = 0; i < nvcpus; i++) {
        struct vcpu *v = &vcpus[i];
        v->fd = ioctl(vm, KVM_CREATE_VCPU, i);
        if (v->fd < 0) fail("KVM_CREATE_VCPU");
        v->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
        if (v->run == MAP_FAILED) fail("mmap kvm_run");
        struct kvm_sregs sregs;
        xioctl(v->fd, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
        flat32(&sregs);
        xioctl(v->fd, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");
        struct kvm_regs regs = {.rip = load_gpa, .rflags = 2};
        xioctl(v->fd, KVM_SET_REGS, &regs, "KVM_SET_REGS");
        struct kvm_mp_state mp = {.mp_state = KVM_MP_STATE_RUNNABLE};
        xioctl(v->fd, KVM_SET_MP_STATE, &mp, "KVM_SET_MP_STATE");
    }
    pthread_t owner;
    if (pthread_create(&owner, NULL, owner_loop, NULL)) fail("pthread_create owner");
    for (int i = 0; i < nvcpus; i++)
        if (pthread_create(&vcpus[i].thread, NULL, vcpu_loop, &vcpus[i])) fail("pthread_create vcpu");
    struct timespec settle = {0, 50 * 1000000L}, pause_ts = {0, sleep_us * 1000L};
    nanosleep(&settle, NULL);

    for (long r = -warmup; r < rounds; r++) {
        uint64_t a = MAP_BASE + (uint64_t)((r + warmup) % WALK) * PAGE;
        uint64_t b = MOVE_BASE + (uint64_t)((r + warmup) % WALK) * PAGE;
        uint64_t t0 = now_ns();
        ask(JOB_MAP, a, 0);
        uint64_t t1 = now_ns();
        ask(JOB_MOVE, a, b);
        uint64_t t2 = now_ns();
        ask(JOB_UNMAP, 0, b);
        uint64_t t3 = now_ns();
        if (pause)
            pause_resume(vcpus, nvcpus, hold_us);
        ask(JOB_SEQUENCE, a, b);
        if (r >= 0)
            printf("%llu %llu %llu %llu %llu %llu\n", (unsigned long long)(t1 - t0),
                   (unsigned long long)(t2 - t1), (unsigned long long)(t3 - t2),
                   (unsigned long long)seq_ns[0], (unsigned long long)seq_ns[1],
                   (unsigned long long)seq_ns[2]);
        if (sleep_us)
            nanosleep(&pause_ts, NULL);
    }

    ask(JOB_QUIT, 0, 0);
    pthread_join(owner, NULL);
    stopping = 1;
    int broken = 0;
    for (int i = 0; i < nvcpus; i++) {
        vcpus[i].run->immediate_exit = 1;
        pthread_kill(vcpus[i].thread, SIGUSR1);
        pthread_join(vcpus[i].thread, NULL);
        struct kvm_regs regs;
        xioctl(vcpus[i].fd, KVM_GET_REGS, &regs, "KVM_GET_REGS");
        if (vcpus[i].bad_exits) {
            fprintf(stderr, "overlayfloor: vcpu%d left the guest (exit reason %u)\n", i,
                    vcpus[i].last_exit);
            broken = 1;
        } else if ((uint32_t)regs.rax == 0 || regs.rip < load_gpa || regs.rip >= load_gpa + image_len) {
            fprintf(stderr, "overlayfloor: vcpu%d is not in its loop (rip %#llx rax %#llx)\n", i,
                    (unsigned long long)regs.rip, (unsigned long long)regs.rax);
            broken = 1;
        }
    }
    for (uint64_t i = 0; i < WALK * PAGE; i++) {
        if (ram[MAP_BASE + i] != 0x5a || ram[MOVE_BASE + i] != 0xa5) {
            fprintf(stderr, "overlayfloor: guest RAM beneath the overlay changed\n");
            broken = 1;
            break;
        }
    }
    return broken;
}
