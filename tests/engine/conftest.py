"""Engine tests run real jobs against the XAPI simulator and real local remotes."""

from __future__ import annotations

import pytest

from xobackup_core.config import parse_config
from xobackup_core.engine.limits import LimitValues, PoolLimiter
from xobackup_core.engine.runner import JobRunner
from xobackup_core.logs.store import LogStore
from xobackup_core.plugins import Plugins


class Harness:
    """A config around one simulator, a log store, and a way to run jobs."""

    def __init__(self, tmp_path, sim):
        self.tmp_path = tmp_path
        self.sim = sim
        self.store = LogStore(tmp_path / "logs.sqlite")
        self.plugins = Plugins()

    def config(self, jobs, remotes=None, schedules=None, settings=None, limits=None):
        remotes = remotes if remotes is not None else {"nas": {"url": f"file://{self.remote_dir}"}}
        servers = {
            f"pool{i}": {
                "url": pool.url,
                "username": self.sim.username,
                "password": self.sim.password,
                "allow_unauthorized": True,
            }
            for i, pool in enumerate(self.sim.pools)
        }
        data = {"servers": servers, "remotes": remotes, "jobs": jobs}
        if schedules:
            data["schedules"] = schedules
        if settings:
            data["settings"] = settings
        if limits:
            data["limits"] = limits
        return parse_config(data)

    @property
    def remote_dir(self):
        return self.tmp_path / "remote"

    def run(self, config, job, schedule=None, limiter=None, clock=None):
        options = {"clock": clock} if clock is not None else {}
        runner = JobRunner(
            config,
            self.plugins,
            self.store,
            limiter=limiter or PoolLimiter(LimitValues()),
            **options,
        )
        try:
            return runner.run(job, schedule)
        finally:
            runner.close()


@pytest.fixture
def harness(tmp_path, xapi_sim):
    h = Harness(tmp_path, xapi_sim)
    yield h
    h.store.close()
