"""The names diffusers users type: settings, the positional prompt, images per prompt, class
names from the manifest's id2label."""

from __future__ import annotations

import numpy as np
import pytest

import runtimes
from runtimes.bundle import Manifest, read_manifest, write_manifest
from runtimes.pipeline import ClassNameError
from tests.helpers import GaussianFlowBackend
from tests.runtimes.test_sampler import _TextBackend

NAMES = {0: "tench, Tinca tinca", 1: "crane", 2: "crane, machine"}


def _pipe(**kwargs):
    be = GaussianFlowBackend()
    return runtimes.DeCoPipeline(be, be.model_config(), {"steps": 6, "guidance": 2.0}, **kwargs)


def test_diffusers_setting_names_mean_the_same():
    pipe = _pipe()
    noise = runtimes.sample_noise(5, 2, 3, 8, 8)
    ours = pipe.generate([0, 2], steps=4, guidance=3.0, noise=noise, output_type="np")
    theirs = pipe([0, 2], num_inference_steps=4, guidance_scale=3.0, latents=noise,
                  output_type="np")
    assert np.array_equal(ours.images, theirs.images) and theirs.cost.steps == 4
    assert theirs.config.guidance == 3.0
    with pytest.raises(ValueError, match="steps= and num_inference_steps= are the same"):
        pipe([0], steps=4, num_inference_steps=4)
    with pytest.raises(ValueError, match="noise= and latents="):
        pipe([0], noise=noise[:1], latents=noise[:1])


def test_images_per_prompt_repeat_each_label_in_turn():
    pipe = _pipe()
    out = pipe([0, 2], num_images_per_prompt=2, seed=1, output_type="np")
    assert out.class_labels == [0, 0, 2, 2] and out.images.shape == (4, 3, 8, 8)
    assert np.array_equal(out.images, pipe([0, 0, 2, 2], seed=1, output_type="np").images)
    with pytest.raises(ValueError, match="num_images_per_prompt must be an integer >= 1"):
        pipe([0], num_images_per_prompt=0)


class _Encoder:
    def encode(self, prompts):
        return np.stack([np.full((5, 3), len(p) / 10, np.float32) for p in prompts])


def _text_pipe():
    model = {"hidden_size": 64, "num_heads": 1, "dit_depth": 1, "decoder_hidden_size": 1,
             "decoder_depth": 1, "patch_size": 2, "num_classes": 0, "in_channels": 3,
             "image_size": [4, 4], "family": "t2i", "text_len": 5, "text_dim": 3}
    return runtimes.DeCoPipeline(_TextBackend(embeds=True), model,
                                 {"steps": 3, "guidance": 4.0, "solver": "ab2"},
                                 text_encoder=_Encoder())


def test_the_first_positional_argument_of_a_text_to_image_pipeline_is_the_prompt():
    pipe = _text_pipe()
    keyword = pipe.generate(prompt=["a fox", "an owl!"], seed=2, output_type="np")
    for positional in (pipe(["a fox", "an owl!"], seed=2, output_type="np"),
                       pipe.generate(["a fox", "an owl!"], seed=2, output_type="np")):
        assert np.array_equal(positional.images, keyword.images)
        assert positional.prompts == ["a fox", "an owl!"]
    twice = pipe("a fox", num_images_per_prompt=2, negative_prompt="blurry", seed=2,
                 output_type="np")
    assert twice.prompts == ["a fox", "a fox"] and twice.images.shape[0] == 2
    with pytest.raises(ValueError, match="the prompt was given twice"):
        pipe("a fox", prompt="an owl")


def test_class_names_from_id2label():
    pipe = _pipe(id2label=NAMES)
    assert pipe.labels == {"Tinca tinca": 0, "crane": 1, "machine": 2, "tench": 0}
    assert pipe.get_label_ids(["Tench", "machine"]) == [0, 2]
    by_name = pipe(["tench", "machine"], seed=0, output_type="np")
    assert by_name.class_labels == [0, 2]
    assert np.array_equal(by_name.images, pipe([0, 2], seed=0, output_type="np").images)
    assert pipe("tinca tinca", output_type="np").class_labels == [0]
    with pytest.raises(ClassNameError, match=r"'crane' is ambiguous \(classes \[1, 2\]"):
        pipe(["crane"])
    with pytest.raises(ClassNameError, match="unknown class name 'tenchh'; did you mean 'tench'"):
        pipe(["tenchh"])
    with pytest.raises(ClassNameError, match="does not name its classes"):
        _pipe()(["tench"])


def test_a_bundle_manifest_carries_id2label(tmp_path):
    be = GaussianFlowBackend()
    write_manifest(tmp_path, Manifest(model=be.model_config(),
                                      extra={"id2label": {str(k): v for k, v in NAMES.items()}}))
    manifest = read_manifest(tmp_path)
    assert manifest.id2label == NAMES
    pipe = runtimes.DeCoPipeline(be, manifest.model, {"steps": 2}, manifest=manifest)
    assert pipe.get_label_ids("tench") == [0]
    write_manifest(tmp_path, Manifest(model=be.model_config(), extra={"id2label": ["a"]}))
    with pytest.raises(runtimes.BundleError, match='"id2label" must map class indices'):
        _ = read_manifest(tmp_path).id2label
