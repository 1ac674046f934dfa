"""Lazy nested Mappings over a latent store, shaped like the original pickle layout::

    task_data["episodes"]["episode_0"]["rollout_steps"]["step_15"]["expert_0_hidden_states"]  # one array read
    task_data["episodes"]["episode_0"]["metadata"]["success"]
    task_data["task_id"], task_data["task_name"], task_data["language"], task_data["suite"]

Listing keys never reads arrays (step keys ``step_{t}`` come from the episode attrs); indexing a step key reads that
one rollout step of that one key. Only complete episodes appear unless ``include_incomplete=True`` (then partial
episodes show their committed steps and ``metadata["complete"] == False``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol


# What the views read of an episode and of a store (`reader.EpisodeReader`, `reader.LatentStore` provide it; the
# reader builds the views, so the views name only this contract, not the reader).
class EpisodeReader(Protocol):
    path: Any
    step_t: list[int]

    @property
    def metadata(self) -> dict[str, Any]: ...
    def keys_at(self, step: int) -> list[str]: ...
    def read_step_value(self, key: str, step: int) -> Any: ...


class LatentStore(Protocol):
    def task_ids(self) -> list[int]: ...
    def task_info(self, task_id: int) -> dict[str, Any]: ...
    def episode(self, task_id: int, episode_index: int) -> EpisodeReader: ...
    def episode_indices(self, task_id: int, *, include_incomplete: bool = False) -> list[int]: ...
    def task_data(self, task_id: int, *, include_incomplete: bool = False) -> Mapping[str, Any]: ...


_TASK_SCALAR_KEYS = ("task_id", "task_name", "language", "suite")


class _LazyMapping(Mapping):
    def __repr__(self) -> str:
        keys = list(self)
        shown = ", ".join(repr(k) for k in keys[:6]) + (", ..." if len(keys) > 6 else "")
        return f"<{type(self).__name__} ({len(keys)} keys: {shown})>"


class StepView(_LazyMapping):
    """One rollout step: key -> numpy array (or str / numpy scalar), read from disk on each access."""

    def __init__(self, episode: EpisodeReader, step: int):
        self._episode = episode
        self._step = step
        self._keys = episode.keys_at(step)

    @property
    def episode(self) -> EpisodeReader:
        """The episode reader behind this step (field shapes and dims without reading arrays)."""
        return self._episode

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(f"step_{self._episode.step_t[self._step]} has no key {key!r}; keys are {self._keys}.")
        return self._episode.read_step_value(key, self._step)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class RolloutStepsView(_LazyMapping):
    """``step_{t}`` (env timestep t) -> :class:`StepView`, committed steps only, in rollout order."""

    def __init__(self, episode: EpisodeReader):
        self._episode = episode
        self._index = {f"step_{t}": i for i, t in enumerate(episode.step_t)}

    def __getitem__(self, key: str) -> StepView:
        try:
            return StepView(self._episode, self._index[key])
        except KeyError:
            raise KeyError(f"{self._episode.path}: no rollout step {key!r}; steps are {list(self._index)}.") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


class EpisodeView(_LazyMapping):
    """``{"metadata": dict, "rollout_steps": RolloutStepsView}``."""

    _KEYS = ("metadata", "rollout_steps")

    def __init__(self, episode: EpisodeReader):
        self._episode = episode

    def __getitem__(self, key: str) -> Any:
        if key == "metadata":
            return self._episode.metadata
        if key == "rollout_steps":
            return RolloutStepsView(self._episode)
        raise KeyError(f"episode view has keys {list(self._KEYS)}, not {key!r}.")

    def __iter__(self) -> Iterator[str]:
        return iter(self._KEYS)

    def __len__(self) -> int:
        return len(self._KEYS)


class EpisodesView(_LazyMapping):
    """``episode_{k}`` -> :class:`EpisodeView`."""

    def __init__(self, store: LatentStore, task_id: int, include_incomplete: bool):
        self._store = store
        self._task_id = task_id
        self._indices = store.episode_indices(task_id, include_incomplete=include_incomplete)
        self._names = {f"episode_{k}": k for k in self._indices}

    def __getitem__(self, key: str) -> EpisodeView:
        try:
            k = self._names[key]
        except KeyError:
            raise KeyError(f"task {self._task_id}: no episode {key!r}; episodes are {list(self._names)}.") from None
        return EpisodeView(self._store.episode(self._task_id, k))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class TaskData(_LazyMapping):
    """One task: ``task_id``, ``task_name``, ``language``, ``suite``, the caller's extra task attrs, ``episodes``."""

    def __init__(self, store: LatentStore, task_id: int, include_incomplete: bool):
        self._store = store
        self._task_id = task_id
        self._include_incomplete = include_incomplete
        info = store.task_info(task_id)
        self._scalars = {k: info[k] for k in _TASK_SCALAR_KEYS}
        self._scalars.update({k: v for k, v in info.items() if k not in self._scalars and k != "episodes"})

    @property
    def store(self) -> LatentStore:
        """The store this lazy view reads from."""
        return self._store

    @property
    def include_incomplete(self) -> bool:
        return self._include_incomplete

    def __getitem__(self, key: str) -> Any:
        if key == "episodes":
            return EpisodesView(self._store, self._task_id, self._include_incomplete)
        try:
            return self._scalars[key]
        except KeyError:
            raise KeyError(f"task {self._task_id}: no key {key!r}; keys are {list(self)}.") from None

    def __iter__(self) -> Iterator[str]:
        yield from self._scalars
        yield "episodes"

    def __len__(self) -> int:
        return len(self._scalars) + 1


class TasksView(_LazyMapping):
    """task_id (int) -> :class:`TaskData` for every task of the store."""

    def __init__(self, store: LatentStore, include_incomplete: bool):
        self._store = store
        self._include_incomplete = include_incomplete

    @property
    def store(self) -> LatentStore:
        """The store this lazy view reads from."""
        return self._store

    @property
    def include_incomplete(self) -> bool:
        return self._include_incomplete

    def __getitem__(self, task_id: int) -> TaskData:
        return self._store.task_data(task_id, include_incomplete=self._include_incomplete)

    def __iter__(self) -> Iterator[int]:
        return iter(self._store.task_ids())

    def __len__(self) -> int:
        return len(self._store.task_ids())
