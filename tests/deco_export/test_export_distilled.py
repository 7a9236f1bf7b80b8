"""A guidance-distilled model through ONNX: the DiT graph's guidance input, the parity gate,
and one conditional pass per step on ONNX Runtime equal to PyTorch's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import runtimes
from deco_export.backends import create_backend
from deco_export.export.onnx import export_onnx
from deco_export.model import random_model
from runtimes.config import ModelConfig
from runtimes.sampler import SamplerConfig, sample
from training.distill import student_from_teacher

TINY = ModelConfig(hidden_size=32, num_heads=2, dit_depth=2, decoder_hidden_size=8,
                   decoder_depth=1, patch_size=4, num_classes=3, image_size=(16, 16))


@pytest.fixture(scope="module")
def student():
    model = student_from_teacher(random_model(TINY, seed=0))
    with torch.no_grad():  # a trained guidance embedding: w changes the output
        model.dit.g_embedder.mlp[2].weight.normal_(std=1.0, generator=torch.Generator()
                                                   .manual_seed(1))
    return model.eval()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, student):
    out = tmp_path_factory.mktemp("distilled") / "bundle"
    export_onnx(student, out, precisions=("fp32", "fp16"), parity_steps=4)
    return out


def test_the_dit_graph_takes_guidance_and_passes_its_gate(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["guidance_distilled"] is True
    dits = [a for a in manifest["artifacts"] if a["graph"] == "dit"]
    assert {a["precision"] for a in dits} == {"fp32", "fp16"}
    for artifact in dits:
        assert [i["name"] for i in artifact["inputs"]] == ["x_t", "t", "y", "guidance"]
        assert artifact["inputs"][3]["dtype"] == "float32"
    others = [a for a in manifest["artifacts"] if a["graph"] != "dit"]
    assert others and all("guidance" not in [i["name"] for i in a["inputs"]] for a in others)


@pytest.mark.parametrize("precision,atol", [("fp32", 1e-4), ("fp16", 2e-2)])
def test_onnx_runtime_samples_as_pytorch_in_one_pass(bundle, student, precision, atol):
    pipe = runtimes.load(bundle, backend="onnxruntime", precision=precision)
    assert pipe.backend.takes_guidance
    config = SamplerConfig(num_steps=6, guidance=3.0, guidance_interval=(0.1, 1.0))
    noise = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    got = sample(pipe.backend, noise, [0, 2], config, null_class=3)
    expected = sample(create_backend("torch", student), noise, [0, 2], config, null_class=3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol)
    unguided = sample(pipe.backend, noise, [0, 2],
                      SamplerConfig(num_steps=6, guidance=1.0), null_class=3)
    assert np.abs(got - unguided).max() > 1e-4  # w reaches the graph
    out = pipe.generate(class_labels=[1], seed=0, steps=4, guidance=3.0, output_type="np")
    assert out.cost["dit_calls"] == 4 and np.isfinite(out.images).all()
