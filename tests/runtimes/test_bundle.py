"""The bundle manifest: one reader, one writer, hash verification, clear errors."""

from __future__ import annotations

import json

import pytest

from runtimes.bundle import (
    MANIFEST_NAME,
    Artifact,
    BundleError,
    Manifest,
    read_manifest,
    sha256_file,
    sha256_path,
    verify,
    write_manifest,
)

MODEL = {
    "hidden_size": 64, "num_heads": 4, "dit_depth": 2, "decoder_hidden_size": 32,
    "decoder_depth": 3, "patch_size": 16, "num_classes": 10, "in_channels": 3,
    "image_size": [64, 64],
}
DIT_IO = {
    "inputs": [{"name": "x_t", "shape": ["batch", 3, 64, 64], "dtype": "float32"},
               {"name": "t", "shape": ["batch"], "dtype": "float32"},
               {"name": "y", "shape": ["batch"], "dtype": "int64"}],
    "outputs": [{"name": "cond", "shape": ["batch", 16, 64], "dtype": "float32"},
                {"name": "hidden", "shape": ["batch", 16, 64], "dtype": "float32"}],
}


@pytest.fixture
def bundle(tmp_path):
    root = tmp_path / "bundle"
    root.mkdir()
    (root / "dit.onnx").write_bytes(b"dit graph" * 10)
    (root / "dit.onnx.data").write_bytes(b"weights" * 10)
    (root / "decoder.onnx").write_bytes(b"decoder graph")
    pkg = root / "decoder.mlpackage" / "Data"
    pkg.mkdir(parents=True)
    (pkg / "model.mlmodel").write_bytes(b"coreml")
    m = Manifest(
        model=MODEL,
        sampler_defaults={"solver": "euler", "steps": 100, "guidance": 3.2,
                          "guidance_interval": [0.1, 1.0], "shift": 1.0},
        source={"path": "ckpt.pt", "sha256": "0" * 64},
        package_version="0.1.0",
    )
    m.add_artifact(Artifact.from_file(root, "onnx", "dit", "fp32", "dit.onnx", **DIT_IO,
                                      details={"opset": 18}, tools={"onnx": "1.23.2"},
                                      extra_files=["dit.onnx.data"]))
    m.add_artifact(Artifact.from_file(root, "onnx", "decoder", "fp32", "decoder.onnx"))
    m.add_artifact(Artifact.from_file(root, "coreml", "decoder", "fp16", "decoder.mlpackage"))
    write_manifest(root, m)
    return root


def test_manifest_round_trip(bundle):
    m = read_manifest(bundle)
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    assert data["format"] == "deco-bundle" and data["format_version"] == 1
    assert m.to_dict() == data
    assert m.model.to_dict() == MODEL and m.model.patch_size == 16
    assert m.model.image_size == (64, 64)
    assert m.model.null_class == 10 and m.sampler_defaults.guidance == 3.2
    art = m.find_artifact("onnx", "dit", "fp32")
    assert art.input("y").dtype == "int64" and art.output("hidden").shape == ["batch", 16, 64]
    assert art.extra_files == {"dit.onnx.data": sha256_path(bundle / "dit.onnx.data")}
    # unknown keys survive a round trip
    data["future"] = {"x": 1}
    data["model"]["t2i"] = False
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    write_manifest(bundle, read_manifest(bundle))
    again = json.loads((bundle / MANIFEST_NAME).read_text())
    assert again["future"] == {"x": 1} and again["model"]["t2i"] is False
    assert [p.name for p in bundle.iterdir() if p.name.endswith(".tmp")] == []
    assert (bundle / MANIFEST_NAME).stat().st_mode & 0o044 == 0o044  # readable, not private


def test_add_artifact_replaces_same_runtime_graph_precision(bundle):
    m = read_manifest(bundle)
    n = len(m.artifacts)
    m.add_artifact(Artifact.from_file(bundle, "onnx", "decoder", "fp32", "dit.onnx"))
    assert len(m.artifacts) == n and m.find_artifact("onnx", "decoder", "fp32").file == "dit.onnx"
    m.add_artifact(Artifact.from_file(bundle, "onnx", "decoder", "fp16", "decoder.onnx"))
    assert len(m.artifacts) == n + 1


def test_verify_names_each_tampered_or_missing_file(bundle):
    assert verify(bundle) == []
    (bundle / "dit.onnx").write_bytes(b"dit graph" * 9 + b"dit grapH")  # same size
    (bundle / "dit.onnx.data").write_bytes(b"x")
    (bundle / "decoder.onnx").unlink()
    (bundle / "decoder.mlpackage" / "Data" / "model.mlmodel").write_bytes(b"coreML")
    problems = verify(bundle)
    assert len(problems) == 4
    by_file = {p.split(":")[0]: p for p in problems}
    assert "sha256" in by_file["dit.onnx"] and "onnx/dit/fp32" in by_file["dit.onnx"]
    assert "sha256" in by_file["dit.onnx.data"]
    assert "1 bytes, the manifest says 70" in by_file["dit.onnx.data"]  # its size is recorded
    assert "missing" in by_file["decoder.onnx"]
    assert "decoder.mlpackage" in by_file
    assert verify(bundle, runtime="coreml") == [by_file["decoder.mlpackage"]]
    (bundle / "dit.onnx").write_bytes(b"short")
    assert "bytes, the manifest says" in verify(bundle, runtime="onnx")[0]


def test_find_artifact_error_lists_what_exists(bundle):
    with pytest.raises(BundleError, match=r"no onnx dit graph at fp16 .*onnx/dit/fp32"):
        read_manifest(bundle).find_artifact("onnx", "dit", "fp16")


def test_read_errors_name_the_problem_and_the_fix(tmp_path, bundle):
    with pytest.raises(BundleError, match="no such bundle directory"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(BundleError, match="export it again"):
        read_manifest(tmp_path)
    path = bundle / MANIFEST_NAME
    data = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(bundle)
    path.write_text(json.dumps({**data, "format_version": 2}))
    with pytest.raises(BundleError, match="upgrade deco-export"):
        read_manifest(bundle)
    del data["model"]["patch_size"]
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="model config lacks patch_size"):
        read_manifest(bundle)
    assert "model config lacks patch_size" in verify(bundle)[0]


def test_artifact_paths_must_stay_inside_the_bundle():
    with pytest.raises(BundleError, match="relative path inside the bundle"):
        Artifact("onnx", "dit", "fp32", "../dit.onnx", "0" * 64, 1)
    with pytest.raises(BundleError, match="runtime must be one of"):
        Artifact("openvino", "dit", "fp32", "dit.xml", "0" * 64, 1)
    with pytest.raises(BundleError, match="positive integer"):
        Manifest(model={**MODEL, "num_classes": "ten"})


def test_the_text_section_is_typed_and_round_trips_byte_for_byte(tmp_path):
    """A text-to-image bundle's "text" section: read into a TextSection, written back as it
    was (key order included), its file verified with the artifacts, its hash checked."""
    import numpy as np

    from runtimes.bundle import TextSection, read_negative_embeds

    embeds = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    np.save(tmp_path / "negative_prompt.npy", embeds, allow_pickle=False)
    section = TextSection.create("", "negative_prompt.npy",
                                 sha256_file(tmp_path / "negative_prompt.npy"),
                                 (tmp_path / "negative_prompt.npy").stat().st_size, embeds.shape)
    manifest = Manifest(model=MODEL, text=section)
    write_manifest(tmp_path, manifest)
    text = (tmp_path / "manifest.json").read_text()
    back = read_manifest(tmp_path)
    assert back.text == section and back.text.embeds_shape == (1, 2, 3)
    assert "text" not in back.extra
    write_manifest(tmp_path, back)
    assert (tmp_path / "manifest.json").read_text() == text
    assert list(json.loads(text)["text"]) == ["negative_prompt", "negative_prompt_embeds"]
    assert np.array_equal(read_negative_embeds(tmp_path, back), embeds)
    assert verify(tmp_path, manifest=back) == []
    (tmp_path / "negative_prompt.npy").write_bytes(b"changed")
    assert any("negative_prompt.npy" in p for p in verify(tmp_path, manifest=back))
    with pytest.raises(BundleError, match="sha256 does not match"):
        read_negative_embeds(tmp_path, back)
