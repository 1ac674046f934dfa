"""The model-family seam: what capture, interventions, the policy, the collection and the analysis may ask of a model
and of its config, so that a new family (pi0-FAST, ...) implements these instead of being special-cased in every
package. pi0 and pi0.5 (`pi0.Pi0`, `pi0_config.Pi0Config`) are one family.

* `ModelConfig`: `layout` (the `TokenLayout`: positions of each camera's image tokens, the text, the state and the
  actions; the sizes; which passes / step axes exist), `describe()` (the manifest's `model_config`), `create(rng)`,
  `load(params)`.
* `Model`: `config`, `params`, `layout`, `embed(observation)` (the observation's tokens: embeddings [B, T, W], valid
  mask [B, T], autoregressive mask [T]), `sample_actions(...)` and `infer_with_latents(...)` (with a `CaptureSpec`
  and an `Intervention`, checked against the layout before compiling).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import jax

    from openpi.models.capture import CaptureSpec
    from openpi.models.intervention import Intervention
    from openpi.models.layout import TokenLayout
    from openpi.models.model import Observation


class ModelConfig(Protocol):
    @property
    def layout(self) -> TokenLayout: ...

    def describe(self) -> str: ...

    def create(self, rng: jax.Array) -> Model: ...

    def load(self, params: dict[str, Any]) -> Model: ...


@runtime_checkable
class Model(Protocol):
    params: dict[str, Any]
    config: ModelConfig

    @property
    def layout(self) -> TokenLayout: ...

    def embed(self, observation: Observation) -> tuple[jax.Array, jax.Array, jax.Array]: ...

    def sample_actions(
        self,
        rng: jax.Array,
        observation: Observation,
        *,
        num_steps: int = ...,
        noise: jax.Array | None = None,
        intervention: Intervention | None = None,
        x_t_sequence: jax.Array | None = None,
    ) -> jax.Array: ...

    def infer_with_latents(
        self,
        rng: jax.Array,
        observation: Observation,
        *,
        num_steps: int = ...,
        noise: jax.Array | None = None,
        capture: CaptureSpec = ...,
        intervention: Intervention | None = None,
        x_t_sequence: jax.Array | None = None,
    ) -> dict[str, jax.Array]: ...
