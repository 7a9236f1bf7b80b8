"""`deco bench` of a text-to-image bundle: prompts encoded once per generation by the bundle's
text encoder, timed as a stage of its own with its share of the generation, the text path's
FLOP share in the report, and one-line refusals of what a T2I benchmark cannot do.

The bundle is the golden T2I model with a tiny random Qwen3 (48 wide, like the model's text
features) exported as its text encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from deco_export.bench import REFERENCE
from deco_export.bench.settings import DEFAULT_PROMPTS, BenchSettings
from deco_export.bench.text import TimedTextEncoder, prompts_for, text_path_share
from deco_export.cli import main

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

STEPS = 2
PROMPTS = ("a photo of a cat", "a red fox in the snow")


@pytest.fixture(scope="module")
def t2i_bundle(t2i_text_bundle) -> Path:
    return t2i_text_bundle


@pytest.fixture(scope="module")
def bench(t2i_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-t2i-out") / "out"
    args = ["bench", str(t2i_bundle), "--out", str(out), "--backends", "torch,onnxruntime-cpu",
            "--precisions", "fp32", "--batch-sizes", "1,3", "--steps", str(STEPS),
            "--repeats", "2", "--warmup", "1", "--threads", "1", "--peak-size", "0",
            "--no-plots", "--no-progress", *(a for p in PROMPTS for a in ("--prompt", p))]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result, out, json.loads((out / "bench.json").read_text())


def test_text_encoder_is_its_own_stage_once_per_generation(bench):
    _, _, report = bench
    rows = report["rows"]
    assert {r["backend"] for r in rows} == {REFERENCE, "torch", "onnxruntime-cpu"}
    for r in rows:
        st = r["stages_ms_per_image"]
        assert st["text_encoder"] > 0 and st["dit"] > 0 and st["decoder"] > 0
        # two repeats: the median is the mean, so the parts sum to the whole exactly
        total = st["text_encoder"] + st["dit"] + st["decoder"] + st["sampler_overhead"]
        assert total == pytest.approx(r["ms_per_image"], rel=1e-6)
        assert 0 < r["text_encoder_share"] < 1
        assert r["text_encoder_share"] == pytest.approx(st["text_encoder"] / r["ms_per_image"],
                                                        rel=1e-6)
        # one encoder call of the batch's prompts per generation, the DiT every step
        assert r["calls"]["text_encoder"] == 1 and r["calls"]["prompts_encoded"] == r["batch"]
        assert r["calls"]["dit"] == STEPS
    onnx = [r for r in rows if r["backend"] == "onnxruntime-cpu"]
    assert onnx and all(r["psnr_db"] is None or r["psnr_db"] > 60 for r in onnx)  # same text


def test_report_names_the_prompts_and_the_text_path_share(bench, golden_t2i_model):
    _, out, report = bench
    text = report["text"]
    assert text["prompts"] == list(PROMPTS) and (text["text_len"], text["text_dim"]) == (8, 48)
    assert text["text_path_flop_share"] == pytest.approx(
        text_path_share(golden_t2i_model.config, 64, 64))
    assert 0 < text["text_path_flop_share"] < 1
    assert report["solver"] == "ab2" and report["guidance_bounds"] == "()"
    md = (out / "bench.md").read_text()
    assert "text encoder (share) / DiT / decoder / other ms" in md
    assert "Adams-Bashforth 2, CFG 4.0 on (0.0, 1.0)" in md
    assert "prompts 'a photo of a cat'; 'a red fox in the snow'" in md
    assert "% of a DiT call's matrix-product FLOPs" in md


def test_prompts_cycle_and_default_to_a_fixed_list():
    assert prompts_for(3, ("a", "b")) == ["a", "b", "a"]
    assert prompts_for(5) == [*DEFAULT_PROMPTS, DEFAULT_PROMPTS[0]]
    with pytest.raises(ValueError, match="--prompt must not be empty"):
        BenchSettings(prompts=(" ",)).check()


def test_timed_text_encoder_counts_calls_prompts_and_time():
    ticks = iter([1.0, 1.25, 2.0, 2.5])

    class Encoder:
        max_length, dim = 8, 48

        def encode(self, prompts):
            return np.zeros((len(prompts), 8, 48), np.float32)

    timed = TimedTextEncoder(Encoder(), clock=lambda: next(ticks))
    assert timed.encode(["a", "b"]).shape == (2, 8, 48) and timed.dim == 48
    timed.encode(["c"])
    assert (timed.seconds, timed.calls, timed.prompts) == (0.75, 2, 3)
    timed.reset()
    assert (timed.seconds, timed.calls, timed.prompts) == (0.0, 0, 0)


def test_text_path_share_is_larger_at_smaller_sizes(golden_t2i_model):
    cfg = golden_t2i_model.config
    assert text_path_share(cfg, 32, 32) > text_path_share(cfg, 64, 64) > 0
    assert text_path_share(cfg.to_dict(), 64, 64) == text_path_share(cfg, 64, 64)


def test_refusals_are_one_line(golden_t2i_model, golden_t2i_ckpt, t2i_bundle, tmp_path):
    import shutil

    from runtimes import bundle as rb

    no_encoder = tmp_path / "no-encoder"
    shutil.copytree(t2i_bundle, no_encoder)
    manifest = rb.read_manifest(no_encoder)
    manifest.artifacts = [a for a in manifest.artifacts if a.graph != "text_encoder"]
    rb.write_manifest(no_encoder, manifest)
    cases = [
        ([str(no_encoder)], "has no text encoder to encode the prompts"),
        ([str(t2i_bundle), "--fid", "emoji"], "--fid scores class-conditional models"),
        ([str(golden_t2i_ckpt)], "is a text-to-image model: benchmark a bundle"),
    ]
    for args, words in cases:
        result = CliRunner().invoke(main, ["bench", *args, "--out", str(tmp_path / "o"),
                                           "--backends", "onnxruntime-cpu", "--peak-size", "0",
                                           "--no-progress"])
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and words in lines[0], result.output
