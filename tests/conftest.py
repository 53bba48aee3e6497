"""Shared fixtures: small datasets on disk in the real layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import random_pair, write_pair


@pytest.fixture
def small_root(tmp_path: Path) -> Path:
    """Six train and two test pairs of random content, 64x48."""
    rng = np.random.default_rng(0)
    for i in range(6):
        write_pair(tmp_path, "train", f"t{i}", *random_pair(rng))
    for i in range(2):
        write_pair(tmp_path, "test", f"v{i}", *random_pair(rng))
    return tmp_path


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic aerial set (generated once per test session)."""
    from segtune.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, n_train=24, n_test=8, size=(128, 96), seed=0, progress=False)
    return root
