"""The two checkpoint leaves the text metrics need: the token embedding and expert 0's final-norm scale.

Text reconstruction and the logit lens decode states with ``PaliGemma/llm/embedder/input_embedding`` [V, W] and
``PaliGemma/llm/final_norm/scale`` [W]; :func:`read_checkpoint_leaves` opens only these two arrays
(:func:`openpi.models.checkpoint.read_leaves`), never the whole checkpoint.

Where the embedding comes from is decided by the run manifest (:func:`token_embedding_for_manifest`):

* ``checkpoint`` is a local directory or a URL: read the two leaves (a URL is read from the download cache when
  ``maybe_download`` already copied it there, else streamed with tensorstore).
* ``checkpoint`` is ``"random(seed=N)"`` (a preset run without weights): the params are re-created from the manifest's
  ``model_config`` (what ``Pi0Config.describe()`` wrote) and that seed, exactly as the collection did, and the two
  leaves are taken from them.

Model code is imported inside the functions that need it, so importing the analysis imports no model.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from openpi.latents.store.manifest import RunManifest

EMBEDDING_PATH = ("PaliGemma", "llm", "embedder", "input_embedding")
FINAL_NORM_PATH = ("PaliGemma", "llm", "final_norm", "scale")
_RANDOM_RE = re.compile(r"^random\(seed=(-?\d+)\)$")

__all__ = [
    "TokenEmbedding",
    "read_checkpoint_leaves",
    "token_embedding_for_manifest",
    "token_embedding_from_model_config",
]


@dataclasses.dataclass(frozen=True)
class TokenEmbedding:
    """Expert 0's token embedding (float32 [V, W], tied with the output head) and final RMSNorm scale ([W]).

    ``source`` says where they were read from (a checkpoint path or ``<model config> random(seed=N)``).
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


@functools.lru_cache(maxsize=2)
def read_checkpoint_leaves(checkpoint: str | pathlib.Path) -> TokenEmbedding:
    """Reads only the embedding and final-norm leaves of an openpi checkpoint (root, ``params/`` or a URL).

    Returns float32 arrays (bf16 checkpoints are upcast). Raises FileNotFoundError / KeyError naming the path and the
    leaves it has when the layout is not an openpi pi0 params checkpoint. Cached (two entries) per checkpoint string.
    """
    from openpi.models import checkpoint as _checkpoint

    emb, scale = _checkpoint.read_leaves(checkpoint, (EMBEDDING_PATH, FINAL_NORM_PATH))
    return TokenEmbedding(emb, scale, str(checkpoint))


@functools.lru_cache(maxsize=2)
def token_embedding_from_model_config(model_config: str, param_seed: int) -> TokenEmbedding:
    """The two leaves of a random-weight model: ``Pi0Config.from_description(model_config).init_params(key(seed))``.

    This is what a policy builds when its preset has no checkpoint, so the leaves equal the ones the collection ran
    with. Creates the whole model's params once; use only for (tiny) configs meant to run without weights.
    """
    import jax

    from openpi.models import pi0_config

    config = pi0_config.Pi0Config.from_description(model_config)
    params = jax.jit(config.init_params)(jax.random.key(int(param_seed)))
    leaves = []
    for path in (EMBEDDING_PATH, FINAL_NORM_PATH):
        leaf = params
        for k in path:
            leaf = leaf[k]
        leaves.append(np.asarray(leaf, np.float32))
    return TokenEmbedding(leaves[0], leaves[1], f"{model_config} random(seed={param_seed})")


def token_embedding_for_manifest(manifest: RunManifest | Mapping[str, Any]) -> TokenEmbedding:
    """The embedding leaves of the checkpoint a collection recorded in its manifest (see the module docstring).

    Raises ValueError with the reason when the manifest names no usable checkpoint.
    """
    manifest = RunManifest.of(manifest)
    checkpoint = manifest.checkpoint
    if not checkpoint:
        raise ValueError("the run manifest records no checkpoint; pass the embedding explicitly")
    m = _RANDOM_RE.match(str(checkpoint))
    if m:
        model_config = manifest.model_config
        if not model_config:
            raise ValueError(
                f"manifest checkpoint {checkpoint!r} needs the manifest's model_config (Pi0Config.describe()) to "
                "re-create the params; pass the embedding explicitly"
            )
        return token_embedding_from_model_config(str(model_config), int(m.group(1)))
    return read_checkpoint_leaves(str(checkpoint))
