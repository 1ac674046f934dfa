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


def _collection_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "inference_latent_collection.py"), *argv],
        capture_output=True, text=True, timeout=300, cwd=REPO, check=False,
    )  # fmt: skip


def test_collection_help_lists_every_suite_and_list_tasks_prints_a_suite():
    from openpi.envs import libero

    proc = _collection_cli("--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = " ".join(proc.stdout.replace("│", " ").split())  # the help without its box and line wrapping
    assert f"libero: {', '.join(libero.SUITES)}." in text  # all 21 suites, not the 5 standard ones
    assert "--list-tasks" in proc.stdout

    listing = _collection_cli("--list-tasks", "--task-suite", "libero_goal")
    assert listing.returncode == 0, listing.stderr[-2000:]
    rows = listing.stdout.splitlines()[1:]
    assert len(rows) == 10  # libero_goal has 10 tasks
    assert "open the middle drawer of the cabinet" in rows[0] and rows[0].split()[0] == "0"
    bad = _collection_cli("--list-tasks", "--task-suite", "libero_nope")
    assert bad.returncode == 2 and "libero_goal_lan" in bad.stderr  # the error lists the valid suites


def test_collection_answers_openpi_flag_spellings_with_its_own():
    proc = _collection_cli("--task-suite-name", "libero_goal", "--num-trials-per-task=3")
    assert proc.returncode == 2
    assert "--task-suite-name is openpi's spelling; here use --task-suite." in proc.stderr
    assert "--num-trials-per-task is openpi's spelling; here use --episodes-per-task" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_outputs_are_git_ignored_and_readme_shows_the_combined_sync():
    for path in ("data/run/zarr.json", "reports/goal/report.md"):
        proc = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, check=False)
        assert proc.returncode == 0, f"{path} is not ignored by .gitignore"
    readme = (REPO / "README.md").read_text()
    assert "removes the others" in readme  # uv sync --extra gcs uninstalls the earlier extras: said, with the fix
    assert "uv sync --extra ray --extra s3 --extra gcs" in readme
