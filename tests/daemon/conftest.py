"""Fixtures: a real daemon (in this process, on a temporary socket) driving a FakeDomain,
and a client for it."""

from __future__ import annotations

import asyncio
import os
import tempfile

import pytest

from tests.daemon.fakes import FakeDomain
from xend_lite.cli.ctl import Client
from xend_lite.daemon.config import build_config
from xend_lite.daemon.service import Daemon
from xend_lite.daemon.systemd import Notifier


@pytest.fixture
def short_tmp():
    """A short directory (Unix socket paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="xl-") as d:
        yield d


def make_config(tmp: str, **kw):
    kw.setdefault("socket", os.path.join(tmp, "ctl.sock"))
    kw.setdefault("snapshot_dir", os.path.join(tmp, "snap"))
    return build_config(**kw)


class Running:
    """A started daemon and what tests reach into."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.cfg = daemon.cfg

    @property
    def domain(self) -> FakeDomain:
        return self.daemon.controller.domain

    @property
    def controller(self):
        return self.daemon.controller

    def client(self, **kw) -> Client:
        return Client(self.cfg.socket, **kw)

    async def stop(self) -> None:
        self.daemon.request_exit(0, "test done")
        await self.daemon.stop()


@pytest.fixture
async def start_daemon(short_tmp):
    """start_daemon(**config) -> Running; every daemon is stopped at the end."""
    started: list[Running] = []

    async def start(factory=FakeDomain, env=None, **kw) -> Running:
        cfg = make_config(short_tmp, **kw)
        os.makedirs(cfg.snapshot_dir, exist_ok=True)
        d = Daemon(cfg, factory, notifier=Notifier(env or {}), env=dict(env or {}))
        try:
            await d.start()
        except BaseException:
            await d.stop()
            raise
        r = Running(d)
        started.append(r)
        return r

    yield start
    for r in started:
        await r.stop()


@pytest.fixture
async def daemon(start_daemon):
    return await start_daemon()


async def wait_for(pred, timeout: float = 5.0, what: str = "condition"):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
