"""Free space on the output's filesystem: refuse a full disk at setup, warn when the size estimate does not fit."""

from __future__ import annotations

import pathlib
import shutil

from openpi.latents import schema

# Below this much free space the output's filesystem counts as full (a run could not even write its first episode).
MIN_FREE_BYTES = 1 << 20


class NoSpaceError(OSError):
    """The output's filesystem is full."""


def _existing_ancestor(path: pathlib.Path) -> pathlib.Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_not_full(output_dir: pathlib.Path) -> None:
    """Raises `NoSpaceError` naming the filesystem's path when it has less than `MIN_FREE_BYTES` free."""
    where = _existing_ancestor(output_dir)
    free = shutil.disk_usage(where).free
    if free < MIN_FREE_BYTES:
        raise NoSpaceError(
            f"No space left for --output-dir {output_dir}: the filesystem of {where} has {schema.format_bytes(free)} "
            "free. Free some space there or choose another --output-dir."
        )


def free_space_warning(output_dir: pathlib.Path, nbytes: int) -> str | None:
    """A warning when `nbytes` (a run's size estimate) exceeds the free space of `output_dir`'s filesystem."""
    where = _existing_ancestor(output_dir)
    free = shutil.disk_usage(where).free
    if nbytes <= free:
        return None
    return (
        f"the estimated size {schema.format_bytes(nbytes)} exceeds the {schema.format_bytes(free)} free on the "
        f"filesystem of {where}; the run may stop when the disk is full (the estimate is an uncompressed upper "
        "bound). Free some space, choose another --output-dir, or record fewer episodes or less (--capture.*)."
    )
