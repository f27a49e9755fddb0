"""Snapshots of a guest: device and CPU state plus guest memory in one validated file.

Components declare what they save as :class:`State` dataclasses; :func:`save_snapshot`
writes states and sparse guest memory atomically; :func:`load_snapshot` validates a whole
file before anything is applied and hands back decoded states and where each memory region
lies in the file; :func:`describe` summarises a file without reading memory.
"""

# Everything is imported when first asked for: a VM that boots without saving or loading
# needs only State (its components declare what they would save), and a daemon only the
# confined paths of its snapshot directory.
_ERRORS = (
    "BadMagic", "ChecksumMismatch", "DuplicateSection", "MalformedSnapshot",
    "MemoryChecksumMismatch", "MemoryTableError", "MissingSection", "SectionChecksumMismatch",
    "SectionVersionError", "SnapshotError", "SnapshotIOError", "SnapshotReadError",
    "SnapshotWriteError", "StateClassError", "StateDecodeError", "StateEncodeError",
    "TargetRefused", "Truncated", "UnexpectedSection", "UnknownSection", "UnsupportedFormat",
)
_LAZY = {
    **{name: "errors" for name in _ERRORS}, "CodecError": "codec",
    "LoadedRegion": "reader", "LoadedSnapshot": "reader", "SectionInfo": "reader",
    "SnapshotHeader": "reader", "describe": "reader", "load_snapshot": "reader",
    "check_sections": "reader",
    "State": "state", "registered_states": "state", "section_name": "state",
    "MemoryRegion": "writer", "SnapshotInfo": "writer", "save_snapshot": "writer",
    "wait_reclaimed": "target", "check_target": "target", "remove_stale_temps": "target",
    "ConfinedPath": "confine",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "State", "registered_states", "section_name",
    "save_snapshot", "wait_reclaimed", "check_target", "remove_stale_temps", "MemoryRegion",
    "SnapshotInfo", "ConfinedPath",
    "load_snapshot", "check_sections", "LoadedSnapshot", "LoadedRegion", "SectionInfo",
    "SnapshotHeader",
    "describe",
    "SnapshotError", "SnapshotIOError", "SnapshotReadError", "SnapshotWriteError",
    "BadMagic", "UnsupportedFormat", "ChecksumMismatch", "SectionChecksumMismatch",
    "MemoryChecksumMismatch", "Truncated", "MalformedSnapshot", "DuplicateSection",
    "MemoryTableError", "UnknownSection", "MissingSection", "UnexpectedSection",
    "SectionVersionError", "StateEncodeError", "StateDecodeError", "StateClassError",
    "TargetRefused", "CodecError",
]
