"""Process memory tuning for long collections (the implementation is `openpi.shared.malloc`, which env worker
processes use too without importing the collection)."""

from openpi.shared.malloc import limit_malloc_arenas

__all__ = ["limit_malloc_arenas"]
