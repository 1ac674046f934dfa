"""Shared test fixtures: the upstream-produced golden fixture lives in tests/data (copied from shared/fixtures)."""

import pathlib

import numpy as np
import pytest

DATA_DIR = pathlib.Path(__file__).parent / "data"
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
