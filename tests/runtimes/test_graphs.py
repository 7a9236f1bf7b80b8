"""The graph records: one declaration per graph that exporters, manifest and backends read."""

from __future__ import annotations

import pytest

import runtimes
from runtimes import bundle as rb
from runtimes.config import ModelConfig
from runtimes.errors import ConfigError
from runtimes.graphs import GRAPH_NAMES, TensorSpec, get_graph, graphs_for

TINY = ModelConfig(hidden_size=64, num_heads=4, dit_depth=2, patch_size=16, num_classes=10,
                   image_size=(64, 64))


def test_one_list_of_graphs_and_one_tensor_spec():
    assert GRAPH_NAMES == ("dit", "decoder", "refresh") == rb.GRAPHS
    assert rb.TensorSpec is TensorSpec is runtimes.TensorSpec
    assert not hasattr(rb, "GRAPH_IO")
    assert [g for g, spec in graphs_for(TINY).items() if spec.required] == ["dit", "decoder"]


def test_io_specs_resolve_every_axis_but_the_batch():
    inputs, outputs = get_graph("dit").io_specs(TINY, 64, 32)
    assert [s.to_dict() for s in inputs] == [
        {"name": "x_t", "shape": ["batch", 3, 64, 32], "dtype": "float32"},
        {"name": "t", "shape": ["batch"], "dtype": "float32"},
        {"name": "y", "shape": ["batch"], "dtype": "int64"}]
    assert [s.shape for s in outputs] == [["batch", 8, 64], ["batch", 8, 64]]
    assert get_graph("dit").required_outputs == ("cond",)
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        get_graph("decoder").io_specs(TINY, 60, 64)


def test_input_shapes_and_tensorrt_profiles():
    refresh = get_graph("refresh")
    assert refresh.input_shapes(TINY, 3, 64, 64) == {"hidden": (3, 16, 64), "t": (3,)}
    profiles = get_graph("decoder").tensorrt_profiles(TINY, 64, 64, [4, 1, 4])
    assert [n for n, _ in profiles] == [1, 4]
    assert profiles[1][1] == {"x_t": (4, 3, 64, 64), "cond": (4, 16, 64)}


def test_coreml_batch_kinds_follow_the_primary_input():
    dit = get_graph("dit")
    assert dit.coreml_batch_kinds(1, joint_enumeration=False) == dict.fromkeys(
        dit.input_names, "fixed")
    assert dit.coreml_batch_kinds(3, joint_enumeration=False) == {
        "x_t": "enumerated", "t": "range", "y": "range"}
    assert set(get_graph("refresh").coreml_batch_kinds(2, True).values()) == {"enumerated"}


def test_unknown_graphs_and_models_without_graphs_are_named():
    with pytest.raises(ConfigError, match="unknown graph 'vae'"):
        get_graph("vae")
    with pytest.raises(ConfigError, match="architecture 'dit'"):
        graphs_for(ModelConfig(architecture="dit"))
    with pytest.raises(ConfigError, match="primary input"):
        type(get_graph("dit"))("x", inputs=(TensorSpec("a", ["batch"], "float32"),),
                               outputs=(), primary_input="b", description="")
