"""Can a VM that was suspended on one CPU resume on another host? (xo-backups.md §6)

XAPI's rule on resume: the same CPU vendor, and every feature bit the VM saw at boot
(``last_boot_CPU_flags``) present on the host. Feature sets are XAPI's dashed hex words; the
VM's words are compared one by one with the host's, padded or cut to the host's count, as
XAPI does. Replication with memory and the restore of a memory backup both check this
before they transfer anything, and name both CPUs when they refuse.
"""

from __future__ import annotations

from collections.abc import Mapping

from xobackup_core.hypervisor import CpuInfo


def missing_cpu_features(vm_features: str, host_features: str) -> str:
    """The feature bits a VM uses that a host lacks, in XAPI's dashed-hex form (``""`` when
    none), words aligned as XAPI does: the VM's words padded or cut to the host's count."""
    host_words = [int(w, 16) for w in host_features.split("-") if w.strip()]
    vm_words = [int(w, 16) for w in vm_features.split("-") if w.strip()]
    if not vm_words:
        return ""
    if not host_words:
        return "-".join(f"{w:08x}" for w in vm_words)
    vm_words = (vm_words + [0] * len(host_words))[: len(host_words)]
    missing = [v & ~h for v, h in zip(vm_words, host_words, strict=True)]
    return "-".join(f"{w:08x}" for w in missing) if any(missing) else ""


def describe_bits(mask: str) -> str:
    """``00000001-00000010`` → ``word 0 bit 0, word 1 bit 4`` (words as XAPI numbers them)."""
    bits = []
    for word, value in enumerate(int(w, 16) for w in mask.split("-") if w.strip()):
        bits += [f"word {word} bit {bit}" for bit in range(32) if value >> bit & 1]
    return ", ".join(bits)


def describe_cpu(cpu: CpuInfo | None, vendor: str = "") -> str:
    """``Intel(R) Xeon(R) ... (GenuineIntel)``, or the vendor alone when the model is unknown."""
    if cpu is None:
        return vendor or "unknown vendor"
    if cpu.model_name:
        return f"{cpu.model_name} ({cpu.vendor or vendor})"
    return cpu.vendor or vendor or "unknown vendor"


def host_features(cpu: CpuInfo) -> str:
    """The feature set XAPI checks an HVM guest against."""
    return cpu.features_hvm or cpu.features


def cpu_problem(vm_flags: Mapping[str, str], cpu: CpuInfo) -> str:
    """Why XAPI would refuse to resume a VM suspended with ``vm_flags`` on a host with
    ``cpu`` ("" if it would not): another vendor, or feature bits the host lacks (the VM's
    feature words are compared one by one, padded or cut to the host's count)."""
    problems = []
    vendor = vm_flags.get("vendor", "")
    if vendor and cpu.vendor and vendor != cpu.vendor:
        problems.append(f"the CPU vendors differ ({vendor} vs {cpu.vendor})")
    missing = missing_cpu_features(vm_flags.get("features", ""), host_features(cpu))
    if missing:
        problems.append(
            f"the host CPU lacks CPU features the VM uses: missing CPU features {missing} "
            f"({describe_bits(missing)})"
        )
    return "; ".join(problems)
