"""The Xen ABI as an HVM/PVH guest sees it, on plain KVM: CPUID leaves, the hypercall page,
hypercall dispatch, event channels, timers, grant tables and the overlay device."""
