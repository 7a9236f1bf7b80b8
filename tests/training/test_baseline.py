"""Training the plain pixel DiT baseline: a few steps through deco train, EMA export, loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from deco_export.checkpoint import load_pretrained
from deco_export.model import PixelDiT
from training.cli import train as train_command
from training.metrics import load_generator


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c in ("red", "blue"):
        (root / c).mkdir()
        for i in range(16):
            arr = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            arr[..., 0 if c == "red" else 2] = 255
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def test_baseline_trains_and_round_trips(folder, tmp_path):
    out = tmp_path / "run"
    args = [
        "--preset", "DeCo-tiny/16", "--model", "baseline", "--image-size", "16x16",
        "--data", str(folder), "--out", str(out), "--steps", "3", "--batch-size", "4",
        "--lr", "1e-3", "--threads", "1", "--sample-steps", "2", "--log-every", "1",
        "--ema-decay", "0.5", "--no-progress",
    ]  # fmt: skip
    res = CliRunner().invoke(train_command, args)
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["train"]["preset"] == "DiT-tiny/16"
    assert saved["train"]["freq_weight"] == 0.0  # flow matching alone, as the reference baseline
    assert saved["model"]["architecture"] == "dit"
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["freq"] for r in recs] == [0.0, 0.0, 0.0] and all(r["mse"] > 0 for r in recs)

    exported = load_pretrained(out / "model")
    from_run = load_generator(out / "checkpoints" / "step_0000003")
    assert isinstance(exported, PixelDiT) and isinstance(from_run, PixelDiT)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0.2, 0.7]), torch.tensor([0, 1])
    with torch.no_grad():
        v = exported(x, t, y)
        assert torch.equal(v, from_run(x, t, y))
    assert torch.count_nonzero(v) > 0  # the zero-initialised final layer has learned


def test_explicit_frequency_weight_wins_for_the_baseline(folder, tmp_path):
    out = tmp_path / "run"
    args = [
        "--preset", "DiT-tiny/16", "--image-size", "16x16", "--data", str(folder),
        "--out", str(out), "--steps", "1", "--batch-size", "4", "--threads", "1",
        "--sample-steps", "1", "--freq-weight", "0.5", "--no-progress",
    ]  # fmt: skip
    res = CliRunner().invoke(train_command, args)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "train_config.json").read_text())["train"]["freq_weight"] == 0.5
