"""Faults and bad input, third round (docs/reliability.md, cases 13 and on).

Training that turns NaN, concurrent runs into one directory, verbs writing over a user's files,
pipelines shared across threads, a tampered text path, requests too large for memory, signals
during an export and options checked only after the work. Concurrency, signal and memory cases
run real processes; memory limits are set inside the child (``resource.setrlimit``), never on
the machine.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from tests.deco_export.test_faults import DECO, ENV, cli, deco, one_line_error, tree

# ---------------------------------------------------------------------------------------------
# Training


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two classes of 16x16 RGB images: enough for a batch of 4."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in ("red", "blue"):
        (root / c).mkdir()
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                root / c / f"{i}.png")
    return root


def train_args(images: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "DeCo-tiny/16", "--image-size", "16x16", "--data", str(images),
            "--out", str(out), "--steps", "8", "--batch-size", "4", "--threads", "1",
            "--sample-steps", "2", "--log-every", "1", "--no-progress", *extra]


def finite_checkpoint(step_dir: Path) -> bool:
    return all(np.isfinite(v).all() for name in ("model", "ema")
               for v in load_file(str(step_dir / f"{name}.safetensors")).values())


def test_training_stops_at_the_first_non_finite_loss_and_keeps_the_last_good_checkpoint(
        images, tmp_path):
    # --lr 2 turns the tiny model's loss NaN at step 4; --keep 2 used to rotate every finite
    # checkpoint away, leaving two NaN ones and an error blaming --guidance.
    out = tmp_path / "run"
    result = deco(*train_args(images, out, "--lr", "2", "--ckpt-every", "1", "--keep", "2"))
    line = one_line_error(result, "training stopped at step", "not finite", "--lr 2")
    step = int(line.split("step ")[1].split(":")[0])
    assert 1 < step < 8, line
    kept = sorted((out / "checkpoints").iterdir())
    assert kept and all(finite_checkpoint(p) for p in kept), kept
    assert kept[-1].name == f"step_{step - 1:07d}"
    logged = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert max(logged) == step - 1  # nothing logged after the stop
    assert not (out / "model").exists()  # no NaN EMA export


def test_an_overflowing_first_step_blames_the_loss_settings(images, tmp_path):
    # 1e39 is a finite number, but the weighted float32 frequency loss overflows at step 1.
    line = one_line_error(cli(*train_args(images, tmp_path / "run", "--freq-weight", "1e39")),
                          "step 1:", "--freq-weight")
    assert "--lr" not in line
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))


@pytest.mark.parametrize("flag, value, words", [
    ("--freq-weight", "nan", "--freq-weight must be a finite number"),
    ("--repa-weight", "inf", "--repa-weight must be a finite number"),
    ("--grad-clip", "nan", "--grad-clip must be a finite number"),
    ("--sample-cfg", "nan", "--sample-cfg must be a finite number"),
    ("--time-shift", "0", "--time-shift must be > 0"),
    ("--log-every", "0", "--log-every must be a positive integer"),
])
def test_training_options_are_checked_before_any_work(images, tmp_path, flag, value, words):
    one_line_error(cli(*train_args(images, tmp_path / "run", flag, value)), words)
    assert not (tmp_path / "run").exists()


def test_two_trainings_into_one_directory_do_not_both_run(images, tmp_path):
    out = tmp_path / "runs" / "C"
    first = subprocess.Popen(
        [*DECO, *train_args(images, out, "--steps", "400", "--ckpt-every", "0",
                            "--sample-every", "0")],
        env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (out / "log.jsonl").exists():  # the first run is past its start-up
            assert first.poll() is None, first.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        second = deco(*train_args(images, out, "--steps", "2"))
        one_line_error(second, str(out), "being trained by another process", "--resume")
        assert first.poll() is None  # the first run goes on undisturbed
        first.send_signal(signal.SIGINT)
        assert "interrupted" in first.communicate(timeout=120)[0]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["C"]  # the lock is released


# ---------------------------------------------------------------------------------------------
# deco bench --out


@pytest.mark.parametrize("name", ["bench.md", "bench.json", "logs/torch-reference.log"])
def test_bench_never_overwrites_files_it_did_not_write(tmp_path, name):
    out = tmp_path / "mine"
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).write_text("my notes\n")
    before = tree(out)
    one_line_error(cli("bench", "default", "--out", out, "--backends", "torch", "--quick"),
                   str(out), name.split("/")[0], "did not write")
    assert tree(out) == before


def test_bench_writes_again_into_its_own_output(tmp_path):
    from deco_export.bench.run import MARKER, SCHEMA, check_out_dir

    out = tmp_path / "b"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    check_out_dir(out)  # no name of ours: fine
    (out / "bench.json").write_text(json.dumps({"schema": SCHEMA}))
    (out / "bench.md").write_text("old table")
    check_out_dir(out)  # an earlier run's report
    (out / "bench.json").unlink()
    (out / MARKER).touch()
    check_out_dir(out)  # an earlier run that failed before its report
