"""Where a text-to-image bundle's text encoder runs and how long it stays in memory:
text_encoder_providers, text_encoder_precision, reduce_memory and unload()."""

from __future__ import annotations

import numpy as np
import pytest

import runtimes
from runtimes.backend import BackendError

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bundle(t2i_text_bundle):
    return t2i_text_bundle


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
