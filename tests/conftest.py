from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import FIXTURES, GOLDEN_CKPT, GOLDEN_T2I_CKPT


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "deco_tiny_64.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def golden_meta() -> dict:
    return json.loads((FIXTURES / "deco_tiny_64.json").read_text())


@pytest.fixture(scope="session")
def golden_ckpt() -> Path:
    return GOLDEN_CKPT


@pytest.fixture(scope="session")
def golden_model():
    from deco_export.checkpoint import load_reference

    return load_reference(GOLDEN_CKPT, image_size=(64, 64))


@pytest.fixture(scope="session")
def golden_t2i() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "deco_t2i_tiny_64.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def golden_t2i_meta() -> dict:
    return json.loads((FIXTURES / "deco_t2i_tiny_64.json").read_text())


@pytest.fixture(scope="session")
def golden_t2i_ckpt() -> Path:
    return GOLDEN_T2I_CKPT


@pytest.fixture(scope="session")
def golden_t2i_model():
    from deco_export.checkpoint import load_reference

    return load_reference(GOLDEN_T2I_CKPT, image_size=(64, 64))
