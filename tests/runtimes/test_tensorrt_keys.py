"""TensorRT cache keys, the engine-directory layout, stale/foreign refusal, the timing cache and
ONNX Runtime's TensorRT provider options (no TensorRT needed)."""

from __future__ import annotations

import json

import pytest

from runtimes import bundle as rb
from runtimes.backend import BackendError
from runtimes.backends import tensorrt_keys as tk
from runtimes.backends.tensorrt_ort import ort_tensorrt_provider_options
from tests.runtimes.tensorrt_fakes import A100, H100


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
    opts = ort_tensorrt_provider_options(
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
    plain = ort_tensorrt_provider_options(tmp_path)
    assert "trt_fp16_enable" not in plain and "trt_profile_min_shapes" not in plain
    with pytest.raises(ValueError):
        ort_tensorrt_provider_options(tmp_path, builder_optimization_level=9)
