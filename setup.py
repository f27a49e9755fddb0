# The cffi extension modules are compiled against the host's <linux/kvm.h> and Xen's public
# headers at install time, so every struct layout and ioctl number comes from the headers.
from setuptools import setup

setup(cffi_modules=["xend_lite/kvm/_build.py:ffi", "xend_lite/kvm/_xen_build.py:ffi",
                     "xend_lite/kvm/_csum_build.py:ffi"])
