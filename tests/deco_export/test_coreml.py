"""Core ML export (`deco export coreml`) and the Core ML backend.

Everywhere: conversion of the golden tiny model in both precisions, with and without weight
compression, saving, reloading with ``skip_model_load=True``, and the structure of what was
written (inputs, enumerated batch, dtypes, operation precision and fp32 islands, operation
counts, compression, metadata, manifest), plus the error paths. On macOS only: predictions
through the shared runtime sampler against PyTorch, and cold/warm load times.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from deco_export.export import coreml as cm
from deco_export.export.coreml.convert import discard_temp_packages
from runtimes import bundle as rb
from runtimes.backend import BackendError
from runtimes.backends.coreml import CoreMLBackend, split_batch
from runtimes.config import ModelConfig
from runtimes.graphs import get_graph, graphs_for

C2I_GRAPHS = tuple(graphs_for(ModelConfig()))  # the graphs of the class-conditional model

HAS_COREMLTOOLS = importlib.util.find_spec("coremltools") is not None
needs_coremltools = pytest.mark.skipif(
    not HAS_COREMLTOOLS, reason="coremltools is not installed (pip install 'deco-export[coreml]')"
)
macos_only = pytest.mark.skipif(
    sys.platform != "darwin",
    reason=f"Core ML predicts only on macOS; on {sys.platform} conversion and structure are "
           "tested instead",
)
not_macos = pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-macOS refusal")

SIZE = (64, 64)
EXTRA_BATCH = 4
BATCHES = [1, 2, EXTRA_BATCH]


def ops(report: dict, op: str, dtype: str) -> int:
    return report["op_counts"].get(op, {}).get(dtype, 0)


def compute_ops(report: dict, dtype: str) -> int:
    """Compute operations with a ``dtype`` output in a saved package (no const/cast/constexpr)."""
    return sum(n for op, by in report["op_counts"].items()
               if op not in ("const", "cast") and not op.startswith("constexpr_")
               for dt, n in by.items() if dt == dtype)


def large_weights(path: Path, threshold: int = cm.WEIGHT_THRESHOLD) -> int:
    """Float weight tensors (rank >= 2; biases stay as they are) of more than ``threshold``
    elements, stored uncompressed in a saved package."""
    import coremltools as ct
    from coremltools.proto import MIL_pb2

    spec = ct.utils.load_spec(str(path))
    count = 0
    for function in spec.mlProgram.functions.values():
        for op in function.block_specializations[function.opset].operations:
            if op.type != "const":
                continue
            ttype = op.attributes["val"].type.tensorType
            if MIL_pb2.DataType.Name(ttype.dataType) not in ("FLOAT16", "FLOAT32"):
                continue
            dims = [d.constant.size for d in ttype.dimensions]
            if len(dims) >= 2 and math.prod(dims) > threshold:
                count += 1
    return count


# ---------------------------------------------------------------------------------------------
# Fixtures: one CLI export (fp16 + fp32) and one compressed export, shared by the module
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export_tempdir(tmp_path_factory) -> Path:
    """The temp dir the export below runs with: empty before it, so whatever is left is its."""
    return tmp_path_factory.mktemp("export-tempdir")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, golden_ckpt, export_tempdir) -> Path:
    """`deco export coreml` of the golden checkpoint, fp16 and fp32, batches 1, 2 and 4."""
    pytest.importorskip("coremltools")
    from deco_export.cli import main

    out = tmp_path_factory.mktemp("coreml") / "bundle"
    started = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(export_tempdir))
        result = CliRunner().invoke(main, [
            "export", "coreml", str(golden_ckpt), str(out), "--precision", "fp16",
            "--precision", "fp32", "--batch-sizes", str(EXTRA_BATCH), "--image-size", "64x64",
            "--license", "test licence",
        ])
    assert result.exit_code == 0, result.output
    print(f"\nCLI export, tiny fp16 + fp32: {time.perf_counter() - started:.1f} s")
    return out


def test_an_export_leaves_the_temp_dir_as_it_found_it(exported, export_tempdir):
    """coremltools writes a tmp*.mlpackage per converted or compressed model and removes it
    only at exit; the exporter removes each once the package is saved."""
    assert sorted(p.name for p in export_tempdir.iterdir()) == []


@pytest.fixture(scope="module")
def manifest(exported) -> rb.Manifest:
    return rb.read_manifest(exported)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, golden_model) -> Path:
    """The golden model with 8-bit weights, fp16 and fp32 (the batch sizes of `exported`, so
    its conversions come from the conversion cache)."""
    pytest.importorskip("coremltools")
    out = tmp_path_factory.mktemp("coreml-int8") / "bundle"
    cm.export_coreml(golden_model, out, precisions=("fp16", "fp32"), compression="int8",
                     batch_sizes=(EXTRA_BATCH,))
    return out


def artifact(manifest: rb.Manifest, graph: str, precision: str) -> rb.Artifact:
    art = manifest.get_artifact("coreml", graph, precision)
    assert art is not None, f"no coreml {graph} {precision}"
    return art


# ---------------------------------------------------------------------------------------------
# Structure (any OS)
# ---------------------------------------------------------------------------------------------


def test_every_tensor_a_record_declares_has_a_description():
    """The package descriptions cover every input and output of the sampled graphs' records
    (a guidance-distilled DiT's ``guidance`` included), so a new tensor cannot fail an export."""
    from deco_export.export.coreml.export import TENSOR_DESCRIPTIONS
    from runtimes.graphs import GRAPH_SPECS

    names = {s.name for g in GRAPH_SPECS if g.sampled for s in (*g.inputs, *g.outputs)}
    assert names <= set(TENSOR_DESCRIPTIONS)


@needs_coremltools
def test_manifest_records_every_package(exported, manifest):
    names = {a.file for a in manifest.artifacts if a.runtime == "coreml"}
    assert names == {f"{g}{p}.mlpackage" for g in ("dit", "decoder", "refresh", "decoder_cond",
                                                   "decoder_pixel") for p in ("", ".fp16")}
    assert rb.verify(exported) == []
    for art in manifest.artifacts:
        path = exported / art.file
        assert path.is_dir() and art.file == cm.coreml_file_name(art.graph, art.precision)
        assert art.sha256 == rb.sha256_path(path) and art.bytes == rb.path_size(path)
        d = art.details
        assert d["format"] == "mlprogram" and d["deployment_target"] == "macOS14"
        assert d["compute_units"] == "ALL" and d["batch_sizes"] == BATCHES
        assert d["compression"] == {"method": "none"}
        assert d["weight_bytes"] > 0 and d["convert_seconds"] > 0
        assert art.tools["coremltools"] and art.tools["torch"]
        if sys.platform != "darwin":
            assert art.parity["status"] == "not run" and "macOS" in art.parity["reason"]
            assert art.parity["end_to_end"]["status"] == "not run"
    assert manifest.model.to_dict()["image_size"] == list(SIZE)


@needs_coremltools
def test_packages_reload_without_loading(exported, manifest):
    import coremltools as ct

    for art in manifest.artifacts:
        mlmodel = ct.models.MLModel(str(exported / art.file), skip_model_load=True)
        spec = mlmodel.get_spec()
        assert spec.WhichOneof("Type") == "mlProgram"
        assert [i.name for i in spec.description.input] == [s.name for s in art.inputs]
        assert [o.name for o in spec.description.output] == [s.name for s in art.outputs]


@needs_coremltools
def test_inputs_outputs_shapes_and_dtypes(exported, manifest, golden_model):
    cfg = golden_model.config
    tokens = cfg.num_tokens(*SIZE)
    image = [cfg.in_channels, *SIZE]
    expected = {
        "dit": ({"x_t": image, "t": [], "y": []}, {"cond": "float32", "hidden": "float32"}),
        "decoder": ({"x_t": image, "cond": [tokens, cfg.hidden_size]}, {"v": "float32"}),
        "refresh": ({"hidden": [tokens, cfg.hidden_size], "t": []}, {"cond": "float32"}),
        "decoder_cond": ({"cond": [tokens, cfg.hidden_size]}, {"modulation": "float32"}),
        "decoder_pixel": ({"x_t": image, "modulation": [
            tokens, cfg.patch_size ** 2, cfg.decoder_hidden_size]}, {"v": "float32"}),
    }
    for art in manifest.artifacts:
        report = cm.inspect_package(exported / art.file)
        rest, outputs = expected[art.graph]
        inputs = {i["name"]: i for i in report["inputs"]}
        assert list(inputs) == list(rest)
        primary = cm.PRIMARY_INPUT[art.graph]
        for name, tail in rest.items():
            feature = inputs[name]
            assert feature["dtype"] == ("int32" if name == "y" else "float32")
            assert feature["shape"] == [1, *tail]  # the default shape: batch 1
            assert feature["description"]
            if name == primary:  # before iOS 18 one input is enumerated, the others ranged
                assert feature["enumerated"] == [[b, *tail] for b in BATCHES]
                assert art.details["batch_shapes"][name] == "enumerated"
            else:
                assert feature["range"][0] == [1, EXTRA_BATCH]
                assert art.details["batch_shapes"][name] == "range"
        assert {o["name"]: o["dtype"] for o in report["outputs"]} == outputs
        # the manifest describes Core ML's real I/O: int32 labels, a dynamic batch
        y = art.input("y")
        assert y is None or y.dtype == "int32"
        assert all(s.shape[0] == "batch" for s in [*art.inputs, *art.outputs])


@needs_coremltools
def test_fp16_runs_in_fp16_except_the_islands(exported, manifest, golden_model):
    depth, dec_depth = golden_model.config.dit_depth, golden_model.config.decoder_depth
    dit = cm.inspect_package(exported / "dit.fp16.mlpackage")
    decoder = cm.inspect_package(exported / "decoder.fp16.mlpackage")
    refresh = cm.inspect_package(exported / "refresh.fp16.mlpackage")
    # the heavy work is fp16: every linear layer, the attention matmuls and softmax
    for report in (dit, decoder, refresh):
        assert ops(report, "linear", "float32") == 0 and ops(report, "linear", "float16") > 0
    assert ops(dit, "matmul", "float16") == 2 * depth and ops(dit, "softmax", "float16") == depth
    # the islands: 4 RMSNorms per block (norm1, norm2, q_norm, k_norm) ...
    for op in ("pow", "reduce_mean", "rsqrt"):
        assert ops(dit, op, "float32") == 4 * depth and ops(dit, op, "float16") == 0
    # ... RoPE on q and k (one stack each), the timestep features, the decoder's LayerNorms
    assert ops(dit, "stack", "float32") == 2 * depth
    for report in (dit, refresh):
        assert ops(report, "sin", "float32") == 1 and ops(report, "cos", "float32") == 1
    assert ops(decoder, "layer_norm", "float32") == dec_depth + 1
    assert ops(decoder, "layer_norm", "float16") == 0
    # no fp32 fallback beyond the islands: the saved fp32 ops are exactly the islands' ops
    for graph, report in (("dit", dit), ("decoder", decoder), ("refresh", refresh)):
        details = artifact(manifest, graph, "fp16").details
        assert compute_ops(report, "float32") == sum(details["fp32_islands"].values())
        assert compute_ops(report, "float32") == details["compute_ops"]["fp32"]
        assert compute_ops(report, "float16") == details["compute_ops"]["fp16"]
    islands = artifact(manifest, "dit", "fp16").details["fp32_islands"]
    assert islands["rmsnorm"] > 0 and islands["rope"] > 0 and islands["timestep"] > 0
    assert artifact(manifest, "decoder", "fp16").details["fp32_islands"]["layernorm"] > 0


@needs_coremltools
def test_fp32_packages_have_no_fp16(exported):
    for graph in C2I_GRAPHS:
        report = cm.inspect_package(exported / cm.coreml_file_name(graph, "fp32"))
        assert compute_ops(report, "float16") == 0
        assert not any("float16" in by for by in report["op_counts"].values())


@needs_coremltools
def test_operation_counts_follow_the_model(exported, manifest, golden_model):
    depth, dec_depth = golden_model.config.dit_depth, golden_model.config.decoder_depth
    # DiT: patch embed + 2 timestep MLP + 6 per block (qkv, proj, w1, w2, w3, adaLN)
    # decoder: cond_embed, pixel embed, input_proj, 3 per block, final; refresh: timestep MLP;
    # the split decoder: cond_embed, then the rest
    linears = {"dit": 3 + 6 * depth, "decoder": 3 + 3 * dec_depth + 1, "refresh": 2,
               "decoder_cond": 1, "decoder_pixel": 2 + 3 * dec_depth + 1}
    for art in manifest.artifacts:
        report = cm.inspect_package(exported / art.file)
        assert report["op_counts"] == art.details["op_counts"]  # the manifest tells the truth
        dtype = "float16" if art.precision == "fp16" else "float32"
        assert ops(report, "linear", dtype) == linears[art.graph]
        assert report["constexpr_ops"] == {}


@needs_coremltools
def test_metadata(exported, manifest, golden_model):
    for art in manifest.artifacts:
        meta = cm.inspect_package(exported / art.file)["metadata"]
        assert meta["license"] == "test licence"
        assert meta["author"].startswith("deco-export") and meta["version"]
        assert meta["short_description"] == get_graph(art.graph, manifest.model).description
        user = meta["user"]
        assert json.loads(user["deco.config"]) == manifest.model.to_dict()
        assert user["deco.graph"] == art.graph and user["deco.precision"] == art.precision
        assert user["deco.batch_sizes"] == "1,2,4" and user["deco.image_size"] == "64x64"
        assert user["deco.compute_units"] == "ALL" and user["deco.compression"] == "none"
        assert user["deco.source_sha256"] == manifest.source["sha256"]


@needs_coremltools
def test_fp32_islands_effect(golden_model, manifest):
    """What the op selector changes: no islands -> every compute op fp16; one island -> only
    its own operations fp32; all islands (the default export) -> the sum of them."""
    modules = cm.graph_modules(golden_model, "fp32")
    inputs = cm.example_inputs(golden_model, "dit", 2, *SIZE)
    converted, none = cm.convert_graph(modules["dit"], "dit", inputs, islands=())
    discard_temp_packages(converted)
    converted, rms = cm.convert_graph(modules["dit"], "dit", inputs, islands=("rmsnorm",))
    discard_temp_packages(converted)
    full = artifact(manifest, "dit", "fp16").details
    assert none.unexpected_fp32 == [] and rms.unexpected_fp32 == []
    assert none.compute_ops.get("fp32", 0) == 0
    assert rms.compute_ops["fp32"] == rms.islands["rmsnorm"] == full["fp32_islands"]["rmsnorm"]
    assert full["compute_ops"]["fp32"] == sum(full["fp32_islands"].values())
    total = sum(full["compute_ops"].values())  # same graph; only the precision moved
    assert sum(none.compute_ops.values()) == sum(rms.compute_ops.values()) == total
    print(f"\ndit compute ops: no islands {none.compute_ops}, rmsnorm only {rms.compute_ops}, "
          f"all {full['compute_ops']} {full['fp32_islands']}")


@needs_coremltools
def test_int8_weights_are_applied(compressed, exported):
    manifest = rb.read_manifest(compressed)
    for art in manifest.artifacts:
        plain = exported / art.file
        report = cm.inspect_package(compressed / art.file)
        record = art.details["compression"]
        assert record["method"] == "linear_quantize_weights" and record["nbits"] == 8
        # every large learned weight became a constexpr; only geometry constants are left
        # (the decoder's folded DCT position term)
        left = large_weights(compressed / art.file)
        assert left == (1 if art.graph in ("decoder", "decoder_pixel") else 0)
        assert report["constexpr_ops"] == {
            "constexpr_affine_dequantize": large_weights(plain) - left}
        assert record["compressed_tensors"] == large_weights(plain) - left > 0
        assert art.details["constexpr_ops"] == report["constexpr_ops"]
        assert report["metadata"]["user"]["deco.compression"] == "int8"
        assert report["weight_bytes"] < cm.inspect_package(plain)["weight_bytes"]
        # compression touches weights only: the same compute ops in the same precision
        assert report["op_counts"].keys() - {"constexpr_affine_dequantize"} == \
            cm.inspect_package(plain)["op_counts"].keys()
        for dtype in ("float16", "float32"):
            assert compute_ops(report, dtype) == compute_ops(cm.inspect_package(plain), dtype)
    dit32 = cm.inspect_package(compressed / "dit.mlpackage")["weight_bytes"]
    assert dit32 < 0.35 * cm.inspect_package(exported / "dit.mlpackage")["weight_bytes"]


@needs_coremltools
@pytest.mark.parametrize("compression,target,granularity,max_ratio", [
    ("palette6", "macOS14", "per_tensor", 0.55),
    ("palette4", "macOS15", "per_grouped_channel", 0.45),
])
def test_palettes_are_applied(golden_model, tmp_path, compression, target, granularity,
                              max_ratio):
    modules = cm.graph_modules(golden_model, "fp32")
    inputs = cm.example_inputs(golden_model, "dit", 2, *SIZE)
    mlmodel, _ = cm.convert_graph(modules["dit"], "dit", inputs, target=target,
                                  batch_sizes=BATCHES)
    mlmodel.save(str(tmp_path / "plain.mlpackage"))
    discard_temp_packages(mlmodel)
    record = cm.compress_package(tmp_path / "plain.mlpackage", tmp_path / "packed.mlpackage",
                                 compression)  # the target comes from the metadata
    plain = cm.inspect_package(tmp_path / "plain.mlpackage")
    report = cm.inspect_package(tmp_path / "packed.mlpackage")
    n = large_weights(tmp_path / "plain.mlpackage")
    assert report["constexpr_ops"] == {"constexpr_lut_to_dense": n}
    assert large_weights(tmp_path / "packed.mlpackage") == 0
    assert record["granularity"] == granularity and record["nbits"] == int(compression[-1])
    assert record["compressed_tensors"] == n
    if granularity == "per_grouped_channel":  # SwiGLU width 170 is not a multiple of 16
        assert record["smaller_groups"] == 2 * golden_model.config.dit_depth
    assert report["weight_bytes"] < max_ratio * plain["weight_bytes"]
    assert report["metadata"]["user"]["deco.compression"] == compression


def test_kmeans_lut():
    rng = np.random.default_rng(0)
    for dtype, n in [(np.float16, 6000), (np.float32, 6000), (np.float32, 300_000)]:
        w = (rng.standard_normal(n) * 0.02).astype(dtype).reshape(-1, 100)
        ref = w.astype(np.float64)
        for nbits in (6, 4):
            lut, idx = cm.kmeans_lut(w, nbits)
            assert lut.dtype == w.dtype and lut.shape == (1 << nbits,)
            assert idx.dtype == np.uint8 and idx.shape == (w.size,) and idx.max() < 1 << nbits
            assert np.all(np.diff(lut.astype(np.float64)) >= 0)
            err = np.mean((lut[idx].astype(np.float64) - ref.reshape(-1)) ** 2)
            lo, hi = ref.min(), ref.max()
            step = (hi - lo) / ((1 << nbits) - 1)
            uniform = np.mean((lo + np.round((ref - lo) / step) * step - ref) ** 2)
            assert err <= uniform * 1.0001
    few = np.array([[0.5, -0.25], [0.5, 0.125]], dtype=np.float16)
    lut, idx = cm.kmeans_lut(few, 4)
    assert np.array_equal(lut[idx].reshape(few.shape), few)  # few values are kept exactly


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


class Rank6(nn.Module):
    def forward(self, x):
        b, n, d = x.shape
        return x.reshape(b, 1, 1, 1, n, d).sum(dim=(1, 2, 3))


class Lgamma(nn.Module):
    def forward(self, x):
        return torch.lgamma(x.abs() + 1.0)


class ToyRefresh(nn.Module):
    """(hidden, t) -> cond with one bad layer in ``blocks.1``."""

    def __init__(self, bad: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Identity(), bad])

    def forward(self, hidden, t):
        for block in self.blocks:
            hidden = block(hidden)
        return hidden + t[:, None, None]


class HugeConstant(nn.Module):
    def forward(self, hidden, t):
        return hidden * 100000.0 + t[:, None, None]


def toy_inputs():
    return torch.randn(2, 16, 8), torch.rand(2)


@needs_coremltools
def test_rank_above_5_names_the_layer():
    with pytest.raises(cm.CoreMLExportError, match=r"layer blocks\.1 makes a rank-6 tensor"):
        cm.convert_graph(ToyRefresh(Rank6()), "refresh", toy_inputs())


@needs_coremltools
def test_unsupported_op_names_the_layer():
    with pytest.raises(cm.CoreMLExportError,
                       match=r"refresh graph failed.*aten::lgamma in layer blocks\.1"):
        cm.convert_graph(ToyRefresh(Lgamma()), "refresh", toy_inputs())


@needs_coremltools
def test_unexpected_fp32_fallback_is_refused():
    # coremltools keeps an op in fp32 when a constant exceeds the fp16 range
    with pytest.raises(cm.CoreMLExportError, match=r"stayed fp32 outside the chosen islands"):
        cm.convert_graph(HugeConstant(), "refresh", toy_inputs())
    converted, report = cm.convert_graph(HugeConstant(), "refresh", toy_inputs(),
                                         precision="fp32")
    discard_temp_packages(converted)
    assert report.compute_ops.get("fp16", 0) == 0


@needs_coremltools
def test_a_conversion_made_before_comes_from_the_cache(tmp_path, monkeypatch):
    """The same graph on the same settings again is the kept package (a temporary copy, as a
    conversion makes one) and report; another setting converts again, and so does a damaged
    entry, which is replaced."""
    import coremltools as ct

    from deco_export.export.coreml import convert

    monkeypatch.setenv("DECO_CACHE_DIR", str(tmp_path / "cache"))
    entries = tmp_path / "cache" / convert.CACHE_KIND
    conversions: list[str] = []
    real = convert._convert

    def counted(ct, module, graph, *args, **kwargs):
        conversions.append(kwargs["precision"])
        return real(ct, module, graph, *args, **kwargs)

    monkeypatch.setattr(convert, "_convert", counted)
    torch.manual_seed(0)
    module = ToyRefresh(nn.Linear(8, 8)).eval()
    saved = []
    for precision in ("fp32", "fp32", "fp16"):
        mlmodel, report = cm.convert_graph(module, "refresh", toy_inputs(),
                                           precision=precision)
        assert mlmodel.is_temp_package
        saved.append(tmp_path / f"{len(saved)}.mlpackage")
        mlmodel.save(str(saved[-1]))
        discard_temp_packages(mlmodel)
        assert not Path(mlmodel.package_path).exists()
        if len(saved) == 1:
            first_report = report
    assert conversions == ["fp32", "fp16"]
    assert report != first_report and len(list(entries.iterdir())) == 2
    # the same program and weights (the spec is compared parsed: a save orders its metadata
    # map as it likes)
    specs = [ct.utils.load_spec(str(p)) for p in saved]
    weights = [sorted((f.relative_to(p), f.read_bytes()) for f in p.rglob("weights/*"))
               for p in saved]
    assert specs[0] == specs[1] != specs[2] and weights[0] == weights[1] != weights[2]
    for entry in entries.iterdir():
        (entry / "report.json").write_text("{")
    _, report = cm.convert_graph(module, "refresh", toy_inputs(), precision="fp32")
    discard_temp_packages(_)
    assert conversions == ["fp32", "fp16", "fp32"] and report == first_report
    _, report = cm.convert_graph(module, "refresh", toy_inputs(), precision="fp32")
    discard_temp_packages(_)
    assert conversions == ["fp32", "fp16", "fp32"]  # the replaced entry


@needs_coremltools
@pytest.mark.parametrize("option,value,message", [
    ("compression", "int3", "unknown compression"),
    ("target", "iOS12", "unknown deployment target"),
    ("compute_units", "GPU", "unknown compute units"),
    ("batch_sizes", (0,), "batch sizes must be positive"),
    ("image_size", (60, 64), "not a multiple of the patch size"),
    ("precisions", ("bf16",), "precision must be one of"),
    ("fp32_islands", "softmax", "unknown fp32 island"),
])
def test_bad_options_are_refused_before_converting(golden_model, tmp_path, option, value,
                                                   message):
    with pytest.raises(cm.CoreMLExportError, match=message):
        cm.export_coreml(golden_model, tmp_path / "b", **{option: value})
    assert not (tmp_path / "b").exists()


def test_missing_coremltools_names_the_install_command(monkeypatch, golden_ckpt, tmp_path):
    from deco_export.cli import main
    from runtimes.backends import coreml as backend_module

    monkeypatch.setitem(sys.modules, "coremltools", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'deco-export\[coreml\]'"):
        cm.import_coremltools()
    with pytest.raises(BackendError, match=r"pip install 'deco-export\[coreml\]'"):
        backend_module._import_coremltools()
    result = CliRunner().invoke(main, ["export", "coreml", str(golden_ckpt), str(tmp_path / "b")])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'deco-export[coreml]'" in lines[0]
    assert not (tmp_path / "b").exists()


def onnx_only_bundle(path: Path, model) -> Path:
    """A bundle holding one (stand-in) ONNX artefact and no Core ML one."""
    from runtimes.sampler import release_sampler

    path.mkdir()
    (path / "dit.onnx").write_bytes(b"stand-in")
    model_dict = model.config.to_dict() | {"image_size": list(SIZE)}
    manifest = rb.Manifest(model=model_dict, sampler_defaults=release_sampler(
        model.config.family), source={}, package_version="test")
    manifest.add_artifact(rb.Artifact.from_file(path, "onnx", "dit", "fp32", "dit.onnx"))
    rb.write_manifest(path, manifest)
    return path


@needs_coremltools
def test_backend_refuses_a_bundle_without_coreml_and_export_adds_it(golden_model, tmp_path):
    import runtimes

    bundle = onnx_only_bundle(tmp_path / "bundle", golden_model)
    for attempt in (lambda: CoreMLBackend(bundle),
                    lambda: runtimes.load(bundle, backend="coreml", precision="fp16")):
        with pytest.raises(BackendError, match=r"has no Core ML artefacts \(it holds: onnx\)"):
            attempt()
    # one bundle, several runtimes: the Core ML export joins the ONNX artefact
    cm.export_coreml(golden_model, bundle, precisions=("fp16",), batch_sizes=(EXTRA_BATCH,))
    manifest = rb.read_manifest(bundle)
    assert sorted({a.runtime for a in manifest.artifacts}) == ["coreml", "onnx"]
    assert manifest.get_artifact("onnx", "dit", "fp32").sha256 == rb.sha256_path(
        bundle / "dit.onnx")
    assert rb.verify(bundle) == []
    with pytest.raises(BackendError, match="no Core ML dit and decoder at fp32"):
        CoreMLBackend(bundle, precision="fp32")


@needs_coremltools
@not_macos
def test_backend_refuses_to_predict_off_macos(exported):
    with pytest.raises(BackendError, match=r"needs macOS.*--backend onnxruntime"):
        CoreMLBackend(exported, precision="fp16")


def test_split_batch():
    assert split_batch(1, (1, 2)) == [1]
    assert split_batch(6, (1, 2)) == [2, 2, 2]
    assert split_batch(7, (1, 2, 4)) == [4, 2, 1]
    assert split_batch(6, (1, 3, 4)) == [3, 3]  # fewest calls, not greedy
    with pytest.raises(BackendError, match="cannot be split"):
        split_batch(3, (2, 4))


@needs_coremltools
def test_bundle_as_source(exported, manifest, golden_model, tmp_path):
    model, source, size = cm.load_source(str(exported))
    assert model.config.to_dict() | {"image_size": None} == \
        golden_model.config.to_dict() | {"image_size": None}
    assert size == SIZE and source["sha256"] == manifest.source["sha256"]
    moved = tmp_path / "moved"
    moved.mkdir()
    data = json.loads((exported / "manifest.json").read_text())
    data["source"]["sha256"] = "0" * 64
    (moved / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(cm.CoreMLExportError, match="not the one .* was exported from"):
        cm.load_source(str(moved))
    data["source"] = {}
    (moved / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(cm.CoreMLExportError, match="pass --checkpoint"):
        cm.load_source(str(moved))


# ---------------------------------------------------------------------------------------------
# Reference size (slow): DeCo-L/16 at 256x256, random weights
# ---------------------------------------------------------------------------------------------


def check_export_and_compress(bundle: Path, model, work: Path, size: tuple[int, int]
                              ) -> dict[str, float]:
    """Structure of an fp16 + fp32 export of ``model``, then every package compressed from
    disk (6-bit palettes for fp16, 8-bit weights for fp32); returns the timings."""
    cfg = model.config
    timings: dict[str, float] = {}
    manifest = rb.read_manifest(bundle)
    assert rb.verify(bundle) == []
    dit16 = artifact(manifest, "dit", "fp16").details
    assert dit16["fp32_islands"]["rmsnorm"] > 0 and dit16["fp32_islands"]["rope"] > 0
    assert dit16["compute_ops"]["fp32"] == sum(dit16["fp32_islands"].values())
    report = cm.inspect_package(bundle / "dit.fp16.mlpackage")
    assert ops(report, "linear", "float16") == 3 + 6 * cfg.dit_depth
    assert ops(report, "rsqrt", "float32") == 4 * cfg.dit_depth
    assert report["inputs"][0]["enumerated"] == [[b, cfg.in_channels, *size] for b in (1, 2)]
    params = sum(p.numel() for p in model.dit.parameters())
    assert 1.9 * params < dit16["weight_bytes"] < 2.1 * params  # fp16 weights
    dit32 = artifact(manifest, "dit", "fp32").details
    assert 3.9 * params < dit32["weight_bytes"] < 4.1 * params
    # learned weights above the threshold: 6 per block, patch embedding, timestep MLP, labels
    large = [p.numel() for p in model.dit.parameters()
             if p.ndim == 2 and p.numel() > cm.WEIGHT_THRESHOLD]
    weights = len(large)
    sizes = {}
    for precision, compression, kind, nbits in [("fp16", "palette6", "lut_to_dense", 6),
                                                ("fp32", "int8", "affine_dequantize", 8)]:
        for graph in C2I_GRAPHS:
            name = cm.coreml_file_name(graph, precision)
            packed = work / f"{compression}.{name}"
            started = time.perf_counter()
            record = cm.compress_package(bundle / name, packed, compression)
            timings[f"{compression} {name}"] = round(time.perf_counter() - started, 1)
            packed_report = cm.inspect_package(packed)
            plain_bytes = artifact(manifest, graph, precision).details["weight_bytes"]
            sizes[packed.name] = round(packed_report["weight_bytes"] / 1e6, 1)
            sizes[name] = round(plain_bytes / 1e6, 1)
            if graph == "dit":
                assert record["compressed_tensors"] == weights
                assert packed_report["constexpr_ops"] == {f"constexpr_{kind}": weights}
                # the large weights shrink to nbits per element (plus LUTs / scales)
                element = 2 if precision == "fp16" else 4
                expected = plain_bytes - sum(large) * (element - nbits / 8)
                assert packed_report["weight_bytes"] < 1.01 * expected + 8192 * weights
            shutil.rmtree(packed)
    print(f"\nweights MB: {sizes}")
    return timings


@needs_coremltools
@pytest.mark.slow
def test_reference_size_preset_converts(tmp_path):
    """DeCo-L/16's shapes at 256x256 (1024 wide, 16 heads, 256 tokens, 1000 classes, the
    pixel decoder at full resolution): the full export in fp16 and fp32, then both compressed
    from the saved packages, so the DiT is converted twice, not four times. It keeps 1 of
    the preset's 22 blocks: every block converts and compresses as the first does (the same
    ops on the same shapes), so the other 21 would only multiply the conversion time."""
    from deco_export import DeCo, get_preset

    torch.manual_seed(0)
    model = DeCo(dataclasses.replace(get_preset("DeCo-L/16"), dit_depth=1)).eval()
    started = time.perf_counter()
    cm.export_coreml(model, tmp_path / "bundle", precisions=("fp16", "fp32"))
    timings = {"export fp16+fp32": round(time.perf_counter() - started, 1)}
    timings |= check_export_and_compress(tmp_path / "bundle", model, tmp_path, (256, 256))
    print(f"DeCo-L/16 256x256 seconds: {timings}")


@needs_coremltools
def test_shipped_default_converts(tmp_path):
    """`deco export coreml default`: the embedded model, both precisions, compressed too."""
    from deco_export.cli import main
    from deco_export.sources import DEFAULT_DIR, load_model

    if not (DEFAULT_DIR / "config.json").is_file():
        pytest.skip(f"no embedded default model in this checkout ({DEFAULT_DIR})")
    model, _ = load_model("default")
    started = time.perf_counter()
    result = CliRunner().invoke(main, ["export", "coreml", "default", str(tmp_path / "bundle"),
                                       "--precision", "fp16", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    timings = {"export fp16+fp32": round(time.perf_counter() - started, 1)}
    size = tuple(rb.read_manifest(tmp_path / "bundle").model.to_dict()["image_size"])
    timings |= check_export_and_compress(tmp_path / "bundle", model, tmp_path, size)
    print(f"default model seconds: {timings}")


# ---------------------------------------------------------------------------------------------
# macOS: predictions through the shared sampler, gates, load times
# ---------------------------------------------------------------------------------------------


@needs_coremltools
@macos_only
def test_macos_export_is_gated_on_parity(golden_model, tmp_path):
    from deco_export.parity import END_TO_END_MIN_PSNR

    cm.export_coreml(golden_model, tmp_path / "b", precisions=("fp16", "fp32"))
    manifest = rb.read_manifest(tmp_path / "b")
    for art in manifest.artifacts:
        assert art.parity["graphs"] and art.parity["end_to_end"]["status"] == "passed"
        psnr_db = art.parity["end_to_end"]["psnr_db"]
        assert psnr_db is None or psnr_db >= END_TO_END_MIN_PSNR[art.precision]


@needs_coremltools
@macos_only
@pytest.mark.parametrize("precision,compute_units,min_db", [
    ("fp16", "ALL", 35.0), ("fp32", "CPU_ONLY", 60.0)])
def test_macos_sampler_parity(exported, golden_model, precision, compute_units, min_db):
    import runtimes
    from deco_export.export.bundle_io import end_to_end_figures

    pipe = runtimes.load(exported, backend="coreml", precision=precision,
                         compute_units=compute_units)
    figures = end_to_end_figures(golden_model, pipe, SIZE, steps=10, seed=0)
    print(f"\nCore ML {precision} {compute_units}: {figures['psnr_db']:.1f} dB end to end")
    assert figures["psnr_db"] >= min_db


@needs_coremltools
@macos_only
def test_macos_batches_split_into_enumerated_sizes(exported, golden_model):
    backend = CoreMLBackend(exported, precision="fp32", compute_units="CPU_ONLY")
    x, cond = cm.example_inputs(golden_model, "decoder", 7, *SIZE)
    whole = backend.decoder(x.numpy(), cond.numpy())  # 7 = 4 + 2 + 1
    single = np.concatenate([backend.decoder(x[i:i + 1].numpy(), cond[i:i + 1].numpy())
                             for i in range(7)])
    np.testing.assert_allclose(whole, single, atol=1e-5)
    reference = golden_model.decoder(x, cond).detach().numpy()
    np.testing.assert_allclose(whole, reference, atol=1e-4)
    y = np.array([golden_model.config.null_class, 1, 2], dtype=np.int64)  # int64 -> int32
    x3, t3 = x[:3].numpy(), np.full(3, 0.5, dtype=np.float32)
    np.testing.assert_allclose(
        backend.dit(x3, t3, y),
        golden_model.dit(x[:3], torch.from_numpy(t3), torch.from_numpy(y))[0].detach().numpy(),
        atol=1e-4)
    backend.close()


@needs_coremltools
@macos_only
def test_macos_cold_and_warm_load_times(exported, tmp_path):
    from runtimes.backends.coreml import measure_load_times

    times = measure_load_times(exported, precision="fp16", cache_dir=tmp_path / "cache")
    assert set(times["cold"]) == set(times["warm"]) == {"dit", "decoder", "refresh"}
    assert all(t["kind"] == "cold" for t in times["cold"].values())
    assert all(t["kind"] == "warm" for t in times["warm"].values())
    print(f"\nCore ML load seconds: {json.dumps(times)}")
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


@pytest.fixture(scope="module")
def multi_size(tmp_path_factory, golden_model) -> Path:
    """fp32 packages that enumerate a second, non-square size beside the default 64x64."""
    pytest.importorskip("coremltools")
    out = tmp_path_factory.mktemp("coreml-sizes") / "bundle"
    cm.export_coreml(golden_model, out, precisions=("fp32",), image_size=SIZE,
                     image_sizes=[(32, 96)])
    return out


@needs_coremltools
def test_enumerated_sizes_are_declared_and_recorded(multi_size, golden_model):
    cfg = golden_model.config
    manifest = rb.read_manifest(multi_size)
    served = manifest.size_range("coreml")
    assert served.enumerated == ((64, 64), (32, 96)) and served.default == SIZE
    with pytest.raises(ValueError, match="one of 64x64, 32x96"):
        served.check(32, 64)
    tokens = [cfg.num_tokens(*SIZE), cfg.num_tokens(32, 96)]
    for art in (a for a in manifest.artifacts if a.runtime == "coreml"):
        report = cm.inspect_package(multi_size / art.file)
        inputs = {i["name"]: i for i in report["inputs"]}
        if "x_t" in inputs:
            assert art.input("x_t").shape == ["batch", 3, "height", "width"]
            assert {tuple(s[2:]) for s in inputs["x_t"]["enumerated"]} == {(32, 96), (64, 64)}
        if art.graph == "refresh":  # its primary input carries the token count
            assert {s[1] for s in inputs["hidden"]["enumerated"]} == set(tokens)
        if art.graph == "decoder":  # the condition follows x_t within the token range
            assert inputs["cond"]["range"][1] == [min(tokens), max(tokens)]
        assert "32x96" in report["metadata"]["user"]["deco.image_sizes"]
    # the DiT computes its RoPE tables from x_t's shape, not from constants of one size
    dit = cm.inspect_package(multi_size / "dit.mlpackage")
    assert "shape" in dit["op_counts"]


@needs_coremltools
def test_enumerated_sizes_must_be_multiples_of_the_patch(golden_model, tmp_path):
    with pytest.raises(cm.CoreMLExportError, match="multiple of the patch size 16"):
        cm.export_coreml(golden_model, tmp_path / "b", image_sizes=[(40, 64)])
    assert not (tmp_path / "b").exists()


@needs_coremltools
@macos_only
def test_macos_enumerated_sizes_sample_as_pytorch(multi_size, golden_model):
    """Both listed sizes predict, and match PyTorch at that size; the export gated both."""
    import runtimes
    from deco_export.export.bundle_io import end_to_end_figures

    manifest = rb.read_manifest(multi_size)
    runs = {(r["height"], r["width"]) for r in
            manifest.find_artifact("coreml", "dit", "fp32").parity["end_to_end_sizes"]}
    assert runs == {(64, 64), (32, 96)}
    for size in ((64, 64), (32, 96)):
        pipe = runtimes.load(multi_size, backend="coreml", precision="fp32",
                             compute_units="CPU_ONLY")
        assert end_to_end_figures(golden_model, pipe, size, steps=4, seed=0)["psnr_db"] >= 60
