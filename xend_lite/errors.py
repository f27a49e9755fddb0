"""The domain error hierarchy shared by every layer.

Each class has a stable numeric ``code`` and its class name as the error class a client sees;
the control plane maps them to JSON-RPC errors in one place. Messages are for humans and
never carry internal text such as tracebacks.
"""

from __future__ import annotations


class XendLiteError(Exception):
    """Base of every error a user or client can cause. Subclasses set a stable ``code``."""

    code: int = 1000
    # Machine-readable detail a client sees next to the class (e.g. a xenstore errno name);
    # set per instance, never holds internal text.
    extra: dict = {}

    @property
    def error_class(self) -> str:
        return type(self).__name__


class InvalidArgument(XendLiteError):
    """A request named a value that is malformed or out of range."""

    code = 1001


class NotFound(XendLiteError):
    """A request named something that does not exist (a page, a file, a vCPU)."""

    code = 1002


class StateError(XendLiteError):
    """The request is not allowed in the VM's current run state."""

    code = 1003

    def __init__(self, message: str, state: str | None = None, allowed: tuple[str, ...] = ()):
        super().__init__(message)
        self.state = state
        self.allowed = allowed


class NotSupported(XendLiteError):
    """The host or the VM's mode does not offer what was asked for."""

    code = 1004


class GuestMemoryError(XendLiteError):
    """A guest-physical access touched memory that is not backed, or ran past its end."""

    code = 1005

    def __init__(self, message: str, gpa: int = 0, length: int = 0):
        super().__init__(message)
        self.gpa = gpa
        self.length = length


class AccessDenied(XendLiteError):
    """The request was understood but its target refuses it (a xenstore node's permissions)."""

    code = 1007


class LoaderError(XendLiteError):
    """A guest image could not be loaded (malformed, does not fit, unsupported)."""

    code = 1006


class SnapshotError(XendLiteError):
    """A snapshot could not be written, read or applied."""

    code = 1010


class ConfigError(XendLiteError):
    """The daemon's configuration is invalid."""

    code = 1020


class InternalError(XendLiteError):
    """Something failed that is not the caller's fault; details are in the daemon's log."""

    code = 1099
