"""ONNX export of the golden text-to-image model: text_embed maps the text features to text
tokens once per generation and the DiT graph takes (x_t, t, text_tokens); the bundle stores the
encoded negative prompt and the release's sampler, and the golden AB2 sample comes back through
ONNX Runtime, also where torch cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import runtimes
from deco_export.backends.torch_backend import TorchBackend
from deco_export.export.bundle_io import NEGATIVE_EMBEDS_NAME
from deco_export.export.onnx import export_onnx
from runtimes.bundle import BundleError
from runtimes.sampler import SamplerConfig, sample
from tests.helpers import REPO


@pytest.fixture(scope="module")
def t2i_bundle(tmp_path_factory, golden_t2i_model, golden_t2i_ckpt, golden_t2i):
    out = tmp_path_factory.mktemp("export-t2i") / "bundle"
    export_onnx(golden_t2i_model, out, precisions=("fp32",), image_size=(64, 64),
                source={"path": str(golden_t2i_ckpt)}, parity_steps=4,
                negative_prompt_embeds=golden_t2i["uncond_text"][:1], negative_prompt="")
    return out


def test_manifest_names_the_text_input_and_the_release_sampler(t2i_bundle):
    manifest = json.loads((t2i_bundle / "manifest.json").read_text())
    assert manifest["model"]["family"] == "t2i" and manifest["model"]["text_len"] == 8
    dit = next(a for a in manifest["artifacts"] if a["graph"] == "dit")
    hidden = manifest["model"]["hidden_size"]
    assert [i["name"] for i in dit["inputs"]] == ["x_t", "t", "text_tokens"]
    assert dit["inputs"][2] == {"name": "text_tokens", "shape": ["batch", 8, hidden],
                                "dtype": "float32"}
    embed = next(a for a in manifest["artifacts"] if a["graph"] == "text_embed")
    assert embed["inputs"] == [{"name": "text", "shape": ["batch", 8, 48], "dtype": "float32"}]
    assert embed["outputs"][0]["shape"] == ["batch", 8, hidden]
    assert all(g["max_abs_error"] <= 1e-4 for g in embed["parity"]["graphs"])
    assert dit["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert manifest["sizes"]["min"] == [32, 32] and manifest["sizes"]["max"] == [128, 128]
    assert {(g["height"], g["width"]) for g in dit["parity"]["graphs"]} == {(64, 64), (32, 64)}
    assert all(g["max_abs_error"] <= 1e-4 for g in dit["parity"]["graphs"])
    assert dit["parity"]["end_to_end"]["psnr_db"] >= 60
    assert manifest["sampler_defaults"] == {
        "solver": "ab2", "steps": 25, "guidance": 4.0, "guidance_interval": [0.0, 1.0],
        "guidance_bounds": "()", "shift": 3.0, "accumulate_time": True}
    text = manifest["text"]
    assert text["negative_prompt"] == ""
    assert text["negative_prompt_embeds"]["file"] == NEGATIVE_EMBEDS_NAME
    assert text["negative_prompt_embeds"]["shape"] == [1, 8, 48]


@pytest.mark.parametrize("cfg_mode", ["reference", "fast"])
def test_golden_sample_through_onnxruntime(t2i_bundle, golden_t2i, cfg_mode):
    pipe = runtimes.load(t2i_bundle, backend="onnxruntime")
    out = pipe.generate(prompt_embeds=golden_t2i["cond_text"],
                        negative_prompt_embeds=golden_t2i["uncond_text"], steps=12,
                        guidance=4.0, shift=3.0, noise=golden_t2i["noise"], output_type="np",
                        cfg_mode=cfg_mode)
    assert np.abs(np.asarray(out.images) - golden_t2i["sample"]).max() < 1e-4
    assert out.class_labels == [] and out.cost.steps == 12


def test_the_text_is_embedded_once_per_generation(t2i_bundle, golden_t2i):
    """The prompt-only work (y_embedder + position embedding) runs once, on the conditional and
    unconditional rows together, not once per step: 1 text_embed call against 12 DiT calls."""
    pipe = runtimes.load(t2i_bundle, backend="onnxruntime")
    backend, calls = pipe.backend, {"embed_text": [], "dit": []}

    def counting(name):
        fn = getattr(backend, name)

        def counted(*args):
            calls[name].append(args)
            return fn(*args)
        return counted

    for name in calls:
        setattr(backend, name, counting(name))
    b = golden_t2i["cond_text"].shape[0]
    out = pipe.generate(prompt_embeds=golden_t2i["cond_text"],
                        negative_prompt_embeds=golden_t2i["uncond_text"], steps=12,
                        guidance=4.0, shift=3.0, noise=golden_t2i["noise"], output_type="np")
    assert len(calls["embed_text"]) == 1 and len(calls["dit"]) == 12
    (text,), = calls["embed_text"]
    assert text.shape == (2 * b, 8, 48)
    assert out.cost.text_embed_calls == 1 and out.cost.text_embed_samples == 2 * b
    assert np.abs(np.asarray(out.images) - golden_t2i["sample"]).max() < 1e-4


def test_stored_negative_prompt_is_the_default(t2i_bundle, golden_t2i):
    pipe = runtimes.load(t2i_bundle)
    assert pipe.negative_prompt_embeds.shape == (1, 8, 48)
    out = pipe.generate(prompt_embeds=golden_t2i["cond_text"], steps=12, shift=3.0,
                        noise=golden_t2i["noise"], output_type="np")
    assert np.abs(np.asarray(out.images) - golden_t2i["sample"]).max() < 1e-4


def test_bundle_defaults_are_the_reference_sampler(t2i_bundle, golden_t2i, golden_t2i_model):
    """generate(prompt_embeds=E, negative_prompt_embeds=N, noise=X) with the bundle's defaults
    equals the release's sampler (25 AB2 steps, CFG 4 inside (0, 1), shift 3) in PyTorch."""
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((2, 8, 48), dtype=np.float32)
    neg = rng.standard_normal((1, 8, 48), dtype=np.float32)
    noise = rng.standard_normal((2, 3, 64, 64), dtype=np.float32)
    got = runtimes.load(t2i_bundle).generate(prompt_embeds=emb, negative_prompt_embeds=neg,
                                             noise=noise, output_type="np").images
    release = SamplerConfig(solver="ab2", num_steps=25, shift=3.0, guidance=4.0,
                            guidance_interval=(0.0, 1.0), accumulate_time=True)
    want = sample(TorchBackend(golden_t2i_model), noise, emb, release, uncond=neg)
    assert np.abs(np.asarray(got) - want).max() < 1e-4


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_non_square_sizes_equal_pytorch(t2i_bundle, golden_t2i_model, backend, tmp_path):
    """One bundle at two sizes, both non-square (where the crossed T2I RoPE spans show), each
    equal to PyTorch at that size."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    options = {"cache_dir": tmp_path / "cache"} if backend == "openvino" else {}
    pipe = runtimes.load(t2i_bundle, backend=backend, **options)
    rng = np.random.default_rng(4)
    emb = rng.standard_normal((2, 8, 48), dtype=np.float32)
    neg = rng.standard_normal((1, 8, 48), dtype=np.float32)
    release = SamplerConfig(solver="ab2", num_steps=6, shift=3.0, guidance=4.0,
                            guidance_interval=(0.0, 1.0), accumulate_time=True)
    for h, w in ((32, 96), (112, 48)):
        noise = rng.standard_normal((2, 3, h, w), dtype=np.float32)
        got = pipe.generate(prompt_embeds=emb, negative_prompt_embeds=neg, noise=noise,
                            steps=6, output_type="np").images
        want = sample(TorchBackend(golden_t2i_model), noise, emb, release, uncond=neg)
        assert np.asarray(got).shape == (2, 3, h, w)
        assert np.abs(np.asarray(got) - want).max() < (1e-4 if backend == "onnxruntime" else 1e-3)


def test_wrong_conditions_are_one_line_errors(t2i_bundle, golden_t2i):
    pipe = runtimes.load(t2i_bundle)
    with pytest.raises(ValueError, match="text-to-image model: pass prompt"):
        pipe.generate(class_labels=[1], steps=2)
    with pytest.raises(ValueError, match="no text encoder; pass prompt_embeds"):
        pipe.generate(prompt="a cat", steps=2)
    with pytest.raises(ValueError, match=r"must be \(B, 8, 48\)"):
        pipe.generate(prompt_embeds=golden_t2i["cond_text"][:, :4], steps=2)
    with pytest.raises(ValueError, match="one of the two"):
        pipe.generate(steps=2)


def test_openvino_runs_the_text_to_image_graphs(t2i_bundle, golden_t2i, tmp_path):
    pytest.importorskip("openvino")
    pipe = runtimes.load(t2i_bundle, backend="openvino", cache_dir=tmp_path / "cache")
    out = pipe.generate(prompt_embeds=golden_t2i["cond_text"], steps=12, shift=3.0,
                        noise=golden_t2i["noise"], output_type="np")
    assert np.abs(np.asarray(out.images) - golden_t2i["sample"]).max() < 1e-3


def test_validate_reruns_the_gate(t2i_bundle, golden_t2i_ckpt):
    from deco_export.validate import validate_bundle

    lines = validate_bundle(t2i_bundle, checkpoint=str(golden_t2i_ckpt), steps=2)
    assert any("onnx fp32" in line and "passed" in line for line in lines)


def test_tampered_negative_prompt_is_refused(t2i_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(t2i_bundle, copy)
    np.save(copy / NEGATIVE_EMBEDS_NAME, np.zeros((1, 8, 48), np.float32))
    with pytest.raises(BundleError, match="negative_prompt.npy: sha256"):
        runtimes.load(copy)
    with pytest.raises(BundleError, match="sha256 does not match"):
        runtimes.load(copy, verify=False)


BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "deco_export", "onnx", "transformers"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    import numpy as np
    import runtimes

    golden = np.load(sys.argv[2])
    pipe = runtimes.load(sys.argv[1], intra_op_threads=1)
    out = pipe.generate(prompt_embeds=golden["cond_text"], steps=12, shift=3.0,
                        noise=golden["noise"], output_type="np")
    print(float(np.abs(out.images - golden["sample"]).max()))
    bad = sorted(m for m in sys.modules
                 if m.split(".")[0] in ("torch", "deco_export", "onnx", "transformers"))
    assert not bad, bad
    """
)


def test_embeddings_to_image_where_torch_cannot_be_imported(t2i_bundle, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    golden = REPO / "tests" / "fixtures" / "deco_t2i_tiny_64.npz"
    proc = subprocess.run([sys.executable, "-c", BLOCKER, str(t2i_bundle), str(golden)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip()) < 1e-4


def test_image_to_image_and_inpainting_of_a_text_to_image_bundle(t2i_bundle, golden_t2i,
                                                                 golden_t2i_model):
    from deco_export.backends import create_backend
    from tests.helpers import check_image_to_image

    condition = {"prompt_embeds": golden_t2i["cond_text"],
                 "negative_prompt_embeds": golden_t2i["uncond_text"]}
    ort = check_image_to_image(runtimes.load(t2i_bundle), condition)
    manifest = runtimes.read_manifest(t2i_bundle)
    pipe = runtimes.DeCoPipeline(create_backend("torch", golden_t2i_model),
                                 golden_t2i_model.config, manifest.sampler_defaults)
    assert np.abs(check_image_to_image(pipe, condition) - ort).max() < 1e-3
