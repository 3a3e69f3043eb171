"""pytest fixtures that run the simulator on free loopback ports.

Use from a conftest.py with ``pytest_plugins = ["xobackup_hypervisor_xcpng.sim.pytest_fixtures"]``
or import the fixtures. ``xapi_sim`` is a fresh simulator per test (faults and counters
cannot leak between tests); ``xapi_sim_session`` is shared by a whole session for read-only
tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from xobackup_hypervisor_xcpng.sim.simulator import Simulator


@pytest.fixture
def xapi_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    """One pool, two hosts, four VMs with 64 MiB disks; stopped after the test."""
    simulator = Simulator(
        pools=1,
        vms=4,
        hosts=2,
        disk_size=64 * 1024 * 1024,
        data_dir=tmp_path_factory.mktemp("xapi-sim"),
    )
    with simulator:
        yield simulator


@pytest.fixture(scope="session")
def xapi_sim_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    """Two pools of four VMs, shared by the session: do not change its state."""
    simulator = Simulator(
        pools=2,
        vms=4,
        hosts=2,
        disk_size=64 * 1024 * 1024,
        data_dir=tmp_path_factory.mktemp("xapi-sim-session"),
    )
    with simulator:
        yield simulator
