"""Snapshots of a guest: device and CPU state plus guest memory in one validated file.

Components declare what they save as :class:`State` dataclasses; :func:`save_snapshot`
writes states and sparse guest memory atomically; :func:`load_snapshot` validates a whole
file before anything is applied and hands back decoded states and where each memory region
lies in the file; :func:`describe` summarises a file without reading memory.
"""

from xend_lite.snapshot.errors import (
    BadMagic,
    ChecksumMismatch,
    DuplicateSection,
    MalformedSnapshot,
    MemoryChecksumMismatch,
    MemoryTableError,
    MissingSection,
    SectionChecksumMismatch,
    SectionVersionError,
    SnapshotError,
    SnapshotIOError,
    SnapshotReadError,
    SnapshotWriteError,
    StateClassError,
    StateDecodeError,
    StateEncodeError,
    Truncated,
    UnexpectedSection,
    UnknownSection,
    UnsupportedFormat,
)
from xend_lite.snapshot.codec import CodecError
from xend_lite.snapshot.reader import (
    LoadedRegion,
    LoadedSnapshot,
    SectionInfo,
    SnapshotHeader,
    describe,
    load_snapshot,
)
from xend_lite.snapshot.state import State, registered_states, section_name
from xend_lite.snapshot.writer import MemoryRegion, SnapshotInfo, save_snapshot, wait_reclaimed

__all__ = [
    "State", "registered_states", "section_name",
    "save_snapshot", "wait_reclaimed", "MemoryRegion", "SnapshotInfo",
    "load_snapshot", "LoadedSnapshot", "LoadedRegion", "SectionInfo", "SnapshotHeader",
    "describe",
    "SnapshotError", "SnapshotIOError", "SnapshotReadError", "SnapshotWriteError",
    "BadMagic", "UnsupportedFormat", "ChecksumMismatch", "SectionChecksumMismatch",
    "MemoryChecksumMismatch", "Truncated", "MalformedSnapshot", "DuplicateSection",
    "MemoryTableError", "UnknownSection", "MissingSection", "UnexpectedSection",
    "SectionVersionError", "StateEncodeError", "StateDecodeError", "StateClassError",
    "CodecError",
]
