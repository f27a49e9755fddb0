"""The one exception type of the KVM bindings."""

from __future__ import annotations

import errno as _errno
import os


class KvmError(OSError):
    """An ioctl (or mmap) on a KVM fd failed. Keeps the raw errno and names the call."""

    def __init__(self, call: str, err: int):
        super().__init__(err, f"{call}: {os.strerror(err)} ({_errno.errorcode.get(err, err)})")
        self.call = call


def check(call: str, ret: int) -> int:
    """Return ``ret`` from an ``xl_ioctl`` helper, or raise KvmError for a negative errno."""
    if ret < 0:
        raise KvmError(call, -ret)
    return ret
