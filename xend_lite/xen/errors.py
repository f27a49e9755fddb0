"""How a hypercall fails: a Xen errno, returned to the guest as -errno in RAX."""

from __future__ import annotations

from xend_lite.xen.xenabi import X


class XenError(Exception):
    """Raised inside a hypercall handler; the dispatcher returns ``-errno``."""

    def __init__(self, errno: int, why: str = ""):
        super().__init__(why or f"Xen errno {errno}")
        self.errno = errno


class Restart(Exception):
    """The hypercall cannot finish now (the vCPU must pause first): the dispatcher rewinds
    the guest to the stub's port write so the same hypercall runs again after the pause."""


def fault(why: str = "") -> XenError:
    return XenError(X.XEN_EFAULT, why)


def inval(why: str = "") -> XenError:
    return XenError(X.XEN_EINVAL, why)
