"""Snapshot errors: one subclass of :class:`xend_lite.errors.SnapshotError` per fault.

Every fault a reader can find in a file has its own class, so a caller (and a test) can tell
a bad magic from a checksum mismatch from a truncation without parsing messages.
"""

from __future__ import annotations

from xend_lite.errors import SnapshotError

__all__ = [
    "SnapshotError",
    "SnapshotIOError",
    "SnapshotWriteError",
    "SnapshotReadError",
    "BadMagic",
    "UnsupportedFormat",
    "ChecksumMismatch",
    "SectionChecksumMismatch",
    "MemoryChecksumMismatch",
    "Truncated",
    "MalformedSnapshot",
    "DuplicateSection",
    "MemoryTableError",
    "UnknownSection",
    "MissingSection",
    "UnexpectedSection",
    "SectionVersionError",
    "StateEncodeError",
    "StateDecodeError",
    "StateClassError",
    "TargetRefused",
]


class SnapshotIOError(SnapshotError):
    """The operating system refused a read or write; ``errno`` keeps the cause."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class SnapshotWriteError(SnapshotIOError):
    """Writing a snapshot failed (disk full, permission, I/O error); nothing was published."""


class SnapshotReadError(SnapshotIOError):
    """A snapshot file could not be opened or read."""


class BadMagic(SnapshotError):
    """The file does not start with the snapshot magic: it is not a snapshot."""


class UnsupportedFormat(SnapshotError):
    """The file's format version is unknown to this code (usually newer)."""

    def __init__(self, message: str, version: int, supported: int):
        super().__init__(message)
        self.version = version
        self.supported = supported


class ChecksumMismatch(SnapshotError):
    """The checksum over header, table and sections does not match: the file is corrupt."""


class SectionChecksumMismatch(ChecksumMismatch):
    """One section's own checksum does not match; ``section`` names it."""

    def __init__(self, message: str, section: str):
        super().__init__(message)
        self.section = section


class MemoryChecksumMismatch(ChecksumMismatch):
    """Guest memory in the file differs from what was saved (found by ``verify_memory``)."""

    def __init__(self, message: str, region: str, offset: int):
        super().__init__(message)
        self.region = region
        self.offset = offset


class Truncated(SnapshotError):
    """The file ends before the data its header declares."""

    def __init__(self, message: str, expected: int, actual: int):
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class MalformedSnapshot(SnapshotError):
    """Header or table values are inconsistent although their checksum matched."""


class DuplicateSection(MalformedSnapshot):
    """Two sections carry the same name."""

    def __init__(self, message: str, section: str):
        super().__init__(message)
        self.section = section


class MemoryTableError(MalformedSnapshot):
    """The memory region table is inconsistent (overlaps, misalignment, out of the file)."""


class UnknownSection(SnapshotError):
    """A section has a name no State class is registered for."""

    def __init__(self, message: str, section: str):
        super().__init__(message)
        self.section = section


class MissingSection(SnapshotError):
    """A section the loader requires is not in the snapshot."""

    def __init__(self, message: str, sections: tuple[str, ...]):
        super().__init__(message)
        self.sections = sections


class UnexpectedSection(SnapshotError):
    """The snapshot holds sections the loader neither requires nor accepts."""

    def __init__(self, message: str, sections: tuple[str, ...]):
        super().__init__(message)
        self.sections = sections


class SectionVersionError(SnapshotError):
    """A section was saved with a version outside [MIN_VERSION, VERSION] of its class."""

    def __init__(self, message: str, section: str, version: int, min_version: int,
                 max_version: int):
        super().__init__(message)
        self.section = section
        self.version = version
        self.min_version = min_version
        self.max_version = max_version


class StateEncodeError(SnapshotError):
    """A State's field holds a value its declared type (or the codec) does not allow."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


class StateDecodeError(SnapshotError):
    """A section's bytes do not decode into its State class; ``field`` names where."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


class StateClassError(SnapshotError):
    """A State class is declared wrongly (not a dataclass, bad NAME/VERSION, unsupported type)."""


class TargetRefused(SnapshotWriteError):
    """A save's target exists and is not a snapshot (another file, a directory, a symlink):
    it is left alone and nothing is written."""
