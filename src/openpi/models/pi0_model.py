"""pi0: a PaliGemma VLM (expert 0) and an action expert (expert 1) sharing attention, sampling actions by flow matching.

Numerics and parameter layout are upstream openpi's (shared/spec/pi0.md); the fixture tests prove it. On top of the
plain model this module can return what happens inside, by construction: `infer_with_latents` compiles the captures a
`CaptureSpec` asks for (reduced on device) into the same jitted program as the sampling loop (`sampling`).

Time convention (upstream's): t = 1 is noise, t = 0 is data; Euler steps with dt = -1/num_steps.

pi0.5 is the same model with `Pi0Config(pi05=True)` (shared/spec/pi05.md): no state token, and the time enters as
the condition of the action expert's adaptive norms (`adarms_cond`; `openpi.models.suffix`, `openpi.models.adarms`).

pi0 decodes nothing autoregressively: the "AR process" of the seed plan is the single prefix pass over image and text
tokens, which fills the KV cache once; only the action expert runs in each denoising step.

`Pi0` is the `family.Model` of pi0 / pi0.5; `openpi.models.pi0` re-exports it with `Pi0Config` (which creates it:
this module does not import the config).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import einops
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from openpi.models import model as _model
from openpi.models import suffix as _suffix
from openpi.models.capture import CaptureSpec
from openpi.models.family import ModelConfig
from openpi.models.intervention import Intervention
from openpi.models.layout import TokenLayout
from openpi.models.sampling import STEP_KEYS, check_x_t_sequence, euler_times, make_attn_mask, mean_weights, sample_jit
from openpi.models.taps import Analysis, Tap, hidden_state_taps

__all__ = ["Pi0", "make_attn_mask", "posemb_sincos"]


posemb_sincos = _suffix.posemb_sincos
_linear = _suffix.linear


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"], meta_fields=["config"])
@dataclasses.dataclass(frozen=True)
class Pi0:
    """The model: `params` (a pure nested dict, upstream layout) and its static `config`. A JAX pytree."""

    params: dict[str, Any]
    config: ModelConfig  # a `Pi0Config`

    @property
    def layout(self) -> TokenLayout:
        """Where each camera's image tokens, the text, the state and the actions are (`layout.TokenLayout`)."""
        return self.config.layout

    def embed(self, obs: _model.Observation):
        """The observation's tokens (`family.Model.embed`): pi0's prefix (`embed_prefix`)."""
        return self.embed_prefix(obs)

    # ------------------------------------------------------------------------------------------------ embeddings
    def embed_prefix(
        self, obs: _model.Observation
    ) -> tuple[Float[Array, "b tp d"], Bool[Array, "b tp"], Bool[Array, " tp"]]:
        """[camera tokens (256 each, IMAGE_KEYS order) | text embeddings]; all prefix tokens attend bidirectionally."""
        tokens, masks = [], []
        img = self.config.img()
        for name in _model.IMAGE_KEYS:
            image_tokens, _ = img.apply({"params": self.params["PaliGemma"]["img"]}, obs.images[name])
            tokens.append(image_tokens)
            masks.append(einops.repeat(obs.image_masks[name], "b -> b s", s=image_tokens.shape[1]))
        if obs.tokenized_prompt is not None:
            llm = self.config.llm()
            tokens.append(llm.apply({"params": self.params["PaliGemma"]["llm"]}, obs.tokenized_prompt, method="embed"))
            masks.append(obs.tokenized_prompt_mask)
        tokens = jnp.concatenate(tokens, axis=1)
        input_mask = jnp.concatenate(masks, axis=1)
        return tokens, input_mask, jnp.zeros(input_mask.shape[1], dtype=bool)

    def embed_suffix(
        self, obs: _model.Observation, noisy_actions: Float[Array, "b h a"], timestep: Float[Array, " b"]
    ) -> tuple[Float[Array, "b ts d"], Bool[Array, "b ts"], Bool[Array, " ts"]]:
        """pi0: [state token | action_time_mlp(action_in_proj(x_t), posemb(t))]; pi0.5: action_in_proj(x_t) only
        (the time goes to `adarms_cond`)."""
        if self.config.pi05:
            return _suffix.embed_suffix_pi05(self.params, noisy_actions)
        return _suffix.embed_suffix_pi0(self.params, obs.state, noisy_actions, timestep)

    def adarms_cond(self, timestep: Float[Array, " b"]) -> Float[Array, "b w1"] | None:
        """pi0.5: the condition of the action expert's adaptive norms at time t; pi0: None."""
        return _suffix.adarms_condition_pi05(self.params, timestep) if self.config.pi05 else None

    # ------------------------------------------------------------------------------------------------ training loss
    def _loss_pass(self, rng, observation, actions, *, train: bool, taps=(), key_groups=None, noise=None, time=None):
        """The joint training pass. `noise` / `time` override the draws from `rng` (tests use the fixture's)."""
        preprocess_rng, noise_rng, time_rng = jax.random.split(rng, 3)
        obs = _model.preprocess_observation(preprocess_rng, observation, train=train)
        batch_shape = actions.shape[:-2]
        if noise is None:
            noise = jax.random.normal(noise_rng, actions.shape)
        if time is None:
            time = jax.random.beta(time_rng, 1.5, 1, batch_shape) * 0.999 + 0.001
        t = time[..., None, None]
        x_t = t * noise + (1 - t) * actions
        u_t = noise - actions

        prefix_tokens, prefix_mask, prefix_ar = self.embed_prefix(obs)
        suffix_tokens, suffix_mask, suffix_ar = self.embed_suffix(obs, x_t, time)
        input_mask = jnp.concatenate([prefix_mask, suffix_mask], axis=1)
        attn_mask = make_attn_mask(input_mask, jnp.concatenate([prefix_ar, suffix_ar], axis=0))
        positions = jnp.cumsum(input_mask, axis=1) - 1
        groups = None if key_groups is None else key_groups(prefix_mask, suffix_mask)
        llm = self.config.llm(taps)
        (_, suffix_out), _, captures = llm.apply(
            {"params": self.params["PaliGemma"]["llm"]},
            [prefix_tokens, suffix_tokens],
            positions,
            attn_mask,
            key_groups=groups,
            adarms_cond=[None, self.adarms_cond(time)],
        )
        v_t = _linear(self.params["action_out_proj"], suffix_out[:, -self.layout.action_horizon :])
        loss = jnp.mean(jnp.square(v_t - u_t), axis=-1)
        return loss, captures, prefix_mask, suffix_mask

    def compute_loss(
        self, rng: jax.Array, observation: _model.Observation, actions: Float[Array, "b h a"], *, train: bool = False
    ) -> Float[Array, "b h"]:
        """Flow-matching loss per example and action step: mean over action dims of (v_t - u_t)^2."""
        return self._loss_pass(rng, observation, actions, train=train)[0]

    def compute_loss_with_extra(
        self, rng: jax.Array, observation: _model.Observation, actions: Float[Array, "b h a"], *, train: bool = False
    ) -> dict[str, Any]:
        """`compute_loss`'s joint pass (prefix and suffix together, no cache) plus what happens inside it.

        All `*_sum` entries are summed over the batch axis (so they can be accumulated over batches and divided by
        the number of examples). L = depth, Tp = prefix length, Ts = suffix_len (pi0: 1 + horizon; pi0.5:
        horizon), n = max_token_len, N = heads.

        * `loss_sum` — scalar: `compute_loss(...)` ([B, H]) summed over batch and action steps.
        * `expert_0_hidden_states_sum` [L, Tp, W0] — expert 0's residual stream entering each layer (l = 0 is the
          embedded prefix). `expert_1_hidden_states_sum` [L, Ts, W1] — the same for the action expert.
        * `hidden_states_sum` — both experts in token order: [L, Tp + Ts, W] if the widths agree, else the tuple
          (expert 0, expert 1).
        * `text_only_hidden_states_sum` [L, n, W0] — expert 0 at the text positions, with padding positions zeroed.
        * `post_attn_embedding_sum` — per expert (tuple), the residual stream after each layer's attention block
          (x + attention output, before the FFN): ([L, Tp, W0], [L, Ts, W1]).
        * `post_attn_sum` — per expert (tuple), each layer's attention output after the output projection, before
          the residual add: ([L, Tp, W0], [L, Ts, W1]).
        * `attention_score_sum` [L, N, G, G] — attention mass between token groups (`token_group_names`: each
          camera, text, then `config.suffix_segment_names`): entry [l, h, q, k] is the softmax probability mass
          that head h's queries of group q put on the valid keys of group k, averaged over the valid queries of
          group q. Rows sum to 1 (over k) for groups with valid queries, and are 0 for empty groups (the masked
          camera).
        * `text_representation` [L, B, n, N, head_dim] — per-head attention output (before the output projection)
          at the text positions, not summed.
        * `text_mask` [B, n] — which text positions hold real prompt tokens.
        """
        ts, n = self.layout.text_start, self.layout.max_token_len
        taps = (
            *hidden_state_taps(2),
            Tap("post_attn_residual_0", "post_attn_residual", 0),
            Tap("post_attn_residual_1", "post_attn_residual", 1),
            Tap("attn_out_0", "attn_out", 0),
            Tap("attn_out_1", "attn_out", 1),
            Tap("text_representation", "head_out", 0, (ts, ts + n)),
        )
        loss, caps, prefix_mask, suffix_mask = self._loss_pass(
            rng, observation, actions, train=train, taps=taps, key_groups=self._token_groups
        )
        text_mask = prefix_mask[:, ts : ts + n]
        # Average over the valid queries of each group: [B, G, T] weights on the query axis.
        query_weights = mean_weights(self._token_groups(prefix_mask, suffix_mask))
        scores = jnp.einsum("lbntg,bqt->lbnqg", caps["attention_mass"], query_weights)

        def batch_sum(x):
            return x.sum(axis=1)  # captures are [L, B, ...]

        text_states, _ = Analysis.get_text_only_hidden_states(caps, text_start=ts, text_len=n, input_mask=prefix_mask)
        hidden = Analysis.get_hidden_states(caps)
        return {
            "loss_sum": loss.sum(),
            "hidden_states_sum": tuple(map(batch_sum, hidden)) if isinstance(hidden, tuple) else batch_sum(hidden),
            "expert_0_hidden_states_sum": batch_sum(Analysis.get_expert_0_hidden_states(caps)),
            "expert_1_hidden_states_sum": batch_sum(Analysis.get_expert_1_hidden_states(caps)),
            "text_only_hidden_states_sum": batch_sum(text_states * text_mask[None, :, :, None]),
            "post_attn_embedding_sum": (
                batch_sum(caps["post_attn_residual_0"]),
                batch_sum(caps["post_attn_residual_1"]),
            ),
            "post_attn_sum": (batch_sum(caps["attn_out_0"]), batch_sum(caps["attn_out_1"])),
            "attention_score_sum": batch_sum(scores),
            "text_representation": caps["text_representation"],
            "text_mask": text_mask,
        }

    @property
    def token_group_names(self) -> tuple[str, ...]:
        return (*self.layout.segment_names, *self.layout.suffix_segment_names)

    def _token_groups(self, prefix_mask, suffix_mask) -> Bool[Array, "b g t"]:
        """Valid-token masks of each group (`token_group_names`) over the sequence [prefix | suffix].

        With `suffix_mask=None` only the prefix groups (each camera, text) over the prefix are returned.
        """
        tp = prefix_mask.shape[1]
        bounds = list(self.layout.prefix_group_bounds())
        bounds[-1] = (bounds[-1][0], tp)  # the text runs to the end of the prefix given
        if suffix_mask is None:
            full_mask = prefix_mask
        else:
            full_mask = jnp.concatenate([prefix_mask, suffix_mask], axis=1)
            bounds += [(tp, tp + 1), (tp + 1, full_mask.shape[1])]
        pos = jnp.arange(full_mask.shape[1])
        ranges = jnp.stack([(pos >= a) & (pos < b) for a, b in bounds])  # [G, T]
        return ranges[None] & full_mask[:, None, :]

    # ------------------------------------------------------------------------------------------------ sampling
    def sample_actions(
        self,
        rng: jax.Array,
        observation: _model.Observation,
        *,
        num_steps: int = 10,
        noise: Float[Array, "b h a"] | None = None,
        intervention: Intervention | None = None,
        x_t_sequence: Float[Array, "s b h a"] | None = None,
    ) -> Float[Array, "b h a"]:
        """Euler flow-matching from noise (t = 1) to actions (t = 0); normalized space, all action_dim dims.

        `intervention` (see `openpi.models.intervention`) edits streams / attention inside the same jitted program;
        it is checked against this model before compiling. New values of the same structure do not recompile.
        `x_t_sequence` [num_steps, B, H, A] teacher-forces the trajectory: denoising step i is fed x_t_sequence[i]
        instead of the carried x_t (e.g. another run's `x_t[:num_steps]`, so that only the prompt differs).
        """
        self._check_intervention(intervention, observation, num_steps)
        check_x_t_sequence(x_t_sequence, num_steps, observation, self.config)
        return sample_jit(
            self, rng, observation, num_steps=num_steps, noise=noise, capture=None, intervention=intervention,
            x_t_sequence=x_t_sequence,
        )["actions"]  # fmt: skip

    def infer_with_latents(
        self,
        rng: jax.Array,
        observation: _model.Observation,
        *,
        num_steps: int = 10,
        noise: Float[Array, "b h a"] | None = None,
        capture: CaptureSpec = CaptureSpec(),
        intervention: Intervention | None = None,
        x_t_sequence: Float[Array, "s b h a"] | None = None,
    ) -> dict[str, jax.Array]:
        """`sample_actions` plus the latents `capture` asks for, in one jitted call (the prefix is computed once).
        `x_t_sequence` [num_steps, B, H, A]: teacher forcing, as in `sample_actions` (the captured `x_t` are then
        the fed ones).

        Returns "actions" (identical to `sample_actions` for the same inputs and noise) and the keys of
        docs/INTERFACES.md: `expert_0_hidden_states` [L', B, Tp, W0] or `expert_0_segment_means` [L', B, cams+1, W0],
        `text_only_hidden_states` [L', B, n, W0] with `text_mask` [B, n] and `tokenized_prompt`, `segment_mask`
        [B, cams+1] (which cameras / the text hold valid tokens),
        `expert_1_hidden_states` [S', L', B, Ts, W1] or `expert_1_segment_means` [S', L', B, 2, W1]
        (`config.suffix_segment_names`), `attention_to_text` [S', L', B, heads, Ts], `denoise_times` [S'],
        `x_t` [S+1, B, H, A], `v_t` [S, B, H, A]; pi0.5 with `capture.modulation`: `expert_1_modulation`
        [S', L', B, 2, 3, W1] and `adarms_cond` [S', B, W1]; with `capture.final_norm`: `text_only_final_norm`
        [B, n, W0] (expert 0's output after its final norm at the text positions: the entry after the last layer).
        L' = captured layers (entry l = residual stream entering that layer), S' = captured denoising steps.
        With an `intervention`, the actions are `sample_actions(..., intervention=...)`'s and the captures show the
        edited streams.
        """
        capture.validate(depth=self.layout.depth, num_steps=num_steps)
        if capture.modulation and not self.config.pi05:
            raise ValueError("CaptureSpec.modulation: only pi0.5 (Pi0Config(pi05=True)) has adaptive norms to capture.")
        self._check_intervention(intervention, observation, num_steps)
        check_x_t_sequence(x_t_sequence, num_steps, observation, self.config)
        return sample_jit(
            self, rng, observation, num_steps=num_steps, noise=noise, capture=capture, intervention=intervention,
            x_t_sequence=x_t_sequence,
        )  # fmt: skip

    def _check_intervention(self, intervention, observation, num_steps: int) -> None:
        if intervention is None:
            return
        if not isinstance(intervention, Intervention):
            raise TypeError(
                f"intervention must be an openpi.models.intervention.Intervention (or None), got "
                f"{type(intervention).__name__}: build one with knockout_attention / patch / ablate / steer."
            )
        intervention.validate(self.layout, num_steps=num_steps, batch=observation.state.shape[0])

    def sample_actions_with_inference_steps(
        self,
        rng: jax.Array,
        observation: _model.Observation,
        *,
        num_steps: int = 10,
        noise: Float[Array, "b h a"] | None = None,
        capture: CaptureSpec = CaptureSpec.everything(),
        intervention: Intervention | None = None,
    ) -> dict[str, Any]:
        """The inference as a list of steps: `{"ar_process_steps", "flow_matching_steps", "final_action"}`.

        * `ar_process_steps` — pi0 has no autoregressive decoding: this is one entry, the prefix pass over image and
          text tokens (which fills the KV cache), holding the expert-0 captures (`expert_0_hidden_states` or
          `expert_0_segment_means`, `text_only_hidden_states`, `text_mask`).
        * `flow_matching_steps` — one entry per denoising step s: `t` (scalar), `x_t` [B, H, A] (the input of the
          step), `v_t` [B, H, A] (the predicted velocity), and for captured steps the expert-1 captures
          (`expert_1_hidden_states` [L', B, Ts, W1] or `expert_1_segment_means`, `attention_to_text`).
        * `final_action` [B, H, A] — x at t = 0, equal to `sample_actions`.
        """
        capture = dataclasses.replace(capture, trajectory=True)
        out = self.infer_with_latents(
            rng, observation, num_steps=num_steps, noise=noise, capture=capture, intervention=intervention
        )
        prefix_keys = ("expert_0_hidden_states", "expert_0_segment_means", "text_only_hidden_states", "text_mask")
        ar_step = {"kind": "prefix", **{k: out[k] for k in prefix_keys if k in out}}
        steps = capture.step_indices(num_steps)
        expert_1_keys = [k for k in STEP_KEYS if k in out]
        flow = []
        times = euler_times(num_steps)
        for s in range(num_steps):
            entry = {"step": s, "t": times[s], "x_t": out["x_t"][s], "v_t": out["v_t"][s]}
            if s in steps:
                entry.update({k: out[k][steps.index(s)] for k in expert_1_keys})
            flow.append(entry)
        return {"ar_process_steps": [ar_step], "flow_matching_steps": flow, "final_action": out["actions"]}
