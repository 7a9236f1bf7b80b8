"""ONNX Runtime backend on a tiny linear DeCo-shaped bundle built with onnx.helper, and the
torch-free guarantee of ``runtimes``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import runtimes  # noqa: E402
from runtimes.backend import Backend, BackendError  # noqa: E402
from runtimes.backends.onnxruntime import OnnxRuntimeBackend, _one_node_model  # noqa: E402
from runtimes.bundle import Artifact, BundleError, Manifest, write_manifest  # noqa: E402
from runtimes.sizes import SizeError  # noqa: E402
from tests.helpers import REPO  # noqa: E402

C, H, P, D, CLASSES = 3, 8, 4, 8, 5
L, PATCH = (H // P) ** 2, C * P * P


class LinearModel:
    """A linear "DiT" and "decoder" with DeCo's interfaces, in numpy (the ground truth)."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.w_patch = (rng.standard_normal((PATCH, D)) * 0.2).astype(np.float32)
        self.labels = (rng.standard_normal((CLASSES + 1, D)) * 0.5).astype(np.float32)
        self.w_t = rng.standard_normal((1, 1, D)).astype(np.float32)
        self.w_out = (rng.standard_normal((D, PATCH)) * 0.2).astype(np.float32)

    def hidden(self, x, y):
        b = x.shape[0]
        tok = x.reshape(b, C, H // P, P, H // P, P).transpose(0, 2, 4, 1, 3, 5).reshape(b, L, -1)
        return tok @ self.w_patch + self.labels[y][:, None, :]

    def refresh(self, hidden, t):
        z = t[:, None, None] * self.w_t + hidden
        return z / (1 + np.exp(-z))

    def decoder(self, x, cond):
        b = x.shape[0]
        out = (cond @ self.w_out).reshape(b, H // P, H // P, C, P, P)
        return out.transpose(0, 3, 1, 4, 2, 5).reshape(b, C, H, H) - 0.5 * x


class NumpyLinearBackend:
    def __init__(self, m: LinearModel) -> None:
        self.m, self.supports_refresh = m, True

    def dit(self, x, t, y):
        return self.m.refresh(self.m.hidden(x, y), t).astype(np.float32)

    def dit_hidden(self, x, t, y):
        return self.m.hidden(x, y).astype(np.float32)

    def refresh_condition(self, hidden, t):
        return self.m.refresh(hidden, t).astype(np.float32)

    def decoder(self, x, cond):
        return self.m.decoder(x, cond).astype(np.float32)

    from_numpy = staticmethod(np.array)
    to_numpy = staticmethod(np.asarray)

    def concat(self, arrays):
        return np.concatenate(arrays)


def _const(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def _silu(z, out):
    return [helper.make_node("Sigmoid", [z], [z + "_sig"]),
            helper.make_node("Mul", [z, z + "_sig"], [out])]


def _save(graph, path, inputs, outputs):
    model = helper.make_model(
        helper.make_graph(graph[0], path.stem, inputs, outputs, initializer=graph[1]),
        opset_imports=[helper.make_opsetid("", 18)], ir_version=9,
    )
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def build_bundle(root: Path, m: LinearModel, refresh: bool = True, names=("x_t", "t", "y")):
    root.mkdir(parents=True, exist_ok=True)
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    x_in, t_in, y_in = names
    dit_nodes = [
        helper.make_node("Reshape", [x_in, "s6"], ["x6"]),
        helper.make_node("Transpose", ["x6"], ["xt"], perm=[0, 2, 4, 1, 3, 5]),
        helper.make_node("Reshape", ["xt", "s3"], ["tok"]),
        helper.make_node("MatMul", ["tok", "w_patch"], ["emb"]),
        helper.make_node("Gather", ["labels", y_in], ["ey"], axis=0),
        helper.make_node("Unsqueeze", ["ey", "ax1"], ["ey3"]),
        helper.make_node("Add", ["emb", "ey3"], ["hidden"]),
        helper.make_node("Unsqueeze", [t_in, "ax12"], ["t3"]),
        helper.make_node("Mul", ["t3", "w_t"], ["et"]),
        helper.make_node("Add", ["et", "hidden"], ["z"]),
        *_silu("z", "cond"),
    ]
    consts = [
        _const("s6", np.int64([-1, C, H // P, P, H // P, P])),
        _const("s3", np.int64([-1, L, PATCH])),
        _const("w_patch", m.w_patch), _const("labels", m.labels), _const("ax1", np.int64([1])),
        _const("ax12", np.int64([1, 2])), _const("w_t", m.w_t),
    ]
    io = {
        "x_t": _vi(x_in, f, ["batch", C, H, H]), "t": _vi(t_in, f, ["batch"]),
        "y": _vi(y_in, i64, ["batch"]), "cond": _vi("cond", f, ["batch", L, D]),
        "hidden": _vi("hidden", f, ["batch", L, D]), "v": _vi("v", f, ["batch", C, H, H]),
    }
    _save((dit_nodes, consts), root / "dit.onnx", [io["x_t"], io["t"], io["y"]],
          [io["cond"], io["hidden"]])
    dec_nodes = [
        helper.make_node("MatMul", ["cond", "w_out"], ["pix"]),
        helper.make_node("Reshape", ["pix", "s6b"], ["p6"]),
        helper.make_node("Transpose", ["p6"], ["pt"], perm=[0, 3, 1, 4, 2, 5]),
        helper.make_node("Reshape", ["pt", "s4"], ["img"]),
        helper.make_node("Mul", ["x_t", "half"], ["xh"]),
        helper.make_node("Sub", ["img", "xh"], ["v"]),
    ]
    dec_consts = [
        _const("w_out", m.w_out), _const("s6b", np.int64([-1, H // P, H // P, C, P, P])),
        _const("s4", np.int64([-1, C, H, H])), _const("half", np.float32(0.5)),
    ]
    x_dec = _vi("x_t", f, ["batch", C, H, H])
    _save((dec_nodes, dec_consts), root / "decoder.onnx", [x_dec, io["cond"]], [io["v"]])
    spec = lambda v: {"name": v.name, "dtype": "float32" if v.type.tensor_type.elem_type == f  # noqa: E731
                      else "int64", "shape": [d.dim_param or d.dim_value
                                              for d in v.type.tensor_type.shape.dim]}
    manifest = Manifest(
        model={"hidden_size": D, "num_heads": 1, "dit_depth": 1, "decoder_hidden_size": 1,
               "decoder_depth": 1, "patch_size": P, "num_classes": CLASSES, "in_channels": C,
               "image_size": [H, H]},
        sampler_defaults={"solver": "euler", "steps": 8, "guidance": 2.0,
                          "guidance_interval": [0.1, 1.0], "shift": 1.0},
        source={"path": "linear", "sha256": "1" * 64}, package_version="test",
    )
    manifest.add_artifact(Artifact.from_file(
        root, "onnx", "dit", "fp32", "dit.onnx", inputs=[spec(io[k]) for k in ("x_t", "t", "y")],
        outputs=[spec(io["cond"]), spec(io["hidden"])], details={"opset": 18}))
    manifest.add_artifact(Artifact.from_file(
        root, "onnx", "decoder", "fp32", "decoder.onnx", inputs=[spec(x_dec), spec(io["cond"])],
        outputs=[spec(io["v"])], details={"opset": 18}))
    if refresh:
        nodes = [helper.make_node("Unsqueeze", ["t", "ax12"], ["t3"]),
                 helper.make_node("Mul", ["t3", "w_t"], ["et"]),
                 helper.make_node("Add", ["et", "hidden"], ["z"]), *_silu("z", "cond")]
        _save((nodes, [_const("ax12", np.int64([1, 2])), _const("w_t", m.w_t)]),
              root / "refresh.onnx", [io["hidden"], _vi("t", f, ["batch"])], [io["cond"]])
        manifest.add_artifact(Artifact.from_file(
            root, "onnx", "refresh", "fp32", "refresh.onnx",
            inputs=[spec(io["hidden"]), spec(io["t"])], outputs=[spec(io["cond"])]))
    write_manifest(root, manifest)
    return root


@pytest.fixture(scope="module")
def model():
    return LinearModel()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, model):
    return build_bundle(tmp_path_factory.mktemp("ort") / "bundle", model)


def _inputs(b=3, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, C, H, H)).astype(np.float32),
            rng.uniform(0, 1, b).astype(np.float32), rng.integers(0, CLASSES + 1, b))


def test_graphs_match_the_numpy_model(bundle, model):
    be = OnnxRuntimeBackend(bundle, intra_op_threads=1)
    assert isinstance(be, Backend) and be.supports_refresh
    x, t, y = _inputs()
    cond = be.dit(x, t, y)
    np.testing.assert_allclose(cond, model.refresh(model.hidden(x, y), t), atol=1e-5)
    np.testing.assert_allclose(be.decoder(x, cond), model.decoder(x, cond), atol=1e-5)
    hidden = be.dit_hidden(x, t, y)
    np.testing.assert_allclose(be.refresh_condition(hidden, t), cond, atol=1e-6)
    assert be.describe()["providers"]["dit"] == ["CPUExecutionProvider"]


def test_sleeping_pool_threads_give_the_same_graphs(bundle):
    x, t, y = _inputs()
    spinning = OnnxRuntimeBackend(bundle, intra_op_threads=2)
    sleeping = OnnxRuntimeBackend(bundle, intra_op_threads=2, allow_spinning=False)
    options = sleeping._sessions["dit"].get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    np.testing.assert_array_equal(sleeping.dit(x, t, y), spinning.dit(x, t, y))


def test_pipeline_samples_like_the_numpy_model(bundle, model):
    pipe = runtimes.load(bundle, intra_op_threads=1)
    kw = {"class_labels": [0, 4, 2], "seed": 5, "output_type": "np"}
    got = pipe.generate(**kw).images
    want = runtimes.DeCoPipeline(NumpyLinearBackend(model), pipe.model_config,
                                 pipe.sampler_defaults).generate(**kw).images
    np.testing.assert_allclose(got, want, atol=1e-4)
    shared = pipe.generate(**kw, sharing={"ratio": 0.5, "mode": "fresh_t"}).images
    assert shared.shape == got.shape and np.all(np.isfinite(shared))
    pipe.close()


def test_device_resident_arrays_give_the_same_samples(bundle):
    plain = OnnxRuntimeBackend(bundle, intra_op_threads=1)
    resident = OnnxRuntimeBackend(bundle, intra_op_threads=1, device_resident=True)
    x = _inputs(2)[0]
    a = resident.from_numpy(x)
    assert type(a).__name__ == "OrtArray" and a.shape == x.shape
    np.testing.assert_array_equal(resident.to_numpy((a * 2.0 - a)[1:] + 1.0), (x * 2 - x)[1:] + 1)
    both = resident.to_numpy(resident.concat([a, a]))
    np.testing.assert_array_equal(both, np.concatenate([x, x]))
    cfg = dict(class_labels=[1, 3], steps=6, guidance=2.5, output_type="np", seed=2)
    for solver in ("euler", "heun", "ab2"):
        outs = [runtimes.DeCoPipeline(be, runtimes.read_manifest(bundle).model).generate(
            **cfg, solver=solver, sharing=0.5).images for be in (plain, resident)]
        np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)


def test_fixed_graph_size_is_checked_before_running(bundle):
    pipe = runtimes.load(bundle)
    with pytest.raises(SizeError, match=r"16x16 is not a size this bundle serves: .* 8x8 only"):
        pipe.generate([0], height=16, width=16)
    with pytest.raises(SizeError, match=r"8x8 only"):
        pipe.generate([0], noise=np.zeros((1, C, 16, 16), np.float32))


def test_bundle_without_refresh_graph_refuses_fresh_t(tmp_path, model):
    root = build_bundle(tmp_path / "b", model, refresh=False)
    pipe = runtimes.load(root)
    assert not pipe.backend.supports_refresh
    with pytest.raises(ValueError, match="fresh_t"):
        pipe.generate([0], steps=4, sharing={"ratio": 0.5, "mode": "fresh_t"})


def test_missing_or_fallen_back_provider_fails_loudly(bundle, monkeypatch):
    with pytest.raises(BackendError, match="not in this onnxruntime build"):
        OnnxRuntimeBackend(bundle, providers=["cuda"])
    with pytest.raises(BackendError, match="unknown ONNX Runtime provider"):
        OnnxRuntimeBackend(bundle, providers=["gpu"])
    # A build that lists CUDA but cannot load it silently runs on the CPU: detect that.
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    with pytest.warns(UserWarning), pytest.raises(BackendError, match="fell back to"):
        OnnxRuntimeBackend(bundle, providers="cuda")


def test_tampered_bundle_is_refused_naming_the_file(tmp_path, model):
    root = build_bundle(tmp_path / "b", model)
    with open(root / "decoder.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match=r"decoder\.onnx: .*bytes"):
        runtimes.load(root)
    with pytest.raises(BundleError, match="no onnx dit graph at fp16"):
        runtimes.load(root, precision="fp16")


def test_graph_with_wrong_io_names_is_refused(tmp_path, model):
    root = build_bundle(tmp_path / "b", model, names=("image", "t", "y"))
    with pytest.raises(BackendError, match=r"expected inputs \['x_t', 't', 'y'\]"):
        runtimes.load(root)


def test_unknown_backend_lists_the_registered_ones(bundle):
    with pytest.raises(ValueError, match="registered backends are .*onnxruntime"):
        runtimes.load(bundle, backend="nope")


def test_helper_graphs_are_valid_onnx():
    for blob in (
        _one_node_model("Mul", [("a", "float32", 4), ("b", "float32", 0)], 4),
        _one_node_model("Concat", [("in0", "float32", 3), ("in1", "float32", 3)], 3,
                        int_attrs={"axis": 0}),
    ):
        onnx.checker.check_model(onnx.load_from_string(blob), full_check=True)


BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "deco_export", "onnx"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    import numpy as np
    import runtimes

    pipe = runtimes.load(sys.argv[1], intra_op_threads=1)
    out = pipe.generate(class_labels=[0, 4, 2], seed=5, output_type="np", sharing=0.5)
    np.save(sys.argv[2], out.images)
    pil = pipe.generate(class_labels=[1], steps=3).images[0]
    assert pil.size == (8, 8), pil.size
    bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "deco_export", "onnx"))
    assert not bad, bad
    """
)


def test_runtime_works_where_torch_cannot_be_imported(bundle, tmp_path):
    out = tmp_path / "x.npy"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", BLOCKER, str(bundle), str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = runtimes.load(bundle, intra_op_threads=1)
    want = pipe.generate(class_labels=[0, 4, 2], seed=5, output_type="np", sharing=0.5).images
    np.testing.assert_array_equal(np.load(out), want)
