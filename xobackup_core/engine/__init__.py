"""The backup engine: runs jobs, writes Xen Orchestra-compatible backup repositories."""
