"""The xen_overlay device: shared_info and grant-table frames laid over guest RAM.

The pages belong to the device (one memfd, one page each), start zeroed and are never guest
RAM. A page is seen by the guest only while mapped at a frame of its choosing
(XENMEM_add_to_physmap) or of the operator's (RPC). A mapping sits above RAM; the RAM beneath
is not touched and shows again when the page moves or goes. Each page has at most one
mapping, so mapping it again moves it; INVALID_GPA unmaps; address 0 is an address like any
other. Every change goes through the memory map (laid in place over RAM, or with the vCPUs
out of the guest while KVM's slots change), so no vCPU sees half of it, and a failure leaves the old mapping in place. Changes run on the VM owner
(machine.change_memory), whoever asks for them; the device remembers who mapped each page
(the guest or the operator).

Backend: this host's KVM has no Xen support, so the daemon keeps shared_info itself
("userspace"). A kernel backend (KVM_CAP_XEN_HVM) is detected and reported, not used.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Callable

from xend_lite.errors import InvalidArgument, NotFound, NotSupported
from xend_lite.machine.backing import INVALID_GPA, PAGE_SIZE, Backing
from xend_lite.machine.native import punch_hole

if TYPE_CHECKING:   # the saved state brings in the snapshot layer: imported when saving
    from xend_lite.machine.machine import Machine
    from xend_lite.xen.state import OverlayState

SHARED_INFO = "shared_info"
_GRANT = re.compile(r"grant:(0|[1-9][0-9]{0,5})\Z")
MAX_GRANT_FRAMES = 4096


def grant_page(i: int) -> str:
    return f"grant:{i}"


def choose_backend(requested: str, kvm_xen_available: bool) -> str:
    if requested not in ("auto", "userspace", "kvm-xen"):
        raise InvalidArgument(f"backend must be auto, userspace or kvm-xen, not {requested!r}")
    if requested == "kvm-xen":
        raise NotSupported("the kvm-xen backend needs KVM_CAP_XEN_HVM with shared_info support; "
                           + ("xend-lite does not drive it yet" if kvm_xen_available
                              else "this host's KVM reports none") + ": use backend = \"userspace\"")
    return "userspace"


class Pages(Mapping[str, Backing]):
    """The device's pages by name, each page of the memfd mapped when it is first asked
    for: a domain has 65 with its 64 grant frames, a guest maps a few, and mapping them
    all took about 0.4 ms of building every domain."""

    def __init__(self, fd: int, names: list[str]):
        self._fd = fd
        self._index = {name: i for i, name in enumerate(names)}
        self._made: dict[str, Backing] = {}
        self._lock = threading.Lock()      # vCPU threads and the owner ask for pages

    def __getitem__(self, name: str) -> Backing:
        b = self._made.get(name)
        if b is None:
            i = self._index[name]
            with self._lock:
                b = self._made.get(name)
                if b is None:
                    b = self._made[name] = Backing(name, self._fd, PAGE_SIZE, i * PAGE_SIZE,
                                                   owns_fd=False)
        return b

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def made(self) -> list[Backing]:
        """The pages mapped so far, in page order (the others were never written)."""
        with self._lock:
            made = dict(self._made)
        return [made[n] for n in self._index if n in made]


class OverlayDevice:
    def __init__(self, machine: Machine, grant_frames: int = 64, backend: str = "auto",
                 kvm_xen_available: bool = False):
        if not getattr(machine, "xen_mode", False):
            raise NotSupported("the xen_overlay device exists only in a VM in Xen mode")
        if not isinstance(grant_frames, int) or not 1 <= grant_frames <= MAX_GRANT_FRAMES:
            raise InvalidArgument(f"grant_frames must be between 1 and {MAX_GRANT_FRAMES}")
        self.machine = machine
        self.backend_name = choose_backend(backend, kvm_xen_available)
        self.grant_frames = grant_frames
        self.on_mode_change: Callable[[], None] = lambda: None
        self._long_mode = True
        self.mapped_by: dict[str, str] = {}      # mapped page -> "guest" or "operator"
        n = 1 + grant_frames
        fd = os.memfd_create("xend-lite:xen-overlay", os.MFD_CLOEXEC)
        self._fd = fd
        try:
            os.ftruncate(fd, n * PAGE_SIZE)
            self.pages = Pages(fd, [SHARED_INFO] + [grant_page(i) for i in range(grant_frames)])
            self.shared_info = self.pages[SHARED_INFO]
        except BaseException:
            os.close(fd)
            raise

    # -- names ---------------------------------------------------------------------------

    @property
    def long_mode(self) -> bool:
        """shared_info's layout: 64-bit (True) or 32-bit."""
        return self._long_mode

    @long_mode.setter
    def long_mode(self, value: bool) -> None:
        self._long_mode = bool(value)
        self.on_mode_change()

    def check_page(self, page: object) -> str:
        if not isinstance(page, str):
            raise InvalidArgument("page must be a string: shared_info or grant:<index>")
        if page == SHARED_INFO:
            return page
        m = _GRANT.match(page)
        if not m:
            raise InvalidArgument(f"unknown overlay page {page!r}: use shared_info or grant:<index>")
        if int(m.group(1)) >= self.grant_frames:
            raise NotFound(f"no overlay page {page}: this domain has {self.grant_frames} grant frames")
        return page

    def gpa(self, page: str) -> int | None:
        return self.machine.memmap.overlay_gpa(page)

    def gfn_of(self, page: str) -> int | None:
        g = self.gpa(page)
        return None if g is None else g >> 12

    def page_at(self, gpa: int) -> str | None:
        for name, g in self.machine.memmap.overlays().items():
            if g == gpa:
                return name
        return None

    # -- mapping (on the VM owner) -------------------------------------------------------

    def apply(self, page: str, gpa: int, by: str) -> None:
        """Map, move (or, at INVALID_GPA, unmap) a checked page; ``by`` is who asked."""
        if gpa == INVALID_GPA:
            self.machine.change_memory(lambda mm: mm.unmap_overlay(page))
            self.mapped_by.pop(page, None)
            return
        backing = self.pages[page]     # the memory map checks gpa before anything changes
        self.machine.change_memory(lambda mm: mm.map_overlay(page, backing, gpa))
        self.mapped_by[page] = by

    def entry(self, page: str) -> dict:
        """One page's listing entry."""
        return self.entry_at(page, self.gpa(page))

    def entry_at(self, page: str, g: int | None) -> dict:
        """One page's listing entry, for a page known to lie at ``g`` (None: unmapped)."""
        out = {"page": page, "gpa": g, "size": self.pages[page].size, "backend": self.backend_name}
        if g is not None:
            out["by"] = self.mapped_by.get(page, "guest")
        return out

    def list(self) -> list[dict]:
        mapped = self.machine.memmap.overlays()
        return [self.entry_at(name, mapped.get(name)) for name in self.pages]

    # -- reset and state -----------------------------------------------------------------

    def zero_pages(self) -> None:
        """Zero every page at once: one hole punched over the device's memfd."""
        try:
            punch_hole(self._fd, 0, len(self.pages) * PAGE_SIZE)
        except OSError:
            for b in self.pages.made():     # a page never mapped was never written
                b.zero()

    def reset(self) -> None:
        """Unmap every page and zero it (a Xen soft reset). On the owner."""
        def unmap_all(mm) -> None:
            for name in list(mm.overlays()):
                if name in self.pages:
                    mm.unmap_overlay(name)
        if self.machine.memmap.overlays():
            self.machine.change_memory(unmap_all)
        self.mapped_by.clear()
        self.zero_pages()
        self.long_mode = True

    def save(self) -> OverlayState:
        from xend_lite.xen.state import OverlayState

        gpas = {n: g for n, g in self.machine.memmap.overlays().items() if n in self.pages}
        zero = bytes(PAGE_SIZE)
        contents = {b.name: bytes(b.view) for b in self.pages.made() if bytes(b.view) != zero}
        return OverlayState(gpas=gpas, long_mode=self.long_mode, contents=contents,
                            grant_frames=self.grant_frames,
                            operator_pages=sorted(n for n, by in self.mapped_by.items()
                                                  if by == "operator" and n in gpas))

    def check_state(self, st: OverlayState) -> None:
        """Everything a load needs, checked before anything changes."""
        if st.grant_frames != self.grant_frames:
            raise InvalidArgument(f"snapshot has {st.grant_frames} grant frames, this domain "
                                  f"{self.grant_frames}")
        seen = set()
        for name, g in st.gpas.items():
            self.check_page(name)
            self.machine.memmap.check_gpa(g)
            if g in seen:
                raise InvalidArgument(f"two overlay pages at {g:#x}")
            seen.add(g)
        for name, data in st.contents.items():
            self.check_page(name)
            if len(data) != PAGE_SIZE:
                raise InvalidArgument(f"overlay page {name} content is {len(data)} bytes")
        for name in st.operator_pages:
            if name not in st.gpas:
                raise InvalidArgument(f"overlay page {name} is not mapped but has a mapper")

    def mappings(self, st: OverlayState) -> dict[str, tuple[int, Backing]]:
        """The memory-map overlays a saved state asks for (checked first)."""
        self.check_state(st)
        return {name: (g, self.pages[name]) for name, g in st.gpas.items()}

    def load(self, st: OverlayState, remap: bool = True) -> None:
        """Put saved contents back and, unless the caller maps them itself (a restore does
        it with the RAM in one change), remap every page. Call with vCPUs paused."""
        self.check_state(st)
        self.zero_pages()
        for name, data in st.contents.items():
            self.pages[name].view[:] = data
        self.long_mode = st.long_mode
        self.mapped_by = {n: ("operator" if n in st.operator_pages else "guest") for n in st.gpas}
        if not remap:
            return

        def remap(mm) -> None:
            for name in list(mm.overlays()):
                if name in self.pages and name not in st.gpas:
                    mm.unmap_overlay(name)
            for name, g in st.gpas.items():
                mm.map_overlay(name, self.pages[name], g)
        self.machine.change_memory(remap)

    def close(self) -> None:
        for b in self.pages.made():
            b.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
