"""Comparisons: :mod:`.behaviour` (closed-loop conditions against their paired baseline) and two models on the same
episodes (:mod:`.model_matching`: the check that they match; :mod:`.model_comparison`: paired success and per-layer
metrics side by side)."""
