"""The traced-graph cache: the same trace comes back byte for byte, anything it depends on
changes the key, and the cache keeps to its bounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from deco_export.export import trace_cache
from deco_export.export.trace_cache import cached, export_key, export_onnx_file, trace_key


class Scale(torch.nn.Module):
    def __init__(self, factor: float = 2.0):
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.factor


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DECO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / trace_cache.CACHE_KIND


def export(module: torch.nn.Module, path) -> None:
    batch = torch.export.Dim("batch", min=1, max=64)
    export_onnx_file(module, (torch.ones(2, 4),), path, opset=18, input_names=["x"],
                     output_names=["y"], dynamic_shapes=({0: batch},), external_data=False)


def test_a_second_export_of_the_same_module_is_the_first_ones_file(tmp_path, cache):
    torch.manual_seed(0)
    module = Scale().eval()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    export(module, tmp_path / "a" / "g.onnx")
    entries = list(cache.iterdir())
    assert len(entries) == 1
    export(module, tmp_path / "b" / "g.onnx")
    assert list(cache.iterdir()) == entries
    assert (tmp_path / "a" / "g.onnx").read_bytes() == (tmp_path / "b" / "g.onnx").read_bytes()
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "b" / "g.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, module(torch.from_numpy(x)).detach().numpy(), atol=1e-6)


def test_the_key_follows_weights_attributes_input_shapes_and_settings():
    torch.manual_seed(0)
    module = Scale().eval()
    x = (torch.ones(2, 4),)
    settings = {"opset": 18, "external_data": False}
    base = trace_key(module, x, "g.onnx", **settings)
    assert trace_key(module, x, "g.onnx", **settings) == base
    other_attribute = Scale(3.0).eval()
    other_attribute.load_state_dict(module.state_dict())
    assert trace_key(other_attribute, x, "g.onnx", **settings) != base
    with torch.no_grad():
        module.proj.bias[0] += 1e-6
    changed = trace_key(module, x, "g.onnx", **settings)
    assert changed != base
    assert trace_key(module, (torch.ones(3, 4),), "g.onnx", **settings) != changed
    assert trace_key(module, (torch.ones(2, 4, dtype=torch.float64),), "g.onnx",
                     **settings) != changed
    # example values never reach the tracer (fake tensors): other values, the same trace
    assert trace_key(module, (torch.randn(2, 4),), "g.onnx", **settings) == changed
    assert trace_key(module, x, "h.onnx", **settings) != changed
    assert trace_key(module, x, "g.onnx", opset=23, external_data=False) != changed
    # a graph with external data names its data file: its name is part of the key
    named = {external: {export_key(module, x, Path(name), external_data=external, opset=18)
                        for name in ("g.onnx", "g.int8.onnx")} for external in (False, True)}
    assert len(named[False]) == 1 and len(named[True]) == 2


def test_a_self_contained_graph_is_reused_under_another_name(tmp_path, cache):
    """The int8 export quantizes the fp32 graph: its trace, saved as dit.int8.onnx, is the
    one dit.onnx was made from."""
    torch.manual_seed(0)
    module = Scale().eval()
    export(module, tmp_path / "g.onnx")
    export(module, tmp_path / "g.int8.onnx")
    assert len(list(cache.iterdir())) == 1
    assert (tmp_path / "g.onnx").read_bytes() == (tmp_path / "g.int8.onnx").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "g.int8.onnx", "g.onnx"]


def test_an_entry_is_made_once_and_copied_with_its_companion_files(tmp_path, cache):
    made = []

    def make(path):
        def run():
            made.append(path)
            path.write_bytes(b"graph")
            (path.parent / (path.name + ".data")).write_bytes(b"weights")
        return run

    for name in ("one", "two"):
        out = tmp_path / name / "g.onnx"
        out.parent.mkdir()
        came_from_cache = cached("k" * 64, out, make(out))
        assert came_from_cache == (name == "two")
        assert out.read_bytes() == b"graph"
        assert (out.parent / "g.onnx.data").read_bytes() == b"weights"
    assert len(made) == 1
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no staging left


def test_large_entries_are_not_kept_and_the_total_stays_bounded(tmp_path, cache, monkeypatch):
    def make(path, size):
        return lambda: path.write_bytes(b"x" * size)

    monkeypatch.setattr(trace_cache, "MAX_ENTRY_BYTES", 100)
    big = tmp_path / "big.onnx"
    cached("b" * 64, big, make(big, 101))
    assert not (cache / ("b" * 64)).exists()

    monkeypatch.setattr(trace_cache, "MAX_CACHE_BYTES", 150)
    for i, key in enumerate(("1" * 64, "2" * 64, "3" * 64)):
        path = tmp_path / f"g{i}.onnx"
        cached(key, path, make(path, 60))
    assert sorted(p.name for p in cache.iterdir()) == ["2" * 64, "3" * 64]  # oldest dropped


def test_a_module_whose_weights_exceed_an_entry_is_traced_without_the_cache(tmp_path, cache,
                                                                           monkeypatch):
    """Its files would not be kept, so it is not keyed (no pass over its weights) and never
    takes an entry: here a planted one under its key stays unread."""
    module = Scale().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    key = export_key(module, (torch.ones(2, 4),), tmp_path / "g.onnx", opset=18,
                     input_names=["x"], output_names=["y"], dynamic_shapes=({0: batch},),
                     external_data=False)
    (cache / key).mkdir(parents=True)
    (cache / key / "g.onnx").write_bytes(b"planted")
    export(module, tmp_path / "g.onnx")
    assert (tmp_path / "g.onnx").read_bytes() == b"planted"  # the same module, small: a hit
    monkeypatch.setattr(trace_cache, "MAX_ENTRY_BYTES", 16)  # Scale holds 15 floats
    export(module, tmp_path / "g.onnx")
    assert (tmp_path / "g.onnx").read_bytes() != b"planted"
    ort.InferenceSession(str(tmp_path / "g.onnx"))  # a real graph, traced


def test_the_exporters_tables_are_built_once_per_process_and_change_no_graph(
        tmp_path, cache, monkeypatch):
    """Two traces (two modules, so neither comes from the cache) build onnxscript's table of
    ONNX functions, the registry and the decomposition table once between them; the graph is
    byte for byte the one the exporter makes with the tables it builds itself."""
    import importlib

    from torch.onnx._internal.exporter import _decomp, _registration

    apis = importlib.import_module(_registration.onnxscript_apis._name)

    def builds() -> tuple[int, int, int]:
        return (apis.get_torchlib_ops.cache_info().misses,
                len(_registration.ONNXRegistry.from_torchlib.built),
                len(_decomp.create_onnx_friendly_decomposition_table.built))

    torch.manual_seed(0)
    first, second = Scale().eval(), Scale(3.0).eval()
    export(first, tmp_path / "a.onnx")
    before = builds()
    export(second, tmp_path / "b.onnx")
    assert builds() == before == (1, 1, 1)
    monkeypatch.setattr(apis, "get_torchlib_ops", apis.get_torchlib_ops.__wrapped__)
    monkeypatch.setattr(_registration.ONNXRegistry, "from_torchlib", classmethod(
        _registration.ONNXRegistry.from_torchlib.original))
    monkeypatch.setattr(_decomp, "create_onnx_friendly_decomposition_table",
                        _decomp.create_onnx_friendly_decomposition_table.original)
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(second, (torch.ones(2, 4),), dynamo=True, opset_version=18,
                      input_names=["x"], output_names=["y"], dynamic_shapes=({0: batch},),
                      verbose=False).save(str(tmp_path / "plain.onnx"), external_data=False)
    assert (tmp_path / "plain.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_what_no_forward_reads_is_left_out_of_the_key():
    """The native image size of the config and the directory transformers loaded from: the
    same network loaded another way is traced once."""
    from runtimes.config import ModelConfig

    class Configured(Scale):
        def __init__(self, config: ModelConfig, name_or_path: str):
            super().__init__()
            self.config, self.name_or_path = config, name_or_path

    def key(config: ModelConfig, name_or_path: str = "/a") -> str:
        torch.manual_seed(0)
        return trace_key(Configured(config, name_or_path).eval(), (torch.ones(2, 4),), "g.onnx")

    base = key(ModelConfig(image_size=(64, 64)))
    assert key(ModelConfig(image_size=(512, 512))) == base
    assert key(ModelConfig(image_size=(64, 64)), "/elsewhere") == base
    assert key(ModelConfig(image_size=(64, 64), hidden_size=64, num_heads=4)) != base


def test_a_writer_that_fails_is_one_warning_and_keeps_nothing(tmp_path, cache):
    """A cache entry whose writer raises (a library's save, not the disk) fails nothing: the
    caller goes on with one warning, and neither an entry nor its staging directory stays."""
    def write(directory: Path) -> None:
        (directory / "half").write_bytes(b"x")
        raise RuntimeError("the converter could not save")

    with pytest.warns(RuntimeWarning, match="not kept in the onnx-traces cache: RuntimeError"):
        trace_cache.store_entry(trace_cache.CACHE_KIND, "k", write)
    assert list(cache.iterdir()) == []
    assert trace_cache.stored_entry(trace_cache.CACHE_KIND, "k") is None
