"""The numbers themselves: pure numpy definitions over captured arrays (no store, no result, no registry).

Definitions in the docstrings of :mod:`.change` (prompt sensitivity, action divergence, drift, centred drift; the
overview of every metric), :mod:`.text_decoding` (text reconstruction, logit lens), :mod:`.attention`, :mod:`.probe`
and :mod:`.probe_permutation` (the task probe), :mod:`.token_probe` (token-identity probe, tuned lens) and
:mod:`.geometry` (CKA, effective rank); :mod:`.arrays` holds the masks and reductions they share. This package
re-exports the common ones (``from openpi.latents.analysis import measures as M``), as ``analysis.metrics`` did.
"""

from openpi.latents.analysis.measures.arrays import informative_text_mask, masked_mean, text_positions
from openpi.latents.analysis.measures.attention import AttentionToLanguage, attention_to_language
from openpi.latents.analysis.measures.change import (
    ActionDivergence,
    action_divergence,
    attention_mass_onto_keys,
    centred_drift,
    prompt_sensitivity,
    rollout_drift,
)
from openpi.latents.analysis.measures.probe import ProbeResult, task_probe
from openpi.latents.analysis.measures.text_decoding import (
    LogitLens,
    TextReconstruction,
    final_rms_norm,
    logit_lens,
    text_reconstruction,
)
from openpi.latents.analysis.stats.bootstrap import BootstrapCI, SuccessSplit, bootstrap_ci, split_by_success

__all__ = [
    "ActionDivergence",
    "AttentionToLanguage",
    "BootstrapCI",
    "LogitLens",
    "ProbeResult",
    "SuccessSplit",
    "TextReconstruction",
    "action_divergence",
    "attention_mass_onto_keys",
    "attention_to_language",
    "bootstrap_ci",
    "centred_drift",
    "final_rms_norm",
    "informative_text_mask",
    "logit_lens",
    "masked_mean",
    "prompt_sensitivity",
    "rollout_drift",
    "split_by_success",
    "task_probe",
    "text_positions",
    "text_reconstruction",
]
