"""The registered metrics: :mod:`.registry` (``REGISTRY``, the one list; adding a metric is one compute function
plus one entry there), the compute functions of the per-step metrics (:mod:`.step`), of the pooled ones
(:mod:`.pooled`, over the rows of :mod:`.pooled_rows`) and matched-observation prompt decoding
(:mod:`.prompt_decoding`). Definitions are the numbers of :mod:`openpi.latents.analysis.measures`."""
