"""Fixtures of the XCP-ng plugin's tests: the XAPI simulator on free loopback ports."""

from xobackup_hypervisor_xcpng.sim.pytest_fixtures import xapi_sim, xapi_sim_session

__all__ = ["xapi_sim", "xapi_sim_session"]
