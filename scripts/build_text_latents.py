"""Per-task text latents (arXiv 2505.03500) from a latent collection, saved as .npz for `--condition.text-latent`.

    uv run python scripts/build_text_latents.py --collection data/pi0_libero_goal --output data/goal_text_latents.npz

latent[K, l, j] = mean over every rollout step of every complete episode of task K of expert 0's residual stream
entering captured layer l at valid text token j (per token and layer; `openpi.latents.text_latent` has the full
definition). The collection must capture the text window (`--capture.text`, the default) with the task's own prompt.
Then, e.g., task 3's latent with a blank prompt:

    uv run python scripts/inference_latent_collection.py ... --condition.prompt blank \\
        --condition.text-latent data/goal_text_latents.npz --condition.text-latent-task 3
"""

import dataclasses
import pathlib
import sys

import tyro

from openpi.latents import text_latent


@dataclasses.dataclass(frozen=True)
class Args:
    """Build per-task text latents from a latent store."""

    # The latent store (collected with the tasks' own prompts, text window captured).
    collection: pathlib.Path
    # Where the .npz goes.
    output: pathlib.Path = pathlib.Path("data/text_latents.npz")
    # Only these task ids (default: every task of the store).
    task_ids: tuple[int, ...] = ()


def main(args: Args) -> pathlib.Path:
    latents = text_latent.build_text_latents(args.collection, list(args.task_ids) or None)
    path = latents.save(args.output)
    print(
        f"Text latents of tasks {list(latents.task_ids)} at layers {list(latents.layers)} "
        f"({[int(c) for c in latents.counts]} records averaged) -> {path}"
    )
    return path


if __name__ == "__main__":
    try:
        main(tyro.cli(Args, description=__doc__))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
