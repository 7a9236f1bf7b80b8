"""A guidance-distilled model through every backend this machine runs: the DiT graph's guidance
input, each precision's parity gate, and one conditional pass per step equal to PyTorch's.

One export (ONNX fp32, fp16 and int8 of a tiny student saved as a checkpoint directory) serves
every test: ONNX Runtime at each precision, OpenVINO (its gate through `deco validate
--backend`), the TensorRT build plan. Core ML converts here and is checked for what it
declares; its predictions, and TensorRT's engines, run only on macOS / an NVIDIA GPU (their
tests in test_coreml.py and test_tensorrt.py skip with the reason elsewhere). A distilled
text-to-image model samples without a negative prompt.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import runtimes
from deco_export import parity
from deco_export.backends import create_backend
from deco_export.checkpoint import save_pretrained
from deco_export.export.onnx import export_onnx
from deco_export.machine import missing_bf16_reason
from deco_export.model import random_model
from deco_export.sources import load_model
from runtimes.config import ModelConfig
from runtimes.graphs import GUIDANCE_INPUT
from runtimes.sampler import SamplerConfig, sample
from training.distill import student_from_teacher

TINY = ModelConfig(hidden_size=32, num_heads=2, dit_depth=2, decoder_hidden_size=8,
                   decoder_depth=1, patch_size=4, num_classes=3, image_size=(16, 16))
DIT_INPUTS = ["x_t", "t", "y", GUIDANCE_INPUT]
NO_BF16 = missing_bf16_reason()


@pytest.fixture(scope="module")
def student():
    model = student_from_teacher(random_model(TINY, seed=0))
    with torch.no_grad():  # a trained guidance embedding: w changes the output
        model.dit.g_embedder.mlp[2].weight.normal_(std=1.0, generator=torch.Generator()
                                                   .manual_seed(1))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, student):
    """The student as a checkpoint directory: the source the bundle names, which the gates of
    the runtime backends (`deco validate --backend`) compare with."""
    return save_pretrained(student, tmp_path_factory.mktemp("student") / "ckpt",
                           source="distilled-test")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, checkpoint):
    model, source = load_model(checkpoint)
    out = tmp_path_factory.mktemp("distilled") / "bundle"
    export_onnx(model, out, precisions=("fp32", "fp16", "int8"), source=source,
                parity_steps=4)
    return out


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)


CONFIG = SamplerConfig(num_steps=6, guidance=3.0, guidance_interval=(0.1, 1.0))


@pytest.fixture(scope="module")
def pytorch_sample(student, noise):
    return sample(create_backend("torch", student), noise, [0, 2], CONFIG, null_class=3)


def test_the_dit_graph_takes_guidance_and_passes_its_gate(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["guidance_distilled"] is True
    dits = [a for a in manifest["artifacts"] if a["graph"] == "dit"]
    assert {a["precision"] for a in dits} == {"fp32", "fp16", "int8"}
    for artifact in dits:
        assert [i["name"] for i in artifact["inputs"]] == DIT_INPUTS
        assert artifact["inputs"][3]["dtype"] == "float32"
    others = [a for a in manifest["artifacts"] if a["graph"] != "dit"]
    assert others and all(GUIDANCE_INPUT not in [i["name"] for i in a["inputs"]]
                          for a in others)
    int8 = next(a for a in dits if a["precision"] == "int8")
    assert int8["details"]["quantization"]
    assert int8["parity"]["end_to_end"]["psnr_db"] >= parity.END_TO_END_MIN_PSNR["int8"]


@pytest.mark.parametrize("precision,atol", [("fp32", 1e-4), ("fp16", 2e-2), ("int8", None)])
def test_onnx_runtime_samples_as_pytorch_in_one_pass(bundle, noise, pytorch_sample, precision,
                                                     atol):
    pipe = runtimes.load(bundle, backend="onnxruntime", precision=precision)
    assert pipe.backend.takes_guidance
    got = sample(pipe.backend, noise, [0, 2], CONFIG, null_class=3)
    if atol is not None:
        np.testing.assert_allclose(got, pytorch_sample, rtol=0, atol=atol)
    else:  # int8: judged on the images, as its gate
        assert parity.psnr(pytorch_sample, got, data_range=2.0) >= (
            parity.END_TO_END_MIN_PSNR["int8"])
    unguided = sample(pipe.backend, noise, [0, 2],
                      SamplerConfig(num_steps=6, guidance=1.0), null_class=3)
    assert np.abs(got - unguided).max() > 1e-4  # w reaches the graph
    out = pipe.generate(class_labels=[1], seed=0, steps=4, guidance=3.0, output_type="np")
    # One conditional row per call: 4 DiT and 4 decoder samples for one image in 4 steps.
    assert out.cost.dit_calls == out.cost.dit_samples == 4
    assert out.cost.decoder_samples == 4 and np.isfinite(out.images).all()


def test_a_bench_row_counts_and_times_one_pass_per_step(bundle):
    """The bench's timing proxy keeps the model's flag, so a distilled bundle's row reports
    the calls that ran (B rows each) and the FLOPs of those."""
    from deco_export.bench.aggregate import roofline_figures
    from deco_export.bench.timing import TimingBackend
    from deco_export.flops import graph_flops

    pipe = runtimes.load(bundle, backend="onnxruntime")
    pipe.backend = proxy = TimingBackend(pipe.backend)
    out = pipe.generate(class_labels=[0, 1], seed=0, steps=4, guidance=3.0, output_type="np")
    assert proxy.calls["dit"] == out.cost.dit_calls == 4 and out.cost.dit_samples == 2 * 4
    model = pipe.model_config
    assert model.guidance_distilled
    run = {"batch": 2, "seconds": [1.0], "stages": {"dit": [0.5]}, "cost": out.cost.to_dict()}
    figures = roofline_figures({"backend": "onnxruntime-cpu", "precision": "fp32"}, run,
                               {"model": model, "image_size": (16, 16)})
    assert figures["dit_gflops"] == pytest.approx(
        2 * 4 * graph_flops(model, "dit", 1, 16, 16) / 0.5 / 1e9)


@pytest.mark.parametrize("precision", [
    "fp32", pytest.param("bf16", marks=pytest.mark.skipif(NO_BF16 is not None,
                                                          reason=NO_BF16 or ""))])
def test_openvino_passes_the_gate_and_samples_in_one_pass(bundle, noise, pytorch_sample,
                                                          tmp_path, precision):
    pytest.importorskip("openvino", reason="OpenVINO is not installed here "
                        "(pip install 'deco-export[openvino]')")
    from deco_export.validate import validate_backend

    cache = tmp_path / "ov-cache"
    lines, figures = validate_backend(bundle, "openvino", precision, steps=4, threads=1,
                                      cache_dir=cache)
    assert "passed" in lines[0]
    assert {"dit.cond", "dit.hidden", "decoder"} <= {g["graph"] for g in figures["graphs"]}
    assert figures["end_to_end"]["psnr_db"] >= parity.END_TO_END_MIN_PSNR[precision]
    with runtimes.load(bundle, backend="openvino", precision=precision, threads=1,
                       cache_dir=cache) as pipe:
        assert pipe.backend.takes_guidance
        got = sample(pipe.backend, noise, [0, 2], CONFIG, null_class=3)
        out = pipe.generate(class_labels=[1, 2], seed=0, steps=4, guidance=3.0,
                            output_type="np")
    if precision == "fp32":
        np.testing.assert_allclose(got, pytorch_sample, rtol=0, atol=1e-4)
    assert out.cost.dit_samples == out.cost.decoder_samples == 2 * 4


def test_tensorrt_would_build_every_graph_with_a_guidance_profile(bundle):
    """What `deco export tensorrt` plans for this bundle, without TensorRT: every graph of each
    float precision, the DiT's profiles declaring ``guidance`` from its record, engine batches
    without CFG doubling."""
    from deco_export.export.tensorrt import BuildSettings, engine_sizes, plan_builds
    from runtimes import bundle as rb
    from runtimes.backends import tensorrt_profiles as tp
    from tests.runtimes.tensorrt_fakes import H100

    manifest = rb.read_manifest(bundle)
    settings = BuildSettings(buckets=(1, 2, 4)).for_model(manifest.model)
    items = plan_builds(bundle, manifest, None, H100, settings)
    assert {(i.graph, i.precision) for i in items} >= {("dit", "fp32"), ("dit", "fp16")}
    assert "int8" not in {i.precision for i in items}
    profiles = tp.profiles_for("dit", manifest.model, manifest.model.image_size,
                               settings.engine_batches, engine_sizes(manifest))
    assert [p.batch for p in profiles] == [1, 2, 4]
    for profile in profiles:
        assert list(profile.shapes) == DIT_INPUTS
        assert profile.bounds(GUIDANCE_INPUT) == ((profile.batch,),) * 3


def test_coreml_declares_guidance_from_the_record(student, tmp_path_factory):
    """The Core ML DiT package takes ``guidance`` (B,) float32 with a description, as the
    record declares; on macOS its export also passed the parity gate end to end."""
    pytest.importorskip("coremltools", reason="coremltools is not installed here "
                        "(pip install 'deco-export[coreml]')")
    from deco_export.export import coreml as cm
    from runtimes import bundle as rb

    out = tmp_path_factory.mktemp("distilled-coreml") / "bundle"
    cm.export_coreml(student, out, precisions=("fp32",), parity_steps=4)
    art = rb.read_manifest(out).get_artifact("coreml", "dit", "fp32")
    assert [s.name for s in art.inputs] == DIT_INPUTS
    report = cm.inspect_package(out / art.file)
    inputs = {i["name"]: i for i in report["inputs"]}
    assert list(inputs) == DIT_INPUTS
    assert inputs[GUIDANCE_INPUT]["dtype"] == "float32"
    assert inputs[GUIDANCE_INPUT]["shape"] == [1] and inputs[GUIDANCE_INPUT]["description"]
    if sys.platform == "darwin":
        assert art.parity["end_to_end"]["psnr_db"] >= parity.END_TO_END_MIN_PSNR["fp32"]
    else:
        assert art.parity["end_to_end"]["status"] == "not run"


def test_a_distilled_text_model_needs_no_negative_prompt(golden_t2i_model):
    """A distilled text-to-image model samples from prompt embeddings alone (no text encoder,
    no stored negative prompt), embedding only the prompts; untrained, it is its teacher's
    conditional model, so it gives the teacher's unguided images."""
    cfg = golden_t2i_model.config
    embeds = np.random.default_rng(0).standard_normal((2, cfg.text_len, cfg.text_dim),
                                                      dtype=np.float32)
    kwargs = dict(prompt_embeds=embeds, seed=0, steps=3, output_type="np")
    teacher = runtimes.DeCoPipeline(create_backend("torch", golden_t2i_model), cfg.to_dict())
    with pytest.raises(ValueError, match="no text encoder"):
        teacher.generate(**kwargs, guidance=4.0)
    expected = teacher.generate(**kwargs, guidance=1.0, negative_prompt_embeds=embeds[:1])
    student = student_from_teacher(golden_t2i_model).eval()
    pipe = runtimes.DeCoPipeline(create_backend("torch", student), student.config.to_dict())
    out = pipe.generate(**kwargs, guidance=4.0)
    np.testing.assert_allclose(out.images, expected.images, rtol=0, atol=1e-6)
    assert out.cost.dit_samples == 2 * 3 and out.cost.text_embed_samples == 2


def test_deco_validate_reruns_every_precisions_gate(bundle):
    """`deco validate` re-runs each ONNX precision's gate against the checkpoint the bundle
    names (graph parity with the guidance input, then the sampler end to end)."""
    from deco_export.validate import validate_bundle

    lines = validate_bundle(bundle, steps=4)
    assert lines[0].startswith("hashes:")
    gates = {line.split(":")[0]: line for line in lines[1:]}
    assert set(gates) == {"onnx fp16", "onnx fp32", "onnx int8"}
    assert all(line.endswith("passed") for line in gates.values())
