"""The VM's run state as the control plane sees it, and the guard that refuses a command
up front when the current state does not allow it."""

from __future__ import annotations

import functools
from enum import Enum
from typing import Any, Callable, TypeVar

from xend_lite.errors import StateError

F = TypeVar("F", bound=Callable[..., Any])


class RunState(str, Enum):
    INCOMING = "incoming"        # --incoming: no VM until snapshot-load brings one
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    SAVING = "saving"
    RESTORING = "restoring"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal-error"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def from_domain(cls, name: str) -> RunState:
        """The Domain's run_state() names, with anything unknown taken as an internal error."""
        try:
            return cls(name)
        except ValueError:
            return cls.INTERNAL_ERROR


ALL_STATES = tuple(RunState)

# QMP's RunState name for each of ours (query-status answers both)
QMP_NAMES = {RunState.CREATED: "prelaunch", RunState.RUNNING: "running",
             RunState.PAUSED: "paused", RunState.SAVING: "save-vm",
             RunState.RESTORING: "restore-vm", RunState.SHUTDOWN: "shutdown",
             RunState.INTERNAL_ERROR: "internal-error", RunState.INCOMING: "inmigrate"}
PANIC_REASONS = ("crash",)


def qmp_name(state: RunState, stop_reason: str | None = None) -> str:
    """QMP's name for the state; a guest that stopped by crashing is "guest-panicked"."""
    if state == RunState.SHUTDOWN and stop_reason in PANIC_REASONS:
        return "guest-panicked"
    return QMP_NAMES[state]


def requires(*states: RunState) -> Callable[[F], F]:
    """Allow the decorated controller command only in ``states``.

    The object it decorates a method of has a ``state`` attribute. The allowed states are
    kept on the function (``allowed_states``) so the event-loop side can refuse before it
    queues the command, and the check runs again where the command runs."""

    def deco(fn: F) -> F:
        action = fn.__name__.lstrip("_").replace("_", "-")

        @functools.wraps(fn)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            check_state(self.state, states, action)
            return fn(self, *args, **kwargs)

        wrapper.allowed_states = states  # type: ignore[attr-defined]
        wrapper.action = action  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return deco


def check_state(state: RunState, allowed: tuple[RunState, ...], action: str) -> None:
    if state not in allowed:
        names = tuple(s.value for s in allowed)
        raise StateError(f"{action} is not allowed while the VM is {state.value} "
                         f"(allowed when {' or '.join(names)})", state.value, names)
