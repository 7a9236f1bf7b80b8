"""The graph records: one declaration per graph that exporters, manifest and backends read."""

from __future__ import annotations

import pytest

import runtimes
from runtimes import bundle as rb
from runtimes.config import ModelConfig
from runtimes.errors import ConfigError
from runtimes.graphs import (
    GRAPH_NAMES,
    TensorSpec,
    dit_condition_input,
    get_graph,
    graphs_for,
)

TINY = ModelConfig(hidden_size=64, num_heads=4, dit_depth=2, patch_size=16, num_classes=10,
                   image_size=(64, 64))


def test_one_list_of_graphs_and_one_tensor_spec():
    assert GRAPH_NAMES == ("dit", "decoder", "refresh", "decoder_cond", "decoder_pixel",
                           "pixel_dit", "text_embed", "text_encoder") == rb.GRAPHS
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


def test_split_decoder_records_carry_the_modulation_and_are_optional():
    cond, pixel = get_graph("decoder_cond"), get_graph("decoder_pixel")
    assert not cond.required and not pixel.required
    assert cond.output_names == ("modulation",) and pixel.input_names == ("x_t", "modulation")
    assert pixel.output_names == get_graph("decoder").output_names == ("v",)
    wide = ModelConfig(hidden_size=64, num_heads=4, dit_depth=2, patch_size=8, num_classes=10,
                       decoder_hidden_size=16, decoder_depth=2, image_size=(64, 64))
    _, outputs = cond.io_specs(wide, 64, 32)
    assert outputs[0].shape == ["batch", 32, 64, 16]  # tokens, p*p, d
    assert pixel.input_shapes(wide, 2, 64, 32)["modulation"] == (2, 32, 64, 16)
    assert list(graphs_for(TINY))[-2:] == ["decoder_cond", "decoder_pixel"]
    assert "decoder_cond" not in graphs_for(ModelConfig(architecture="dit"))


def test_unknown_graphs_and_models_without_graphs_are_named():
    with pytest.raises(ConfigError, match="unknown graph 'vae'"):
        get_graph("vae")
    assert list(graphs_for(ModelConfig(architecture="dit"))) == ["pixel_dit"]
    unknown = ModelConfig()
    object.__setattr__(unknown, "architecture", "unet")  # past validation: no record has it
    with pytest.raises(ConfigError, match="family 'c2i' with architecture 'unet'"):
        graphs_for(unknown)
    with pytest.raises(ConfigError, match="primary input"):
        type(get_graph("dit"))("x", inputs=(TensorSpec("a", ["batch"], "float32"),),
                               outputs=(), primary_input="b", description="")


T2I = ModelConfig(hidden_size=64, num_heads=4, dit_depth=2, patch_size=16, num_classes=0,
                  image_size=(64, 64), family="t2i", text_len=7, text_dim=24, refine_depth=1)


def test_text_to_image_records_share_decoder_and_refresh():
    c2i, t2i = graphs_for(TINY), graphs_for(T2I)
    assert list(t2i) == ["dit", "decoder", "refresh", "decoder_cond",
                         "decoder_pixel", "text_embed"]  # the sampler's graphs, in order
    assert t2i["dit"].input_names == ("x_t", "t", "text_tokens") != c2i["dit"].input_names
    assert t2i["dit"].output_names == c2i["dit"].output_names
    assert t2i["decoder"] is c2i["decoder"] and t2i["refresh"] is c2i["refresh"]
    assert (dit_condition_input(TINY), dit_condition_input(T2I)) == ("y", "text_tokens")
    inputs, _ = get_graph("dit", T2I).io_specs(T2I, 64, 64)
    assert inputs[2].to_dict() == {"name": "text_tokens", "shape": ["batch", 7, 64],
                                   "dtype": "float32"}
    assert get_graph("dit", T2I).input_shapes(T2I, 3, 64, 64)["text_tokens"] == (3, 7, 64)


def test_text_embed_is_the_prompt_only_part_of_the_t2i_dit():
    """text_embed maps the text features to the DiT's text tokens; it has no image axes, so the
    sampler runs it once per generation whatever the size."""
    embed = get_graph("text_embed", T2I)
    assert embed.required and embed.sampled and embed.families == ("t2i",)
    ins, outs = embed.io_specs(T2I)
    assert ins[0].to_dict() == {"name": "text", "shape": ["batch", 7, 24], "dtype": "float32"}
    assert outs[0].to_dict() == {"name": "text_tokens", "shape": ["batch", 7, 64],
                                 "dtype": "float32"}
    assert embed.outputs[0].shape == get_graph("dit", T2I).inputs[2].shape
    assert embed.input_shapes(T2I, 2, 32, 96) == embed.input_shapes(T2I, 2, 64, 64)
    assert "text_embed" not in graphs_for(TINY)


def test_text_encoder_is_a_t2i_record_the_sampler_does_not_load():
    everything = graphs_for(T2I, sampled_only=False)
    assert list(everything) == ["dit", "decoder", "refresh", "decoder_cond", "decoder_pixel",
                                "text_embed", "text_encoder"]
    enc = everything["text_encoder"]
    assert not enc.required and not enc.sampled
    assert enc.input_names == ("input_ids", "attention_mask")
    ins, outs = enc.io_specs(T2I, 64, 64)
    assert ins[0].to_dict() == {"name": "input_ids", "shape": ["batch", 7],
                                "dtype": "int64"}
    assert outs[0].shape == ["batch", 7, 24]
    assert "text_encoder" not in graphs_for(TINY, sampled_only=False)
    with pytest.raises(ConfigError, match="unknown graph 'text_encoder'"):
        get_graph("text_encoder", TINY)
