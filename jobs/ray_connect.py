"""Moved to pipeline.runtime; this alias goes once jobs.probe imports from there."""

from pipeline.runtime import connect_ray, start_local_ray

__all__ = ["connect_ray", "start_local_ray"]
