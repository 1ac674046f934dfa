"""openpi.shared.cli: logging that prints despite absl, library fixes worded as the flags a user types."""

from __future__ import annotations

import logging

import pytest

from openpi.shared import cli


def test_cli_message_rewrites_only_the_named_parameters():
    flags = {"asset_id": "--asset-id", "allow_pickle": "--allow-pickle", "checkpoint_dir": "--checkpoint"}
    message = "Pass asset_id=... with one of them; opened only with allow_pickle=True; pass checkpoint_dir=..."
    assert cli.cli_message(message, flags) == (
        "Pass --asset-id with one of them; opened only with --allow-pickle; pass --checkpoint"
    )
    # Other names, a value that is not a placeholder, and a longer name that ends in a listed one stay as they are.
    kept = "seed=3, allow_pickle=False, my_asset_id=..., x.asset_id=..."
    assert cli.cli_message(kept, flags) == kept


def test_configure_logging_overrides_a_root_handler_installed_before():
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    openpi_logger = logging.getLogger("openpi")
    saved_openpi_level = openpi_logger.level
    stray = logging.NullHandler()  # what absl installs at import: a later basicConfig() is then a no-op
    root.addHandler(stray)
    try:
        cli.configure_logging()
        assert stray not in root.handlers
        assert logging.getLogger("openpi.latents.collect.run").isEnabledFor(logging.INFO)
        assert not logging.getLogger("orbax").isEnabledFor(logging.INFO)
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
        openpi_logger.setLevel(saved_openpi_level)


def test_analysis_cli_names_the_allow_pickle_flag(tmp_path, load_script, capsys):
    """The analysis command line in-process (argument parsing and the refusal only need the script, not a new JAX)."""
    pickles = tmp_path / "inference_latents"
    pickles.mkdir()
    (pickles / "task_0_t.pkl").write_bytes(b"not opened")
    with pytest.raises(SystemExit) as info:
        load_script("expert_language_analysis").cli_main(["--collection", str(tmp_path)])
    err = capsys.readouterr().err
    assert info.value.code == 2, err[-3000:]
    assert "--allow-pickle" in err and "allow_pickle=True" not in err
    assert "Traceback" not in err
