"""ONNX export of the golden model: golden parity through ONNX Runtime, the gate, validate."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import runtimes
from deco_export import parity
from deco_export.cli import main
from deco_export.export.onnx import export_onnx
from deco_export.validate import validate_bundle


@pytest.fixture(scope="module")
def golden_bundle(tmp_path_factory, golden_model, golden_ckpt):
    out = tmp_path_factory.mktemp("export") / "bundle"
    export_onnx(golden_model, out, precisions=("fp32", "fp16"), image_size=(64, 64),
                source={"path": str(golden_ckpt)}, parity_steps=4)
    return out


def test_bundle_layout_and_manifest(golden_bundle):
    names = sorted(p.name for p in golden_bundle.iterdir())
    assert names == ["decoder.fp16.onnx", "decoder.onnx", "dit.fp16.onnx", "dit.onnx",
                     "manifest.json", "refresh.fp16.onnx", "refresh.onnx"]
    manifest = json.loads((golden_bundle / "manifest.json").read_text())
    assert manifest["model"]["image_size"] == [64, 64]
    dit = next(a for a in manifest["artifacts"]
               if (a["runtime"], a["graph"], a["precision"]) == ("onnx", "dit", "fp32"))
    assert [i["name"] for i in dit["inputs"]] == ["x_t", "t", "y"]
    assert dit["inputs"][0]["shape"] == ["batch", 3, 64, 64]
    assert [o["name"] for o in dit["outputs"]] == ["cond", "hidden"]
    assert dit["details"]["opset"] == 18
    assert {g["batch"] for g in dit["parity"]["graphs"]} == {1, 3}
    assert all(g["max_abs_error"] <= 1e-4 for g in dit["parity"]["graphs"])
    assert dit["parity"]["end_to_end"]["psnr_db"] is None or \
        dit["parity"]["end_to_end"]["psnr_db"] >= 60
    fp16 = next(a for a in manifest["artifacts"]
                if (a["graph"], a["precision"]) == ("decoder", "fp16"))
    assert fp16["parity"]["end_to_end"]["psnr_db"] >= 35
    assert "onnxruntime" in dit["tools"] and "torch" in dit["tools"]


@pytest.mark.parametrize("cfg_mode", ["reference", "fast"])
def test_golden_sample_through_onnxruntime(golden_bundle, golden, cfg_mode):
    pipe = runtimes.load(golden_bundle, backend="onnxruntime")
    out = pipe.generate(class_labels=golden["labels"].tolist(), steps=12, guidance=3.2,
                        guidance_interval=(0.1, 1.0), noise=golden["noise"], output_type="np",
                        cfg_mode=cfg_mode)
    assert np.abs(np.asarray(out.images) - golden["sample"]).max() < 1e-4
    u8 = pipe.generate(class_labels=golden["labels"].tolist(), steps=12, guidance=3.2,
                       noise=golden["noise"], output_type="uint8", cfg_mode=cfg_mode).images
    assert np.abs(np.asarray(u8).astype(int) - golden["image_uint8"].astype(int)).max() <= 1


def test_fp16_bundle_is_close(golden_bundle, golden):
    pipe = runtimes.load(golden_bundle, backend="onnxruntime", precision="fp16")
    out = pipe.generate(class_labels=golden["labels"].tolist(), steps=12, guidance=3.2,
                        noise=golden["noise"], output_type="np")
    assert parity.psnr(golden["sample"], np.asarray(out.images), data_range=2.0) >= 35


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, golden_model, golden_ckpt):
    out = tmp_path_factory.mktemp("export-int8") / "bundle"
    export_onnx(golden_model, out, precisions=("int8",), image_size=(64, 64),
                source={"path": str(golden_ckpt)}, parity_steps=4)
    return out


def test_int8_graphs_hold_int8_weights_and_pass_the_gate(int8_bundle, golden_ckpt):
    import onnx

    manifest = json.loads((int8_bundle / "manifest.json").read_text())
    for graph in ("dit", "decoder"):
        art = next(a for a in manifest["artifacts"] if (a["graph"], a["precision"]) ==
                   (graph, "int8"))
        assert art["file"] == f"{graph}.int8.onnx"
        assert art["parity"]["end_to_end"]["psnr_db"] >= parity.END_TO_END_MIN_PSNR["int8"]
        model = onnx.load(str(int8_bundle / art["file"]))
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("MatMulInteger") == art["details"]["quantization"]["quantized_matmuls"]
        assert art["details"]["quantization"]["quantized_matmuls"] > 0
        int8_weights = [i for i in model.graph.initializer
                        if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
        assert len(int8_weights) >= art["details"]["quantization"]["quantized_matmuls"] - 2
        assert [i.type.tensor_type.elem_type for i in model.graph.input] == \
            [onnx.TensorProto.FLOAT if i.name != "y" else onnx.TensorProto.INT64
             for i in model.graph.input]
    lines = validate_bundle(int8_bundle, checkpoint=str(golden_ckpt), steps=2)
    assert any("onnx int8" in line and "passed" in line for line in lines)


def test_int8_bundle_samples_close_to_the_golden(int8_bundle, golden):
    pipe = runtimes.load(int8_bundle, backend="onnxruntime", precision="int8")
    out = pipe.generate(class_labels=golden["labels"].tolist(), steps=12, guidance=3.2,
                        noise=golden["noise"], output_type="np")
    assert parity.psnr(golden["sample"], np.asarray(out.images), data_range=2.0) >= 40


def test_export_rejects_an_unknown_precision(tmp_path, golden_model):
    with pytest.raises(ValueError, match=r"one of \['fp32', 'fp16', 'int8'\], not 'int4'"):
        export_onnx(golden_model, tmp_path / "b", precisions=("int4",), image_size=(64, 64))
    assert list(tmp_path.iterdir()) == []


def test_failed_gate_leaves_nothing(tmp_path, golden_model, monkeypatch):
    monkeypatch.setitem(parity.GRAPH_MAX_ABS, "fp32", 0.0)
    out = tmp_path / "bundle"
    with pytest.raises(parity.ParityError, match="nothing was written"):
        export_onnx(golden_model, out, image_size=(64, 64), parity_steps=2)
    assert list(tmp_path.iterdir()) == []


def test_failed_gate_keeps_existing_bundle(tmp_path, golden_bundle, golden_model, monkeypatch):
    copy = tmp_path / "bundle"
    shutil.copytree(golden_bundle, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    monkeypatch.setitem(parity.END_TO_END_MIN_PSNR, "fp32", 1e9)
    with pytest.raises(parity.ParityError):
        export_onnx(golden_model, copy, image_size=(64, 64), parity_steps=2, opset=23)
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_validate_passes_and_names_tampered_file(tmp_path, golden_bundle, golden_ckpt):
    lines = validate_bundle(golden_bundle, checkpoint=str(golden_ckpt), steps=2)
    assert any("onnx fp32" in line and "passed" in line for line in lines)
    copy = tmp_path / "bundle"
    shutil.copytree(golden_bundle, copy)
    data = bytearray((copy / "decoder.onnx").read_bytes())
    data[-10] ^= 0x01
    (copy / "decoder.onnx").write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["validate", str(copy), "--hashes-only"])
    assert result.exit_code != 0
    assert "decoder.onnx" in result.output
    assert "Traceback" not in result.output


def test_cli_sample_same_seed_same_image(tmp_path, golden_bundle):
    runner = CliRunner()
    outs = []
    for name in ("a.png", "b.png"):
        result = runner.invoke(main, ["sample", str(golden_bundle), "--classes", "1,2",
                                      "--steps", "3", "--seed", "7", "--out",
                                      str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]


def test_cli_sample_grid_has_a_column_per_label(tmp_path, golden_bundle):
    from PIL import Image

    from runtimes.bundle import read_manifest

    out = tmp_path / "grid.png"
    args = ["sample", str(golden_bundle), "--classes", "1,2,5", "--per-class", "2", "--steps", "2",
            "--scale", "2", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    height, width = read_manifest(golden_bundle).model.image_size
    assert Image.open(out).size == (3 * 2 * width, 2 * 2 * height)
    assert "6 images" in result.output


def test_export_rejects_bad_size(tmp_path, golden_model):
    with pytest.raises(ValueError, match="multiple of the patch size"):
        export_onnx(golden_model, tmp_path / "b", image_size=(60, 64))
    assert not (tmp_path / "b").exists()


def test_cli_export_errors_are_one_line(tmp_path):
    args = ["export", "onnx", str(tmp_path / "nope"), str(tmp_path / "b")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert "does not exist" in result.output
    assert "Traceback" not in result.output
