/* The VM floor: what building a VM like xend-lite's costs the plainest C program, system
 * call by system call, so the start-up figures can tell the kernel's part from ours.
 *
 *   vmfloor [MEMORY_MIB]
 *
 * Opens /dev/kvm, KVM_CREATE_VM, makes the guest's RAM a memfd mapped shared (as xend-lite
 * does), sets the TSS and identity-map addresses, creates the in-kernel irqchip and PIT,
 * installs the RAM as memory slot 0 (KVM_SET_USER_MEMORY_REGION) and creates vCPU 0.
 *
 * Prints one line of "name=nanoseconds" pairs in that order, then total=.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static long long now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void check(long r, const char *what)
{
    if (r < 0) {
        perror(what);
        exit(1);
    }
}

int main(int argc, char **argv)
{
    size_t size = (size_t)(argc > 1 ? strtoul(argv[1], NULL, 0) : 128) << 20;
    long long t[8];

    t[0] = now();
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    check(kvm, "open /dev/kvm");
    t[1] = now();
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    check(vm, "KVM_CREATE_VM");
    t[2] = now();
    int ram = memfd_create("vmfloor-ram", MFD_CLOEXEC);
    check(ram, "memfd_create");
    check(ftruncate(ram, size), "ftruncate");
    void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, ram, 0);
    if (mem == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    t[3] = now();
    __u64 identity = 0xfffbc000;
    struct kvm_pit_config pit = {0};
    check(ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000), "KVM_SET_TSS_ADDR");
    check(ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &identity), "KVM_SET_IDENTITY_MAP_ADDR");
    check(ioctl(vm, KVM_CREATE_IRQCHIP, 0), "KVM_CREATE_IRQCHIP");
    check(ioctl(vm, KVM_CREATE_PIT2, &pit), "KVM_CREATE_PIT2");
    t[4] = now();
    struct kvm_userspace_memory_region slot = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = size, .userspace_addr = (__u64)mem};
    check(ioctl(vm, KVM_SET_USER_MEMORY_REGION, &slot), "KVM_SET_USER_MEMORY_REGION");
    t[5] = now();
    check(ioctl(vm, KVM_CREATE_VCPU, 0), "KVM_CREATE_VCPU");
    t[6] = now();
    printf("open=%lld create_vm=%lld ram=%lld vm_setup=%lld memory_slot=%lld create_vcpu=%lld total=%lld\n",
           t[1] - t[0], t[2] - t[1], t[3] - t[2], t[4] - t[3], t[5] - t[4], t[6] - t[5], t[6] - t[0]);
    return 0;
}
