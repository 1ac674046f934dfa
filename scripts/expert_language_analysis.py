"""Language-loss report of a latent collection: metrics.json, CSV tables, PNG plots and report.md.

    uv run python scripts/expert_language_analysis.py --collection data/pi0_libero_goal --output-dir reports/goal

Every registered metric (`openpi.latents.analysis.metrics.registry`) is computed per layer and stream
(text_only / expert_0 / expert_1), reading one layer at a time. The token embedding and final norm for text decoding are
read (those two leaves only) from the checkpoint recorded in the collection's manifest. Definitions:
`openpi.latents.analysis.measures`, `openpi.latents.analysis.metrics.registry` and
`openpi.latents.analysis.run.language_loss`.

With `--conditions DIR` (a directory of condition stores, e.g. a layer sweep) report.md gains the section
"Behaviour under conditions" (`openpi.latents.analysis.compare.behaviour`): success per condition and task against
the paired baseline, McNemar's exact test, a bootstrap over tasks, action divergence and the first divergent step.

With `--compare PATH` (the other model's collection of the same tasks, initial states and seeds, e.g. a pi05_libero
run beside a pi0_libero run; or detected: a second model's baseline store among the stores of --conditions) report.md
gains the section "Model comparison" (`openpi.latents.analysis.compare.model_comparison`): paired success per task
and overall (McNemar, task bootstrap) and the language metrics per layer of both models side by side; the second
collection's own full report goes to `<output-dir>/compare_<model>/`. Collections that are not matched are refused
before any work.

The original notebook API's entry points are kept here (they delegate to the package):

    analyze_inference_language_loss(task_data)  # per-layer expert_0 / expert_1 / text_only language loss + overall
    analyze_rollout_step(step_data)             # the same for one rollout step
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Annotated, Literal

import tyro

from openpi.latents import analysis, report
from openpi.latents.analysis.run.language_loss import analyze_inference_language_loss, analyze_rollout_step
from openpi.latents.store import location
from openpi.latents.store.location import ObjectStoreError
from openpi.shared import cli, jax_cache

__all__ = ["Args", "analyze_inference_language_loss", "analyze_rollout_step", "cli_main", "main"]


@dataclasses.dataclass(frozen=True)
class TextDecodingArgs:
    """Where the token embedding for text decoding comes from."""

    # Text reconstruction and the logit lens (--no-text-decoding skips them and reads no embedding).
    text_decoding: bool = True
    # Checkpoint (local dir or gs://) to read the token embedding / final norm from, instead of the manifest's.
    checkpoint: str | None = None


@dataclasses.dataclass(frozen=True)
class ControlArgs:
    """A control collection analysed with the same settings and shown beside this one."""

    # The control collection (dashed in every per-layer figure, its values in metrics.json and each figure's statistics
    # line): the matched one is this collection's observations re-run with a random-initialised model of the same
    # config, or a second checkpoint (scripts/replay_collection.py).
    control: pathlib.Path | None = None
    # The control's name in the report (default: its manifest's checkpoint).
    control_label: str | None = None


@dataclasses.dataclass(frozen=True)
class ConditionArgs:
    """Behaviour under closed-loop conditions against their paired baseline (section "Behaviour under conditions")."""

    # A directory of condition stores, as a sweep or --condition.baseline writes.
    conditions: pathlib.Path | None = None
    # The baseline store of --conditions (default: the one among them with the task prompt and no intervention).
    baseline: pathlib.Path | None = None
    # Correction of a layer sweep's McNemar p-values over the sweep (the family: every layer of one recipe): "holm"
    # (family-wise error rate) or "bh" (Benjamini–Hochberg, false discovery rate).
    sweep_correction: Literal["holm", "bh"] = "holm"


@dataclasses.dataclass(frozen=True)
class CompareArgs:
    """A second model on the same episodes (the "Model comparison" section)."""

    # A second model's collection of the same tasks, initial states and seeds (e.g. pi05_libero beside pi0_libero; a
    # store path or s3:// / gs:// URL). Default: a second model's baseline store among the stores of --conditions, if
    # there is one.
    compare: str | None = None
    # Checkpoint to read --compare's token embedding / final norm from, instead of its manifest's.
    compare_checkpoint: str | None = None
    # Also write the compared collection's own full report into <output-dir>/compare_<model>/ (--no-compare-report
    # skips it: the section still compares both).
    compare_report: bool = True


@dataclasses.dataclass(frozen=True)
class Args:
    """Turn a latent collection into a language-loss report folder.

    The ``settings.*`` flag groups are :class:`openpi.latents.analysis.AnalysisSettings` (flags named as its fields):
    the collection, its control and a compared collection are analysed with the very same settings.
    """

    # The collection: a latent store (a directory, s3://bucket/prefix or gs://bucket/prefix), or a pickle
    # directory/file with --allow-pickle.
    collection: str
    # Where metrics.json, the CSV tables, the PNG plots and report.md go.
    output_dir: pathlib.Path = pathlib.Path("reports/language_loss")
    # Read at most this many MiB of one layer per block (bounds memory).
    max_block_mib: int = 64
    # Persistent JAX compilation cache directory (default: $JAX_COMPILATION_CACHE_DIR; neither: compile every run). A
    # second run of the same model loads the compiled programs instead (tiny preset, 2 CPU cores: ~16 s -> ~3 s).
    jax_cache_dir: str | None = None
    # How every collection of this run is analysed.
    settings: Annotated[analysis.AnalysisSettings, tyro.conf.OmitArgPrefixes] = analysis.AnalysisSettings()
    # Where the token embedding for text decoding comes from.
    text_decoding: Annotated[TextDecodingArgs, tyro.conf.OmitArgPrefixes] = TextDecodingArgs()
    # A control collection analysed with the same settings, shown beside this one.
    control_collection: Annotated[ControlArgs, tyro.conf.OmitArgPrefixes] = ControlArgs()
    # Closed-loop conditions against their paired baseline.
    behaviour: Annotated[ConditionArgs, tyro.conf.OmitArgPrefixes] = ConditionArgs()
    # A second model on the same episodes.
    comparison: Annotated[CompareArgs, tyro.conf.OmitArgPrefixes] = CompareArgs()

    def analysis_settings(self) -> analysis.AnalysisSettings:
        """The settings every collection of this run is analysed with (--max-block-mib in bytes)."""
        return self.settings.replace(max_block_bytes=self.max_block_mib << 20)


def _embedding(args: Args, checkpoint: str | None) -> object:
    if not args.text_decoding.text_decoding:
        return None
    if checkpoint:
        from openpi.latents.analysis.data.embedding import read_checkpoint_leaves

        return read_checkpoint_leaves(checkpoint)
    return "auto"


def _discrete_state_input(path: str) -> bool | None:
    """Whether the collection's pi0.5 prompt carried the robot state: its preset's setting (None if unknown)."""
    from openpi.latents import store
    from openpi.policies import presets

    if not store.is_store(path):
        return None  # match_collections says what is wrong with it
    manifest = store.open_store(path).run_manifest
    if manifest.preset not in presets.list_presets():
        return None
    config = presets.get_preset(manifest.preset).model_config
    return config.discrete_state_input if config.describe() == manifest.model_config else None


def _matched_comparison(args: Args):
    """(the matched pair or None, the condition stores for the behaviour section), checked before any analysis."""
    from openpi.latents import store
    from openpi.latents.analysis.compare import model_matching

    compare, conditions = args.comparison.compare, args.behaviour.conditions
    if conditions is not None and store.is_store(args.collection):
        found, same_model, theirs = model_matching.find_comparison(conditions, args.collection)
        if found is not None:
            # The behaviour section pairs the primary model's conditions with its own baseline; the other model's
            # baseline is the comparison, and its other condition stores are left out (analyse them on their own).
            conditions = same_model if len(same_model) > 1 else None
            compare = compare or str(found)
            left_out = [str(p) for p in theirs if str(p) != compare]
            print(f"--conditions holds a second model's stores: comparing with {compare}", flush=True)
            if left_out:
                print(f"  left out of the behaviour section (the other model's conditions): {left_out}", flush=True)
    if compare is None:
        return None, conditions
    dsi = (_discrete_state_input(args.collection), _discrete_state_input(compare))
    task_ids = list(args.settings.read.task_ids or ()) or None
    matched = model_matching.match_collections(args.collection, compare, task_ids=task_ids, discrete_state_input=dsi)
    return matched, conditions


def _check_output_dir(args: Args) -> None:
    """--output-dir must be (or become) a directory of its own: not a file, not the collection or inside it (the
    report files would land in the store). Checked before any work."""
    out = args.output_dir.expanduser().absolute()
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(
            f"--output-dir {args.output_dir}: {probe} is a file, not a directory; choose another --output-dir."
        )
    inputs = [("--collection", args.collection), ("--control", args.control_collection.control)]
    for flag, value in inputs:
        if value is None or location.is_url(str(value)):
            continue
        source = pathlib.Path(value).expanduser().resolve()
        if out.resolve() == source or source in out.resolve().parents:
            raise ValueError(
                f"--output-dir {args.output_dir} is the {flag} store {value} (or inside it): the report would be "
                "written into the store; choose another --output-dir."
            )


def main(args: Args) -> dict:
    cli.configure_logging()
    _check_output_dir(args)
    jax_cache.configure(args.jax_cache_dir)  # the text decoding and the logit lens compile
    t0 = time.monotonic()
    matched, conditions = _matched_comparison(args)  # refuses unmatched collections before any work
    settings = args.analysis_settings()
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    res = analysis.analyze_collection(
        args.collection,
        settings,
        embedding=_embedding(args, args.text_decoding.checkpoint),
        progress=say,
        control=args.control_collection.control,
        control_label=args.control_collection.control_label,
    )
    stats = settings.stats
    behaviour = None
    if conditions is not None:
        from openpi.latents.analysis.compare.behaviour import analyze_conditions

        behaviour = analyze_conditions(
            conditions,
            baseline=args.behaviour.baseline,
            n_boot=stats.n_boot,
            seed=stats.seed,
            correction=args.behaviour.sweep_correction,
        )
    comparison = None
    if matched is not None:
        from openpi.latents.analysis.compare.model_comparison import compare_models

        print(f"Analysing the comparison collection {matched.b.root} ({matched.b.label})", flush=True)
        emb_b = _embedding(args, args.comparison.compare_checkpoint)
        res_b = analysis.analyze_collection(matched.b.root, settings, embedding=emb_b, progress=say)
        comparison = compare_models(matched, res, res_b, n_boot=stats.n_boot, seed=stats.seed)
        if args.comparison.compare_report:
            sub = "compare_" + "".join(c if c.isalnum() else "_" for c in matched.b.label)
            report.write_report(res_b, args.output_dir / sub)
            comparison = dataclasses.replace(comparison, compare_report=sub)
    data = report.write_report(res, args.output_dir, behaviour=behaviour, comparison=comparison)
    print(f"Report in {args.output_dir}/report.md ({time.monotonic() - t0:.1f}s)")
    for line in report.readings(res).values():
        print("  " + line)
    return data


def cli_main(argv: Sequence[str] | None = None) -> dict:
    """The command line (`argv`, default ``sys.argv[1:]``): bad input is one ``error:`` line and exit code 2."""
    try:
        return main(tyro.cli(Args, args=argv, description=__doc__))
    except (ValueError, FileNotFoundError, PermissionError, KeyError, ObjectStoreError) as e:
        print(f"error: {cli.cli_message(str(e), {'allow_pickle': '--allow-pickle'})}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli_main()
