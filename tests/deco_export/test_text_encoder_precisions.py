"""A text-to-image bundle's text encoder at fp16 and int8: written by ``deco export onnx
--text-encoder-precision``, each gated on its features and recorded in the manifest, opened by
``runtimes.load(..., text_encoder_precision=)`` and ``deco sample --text-encoder-precision``,
and a precision the bundle lacks is a one-line error naming the ones it has."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import runtimes
from deco_export.cli import main
from deco_export.export import text_encoder as te
from deco_export.parity import TEXT_ENCODER_MIN_SNR, snr
from deco_export.text_encoders import TransformersTextEncoder
from runtimes import bundle as rb
from runtimes.cpu import int8_kernel
from runtimes.int8 import Int8GateError, Int8KernelWarning, record_int8_gate
from tests.helpers import export_with_tiny_encoder

pytest.importorskip("onnxruntime")

PROMPT = "a photo of a cat"
FILES = {"fp32": "text_encoder.onnx", "fp16": "text_encoder.fp16.onnx",
         "int8": "text_encoder.int8.onnx"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, golden_t2i_ckpt):
    root = tmp_path_factory.mktemp("t2i-encoder-precisions")
    # the image graphs as `t2i_text_bundle` exports them: traced once for both
    bundle = export_with_tiny_encoder(root, golden_t2i_ckpt, "--text-encoder-precision", "fp16",
                                      "--text-encoder-precision", "int8")
    return bundle, root / "qwen3-48"


@pytest.fixture(scope="module")
def reference(exported):
    """The PyTorch fp32 encoder the bundle's were exported from, on one prompt."""
    _, encoder_dir = exported
    return TransformersTextEncoder(encoder_dir, 8).encode([PROMPT])


def test_each_precision_is_written_with_its_gate_on_the_features(exported):
    bundle, _ = exported
    manifest = rb.read_manifest(bundle)
    assert sorted(a.precision for a in manifest.artifacts if a.graph == "text_encoder") == [
        "fp16", "fp32", "int8"]
    for precision in ("fp16", "int8"):
        art = manifest.find_artifact("onnx", "text_encoder", precision)
        assert art.file == FILES[precision] and (bundle / art.file).is_file()
        assert "tokenizer.json" in art.extra_files  # shared with the fp32 encoder
        gate = art.parity["features"]
        assert gate["status"] == "passed"
        assert gate["threshold_db"] == TEXT_ENCODER_MIN_SNR[precision]
        assert gate["snr_db"] >= gate["threshold_db"]
        assert gate["snr_db"] == min(g["snr_db"] for g in art.parity["graphs"])
        assert len(art.parity["graphs"]) == len(te.PARITY_PROMPTS)
    int8 = manifest.find_artifact("onnx", "text_encoder", "int8")
    assert int8.parity["features"]["cpu"]["int8_kernel"] == int8_kernel()
    assert int8.details["quantization"]["quantized_matmuls"] > 0
    # The image graphs stay fp32 only: the encoder's precisions are its own.
    assert {a.precision for a in manifest.artifacts if a.graph != "text_encoder"} == {"fp32"}
    assert rb.verify(bundle) == []


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_load_opens_the_precision_asked_for_and_its_output_holds_the_gate(
        exported, reference, precision):
    bundle, _ = exported
    pipe = runtimes.load(bundle, text_encoder_precision=precision)
    assert pipe.text_encoder.path.name == FILES[precision]
    got = pipe.text_encoder.encode([PROMPT])
    fp32 = runtimes.load(bundle).text_encoder
    assert fp32.path.name == FILES["fp32"]  # the default is unchanged
    assert not np.array_equal(got, fp32.encode([PROMPT]))  # another graph really ran
    assert snr(reference, got) >= TEXT_ENCODER_MIN_SNR[precision]
    images = pipe.generate(PROMPT, steps=2, seed=1, output_type="np").images
    assert images.shape == (1, 3, 64, 64) and np.isfinite(images).all()


def test_sample_runs_the_chosen_encoder_and_records_it(exported, tmp_path):
    from PIL import Image

    def pixels(path):
        with Image.open(path) as image:
            return np.asarray(image)

    bundle, _ = exported
    runs = {}
    for precision in ("int8", "fp32"):
        result = CliRunner().invoke(main, [
            "sample", str(bundle), "--prompt", PROMPT, "--steps", "2",
            "--text-encoder-precision", precision, "--out-dir", str(tmp_path / precision)])
        assert result.exit_code == 0, result.output
        (runs[precision],) = (tmp_path / precision).glob("*.png")
    assert not np.array_equal(pixels(runs["int8"]), pixels(runs["fp32"]))
    again = tmp_path / "again.png"  # --from opens the encoder the image was made with
    result = CliRunner().invoke(main, ["sample", "--from", str(runs["int8"]), "--out",
                                       str(again)])
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(again), pixels(runs["int8"]))


def test_a_precision_the_bundle_lacks_names_the_ones_it_has(exported, tmp_path):
    bundle, _ = exported
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = rb.read_manifest(copy)
    manifest.artifacts = [a for a in manifest.artifacts
                          if (a.graph, a.precision) != ("text_encoder", "fp16")]
    rb.write_manifest(copy, manifest)
    with pytest.raises(runtimes.BundleError,
                       match=r"no onnx text_encoder graph at fp16 \(its text encoder has: "
                             r"fp32, int8\).*--text-encoder-precision fp16") as err:
        runtimes.load(copy, text_encoder_precision="fp16")
    assert "\n" not in str(err.value)
    result = CliRunner().invoke(main, [
        "sample", str(copy), "--prompt", PROMPT, "--steps", "1", "--text-encoder-precision",
        "fp16", "--out", str(tmp_path / "x.png")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "its text encoder has: fp32, int8" in result.output
    assert not (tmp_path / "x.png").exists()


def test_the_gate_refuses_an_encoder_below_it(exported, monkeypatch):
    bundle, encoder_dir = exported
    encoder = TransformersTextEncoder(encoder_dir, 8)
    monkeypatch.setitem(TEXT_ENCODER_MIN_SNR, "int8", 500.0)
    with pytest.raises(te.TextEncoderExportError,
                       match=r"text_encoder.int8.onnx: the int8 text encoder's features on "
                             r"prompt .* have a .* dB SNR against .* below the 500 dB gate; "
                             r"nothing was written"):
        te.text_encoder_parity(encoder, bundle / FILES["int8"], bundle / "tokenizer.json",
                               "int8")


def test_the_int8_encoder_is_checked_against_the_cpu_its_gate_ran_on(exported, tmp_path):
    bundle, _ = exported
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    path = copy / rb.MANIFEST_NAME
    data = json.loads(path.read_text())
    for art in data["artifacts"]:
        if (art["graph"], art["precision"]) == ("text_encoder", "int8"):
            art["parity"]["features"]["cpu"]["int8_kernel"] = "some_other_kernel"
    path.write_text(json.dumps(data))
    with pytest.warns(Int8KernelWarning, match="the int8 text encoder: gated on "
                                               "some_other_kernel int8 kernels"):
        runtimes.load(copy, text_encoder_precision="int8", verify=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Int8KernelWarning)
        runtimes.load(copy, verify=False)  # the fp32 encoder: nothing to say
    result = CliRunner().invoke(main, ["validate", str(copy), "--precision", "fp32",
                                       "--steps", "2"])  # what the warning says to run
    assert result.exit_code == 0, result.output
    assert "text encoder fp16: 4 prompts" in result.output
    assert f"on {int8_kernel()} int8 kernels (recorded): passed" in result.output
    with warnings.catch_warnings():
        warnings.simplefilter("error", Int8KernelWarning)
        runtimes.load(copy, text_encoder_precision="int8")
    record_int8_gate(copy, 12.0, passed=False, threshold_db=30.0, text_encoder=True)
    with pytest.raises(Int8GateError, match="the int8 text encoder: 12.0 dB .* use "
                                            "text_encoder_precision='fp32'"):
        runtimes.load(copy, text_encoder_precision="int8", verify=False)
    runtimes.load(copy, text_encoder_precision="int8", verify=False, allow_below_gate=True)


def test_weights_in_external_data_give_each_precision_its_own_file(exported, tmp_path,
                                                                   monkeypatch):
    """The released Qwen3-1.7B's weights go to external data: the int8 encoder, quantized from
    a copy of the fp32 graph, writes its own data file and leaves fp32's as it was."""
    _, encoder_dir = exported
    monkeypatch.setattr(te, "EXTERNAL_DATA_BYTES", 0)

    class Staged:  # what export_text_encoder asks of a bundle transaction
        def __init__(self):
            self.staging, self.artifacts = tmp_path, {}

        def add_artifact(self, **artifact):
            self.artifacts[artifact["precision"]] = artifact

    encoder = TransformersTextEncoder(encoder_dir, 8)
    txn = Staged()
    te.export_text_encoder(encoder, txn, precisions=("int8",))
    fp32, int8 = txn.artifacts["fp32"], txn.artifacts["int8"]
    assert fp32["details"]["external_data"] and int8["details"]["external_data"]
    assert [p.name for p in fp32["extra_files"]] == ["tokenizer.json", "text_encoder.onnx.data"]
    assert [p.name for p in int8["extra_files"]] == ["tokenizer.json",
                                                     "text_encoder.int8.onnx.data"]
    tokenizer = tmp_path / "tokenizer.json"
    te.text_encoder_parity(encoder, tmp_path / "text_encoder.onnx", tokenizer)  # fp32 intact
    (tmp_path / "text_encoder.onnx.data").unlink()  # int8 needs only its own file
    te.text_encoder_parity(encoder, tmp_path / "text_encoder.int8.onnx", tokenizer, "int8")
