"""Fixtures of the admin operations' tests: a fake clock, a paired topology and stores
in temporary files, from :mod:`labkit` (shared by the rooms' tests)."""

from labkit import clock, open_store, topology

__all__ = ["clock", "open_store", "topology"]
