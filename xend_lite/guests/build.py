"""Builds guest images from assembly with the system toolchain (gcc as the assembler driver, ld).

Images are small static ELF files linked at 1 MiB with guest.ld. ``build`` is deterministic
(no build id, no timestamps), so the packaged default guest can be checked against its source.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from xend_lite.errors import LoaderError

HERE = Path(__file__).resolve().parent
INCLUDE = HERE / "include"
LINKER_SCRIPT = HERE / "guest.ld"


def toolchain_missing() -> str | None:
    for tool in ("gcc", "ld"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install gcc binutils)"
    return None


def build(source: str | os.PathLike, out: str | os.PathLike, *, bits: int = 64,
          defines: dict[str, object] | None = None, include_dirs: tuple[str, ...] = ()) -> Path:
    """Assemble ``source`` (.S, preprocessed) and link it into the ELF ``out``."""
    if bits not in (32, 64):
        raise ValueError("bits must be 32 or 64")
    source, out = Path(source), Path(out)
    flags = [f"-D{k}={v}" for k, v in sorted((defines or {}).items())]
    incs = [f"-I{d}" for d in (str(INCLUDE), *include_dirs, str(source.parent))]
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "guest.o"
        cc = ["gcc", f"-m{bits}", "-c", "-x", "assembler-with-cpp", "-nostdlib", *incs, *flags,
              "-o", str(obj), str(source)]
        ld = ["ld", "-m", "elf_x86_64" if bits == 64 else "elf_i386", "-static", "-nostdlib",
              "--build-id=none", "-z", "noexecstack", "-z", "max-page-size=4096",
              "-T", str(LINKER_SCRIPT), "-o", str(out), str(obj)]
        for cmd in (cc, ld):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise LoaderError(f"building {source.name} failed: {proc.stderr.strip()}")
    return out


def build_cached(source: str | os.PathLike, cache_dir: str | os.PathLike, *, bits: int = 64,
                 defines: dict[str, object] | None = None) -> Path:
    """``build`` into ``cache_dir``, reusing an image built from the same inputs."""
    source = Path(source)
    h = hashlib.sha256()
    for p in (source, LINKER_SCRIPT, *sorted(INCLUDE.glob("*"))):
        h.update(p.read_bytes())
    h.update(repr((bits, sorted((defines or {}).items()))).encode())
    out = Path(cache_dir) / f"{source.stem}-{h.hexdigest()[:16]}.elf"
    if not out.exists():
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        build(source, tmp, bits=bits, defines=defines)
        os.replace(tmp, out)
    return out
