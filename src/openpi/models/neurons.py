"""FFN neurons: steering / ablating individual ones, and the vocabulary projection of their value vectors.

Neuron i of an expert's layer l is feature i of the FFN hidden activations (the gated product gelu(x W_gate) *
(x W_up), stream "ffn_hidden", captured by `CaptureSpec(ffn=...)`); its *value vector* is row i of the down
projection W_down [mlp_dim, width]: what the neuron writes into the residual stream per unit of activation. The
vocabulary projection reads that row with the tied token embedding (PaliGemma's unembedding: logits = x E^T), as
published neuron-steering work on pi0 does, so its claims can be checked on the exact model (base weights; a LoRA
delta on the down projection is not included).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from openpi.models import intervention as _iv

if TYPE_CHECKING:
    from openpi.models.pi0 import Pi0


def _mlp_dim(model: Pi0, expert: int) -> int:
    cfg = model.config
    return (cfg.paligemma_config, cfg.action_expert_config)[expert].mlp_dim


def steer_neurons(model: Pi0, expert: int, tokens, layers, neurons, alpha=1.0, denoise_steps=None) -> _iv.Intervention:
    """Add `alpha` (a scalar, or one value per neuron) to the listed neurons' activations at `tokens` / `layers`."""
    neurons = [int(n) for n in np.atleast_1d(neurons)]
    vector = np.zeros(_mlp_dim(model, expert), np.float32)
    vector[neurons] = np.broadcast_to(np.asarray(alpha, np.float32), (len(neurons),))
    return _iv.steer(expert, tokens, layers, vector, 1.0, denoise_steps, stream="ffn_hidden")


def ablate_neurons(model: Pi0, expert: int, tokens, layers, neurons, denoise_steps=None) -> _iv.Intervention:
    """Zero the listed neurons' activations at `tokens` / `layers` (the other neurons untouched)."""
    del model
    return _iv.ablate(expert, tokens, layers, "zero", stream="ffn_hidden", denoise_steps=denoise_steps, neurons=neurons)


def value_vectors(model: Pi0, expert: int = 0) -> np.ndarray:
    """[L, mlp_dim, width] the down-projection rows (value vectors) of every layer."""
    layers = model.params["PaliGemma"]["llm"]["layers"]
    return np.asarray(layers["mlp" if expert == 0 else f"mlp_{expert}"]["linear"], np.float32)


def vocab_projection(
    model: Pi0, layer: int, *, expert: int = 0, neurons=None, top_k: int = 10, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [n, k], logits [n, k]): for each neuron (default all) of `layer`, the `top_k` tokens its value
    vector promotes most through the tied embedding, highest first. Computed `chunk` neurons at a time (a full-size
    layer's 16384 x 257152 logits would not fit at once)."""
    emb = jnp.asarray(model.params["PaliGemma"]["llm"]["embedder"]["input_embedding"], jnp.float32)
    rows = value_vectors(model, expert)[layer]
    if rows.shape[-1] != emb.shape[-1]:
        raise ValueError(
            f"Expert {expert}'s width {rows.shape[-1]} is not the embedding's {emb.shape[-1]}: its value vectors "
            "cannot be read with the tied embedding; use expert=0."
        )
    if neurons is not None:
        rows = rows[np.asarray(neurons)]
    ids, vals = [], []
    for start in range(0, len(rows), chunk):
        logits = jnp.asarray(rows[start : start + chunk]) @ emb.T
        v, i = jax.lax.top_k(logits, top_k)
        ids.append(np.asarray(i))
        vals.append(np.asarray(v))
    return np.concatenate(ids), np.concatenate(vals)

