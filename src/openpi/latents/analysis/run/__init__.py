"""The run: :mod:`.driver` (:func:`analyze_collection`, the per-layer driver), :mod:`.result` (what it returns,
:class:`CollectionAnalysis`, and its summaries), :mod:`.denoise_sensitivity` (expert 1 per denoising step) and
:mod:`.language_loss` (the openpi-style per-layer language-loss view)."""
