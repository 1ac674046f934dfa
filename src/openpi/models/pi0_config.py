"""`Pi0Config`: the hyper-parameters of pi0, and how to create or load a model from them."""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp

from openpi.models import gemma, siglip
from openpi.models import lora as _lora
from openpi.models import model as _model
from openpi.models.layout import ExpertSizes, TokenLayout
from openpi.models.pi0_model import Pi0

if TYPE_CHECKING:
    from openpi.models.taps import Tap

logger = logging.getLogger(__name__)

# What describe() writes, read back by from_description().
_DESCRIPTION_RE = re.compile(
    r"Pi0Config\((?P<pi05>pi05=True, )?paligemma=(?P<paligemma>[^,]+), action_expert=(?P<action_expert>[^,]+), "
    r"siglip=(?P<siglip>[^,]+), vocab=(?P<vocab>\d+), horizon=(?P<horizon>\d+)\)"
)


@dataclasses.dataclass(frozen=True)
class Pi0Config:
    """pi0, or pi0.5 with `pi05=True`. Defaults are upstream openpi's (pi0: as used by `pi0_libero`).

    `dtype` is the activation dtype; params are created in float32 and keep the dtype they are loaded with.
    Each variant is a name (`gemma.get_config`) or a `gemma.Config`.

    pi0.5 (shared/spec/pi05.md): no state token, the flow-matching time enters only through adaptive RMSNorms of the
    action expert (`time_mlp_*` → condition; gated residuals). `max_token_len=None` resolves to 200 for pi0.5 and 48
    for pi0; `discrete_state_input=None` resolves to `pi05`. The model never reads `discrete_state_input`: only the
    policy's prompt tokenisation does (the state as 256-bin digits in the prompt).
    """

    dtype: str = "bfloat16"
    paligemma_variant: str | gemma.Config = "gemma_2b"
    action_expert_variant: str | gemma.Config = "gemma_300m"
    action_dim: int = 32
    action_horizon: int = 50
    max_token_len: int | None = None
    siglip_variant: str = "So400m/14"
    siglip_depth: int | None = None
    vocab_size: int = gemma.PALIGEMMA_VOCAB_SIZE
    pi05: bool = False
    discrete_state_input: bool | None = None

    def __post_init__(self):
        # Resolved as upstream does; explicit values are kept.
        if self.max_token_len is None:
            object.__setattr__(self, "max_token_len", 200 if self.pi05 else 48)
        if self.discrete_state_input is None:
            object.__setattr__(self, "discrete_state_input", self.pi05)

    # ---------------------------------------------------------------- derived sizes
    @property
    def paligemma_config(self) -> gemma.Config:
        v = self.paligemma_variant
        return v if isinstance(v, gemma.Config) else gemma.get_config(v)

    @property
    def action_expert_config(self) -> gemma.Config:
        v = self.action_expert_variant
        return v if isinstance(v, gemma.Config) else gemma.get_config(v)

    @property
    def depth(self) -> int:
        return self.paligemma_config.depth

    @property
    def layout(self) -> TokenLayout:
        """The token-segment layout (`layout.TokenLayout`): what capture, interventions and the manifest read."""
        return _layout(self)

    @property
    def num_cameras(self) -> int:
        return self.layout.num_cameras

    @property
    def tokens_per_camera(self) -> int:
        return self.layout.tokens_per_camera

    @property
    def text_start(self) -> int:
        """First text position in the prefix: the image tokens of every camera come first."""
        return self.layout.text_start

    @property
    def prefix_len(self) -> int:
        return self.layout.prefix_len

    @property
    def suffix_len(self) -> int:
        # pi0: state token + action tokens; pi0.5: the action tokens only.
        return self.layout.suffix_len

    @property
    def suffix_segment_names(self) -> tuple[str, str]:
        """The two pooled groups of the suffix (the `expert_1_segment_means` axis): suffix token 0, then the mean of
        the remaining tokens. pi0: the state token and the action tokens; pi0.5 (no state token): the first action
        token and the other H - 1 action tokens."""
        return self.layout.suffix_segment_names

    @property
    def segment_names(self) -> tuple[str, ...]:
        """Token groups of the prefix, in order (the `expert_0_segment_means` axis)."""
        return self.layout.segment_names

    # ---------------------------------------------------------------- modules
    def llm(self, taps: tuple[Tap, ...] = (), capture_dtype: str | None = None) -> gemma.Module:
        return gemma.Module(
            configs=(self.paligemma_config, self.action_expert_config),
            embed_dtype=self.dtype,
            vocab_size=self.vocab_size,
            taps=taps,
            capture_dtype=capture_dtype,
            adaptive_norm=(False, self.pi05),  # pi0.5: only the action expert is adaptive
        )

    def img(self) -> siglip.Module:
        return siglip.Module(
            num_classes=self.paligemma_config.width,
            variant=self.siglip_variant,
            depth=self.siglip_depth,
            pool_type="none",
            scan=True,
            dtype_mm=self.dtype,
        )

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """Projections outside the transformer: name -> (in features, out features), in upstream's creation order."""
        w = self.action_expert_config.width
        if self.pi05:
            return {
                "action_in_proj": (self.action_dim, w),
                "time_mlp_in": (w, w),
                "time_mlp_out": (w, w),
                "action_out_proj": (w, self.action_dim),
            }
        return {
            "state_proj": (self.action_dim, w),
            "action_in_proj": (self.action_dim, w),
            "action_time_mlp_in": (2 * w, w),
            "action_time_mlp_out": (w, w),
            "action_out_proj": (w, self.action_dim),
        }

    # ---------------------------------------------------------------- create / load
    def init_params(self, rng: jax.Array) -> dict[str, Any]:
        """Fresh float32 params with upstream's tree layout (pure nested dict)."""
        rng_llm, rng_img, rng_proj = jax.random.split(rng, 3)
        llm = self.llm()
        llm_params = llm.init(rng_llm, method=llm.init_all)["params"]
        res = _model.IMAGE_RESOLUTION
        img_params = self.img().init(rng_img, jnp.zeros((1, *res, 3), jnp.float32))["params"]
        params: dict[str, Any] = {"PaliGemma": {"llm": llm_params, "img": img_params}}
        kernel_init = nn.initializers.lecun_normal()
        shapes = self.projection_shapes()
        for key, (name, (d_in, d_out)) in zip(jax.random.split(rng_proj, len(shapes)), shapes.items(), strict=True):
            params[name] = {"kernel": kernel_init(key, (d_in, d_out), jnp.float32), "bias": jnp.zeros((d_out,))}
        return params

    def create(self, rng: jax.Array) -> Pi0:
        """A randomly initialised model (works under `jax.eval_shape` without allocating weights)."""
        return Pi0(params=_init_params(self, rng), config=self)

    def param_shapes(self) -> dict[str, Any]:
        return _abstract_params(self)

    def load(self, params: dict[str, Any]) -> Pi0:
        """Wraps restored params; structure and shapes are checked (not dtypes: params keep the dtype they were
        restored with, bf16 at inference).

        Leaves the model lacks are dropped, as upstream does (a base checkpoint may initialise a smaller model), but
        never silently: LoRA leaves raise (the checkpoint is a LoRA fine-tune; the error names the variants to use),
        any other dropped leaf is named in a logged warning.
        """
        expected = self.param_shapes()
        dropped: dict[str, tuple[int, ...]] = {}
        params = _intersect(params, expected, dropped)
        self._check_dropped(dropped)
        _check_lora_present(expected, params, self.describe())
        _model.check_params_match(expected, params, what=f"params for {self.describe()}")
        return Pi0(params=params, config=self)

    def _check_dropped(self, dropped: dict[str, tuple[int, ...]]) -> None:
        lora_leaves = {p: s for p, s in dropped.items() if _lora.is_lora_path(p)}
        if lora_leaves:
            shown = ", ".join(list(lora_leaves)[:3])
            raise ValueError(
                f"The params hold {len(lora_leaves)} LoRA leaves that {self.describe()} has no place for (e.g. "
                f"{shown}): the checkpoint is a LoRA fine-tune, and dropping them would silently run the base model. "
                f"{_lora_fix(self, lora_leaves)}"
            )
        if dropped:
            logger.warning(
                "Dropping %d checkpoint leaves that %s does not have: %s%s",
                len(dropped),
                self.describe(),
                ", ".join(list(dropped)[:10]),
                f", ... ({len(dropped) - 10} more)" if len(dropped) > 10 else "",
            )

    def describe(self) -> str:
        def name(v):
            return v if isinstance(v, str) else f"{v.width}w/{v.depth}L"

        return (
            f"Pi0Config({'pi05=True, ' if self.pi05 else ''}paligemma={name(self.paligemma_variant)}, "
            f"action_expert={name(self.action_expert_variant)}, siglip={self.siglip_variant}, vocab={self.vocab_size}, "
            f"horizon={self.action_horizon})"
        )

    @classmethod
    def from_description(cls, text: str) -> Pi0Config:
        """The config :meth:`describe` wrote (what a collection's manifest records as ``model_config``).

        ``describe`` leaves out dtype, action_dim, max_token_len and siglip_depth, which take their defaults here: the
        transformer's sizes, vocabulary and params created from a seed are the same (params are float32 whatever the
        dtype). Raises ValueError when ``text`` is not a description, or names a custom (unnamed) Gemma config.
        """
        m = _DESCRIPTION_RE.fullmatch(text.strip())
        if m is None:
            raise ValueError(f"not a Pi0Config description: {text!r} (expected what Pi0Config.describe() writes)")
        variants = m.group("paligemma"), m.group("action_expert")
        unknown = [v for v in variants if v not in gemma.variants()]
        if unknown:
            raise ValueError(f"{text!r} names Gemma configs {unknown} that are not named variants {gemma.variants()}")
        return cls(
            paligemma_variant=variants[0],
            action_expert_variant=variants[1],
            siglip_variant=m.group("siglip"),
            vocab_size=int(m.group("vocab")),
            action_horizon=int(m.group("horizon")),
            pi05=m.group("pi05") is not None,
        )


@functools.cache
def _layout(config: Pi0Config) -> TokenLayout:
    h = config.action_horizon
    # pi0: [state | H actions]; pi0.5: no state token, the suffix is the action tokens alone.
    suffix = (("actions", 0, h),) if config.pi05 else (("state", 0, 1), ("actions", 1, 1 + h))
    experts = (config.paligemma_config, config.action_expert_config)
    sizes = [ExpertSizes(c.width, c.num_heads, c.head_dim, c.mlp_dim) for c in experts]
    return TokenLayout(
        cameras=tuple(_model.IMAGE_KEYS),
        tokens_per_camera=siglip.num_patches(config.siglip_variant, _model.IMAGE_RESOLUTION),
        max_token_len=config.max_token_len,
        suffix_segments=suffix,
        suffix_len=h if config.pi05 else 1 + h,
        suffix_segment_names=("action_0", "actions_1:") if config.pi05 else ("state", "actions"),
        experts=tuple(sizes),
        depth=config.paligemma_config.depth,
        action_horizon=h,
        action_dim=config.action_dim,
    )


@functools.cache
def _abstract_params(config: Pi0Config) -> dict[str, Any]:
    return jax.eval_shape(config.init_params, jax.random.key(0))


def _intersect(params: Any, reference: Any, dropped: dict[str, tuple[int, ...]], prefix: str = "") -> Any:
    """Keeps only the keys of `params` that `reference` also has (recursively); records the leaves left out."""
    if not isinstance(params, dict) or not isinstance(reference, dict):
        return params
    kept = {}
    for k, v in params.items():
        if k in reference:
            kept[k] = _intersect(v, reference[k], dropped, f"{prefix}{k}/")
        else:
            tree = v if isinstance(v, dict) else {"": v}
            for path, leaf in flax.traverse_util.flatten_dict(tree, sep="/").items():
                dropped[f"{prefix}{k}/{path}".rstrip("/")] = tuple(jnp.shape(leaf))
    return kept


def _expert_of(path: str) -> int:
    """Expert index of a Gemma leaf path: its module name (`q_einsum_1`, `mlp_1`) ends in `_<i>` for i > 0."""
    module = path.split("/")[-2]
    suffix = module.rsplit("_", 1)[-1]
    return int(suffix) if suffix.isdigit() else 0


def _lora_fix(config: Pi0Config, lora_leaves: dict[str, tuple[int, ...]]) -> str:
    """Which variants to load LoRA leaves with: named variants of the same sizes and ranks, else a custom config."""
    ranks: dict[int, set[int]] = {}
    for path, shape in lora_leaves.items():
        if path.endswith("lora_a"):  # A replaces the weight's output (last) axis by the rank
            ranks.setdefault(_expert_of(path), set()).add(shape[-1])
    fields, fixes = ("paligemma_variant", "action_expert_variant"), []
    for i, (field, base) in enumerate(zip(fields, (config.paligemma_config, config.action_expert_config))):
        if i not in ranks:
            continue
        want = dataclasses.replace(base, lora_configs=())
        names = [
            n
            for n in gemma.variants()
            if dataclasses.replace(gemma.get_config(n), lora_configs=()) == want
            and {c.rank for _, c in gemma.get_config(n).lora_configs} == ranks[i]
        ]
        fixes.append(f"{field}={names[0]!r}" if names else f"{field}=<gemma.Config with LoRA rank {sorted(ranks[i])}>")
    return (
        f"Load it with {', '.join(fixes)} (openpi's pi0_libero_low_mem_finetune uses 'gemma_2b_lora' and "
        "'gemma_300m_lora'). A custom gemma.Config needs lora_configs={'attn': LoRAConfig(rank, alpha), 'ffn': ...} "
        "with the rank and alpha used in training (alpha is not stored in the checkpoint)."
    )


def _check_lora_present(expected: dict[str, Any], params: dict[str, Any], what: str) -> None:
    """A LoRA config given a checkpoint without adapters: upstream fails on the tree structure; say why."""
    have = flax.traverse_util.flatten_dict(params, sep="/")
    missing = [p for p in flax.traverse_util.flatten_dict(expected, sep="/") if p not in have and _lora.is_lora_path(p)]
    if missing:
        raise ValueError(
            f"{what} expects {len(missing)} LoRA leaves the params lack (first: {missing[0]}): the checkpoint is not "
            "a LoRA fine-tune of this config. Load a base checkpoint with the base variants (e.g. 'gemma_2b' rather "
            "than 'gemma_2b_lora')."
        )


@functools.partial(jax.jit, static_argnums=0)
def _init_params(config: Pi0Config, rng: jax.Array) -> dict[str, Any]:
    """`config.init_params`, compiled once per config (a fresh `jax.jit` per call recompiled every random init)."""
    return config.init_params(rng)
