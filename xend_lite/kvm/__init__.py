"""Typed KVM bindings: Kvm (/dev/kvm) -> Vm -> Vcpu, compiled against <linux/kvm.h> with cffi.

Only this package's modules touch its compiled module; callers see Python values (registers,
exits, capability numbers), never a cffi object.
"""

from types import SimpleNamespace

from xend_lite.kvm import exits
from xend_lite.kvm._ffi import lib as _lib
from xend_lite.kvm.errors import KvmError
from xend_lite.kvm.regs import Dtable, Regs, Segment, Sregs, Translation
from xend_lite.kvm.system import CAPABILITIES, CpuidEntry, Kvm
from xend_lite.kvm.vcpu import PORT_SHIFT, SYNC_EVENTS, SYNC_REGS, SYNC_SREGS, Vcpu, kick_signal
from xend_lite.kvm.vm import MsrFilterRange, Vm

#: The header's constants a caller needs by name (capabilities, exit reasons, MSR exit
#: reasons, mp states, irqchip ids), as plain ints.
const = SimpleNamespace(**{name: getattr(_lib, name) for name in dir(_lib)
                           if name.startswith("KVM_") and isinstance(getattr(_lib, name), int)})

__all__ = [
    "CAPABILITIES", "CpuidEntry", "Dtable", "Kvm", "KvmError", "MsrFilterRange", "PORT_SHIFT",
    "Regs", "SYNC_EVENTS", "SYNC_REGS", "SYNC_SREGS", "Segment", "Sregs", "Translation", "Vcpu",
    "Vm", "const", "exits", "kick_signal",
]
