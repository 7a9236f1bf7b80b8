"""scripts/ablation.py: the evaluation order and the shared labels (its paired KID bootstrap is
`training.metrics.paired_kid_bootstrap`, tested in test_metrics.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ablation.py"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ablation_script"] = module
    spec.loader.exec_module(module)
    return module


def test_work_order_puts_curves_before_the_rest_of_the_final_set(ablation):
    plan = ablation.Plan(steps=500, eval_every=250, num_samples=1000, curve_samples=100)
    order = ablation.work_order(plan)
    assert order[:4] == [(500, 0), (500, 1), (250, 0), (250, 1)]
    assert sorted(order) == sorted({*order})  # each unit once
    assert {i for s, i in order if s == 500} == set(range(1000 // ablation.CHUNK))
    assert {i for s, i in order if s == 250} == {0, 1}


def test_labels_keep_the_held_out_mix_in_every_prefix(ablation):
    plan = ablation.Plan(num_samples=1000)
    real = np.repeat(np.arange(9), [50, 30, 80, 20, 60, 40, 50, 30, 31])
    labels = ablation.eval_labels(plan, real, 9)
    assert np.array_equal(np.bincount(labels, minlength=9),
                          np.bincount(np.sort(labels), minlength=9))
    share = np.bincount(real, minlength=9) / len(real)
    prefix = np.bincount(labels[:200], minlength=9) / 200
    assert np.abs(prefix - share).max() < 0.06
    assert np.array_equal(labels, ablation.eval_labels(plan, real, 9))  # same in every arm
