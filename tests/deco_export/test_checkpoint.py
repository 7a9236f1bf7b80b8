"""Checkpoint IO: our directory format, reference import, strictness and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from deco_export import DeCo, get_preset
from deco_export.checkpoint import (
    CheckpointError,
    load_pretrained,
    load_reference,
    read_metadata,
    save_pretrained,
    sha256_file,
)
from deco_export.cli import main


def _outputs(model: DeCo) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        return model(x, torch.tensor([0.2, 0.9]), torch.tensor([1, model.config.null_class]))


def test_convert_cli_round_trip(tmp_path, golden_ckpt, golden_model):
    out = tmp_path / "tiny"
    result = CliRunner().invoke(main, ["convert", str(golden_ckpt), str(out), "--image-size", "64"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metadata.json",
                                                     "model.safetensors"]
    meta = read_metadata(out)
    assert meta["weights_sha256"] == sha256_file(out / "model.safetensors")
    assert meta["source_sha256"] == sha256_file(golden_ckpt)
    assert meta["num_parameters"] == golden_model.num_parameters()
    reloaded = DeCo.from_pretrained(out)
    assert reloaded.config == golden_model.config
    assert torch.equal(_outputs(reloaded), _outputs(golden_model))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_online_weights_differ(golden_ckpt):
    ema = load_reference(golden_ckpt)
    online = load_reference(golden_ckpt, weights="online")
    assert not torch.equal(_outputs(ema), _outputs(online))


def test_save_pretrained_replaces_atomically(tmp_path):
    model = DeCo(get_preset("DeCo-tiny/16"))
    out = save_pretrained(model, tmp_path / "ck", source="test")
    first = read_metadata(out)["weights_sha256"]
    with torch.no_grad():
        model.dit.s_embedder.proj.bias.add_(1.0)
    save_pretrained(model, out, source="test")
    assert read_metadata(out)["weights_sha256"] != first
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_tampered_weights_are_refused(tmp_path):
    out = save_pretrained(DeCo(get_preset("DeCo-tiny/16")), tmp_path / "ck")
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        load_pretrained(out)


# --- bad input -----------------------------------------------------------------------------


def test_truncated_checkpoint(tmp_path, golden_ckpt):
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(golden_ckpt.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint|cannot read"):
        load_reference(bad)


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.ckpt"
    bad.write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_reference(bad)


def test_pickle_with_objects_is_refused(tmp_path):
    bad = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {}, "cfg": Path("x")}, bad)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_reference(bad)


def test_other_architecture_lists_every_problem(tmp_path, golden_ckpt):
    ckpt = torch.load(golden_ckpt, weights_only=True)
    sd = ckpt["state_dict"]
    del sd["ema_denoiser.blocks.1.norm1.weight"]
    sd["ema_denoiser.blocks.0.attn.qkv.bias"] = torch.zeros(192)
    sd["ema_denoiser.dec_net.input_proj.bias"] = torch.zeros(31)
    bad = tmp_path / "other.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError) as info:
        load_reference(bad)
    text = str(info.value)
    assert "missing dit.blocks.1.norm1.weight" in text
    assert "unexpected dit.blocks.0.attn.qkv.bias" in text
    assert "mis-shaped decoder.input_proj.bias" in text


def test_checkpoint_without_deco_tensors(tmp_path):
    bad = tmp_path / "resnet.ckpt"
    torch.save({"state_dict": {"model.fc.weight": torch.zeros(2, 2)}}, bad)
    with pytest.raises(CheckpointError, match="no 'ema_denoiser"):
        load_reference(bad)


@pytest.mark.parametrize("args, message", [
    (["convert", "missing.ckpt", "out"], "does not exist"),
    (["convert", "{notes}", "out"], "not a PyTorch checkpoint"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    notes = tmp_path / "notes.ckpt"
    notes.write_text("hello")
    args = [a.replace("{notes}", str(notes)).replace("out", str(tmp_path / "out")) for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_console_script_exits_nonzero_without_traceback(tmp_path):
    deco = shutil.which("deco", path=str(Path(sys.executable).parent))
    assert deco, "the deco console script is installed with the package"
    proc = subprocess.run([deco, "convert", str(tmp_path / "nope.ckpt"), str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "does not exist" in proc.stderr


def test_metadata_is_json(tmp_path):
    out = save_pretrained(DeCo(get_preset("DeCo-tiny/16")), tmp_path / "ck", source="unit")
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["source"] == "unit"
    assert meta["package_version"]
