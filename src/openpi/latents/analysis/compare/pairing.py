"""When a condition's episode may be paired with the baseline's, and what is compared when it may not.

Pairing (McNemar's test, action divergence at paired inference i) needs the two episodes to start from the SAME
simulator state and draw the same noise. The collection records ``init_state_hash`` per episode (the digest of the
initial simulator state, `openpi.envs.base.state_digest`) and the seed; LIBERO-PRO suites ship their own initial
states, which match the standard suite's for 0/10 libero_goal tasks (``lan`` included), so pairing by task and index
alone would pair episodes that do not match. Rules (:func:`pairing_refusal`):

* seeds differ: not paired;
* both digests recorded and different: not paired;
* a digest missing (a store from before it was recorded): paired only within one suite (same suite, index and seed:
  the same initial state), refused across suites (nothing shows the states are equal).

A condition with no paired episode is compared UNPAIRED (:func:`fisher_exact`: Fisher's exact test on the pooled
2 × 2 table of outcomes, and the mean over tasks of the rate difference), with no action divergence (there is no
common inference to compare).

Batching (:func:`inference_batching`): with ``--num-envs > 1`` and ``--batch-inference`` plain runs go through one
padded model call while interventions never do; batching alone moves bf16 actions by up to 0.016, above the
divergence threshold. Divergence is compared only between runs under the same batching (else NaN with the reason).
"""

from __future__ import annotations

from typing import Any

from scipy import stats as _scipy_stats

from openpi.latents.store.manifest import RunManifest

__all__ = ["fisher_exact", "inference_batching", "pairing_refusal", "pro_prompt_rows"]


def inference_batching(manifest: RunManifest | dict[str, Any]) -> str:
    """ "batched" when the run's inferences went through padded multi-env model calls, else "single"."""
    m = RunManifest.of(manifest)
    edits = m.condition_entry("intervention") is not None or m.condition_entry("text_latent") is not None
    batched = int(m.argument("num_envs", 1) or 1) > 1 and bool(m.argument("batch_inference", True)) and not edits
    return "batched" if batched else "single"


def pairing_refusal(
    base_meta: dict[str, Any], cond_meta: dict[str, Any], base_suite: str | None, cond_suite: str | None
) -> str | None:
    """Why the two episodes must not be paired (None: they may; module docstring for the rules)."""
    if base_meta.get("seed") != cond_meta.get("seed"):
        return f"seeds differ ({base_meta.get('seed')} vs {cond_meta.get('seed')})"
    hb, hc = base_meta.get("init_state_hash"), cond_meta.get("init_state_hash")
    if hb is not None and hc is not None:
        return None if hb == hc else "initial simulator states differ (init_state_hash)"
    if base_suite != cond_suite:
        return (
            f"suites differ ({base_suite} vs {cond_suite}) and no init_state_hash is recorded to show the initial "
            "states equal (re-collect to record it)"
        )
    return None


def fisher_exact(base: list[bool], cond: list[bool]) -> float:
    """Two-sided Fisher exact p-value of baseline vs condition outcomes compared unpaired (1.0 without episodes)."""
    if not base or not cond:
        return 1.0
    table = [[sum(cond), len(cond) - sum(cond)], [sum(base), len(base) - sum(base)]]
    return float(_scipy_stats.fisher_exact(table).pvalue)


def pro_prompt_rows(episodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task (first episode's metadata): the prompt sent against the instruction the checkpoint was trained with
    (``trained_instruction``; a LIBERO-PRO suite's unperturbed text): a "position" perturbation whose text also
    differs is a rewording too. ``episodes``: metadata dicts with ``task_id``."""
    rows: dict[int, dict[str, Any]] = {}
    for m in episodes:
        t = int(m["task_id"])
        if t in rows:
            continue
        sent, trained = m.get("prompt"), m.get("trained_instruction")
        same = None if sent is None or trained is None else sent == trained
        rows[t] = {"task_id": t, "prompt_sent": sent, "trained_instruction": trained, "same_text": same}
    return [rows[t] for t in sorted(rows)]
