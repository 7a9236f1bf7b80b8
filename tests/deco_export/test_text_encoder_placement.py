"""Where a text-to-image bundle's text encoder runs and how long it stays in memory:
text_encoder_providers, text_encoder_precision, reduce_memory and unload()."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import runtimes
from deco_export.cli import main
from runtimes.backend import BackendError
from tests.deco_export.test_text_encoders import build_tiny_qwen3

pytest.importorskip("onnxruntime")


def export_with_tiny_encoder(root: Path, checkpoint: Path, *flags: str) -> Path:
    """``deco export onnx`` of the tiny T2I checkpoint at 64x64 with a tiny Qwen3 encoder
    (written to ``root``); returns the bundle."""
    encoder_dir = build_tiny_qwen3(root / "qwen3-48", hidden_size=48)
    result = CliRunner().invoke(main, [
        "export", "onnx", str(checkpoint), str(root / "bundle"), "--image-size", "64x64",
        "--parity-steps", "2", "--text-encoder", str(encoder_dir), *flags])
    assert result.exit_code == 0, result.output
    return root / "bundle"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, golden_t2i_ckpt):
    return export_with_tiny_encoder(tmp_path_factory.mktemp("t2i-encoder"), golden_t2i_ckpt)


def test_reduce_memory_unloads_the_encoder_after_the_prompts_are_encoded(bundle):
    kept = runtimes.load(bundle, text_encoder_providers="cpu")
    assert kept.text_encoder.providers == ["CPUExecutionProvider"]
    want = kept.generate("a photo of a cat", steps=2, seed=1, output_type="np").images
    assert kept.text_encoder._session is not None  # kept for the next generation
    kept.text_encoder.unload()
    assert kept.text_encoder._session is None
    assert np.array_equal(kept("a photo of a cat", steps=2, seed=1, output_type="np").images,
                          want)  # loaded again on demand

    lean = runtimes.load(bundle, reduce_memory=True)
    for _ in range(2):
        got = lean.generate("a photo of a cat", steps=2, seed=1, output_type="np").images
        assert np.array_equal(got, want) and lean.text_encoder._session is None


def test_placement_and_precision_that_cannot_be_met_are_one_line_errors(bundle):
    with pytest.raises(runtimes.BundleError, match="no onnx text_encoder graph at fp16"):
        runtimes.load(bundle, text_encoder_precision="fp16")
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    pipe = runtimes.load(bundle, text_encoder_providers="cuda")
    with pytest.raises(BackendError, match="asked for CUDAExecutionProvider but ONNX Runtime "
                                           "fell back to CPUExecutionProvider") as err:
        pipe.generate("a cat", steps=1)
    assert "\n" not in str(err.value)
