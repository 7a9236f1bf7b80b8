"""Guidance distillation: the student starts as the teacher to the bit, trains on the teacher's
guided velocity, resumes exactly, and loads back as a guidance-distilled model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from deco_export.model import DeCo
from deco_export.sources import load_model
from runtimes.config import ModelConfig
from runtimes.errors import ConfigError
from training.cli import distill_guidance
from training.distill import DistillConfig, Distiller, distill, student_from_teacher

TINY = ModelConfig(hidden_size=32, num_heads=2, dit_depth=2, decoder_hidden_size=8,
                   decoder_depth=1, patch_size=4, num_classes=3, image_size=(16, 16))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny class-conditional teacher whose output layers are not zero (it guides)."""
    from deco_export.model import random_model

    return random_model(TINY, seed=0).save_pretrained(
        tmp_path_factory.mktemp("teacher") / "model", source="test teacher")


def _inputs(config: ModelConfig, n: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, config.in_channels, *config.image_size, generator=g)
    t = torch.rand(n, generator=g)
    if config.is_text_to_image:
        y = torch.randn(n, config.text_len, config.text_dim, generator=g)
    else:
        y = torch.arange(n) % config.num_classes
    return x, t, y


@pytest.mark.parametrize("which", ["golden_model", "golden_t2i_model"])
def test_student_starts_as_the_teachers_conditional_model_to_the_bit(which, request):
    teacher = request.getfixturevalue(which).eval()
    student = student_from_teacher(teacher).eval()
    assert student.config.guidance_distilled and not teacher.config.guidance_distilled
    x, t, y = _inputs(teacher.config)
    with torch.no_grad():
        expected = teacher(x, t, y)
        for w in (1.0, 3.2, 6.0):
            got = student(x, t, y, torch.full((3,), w))
            assert torch.equal(got, expected)
        assert torch.equal(student(x, t, y), expected)  # no guidance: w = 1


def test_a_teacher_refuses_a_guidance_input(golden_model):
    x, t, y = _inputs(golden_model.config)
    with pytest.raises(ValueError, match="not guidance-distilled"):
        golden_model(x, t, y, torch.ones(3))


def test_config_flag_round_trips_and_older_files_stay_identical():
    text = (Path(__file__).parents[2] / "deco_export" / "default" / "config.json").read_text()
    config = ModelConfig.from_json(text)
    assert not config.guidance_distilled
    assert config.to_json() + "\n" == text
    distilled = dataclasses.replace(config, guidance_distilled=True)
    assert distilled.to_dict()["guidance_distilled"] is True
    assert ModelConfig.from_json(distilled.to_json()) == distilled
    with pytest.raises(ConfigError, match="guidance_distilled must be true or false"):
        ModelConfig.from_dict({**config.to_dict(), "guidance_distilled": "yes"})
    with pytest.raises(ConfigError, match="architecture 'deco'"):
        dataclasses.replace(config, architecture="dit", decoder_depth=0,
                            guidance_distilled=True)


def _config(teacher_dir: Path, out: Path, **kw) -> DistillConfig:
    base = dict(teacher=str(teacher_dir), out=str(out), steps=4, batch_size=4, lr=1e-3,
                rollout_steps=2, threads=1, log_every=1, ckpt_every=2, progress=False)
    return DistillConfig(**{**base, **kw})


def test_distillation_trains_resumes_exactly_and_exports_a_distilled_model(teacher_dir,
                                                                           tmp_path):
    whole = distill(_config(teacher_dir, tmp_path / "whole"))
    student = load_model(whole)[0]
    assert isinstance(student, DeCo) and student.config.guidance_distilled
    assert student.config.same_weights_as(dataclasses.replace(TINY, guidance_distilled=True))
    # Trained: the guidance embedding moved off zero, so w now changes the velocity.
    assert student.dit.g_embedder.mlp[2].weight.abs().sum() > 0
    x, t, y = _inputs(TINY)
    with torch.no_grad():
        assert not torch.equal(student(x, t, y, torch.ones(3)),
                               student(x, t, y, torch.full((3,), 5.0)))
    # `deco sample` on the checkpoint: the torch backend takes w, one pass per step.
    from deco_export.sampling import open_pipeline

    pipe = open_pipeline(whole)
    assert pipe.backend.takes_guidance
    out = pipe.generate(class_labels=[0, 1], seed=0, steps=4, guidance=3.0, output_type="np")
    assert out.images.shape == (2, 3, 16, 16) and np.isfinite(out.images).all()
    meta = json.loads((whole / "metadata.json").read_text())
    assert meta["distillation"]["guidance_range"] == [1.0, 6.0]
    assert meta["distillation"]["guidance_interval"] == [0.1, 1.0]
    losses = [json.loads(line)["loss"] for line in
              (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(loss > 0 for loss in losses)

    # Two steps, then a resumed run to four: the same weights, bit for bit.
    distill(_config(teacher_dir, tmp_path / "split", steps=2))
    with pytest.raises(FileExistsError, match="--resume"):
        Distiller(_config(teacher_dir, tmp_path / "split"))
    with pytest.raises(ValueError, match="different lr"):
        Distiller(_config(teacher_dir, tmp_path / "split", lr=5e-4), resume=True)
    resumed = distill(_config(teacher_dir, tmp_path / "split"), resume=True)
    a, b = load_file(str(whole / "model.safetensors")), load_file(
        str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # --init-from continues the finished student at another learning rate: it starts from the
    # student's EMA weights (student and EMA alike), and its metadata keeps the earlier run's
    # record; a teacher is not a student's weights.
    more = Distiller(_config(teacher_dir, tmp_path / "more", init_from=str(whole), lr=1e-4))
    try:
        for module in (more.student, more.ema.model):
            state = module.state_dict()
            assert all(torch.equal(state[k], a[k]) for k in a)
        lineage = json.loads((more.export(tmp_path / "more" / "model") / "metadata.json")
                             .read_text())["distillation"]["init_from"]
        assert lineage["weights_sha256"] == meta["weights_sha256"]
        assert lineage["distillation"]["config"]["lr"] == 1e-3
    finally:
        more.close()
    with pytest.raises(ValueError, match="--init-from"):
        Distiller(_config(teacher_dir, tmp_path / "wrong", init_from=str(teacher_dir)))


def test_the_target_is_conditional_outside_the_teachers_guidance_interval(teacher_dir,
                                                                          tmp_path):
    run = Distiller(_config(teacher_dir, tmp_path / "run"))
    try:
        w = torch.tensor([4.0, 4.0, 4.0])
        t = torch.tensor([0.05, 0.1, 0.5])  # c2i guides on (0.1, 1]
        assert run.effective_guidance(t, w).tolist() == [1.0, 1.0, 4.0]
        x, _, y = _inputs(TINY)
        null = torch.full((3,), TINY.null_class)
        target = run.guided_velocity(x, t, y, null, run.effective_guidance(t, w))
        with torch.no_grad():
            conditional = run.teacher(x, t, y)
            unconditional = run.teacher(x, t, null)
        assert torch.allclose(target[:2], conditional[:2], atol=1e-6)
        guided = unconditional[2] + 4.0 * (conditional[2] - unconditional[2])
        assert torch.allclose(target[2], guided, atol=1e-5)
    finally:
        run.close()


def test_cli_refuses_a_bad_range_and_a_distilled_teacher(teacher_dir, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(distill_guidance, [str(teacher_dir), "--out", str(tmp_path / "a"),
                                           "--guidance-range", "one:six"])
    assert bad.exit_code != 0 and "MIN:MAX" in bad.output
    backwards = runner.invoke(distill_guidance, [str(teacher_dir), "--out",
                                                 str(tmp_path / "b"), "--guidance-range", "6:1"])
    assert backwards.exit_code == 1 and "0 <= MIN <= MAX" in backwards.output
    assert "Traceback" not in backwards.output
    student = student_from_teacher(load_model(teacher_dir)[0])
    with pytest.raises(ValueError, match="already guidance-distilled"):
        student_from_teacher(student)
