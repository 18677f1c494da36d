"""The checkpoint store seam: the protocol, and the backends behind it."""

from cruzflow.server.store.base import Store, StoreError

__all__ = ["Store", "StoreError"]
