"""What a replay will do, checked before the model loads: its arguments, the source, the control model, the output."""

from __future__ import annotations

import dataclasses
import logging
import pathlib

from openpi import envs
from openpi.envs import base as env_base
from openpi.latents import store as _store
from openpi.latents.recording.args import STORE_RESUME_IGNORE, StoreArgs
from openpi.latents.recording.disk import check_not_full
from openpi.latents.store import location
from openpi.latents.store import manifest as manifest_lib
from openpi.models.capture import CaptureSpec
from openpi.policies import policy_config, presets
from openpi.policies.policy import Policy
from openpi.shared import normalize

logger = logging.getLogger(__name__)

KIND = "pi0 latent replay (matched control)"
# Record streams copied from the source: what the scene and the rollout loop produced, not the model.
COPIED_STREAMS = ("rollout", "env")
RESUME_IGNORE = manifest_lib.DEFAULT_RESUME_IGNORE | STORE_RESUME_IGNORE | {"arguments.task_ids"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReplayArgs(StoreArgs):
    """Re-run a latent store's recorded observations through a control model and write the matched control store.

    The store flags are the shared group of `openpi.latents.recording.args`; the model, capture and number of
    denoising steps come from the source."""

    # The collection to replay: a latent store (directory, s3:// or gs://) recorded with images (the collection's
    # and the server's default; --no-store-images leaves them out and cannot be replayed).
    source: str
    # Where the control store goes (directory, s3://bucket/prefix or gs://bucket/prefix).
    output_dir: str = "data/control"
    # A second checkpoint of the source's preset and config (local or gs://). Default: a random-initialised model.
    checkpoint: str | None = None
    # Norm-stats asset id inside --checkpoint (default: the source's).
    asset_id: str | None = None
    # Seed of the random initialisation (without --checkpoint). 1, not the tiny presets' param seed 0, so that the
    # default control of a tiny-preset source is another model.
    init_seed: int = 1
    # Only these task ids of the source (default: all).
    task_ids: tuple[int, ...] = ()
    # Allow the source's own model (the reproduction check: the stored actions and latents come back).
    allow_same_model: bool = False
    # Persistent JAX compilation cache directory (default: $JAX_COMPILATION_CACHE_DIR; neither: compile every run). A
    # second run of the same model loads the compiled programs instead (tiny preset, 2 CPU cores: ~16 s -> ~3 s).
    jax_cache_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class ReplayPlan:
    """What a replay will do, every check passed (nothing loaded, nothing written)."""

    args: ReplayArgs
    source: _store.LatentStore
    manifest: manifest_lib.RunManifest  # the control store's manifest (before complete_manifest)
    preset: presets.PolicyPreset  # the control model's preset (random init: params from init_seed)
    checkpoint: str | None  # None: random init
    asset_id: str | None
    capture: CaptureSpec
    num_steps: int
    simulator: env_base.Simulator
    episodes: tuple[tuple[int, int], ...]  # (task_id, episode) of the source, in order


def _source_store(args: ReplayArgs) -> _store.LatentStore:
    try:
        source = _store.open_store(args.source)
    except (FileNotFoundError, _store.StoreFormatError) as e:
        raise FileNotFoundError(f"--source {args.source} is not a readable latent store: {e}") from e
    # The replay CLI has no --skip-damaged (a control collection matches the whole source): advise the repair.
    source.require_intact(
        fix="Repair the source first (delete the damaged episode folders and re-run its collection with --resume), "
        "or replay another --source"
    )
    return source


def _num_steps(manifest: manifest_lib.RunManifest, source: _store.LatentStore) -> int:
    """Denoising steps per inference: the manifest's, else the stored trajectory's (``x_t`` has S + 1 entries)."""
    n = manifest.argument("num_denoise_steps") or manifest.argument("num_steps")
    if n is None:
        eps = (source.episode(t, k) for t in source.task_ids() for k in source.episode_indices(t))
        stored = {int(ep.fields["x_t"].shape[0]) - 1 for ep in eps if "x_t" in ep.fields}
        n = stored.pop() if len(stored) == 1 else None
    if not isinstance(n, int) or n < 1:
        raise ValueError(
            f"--source {manifest.kind or 'store'}: its manifest does not say how many denoising steps each "
            "inference ran (arguments.num_denoise_steps), nor does a stored trajectory (x_t); a replay needs the "
            "source's number to match it."
        )
    return n


def _check_condition(manifest: manifest_lib.RunManifest) -> None:
    named = (
        ("intervention", manifest.condition_entry("intervention")),
        ("text latent", manifest.condition_entry("text_latent")),
        ("server intervention", manifest.intervention),
    )
    edits = {k: v for k, v in named if v}
    if edits:
        raise ValueError(
            f"--source ran with {', '.join(edits)} ({edits}); a replay re-runs the observations without model "
            "edits, so it would not be matched. Replay the paired baseline store (--condition.baseline) instead."
        )


def _episodes(source: _store.LatentStore, task_ids: tuple[int, ...], sim: env_base.Simulator, shape) -> list:
    """(task, episode) pairs to replay; refuses, naming the flag, when a record lacks what the replay feeds."""
    known = source.task_ids()
    missing_tasks = [t for t in task_ids if t not in known]
    if missing_tasks:
        raise ValueError(f"--task-ids {missing_tasks} are not in --source {source.root} (tasks: {known}).")
    out = []
    for t in task_ids or known:
        for k in source.episode_indices(t):
            ep = source.episode(t, k)
            if ep.committed == 0:
                continue
            cameras = [key for key in sim.camera_keys if key not in ep.fields]
            if cameras:
                raise ValueError(
                    f"--source {source.root} task {t} episode {k} has no stored images ({', '.join(cameras)}): it "
                    "was recorded with --no-store-images. A replay feeds the stored images to the control model; "
                    "collect the source again with images stored (--store-images, the default)."
                )
            lacking = [key for key in ("prompt", "state", "noise") if key not in ep.fields]
            if lacking:
                raise ValueError(f"--source task {t} episode {k} lacks {lacking}, which a replay feeds to the model.")
            if tuple(ep.fields["noise"].shape) != tuple(shape):
                raise ValueError(
                    f"--source task {t} episode {k}: stored noise {list(ep.fields['noise'].shape)} does not fit the "
                    f"model's [action_horizon, action_dim] = {list(shape)}."
                )
            out.append((t, k))
    if not out:
        raise ValueError(f"--source {source.root} has no complete episode with a rollout step to replay.")
    return out


def _local_checkpoint_check(checkpoint: str, asset_id: str) -> str:
    """The checkpoint as the manifest records it (a local one absolute: the analysis reads its embedding from any
    working directory), after checking that a local one has params/ and the norm stats (a URL is checked when the
    policy loads)."""
    if location.is_remote(location.as_path(checkpoint)):
        return checkpoint
    path = pathlib.Path(checkpoint).expanduser().resolve()
    if not (path / "params").is_dir():
        raise FileNotFoundError(f"--checkpoint {checkpoint} is not an openpi checkpoint (no params/ directory).")
    policy_config.load_checkpoint_norm_stats(path, asset_id)
    return str(path)


def _source_norm_stats_dir(manifest: manifest_lib.RunManifest, preset: presets.PolicyPreset) -> str:
    """The directory of the norm stats the source ran with (a random-init control uses them too)."""
    checkpoint = str(manifest.checkpoint or "")
    if checkpoint.startswith("random(") or not checkpoint:
        if preset.default_norm_stats_dir is None:
            raise ValueError(f"preset {preset.name} has no packaged norm stats for a random-init control.")
        return preset.default_norm_stats_dir
    asset_id = manifest.argument("asset_id") or preset.asset_id
    if location.is_remote(location.as_path(checkpoint)):
        from openpi.shared import download

        return str(download.maybe_download(f"{checkpoint.rstrip('/')}/assets/{asset_id}"))
    directory = pathlib.Path(checkpoint).expanduser() / "assets" / asset_id
    if not (directory / normalize.FILENAME).is_file():
        raise FileNotFoundError(
            f"The source's norm stats {directory / normalize.FILENAME} (checkpoint {checkpoint}, asset id "
            f"{asset_id}) are gone; a random-init control needs them to feed the same normalised inputs."
        )
    return str(directory)


def _same_model(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    if a == b:
        return True
    local = [not location.is_remote(location.as_path(x)) for x in (a, b)]
    return all(local) and pathlib.Path(a).expanduser().resolve() == pathlib.Path(b).expanduser().resolve()


def make_plan(args: ReplayArgs) -> ReplayPlan:
    """Every check that needs neither the model nor a write; raises ValueError / FileNotFoundError naming the fix."""
    args.check_store()
    source = _source_store(args)
    if _same_model(str(args.output_dir), str(source.root)):  # the same path
        raise ValueError(f"--output-dir {args.output_dir} is the --source store; write the control elsewhere.")
    src = source.run_manifest
    missing = [k for k in ("preset", "model_config", "capture_spec", "checkpoint") if not getattr(src, k)]
    if missing:
        raise ValueError(f"--source {source.root}: its manifest lacks {missing}; it was not written by a collection.")
    _check_condition(src)
    preset = presets.get_preset(src.preset)
    config = preset.model_config
    if config.describe() != src.model_config:
        raise ValueError(
            f"--source was collected with model {src.model_config}, but preset {preset.name} is now "
            f"{config.describe()}; a control needs the source's config."
        )
    capture, num_steps = CaptureSpec.from_dict(dict(src.capture_spec)), _num_steps(src, source)
    capture.validate(depth=config.depth, num_steps=num_steps)
    sim = envs.get(preset.env)
    episodes = _episodes(source, args.task_ids, sim, (config.action_horizon, config.action_dim))
    asset_id = args.asset_id or src.argument("asset_id") or preset.asset_id
    if args.checkpoint is not None:
        control = _local_checkpoint_check(args.checkpoint, asset_id)
        model = {"model": "checkpoint", "init_seed": None, "norm_stats": f"{control}/assets/{asset_id}"}
    else:
        norm_dir = _source_norm_stats_dir(src, preset)
        preset = dataclasses.replace(
            preset, default_checkpoint=None, param_seed=args.init_seed, default_norm_stats_dir=norm_dir
        )
        control = f"random(seed={args.init_seed})"
        model = {"model": "random-init", "init_seed": args.init_seed, "norm_stats": f"the source's ({norm_dir})"}
    same = _same_model(control, src.checkpoint)
    if same and not args.allow_same_model:
        raise ValueError(
            f"The control model {control} is the source's own model: its replay only reproduces the source. Pass "
            "another --init-seed or --checkpoint, or --allow-same-model for that reproduction check."
        )
    batched = (src.argument("num_envs") or 1) > 1 and src.argument("batch_inference", True)
    batched = batched or (src.argument("max_batch") or 1) > 1
    # The source's manifest (capture spec, model, layout, condition, ...), with what makes this store the control.
    manifest = dataclasses.replace(
        src,
        kind=KIND,
        arguments=dataclasses.asdict(args),
        checkpoint=control,
        created=None,
        content_hash=None,
        code_version=None,
        manifest_version=manifest_lib.MANIFEST_VERSION,
        control_of={
            "store": str(source.root),
            "content_hash": src.content_hash,
            "checkpoint": src.checkpoint,
            "preset": src.preset,
            "kind": src.kind,
            "arguments": dict(src.arguments or {}),
        },
        replay={
            **model,
            "num_denoise_steps": num_steps,
            "same_model_as_source": same,
            "source_batched": bool(batched),
            "copied_from_source": "t, prompt, state, images, executed_actions (the source's actions), episode "
            "attrs and outcome; the model outputs, latents and cf_* reruns are the control's",
        },
    )
    checkpoint = None if args.checkpoint is None else control
    return ReplayPlan(args, source, manifest, preset, checkpoint, asset_id, capture, num_steps, sim, tuple(episodes))


def check_output(plan: ReplayPlan) -> None:
    """The output checks of opening the store, writing nothing."""
    args = plan.args
    root = _store.check_writable(args.output_dir)
    if not location.is_remote(root):
        check_not_full(root)
    _store.LatentStoreWriter.check_can_open(
        root,
        manifest_lib.complete_manifest(plan.manifest),
        resume=args.resume,
        resume_ignore=RESUME_IGNORE,
        break_stale_lock=args.break_stale_lock,
    )


def load_policy(plan: ReplayPlan) -> Policy:
    """The control policy, sampling the source's number of denoising steps."""
    logger.info("Loading the control model %s", plan.manifest.checkpoint)
    return policy_config.create_trained_policy(
        plan.preset,
        plan.checkpoint,
        asset_id=plan.asset_id if plan.checkpoint is not None else None,
        sample_kwargs={"num_steps": plan.num_steps},
    )
