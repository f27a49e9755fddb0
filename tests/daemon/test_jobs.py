"""Long snapshot jobs: progress events while a save or load runs, and query-snapshot-job
answered from the loop meanwhile."""

from __future__ import annotations

import asyncio

from tests.daemon.test_control import Events, call
from tests.daemon.conftest import wait_for


async def test_save_progress_and_job_while_it_runs(daemon):
    daemon.domain.slow_save = 1.2
    assert await call(daemon, "query-snapshot-job") == {"status": "none"}
    async with Events(daemon.client()) as ev:
        save = asyncio.create_task(call(daemon, "snapshot-save", {"path": "big.xls"}))
        await wait_for(lambda: daemon.controller.job is not None, what="the save to start")
        seen = []
        while not save.done():
            job = await call(daemon, "query-snapshot-job")
            status = (await call(daemon, "query-status"))["status"]
            if job["status"] == "active":
                seen.append((job, status))
            await asyncio.sleep(0.05)
        result = await save
        await wait_for(lambda: "SNAPSHOT_SAVED" in [e["event"] for e in ev.items])
    assert seen, "query-snapshot-job was never answered while the save ran"
    job, status = seen[-1]
    assert status == "saving" and job["kind"] == "save" and job["path"].endswith("big.xls")
    assert job["total"] == 4 and 0 <= job["bytes"] <= 4 and job["seconds"] > 0
    percents = [j["percent"] for j, _ in seen]
    assert percents == sorted(percents) and len(set(percents)) >= 2   # it moved
    progress = [e["data"] for e in ev.items if e["event"] == "SNAPSHOT_PROGRESS"]
    assert [p["percent"] for p in progress] == [25, 50, 75, 100]
    assert all(p["kind"] == "save" and p["total"] == 4 for p in progress)
    names = [e["event"] for e in ev.items]
    assert names.index("SNAPSHOT_PROGRESS") < names.index("SNAPSHOT_SAVED")
    assert await call(daemon, "query-snapshot-job") == {"status": "none"}
    assert result["path"].endswith("big.xls")


async def test_load_reports_its_start_and_end(daemon):
    await call(daemon, "snapshot-save", {"path": "a.xls"})
    async with Events(daemon.client()) as ev:
        await call(daemon, "snapshot-load", {"path": "a.xls"})
        await wait_for(lambda: "SNAPSHOT_LOADED" in [e["event"] for e in ev.items])
    progress = [e["data"] for e in ev.items if e["event"] == "SNAPSHOT_PROGRESS"]
    assert [p["kind"] for p in progress] == ["load", "load"]
    assert [p["percent"] for p in progress] == [0, 100]
    assert await call(daemon, "query-snapshot-job") == {"status": "none"}


async def test_a_failed_save_leaves_no_job(daemon):
    from xend_lite.cli.ctl import RpcError
    from xend_lite.errors import SnapshotError

    def failing(path, progress=None):
        progress(1, 4)
        raise SnapshotError("the disk is full")
    daemon.domain.snapshot_save = failing
    try:
        await call(daemon, "snapshot-save", {"path": "x.xls"})
    except RpcError as exc:
        assert exc.error_class == "SnapshotError"
    else:
        raise AssertionError("the save did not fail")
    assert await call(daemon, "query-snapshot-job") == {"status": "none"}
    assert (await call(daemon, "query-status"))["status"] == "running"
