"""Causal maps of a stored collection: where (token group, layer, stream point) and when (denoising step) the
prompt reaches the action, by exact activation patching (and attribution patching beside it).

    uv run python scripts/causal_map.py --collection data/pi0_libero_goal --output-dir reports/goal/causal_map \\
        --corrupt other-task --max-observations 16
    uv run python scripts/expert_language_analysis.py --collection data/pi0_libero_goal --output-dir reports/goal

Each stored observation (images, state, prompt, noise; the collection must store images) is run clean and with the
corrupted prompt ("other-task", "blank" or a given text) through the collection's own model (--checkpoint for
another), and every site is patched (`openpi.models.patch_map`). Writes causal_map.json (definitions, counts, paths,
readings, Spearman exact vs attribution), causal_map.npz (per-pair scores, means, intervals) and the heatmaps; the
language report shows them when they lie in <report dir>/causal_map.
"""

import sys

import tyro

from openpi.latents.causal import runner
from openpi.shared import cli


def main(args: runner.CausalMapArgs) -> dict:
    cli.configure_logging()
    try:
        runner.check_args(args)
        runner._plan(args)
    except (ValueError, OSError) as e:  # bad input, before the model loads
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    doc = runner.run_causal_maps(args)
    for direction, d in doc["directions"].items():
        print(f"[{direction}] {d['n_pairs']} pairs; direct {d['paths']['direct']['mean']:.2f}, "
              f"indirect {d['paths']['indirect']['mean']:.2f}")  # fmt: skip
        for line in d["readings"]:
            print("  " + line)
    print(f"Wrote {args.output_dir}")
    return doc


if __name__ == "__main__":
    main(tyro.cli(runner.CausalMapArgs))
