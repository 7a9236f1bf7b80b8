"""Trainer: exact resume, crash-safe checkpoints, DDP equivalence, outputs and EMA export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file

from tests.helpers import REPO
from training.state import latest_checkpoint, list_checkpoints, load_checkpoint
from training.trainer import TrainConfig, export_ema, train


class TinyEncoder(nn.Module):
    """A frozen 'vision encoder' with 2x2 patches and 12-d tokens, for REPA."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(2).transpose(1, 2)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    rng = np.random.default_rng(0)
    folder = root / "data"
    for c, name in enumerate(["circles", "squares"]):
        (folder / name).mkdir(parents=True)
        for i in range(12):
            arr = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8) // (2 + c)
            Image.fromarray(arr).save(folder / name / f"{i:02d}.png")
    torch.manual_seed(0)
    enc = root / "encoder.pt"
    torch.jit.script(TinyEncoder()).save(str(enc))
    return {"data": folder, "encoder": enc}


def tiny_config(assets: dict[str, Path], out: Path, **kw) -> TrainConfig:
    base = dict(
        preset="DeCo-tiny/16",
        model_overrides={"patch_size": 4},
        image_size=(16, 16),
        data=str(assets["data"]),
        out=str(out),
        steps=20,
        batch_size=8,
        grad_accum=2,
        lr=1e-3,
        warmup_steps=3,
        grad_clip=1.0,
        ema_decay=0.9,
        label_dropout=0.3,
        repa_encoder=str(assets["encoder"]),
        repa_encoder_patch=2,
        repa_layer=1,
        log_every=5,
        sample_every=0,
        ckpt_every=10,
        keep_checkpoints=0,
        sample_steps=2,
        sample_per_class=2,
        threads=1,
        progress=False,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


def checkpoint_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(step_dir.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.stem}/{k}"] = v
    return out


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_is_bit_identical(assets, tmp_path):
    straight = tmp_path / "straight"
    train(tiny_config(assets, straight, steps=20))

    split = tmp_path / "split"
    train(tiny_config(assets, split, steps=10))
    train(tiny_config(assets, split, steps=20), resume=True)

    a = checkpoint_tensors(straight / "checkpoints" / "step_0000020")
    b = checkpoint_tensors(split / "checkpoints" / "step_0000020")
    assert any(k.startswith("repa_head/diffusion_trainer.proj.0.") for k in a)
    assert_identical(a, b)
    sa = json.loads((straight / "checkpoints" / "step_0000020" / "state.json").read_text())
    sb = json.loads((split / "checkpoints" / "step_0000020" / "state.json").read_text())
    assert (sa["epoch"], sa["epoch_position"]) == (sb["epoch"], sb["epoch_position"])
    assert sa["epoch"] >= 1  # 24 images / batch 8: the run crossed epoch boundaries
    # The log continues where it stopped.
    steps = [json.loads(x)["step"] for x in (split / "log.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]
    # Outputs of a run.
    assert (straight / "loss.png").stat().st_size > 0
    assert (straight / "samples" / "step_0000020.png").is_file()


def test_resume_refuses_a_different_run(assets, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="drop --resume"):
        train(tiny_config(assets, out, steps=2), resume=True)
    train(tiny_config(assets, out, steps=2, repa_encoder=None))
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config(assets, out, steps=4, repa_encoder=None))
    with pytest.raises(ValueError, match="different lr"):
        train(tiny_config(assets, out, steps=4, repa_encoder=None, lr=5e-4), resume=True)


def test_ema_export_loads_as_deco_checkpoint(assets, tmp_path):
    from deco_export.checkpoint import read_metadata
    from deco_export.model import DeCo

    out = tmp_path / "run"
    exported = train(tiny_config(assets, out, steps=2, repa_encoder=None, ckpt_every=0))
    model = DeCo.from_pretrained(exported)
    ema = load_checkpoint(latest_checkpoint(out / "checkpoints")).ema
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema[k]), k
    assert model.config.num_classes == 2 and model.config.image_size == (16, 16)
    assert read_metadata(exported)["training"]["step"] == 2
    again = export_ema(out, tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (
        exported / "model.safetensors"
    ).read_bytes()


KILL_SCRIPT = textwrap.dedent(
    """
    import json, os, shutil, signal, sys
    import training.state as st
    from training.trainer import TrainConfig, train

    point = sys.argv[2]
    save_file, rmtree = st.save_file, shutil.rmtree

    def save_and_maybe_die(tensors, path, metadata=None):
        save_file(tensors, path, metadata=metadata)
        if point == "writing" and "step_0000004" in path and path.endswith("ema.safetensors"):
            os.kill(os.getpid(), signal.SIGKILL)

    def rmtree_and_die(path, *a, **k):
        if point == "pruning" and ".trash-step_0000002" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)
        return rmtree(path, *a, **k)

    st.save_file = save_and_maybe_die
    shutil.rmtree = rmtree_and_die
    train(TrainConfig.from_dict(json.loads(sys.argv[1])))
    """
)


@pytest.mark.parametrize("point", ["writing", "pruning"])
def test_kill_while_saving_keeps_a_loadable_checkpoint(assets, tmp_path, point):
    out = tmp_path / "run"
    cfg = tiny_config(
        assets, out, steps=6, ckpt_every=2, keep_checkpoints=1, repa_encoder=None, log_every=1
    )
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(cfg.to_dict()), point],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = list_checkpoints(out / "checkpoints")
    expected = "step_0000002" if point == "writing" else "step_0000004"
    assert [p.name for p in ckpts] == [expected]
    data = load_checkpoint(ckpts[-1])
    assert data.step == int(expected[-1])
    assert data.ema.keys() == data.model.keys()
    # The run continues from there, cleans up the debris of the interrupted save and redoes
    # the log records written after the checkpoint.
    train(cfg, resume=True)
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_0000006"]


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from training.trainer import TrainConfig, train
    train(TrainConfig.from_dict(json.loads(sys.argv[1])))
    """
)


def test_ddp_two_processes_match_one(assets, tmp_path):
    kw = dict(steps=3, batch_size=8, grad_accum=1, ckpt_every=0, log_every=1, warmup_steps=0)
    single = tiny_config(assets, tmp_path / "one", **kw)
    double = tiny_config(assets, tmp_path / "two", **kw)
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    # The launcher keeps its per-run log directory (torchelastic_*) in TMPDIR after it exits.
    launcher_tmp = tmp_path / "launcher-tmp"
    launcher_tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "TMPDIR": str(launcher_tmp)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(script), json.dumps(double.to_dict())],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(single)

    a = checkpoint_tensors(tmp_path / "one" / "checkpoints" / "step_0000003")
    b = checkpoint_tensors(tmp_path / "two" / "checkpoints" / "step_0000003")
    assert {k for k in a if not k.startswith("rng/")} == {k for k in b if not k.startswith("rng/")}
    assert "rng/rank1.cpu" in b  # every rank's RNG state is saved
    for k in a:
        if not k.startswith("rng/"):
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    # The weights did move (EMA lags the online weights), so the agreement is not vacuous.
    assert any(not torch.equal(a[k], a["ema/" + k[6:]]) for k in a if k.startswith("model/"))
    la = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    for ra, rb in zip(la, lb, strict=True):
        for key in ("loss", "mse", "freq", "repa"):
            assert abs(ra[key] - rb[key]) <= 1e-5 * max(1.0, abs(ra[key])), (key, ra, rb)

    # A 2-process run resumes on 1 process from the same global data position.
    train(tiny_config(assets, tmp_path / "one", **{**kw, "steps": 5}), resume=True)
    train(tiny_config(assets, tmp_path / "two", **{**kw, "steps": 5}), resume=True)
    a = checkpoint_tensors(tmp_path / "one" / "checkpoints" / "step_0000005")
    b = checkpoint_tensors(tmp_path / "two" / "checkpoints" / "step_0000005")
    for k in a:
        if not k.startswith("rng/"):
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
