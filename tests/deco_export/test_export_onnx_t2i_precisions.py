"""The fp16 and int8 parity gates for a text-to-image ONNX bundle: the golden T2I model exported
at fp32, fp16 and int8 records every graph's figures and the end-to-end figures at both
checked sizes, and the images clear the end-to-end gates of `deco_export.parity`."""

from __future__ import annotations

import numpy as np
import pytest

import runtimes
from deco_export.export.onnx import export_onnx, onnx_file_name
from deco_export.parity import END_TO_END_MIN_PSNR, psnr
from runtimes import bundle as rb

PRECISIONS = ("fp32", "fp16", "int8")
GRAPHS = ("dit", "decoder", "refresh", "text_embed")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, golden_t2i_model, golden_t2i_ckpt, golden_t2i):
    out = tmp_path_factory.mktemp("export-t2i-precisions") / "bundle"
    export_onnx(golden_t2i_model, out, precisions=PRECISIONS, image_size=(64, 64),
                source={"path": str(golden_t2i_ckpt)}, parity_steps=4,
                negative_prompt_embeds=golden_t2i["uncond_text"][:1], negative_prompt="")
    return out


@pytest.fixture(scope="module")
def manifest(bundle) -> rb.Manifest:
    return rb.read_manifest(bundle)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_records_graph_and_end_to_end_figures(manifest, precision):
    sizes = {(64, 64), (32, 64)}  # the default and the non-square size of the range
    for graph in GRAPHS:
        art = manifest.get_artifact("onnx", graph, precision)
        assert art is not None and art.file == onnx_file_name(graph, precision)
        figures = art.parity["graphs"]
        assert {(g["height"], g["width"]) for g in figures} == sizes
        assert {g["batch"] for g in figures} == {1, 3}
        assert all(np.isfinite(g["max_abs_error"]) for g in figures)
        runs = art.parity["end_to_end_sizes"]
        assert {(r["height"], r["width"]) for r in runs} == sizes
        for run in runs:
            assert run["status"] == "passed" and run["batch"] == 3
            assert run["threshold_db"] == END_TO_END_MIN_PSNR[precision]
            assert run["psnr_db"] is None or run["psnr_db"] >= END_TO_END_MIN_PSNR[precision]
        assert art.parity["end_to_end"] == next(r for r in runs if (r["height"], r["width"])
                                                == (64, 64))
    dit = manifest.get_artifact("onnx", "dit", precision)
    assert [s.name for s in dit.inputs] == ["x_t", "t", "text_tokens"]
    if precision == "int8":
        quantization = dit.details["quantization"]
        assert quantization["quantized_matmuls"] > 0
    if precision == "fp32":
        assert all(g["max_abs_error"] <= 1e-4 for g in dit.parity["graphs"])


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_golden_sample_clears_the_gate(bundle, golden_t2i, precision):
    """The golden AB2 sample (12 steps, CFG 4, shift 3) through the fp16 / int8 graphs, held
    to the same end-to-end gate as the export."""
    pipe = runtimes.load(bundle, backend="onnxruntime", precision=precision,
                         intra_op_threads=1)
    out = pipe.generate(prompt_embeds=golden_t2i["cond_text"], steps=12, guidance=4.0,
                        shift=3.0, noise=golden_t2i["noise"], output_type="np")
    got = psnr(golden_t2i["sample"], np.asarray(out.images), data_range=2.0)
    print(f"\n{precision} golden T2I sample: {got:.1f} dB")
    assert got >= END_TO_END_MIN_PSNR[precision]
