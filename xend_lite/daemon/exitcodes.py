"""How a start ends: the daemon's exit statuses, and the error that carries one with the line
to print. Apart from service.py so that the command line can report a failure before the
daemon's own modules are loaded."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The daemon's exit statuses. A guest poweroff exits with the guest's own code."""

    OK = 0
    FAILURE = 1        # a failure after start (details in the log), or a guest crash
    USAGE = 2          # unknown option or missing option argument
    SNAPSHOT = 65      # --restore: the snapshot is missing or cannot be loaded
    IMAGE = 66         # the guest image is missing, unreadable or not loadable
    KVM = 69           # /dev/kvm is missing, not accessible, or lacks what we need
    SOFTWARE = 70      # an internal error while starting
    SOCKET = 73        # the control socket (or TCP address) is in use or cannot be made
    CONFIG = 78        # the configuration (file or options) is invalid


class StartError(Exception):
    def __init__(self, code: ExitCode, message: str):
        super().__init__(message)
        self.code = code
