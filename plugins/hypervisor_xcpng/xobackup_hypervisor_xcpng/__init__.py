"""XCP-ng and Citrix Hypervisor support for xobackup: the XAPI driver and an XAPI simulator.

The plugin's hooks live in :mod:`xobackup_hypervisor_xcpng.plugin`; the simulator, a real
XAPI-speaking HTTP server used by tests, benchmarks and ``xobackup demo``, lives in
:mod:`xobackup_hypervisor_xcpng.sim`.
"""
