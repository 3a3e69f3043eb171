"""xobackup: back up XCP-ng and Citrix Hypervisor VMs, compatible with Xen Orchestra remotes."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("xobackup-core")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
