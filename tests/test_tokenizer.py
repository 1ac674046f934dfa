"""PaligemmaTokenizer in pi0 format, checked against the upstream-produced fixture (tiny SentencePiece model)."""

import logging

import numpy as np
import pytest

from openpi.models import tokenizer as _tokenizer
from openpi.shared import download


@pytest.fixture(scope="module")
def tok(tiny_a_dir):
    return _tokenizer.PaligemmaTokenizer(max_len=48, model_path=tiny_a_dir / "tokenizer.model")


def test_matches_upstream_fixture(tok, tiny_a_inputs):
    prompt = str(tiny_a_inputs["prompt"][0])
    tokens, mask = tok.tokenize(prompt)
    assert tokens.dtype == np.int32 and tokens.shape == (48,)
    assert mask.dtype == np.bool_ and mask.shape == (48,)
    np.testing.assert_array_equal(tokens, tiny_a_inputs["tokenized_prompt"][0])
    np.testing.assert_array_equal(mask, tiny_a_inputs["tokenized_prompt_mask"][0])


def test_format_bos_pieces_newline_padding(tok, tiny_a_inputs):
    # Fixture README: <bos>=2, "\n"=4, pad 0.
    tokens, mask = tok.tokenize("put the black bowl on the plate")
    n = int(mask.sum())
    assert tokens[0] == 2 and tokens[n - 1] == 4
    assert not mask[n:].any() and (tokens[n:] == 0).all()
    assert tok.decode(tokens[1 : n - 1]) == "put the black bowl on the plate"


def test_cleaning(tok):
    # strip, '_' -> ' ', '\n' -> ' ' before encoding.
    a = tok.tokenize("  put_the black\nbowl on the plate \n")
    b = tok.tokenize("put the black bowl on the plate")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_truncation_warns_and_drops_newline(tiny_a_dir, caplog):
    short = _tokenizer.PaligemmaTokenizer(max_len=5, model_path=tiny_a_dir / "tokenizer.model")
    full = _tokenizer.PaligemmaTokenizer(max_len=48, model_path=tiny_a_dir / "tokenizer.model")
    prompt = "put the black bowl on the plate"
    full_tokens, full_mask = full.tokenize(prompt)
    assert full_mask.sum() > 5
    with caplog.at_level(logging.WARNING, logger=_tokenizer.__name__):
        tokens, mask = short.tokenize(prompt)
    assert "truncating" in caplog.text
    np.testing.assert_array_equal(tokens, full_tokens[:5])
    assert mask.all() and 4 not in tokens.tolist()


def test_exact_fit_no_warning(tiny_a_dir, caplog):
    n = int(_tokenizer.PaligemmaTokenizer(48, tiny_a_dir / "tokenizer.model").tokenize("put the bowl")[1].sum())
    exact = _tokenizer.PaligemmaTokenizer(max_len=n, model_path=tiny_a_dir / "tokenizer.model")
    with caplog.at_level(logging.WARNING, logger=_tokenizer.__name__):
        tokens, mask = exact.tokenize("put the bowl")
    assert caplog.text == "" and mask.all() and tokens[-1] == 4


def test_default_model_path_goes_through_download_cache(tiny_a_dir, monkeypatch):
    seen = []

    def fake_download(url, **kwargs):
        seen.append(url)
        return tiny_a_dir / "tokenizer.model"

    monkeypatch.setattr(download, "maybe_download", fake_download)
    tok = _tokenizer.PaligemmaTokenizer()
    assert seen == ["gs://big_vision/paligemma_tokenizer.model"]
    assert tok.max_len == 48


def test_bad_model_file(tmp_path):
    bad = tmp_path / "x.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="not a readable SentencePiece model"):
        _tokenizer.PaligemmaTokenizer(model_path=bad)
    with pytest.raises(FileNotFoundError):
        _tokenizer.PaligemmaTokenizer(model_path=tmp_path / "missing.model")
