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


@pytest.fixture(scope="session")
def golden_onnx_bundle(tmp_path_factory, golden_model, golden_ckpt) -> Path:
    """The golden class-conditional model as an fp32 ONNX bundle (64x64, sizes 32..128)."""
    from deco_export.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("golden-onnx") / "bundle"
    export_onnx(golden_model, out, precisions=("fp32",), image_size=(64, 64),
                source={"path": str(golden_ckpt)}, parity_steps=2)
    return out


@pytest.fixture(scope="session")
def golden_t2i_onnx_bundle(tmp_path_factory, golden_t2i_model, golden_t2i_ckpt,
                           golden_t2i) -> Path:
    """The golden text-to-image model as an fp32 ONNX bundle with its stored negative prompt
    (no text encoder: callers pass text features as ``prompt_embeds``)."""
    from deco_export.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("golden-t2i-onnx") / "bundle"
    export_onnx(golden_t2i_model, out, precisions=("fp32",), image_size=(64, 64),
                source={"path": str(golden_t2i_ckpt)}, parity_steps=2,
                negative_prompt_embeds=golden_t2i["uncond_text"][:1], negative_prompt="")
    return out
