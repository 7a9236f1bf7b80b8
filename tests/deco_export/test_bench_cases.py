"""The benchmark protocols' model cases (`deco_export.bench.cases`): a case is made into a
checkpoint directory once and reused, and an unknown case is refused by name."""

from __future__ import annotations

import pytest

from deco_export.bench.cases import CASES, RANDOM_SHAPES, case_model, make_checkpoint


def test_every_random_case_is_described():
    assert set(RANDOM_SHAPES) < set(CASES) and "golden64" in CASES


def test_a_case_is_made_once_and_reused(tmp_path, golden_ckpt):
    from deco_export.sources import load_model

    path = make_checkpoint("golden64", tmp_path, seed=0, golden=golden_ckpt, made_by="a test")
    first = (path / "model.safetensors").stat().st_mtime_ns
    assert make_checkpoint("golden64", tmp_path, seed=1, golden=golden_ckpt) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == first
    model, _ = load_model(path)
    assert model.config.image_size == (64, 64)


def test_an_unknown_case_is_refused_by_name(golden_ckpt):
    with pytest.raises(ValueError, match="unknown case 'b99'"):
        case_model("b99", golden_ckpt)
