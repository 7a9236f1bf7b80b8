"""TensorRT export: build planning, manifest entries and error paths run everywhere; building
and running engines runs only where ``tensorrt``, cuda-python and a CUDA GPU all work, and
skips with the reason otherwise. Buckets, profiles, cache keys and the backend's bookkeeping
are tested under tests/runtimes (test_tensorrt_*.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from runtimes import bundle as rb
from runtimes.backend import BackendError
from runtimes.backends import tensorrt_keys as tk
from runtimes.backends import tensorrt_profiles as tp
from tests.runtimes.tensorrt_fakes import A100, H100, T2I, TINY

# ---------------------------------------------------------------------------------------------
# Build planning and manifest entries (the exporter, without TensorRT)


def _bundle(tmp_path: Path, precisions=("fp32", "fp16"), refresh=True) -> Path:
    root = tmp_path / "bundle"
    root.mkdir(parents=True)
    arts = []
    for p in precisions:
        for g in ("dit", "decoder", "refresh") if refresh else ("dit", "decoder"):
            name = f"{g}.onnx" if p == "fp32" else f"{g}.{p}.onnx"
            (root / name).write_bytes(f"{g}-{p}".encode())
            arts.append(rb.Artifact.from_file(root, "onnx", g, p, name))
    manifest = rb.Manifest(model=dict(TINY), artifacts=arts,
                           source={"path": "/nonexistent/ckpt", "sha256": "0" * 64})
    rb.write_manifest(root, manifest)
    return root


def _add_engines(root: Path, env: tk.EngineEnvironment, settings, precision="fp16") -> None:
    """Write what the exporter writes for built engines (dummy plan bytes) into the manifest."""
    from deco_export.export import tensorrt as ex

    manifest = rb.read_manifest(root)
    for item in ex.plan_builds(root, manifest, [precision], env, settings):
        plan = root / item.key.relpath
        plan.parent.mkdir(parents=True, exist_ok=True)
        plan.write_bytes(b"plan-" + item.graph.encode())
        record = root / item.key.json_relpath
        record.write_text(json.dumps(tk.engine_record(item.key, rb.sha256_file(plan),
                                                      plan.stat().st_size)))
        manifest.add_artifact(rb.Artifact.from_file(
            root, "tensorrt", item.graph, precision, item.key.relpath,
            details=ex.artifact_details(item, settings), extra_files=[item.key.json_relpath]))
    rb.write_manifest(root, manifest)


def test_plan_builds_everything_new(tmp_path):
    from deco_export.export.tensorrt import BuildSettings, plan_builds

    root = _bundle(tmp_path)
    items = plan_builds(root, rb.read_manifest(root), None, H100, BuildSettings())
    assert [(i.precision, i.graph, i.action) for i in items] == [
        (p, g, "build") for p in ("fp32", "fp16") for g in ("dit", "decoder", "refresh")]
    assert all(i.reason == "no engine yet" for i in items)
    assert items[0].key.engine_batches == (1, 2, 4, 8, 16)
    assert items[3].key.onnx_sha256 == rb.read_manifest(root).get_artifact(
        "onnx", "dit", "fp16").sha256
    assert "build (no engine yet) -> engines/dit-fp32-" in items[0].describe()


def test_plan_keeps_up_to_date_engines_and_rebuilds_stale_or_foreign(tmp_path):
    from deco_export.export.tensorrt import BuildSettings, plan_builds

    root = _bundle(tmp_path)
    settings = BuildSettings(buckets=(1, 2))
    _add_engines(root, H100, settings)
    manifest = rb.read_manifest(root)
    assert rb.verify(root, runtime="tensorrt") == []
    kept = plan_builds(root, manifest, ["fp16"], H100, settings)
    assert [i.action for i in kept] == ["keep"] * 3
    forced = plan_builds(root, manifest, ["fp16"], H100, settings, force=True)
    assert {i.reason for i in forced} == {"--force"}
    foreign = plan_builds(root, manifest, ["fp16"], A100, settings)
    assert all(i.action == "build" and i.reason.startswith("foreign") for i in foreign)
    assert "A100" in foreign[0].reason and "H100" in foreign[0].reason
    resized = plan_builds(root, manifest, ["fp16"], H100, BuildSettings(buckets=(1, 2, 4)))
    assert all(i.action == "build" and "engine_batches" in i.reason for i in resized)
    # The decoder's ONNX changes: only that engine is rebuilt.
    (root / "decoder.fp16.onnx").write_bytes(b"new decoder")
    manifest.add_artifact(rb.Artifact.from_file(root, "onnx", "decoder", "fp16",
                                                "decoder.fp16.onnx"))
    stale = plan_builds(root, manifest, ["fp16"], H100, settings)
    assert [(i.graph, i.action) for i in stale] == [
        ("dit", "keep"), ("decoder", "build"), ("refresh", "keep")]
    assert stale[1].reason.startswith("stale: its ONNX graph changed")
    # A truncated plan is rebuilt too.
    plan = root / kept[0].key.relpath
    plan.write_bytes(b"p")
    assert plan_builds(root, manifest, ["fp16"], H100, settings)[0].reason.startswith(
        "its plan file")


def test_manifest_entries_round_trip_and_resolve(tmp_path):
    from deco_export.export.tensorrt import BuildSettings

    root = _bundle(tmp_path)
    settings = BuildSettings(buckets=(1, 2, 4), builder_optimization_level=4,
                             workspace_bytes=1 << 31)
    _add_engines(root, H100, settings)
    manifest = rb.read_manifest(root)
    art = manifest.get_artifact("tensorrt", "dit", "fp16")
    assert art.file.startswith("engines/dit-fp16-") and art.file.endswith("/dit.plan")
    d = art.details
    assert d["engine_batches"] == [1, 2, 4, 8] and d["batch_buckets"] == [1, 2, 4]
    assert d["cfg_doubling"] and d["strongly_typed"]
    assert d["builder_optimization_level"] == 4 and d["workspace_bytes"] == 1 << 31
    assert d["key"]["gpu"] == H100.gpu_name and d["key"]["compute_capability"] == "9.0"
    assert d["key"]["tensorrt"] == H100.tensorrt_version
    assert d["key"]["onnx_sha256"] == manifest.get_artifact("onnx", "dit", "fp16").sha256
    assert list(art.extra_files) == [art.file.replace("dit.plan", "engine.json")]
    onnx = manifest.get_artifact("onnx", "dit", "fp16")
    got = tk.resolve_engine(root, art.details, art.file, art.sha256, H100, onnx.sha256)
    assert got.relpath == art.file
    with pytest.raises(tk.EngineMismatchError, match="foreign"):
        tk.resolve_engine(root, art.details, art.file, art.sha256, A100, onnx.sha256)
    # Tampering with a plan shows in the bundle's hash check before anything loads it.
    (root / art.file).write_bytes(b"tampered")
    assert any("dit.plan" in p for p in rb.verify(root, runtime="tensorrt"))


def test_plan_errors_name_the_fix(tmp_path):
    from deco_export.export.tensorrt import BuildSettings, plan_builds

    root = _bundle(tmp_path, precisions=("fp32",))
    manifest = rb.read_manifest(root)
    with pytest.raises(ValueError, match=r"no bf16 ONNX graphs \(it has fp32\).*--precision bf16"):
        plan_builds(root, manifest, ["bf16"], H100, BuildSettings())
    int8 = _bundle(tmp_path / "int8", precisions=("fp32", "int8"))
    with pytest.raises(ValueError, match="int8 graphs are for ONNX Runtime"):
        plan_builds(int8, rb.read_manifest(int8), ["int8"], H100, BuildSettings())
    assert {i.precision for i in plan_builds(int8, rb.read_manifest(int8), None, H100,
                                             BuildSettings())} == {"fp32"}
    empty = tmp_path / "empty"
    empty.mkdir()
    rb.write_manifest(empty, rb.Manifest(model=dict(TINY)))
    with pytest.raises(ValueError, match="deco export onnx"):
        plan_builds(empty, rb.read_manifest(empty), None, H100, BuildSettings())


# ---------------------------------------------------------------------------------------------
# Missing TensorRT: one line that names the install and the GPU


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make ``import tensorrt`` fail, as on every machine without NVIDIA's wheels."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_export_without_tensorrt_fails_with_one_line(tmp_path, no_tensorrt):
    from deco_export.cli import main

    root = _bundle(tmp_path)
    result = CliRunner().invoke(main, ["export", "tensorrt", str(root)])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert "TensorRT is not installed" in lines[0]
    assert "pip install 'deco-export[tensorrt]'" in lines[0] and "NVIDIA GPU" in lines[0]
    assert not any(root.glob("engines"))


def test_export_checks_the_bundle_before_tensorrt(tmp_path, no_tensorrt):
    from deco_export.cli import main

    root = _bundle(tmp_path, precisions=("fp32",))
    result = CliRunner().invoke(main, ["export", "tensorrt", str(root), "--precision", "fp16"])
    assert result.exit_code == 1 and "no fp16 ONNX graphs" in result.output
    result = CliRunner().invoke(main, ["export", "tensorrt", str(root), "--batch-buckets", "1,x"])
    assert result.exit_code == 1 and "batch buckets" in result.output
    result = CliRunner().invoke(main, ["export", "tensorrt", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "no such bundle" in result.output


def test_backend_without_tensorrt_names_the_install(tmp_path, no_tensorrt):
    import runtimes
    from runtimes.backends.tensorrt import TensorRTBackend

    root = _bundle(tmp_path)
    with pytest.raises(BackendError, match=r"TensorRT is not available.*NVIDIA GPU"):
        TensorRTBackend(root, precision="fp16")
    with pytest.raises(BackendError, match="deco-export\\[tensorrt\\]"):
        runtimes.load(root, backend="tensorrt", precision="fp16", verify=False)


# ---------------------------------------------------------------------------------------------
# Building and running engines: only with TensorRT, cuda-python and a GPU


def _gpu_tensorrt_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or OSError from a wheel without its libraries
        return f"TensorRT is not importable here ({exc})"
    try:
        from runtimes.backends.tensorrt import import_cuda

        cudart = import_cuda().runtime
    except Exception as exc:
        return f"cuda-python is not importable here ({exc})"
    err, count = cudart.cudaGetDeviceCount()
    if int(getattr(err, "value", err)) != 0 or count < 1:
        return "no CUDA GPU is visible"
    return None


_REASON = _gpu_tensorrt_reason()
needs_trt_gpu = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@pytest.fixture(scope="module")
def tiny_trt_bundle(tmp_path_factory, golden_model, golden_ckpt):
    """The golden tiny model exported to ONNX (fp32, fp16) with engines built for this GPU."""
    from deco_export.export.onnx import export_onnx
    from deco_export.export.tensorrt import BuildSettings, export_tensorrt

    root = tmp_path_factory.mktemp("trt") / "bundle"
    export_onnx(golden_model, root, precisions=("fp32", "fp16"), parity_steps=4,
                source={"path": str(golden_ckpt)})
    export_tensorrt(root, settings=BuildSettings(buckets=(1, 2, 4)), checkpoint=str(golden_ckpt),
                    parity_steps=4)
    return root


@needs_trt_gpu
@pytest.mark.gpu
def test_engines_pass_their_gates_and_are_kept_when_up_to_date(tiny_trt_bundle, golden_ckpt):
    from deco_export.export.tensorrt import BuildSettings, export_tensorrt

    manifest = rb.read_manifest(tiny_trt_bundle)
    for p in ("fp32", "fp16"):
        art = manifest.get_artifact("tensorrt", "dit", p)
        assert art is not None and art.parity["end_to_end"]["status"] == "passed"
        assert art.details["engine_batches"] == [1, 2, 4, 8]
    lines = export_tensorrt(tiny_trt_bundle, settings=BuildSettings(buckets=(1, 2, 4)),
                            checkpoint=str(golden_ckpt))
    assert lines[0].startswith("engines up to date")


@needs_trt_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_backend_fused_steps_match_the_sampler_and_pytorch(tiny_trt_bundle, golden_model,
                                                           precision):
    import runtimes
    from deco_export.backends.torch_backend import TorchBackend
    from deco_export.parity import psnr
    from runtimes.sampler import SamplerConfig, sample

    cfg = SamplerConfig(num_steps=8, guidance=3.0, guidance_interval=(0.3, 1.0))
    noise = runtimes.sample_noise(0, 3, 3, 64, 64)
    labels = np.array([1, 2, 10])
    pipe = runtimes.load(tiny_trt_bundle, backend="tensorrt", precision=precision)
    be = pipe.backend
    try:
        fused = sample(be, noise, labels, cfg, null_class=10)
        again = sample(be, noise, labels, cfg, null_class=10)  # replays the captured graphs
        unfused = sample(be, noise, labels, cfg, null_class=10, fused_step=False)
        assert any(be.describe()["cuda_graphs"].values())
    finally:
        pipe.close()
    reference = sample(TorchBackend(golden_model), noise, labels, cfg, null_class=10)
    assert np.array_equal(fused, again)
    assert np.abs(fused - unfused).max() < 1e-5
    assert psnr(reference, fused, data_range=2.0) > (60 if precision == "fp32" else 35)


@pytest.fixture(scope="module")
def distilled_trt_bundle(tmp_path_factory):
    """A tiny guidance-distilled student (saved as a checkpoint) exported to ONNX fp32 with
    engines built for this GPU; and the student."""
    import torch

    from deco_export.checkpoint import save_pretrained
    from deco_export.export.onnx import export_onnx
    from deco_export.export.tensorrt import BuildSettings, export_tensorrt
    from deco_export.model import random_model
    from deco_export.sources import load_model
    from runtimes.config import ModelConfig
    from training.distill import student_from_teacher

    root = tmp_path_factory.mktemp("trt-distilled")
    student = student_from_teacher(random_model(ModelConfig.from_dict(TINY), seed=0))
    with torch.no_grad():  # a trained guidance embedding: w changes the output
        student.dit.g_embedder.mlp[2].weight.normal_(std=1.0, generator=torch.Generator()
                                                     .manual_seed(1))
    model, source = load_model(save_pretrained(student.eval(), root / "ckpt",
                                               source="distilled-test"))
    export_onnx(model, root / "bundle", precisions=("fp32",), parity_steps=4, source=source)
    export_tensorrt(root / "bundle", settings=BuildSettings(buckets=(1, 2)), parity_steps=4)
    return root / "bundle", model


@needs_trt_gpu
@pytest.mark.gpu
def test_distilled_engines_pass_their_gates_and_sample_in_one_pass(distilled_trt_bundle):
    import runtimes
    from deco_export.backends.torch_backend import TorchBackend
    from deco_export.parity import psnr
    from runtimes.sampler import SamplerConfig, sample

    bundle, model = distilled_trt_bundle
    art = rb.read_manifest(bundle).get_artifact("tensorrt", "dit", "fp32")
    assert art.parity["end_to_end"]["status"] == "passed"
    assert art.details["engine_batches"] == [1, 2]  # no doubled CFG batches
    assert [p["batch"] for p in art.details["profiles"]] == [1, 2]
    cfg = SamplerConfig(num_steps=6, guidance=3.0, guidance_interval=(0.3, 1.0))
    noise = runtimes.sample_noise(0, 2, 3, 64, 64)
    labels = np.array([1, 2])
    with runtimes.load(bundle, backend="tensorrt", precision="fp32") as pipe:
        assert pipe.backend.takes_guidance and not pipe.backend.supports_step
        got = sample(pipe.backend, noise, labels, cfg, null_class=10)
        out = pipe.generate(class_labels=[1, 2], seed=0, steps=4, guidance=3.0,
                            output_type="np")
    reference = sample(TorchBackend(model), noise, labels, cfg, null_class=10)
    assert psnr(reference, got, data_range=2.0) > 60
    assert out.cost.dit_samples == out.cost.decoder_samples == 2 * 4


@needs_trt_gpu
@pytest.mark.gpu
def test_backend_refuses_stale_and_foreign_engines(tiny_trt_bundle, tmp_path, monkeypatch):
    import shutil

    import runtimes.backends.tensorrt as trt_backend

    copy = tmp_path / "copy"
    shutil.copytree(tiny_trt_bundle, copy)
    manifest = rb.read_manifest(copy)
    onnx = manifest.get_artifact("onnx", "decoder", "fp16")
    (copy / onnx.file).write_bytes((copy / onnx.file).read_bytes() + b" ")
    manifest.add_artifact(rb.Artifact.from_file(copy, "onnx", "decoder", "fp16", onnx.file))
    rb.write_manifest(copy, manifest)
    with pytest.raises(tk.EngineMismatchError, match="stale"):
        trt_backend.TensorRTBackend(copy, precision="fp16")

    real = trt_backend.cuda_environment

    def elsewhere(trt, cuda, device_id=0):
        env = real(trt, cuda, device_id)
        return tk.EngineEnvironment(env.tensorrt_version, "Some Other GPU", "1.0")

    monkeypatch.setattr(trt_backend, "cuda_environment", elsewhere)
    with pytest.raises(tk.EngineMismatchError, match="foreign.*Some Other GPU"):
        trt_backend.TensorRTBackend(tiny_trt_bundle, precision="fp16")


def test_engines_of_a_dynamic_size_bundle_are_keyed_by_its_range(tmp_path):
    """The profiles' range is part of the key (a new range rebuilds), the artifact records it,
    and a fixed-size bundle's keys stay what they were."""
    from deco_export.export.tensorrt import BuildSettings, artifact_details, plan_builds
    from runtimes.sizes import SizeRange

    root = _bundle(tmp_path)
    fixed = plan_builds(root, rb.read_manifest(root), ["fp16"], H100, BuildSettings())[0]
    assert fixed.key.sizes is None and "sizes" not in fixed.key.fields()
    manifest = rb.read_manifest(root)
    manifest.sizes = SizeRange.around((64, 64), 16)
    rb.write_manifest(root, manifest)
    dynamic = plan_builds(root, rb.read_manifest(root), ["fp16"], H100, BuildSettings())[0]
    assert dynamic.key.fields()["sizes"] == manifest.sizes.to_dict()
    assert dynamic.key.digest != fixed.key.digest
    assert tk.EngineKey.from_fields(dynamic.key.fields()) == dynamic.key
    assert dynamic.key.size_range == manifest.sizes
    details = artifact_details(dynamic, BuildSettings())
    assert details["sizes"] == manifest.sizes.to_dict()
    kind, reasons = tk.describe_mismatch(fixed.key.fields(), dynamic.key.fields())
    assert kind == "stale" and any("sizes" in r for r in reasons)


# ---------------------------------------------------------------------------------------------
# Text-to-image: text_embed maps the text float32 (B, L, C) to text tokens (B, L, D) once per
# generation, and the DiT takes (x_t, t, text_tokens)


class _RecordingTRT:
    """The parts of the ``tensorrt`` module `build_engine` calls, recording each call: no
    network is built, the plan is a fixed byte string."""

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1

    class MemoryPoolType:
        WORKSPACE = 0

    class BuilderFlag:
        TF32 = 7

    __version__ = "10.8.0.43"

    def __init__(self):
        self.calls: list[tuple] = []
        trt = self

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                trt.calls.append(("set_shape", name, tuple(lo), tuple(opt), tuple(hi)))

        class Cache:
            def serialize(self):
                return b"timings"

        class Config:
            builder_optimization_level = 0

            def set_memory_pool_limit(self, pool, size):
                trt.calls.append(("workspace", size))

            def clear_flag(self, flag):
                trt.calls.append(("clear_flag", flag))

            def set_flag(self, flag):
                trt.calls.append(("set_flag", flag))

            def create_timing_cache(self, data):
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                return True

            def get_timing_cache(self):
                return Cache()

            def add_optimization_profile(self, profile):
                trt.calls.append(("add_optimization_profile",))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                trt.calls.append(("create_network", flags))
                return "network"

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                trt.calls.append(("build", config.builder_optimization_level))
                return b"plan"

        class OnnxParser:
            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                trt.calls.append(("parse", Path(path).name))
                return True

        self.Builder, self.OnnxParser = Builder, OnnxParser


def test_t2i_engine_build_declares_the_text_profile(tmp_path):
    """`build_engine` for a text-to-image DiT: one optimisation profile per engine batch, each
    setting x_t, t and text_tokens, the tokens (batch, text_len, hidden) with the batch of
    x_t."""
    from deco_export.export.tensorrt import BuildSettings, build_engine
    from runtimes.sizes import SizeRange

    trt = _RecordingTRT()
    settings = BuildSettings(buckets=(1, 2))
    profiles = tp.profiles_for("dit", T2I, (64, 64), settings.engine_batches,
                               SizeRange.around((64, 64), 16))
    (tmp_path / "dit.onnx").write_bytes(b"onnx")
    info = build_engine(trt, tmp_path / "dit.onnx", tmp_path / "out" / "dit.plan", profiles,
                        settings, tmp_path / "timing.cache", lambda _msg: None)
    assert (tmp_path / "out" / "dit.plan").read_bytes() == b"plan"
    assert (tmp_path / "timing.cache").read_bytes() == b"timings" and "build_seconds" in info
    shapes = [c for c in trt.calls if c[0] == "set_shape"]
    assert [c[1] for c in shapes] == ["x_t", "t", "text_tokens"] * 3  # engine batches 1, 2, 4
    texts = [c[2:] for c in shapes if c[1] == "text_tokens"]
    assert texts == [((n, 8, 64),) * 3 for n in (1, 2, 4)]
    images = [c[2:] for c in shapes if c[1] == "x_t"]
    assert [lo[0] for lo, _, _ in images] == [1, 2, 4] and images[0][2] == (1, 3, 128, 128)
    assert [c[0] for c in trt.calls].count("add_optimization_profile") == 3
    assert ("parse", "dit.onnx") in trt.calls and ("clear_flag", 7) in trt.calls


def test_distilled_engine_build_declares_the_guidance_profile(tmp_path):
    """A guidance-distilled DiT's engine: the profiles come from its graph record, so each
    sets ``guidance`` (batch,) beside x_t, t and y; the build drops the doubled CFG batches
    (no [uncond; cond] batch ever runs) and keys the engines by that."""
    from deco_export.export.tensorrt import BuildSettings, build_engine
    from runtimes.config import ModelConfig
    from runtimes.sizes import SizeRange

    distilled = ModelConfig.from_dict(dict(TINY, guidance_distilled=True))
    settings = BuildSettings(buckets=(1, 2)).for_model(distilled)
    assert settings.engine_batches == (1, 2) and not settings.cfg
    assert BuildSettings(buckets=(1, 2)).for_model(ModelConfig.from_dict(TINY)).cfg
    trt = _RecordingTRT()
    profiles = tp.profiles_for("dit", distilled, (64, 64), settings.engine_batches,
                               SizeRange.around((64, 64), 16))
    (tmp_path / "dit.onnx").write_bytes(b"onnx")
    build_engine(trt, tmp_path / "dit.onnx", tmp_path / "out" / "dit.plan", profiles, settings,
                 tmp_path / "timing.cache", lambda _msg: None)
    shapes = [c for c in trt.calls if c[0] == "set_shape"]
    assert [c[1] for c in shapes] == ["x_t", "t", "y", "guidance"] * 2
    assert [c[2:] for c in shapes if c[1] == "guidance"] == [((n,),) * 3 for n in (1, 2)]


def test_t2i_engines_keep_the_bundles_negative_prompt(tmp_path):
    """What `deco export tensorrt` commits into a text-to-image bundle (its transaction, the
    manifest entries of built engines) leaves the stored negative prompt as the ONNX export
    wrote it, so the TensorRT pipeline's unconditional half needs no text encoder."""
    from deco_export.export import tensorrt as ex
    from deco_export.export.bundle_io import BundleTransaction
    from runtimes.config import ModelConfig
    from runtimes.pipeline import bundle_negative_embeds

    config = ModelConfig.from_dict(T2I)
    source = {"path": "/nonexistent/ckpt", "sha256": "0" * 64}
    negative = np.random.default_rng(0).standard_normal((1, 8, 48), dtype=np.float32)
    root = tmp_path / "bundle"
    with BundleTransaction(root, config, (64, 64), source, negative_prompt_embeds=negative,
                           negative_prompt="blurry") as txn:
        for g in ("dit", "decoder", "text_embed"):
            path = txn.staging / f"{g}.fp16.onnx"
            path.write_bytes(f"{g}-fp16".encode())
            txn.add_artifact(runtime="onnx", graph=g, precision="fp16", path=path,
                             **_t2i_io(config, g))
    settings = ex.BuildSettings(buckets=(1,))
    manifest = rb.read_manifest(root)
    items = ex.plan_builds(root, manifest, ["fp16"], H100, settings)
    assert [(i.graph, i.action) for i in items] == [("dit", "build"), ("decoder", "build"),
                                                     ("text_embed", "build")]
    with BundleTransaction(root, manifest.model, (64, 64), manifest.source) as txn:
        for item in items:
            plan = txn.staging / item.key.relpath
            plan.parent.mkdir(parents=True)
            plan.write_bytes(b"plan-" + item.graph.encode())
            txn.add_artifact(runtime="tensorrt", graph=item.graph, precision="fp16", path=plan,
                             details=ex.artifact_details(item, settings),
                             **_t2i_io(config, item.graph))
    after = rb.read_manifest(root)
    dit = after.get_artifact("tensorrt", "dit", "fp16")
    assert [s.name for s in dit.inputs] == ["x_t", "t", "text_tokens"]
    assert dit.input("text_tokens").shape == ["batch", 8, 64]
    embed = after.get_artifact("tensorrt", "text_embed", "fp16")
    assert embed.input("text").shape == ["batch", 8, 48]
    assert after.text.negative_prompt == "blurry"
    assert np.array_equal(bundle_negative_embeds(root, after), negative)
    assert rb.verify(root, runtime="tensorrt") == []


def _t2i_io(config, graph):
    from deco_export.export.graphs import io_specs

    inputs, outputs = io_specs(config, graph, 64, 64)
    return {"inputs": [s.to_dict() for s in inputs], "outputs": [s.to_dict() for s in outputs]}
