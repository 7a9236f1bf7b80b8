"""TensorRT: everything that needs no TensorRT runs everywhere (buckets, profiles, cache keys,
the engine-directory layout, stale/foreign refusal, build planning, manifest entries, error
paths); building and running engines runs only where ``tensorrt``, cuda-python and a CUDA GPU
all work, and skips with the reason otherwise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from runtimes import bundle as rb
from runtimes.backend import BackendError
from runtimes.backends import tensorrt_keys as tk
from tests.helpers import REPO as ROOT

TINY = {"hidden_size": 64, "num_heads": 4, "dit_depth": 2, "decoder_hidden_size": 32,
        "decoder_depth": 3, "patch_size": 16, "num_classes": 10, "in_channels": 3,
        "image_size": [64, 64]}
H100 = tk.EngineEnvironment("10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0")
A100 = tk.EngineEnvironment("10.8.0.43", "NVIDIA A100-SXM4-80GB", "8.0")


# ---------------------------------------------------------------------------------------------
# Buckets, engine batches, profiles


def test_engine_batches_count_the_cfg_doubling():
    assert tk.engine_batches((1, 2, 4, 8)) == (1, 2, 4, 8, 16)
    assert tk.engine_batches((1, 2, 4, 8), cfg=False) == (1, 2, 4, 8)
    assert tk.engine_batches((3,)) == (3, 6)
    assert tk.engine_batches([8, 1, 1, 2]) == (1, 2, 4, 8, 16)


@pytest.mark.parametrize("text, expected", [("1,2,4,8", (1, 2, 4, 8)), ("8, 1,1", (1, 8)),
                                            ("3", (3,))])
def test_parse_buckets(text, expected):
    assert tk.parse_buckets(text) == expected


@pytest.mark.parametrize("text", ["", "0", "1,a", "-2", "1.5"])
def test_parse_buckets_rejects_nonsense(text):
    with pytest.raises(ValueError, match="batch buckets"):
        tk.parse_buckets(text)


def test_engine_batch_choice_pads_up_to_the_next_bucket():
    batches = tk.engine_batches((1, 2, 4, 8))
    assert [tk.unguided_engine_batch(r, batches) for r in (1, 2, 3, 4, 5, 9, 16)] == [
        1, 2, 4, 4, 8, 16, 16]
    # A guided batch of b images runs [uncond | pad; cond | pad] in an even engine batch >= 2b.
    assert [tk.guided_engine_batch(b, batches) for b in (1, 2, 3, 4, 5, 8)] == [
        2, 4, 8, 8, 16, 16]
    assert tk.guided_engine_batch(2, (3, 6)) == 6


def test_engine_batch_choice_says_how_to_rebuild():
    batches = tk.engine_batches((1, 2, 4, 8))
    with pytest.raises(ValueError, match=r"--batch-buckets 1,2,4,8,16,32"):
        tk.unguided_engine_batch(17, batches)
    with pytest.raises(ValueError, match=r"needs an engine batch of at least 18"):
        tk.guided_engine_batch(9, batches)
    with pytest.raises(ValueError, match="at least one"):
        tk.guided_engine_batch(0, batches)


def test_profiles_are_static_per_engine_batch():
    profiles = tk.profiles_for("dit", TINY, (64, 64), (1, 2, 4))
    assert [p.batch for p in profiles] == [1, 2, 4]
    assert profiles[2].shapes == {"x_t": (4, 3, 64, 64), "t": (4,), "y": (4,)}
    dec = tk.profiles_for("decoder", TINY, (64, 64), (2,))[0]
    assert dec.shapes == {"x_t": (2, 3, 64, 64), "cond": (2, 16, 64)}
    ref = tk.profiles_for("refresh", TINY, (32, 64), (8,))[0]
    assert ref.shapes == {"hidden": (8, 8, 64), "t": (8,)}
    assert ref.to_dict() == {"batch": 8, "shapes": {"hidden": [8, 8, 64], "t": [8]}}
    with pytest.raises(ValueError, match="patch size"):
        tk.profiles_for("dit", TINY, (60, 64), (1,))
    with pytest.raises(ValueError, match="unknown graph"):
        tk.profiles_for("vae", TINY, (64, 64), (1,))


def test_profiles_span_the_size_range_with_the_optimum_at_the_default():
    from runtimes.sizes import SizeRange

    sizes = SizeRange((32, 48), (128, 96), (64, 64), 16)
    dit = tk.profiles_for("dit", TINY, (64, 64), (1, 4), sizes)
    assert [p.batch for p in dit] == [1, 4]
    assert dit[1].bounds("x_t") == ((4, 3, 32, 48), (4, 3, 64, 64), (4, 3, 128, 96))
    assert dit[1].bounds("t") == ((4,), (4,), (4,))  # the batch stays static per profile
    dec = tk.profiles_for("decoder", TINY, (64, 64), (2,), sizes)[0]
    assert dec.bounds("cond") == ((2, 6, 64), (2, 16, 64), (2, 48, 64))  # tokens follow H, W
    ref = tk.profiles_for("refresh", TINY, (64, 64), (8,), sizes)[0]
    assert ref.bounds("hidden") == ((8, 6, 64), (8, 16, 64), (8, 48, 64))
    assert ref.to_dict()["min_shapes"] == {"hidden": [8, 6, 64], "t": [8]}
    # one size: the static profiles of a fixed-size bundle
    fixed = tk.profiles_for("dit", TINY, (64, 64), (2,), SizeRange.fixed((64, 64), 16))[0]
    assert fixed.bounds("x_t") == ((2, 3, 64, 64),) * 3 and "min_shapes" not in fixed.to_dict()


# ---------------------------------------------------------------------------------------------
# Cache keys and layout


def _key(env: tk.EngineEnvironment = H100, **over) -> tk.EngineKey:
    base = dict(graph="dit", precision="fp16", onnx_sha256="a" * 64, image_size=(64, 64),
                engine_batches=(1, 2, 4), build=tk.build_options(3, None, False))
    base.update(over)
    return tk.EngineKey(base["graph"], base["precision"], base["onnx_sha256"],
                        base["image_size"], base["engine_batches"], env.tensorrt_version,
                        env.gpu_name, env.compute_capability, base["build"])


def test_cache_key_is_stable_and_laid_out_by_graph_and_precision():
    key = _key()
    assert key.digest == _key().digest and len(key.digest) == 64
    assert key.dir_name == f"dit-fp16-{key.digest[:16]}"
    assert key.relpath == f"engines/{key.dir_name}/dit.plan"
    assert key.json_relpath == f"engines/{key.dir_name}/engine.json"
    assert tk.EngineKey.from_fields(json.loads(json.dumps(key.fields()))) == key


@pytest.mark.parametrize("change", [
    {"onnx_sha256": "b" * 64}, {"precision": "bf16"}, {"graph": "decoder"},
    {"engine_batches": (1, 2, 4, 8)}, {"image_size": (128, 64)},
    {"build": tk.build_options(5, None, False)}, {"build": tk.build_options(3, 1 << 30, False)},
    {"build": tk.build_options(3, None, True)},
])
def test_every_field_changes_the_key(change):
    assert _key(**change).digest != _key().digest


@pytest.mark.parametrize("env", [
    tk.EngineEnvironment("10.9.0.34", H100.gpu_name, "9.0"),
    tk.EngineEnvironment(H100.tensorrt_version, "NVIDIA H100 PCIe", "9.0"),
    tk.EngineEnvironment(H100.tensorrt_version, H100.gpu_name, "9.1"),
])
def test_tensorrt_version_gpu_name_and_compute_capability_change_the_key(env):
    assert _key(env).digest != _key().digest


def test_build_options_are_checked():
    with pytest.raises(ValueError, match="0..5"):
        tk.build_options(6)
    with pytest.raises(ValueError, match="workspace"):
        tk.build_options(3, 0)


def _details(key: tk.EngineKey) -> dict:
    return {"cache_key": key.digest, "key": key.fields()}


def test_resolve_accepts_an_engine_built_here(tmp_path):
    key = _key()
    got = tk.resolve_engine(tmp_path, _details(key), key.relpath, "f" * 64, H100,
                            onnx_sha256="a" * 64)
    assert got.relpath == key.relpath and got.key == key and got.sha256 == "f" * 64
    # While staging the manifest lists no ONNX artifact: the environment still has to match.
    assert tk.resolve_engine(tmp_path, _details(key), key.relpath, None, H100).key == key


def test_resolve_refuses_a_foreign_gpu_naming_both(tmp_path):
    key = _key(A100)
    with pytest.raises(tk.EngineMismatchError) as err:
        tk.resolve_engine(tmp_path, _details(key), key.relpath, None, H100)
    assert err.value.kind == "foreign"
    msg = str(err.value)
    assert "A100" in msg and "H100" in msg and "8.0" in msg and "9.0" in msg
    assert "deco export tensorrt" in msg and "not run" in msg
    assert isinstance(err.value, BackendError)


def test_resolve_refuses_a_foreign_tensorrt_version(tmp_path):
    key = _key(tk.EngineEnvironment("10.3.0.26", H100.gpu_name, "9.0"))
    with pytest.raises(tk.EngineMismatchError, match=r"TensorRT 10\.3\.0\.26.*TensorRT 10\.8"):
        tk.resolve_engine(tmp_path, _details(key), key.relpath, None, H100)


def test_resolve_refuses_a_stale_engine_after_the_onnx_changed(tmp_path):
    key = _key()
    with pytest.raises(tk.EngineMismatchError) as err:
        tk.resolve_engine(tmp_path, _details(key), key.relpath, None, H100,
                          onnx_sha256="c" * 64, rebuild_hint="run the fix")
    assert err.value.kind == "stale" and "ONNX graph changed" in str(err.value)
    assert str(err.value).endswith("run the fix")


@pytest.mark.parametrize("tamper", ["cache_key", "fields", "missing"])
def test_resolve_refuses_a_corrupt_entry(tmp_path, tamper):
    key = _key()
    details = _details(key)
    if tamper == "cache_key":
        details["cache_key"] = "0" * 64
    elif tamper == "fields":
        details["key"] = dict(details["key"], gpu="NVIDIA H100 80GB HBM3 ")
    else:
        del details["key"]
    with pytest.raises(tk.EngineMismatchError) as err:
        tk.resolve_engine(tmp_path, details, key.relpath, None, H100)
    assert err.value.kind == "corrupt"


def test_resolve_finds_an_engine_built_earlier_for_this_machine(tmp_path):
    """A bundle shared by two GPUs: the manifest names the A100 engine, the H100 one is on disk."""
    foreign = _key(A100)
    ours = foreign.for_environment(H100)
    (tmp_path / ours.relpath).parent.mkdir(parents=True)
    (tmp_path / ours.relpath).write_bytes(b"plan")
    record = tk.engine_record(ours, rb.sha256_file(tmp_path / ours.relpath), 4)
    (tmp_path / ours.json_relpath).write_text(json.dumps(record))
    got = tk.resolve_engine(tmp_path, _details(foreign), foreign.relpath, None, H100)
    assert got.relpath == ours.relpath and got.sha256 == record["plan_sha256"]
    # An engine.json that does not hash to its directory's key is not trusted.
    record["key"]["build"]["tf32"] = True
    (tmp_path / ours.json_relpath).write_text(json.dumps(record))
    with pytest.raises(tk.EngineMismatchError, match="foreign"):
        tk.resolve_engine(tmp_path, _details(foreign), foreign.relpath, None, H100)


def test_describe_mismatch_lists_every_difference():
    kind, reasons = tk.describe_mismatch(_key(A100).fields(),
                                         _key(H100, onnx_sha256="d" * 64).fields())
    assert kind == "stale" and len(reasons) == 2
    assert tk.describe_mismatch(_key().fields(), _key().fields()) == ("", [])


def test_timing_cache_is_per_tensorrt_version_and_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("DECO_CACHE_DIR", str(tmp_path))
    path = tk.timing_cache_path(H100)
    assert path.parent == tmp_path / "tensorrt"
    assert path.name == "timing-trt10.8.0.43-nvidia-h100-80gb-hbm3-sm90.cache"
    assert tk.timing_cache_path(A100) != path
    assert tk.timing_cache_path(H100, tmp_path / "x").parent == tmp_path / "x"


def test_ort_tensorrt_provider_options(tmp_path):
    opts = tk.ort_tensorrt_provider_options(
        tmp_path, builder_optimization_level=4, workspace_bytes=1 << 30, fp16_kernels=True,
        profile={"x_t": ((1, 3, 64, 64), (2, 3, 64, 64), (4, 3, 64, 64)),
                 "t": ((1,), (2,), (4,))})
    assert opts["trt_engine_cache_enable"] == "True"
    assert opts["trt_engine_cache_path"] == str(tmp_path)
    assert opts["trt_timing_cache_enable"] == "True"
    assert opts["trt_builder_optimization_level"] == "4"
    assert opts["trt_max_workspace_size"] == str(1 << 30)
    assert opts["trt_fp16_enable"] == "True"
    assert opts["trt_profile_min_shapes"] == "x_t:1x3x64x64,t:1"
    assert opts["trt_profile_max_shapes"] == "x_t:4x3x64x64,t:4"
    assert all(isinstance(v, str) for v in opts.values())
    plain = tk.ort_tensorrt_provider_options(tmp_path)
    assert "trt_fp16_enable" not in plain and "trt_profile_min_shapes" not in plain
    with pytest.raises(ValueError):
        tk.ort_tensorrt_provider_options(tmp_path, builder_optimization_level=9)


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


def test_runtimes_tensorrt_modules_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['tensorrt'] = None\n"
            "import runtimes, runtimes.backends.tensorrt, runtimes.backends.tensorrt_keys\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


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


# ---------------------------------------------------------------------------------------------
# The backend's own bookkeeping, with a recording stand-in for the device (no TensorRT, no CUDA:
# this checks which copies, kernels and graph calls the backend issues, not what they compute)


class _RecordingCuda:
    stream_handle = 7

    def __init__(self):
        self.calls: list[tuple] = []
        self._next = 1 << 20
        self.records: dict[tuple, int] = {}

    def _alloc(self, nbytes):
        ptr, self._next = self._next, self._next + ((nbytes + 511) // 512 + 1) * 512
        return ptr

    def malloc(self, nbytes):
        return self._alloc(nbytes)

    def free_owned(self, ptr):
        pass

    def take(self, nbytes):
        from runtimes.backends.cuda_device import _Block

        return _Block(self._alloc(nbytes), nbytes, None)

    def copy(self, dst, src, nbytes, kind="DeviceToDevice"):
        if nbytes > 0 and dst != src:
            self.calls.append(("copy", dst, src, nbytes, kind))

    def memset(self, ptr, nbytes):
        pass

    def synchronize(self):
        pass

    def launch(self, name, n, values, types):
        assert len(values) == len(types)
        self.calls.append(("kernel", name, *values))

    def params(self, t, dt, w):
        return self.records.setdefault((t, dt, w), 0xA000 + 16 * len(self.records))

    def begin_capture(self):
        self.calls.append(("begin_capture",))

    def end_capture(self):
        self.calls.append(("end_capture",))
        self.graphs = getattr(self, "graphs", 0) + 1
        return f"graph{self.graphs}"

    def launch_graph(self, graph):
        self.calls.append(("launch_graph", graph))

    def destroy_graph(self, graph):
        pass

    def take_calls(self):
        calls, self.calls = self.calls, []
        return calls


class _RecordingEngine:
    def __init__(self, cuda, graph, outputs):
        self.cuda, self.graph, self.outputs = cuda, graph, outputs

    def memory_size(self, batch):
        return 1024 * batch

    def context(self, batch, shapes, addresses, memory, stream):
        # the DiT's condition is labels (c2i) or text tokens (t2i, with text_embed's text)
        assert set(addresses) >= {"x_t", "t", "cond", "hidden", "v"}
        assert len(set(addresses) & {"y", "text_tokens"}) == 1
        assert ("text" in addresses) == ("text_tokens" in addresses)

    def rebind_memory(self, memory):
        pass

    def execute(self, batch, stream):
        self.cuda.calls.append(("execute", self.graph, batch))

    def close(self):
        pass


def _recording_backend(sizes=None):
    from runtimes.backends.tensorrt import TensorRTBackend
    from runtimes.config import ModelConfig
    from runtimes.sizes import SizeRange

    cuda = _RecordingCuda()
    be = object.__new__(TensorRTBackend)
    be._cuda = cuda
    be._engines = {"dit": _RecordingEngine(cuda, "dit", ["cond", "hidden"]),
                   "decoder": _RecordingEngine(cuda, "decoder", ["v"])}
    be._slots, be._memory, be._last_out, be._last_key = {}, (0, 0), None, None
    be.cuda_graphs, be.image_size, be.batches = True, (64, 64), (1, 2, 4, 8, 16)
    be.null_class, be._c, be._d = 10, 3, 64
    be._model, be._size, be._bound = ModelConfig.from_dict(TINY), None, {}
    be.sizes = sizes or SizeRange.fixed((64, 64), 16)
    be.supports_refresh = False
    return be, cuda


def test_step_bookkeeping_guided_then_replay_then_unguided():
    from runtimes.backends.tensorrt import DeviceArray

    be, cuda = _recording_backend()
    row = 3 * 64 * 64 * 4
    x = DeviceArray(cuda, 5000 << 12, (3, 3, 64, 64), "float32")
    y2 = DeviceArray(cuda, 6000 << 12, (6,), "int64")
    out = be.step(x, y2, 0.2, 0.01, 3.2)
    slot = be._slots[(8, 64, 64)]  # 3 images guided -> [3 | pad 1; 3 | pad 1]
    xs, ys = slot.buffers["x_t"].ptr, slot.buffers["y"].ptr
    calls = [c for c in cuda.take_calls() if c[0] != "copy" or c[4] != "HostToDevice"]
    copies = [c[1:4] for c in calls if c[0] == "copy"]
    assert copies == [(xs, x.ptr, 3 * row), (xs + 4 * row, x.ptr, 3 * row),
                      (ys, y2.ptr, 24), (ys + 32, y2.ptr + 24, 24),
                      (slot.buffers["params"].ptr, cuda.records[(0.2, 0.01, 3.2)], 12)]
    rest = [c[:2] if c[0] == "kernel" else c for c in calls if c[0] != "copy"]
    warm = [("kernel", "fill_t"), ("execute", "dit", 8), ("execute", "decoder", 8)]
    assert rest == [*warm, ("begin_capture",), *warm, ("kernel", "euler_update"),
                    ("end_capture",), ("launch_graph", "graph1")]
    update = next(c for c in calls if c[:2] == ("kernel", "euler_update"))
    assert update[2:] == (xs, slot.buffers["v"].ptr, slot.buffers["params"].ptr,
                          4 * 3 * 64 * 64, 1)
    assert out.ptr == xs and out.shape == (3, 3, 64, 64)

    # The next guided step: the state is already in place; one parameter copy, one launch.
    again = be.step(out, y2, 0.3, 0.01, 3.2)
    calls = cuda.take_calls()
    assert [c[0] for c in calls] == ["copy", "launch_graph"] and calls[1][1] == "graph1"
    assert calls[0][2] == cuda.records[(0.3, 0.01, 3.2)]

    # Leaving the guidance interval: the state moves to the unguided slot once.
    y = DeviceArray(cuda, 7000 << 12, (3,), "int64")
    be.step(again, y, 0.05, 0.01, None)
    slot4 = be._slots[(4, 64, 64)]
    calls = [c for c in cuda.take_calls() if c[0] != "copy" or c[4] != "HostToDevice"]
    copies = [c[1:4] for c in calls if c[0] == "copy"]
    assert copies[:2] == [(slot4.buffers["x_t"].ptr, xs, 3 * row),
                          (slot4.buffers["y"].ptr, y.ptr, 24)]
    update = next(c for c in calls if c[:2] == ("kernel", "euler_update"))
    assert update[-2:] == (4 * 3 * 64 * 64, 0)
    assert calls[-1] == ("launch_graph", "graph2")


def test_graph_calls_run_the_models_then_copy_out_fresh_arrays():
    from runtimes.backends.tensorrt import DeviceArray

    be, cuda = _recording_backend()
    x2 = DeviceArray(cuda, 5000 << 12, (6, 3, 64, 64), "float32")
    t2 = DeviceArray(cuda, 5100 << 12, (6,), "float32")
    y2 = DeviceArray(cuda, 5200 << 12, (6,), "int64")
    cond = be.dit(x2, t2, y2)
    slot = be._slots[(8, 64, 64)]
    calls = [c for c in cuda.take_calls() if c[0] != "copy" or c[4] != "HostToDevice"]
    assert ("execute", "dit", 8) in calls
    assert cond.shape == (6, 16, 64) and cond.ptr != slot.buffers["cond"].ptr
    assert calls[-1][1:4] == (cond.ptr, slot.buffers["cond"].ptr, 6 * 16 * 64 * 4)
    with pytest.raises(ValueError, match="32x32 is not a size these TensorRT engines run.*64x64"):
        be.decoder(DeviceArray(cuda, 1 << 30, (6, 3, 32, 32), "float32"), cond)
    with pytest.raises(ValueError, match="--batch-buckets"):
        be.dit(DeviceArray(cuda, 1 << 30, (17, 3, 64, 64), "float32"), t2, y2)


def test_engines_with_a_size_range_run_each_size_in_its_own_slot():
    """A second size gets its own buffers; the batch's contexts move to it, so a graph
    captured at the first size is captured again when that size comes back."""
    from runtimes.backends.tensorrt import DeviceArray
    from runtimes.sizes import SizeRange

    be, cuda = _recording_backend(SizeRange.around((64, 64), 16))
    y = DeviceArray(cuda, 7000 << 12, (1,), "int64")
    a = be.step(DeviceArray(cuda, 5000 << 12, (1, 3, 64, 64), "float32"), y, 0.2, 0.1, None)
    b = be.step(DeviceArray(cuda, 5100 << 12, (1, 3, 32, 96), "float32"), y, 0.2, 0.1, None)
    assert set(be._slots) == {(1, 64, 64), (1, 32, 96)}
    assert be._slots[(1, 32, 96)].shapes["cond"] == (1, 12, 64) and b.shape == (1, 3, 32, 96)
    assert a.ptr != b.ptr and be._bound[1] == (32, 96)
    assert not be._slots[(1, 64, 64)].graphs  # dropped when the contexts moved
    cuda.take_calls()
    be.step(a, y, 0.3, 0.1, None)
    assert [c[0] for c in cuda.take_calls()].count("begin_capture") == 1
    cond = be.dit(DeviceArray(cuda, 1 << 30, (1, 3, 32, 96), "float32"),
                  DeviceArray(cuda, 2 << 30, (1,), "float32"), y)
    assert cond.shape == (1, 12, 64)
    with pytest.raises(ValueError, match="16x96 is not a size these TensorRT engines run"):
        be.decoder(DeviceArray(cuda, 1 << 30, (1, 3, 16, 96), "float32"), cond)


def test_device_array_views_and_arithmetic_match_the_kernel_signature():
    import re

    from runtimes.backends.cuda_device import _KERNELS, DeviceArray

    cuda = _RecordingCuda()
    a = DeviceArray(cuda, 4096, (4, 3, 2, 2), "float32")
    view = a[1:3]
    assert view.ptr == 4096 + 48 and view.shape == (2, 3, 2, 2) and len(view) == 2
    assert a[3:1].shape[0] == 0
    with pytest.raises(TypeError):
        a[::2]
    b = DeviceArray(cuda, 8192, (4, 3, 2, 2), "float32")
    out = a - b * 0.5
    kernels = [c for c in cuda.calls if c[0] == "kernel"]
    assert kernels[0][1:] == ("lincomb", kernels[0][2], b.ptr, 0, 0.5, 0.0, 48)
    assert kernels[1][1:] == ("lincomb", out.ptr, a.ptr, kernels[0][2], 1.0, -1.0, 48)
    signature = re.search(r"void lincomb\(([^)]*)\)", _KERNELS).group(1)
    assert [p.split()[-1].strip("*") for p in signature.split(",")] == [
        "out", "x", "y", "a", "b", "n"]
    with pytest.raises(TypeError):
        a * b
    with pytest.raises(ValueError, match="shape mismatch"):
        a + b[0:2]


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

T2I = dict(TINY, num_classes=0, family="t2i", text_len=8, text_dim=48, refine_depth=1)


def test_t2i_profiles_fix_the_text_shape_and_follow_the_batch():
    from runtimes.sizes import SizeRange

    static = tk.profiles_for("dit", T2I, (64, 64), (1, 4))
    assert static[1].shapes == {"x_t": (4, 3, 64, 64), "t": (4,), "text_tokens": (4, 8, 64)}
    sizes = SizeRange((32, 48), (128, 96), (64, 64), 16)
    ranged = tk.profiles_for("dit", T2I, (64, 64), (2,), sizes)[0]
    assert ranged.bounds("x_t") == ((2, 3, 32, 48), (2, 3, 64, 64), (2, 3, 128, 96))
    assert ranged.bounds("text_tokens") == ((2, 8, 64),) * 3  # text_len, hidden fixed
    embed = tk.profiles_for("text_embed", T2I, (64, 64), (2,), sizes)[0]
    assert embed.bounds("text") == ((2, 8, 48),) * 3  # no image axis: one shape per batch
    assert tk.profiles_for("decoder", T2I, (64, 64), (2,))[0].shapes == {
        "x_t": (2, 3, 64, 64), "cond": (2, 16, 64)}


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
    profiles = tk.profiles_for("dit", T2I, (64, 64), settings.engine_batches,
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


class _RecordingCudaEngine:
    """A deserialised engine as `tensorrt.ICudaEngine` describes its I/O."""

    def __init__(self, inputs, outputs, batches):
        self.io = [(n, "in") for n in inputs] + [(n, "out") for n in outputs]
        self.num_io_tensors = len(self.io)
        self.num_optimization_profiles = len(batches)
        self._batches = batches

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return dict(self.io)[name]

    def get_tensor_dtype(self, name):
        return "float32"

    def get_tensor_profile_shape(self, name, p):
        n = self._batches[p]
        return (n, 3, 64, 64), (n, 3, 64, 64), (n, 3, 64, 64)


def _engine_trt(inputs, outputs=("cond", "hidden"), batches=(1, 2)):
    trt = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="in"),
                          DataType=SimpleNamespace(FLOAT="float32", INT64="int64"))
    runtime = SimpleNamespace(
        deserialize_cuda_engine=lambda data: _RecordingCudaEngine(inputs, outputs, batches))
    return trt, runtime


def test_t2i_engine_io_is_checked_against_the_t2i_record(tmp_path):
    from runtimes.backends.tensorrt_engine import Engine
    from runtimes.config import ModelConfig

    plan = tmp_path / "dit.plan"
    plan.write_bytes(b"plan")
    config = ModelConfig.from_dict(T2I)
    engine = Engine(*_engine_trt(["x_t", "t", "text_tokens"]), plan, "dit", config)
    assert engine.inputs == ["x_t", "t", "text_tokens"] and engine.batches == (1, 2)
    with pytest.raises(BackendError,
                       match=r"inputs \['x_t', 't', 'y'\].*'text_tokens'.*rebuild it"):
        Engine(*_engine_trt(["x_t", "t", "y"]), plan, "dit", config)
    # a DiT that still takes the raw text features (an older bundle) is refused too
    with pytest.raises(BackendError, match=r"'text_tokens'.*rebuild it"):
        Engine(*_engine_trt(["x_t", "t", "text"]), plan, "dit", config)
    embed = Engine(*_engine_trt(["text"], ("text_tokens",)), plan, "text_embed", config)
    assert embed.inputs == ["text"] and embed.outputs == ["text_tokens"]
    # a class-conditional bundle still wants labels
    with pytest.raises(BackendError, match=r"expected \['x_t', 't', 'y'\]"):
        Engine(*_engine_trt(["x_t", "t", "text_tokens"]), plan, "dit",
               ModelConfig.from_dict(TINY))


def _t2i_recording_backend():
    from runtimes.config import ModelConfig

    be, cuda = _recording_backend()
    be._model = ModelConfig.from_dict(T2I)
    be._engines["text_embed"] = _RecordingEngine(cuda, "text_embed", ["text_tokens"])
    be.supports_text_embedding = True
    return be, cuda


def test_t2i_backend_feeds_text_token_rows_into_the_slot():
    """The DiT call copies the (B, L, D) text tokens into the slot's ``text_tokens`` buffer; a
    guided fused step lays [negative; prompts] out as [uncond | pad; cond | pad] row by row."""
    from runtimes.backends.tensorrt import DeviceArray

    be, cuda = _t2i_recording_backend()
    row = 8 * 64 * 4
    x = DeviceArray(cuda, 5000 << 12, (3, 3, 64, 64), "float32")
    t = DeviceArray(cuda, 5100 << 12, (3,), "float32")
    tokens = DeviceArray(cuda, 5200 << 12, (3, 8, 64), "float32")
    cond = be.dit(x, t, tokens)
    slot = be._slots[(4, 64, 64)]
    assert "y" not in slot.buffers and slot.shapes["text_tokens"] == (4, 8, 64)
    assert slot.shapes["text"] == (4, 8, 48)  # text_embed's input, in the same slot
    assert slot.buffers["text_tokens"].dtype == "float32"
    copies = [c[1:4] for c in cuda.take_calls() if c[0] == "copy"]
    assert (slot.buffers["text_tokens"].ptr, tokens.ptr, 3 * row) in copies
    assert cond.shape == (3, 16, 64)
    with pytest.raises(TypeError, match="text_tokens must be float32"):
        be.dit(x, t, DeviceArray(cuda, 5300 << 12, (3, 8, 64), "int64"))

    both = DeviceArray(cuda, 6000 << 12, (6, 8, 64), "float32")
    be.step(x, both, 0.2, 0.01, 4.0)
    slot8 = be._slots[(8, 64, 64)]
    tb = slot8.buffers["text_tokens"].ptr
    copies = [c[1:4] for c in cuda.take_calls() if c[0] == "copy" and c[4] != "HostToDevice"]
    assert (tb, both.ptr, 3 * row) in copies
    assert (tb + 4 * row, both.ptr + 3 * row, 3 * row) in copies
    with pytest.raises(ValueError,
                       match=r"step: text_tokens must be float32 rows of shape \(8, 64\)"):
        be.step(x, DeviceArray(cuda, 7000 << 12, (6,), "int64"), 0.2, 0.01, 4.0)


def test_t2i_backend_embeds_text_into_the_slot_the_dit_reads():
    """embed_text runs the text_embed engine on the (2B, L, C) text: the text goes into the
    slot's ``text`` buffer, the engine writes ``text_tokens`` (the DiT's condition buffer) and
    the tokens come back as a copy; the next fused step copies its condition again."""
    from runtimes.backends.tensorrt import DeviceArray

    be, cuda = _t2i_recording_backend()
    x = DeviceArray(cuda, 5000 << 12, (3, 3, 64, 64), "float32")
    both = DeviceArray(cuda, 6000 << 12, (6, 8, 64), "float32")
    be.step(x, both, 0.2, 0.01, 4.0)
    cuda.take_calls()
    text = DeviceArray(cuda, 6500 << 12, (6, 8, 48), "float32")
    tokens = be.embed_text(text)
    slot = be._slots[(8, 64, 64)]
    calls = cuda.take_calls()
    assert ("copy", slot.buffers["text"].ptr, text.ptr, 6 * 8 * 48 * 4) in [c[:4] for c in calls]
    assert ("execute", "text_embed", 8) in calls
    assert tokens.shape == (6, 8, 64) and tokens.dtype == "float32"
    assert slot.bound_y is None  # text_embed overwrote the DiT's condition buffer
    be.step(x, both, 0.3, 0.01, 4.0)
    copies = [c[1:4] for c in cuda.take_calls() if c[0] == "copy"]
    assert (slot.buffers["text_tokens"].ptr, both.ptr, 3 * 8 * 64 * 4) in copies


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
    assert after.extra["text"]["negative_prompt"] == "blurry"
    assert np.array_equal(bundle_negative_embeds(root, after), negative)
    assert rb.verify(root, runtime="tensorrt") == []


def _t2i_io(config, graph):
    from deco_export.export.graphs import io_specs

    inputs, outputs = io_specs(config, graph, 64, 64)
    return {"inputs": [s.to_dict() for s in inputs], "outputs": [s.to_dict() for s in outputs]}
