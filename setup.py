# The cffi extension modules are compiled against the host's <linux/kvm.h> and Xen's public
# headers at install time, so every struct layout and ioctl number comes from the headers.
from setuptools import setup

# Each layer owns its compiled module: kvm (KVM's structs and ioctls), machine (host memory
# helpers), xen (Xen's ABI and calling convention), snapshot (checksums and writeback).
setup(cffi_modules=["xend_lite/kvm/_build.py:ffi", "xend_lite/machine/_build.py:ffi",
                    "xend_lite/xen/_build.py:ffi", "xend_lite/snapshot/_build.py:ffi"])
