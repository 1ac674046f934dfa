"""Data access: what was stored and how the analysis reads it.

:mod:`.source` (one reader over a store, pickles or task dicts, one layer at a time), :mod:`.labels` (model layer /
denoising-step ids from the manifest), :mod:`.streams` (the three streams and their valid cameras), :mod:`.embedding`
(the token embedding for text decoding) and :mod:`.accessors` (notebook accessors).
"""
