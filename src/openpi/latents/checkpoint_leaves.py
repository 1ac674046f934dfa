"""The two checkpoint leaves the text metrics need: the token embedding and expert 0's final-norm scale.

Text reconstruction and the logit lens (design.md section 6.1) decode states with ``PaliGemma/llm/embedder/
input_embedding`` [V, W] and ``PaliGemma/llm/final_norm/scale`` [W]. Restoring a whole pi0 checkpoint for them would
read ~3.5 B parameters; :func:`read_checkpoint_leaves` opens only these two arrays with tensorstore.

On-disk layout (spec/pi0.md section 12): orbax writes one zarr (v2, or v3 when ``_METADATA`` says ``use_zarr3``)
array per leaf under the key ``params.<dot.joined.path>`` inside an OCDBT kvstore (``manifest.ocdbt``), or as plain
directories ``params.<path>/`` in older non-OCDBT checkpoints. nnx-style checkpoints end every path in ``.value``.

Where the embedding comes from is decided by the run manifest (:func:`token_embedding_for_manifest`):

* ``checkpoint`` is a local directory or a URL: read the two leaves (a URL is read from the download cache when
  ``maybe_download`` already copied it there, else streamed with tensorstore).
* ``checkpoint`` is ``"random(seed=N)"`` (the tiny preset without weights): the params are re-created from the
  preset's config and that seed, exactly as the collection did, and the two leaves are taken from them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

EMBEDDING_PATH = ("PaliGemma", "llm", "embedder", "input_embedding")
FINAL_NORM_PATH = ("PaliGemma", "llm", "final_norm", "scale")
_RANDOM_RE = re.compile(r"^random\(seed=(-?\d+)\)$")

__all__ = [
    "TokenEmbedding",
    "read_checkpoint_leaves",
    "token_embedding_for_manifest",
    "token_embedding_from_preset",
]


@dataclasses.dataclass(frozen=True)
class TokenEmbedding:
    """Expert 0's token embedding (float32 [V, W], tied with the output head) and final RMSNorm scale ([W]).

    ``source`` says where they were read from (a checkpoint path or ``preset:<name> random(seed=N)``).
    """

    embedding: np.ndarray
    final_norm_scale: np.ndarray
    source: str

    @property
    def vocab_size(self) -> int:
        return int(self.embedding.shape[0])

    @property
    def width(self) -> int:
        return int(self.embedding.shape[1])


def _leaf_keys(params_dir: pathlib.Path) -> tuple[dict[tuple[str, ...], str], bool]:
    """{leaf path without "params"/"value": stored key} and use_zarr3, from the checkpoint's ``_METADATA``."""
    meta_path = params_dir / "_METADATA"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{params_dir} is not an orbax params checkpoint (no _METADATA); pass <checkpoint>/params or the "
            "checkpoint root holding params/."
        ) from None
    tree = meta.get("tree_metadata", {})
    out = {}
    for key_text in tree:
        try:
            parts = tuple(str(p) for p in json.loads(key_text.replace("(", "[").replace(")", "]").replace("'", '"')))
        except ValueError:
            continue
        path = parts[1:] if parts and parts[0] == "params" else parts
        stripped = path[:-1] if path and path[-1] == "value" else path
        out[stripped] = ".".join(parts)
    return out, bool(meta.get("use_zarr3", False))


def _open_leaf(params_dir: pathlib.Path | str, key: str, zarr3: bool, ocdbt: bool):
    import tensorstore as ts

    base = str(params_dir)
    base = base if "://" in base else f"file://{pathlib.Path(base).resolve()}"
    if ocdbt:
        kvstore: Any = {"driver": "ocdbt", "base": base, "path": key}
    else:
        kvstore = f"{base.rstrip('/')}/{key}/"
    return ts.open({"driver": "zarr3" if zarr3 else "zarr", "kvstore": kvstore}, read=True).result()


def _params_dir(checkpoint: str | pathlib.Path) -> pathlib.Path | str:
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


@functools.lru_cache(maxsize=2)
def read_checkpoint_leaves(checkpoint: str | pathlib.Path) -> TokenEmbedding:
    """Reads only the embedding and final-norm leaves of an openpi checkpoint (root, ``params/`` or a URL).

    Returns float32 arrays (bf16 checkpoints are upcast). Raises FileNotFoundError / KeyError naming the path and the
    leaves it has when the layout is not an openpi pi0 params checkpoint. Cached (two entries) per checkpoint string.
    """
    params_dir = _params_dir(checkpoint)
    if isinstance(params_dir, str):  # remote, not cached: tensorstore streams the two leaves
        keys = {p: "params." + ".".join(p) for p in (EMBEDDING_PATH, FINAL_NORM_PATH)}
        zarr3, ocdbt = False, True
    else:
        keys, zarr3 = _leaf_keys(params_dir)
        ocdbt = (params_dir / "manifest.ocdbt").exists()
    out = []
    for path in (EMBEDDING_PATH, FINAL_NORM_PATH):
        if path not in keys:
            llm = sorted("/".join(p) for p in keys if p[:2] == ("PaliGemma", "llm") and len(p) <= 4)[:12]
            raise KeyError(f"{params_dir}: no leaf {'/'.join(path)}; PaliGemma/llm leaves include {llm}.")
        arr = _open_leaf(params_dir, keys[path], zarr3, ocdbt)
        out.append(np.asarray(arr.read().result()).astype(np.float32))
    return TokenEmbedding(out[0], out[1], str(checkpoint))


@functools.lru_cache(maxsize=2)
def token_embedding_from_preset(preset: str, param_seed: int | None = None) -> TokenEmbedding:
    """The two leaves of a preset's random-weight model (``get_preset(preset).model_config.create(key(seed))``).

    This is what ``create_trained_policy`` builds when the preset has no checkpoint, so the leaves equal the ones the
    collection ran with. Creates the whole (tiny) model once; use only for presets meant to run without weights.
    """
    import jax

    from openpi.policies import policy_config

    p = policy_config.get_preset(preset)
    seed = p.param_seed if param_seed is None else int(param_seed)
    params = p.model_config.create(jax.random.key(seed)).params
    leaf = params
    for k in EMBEDDING_PATH:
        leaf = leaf[k]
    emb = np.asarray(leaf, np.float32)
    scale = params
    for k in FINAL_NORM_PATH:
        scale = scale[k]
    return TokenEmbedding(emb, np.asarray(scale, np.float32), f"preset:{preset} random(seed={seed})")


def token_embedding_for_manifest(manifest: Mapping[str, Any]) -> TokenEmbedding:
    """The embedding leaves of the checkpoint a collection recorded in its manifest (see the module docstring).

    Raises ValueError with the reason when the manifest names no usable checkpoint.
    """
    checkpoint = manifest.get("checkpoint")
    if not checkpoint:
        raise ValueError("the run manifest records no checkpoint; pass the embedding explicitly")
    m = _RANDOM_RE.match(str(checkpoint))
    if m:
        preset = manifest.get("preset")
        if not preset:
            raise ValueError(f"manifest checkpoint {checkpoint!r} needs a preset name to re-create the params")
        return token_embedding_from_preset(str(preset), int(m.group(1)))
    return read_checkpoint_leaves(str(checkpoint))
