"""OpenVINO backend on the golden model's ONNX bundle: golden sample, the parity gate at fp32
and bf16, the compiled-model cache, and loud errors for devices and precisions it cannot run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")

import runtimes
from deco_export import parity
from deco_export.export.onnx import export_onnx
from deco_export.machine import missing_bf16_reason
from deco_export.validate import validate_backend
from runtimes.backend import BackendError
from runtimes.backends.openvino import OpenVinoBackend
from runtimes.bundle import BundleError

NO_BF16 = missing_bf16_reason()
needs_bf16 = pytest.mark.skipif(NO_BF16 is not None, reason=NO_BF16 or "")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, golden_model, golden_ckpt):
    out = tmp_path_factory.mktemp("openvino") / "bundle"
    export_onnx(golden_model, out, precisions=("fp32",), image_size=(64, 64),
                source={"path": str(golden_ckpt)}, parity_steps=4)
    return out


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "ov-cache"


def _golden_run(pipe, golden, cfg_mode="reference"):
    return np.asarray(pipe.generate(
        class_labels=golden["labels"].tolist(), steps=12, guidance=3.2,
        guidance_interval=(0.1, 1.0), noise=golden["noise"], output_type="np",
        cfg_mode=cfg_mode).images)


@pytest.mark.parametrize("cfg_mode", ["reference", "fast"])
def test_fp32_reproduces_the_golden_sample(bundle, golden, cache, cfg_mode):
    with runtimes.load(bundle, backend="openvino", precision="fp32", threads=1,
                       cache_dir=cache) as pipe:
        got = _golden_run(pipe, golden, cfg_mode)
        info = pipe.backend.describe()
    assert np.abs(got - golden["sample"]).max() < 1e-4
    assert info["device"] == "CPU" and info["precision"] == "fp32" and info["supports_refresh"]


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=needs_bf16)])
def test_reused_steps_match_the_fused_decoder_on_the_cached_condition(bundle, golden, cache,
                                                                      precision):
    with runtimes.load(bundle, backend="openvino", precision=precision, threads=1,
                       cache_dir=cache) as pipe:
        be = pipe.backend
        assert be.supports_decoder_split and be.describe()["supports_decoder_split"]
        x = golden["noise"]
        cond = be.dit(x, np.full(len(x), 0.4, np.float32), golden["labels"].astype(np.int64))
        fused_call = be.decoder(x, cond)
        split_call = be.decoder_pixel(x, be.decoder_cond(cond))
        kwargs = dict(class_labels=golden["labels"].tolist(), steps=12, guidance=3.2,
                      guidance_interval=(0.1, 1.0), noise=golden["noise"], output_type="np",
                      sharing=0.5)
        split = pipe.generate(**kwargs)
        fused = pipe.generate(**kwargs, decoder_split=False)
    assert split.cost.decoder_cond_samples < split.cost.decoder_samples
    if precision == "fp32":
        np.testing.assert_allclose(split_call, fused_call, atol=1e-5)
        np.testing.assert_allclose(split.images, fused.images, atol=1e-5)
    else:  # bf16 rounds the modulation where the fused graph keeps it inside
        assert parity.psnr(fused_call, split_call) >= parity.GRAPH_MIN_PSNR["bf16"]
        assert parity.psnr(np.asarray(fused.images), np.asarray(split.images),
                           data_range=2.0) >= parity.END_TO_END_MIN_PSNR["bf16"]


def test_fp32_passes_the_gate(bundle, golden_ckpt, cache):
    lines, figures = validate_backend(bundle, "openvino", "fp32", checkpoint=str(golden_ckpt),
                                      steps=4, threads=1, cache_dir=cache)
    assert "passed" in lines[0]
    graphs = {g["graph"] for g in figures["graphs"]}
    assert graphs == {"dit.cond", "dit.hidden", "decoder", "refresh", "decoder_cond",
                      "decoder_pixel"}
    assert all(g["max_abs_error"] <= parity.GRAPH_MAX_ABS["fp32"] for g in figures["graphs"])


@needs_bf16
def test_bf16_passes_the_gate_and_differs_from_fp32(bundle, golden, golden_ckpt, cache):
    _, figures = validate_backend(bundle, "openvino", "bf16", checkpoint=str(golden_ckpt),
                                      steps=4, threads=1, cache_dir=cache)
    assert all(g["psnr_db"] is None or g["psnr_db"] >= parity.GRAPH_MIN_PSNR["bf16"]
               for g in figures["graphs"])
    assert figures["end_to_end"]["psnr_db"] >= parity.END_TO_END_MIN_PSNR["bf16"]
    # bf16 really ran: the graphs are not bit-identical to fp32 (fp32 is within 1e-5 here).
    assert max(g["max_abs_error"] for g in figures["graphs"]) > 1e-4


@needs_bf16
def test_bf16_below_a_raised_gate_is_refused(bundle, golden_ckpt, cache, monkeypatch):
    monkeypatch.setitem(parity.GRAPH_MIN_PSNR, "bf16", 1e9)
    with pytest.raises(parity.ParityError, match="below the 1e.09 dB gate; this backend"):
        validate_backend(bundle, "openvino", "bf16", checkpoint=str(golden_ckpt), steps=2,
                         threads=1, cache_dir=cache)


def test_compiled_models_are_cached_and_keyed(bundle, golden, cache):
    first = OpenVinoBackend(bundle, precision="fp32", threads=1, cache_dir=cache)
    graphs = ("dit", "decoder", "refresh", "decoder_cond", "decoder_pixel")
    assert first.cache_hits == dict.fromkeys(graphs, False)
    dirs = sorted(p.name for p in cache.iterdir())
    assert [d.rsplit("-", 1)[0] for d in dirs] == sorted(f"{g}-fp32" for g in graphs)
    dit_dir = next(d for d in dirs if d.startswith("dit-"))
    record = json.loads((cache / dit_dir / "model.json").read_text())
    manifest = runtimes.read_manifest(bundle)
    assert record["key"]["onnx_sha256"] == manifest.find_artifact("onnx", "dit", "fp32").sha256
    assert record["key"]["openvino"] == first.openvino_version
    assert record["key"]["device"] == "CPU" and record["key"]["precision"] == "fp32"

    second = OpenVinoBackend(bundle, precision="fp32", threads=1, cache_dir=cache)
    assert all(second.cache_hits.values())
    x = golden["noise"][:2]
    t, y = np.array([0.2, 0.7], np.float32), np.array([1, 2], np.int64)
    np.testing.assert_array_equal(first.dit(x, t, y), second.dit(x, t, y))

    blob = cache / dit_dir / "dit.blob"
    blob.write_bytes(blob.read_bytes()[:-7] + b"garbage")  # the recorded sha256 no longer holds
    third = OpenVinoBackend(bundle, precision="fp32", threads=1, cache_dir=cache)
    assert third.cache_hits["dit"] is False and third.cache_hits["decoder"] is True
    np.testing.assert_array_equal(first.dit(x, t, y), third.dit(x, t, y))
    assert len(list(cache.iterdir())) == len(graphs)  # the broken blob was replaced


@needs_bf16
def test_precisions_get_separate_cache_entries(bundle, cache):
    OpenVinoBackend(bundle, precision="fp32", threads=1, cache_dir=cache)
    OpenVinoBackend(bundle, precision="bf16", threads=1, cache_dir=cache)
    names = sorted(p.name.rsplit("-", 1)[0] for p in cache.iterdir())
    assert names == sorted(f"{g}-{p}" for g in ("dit", "decoder", "refresh", "decoder_cond",
                                                "decoder_pixel") for p in ("fp32", "bf16"))


def test_no_cache_writes_nothing(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("DECO_CACHE_DIR", str(tmp_path / "env-cache"))
    be = OpenVinoBackend(bundle, precision="fp32", threads=1, cache_dir=False)
    assert be.cache_dir is None and not (tmp_path / "env-cache").exists()
    default = OpenVinoBackend(bundle, precision="fp32", threads=1)
    assert default.cache_dir == tmp_path / "env-cache" / "openvino"
    assert len(list(default.cache_dir.iterdir())) == 5


@pytest.mark.parametrize(("device", "message"), [
    ("GPU", r"OpenVINO sees no GPU device on this machine \(it sees CPU"),
    ("NPU", r"sees no NPU device.*NPU driver"),
    ("AUTO", "virtual device that can move work to another device"),
    ("HETERO:GPU,CPU", "virtual device"),
    ("TPU", "unknown OpenVINO device 'TPU'"),
])
def test_absent_or_virtual_devices_are_loud(bundle, cache, device, message):
    import openvino

    if device.split(".")[0] in openvino.Core().available_devices:
        pytest.skip(f"this machine has an OpenVINO {device}")
    with pytest.raises(BackendError, match=message):
        runtimes.load(bundle, backend="openvino", device=device, cache_dir=cache)


def test_unknown_precision_is_refused_before_loading(bundle, cache):
    with pytest.raises(BackendError, match="runs precision fp32 or bf16, not 'fp16'"):
        runtimes.load(bundle, backend="openvino", precision="fp16", cache_dir=cache)


def test_bf16_verifies_the_fp32_graphs_it_reads(bundle, tmp_path, cache):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    with open(copy / "decoder.onnx", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(BundleError, match="decoder.onnx"):
        runtimes.load(copy, backend="openvino", precision="bf16", cache_dir=cache)


@pytest.mark.skipif(NO_BF16 is None, reason="this CPU has bf16 instructions")
def test_bf16_without_the_instructions_is_an_error(bundle, cache):
    with pytest.raises(BackendError, match="has no bf16 instructions"):
        runtimes.load(bundle, backend="openvino", precision="bf16", cache_dir=cache)


def test_deco_validate_gates_the_backend(bundle, golden_ckpt, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from deco_export.cli import main

    monkeypatch.setenv("DECO_CACHE_DIR", str(tmp_path / "cli-cache"))
    args = ["validate", str(bundle), "--backend", "openvino", "--precision", "fp32", "--steps",
            "2", "--checkpoint", str(golden_ckpt)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "openvino fp32: worst graph error" in result.output and "passed" in result.output
    bad = CliRunner().invoke(main, [*args[:4], "--precision", "fp16"])
    assert bad.exit_code == 1 and "runs precision fp32 or bf16" in bad.output


def test_deco_sample_runs_openvino(bundle, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from deco_export.cli import main

    monkeypatch.setenv("DECO_CACHE_DIR", str(tmp_path / "cli-cache"))
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(main, ["sample", str(bundle), "--backend", "openvino",
                                       "--classes", "1,2", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    absent = CliRunner().invoke(main, ["sample", str(bundle), "--backend", "openvino",
                                       "--device", "npu", "--steps", "2", "--out", str(out)])
    assert absent.exit_code == 1 and "sees no NPU device" in absent.output


def test_image_to_image_inpainting_and_stop_through_openvino(bundle, cache):
    from tests.helpers import check_image_to_image

    with runtimes.load(bundle, backend="openvino", precision="fp32", threads=1,
                       cache_dir=cache) as pipe:
        check_image_to_image(pipe, {"class_labels": [1, 4]})
        out = pipe.generate([2], steps=4, output_type="np", return_partial=True,
                            on_step=lambda s: runtimes.STOP if s.step == 1 else None)
        assert out.stopped_after == 2 and out.images.shape == (1, 3, 64, 64)
