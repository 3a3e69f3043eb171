"""An XAPI simulator that speaks the real protocol, for tests, benchmarks and demos.

Pools of hosts on loopback answer XML-RPC and JSON-RPC with XAPI's encoding, stream
``/export``, ``/export_raw_vdi``, ``/import`` and ``/import_raw_vdi``, hold real (generated,
sparse) disk content, and can inject faults. See docs/simulator.md.

    with Simulator(pools=2, vms=10) as sim:
        url = sim.pool(0).url
"""

from xobackup_hypervisor_xcpng.sim.faults import Fault
from xobackup_hypervisor_xcpng.sim.simulator import SimPool, Simulator

__all__ = ["Fault", "SimPool", "Simulator"]
