"""--jax-cache-dir and JAX_COMPILATION_CACHE_DIR (openpi.shared.jax_cache): the CLIs point JAX's compile cache there."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import pytest
import tyro

from openpi.latents import collect
from openpi.latents import replay as replay_lib
from openpi.serving import args as serve_args
from openpi.shared import jax_cache

REPO = pathlib.Path(__file__).resolve().parents[1]

# A fresh process: the directory is set before JAX is imported, JAX compiles, and the compiled program is on disk.
_COMPILE_SCRIPT = """
import os, sys
from openpi.shared import jax_cache
os.environ.pop(jax_cache.ENV_VAR, None)
assert jax_cache.configure(None) is None and "jax" not in sys.modules  # neither flag nor variable: nothing set
path = jax_cache.configure(sys.argv[1])
assert "jax" not in sys.modules and os.environ[jax_cache.ENV_VAR] == str(path)
import jax, jax.numpy as jnp
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
assert jax.config.jax_compilation_cache_dir == str(path)
print(float(jax.jit(lambda x: jnp.sin(x) * 3)(jnp.float32(1.0))))
"""


def test_configure_before_jax_loads_caches_what_jax_compiles(tmp_path):
    target = tmp_path / "new" / "cache"  # created by configure
    env = {k: v for k, v in os.environ.items() if k != jax_cache.ENV_VAR}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, str(target)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert abs(float(proc.stdout.split()[-1]) - 3 * 0.8414709848) < 1e-5
    assert target.is_dir() and any(target.iterdir()), "nothing was written to the cache directory"


@pytest.fixture
def restore_session_cache(monkeypatch):
    """Whatever a test points the cache at, the session's cache (conftest) is back afterwards."""
    session_dir = os.environ[jax_cache.ENV_VAR]
    monkeypatch.setenv(jax_cache.ENV_VAR, session_dir)
    yield session_dir
    jax_cache.configure(session_dir)
    assert jax.config.jax_compilation_cache_dir == session_dir


def test_configure_repoints_an_imported_jax_and_honours_the_variable(tmp_path, restore_session_cache):
    flagged = jax_cache.configure(tmp_path / "flag")
    assert jax.config.jax_compilation_cache_dir == str(flagged) == os.environ[jax_cache.ENV_VAR]
    os.environ[jax_cache.ENV_VAR] = str(tmp_path / "from_env")
    assert jax_cache.configure(None) == tmp_path / "from_env"  # no flag: the variable
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "from_env") and (tmp_path / "from_env").is_dir()


def test_a_path_that_cannot_be_a_directory_is_refused_naming_the_flag(tmp_path, restore_session_cache):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(jax_cache.CacheDirError, match=r"--jax-cache-dir .*afile.* pass a writable directory"):
        jax_cache.configure(tmp_path / "afile")
    assert os.environ[jax_cache.ENV_VAR] == restore_session_cache  # nothing changed


def _analysis_args(load_script, argv):
    return tyro.cli(load_script("expert_language_analysis").Args, args=argv)


# Each CLI: its arguments, and a command line that its main refuses (exit 2 or the error) right after the cache is set.
CLIS = {
    "collection": (
        "inference_latent_collection",
        lambda _, argv: tyro.cli(collect.CollectionArgs, args=argv),
        ["--preset", "pi0_libero_tiny", "--task-suite", "nope"],
    ),
    "replay": (
        "replay_collection",
        lambda _, argv: tyro.cli(replay_lib.ReplayArgs, args=argv),
        ["--source", "/no/such"],
    ),
    "server": ("serve_policy", lambda _, argv: tyro.cli(serve_args.ServeArgs, args=argv), ["--preset", "nope"]),
    "analysis": ("expert_language_analysis", _analysis_args, ["--collection", "/no/such/store"]),
}


@pytest.mark.parametrize("name", list(CLIS))
def test_each_cli_flag_sets_the_cache_dir_before_its_checks(name, tmp_path, restore_session_cache, capsys, load_script):
    script_name, parse, refused = CLIS[name]
    assert parse(load_script, refused).jax_cache_dir is None  # default: $JAX_COMPILATION_CACHE_DIR (jax reads it)
    args = parse(load_script, [*refused, "--jax-cache-dir", str(tmp_path / "cache")])
    assert args.jax_cache_dir == str(tmp_path / "cache")
    with pytest.raises((SystemExit, FileNotFoundError, ValueError)) as info:
        load_script(script_name).main(args)
    if isinstance(info.value, SystemExit):
        assert info.value.code == 2
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache") == os.environ[jax_cache.ENV_VAR]
    assert (tmp_path / "cache").is_dir()


def test_collection_cli_refuses_a_cache_path_under_a_file(tmp_path, restore_session_cache, capsys, load_script):
    (tmp_path / "afile").write_text("x")
    args = tyro.cli(
        collect.CollectionArgs, args=["--preset", "pi0_libero_tiny", "--jax-cache-dir", str(tmp_path / "afile" / "c")]
    )
    with pytest.raises(SystemExit) as info:
        load_script("inference_latent_collection").main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: --jax-cache-dir" in err and "Traceback" not in err
