"""Test-session plumbing and shared fixtures.

JAX compilation cache: before anything compiles, the session points JAX's persistent compilation cache at
``$JAX_COMPILATION_CACHE_DIR`` if set, else at pytest's cache directory (``.pytest_cache/d/jax_compilation_cache`` in
the checkout; the temp directory under ``-p no:cacheprovider``; never the home directory), and exports it, so that the
CLI subprocesses, env workers and Ray workers the tests start load what an earlier test compiled. Every entry is
written (``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` defaults to 0 here). On a clean machine the cache starts empty
and saves the subprocesses' compiles; a second run in the same checkout also skips the test process's own.

Markers: ``libero`` (starts the LIBERO simulator; implies ``slow``) and ``slow`` (a test or the module fixture it
needs takes more than ~15 s on 2 cores); ``pytest -m "not slow"`` is the inner loop. A test that makes a LIBERO env
in-process without the ``libero`` marker fails (`_guard_libero_envs`).

Fixtures for everyone (session-scoped, read-only: do not mutate what they return):
- ``load_script("inference_latent_collection")``: a scripts/*.py module, for in-process CLI checks.
- ``tiny_a_dir`` / ``tiny_a_inputs`` / ``tiny_a_expected``: the upstream-produced golden pi0 fixture (tests/data,
  copied from shared/fixtures); ``lora_tiny_a_*`` and ``pi05_*`` likewise for LoRA and pi0.5.
"""

import importlib.util
import os
import pathlib
import sys
import tempfile
import types

import numpy as np
import pytest

from openpi.shared import jax_cache

DATA_DIR = pathlib.Path(__file__).parent / "data"


def pytest_configure(config: pytest.Config) -> None:
    cache_dir = os.environ.get(jax_cache.ENV_VAR)
    if not cache_dir:
        cache = getattr(config, "cache", None)  # None under -p no:cacheprovider
        fallback = pathlib.Path(tempfile.gettempdir()) / f"openpi_jax_cache_{os.getuid()}"
        cache_dir = cache.mkdir("jax_compilation_cache") if cache is not None else fallback
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    jax_cache.configure(cache_dir)
    if "jax" in sys.modules:  # imported before this hook (by a plugin): it read the environment too early
        min_secs = float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"])
        sys.modules["jax"].config.update("jax_persistent_cache_min_compile_time_secs", min_secs)
    _count_cache_use()
    _guard_libero_envs()


# This process's use of the compilation cache, for the line at the end of the run (subprocesses are not counted).
_cache_use = {"hits": 0, "misses": 0, "saved_s": 0.0}


def _count_cache_use() -> None:
    from jax import monitoring

    events = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}

    def on_event(event: str, **_) -> None:
        if event in events:
            _cache_use[events[event]] += 1

    def on_duration(event: str, secs: float, **_) -> None:
        if event == "/jax/compilation_cache/compile_time_saved_sec":
            _cache_use["saved_s"] += secs

    monitoring.register_event_listener(on_event)
    monitoring.register_event_duration_secs_listener(on_duration)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    use = _cache_use
    if not use["hits"] + use["misses"]:
        return  # nothing compiled in this process (collection only, or the tests ran in worker processes)
    terminalreporter.write_line(
        f"JAX compilation cache {os.environ.get(jax_cache.ENV_VAR)}: {use['hits']} hits ({use['saved_s']:.0f} s of "
        f"compiling saved), {use['misses']} misses in the test process"
    )


# True while the running test (setup, call, teardown) is marked `libero`; a LiberoEnv made otherwise fails the test,
# so that `-m "not libero"` really leaves the simulator out (env workers in subprocesses are not seen here).
_libero_allowed = True


def _guard_libero_envs() -> None:
    from openpi.envs import libero as libero_env

    real_init = libero_env.LiberoEnv.__init__

    def guarded_init(self, *args, **kwargs):
        if not _libero_allowed:
            pytest.fail("this test starts a LIBERO env: mark it @pytest.mark.libero", pytrace=False)
        real_init(self, *args, **kwargs)

    libero_env.LiberoEnv.__init__ = guarded_init


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A LIBERO test starts a simulator (~10 s on 2 cores before the first step): slow by definition.
    for item in items:
        if item.get_closest_marker("libero") is not None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    global _libero_allowed
    _libero_allowed = item.get_closest_marker("libero") is not None
    try:
        yield
    finally:
        _libero_allowed = True


TINY_A = DATA_DIR / "pi0_tiny_a"
# The LoRA fixture's inputs are pi0_tiny_a's (same seeds; checked equal when copied), so only expected.npz is kept.
LORA_TINY_A = DATA_DIR / "pi0_lora_tiny_a"


@pytest.fixture(scope="session")
def tiny_a_dir() -> pathlib.Path:
    return TINY_A


@pytest.fixture(scope="session")
def tiny_a_inputs() -> dict[str, np.ndarray]:
    with np.load(TINY_A / "inputs.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def tiny_a_expected() -> dict[str, np.ndarray]:
    with np.load(TINY_A / "expected.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def lora_tiny_a_dir() -> pathlib.Path:
    return LORA_TINY_A


@pytest.fixture(scope="session")
def lora_tiny_a_expected() -> dict[str, np.ndarray]:
    with np.load(LORA_TINY_A / "expected.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# pi0.5 (tests/data/pi05_tiny_a, copied from shared/fixtures; format in its README_pi05.md).
PI05_TINY_A = DATA_DIR / "pi05_tiny_a"


@pytest.fixture(scope="session")
def pi05_dir() -> pathlib.Path:
    return PI05_TINY_A


@pytest.fixture(scope="session")
def pi05_inputs() -> dict[str, np.ndarray]:
    with np.load(PI05_TINY_A / "inputs.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def pi05_expected() -> dict[str, np.ndarray]:
    with np.load(PI05_TINY_A / "expected.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


SCRIPTS_DIR = pathlib.Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="session")
def load_script():
    """``load_script("serve_policy")``: the module scripts/serve_policy.py, imported once per session.

    For refusal checks that only need argument parsing: ``tyro.cli(module.Args, args=[...])`` then ``module.main``
    in-process, instead of a subprocess that imports JAX again (seconds each on 2 cores).
    """
    loaded: dict[str, types.ModuleType] = {}

    def load(name: str) -> types.ModuleType:
        if name not in loaded:
            spec = importlib.util.spec_from_file_location(f"scripts_{name}", SCRIPTS_DIR / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses look their module up there
            spec.loader.exec_module(module)
            loaded[name] = module
        return loaded[name]

    return load
