"""Offline sharding: video manifests -> WebDataset tar shards + DALI index + manifest + quarantine."""

__version__ = "1.0.0"
