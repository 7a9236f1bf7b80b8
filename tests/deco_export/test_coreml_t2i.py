"""Core ML export of the golden text-to-image model: the DiT package takes (x_t, t,
text_tokens) and the text_embed package text float32 (B, L, C), the bundle stores the encoded
negative prompt as an ONNX bundle does, and a bundle source passes its stored encoding on.
Conversion runs everywhere coremltools is installed; prediction only on macOS."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from deco_export.export import coreml as cm
from deco_export.export.bundle_io import NEGATIVE_EMBEDS_NAME
from runtimes import bundle as rb
from runtimes.graphs import get_graph, graphs_for
from runtimes.pipeline import bundle_negative_embeds

pytest.importorskip("coremltools", reason="coremltools is not installed "
                                          "(pip install 'deco-export[coreml]')")
macos_only = pytest.mark.skipif(
    sys.platform != "darwin",
    reason=f"Core ML predicts only on macOS; on {sys.platform} the converted structure is "
           "tested instead",
)

TEXT_LEN, TEXT_DIM = 8, 48  # the golden T2I model's text encoder shape


@pytest.fixture(scope="module")
def t2i_coreml(tmp_path_factory, golden_t2i_model, golden_t2i_ckpt, golden_t2i):
    out = tmp_path_factory.mktemp("coreml-t2i") / "bundle"
    cm.export_coreml(golden_t2i_model, out, precisions=("fp16",), batch_sizes=(4,),
                     source={"path": str(golden_t2i_ckpt)},
                     negative_prompt_embeds=golden_t2i["uncond_text"][:1], negative_prompt="")
    return out


def test_dit_package_takes_text_features(t2i_coreml, golden_t2i_model):
    import coremltools as ct

    manifest = rb.read_manifest(t2i_coreml)
    dit = manifest.get_artifact("coreml", "dit", "fp16")
    assert dit is not None and dit.file == "dit.fp16.mlpackage"
    hidden = golden_t2i_model.config.hidden_size
    assert [(s.name, s.dtype) for s in dit.inputs] == [
        ("x_t", "float32"), ("t", "float32"), ("text_tokens", "float32")]
    assert dit.input("text_tokens").shape == ["batch", TEXT_LEN, hidden]
    assert dit.details["batch_shapes"] == {"x_t": "enumerated", "t": "range",
                                           "text_tokens": "range"}
    assert dit.parity["status"] == "not run" or sys.platform == "darwin"
    report = cm.inspect_package(t2i_coreml / dit.file)
    inputs = {i["name"]: i for i in report["inputs"]}
    assert list(inputs) == ["x_t", "t", "text_tokens"]
    tokens = inputs["text_tokens"]
    assert tokens["dtype"] == "float32" and tokens["shape"] == [1, TEXT_LEN, hidden]
    assert tokens["range"][0] == [1, 4]  # the batch follows x_t's enumerated 1, 2, 4
    assert "text_embed" in tokens["description"]
    assert inputs["x_t"]["enumerated"] == [[b, 3, 64, 64] for b in (1, 2, 4)]
    assert {o["name"]: o["dtype"] for o in report["outputs"]} == {
        "cond": "float32", "hidden": "float32"}
    assert report["metadata"]["short_description"] == get_graph("dit", manifest.model).description
    assert json.loads(report["metadata"]["user"]["deco.config"])["family"] == "t2i"
    spec = ct.models.MLModel(str(t2i_coreml / dit.file), skip_model_load=True).get_spec()
    assert [i.name for i in spec.description.input] == ["x_t", "t", "text_tokens"]
    embed = manifest.get_artifact("coreml", "text_embed", "fp16")
    assert embed.input("text").shape == ["batch", TEXT_LEN, TEXT_DIM]
    assert embed.output("text_tokens").shape == ["batch", TEXT_LEN, hidden]
    text = {i["name"]: i for i in cm.inspect_package(t2i_coreml / embed.file)["inputs"]}["text"]
    assert text["dtype"] == "float32" and "negative_prompt.npy" in text["description"]
    # the graphs the family shares with c2i (decoder, refresh, ...) convert unchanged
    assert {a.graph for a in manifest.artifacts if a.runtime == "coreml"} == set(
        graphs_for(golden_t2i_model.config))
    assert rb.verify(t2i_coreml) == []


def test_bundle_stores_the_encoded_negative_prompt(t2i_coreml, golden_t2i):
    manifest = rb.read_manifest(t2i_coreml)
    text = manifest.text.to_dict()
    assert text["negative_prompt"] == ""
    assert text["negative_prompt_embeds"]["file"] == NEGATIVE_EMBEDS_NAME
    assert text["negative_prompt_embeds"]["shape"] == [1, TEXT_LEN, TEXT_DIM]
    stored = bundle_negative_embeds(t2i_coreml, manifest)
    assert np.array_equal(stored, golden_t2i["uncond_text"][:1])


def test_bundle_source_passes_its_negative_prompt_on(t2i_coreml, golden_t2i, tmp_path):
    """`deco export coreml BUNDLE OUT`: the checkpoint the bundle names is converted and OUT
    stores the bundle's encoded negative prompt (no text encoder needed)."""
    from deco_export.cli import main

    out = tmp_path / "again"
    result = CliRunner().invoke(main, ["export", "coreml", str(t2i_coreml), str(out),
                                       "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    manifest = rb.read_manifest(out)
    assert manifest.get_artifact("coreml", "dit", "fp32").input("text_tokens").dtype == (
        "float32")
    assert np.array_equal(bundle_negative_embeds(out, manifest), golden_t2i["uncond_text"][:1])
    assert manifest.text.negative_prompt == ""


def test_class_conditional_export_refuses_a_text_encoder(golden_ckpt, tmp_path):
    from deco_export.cli import main

    result = CliRunner().invoke(main, ["export", "coreml", str(golden_ckpt), str(tmp_path / "b"),
                                       "--text-encoder", "minilm"])
    assert result.exit_code == 2 and "for text-to-image models" in result.output


@macos_only
def test_macos_golden_sample_through_coreml(t2i_coreml, golden_t2i):
    import runtimes

    pipe = runtimes.load(t2i_coreml, backend="coreml", precision="fp16")
    out = pipe.generate(prompt_embeds=golden_t2i["cond_text"], steps=12, shift=3.0,
                        noise=golden_t2i["noise"], output_type="np")
    from deco_export.parity import psnr

    assert psnr(golden_t2i["sample"], np.asarray(out.images), data_range=2.0) > 35


def test_backend_checks_package_io_against_the_family_record(t2i_coreml, golden_t2i_model):
    """What the Core ML backend checks on every package it loads (on macOS): the converted
    T2I DiT matches the t2i record and is refused where a class-conditional DiT is expected."""
    import coremltools as ct

    from runtimes.backend import BackendError
    from runtimes.backends.coreml import check_package_io
    from runtimes.config import ModelConfig

    t2i = golden_t2i_model.config
    c2i = ModelConfig(hidden_size=64, num_heads=4, dit_depth=2, patch_size=16, num_classes=10,
                      image_size=(64, 64))
    dit = t2i_coreml / "dit.fp16.mlpackage"
    spec = ct.utils.load_spec(str(dit))
    check_package_io(dit, "dit", t2i, spec)
    with pytest.raises(BackendError, match=r"inputs \['x_t', 't', 'text_tokens'\].*expected "
                                           r"\['x_t', 't', 'y'\].*deco export coreml"):
        check_package_io(dit, "dit", c2i, spec)
    decoder = t2i_coreml / "decoder.fp16.mlpackage"
    for config in (t2i, c2i):  # the decoder is the same graph in both families
        check_package_io(decoder, "decoder", config, ct.utils.load_spec(str(decoder)))
