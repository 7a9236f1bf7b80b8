"""ONNX export of the golden model: golden parity through ONNX Runtime, the gate, validate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import runtimes
from deco_export import parity
from deco_export.bench.timing import TimingBackend
from deco_export.cli import main
from deco_export.export.onnx import export_onnx
from deco_export.export.quantize import Int8Settings
from deco_export.validate import validate_bundle
from runtimes import bundle as rb
from runtimes.cpu import int8_kernel
from runtimes.int8 import GATES_KEY, Int8GateError, Int8KernelWarning, int8_gates, record_int8_gate


@pytest.fixture(scope="module")
def golden_bundle(tmp_path_factory, golden_model, golden_ckpt):
    out = tmp_path_factory.mktemp("export") / "bundle"
    export_onnx(golden_model, out, precisions=("fp32", "fp16"), image_size=(64, 64),
                source={"path": str(golden_ckpt)}, parity_steps=4)
    return out


def test_bundle_layout_and_manifest(golden_bundle):
    names = sorted(p.name for p in golden_bundle.iterdir())
    assert names == ["decoder.fp16.onnx", "decoder.onnx", "decoder_cond.fp16.onnx",
                     "decoder_cond.onnx", "decoder_pixel.fp16.onnx", "decoder_pixel.onnx",
                     "dit.fp16.onnx", "dit.onnx", "manifest.json", "refresh.fp16.onnx",
                     "refresh.onnx"]
    manifest = json.loads((golden_bundle / "manifest.json").read_text())
    assert manifest["model"]["image_size"] == [64, 64]
    dit = next(a for a in manifest["artifacts"]
               if (a["runtime"], a["graph"], a["precision"]) == ("onnx", "dit", "fp32"))
    assert [i["name"] for i in dit["inputs"]] == ["x_t", "t", "y"]
    assert dit["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert dit["outputs"][0]["shape"] == ["batch", "tokens", 64]
    assert manifest["sizes"] == {"min": [32, 32], "max": [128, 128], "default": [64, 64],
                                 "multiple": 16}
    assert [o["name"] for o in dit["outputs"]] == ["cond", "hidden"]
    assert dit["details"]["opset"] == 18
    assert {g["batch"] for g in dit["parity"]["graphs"]} == {1, 3}
    # Every graph is checked at the default size and a non-square one, end to end too.
    for art in manifest["artifacts"]:
        checked = {(g["height"], g["width"]) for g in art["parity"]["graphs"]}
        assert len(checked) == 2 and (64, 64) in checked
        assert any(h != w for h, w in checked)
        runs = {(r["height"], r["width"]) for r in art["parity"]["end_to_end_sizes"]}
        assert runs == checked
    assert all(g["max_abs_error"] <= 1e-4 for g in dit["parity"]["graphs"])
    assert dit["parity"]["end_to_end"]["psnr_db"] is None or \
        dit["parity"]["end_to_end"]["psnr_db"] >= 60
    fp16 = next(a for a in manifest["artifacts"]
                if (a["graph"], a["precision"]) == ("decoder", "fp16"))
    assert fp16["parity"]["end_to_end"]["psnr_db"] >= 35
    assert "onnxruntime" in dit["tools"] and "torch" in dit["tools"]


def test_split_decoder_graphs_are_in_the_manifest_with_their_parity(golden_bundle):
    manifest = json.loads((golden_bundle / "manifest.json").read_text())
    split = {(a["graph"], a["precision"]): a for a in manifest["artifacts"]
             if a["graph"] in ("decoder_cond", "decoder_pixel")}
    assert set(split) == {(g, p) for g in ("decoder_cond", "decoder_pixel")
                          for p in ("fp32", "fp16")}
    cond, pixel = split["decoder_cond", "fp32"], split["decoder_pixel", "fp32"]
    assert cond["inputs"] == [{"name": "cond", "shape": ["batch", "tokens", 64],
                               "dtype": "float32"}]
    assert cond["outputs"][0] == {"name": "modulation",
                                  "shape": ["batch", "tokens", 256, 32],
                                  "dtype": "float32"}
    assert [i["name"] for i in pixel["inputs"]] == ["x_t", "modulation"]
    for art in (cond, pixel):
        assert {g["batch"] for g in art["parity"]["graphs"]} == {1, 3}
        assert all(g["max_abs_error"] <= parity.GRAPH_MAX_ABS["fp32"]
                   for g in art["parity"]["graphs"])
    shared = pixel["parity"]["end_to_end"]["sharing"]
    assert shared["ratio"] == 0.5
    assert shared["psnr_db"] is None or shared["psnr_db"] >= parity.END_TO_END_MIN_PSNR["fp32"]


def test_onnxruntime_reused_steps_match_the_fused_decoder_on_the_cached_condition(
        golden_bundle, golden):
    pipe = runtimes.load(golden_bundle, backend="onnxruntime")
    be = pipe.backend
    assert be.supports_decoder_split and be.describe()["supports_decoder_split"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 3, 64, 64), dtype=np.float32)
    cond = be.dit(x, np.full(3, 0.4, np.float32), np.array([1, 2, 10]))
    np.testing.assert_allclose(be.decoder_pixel(x, be.decoder_cond(cond)), be.decoder(x, cond),
                               atol=1e-5)
    pipe.backend = proxy = TimingBackend(be)  # counts the calls by name
    kwargs = dict(class_labels=golden["labels"].tolist(), steps=12, guidance=3.2,
                  guidance_interval=(0.1, 1.0), noise=golden["noise"], output_type="np")
    split = np.asarray(pipe.generate(**kwargs, sharing=0.5).images)
    assert proxy.calls["decoder_cond"] == 6 and proxy.calls["decoder_pixel"] == 12
    assert proxy.calls["decoder"] == 0
    fused = np.asarray(pipe.generate(**kwargs, sharing=0.5, decoder_split=False).images)
    np.testing.assert_allclose(split, fused, atol=1e-5)
    proxy.reset()
    plain = np.asarray(pipe.generate(**kwargs).images)  # sharing off: only the fused decoder
    assert proxy.calls["decoder"] == 12 and proxy.calls["decoder_pixel"] == 0
    assert np.array_equal(plain, np.asarray(pipe.generate(**kwargs, decoder_split=False).images))


def test_a_bundle_without_the_split_graphs_still_samples(tmp_path, golden_bundle, golden):
    old = tmp_path / "old"
    shutil.copytree(golden_bundle, old)
    manifest = rb.read_manifest(old)
    manifest.artifacts = [a for a in manifest.artifacts
                          if a.graph not in ("decoder_cond", "decoder_pixel")]
    rb.write_manifest(old, manifest)
    for f in old.glob("decoder_*.onnx"):
        f.unlink()
    kwargs = dict(class_labels=golden["labels"].tolist(), steps=12, guidance=3.2,
                  noise=golden["noise"], output_type="np", sharing=0.5)
    with runtimes.load(old, backend="onnxruntime") as pipe:
        assert not pipe.backend.supports_decoder_split
        out = pipe.generate(**kwargs)
    assert out.cost.decoder_cond_samples is None
    with runtimes.load(golden_bundle, backend="onnxruntime") as pipe:
        new = pipe.generate(**kwargs)
    assert new.cost.decoder_cond_samples < new.cost.decoder_samples
    np.testing.assert_allclose(np.asarray(out.images), np.asarray(new.images), atol=1e-5)


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
        quantization = art["details"]["quantization"]
        assert quantization["settings"] == Int8Settings().to_dict()
        assert quantization["saturation_free"]
        assert art["parity"]["end_to_end"]["cpu"]["int8_kernel"] == int8_kernel()
    lines = validate_bundle(int8_bundle, checkpoint=str(golden_ckpt), steps=2)
    assert any("onnx int8" in line and "passed" in line for line in lines)


@pytest.fixture
def int8_copy(int8_bundle, tmp_path):
    """A copy of the int8 bundle whose manifest says its gate ran on another kind of CPU."""
    copy = tmp_path / "bundle"
    shutil.copytree(int8_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    other = "amx" if int8_kernel() != "amx" else "avx2"
    for art in manifest["artifacts"]:
        art["parity"].pop(GATES_KEY, None)
        if art["precision"] == "int8":
            art["parity"]["end_to_end"]["cpu"]["int8_kernel"] = other
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy, other


def test_int8_on_another_kind_of_cpu_warns_then_follows_validate(int8_copy):
    copy, other = int8_copy
    with pytest.warns(Int8KernelWarning, match=f"gated on {other} int8 kernels, not on this "
                                               f"CPU's \\({int8_kernel()}\\).*deco validate"):
        runtimes.load(copy, backend="onnxruntime", precision="int8").close()

    record_int8_gate(copy, 31.5, passed=False, threshold_db=40.0)
    with pytest.raises(Int8GateError, match="31.5 dB .* below the gate.*allow_below_gate"):
        runtimes.load(copy, backend="onnxruntime", precision="int8")
    runtimes.load(copy, backend="onnxruntime", precision="int8", allow_below_gate=True).close()
    assert rb.verify(copy) == []  # the record changes the manifest only

    record_int8_gate(copy, 48.0, passed=True, threshold_db=40.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Int8KernelWarning)
        runtimes.load(copy, backend="onnxruntime", precision="int8").close()
    gates = int8_gates(rb.read_manifest(copy))
    assert gates[other]["by"] == "export" and gates[int8_kernel()]["psnr_db"] == 48.0


def test_validate_precision_int8_records_the_gate_on_this_cpu(int8_copy, golden_ckpt):
    copy, _ = int8_copy
    result = CliRunner().invoke(main, ["validate", str(copy), "--precision", "int8",
                                       "--steps", "2", "--checkpoint", str(golden_ckpt)])
    assert result.exit_code == 0, result.output
    assert f"on {int8_kernel()} int8 kernels (recorded): passed" in result.output
    record = int8_gates(rb.read_manifest(copy))[int8_kernel()]
    assert record["passed"] and record["psnr_db"] >= 40 and record["by"] == "validate"
    assert record["cpu"]["int8_kernel"] == int8_kernel()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Int8KernelWarning)
        runtimes.load(copy, backend="onnxruntime", precision="int8").close()
    missing = CliRunner().invoke(main, ["validate", str(copy), "--precision", "fp16"])
    assert missing.exit_code != 0 and "has no ONNX fp16 graphs (it has int8)" in missing.output


def test_int8_only_flags_are_refused_without_int8(tmp_path, int8_copy):
    copy, _ = int8_copy
    result = CliRunner().invoke(main, ["sample", str(copy), "--allow-below-gate",
                                       "--out", str(tmp_path / "s.png")])
    assert result.exit_code != 0 and "add --precision int8" in result.output
    result = CliRunner().invoke(main, ["export", "onnx", "default", str(tmp_path / "b"),
                                       "--int8-weights", "uint8"])
    assert result.exit_code != 0 and "add --precision int8" in result.output
    assert not (tmp_path / "b").exists() and not (tmp_path / "s.png").exists()


def test_cli_prints_an_unproven_int8_bundle_as_one_warning_line(tmp_path, int8_copy):
    copy, other = int8_copy
    result = subprocess.run(
        [sys.executable, "-m", "deco_export.cli", "sample", str(copy), "--precision", "int8",
         "--steps", "2", "--per-class", "1", "--out", str(tmp_path / "s.png")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "int8 kernels" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and other in lines[0]
    assert "Traceback" not in result.stderr and (tmp_path / "s.png").is_file()


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
    # The refused export would write another manifest (a 2-step gate, not the bundle's 4), so
    # the comparison below fails if anything of it lands.
    with pytest.raises(parity.ParityError):
        export_onnx(golden_model, copy, image_size=(64, 64), parity_steps=2)
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_validate_passes_and_names_tampered_file(tmp_path, golden_bundle, golden_ckpt):
    lines = validate_bundle(golden_bundle, checkpoint=str(golden_ckpt), steps=2)
    assert any("onnx fp32" in line and "passed" in line for line in lines)
    fp32 = next(line for line in lines if line.startswith("onnx fp32"))
    assert "64x64" in fp32 and "32x64" in fp32  # the gate's two sizes, again
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


def test_image_to_image_and_inpainting_through_onnxruntime_and_torch(golden_bundle,
                                                                    golden_model):
    from deco_export.backends import create_backend
    from tests.helpers import check_image_to_image

    ort = check_image_to_image(runtimes.load(golden_bundle), {"class_labels": [1, 4]})
    manifest = rb.read_manifest(golden_bundle)
    pipe = runtimes.DeCoPipeline(create_backend("torch", golden_model), golden_model.config,
                                 manifest.sampler_defaults)
    assert np.abs(check_image_to_image(pipe, {"class_labels": [1, 4]}) - ort).max() < 1e-3


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


def _torch_pipe(model):
    from deco_export.backends.torch_backend import TorchBackend
    from runtimes.sampler import release_sampler

    return runtimes.DeCoPipeline(TorchBackend(model, device="cpu"), model_config=model.config,
                                 sampler_defaults=release_sampler(model.config.family))


@pytest.mark.parametrize("size", [(32, 96), (128, 48), (64, 64)])
def test_one_bundle_samples_any_size_in_range_as_pytorch(golden_bundle, golden_model, size):
    """The same dit.onnx/decoder.onnx at sizes it was neither traced nor gated at."""
    h, w = size
    kwargs = dict(class_labels=[10, 3], steps=4, guidance=3.2, seed=2, output_type="np",
                  height=h, width=w, sharing=0.5, cfg_mode="reference")
    got = runtimes.load(golden_bundle).generate(**kwargs).images
    expected = _torch_pipe(golden_model).generate(**kwargs).images
    assert got.shape == (2, 3, h, w)
    assert np.abs(got - expected).max() < 1e-4


def test_openvino_takes_the_dynamic_sizes(golden_bundle, golden_model, tmp_path):
    pytest.importorskip("openvino")
    kwargs = dict(class_labels=[10, 3], steps=3, guidance=3.2, seed=1, output_type="np",
                  height=48, width=112, cfg_mode="reference")
    got = runtimes.load(golden_bundle, backend="openvino",
                        cache_dir=tmp_path / "cache").generate(**kwargs).images
    expected = _torch_pipe(golden_model).generate(**kwargs).images
    assert got.shape == (2, 3, 48, 112) and np.abs(got - expected).max() < 1e-3


def test_sizes_outside_the_range_are_one_line_errors(tmp_path, golden_bundle):
    from runtimes.sizes import SizeError

    pipe = runtimes.load(golden_bundle)
    for h, w in ((256, 64), (16, 64), (64, 72)):
        with pytest.raises(SizeError, match=r"32x32 to 128x128 in steps of 16 \(default 64x64\)"):
            pipe.generate([1], height=h, width=w, steps=1)
    result = CliRunner().invoke(main, ["sample", str(golden_bundle), "--classes", "1",
                                       "--size", "256x64", "--out", str(tmp_path / "x.png")])
    assert result.exit_code != 0
    assert "256x64 is not a size this bundle serves" in result.output
    assert "Traceback" not in result.output and result.output.strip().count("\n") == 0


def test_another_size_range_does_not_extend_a_bundle(tmp_path, golden_bundle, golden_model,
                                                     golden_ckpt):
    """The bundle's other graphs were gated at its range: a new range replaces it only with
    --force, refused before any work."""
    from deco_export.export.bundle_io import TargetError
    from runtimes.sizes import SizeRange

    copy = tmp_path / "bundle"
    shutil.copytree(golden_bundle, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    with pytest.raises(TargetError, match=r"exported for sizes 32x32 to 128x128.*--force"):
        export_onnx(golden_model, copy, image_size=(64, 64), source={"path": str(golden_ckpt)},
                    size_range=SizeRange((64, 64), (96, 96), (64, 64), 16))
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


def test_cli_size_range_and_fixed_size_bundles(tmp_path, golden_ckpt):
    """--size-range sets the range; a range of one size writes fixed-size graphs, which read
    back (as bundles written before sizes were dynamic) as a range of one."""
    from runtimes.bundle import read_manifest

    out = tmp_path / "fixed"
    result = CliRunner().invoke(main, ["export", "onnx", str(golden_ckpt), str(out),
                                       "--image-size", "64x64", "--size-range", "64:64",
                                       "--parity-steps", "2"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    dit = manifest.find_artifact("onnx", "dit", "fp32")
    assert manifest.sizes is None and dit.inputs[0].shape == ["batch", 3, 64, 64]
    assert manifest.size_range("onnx").describe() == "64x64 only"
    result = CliRunner().invoke(main, ["export", "onnx", str(golden_ckpt), str(tmp_path / "b"),
                                       "--image-size", "64x64", "--size-range", "80:96"])
    assert result.exit_code != 0 and "outside" in result.output
    assert not (tmp_path / "b").exists()


def test_dynamic_axes_are_named_and_external_data_kept(tmp_path, golden_model):
    """The record's axis names on the graph's inputs and outputs, also for a graph whose
    weights live in external data (the large models): renaming rewrites only the graph."""
    from deco_export.export.graphs import example_inputs, graph_modules, reference_outputs
    from deco_export.export.onnx import export_graph
    from deco_export.export.onnx_tools import ort_session
    from runtimes.sizes import SizeRange

    path = tmp_path / "refresh.onnx"
    module = graph_modules(golden_model, "fp32")["refresh"]
    export_graph(module, "refresh", example_inputs(golden_model, "refresh", 2, 64, 32), path,
                 18, True, sizes=SizeRange.around((64, 64), 16))
    assert (tmp_path / "refresh.onnx.data").is_file()
    session = ort_session(path)
    assert [i.shape for i in session.get_inputs()] == [["batch", "tokens", 64], ["batch"]]
    assert session.get_outputs()[0].shape == ["batch", "tokens", 64]
    inputs = example_inputs(golden_model, "refresh", 3, 48, 112)
    got = session.run(None, {"hidden": inputs[0].numpy(), "t": inputs[1].numpy()})[0]
    assert got.shape == (3, 21, 64)
    assert np.abs(got - reference_outputs(golden_model, "refresh", inputs)[0].numpy()).max() < 1e-5


def test_fp32_graphs_wrap_the_model_itself_and_reduced_precision_a_copy(golden_model):
    """A released-size model (4.5 GB) is held once by an fp32 export; fp16 casts a copy and
    leaves the caller's model float32."""
    import torch

    from deco_export.export.graphs import graph_modules

    model = golden_model.float().cpu().eval()
    fp32 = graph_modules(model, "fp32")
    assert fp32["dit"].dit is model.dit and fp32["decoder"].decoder is model.decoder
    fp16 = graph_modules(model, "fp16")
    assert fp16["dit"].dit is not model.dit
    assert fp16["dit"].dit.s_embedder.proj.weight.dtype == torch.float16
    assert model.dit.s_embedder.proj.weight.dtype == torch.float32


def test_validate_remeasures_tuned_solver_tables(tmp_path, golden_bundle, golden_ckpt):
    """`deco validate` re-measures each tuned table's held-out error through ONNX Runtime and
    fails on a table changed after it was recorded (a two-iteration fit keeps this quick)."""
    from deco_export.solver_tuning import tune_solver_tables

    copy = tmp_path / "bundle"
    shutil.copytree(golden_bundle, copy)
    tune_solver_tables(copy, [3], samples=2, heldout=2, iterations=2, teacher_steps=4)
    assert rb.verify(copy) == []  # a manifest-only transaction keeps every file intact
    lines = validate_bundle(copy, checkpoint=str(golden_ckpt), steps=2, precisions=["fp32"])
    assert any(line.startswith("solver table") and line.endswith("passed") for line in lines)
    data = json.loads((copy / "manifest.json").read_text())
    (entry,) = data["solver_tables"].values()
    entry["coefficients"][2][1] += 1.5
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="solver table .* worse"):
        validate_bundle(copy, checkpoint=str(golden_ckpt), steps=2, precisions=["fp32"])
