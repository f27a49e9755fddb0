"""Suite-wide fixtures and the KVM guard.

Tests marked ``kvm`` run real guests on /dev/kvm. They skip only where /dev/kvm is missing
or unusable, with that reason. When /dev/kvm is present but no KVM test ran, the session
fails: a green run must have exercised real guests.
"""

from __future__ import annotations

import os

import pytest

KVM_PATH = "/dev/kvm"

try:
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("XEND_LITE_HYPOTHESIS_PROFILE"):
        _hypothesis_settings.load_profile(os.environ["XEND_LITE_HYPOTHESIS_PROFILE"])
except ImportError:  # hypothesis is a test extra; without it the property tests skip
    pass


def kvm_unavailable_reason() -> str | None:
    if not os.path.exists(KVM_PATH):
        return f"{KVM_PATH} is missing on this host"
    if not os.access(KVM_PATH, os.R_OK | os.W_OK):
        return f"{KVM_PATH} exists but is not readable and writable by this user"
    return None


def pytest_collection_modifyitems(config, items):
    reason = kvm_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


_kvm_ran = {"count": 0}


def pytest_runtest_logreport(report):
    if report.when == "call" and "kvm" in report.keywords and not report.skipped:
        _kvm_ran["count"] += 1


def pytest_sessionfinish(session, exitstatus):
    if session.config.getoption("collectonly", default=False):
        return
    if kvm_unavailable_reason() is not None:
        return
    if session.testscollected and _kvm_ran["count"] == 0 and exitstatus in (0, 5):
        if os.environ.get("XEND_LITE_REQUIRE_KVM") == "1":
            session.exitstatus = 1
            tr = session.config.pluginmanager.get_plugin("terminalreporter")
            if tr is not None:
                tr.write_line(f"FAILED: {KVM_PATH} is present but no KVM test ran", red=True)


pytest_plugins = ["tests.guestbuild", "tests.realguests"]
