/* exitloop: a C host for one vCPU that times guest -> host -> guest I/O exits.
 *
 * The guest is a flat binary loaded at a guest-physical address and started the way
 * xend-lite starts a PVH guest: flat 32-bit protected mode, paging off. Without -i it runs a
 * built-in loop that writes EAX to port 0x510 forever. On every port write the host does
 * what a hypercall handler would, chosen by the mode:
 *   io        nothing (the bare exit)
 *   io-regs   KVM_GET_REGS, RAX = result, KVM_SET_REGS
 *   io-sync   the same through KVM_CAP_SYNC_REGS (registers travel in kvm_run)
 * The result is RAX + 1, or the fixed value given with -r. Port reads are answered with
 * zeros and MMIO reads with ones, so other guests (e.g. hypercall loops) run unchanged.
 *
 * Usage: exitloop -m MODE -n COUNT [-w WARMUP] [-i IMAGE] [-a LOAD_GPA] [-e ENTRY]
 *                 [-p PORT] [-r RAX] [-M MEM_MIB]
 * Only writes to PORT (any port when -p is not given) are counted and timed.
 * Prints one line: "mode=<mode> exits=<n> ns_per_exit=<ns> total_s=<s>".
 * Build: cc -O2 -o exitloop exitloop.c */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

enum mode { MODE_IO, MODE_REGS, MODE_SYNC };

static const uint8_t builtin_loop[] = {
    0xba, 0x10, 0x05, 0x00, 0x00, /* mov $0x510, %edx */
    0x31, 0xc0,                   /* xor %eax, %eax  */
    0xef,                         /* 1: out %eax, (%dx) */
    0xeb, 0xfd,                   /* jmp 1b */
};

static void fail(const char *what) {
    fprintf(stderr, "exitloop: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void xioctl(int fd, unsigned long req, void *arg, const char *name) {
    if (ioctl(fd, req, arg) < 0)
        fail(name);
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
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

int main(int argc, char **argv) {
    enum mode mode = MODE_IO;
    const char *mode_name = "io", *image_path = NULL;
    long count = 100000, warmup = -1;
    uint64_t load_gpa = 0x100000, entry = UINT64_MAX, fixed_rax = 0, mem_mib = 16;
    int port = -1, use_fixed = 0, opt;

    while ((opt = getopt(argc, argv, "m:n:w:i:a:e:p:r:M:")) != -1) {
        switch (opt) {
        case 'm':
            mode_name = optarg;
            if (!strcmp(optarg, "io")) mode = MODE_IO;
            else if (!strcmp(optarg, "io-regs")) mode = MODE_REGS;
            else if (!strcmp(optarg, "io-sync")) mode = MODE_SYNC;
            else { fprintf(stderr, "exitloop: unknown mode %s\n", optarg); return 2; }
            break;
        case 'n': count = strtol(optarg, NULL, 0); break;
        case 'w': warmup = strtol(optarg, NULL, 0); break;
        case 'i': image_path = optarg; break;
        case 'a': load_gpa = strtoull(optarg, NULL, 0); break;
        case 'e': entry = strtoull(optarg, NULL, 0); break;
        case 'p': port = (int)strtol(optarg, NULL, 0); break;
        case 'r': fixed_rax = strtoull(optarg, NULL, 0); use_fixed = 1; break;
        case 'M': mem_mib = strtoull(optarg, NULL, 0); break;
        default:
            fprintf(stderr, "usage: exitloop -m io|io-regs|io-sync -n COUNT [-w WARMUP] [-i IMAGE]"
                            " [-a LOAD_GPA] [-e ENTRY] [-p PORT] [-r RAX] [-M MEM_MIB]\n");
            return 2;
        }
    }
    if (count <= 0) { fprintf(stderr, "exitloop: COUNT must be positive\n"); return 2; }
    if (warmup < 0) warmup = count / 10;
    if (entry == UINT64_MAX) entry = load_gpa;

    size_t image_len = sizeof builtin_loop;
    const uint8_t *image = builtin_loop;
    if (image_path) image = load_image(image_path, &image_len);
    size_t mem_len = (size_t)mem_mib << 20;
    if (load_gpa + image_len > mem_len || entry >= mem_len) {
        fprintf(stderr, "exitloop: image does not fit in %llu MiB\n", (unsigned long long)mem_mib);
        return 2;
    }

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) fail("/dev/kvm");
    if (mode == MODE_SYNC && ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_SYNC_REGS) <= 0) {
        fprintf(stderr, "exitloop: no KVM_CAP_SYNC_REGS\n");
        return 1;
    }
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) fail("KVM_CREATE_VM");
    if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000UL) < 0) fail("KVM_SET_TSS_ADDR");
    uint8_t *mem = mmap(NULL, mem_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) fail("mmap guest memory");
    memcpy(mem + load_gpa, image, image_len);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = mem_len, .userspace_addr = (uintptr_t)mem};
    xioctl(vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) fail("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < 0) fail("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) fail("mmap kvm_run");
    struct kvm_sregs sregs;
    xioctl(vcpu, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
    flat32(&sregs);
    xioctl(vcpu, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = entry, .rflags = 2};
    xioctl(vcpu, KVM_SET_REGS, &regs, "KVM_SET_REGS");
    if (mode == MODE_SYNC)
        run->kvm_valid_regs = KVM_SYNC_X86_REGS;

    long counted = 0, total = warmup + count;
    double t0 = 0;
    if (warmup == 0) t0 = now_s();
    while (counted < total) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR) continue;
            fail("KVM_RUN");
        }
        switch (run->exit_reason) {
        case KVM_EXIT_IO:
            if (run->io.direction == KVM_EXIT_IO_IN) {
                memset((uint8_t *)run + run->io.data_offset, 0, (size_t)run->io.size * run->io.count);
                continue;
            }
            if (port >= 0 && run->io.port != port)
                continue;
            break;
        case KVM_EXIT_MMIO:
            if (!run->mmio.is_write) memset(run->mmio.data, 0xff, sizeof run->mmio.data);
            continue;
        default:
            fprintf(stderr, "exitloop: guest stopped with exit reason %u after %ld exits\n",
                    run->exit_reason, counted);
            return 1;
        }
        if (mode == MODE_REGS) {
            xioctl(vcpu, KVM_GET_REGS, &regs, "KVM_GET_REGS");
            regs.rax = use_fixed ? fixed_rax : regs.rax + 1;
            xioctl(vcpu, KVM_SET_REGS, &regs, "KVM_SET_REGS");
        } else if (mode == MODE_SYNC) {
            struct kvm_regs *r = &run->s.regs.regs;
            r->rax = use_fixed ? fixed_rax : r->rax + 1;
            run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
        }
        if (++counted == warmup)
            t0 = now_s();
    }
    double dt = now_s() - t0;
    printf("mode=%s exits=%ld ns_per_exit=%.1f total_s=%.3f\n", mode_name, count,
           dt / (double)count * 1e9, dt);
    return 0;
}
