"""cffi API-mode builder for Xen's public ABI (64-bit layouts), from libxen-dev's headers.

Built at install time into ``xend_lite.kvm._xen``; ``xend_lite.kvm.xenabi`` is the only reader.
"""

from cffi import FFI

CDEF = r"""
#define __XEN_LATEST_INTERFACE_VERSION__ ...
"""

SOURCE = r"""
#define __XEN_INTERFACE_VERSION__ __XEN_LATEST_INTERFACE_VERSION__
#include <xen/xen.h>
"""

ffi = FFI()
ffi.cdef(CDEF)
ffi.set_source("xend_lite.kvm._xen", SOURCE)

if __name__ == "__main__":
    ffi.compile(verbose=True)
