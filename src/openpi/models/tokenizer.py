"""The PaliGemma SentencePiece tokenizer in pi0's prompt format.

pi0 format: the prompt is cleaned (``strip()``, ``_`` -> space, newline -> space), encoded with BOS, followed by the
separately encoded ``"\\n"`` ("start of answer"); no EOS. The result is zero-padded to ``max_len`` with a boolean
mask that is True on real tokens, or truncated to ``max_len`` (with a warning; this drops the ``"\\n"`` token).

pi0.5 with discrete state input (shared/spec/pi05.md section 7): the normalised state is discretised into 256 bins
over [-1, 1) (`discretize_state`) and the whole string ``"Task: {prompt}, State: {bins};\\nAction: "`` is encoded in
one call with BOS (no separate ``"\\n"`` token, no EOS); padding / truncation as above.
"""

from __future__ import annotations

import logging
import os
import pathlib

import numpy as np
import sentencepiece
from jaxtyping import Bool, Int

from openpi.shared import download

logger = logging.getLogger(__name__)

PALIGEMMA_TOKENIZER_URL = "gs://big_vision/paligemma_tokenizer.model"


def clean_prompt(prompt: str) -> str:
    """pi0's prompt cleaning: strip, then underscores and newlines become spaces."""
    return prompt.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state: np.ndarray) -> Int[np.ndarray, " d"]:
    """pi0.5's state bins: `digitize(s, linspace(-1, 1, 257)[:-1]) - 1`, so [-1 + k/128, -1 + (k+1)/128) -> k,
    s >= 1 - 1/128 -> 255 and s < -1 -> -1 (no clipping; values outside [-1, 1] saturate at 255 / -1)."""
    edges = np.linspace(-1, 1, 256 + 1)[:-1]
    return np.digitize(np.asarray(state), bins=edges) - 1


def discrete_state_prompt(prompt: str, state: np.ndarray) -> str:
    """The exact string pi0.5 tokenises with discrete state input (the state: normalised, unpadded)."""
    bins = " ".join(str(int(b)) for b in discretize_state(state))
    return f"Task: {clean_prompt(prompt)}, State: {bins};\nAction: "


class PaligemmaTokenizer:
    """Tokenizes prompts for pi0.

    Args:
        max_len: the token budget (pi0: 48).
        model_path: a SentencePiece ``.model`` file (local path or URL). None fetches PaliGemma's tokenizer from
            ``gs://big_vision/paligemma_tokenizer.model`` through the download cache (needs the ``gcs`` extra once).
    """

    def __init__(self, max_len: int = 48, model_path: str | os.PathLike | None = None) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be positive, got {max_len}.")
        self._max_len = int(max_len)
        path = download.maybe_download(PALIGEMMA_TOKENIZER_URL if model_path is None else model_path)
        self._model_path = pathlib.Path(path)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(self._model_path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self._model_path} is not a readable SentencePiece model ({e}).") from e

    @property
    def max_len(self) -> int:
        return self._max_len

    @property
    def model_path(self) -> pathlib.Path:
        return self._model_path

    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    def tokenize(
        self, prompt: str, state: np.ndarray | None = None
    ) -> tuple[Int[np.ndarray, " max_len"], Bool[np.ndarray, " max_len"]]:
        """Returns (tokens int32 [max_len], mask bool [max_len]): pi0's format, or with `state` (normalised,
        unpadded) pi0.5's discrete-state format."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}.")
        if state is None:
            tokens = list(self._sp.Encode(clean_prompt(prompt), add_bos=True)) + list(self._sp.Encode("\n"))
        else:
            tokens = list(self._sp.Encode(discrete_state_prompt(prompt, state), add_bos=True))
        n = len(tokens)
        if n > self._max_len:
            logger.warning(
                "Prompt has %d tokens, more than max_len=%d: truncating it (this drops its end: the '\\n' token, or "
                "the state's ';\\nAction: ' and possibly digits). Prompt: %r",
                n,
                self._max_len,
                prompt,
            )
        n_kept = min(n, self._max_len)
        out = np.zeros(self._max_len, dtype=np.int32)
        out[:n_kept] = tokens[:n_kept]
        mask = np.zeros(self._max_len, dtype=bool)
        mask[:n_kept] = True
        return out, mask

    def decode(self, tokens: Int[np.ndarray, " n"] | list[int]) -> str:
        """Decode token ids (padding zeros should be removed first) back to text."""
        return self._sp.Decode([int(t) for t in np.asarray(tokens).reshape(-1)])

    def id_to_piece(self, token: int) -> str:
        return self._sp.IdToPiece(int(token))
