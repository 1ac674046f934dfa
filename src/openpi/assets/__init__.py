"""Package data: small assets shipped with the wheel.

* ``pi0_libero_tiny/``: the tokenizer and norm stats of the ``pi0_libero_tiny`` policy preset, so that it runs with
  no download. ``tokenizer.model`` is a tiny SentencePiece BPE (400 pieces; pad 0, eos 1, bos 2, unk 3, ``"\\n"`` 4),
  NOT PaliGemma's; ``norm_stats.json`` is identity-like (mean 0, std 1, q01 -1, q99 1; state 8 dims, actions 7).
"""

import importlib.resources
import pathlib


def asset_dir(name: str) -> pathlib.Path:
    """The directory of the shipped asset set `name` (e.g. ``"pi0_libero_tiny"``)."""
    path = pathlib.Path(str(importlib.resources.files(__name__) / name))
    if not path.is_dir():
        raise FileNotFoundError(
            f"Packaged asset set {name!r} not found at {path}; is the openpi package installed completely?"
        )
    return path
