"""Offline sharding: video manifests -> WebDataset tar shards + DALI index + manifest + quarantine."""
