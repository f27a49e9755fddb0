"""Errors of the xenstore protocol: the errno names a reply carries (io/xs_wire.h)."""

from __future__ import annotations

from xend_lite.errors import AccessDenied, InvalidArgument, NotFound, XendLiteError

__all__ = ["ERROR_NAMES", "XsError", "to_domain_error"]

# struct xsd_errors in io/xs_wire.h, in its order; a reply names the error, not its number.
ERROR_NAMES = ("EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
               "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM")


class XsError(Exception):
    """A request failed with the xenstore error ``name``; ``detail`` is for logs only."""

    def __init__(self, name: str, detail: str = ""):
        if name not in ERROR_NAMES:
            raise ValueError(f"{name!r} is not a xenstore error name")
        super().__init__(f"{name}: {detail}" if detail else name)
        self.name = name
        self.detail = detail


def to_domain_error(err: XsError, what: str) -> XendLiteError:
    """The error an operator sees for a failed store request about ``what``: ENOENT is
    NotFound, EACCES and EPERM AccessDenied, every other name InvalidArgument; the name
    itself travels in ``extra["errno"]``."""
    message = f"xenstore {what}: {err.name}" + (f" ({err.detail})" if err.detail else "")
    cls = {"ENOENT": NotFound, "EACCES": AccessDenied, "EPERM": AccessDenied}.get(err.name,
                                                                              InvalidArgument)
    exc = cls(message)
    exc.extra = {"errno": err.name}
    return exc
