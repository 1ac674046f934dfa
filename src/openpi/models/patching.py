"""Activation patching, exact and batched: many patched runs of one observation in one jitted call.

A *patch point* is a stream of one expert at every layer and token:

  expert 0 (the prefix pass, once per inference)  — "residual" (entering the layer), "attn_out", "mlp_out"
                                                    over the prefix tokens [Tp];
  expert 1 (every denoising step)                 — the same three over the suffix tokens [Ts], and "kv": the
                                                    cached keys and values of the prefix tokens as expert 1 reads
                                                    them at that step and layer [Tp] (the only way the prefix, and
                                                    so the prompt, reaches the action expert).

`weights` holds one float array per point (key `"<expert>/<point>"`): expert 0 [N, L, Tp], expert 1 [N, S, L, Ts],
"1/kv" [N, S, L, Tp]; row n is one patched run. Each stream becomes ``x * (1 - w) + source * w`` at its layer,
tokens (and step): w = 1 gives the source run's value exactly, w = 0 leaves the run's own value exactly, so patching
nothing reproduces the run and patching everything reproduces the source bit for bit. The same weights at batch one,
differentiated at w = 0, give attribution patching (`attribution`): d score / d w = grad · (source - run).

`record` runs one observation and returns its actions and every point's values (the sources of a patch);
`patched_actions` runs N patched copies in one program (a new N or point set compiles once; new values do not).
An `Intervention` (e.g. a knockout) may be applied to every run beneath the patches.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from openpi.models import layer_edits
from openpi.models import model as _model
from openpi.models import suffix as _suffix
from openpi.models.intervention import Intervention
from openpi.models.intervention_kinds import pytree_dataclass
from openpi.models.sampling import make_attn_mask
from openpi.models.taps import Tap

if TYPE_CHECKING:
    from openpi.models.pi0 import Pi0

STREAM_POINTS = ("residual", "attn_out", "mlp_out")
POINTS = tuple(f"0/{p}" for p in STREAM_POINTS) + tuple(f"1/{p}" for p in (*STREAM_POINTS, "kv"))


def point_expert(point: str) -> int:
    return int(point[0])


@pytree_dataclass(data=("weights", "sources", "inner"))
class SiteMix:
    """The `layer_edits` hooks of one Gemma call: mix each weighted stream toward its source, after `inner`'s edits.

    weights[key] [N, L, T] (this call's rows, layers, tokens); sources[key] [L, T, *f] (one source run)."""

    weights: dict
    sources: dict
    inner: layer_edits.LayerEdits | None

    def edit_stream(self, stream: str, expert: int, x: jax.Array, layer: jax.Array) -> jax.Array:
        x = layer_edits.edit_stream(self.inner, stream, expert, x, layer)
        key = f"{expert}/{stream}"
        if key not in self.weights:
            return x
        w = self.weights[key][:, layer].astype(x.dtype)[..., None]
        return x * (1 - w) + self.sources[key][layer].astype(x.dtype)[None] * w

    def knock_out(self, mask: jax.Array, layer: jax.Array, num_kv_heads: int) -> jax.Array:
        return layer_edits.knock_out(self.inner, mask, layer, num_kv_heads)


def _rows(x: jax.Array, n: int) -> jax.Array:
    return jnp.broadcast_to(x, (n, *x.shape[1:]))


def _mix_cache(x, source, w):
    """A cache half x [L, n, Tp, K, H] toward source [L, 1, Tp, K, H] by w [n, L, Tp]."""
    w = jnp.swapaxes(w, 0, 1)[..., None, None].astype(x.dtype)
    return x * (1 - w) + source.astype(x.dtype) * w


def weight_shape(config, point: str, num_steps: int) -> tuple[int, ...]:
    """The shape of one row of `point`'s weights: expert 0 [L, Tp]; expert 1 [S, L, Ts]; "1/kv" [S, L, Tp]."""
    if point not in POINTS:
        raise ValueError(f"Unknown patch point {point!r}: use one of {POINTS}.")
    if point_expert(point) == 0:
        return (config.depth, config.prefix_len)
    return (num_steps, config.depth, config.prefix_len if point == "1/kv" else config.suffix_len)


def _run(model: Pi0, observation, noise, *, num_steps, n, intervention, taps, weights, sources, run_kv):
    """One sampling run of n rows (the observation has batch one). Returns (actions [n, H, A], prefix captures,
    kv cache, step captures)."""
    cfg = model.config
    params = {"params": model.params["PaliGemma"]["llm"]}
    obs = _model.preprocess_observation(None, observation, train=False)
    tokens, prefix_mask, prefix_ar = model.embed_prefix(obs)
    prefix_mask = _rows(prefix_mask, n)
    taps0 = tuple(Tap(f"0/{p}", p, 0) for p in STREAM_POINTS) if taps else ()
    taps1 = tuple(Tap(f"1/{p}", p, 1) for p in STREAM_POINTS) if taps else ()
    base0 = None if intervention is None else layer_edits.for_prefix(intervention, cfg, prefix_mask)
    counted = layer_edits.position_mask(intervention, cfg.layout, prefix_mask)  # as `sampling.sample_jit` counts
    caps0 = {}
    if run_kv is None:
        w0 = {k: v for k, v in weights.items() if point_expert(k) == 0}
        edits0 = SiteMix(w0, {k: sources[k] for k in w0}, base0) if w0 else base0
        positions = jnp.cumsum(counted, axis=1) - 1
        _, kv, caps0 = cfg.llm(taps0).apply(
            params, [_rows(tokens, n), None], positions, make_attn_mask(prefix_mask, prefix_ar), edits=edits0
        )
    else:  # expert-0 weights are all zero: the run's own cache, recorded once
        kv = tuple(jnp.broadcast_to(c, (c.shape[0], n, *c.shape[2:])) for c in run_kv)
    state = _rows(obs.state, n)
    prefix_cols = jnp.broadcast_to(prefix_mask[:, None, :], (n, cfg.suffix_len, prefix_mask.shape[1]))
    positions_base = jnp.sum(counted, axis=-1)[:, None]
    llm1 = cfg.llm(taps1)
    dt = -1.0 / num_steps
    w1 = {k: v for k, v in weights.items() if point_expert(k) == 1 and k != "1/kv"}

    def step(carry, step_index):
        x_t, t = carry
        time = jnp.broadcast_to(t, (n,))
        if cfg.pi05:
            suffix_tokens, suffix_mask, suffix_ar = _suffix.embed_suffix_pi05(model.params, x_t)
        else:
            suffix_tokens, suffix_mask, suffix_ar = _suffix.embed_suffix_pi0(model.params, state, x_t, time)
        base1 = None
        if intervention is not None:
            base1 = layer_edits.for_denoise_step(intervention, cfg, step_index, num_steps, suffix_mask)
        ws = {k: v[:, step_index] for k, v in w1.items()}
        edits1 = SiteMix(ws, {k: sources[k][step_index] for k in ws}, base1) if ws else base1
        cache = kv
        if "1/kv" in weights:
            w = weights["1/kv"][:, step_index]
            cache = tuple(_mix_cache(c, s, w) for c, s in zip(kv, sources["1/kv"], strict=True))
        (_, out), _, caps = llm1.apply(
            params,
            [None, suffix_tokens],
            positions_base + jnp.cumsum(suffix_mask, axis=-1) - 1,
            jnp.concatenate([prefix_cols, make_attn_mask(suffix_mask, suffix_ar)], axis=-1),
            kv_cache=cache,
            adarms_cond=[None, model.adarms_cond(time)],
            edits=edits1,
        )
        v_t = _suffix.linear(model.params["action_out_proj"], out[:, -cfg.action_horizon :])
        return (x_t + dt * v_t, t + dt), caps

    init = (_rows(noise, n), jnp.array(1.0, jnp.float32))
    (x_0, _), caps1 = jax.lax.scan(step, init, jnp.arange(num_steps))
    return x_0, caps0, kv, caps1


@functools.partial(jax.jit, static_argnames=("num_steps", "rows"))
def record(
    model: Pi0, observation, noise, *, num_steps: int, intervention: Intervention | None = None, rows: int = 1
) -> dict:
    """One run: ``actions`` [1, H, A] and ``sources``: every point's values, "0/<p>" [L, Tp, W0], "1/<p>"
    [S, L, Ts, W1], "1/kv" (keys, values) each [L, 1, Tp, K, H] (the patch sources of `patched_actions`), plus
    ``prefix_mask`` [1, Tp]. `rows`: computed as that many identical rows (row 0 returned), so that its numbers are
    bit for bit those of a `patched_actions` row at the same batch (XLA's matmuls may round differently per batch)."""
    actions, caps0, kv, caps1 = _run(
        model, observation, noise, num_steps=num_steps, n=rows, intervention=intervention, taps=True, weights={},
        sources={}, run_kv=None,
    )  # fmt: skip
    sources = {k: v[:, 0] for k, v in caps0.items()}
    sources |= {k: v[:, :, 0] for k, v in caps1.items()}
    sources["1/kv"] = tuple(c[:, :1] for c in kv)
    actions = actions[:1]
    obs = _model.preprocess_observation(None, observation, train=False)
    return {"actions": actions, "sources": sources, "prefix_mask": model.embed_prefix(obs)[1]}


@functools.partial(jax.jit, static_argnames=("num_steps", "reuse_prefix"))
def patched_actions(
    model: Pi0, observation, noise, weights: dict, sources: dict, run_kv=None, *, num_steps: int,
    intervention: Intervention | None = None, reuse_prefix: bool = False,
) -> jax.Array:  # fmt: skip
    """[N, H, A]: the run of `observation` / `noise` (batch one) with row n's `weights` mixing in `sources` (a
    `record` of the source run). `reuse_prefix=True` (every expert-0 weight zero, none passed) reads `run_kv`, the
    run's own recorded cache, instead of recomputing the prefix pass N times."""
    n = next(iter(weights.values())).shape[0]
    return _run(
        model, observation, noise, num_steps=num_steps, n=n, intervention=intervention, taps=False, weights=weights,
        sources=sources, run_kv=run_kv if reuse_prefix else None,
    )[0]  # fmt: skip


def transfer(actions, source_actions, run_actions, dims: int | None = None):
    """How far each patched run moved from the run's own action toward the source's: 1 - |a - a_src| / |a_run - a_src|
    (Frobenius norms over the chunk [H, dims]); 1 = the source's action, 0 = the run's own. `dims`: the leading
    action dims compared (None: all)."""
    d = slice(None) if dims is None else slice(0, dims)
    gap = jnp.linalg.norm((run_actions - source_actions)[..., d].reshape(-1))
    moved = jnp.linalg.norm((actions - source_actions)[..., d].reshape(actions.shape[0], -1), axis=-1)
    return 1.0 - moved / gap


@functools.partial(jax.jit, static_argnames=("num_steps", "dims"))
def attribution(
    model: Pi0, observation, noise, sources: dict, source_actions, run_actions, *, num_steps: int,
    intervention: Intervention | None = None, dims: int | None = None,
) -> dict:  # fmt: skip
    """Attribution patching: the gradient of `transfer` at w = 0 with respect to every point's weight, one forward
    and one backward pass. Returns per point [L, Tp] / [S, L, Ts] / [S, L, Tp] (the linear estimate of patching
    token by token; a site's estimate is the sum over its tokens, steps and layers)."""
    zeros = {p: jnp.zeros((1, *weight_shape(model.config, p, num_steps))) for p in POINTS}

    def score(weights):
        actions = patched_actions(
            model, observation, noise, weights, sources, num_steps=num_steps, intervention=intervention
        )
        return transfer(actions, source_actions, run_actions, dims)[0]

    return {k: v[0] for k, v in jax.grad(score)(zeros).items()}
