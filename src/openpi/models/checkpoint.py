"""Reading single leaves of an openpi params checkpoint without restoring the whole tree.

Restoring a whole pi0 checkpoint (:func:`openpi.models.model.restore_params`) reads ~3.5 B parameters; a tool that
needs one or two arrays (the token embedding, a norm scale) opens just those with tensorstore.

On-disk layout (what orbax writes for openpi's checkpoints): one zarr array per leaf (zarr v2, or v3 when
``_METADATA`` says ``use_zarr3``) under the key ``params.<dot.joined.path>`` inside an OCDBT kvstore
(``manifest.ocdbt``), or as plain directories ``params.<path>/`` in older non-OCDBT checkpoints. nnx-style
checkpoints end every leaf path in ``.value``; the paths given here leave that suffix out.

Imports numpy only at module level (tensorstore and the download cache are imported when a leaf is read).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["params_dir", "read_leaves"]

LeafPath = tuple[str, ...]


def _leaf_keys(directory: pathlib.Path) -> tuple[dict[LeafPath, str], bool]:
    """{leaf path without "params"/"value": stored key} and use_zarr3, from the checkpoint's ``_METADATA``."""
    try:
        meta = json.loads((directory / "_METADATA").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{directory} is not an orbax params checkpoint (no _METADATA); pass <checkpoint>/params or the "
            "checkpoint root holding params/."
        ) from None
    out = {}
    for key_text in meta.get("tree_metadata", {}):
        try:
            parts = tuple(str(p) for p in json.loads(key_text.replace("(", "[").replace(")", "]").replace("'", '"')))
        except ValueError:
            continue
        path = parts[1:] if parts and parts[0] == "params" else parts
        stripped = path[:-1] if path and path[-1] == "value" else path
        out[stripped] = ".".join(parts)
    return out, bool(meta.get("use_zarr3", False))


def _open_leaf(directory: pathlib.Path | str, key: str, zarr3: bool, ocdbt: bool):
    import tensorstore as ts

    base = str(directory)
    base = base if "://" in base else f"file://{pathlib.Path(base).resolve()}"
    if ocdbt:
        kvstore: Any = {"driver": "ocdbt", "base": base, "path": key}
    else:
        kvstore = f"{base.rstrip('/')}/{key}/"
    return ts.open({"driver": "zarr3" if zarr3 else "zarr", "kvstore": kvstore}, read=True).result()


def params_dir(checkpoint: str | pathlib.Path) -> pathlib.Path | str:
    """The ``params`` directory of a checkpoint (root, ``params/`` itself, or a URL); a URL already in the download
    cache resolves to the local copy, an uncached URL stays a string (tensorstore streams from it)."""
    text = str(checkpoint)
    if "://" in text:
        from openpi.shared import download

        cached = download.local_cache_path(text)
        if cached.exists():
            checkpoint = cached
        else:
            return text.rstrip("/") + ("" if text.rstrip("/").endswith("/params") else "/params")
    path = pathlib.Path(checkpoint).expanduser()
    return path / "params" if (path / "params").is_dir() else path


def read_leaves(checkpoint: str | pathlib.Path, paths: Sequence[LeafPath]) -> list[np.ndarray]:
    """The leaves at ``paths`` (e.g. ``("PaliGemma", "llm", "final_norm", "scale")``) of an openpi params checkpoint,
    as float32 numpy arrays (bf16 checkpoints are upcast), in the order given.

    Raises FileNotFoundError (no ``_METADATA``) or KeyError naming the missing leaf and some leaves the checkpoint has.
    """
    directory = params_dir(checkpoint)
    if isinstance(directory, str):  # remote, not cached: no _METADATA to list, the keys follow openpi's layout
        keys = {tuple(p): "params." + ".".join(p) for p in paths}
        zarr3, ocdbt = False, True
    else:
        keys, zarr3 = _leaf_keys(directory)
        ocdbt = (directory / "manifest.ocdbt").exists()
    out = []
    for path in map(tuple, paths):
        if path not in keys:
            near = sorted("/".join(p) for p in keys if p[:2] == path[:2] and len(p) <= 4)[:12]
            raise KeyError(f"{directory}: no leaf {'/'.join(path)}; {'/'.join(path[:2])} leaves include {near}.")
        arr = _open_leaf(directory, keys[path], zarr3, ocdbt)
        out.append(np.asarray(arr.read().result()).astype(np.float32))
    return out
