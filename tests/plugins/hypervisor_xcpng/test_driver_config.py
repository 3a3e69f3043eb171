"""The driver reached the way the engine reaches it: a config file's server through the hook."""

from __future__ import annotations

import pytest
from xobackup_hypervisor_xcpng.driver import XapiDriver
from xobackup_hypervisor_xcpng.sim import Simulator

from xobackup_core.config import parse_config
from xobackup_core.errors import HypervisorError
from xobackup_core.plugins import Plugins


def _config(sim: Simulator, **server: object) -> dict[str, object]:
    return {
        "servers": {
            "lab": {
                "url": sim.pool(0).url,
                "password": sim.password,
                "timeout": "30s",
                "options": {"retry_delay": 0.01},
                **server,
            }
        }
    }


def test_config_server_gives_a_working_driver(xapi_sim: Simulator) -> None:
    config = parse_config(_config(xapi_sim))
    driver = Plugins().hypervisor(config.server_view("lab"))
    try:
        assert isinstance(driver, XapiDriver)
        assert driver.session.timeout == 30.0
        inventory = driver.inventory()
        assert inventory.pools[0].uuid == xapi_sim.pool(0).uuid
        assert len(inventory.vms) == 4
    finally:
        driver.close()
    # logged out: the simulator forgot the session
    assert not xapi_sim.pool(0).xapi.sessions


def test_bad_config_values_are_clear(xapi_sim: Simulator) -> None:
    plugins = Plugins()
    config = parse_config(_config(xapi_sim, url="ftp://example"))
    with pytest.raises(HypervisorError, match="not an http:// or https:// URL"):
        plugins.hypervisor(config.server_view("lab"))
    config = parse_config(_config(xapi_sim, options={"protocol": "soap"}))
    with pytest.raises(HypervisorError, match="protocol 'soap'"):
        plugins.hypervisor(config.server_view("lab"))
    config = parse_config(_config(xapi_sim, ca_file="/nonexistent/ca.pem"))
    with pytest.raises(HypervisorError, match="cannot load ca_file"):
        plugins.hypervisor(config.server_view("lab"))
