"""Faults and bad input, as a hostile new user would try them (docs/reliability.md lists them).

Every verb must write only where it may, change a bundle all-or-nothing, refuse input that
would end as a black image or a traceback, and say in one line what is wrong and how to fix
it. Kill and concurrency cases run real ``deco`` processes and real signals.

Models are the golden tiny fixture (DeCo-tiny/16 at 64x64); one ONNX bundle is exported per
session and copied where a test changes it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import runtimes
from deco_export.checkpoint import (
    CheckpointError,
    load_pretrained,
    read_metadata,
    save_pretrained,
)
from deco_export.cli import main
from deco_export.export.bundle_io import BundleTransaction
from deco_export.sources import load_model
from runtimes import bundle as rb
from runtimes import fileio, locks, staging
from runtimes.graphs import graphs_for
from runtimes.sampler import SampleDiverged
from tests.helpers import GOLDEN_CKPT, REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
DECO = [sys.executable, "-c", "import sys; from deco_export.cli import main; sys.exit(main())"]


# ---------------------------------------------------------------------------------------------
# Helpers and shared models


def deco(*args: str, cwd: Path | None = None, env: dict | None = None,
         timeout: float = 600) -> subprocess.CompletedProcess:
    """``deco ARGS`` in a fresh interpreter (the worktree's code first on the path)."""
    return subprocess.run([*DECO, *args], cwd=cwd, env={**ENV, **(env or {})}, text=True,
                          capture_output=True, timeout=timeout)


def cli(*args: str):
    """``deco ARGS`` in this process (the same click group, no interpreter start-up)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *needles: str) -> str:
    """Assert a non-zero exit with exactly one 'Error: ...' line and no traceback."""
    output = result.output if hasattr(result, "output") else result.stdout + result.stderr
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert code != 0, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, output
    line = errors[0]
    for needle in needles:
        assert needle in line, line
    return line


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (to show that nothing changed)."""
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


def staging_left(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".staging-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="session")
def ckpt(golden_ckpt_dir) -> Path:
    """The golden tiny model as a checkpoint directory."""
    return golden_ckpt_dir


@pytest.fixture(scope="session")
def other_ckpt(tmp_path_factory, golden_model) -> Path:
    """Same shapes, other weights: what `deco validate` fails at 27.9 dB when mixed."""
    model = load_pretrained(save_pretrained(
        golden_model, tmp_path_factory.mktemp("o") / "copy", source="golden"))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05)
    return save_pretrained(model, tmp_path_factory.mktemp("other") / "other", source="other")


@pytest.fixture(scope="session")
def session_bundle(c2i_bundle) -> Path:
    """An fp32 ONNX bundle of ``ckpt``, exported under umask 022."""
    return c2i_bundle


@pytest.fixture
def bundle(tmp_path, session_bundle) -> Path:
    """A private copy of the session bundle."""
    out = tmp_path / "bundle"
    shutil.copytree(session_bundle, out, symlinks=True)
    return out


def _stage(txn: BundleTransaction, name: str, data: bytes, precision: str) -> None:
    """Put a file into a transaction as an artifact (the transaction treats artifacts as
    opaque files; parity is each exporter's business)."""
    path = txn.staging / name
    path.write_bytes(data)
    txn.add_artifact(runtime="onnx", graph="decoder", precision=precision, path=path,
                     inputs=[], outputs=[])


def _transaction(bundle: Path, ckpt: Path) -> BundleTransaction:
    model, source = load_model(ckpt)
    return BundleTransaction(bundle, model.config, model.config.image_size, source)


def _rehash(bundle: Path, rel: str) -> None:
    """Update manifest.json to the file's current hash and size, as an attacker would."""
    manifest = rb.read_manifest(bundle)
    for art in manifest.artifacts:
        if art.file == rel:
            art.sha256 = fileio.sha256_path(bundle / rel)
            art.bytes = fileio.path_size(bundle / rel)
    rb.write_manifest(bundle, manifest)


def _edit_manifest(bundle: Path, edit) -> None:
    path = bundle / rb.MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------
# 1. `deco convert` never deletes a user's files


def test_convert_refuses_a_directory_with_user_files(tmp_path):
    target = tmp_path / "p"
    (target / "photos").mkdir(parents=True)
    (target / "notes.txt").write_text("x")
    line = one_line_error(cli("convert", GOLDEN_CKPT, target), str(target), "--force")
    assert "not a DeCo checkpoint" in line
    assert (target / "notes.txt").read_text() == "x" and (target / "photos").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_convert_into_an_empty_directory(tmp_path):
    (tmp_path / "p").mkdir()
    result = cli("convert", GOLDEN_CKPT, tmp_path / "p")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "config.json", "metadata.json", "model.safetensors"]


def test_convert_replaces_its_own_conversion_of_the_same_file(tmp_path):
    assert cli("convert", GOLDEN_CKPT, tmp_path / "p").exit_code == 0
    result = cli("convert", GOLDEN_CKPT, tmp_path / "p", "--weights", "online")
    assert result.exit_code == 0, result.output
    assert read_metadata(tmp_path / "p")["source_weights"] == "online"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_convert_refuses_a_checkpoint_of_another_source(tmp_path, other_ckpt):
    target = tmp_path / "p"
    shutil.copytree(other_ckpt, target)
    before = tree(target)
    one_line_error(cli("convert", GOLDEN_CKPT, target), "another source", "--force")
    assert tree(target) == before


def test_convert_force_replaces_only_once_the_new_checkpoint_is_complete(tmp_path):
    target = tmp_path / "p"
    target.mkdir()
    (target / "notes.txt").write_text("x")
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(GOLDEN_CKPT.read_bytes()[:5000])
    one_line_error(cli("convert", broken, target, "--force"), "broken.ckpt")
    assert (target / "notes.txt").read_text() == "x"
    assert cli("convert", GOLDEN_CKPT, target, "--force").exit_code == 0
    assert not (target / "notes.txt").exists() and (target / "model.safetensors").is_file()


def test_convert_never_replaces_the_directory_holding_its_source(tmp_path):
    target = tmp_path / "p"
    target.mkdir()
    shutil.copy(GOLDEN_CKPT, target / "ref.ckpt")
    one_line_error(cli("convert", target / "ref.ckpt", target, "--force"), "holds the source")
    assert (target / "ref.ckpt").read_bytes() == GOLDEN_CKPT.read_bytes()


# ---------------------------------------------------------------------------------------------
# 2. `deco export` writes only into a bundle of its own, never into the checkpoint


def test_export_refuses_a_directory_that_is_not_a_bundle(tmp_path, ckpt):
    target = tmp_path / "dir"
    target.mkdir()
    (target / "dit.onnx").write_text("my own file")
    one_line_error(cli("export", "onnx", ckpt, target), str(target), "not a deco bundle",
                   "--force")
    assert tree(target) == {"dit.onnx": b"my own file"}
    assert staging_left(tmp_path) == []


def test_export_into_the_source_checkpoint_directory_is_refused(tmp_path, ckpt):
    own = tmp_path / "ck"
    shutil.copytree(ckpt, own)
    before = tree(own)
    for extra in ((), ("--force",)):
        one_line_error(cli("export", "onnx", own, own, *extra), "source checkpoint")
    assert tree(own) == before
    load_pretrained(own)


# ---------------------------------------------------------------------------------------------
# 3. A bundle never mixes two checkpoints


def test_reexport_of_another_checkpoint_is_refused(bundle, other_ckpt):
    before = tree(bundle)
    one_line_error(cli("export", "onnx", other_ckpt, bundle, "--precision", "fp16"),
                   "another checkpoint", "--force")
    assert tree(bundle) == before


def test_force_replaces_a_bundle_of_another_checkpoint_wholesale(bundle, other_ckpt):
    result = cli("export", "onnx", other_ckpt, bundle, "--precision", "fp16", "--force",
                 "--parity-steps", "2")
    assert result.exit_code == 0, result.output
    manifest = rb.read_manifest(bundle)
    assert manifest.source["sha256"] == read_metadata(other_ckpt)["weights_sha256"]
    assert {a.precision for a in manifest.artifacts} == {"fp16"}
    assert not (bundle / "dit.onnx").exists()  # the old checkpoint's graphs went with it
    result = cli("validate", bundle, "--steps", "2")
    assert result.exit_code == 0, result.output
    assert "passed" in result.output


# ---------------------------------------------------------------------------------------------
# 4. Concurrent exports: a lock, and the manifest re-read at commit


def test_two_concurrent_exports_keep_both_precisions(tmp_path, ckpt):
    target = tmp_path / "bundle"
    procs = [subprocess.Popen(
        [*DECO, "export", "onnx", str(ckpt), str(target), "--precision", p, "--parity-steps",
         "2"], env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for p in ("fp32", "fp16")]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    codes = [p.returncode for p in procs]
    for code, out in zip(codes, outputs, strict=True):
        assert code == 0 or "being written by another process" in out, out
    manifest = rb.read_manifest(target)
    have = {(a.graph, a.precision) for a in manifest.artifacts}
    graphs = graphs_for(manifest.model)  # every graph the exporter writes for this model
    expected = {(g, p) for g in graphs for p in ("fp32", "fp16")
                if codes[("fp32", "fp16").index(p)] == 0}
    assert have == expected and len(expected) == 2 * len(graphs)
    assert rb.verify(target) == []
    assert staging_left(tmp_path) == []


def test_commit_rereads_the_manifest(bundle, ckpt):
    first, second = _transaction(bundle, ckpt), _transaction(bundle, ckpt)
    with first:
        _stage(first, "a.bin", b"a" * 10, "fp16")
        with second:
            _stage(second, "b.bin", b"b" * 20, "int8")
    manifest = rb.read_manifest(bundle)
    assert {a.precision for a in manifest.artifacts} == {"fp32", "fp16", "int8"}
    assert rb.verify(bundle) == []


def test_a_second_writer_fails_clearly_when_the_lock_stays_held(bundle, ckpt, monkeypatch):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import time; from runtimes import locks\n"
         f"with locks.lock({str(bundle)!r}):\n    print('held', flush=True); time.sleep(60)"],
        env=ENV, text=True, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv(locks.LOCK_TIMEOUT_ENV, "0.3")
        before = tree(bundle)
        with pytest.raises(locks.LockTimeout, match=f"{bundle} is being written by another"):
            with _transaction(bundle, ckpt) as txn:
                _stage(txn, "a.bin", b"a", "fp16")
        assert tree(bundle) == before
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------------------------
# 5. All-or-nothing commits, even under kill -9; no staging left forever


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists():
            return True
        time.sleep(0.0005)
    return path.exists()


def test_kill_9_during_the_commit_of_an_export_leaves_a_bundle_that_verifies(bundle, ckpt):
    old_manifest = (bundle / rb.MANIFEST_NAME).read_text()
    proc = subprocess.Popen(
        [*DECO, "export", "onnx", str(ckpt), str(bundle), "--precision", "fp16",
         "--parity-steps", "2"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = locks.lock_path(bundle)
    try:
        assert _wait_for(lock, proc), "the export finished without taking the bundle's lock"
        os.kill(proc.pid, signal.SIGSTOP)  # frozen inside the commit
        assert rb.verify(bundle) == []
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert rb.verify(bundle) == []
    text = (bundle / rb.MANIFEST_NAME).read_text()
    assert text == old_manifest or {a.precision for a in rb.read_manifest(bundle).artifacts} == {
        "fp32", "fp16"}
    with _transaction(bundle, ckpt) as txn:  # the next export removes what the dead one left
        _stage(txn, "x.bin", b"x", "int8")
    assert staging_left(bundle.parent) == []
    assert rb.verify(bundle) == []


COMMIT_LOOP = """
import sys, itertools
from deco_export.export.bundle_io import BundleTransaction
from deco_export.sources import load_model
model, source = load_model(sys.argv[2])
print("ready", flush=True)
for i in itertools.count():
    txn = BundleTransaction(sys.argv[1], model.config, model.config.image_size, source)
    with txn:
        for n in range(6):
            p = txn.staging / f"g{n}.bin"
            p.write_bytes(bytes([i % 251]) * (200_000 + i))
            txn.add_artifact(runtime="onnx", graph=("dit", "decoder", "refresh")[n % 3],
                             precision=("fp16", "int8")[n // 3], path=p, inputs=[], outputs=[])
"""


def test_kill_9_at_random_moments_of_repeated_commits(bundle, ckpt):
    rng = random.Random(0)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", COMMIT_LOOP, str(bundle), str(ckpt)],
                                env=ENV, text=True, stdout=subprocess.PIPE)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.05, 0.6))
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        assert rb.verify(bundle) == [], "the bundle did not verify after kill -9"
        assert rb.read_manifest(bundle).has_artifact("onnx", "dit", "fp32")
    staging.clean_stale(bundle)
    assert staging_left(bundle.parent) == []


def test_stale_staging_directories_are_removed_by_the_next_export(bundle, ckpt):
    dead = bundle.parent / f".{bundle.name}.staging-99999-dead"
    dead.mkdir()
    (dead / "dit.onnx").write_bytes(b"partial")
    with _transaction(bundle, ckpt) as txn:
        assert not dead.exists()
        _stage(txn, "x.bin", b"x", "fp16")
    assert staging_left(bundle.parent) == []


def test_a_failed_export_leaves_the_bundle_untouched(bundle, ckpt):
    before = tree(bundle)
    with pytest.raises(RuntimeError, match="gate"), _transaction(bundle, ckpt) as txn:
        _stage(txn, "dit.onnx", b"half written", "fp32")
        raise RuntimeError("parity gate failed")
    assert tree(bundle) == before
    assert staging_left(bundle.parent) == []


# ---------------------------------------------------------------------------------------------
# 6. No silent black images


POISONED = "decoder.final_layer.linear.weight"


def _poison_checkpoint(src: Path, dst: Path, value: float) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    state = load_file(str(weights))
    state[POISONED].view(-1)[0] = value
    save_file(state, str(weights), metadata={"format": "pt"})
    meta = read_metadata(dst)
    meta["weights_sha256"] = fileio.sha256_file(weights)  # consistent, so only values are wrong
    (dst / "metadata.json").write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load(tmp_path, ckpt, value):
    bad = _poison_checkpoint(ckpt, tmp_path / "bad", value)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_pretrained(bad)
    one_line_error(cli("sample", bad, "--steps", "2", "--out", tmp_path / "x.png"),
                   POISONED)
    assert not (tmp_path / "x.png").exists()


def test_convert_refuses_inf_weights(tmp_path):
    ckpt = torch.load(GOLDEN_CKPT, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt)
    key = next(k for k in state if k.startswith("ema_denoiser.") and k.endswith("weight"))
    state[key].view(-1)[0] = float("inf")
    bad = tmp_path / "inf.ckpt"
    torch.save(ckpt, bad)
    one_line_error(cli("convert", bad, tmp_path / "out"), "non-finite")
    assert not (tmp_path / "out").exists()


def test_huge_guidance_stops_with_sample_diverged(tmp_path, ckpt):
    out = tmp_path / "x.png"
    line = one_line_error(cli("sample", ckpt, "--steps", "4", "--guidance", "1e38", "--out",
                              out), "sample diverged at step")
    assert "--guidance" in line
    assert not out.exists()


def test_infinite_shift_is_refused(tmp_path, ckpt):
    one_line_error(cli("sample", ckpt, "--steps", "4", "--shift", "inf", "--out",
                       tmp_path / "x.png"), "shift must be a finite number")
    assert not (tmp_path / "x.png").exists()


def test_noise_times_1e30_diverges(session_bundle):
    with runtimes.load(session_bundle) as pipe:
        noise = runtimes.sample_noise(0, 1, 3, 64, 64) * np.float32(1e30)
        with pytest.raises(SampleDiverged, match="sample diverged at step"):
            pipe.generate(class_labels=[1], steps=3, noise=noise, output_type="np")


class _Exploding:
    """A backend whose velocity turns NaN after ``after`` decoder calls (a model that
    diverges mid-run), to show when the sampler notices."""

    def __init__(self, after: int) -> None:
        self.after, self.calls = after, 0

    def dit(self, x_t, t, y):
        return np.zeros((x_t.shape[0], 4, 8), np.float32)

    def decoder(self, x_t, cond):
        self.calls += 1
        v = np.zeros_like(x_t)
        return v * np.nan if self.calls > self.after else v

    def from_numpy(self, a):
        return a

    def to_numpy(self, a):
        return np.asarray(a)

    def concat(self, arrays):
        return np.concatenate(arrays)


def test_divergence_is_caught_within_a_few_steps():
    backend = _Exploding(after=2)
    with pytest.raises(SampleDiverged, match=r"at step 10 of 200 \(\d+ NaN/inf values\)"):
        runtimes.sample(backend, np.zeros((1, 3, 8, 8), np.float32), [0],
                        runtimes.SamplerConfig(num_steps=200), null_class=3)
    assert backend.calls == 10  # stopped at the first check, not after 200 steps


# ---------------------------------------------------------------------------------------------
# 7. `deco train` refuses nonsense lengths and foreign directories


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_train_refuses_steps_that_train_nothing(tmp_path, steps):
    from training.cli import train

    result = CliRunner().invoke(train, ["--out", str(tmp_path / "run"), "--steps", steps,
                                        "--preset", "DeCo-tiny/16"])
    one_line_error(result, "--steps must be a positive integer")
    assert not (tmp_path / "run").exists()


def test_train_refuses_an_out_directory_that_is_not_a_run(tmp_path):
    from training.cli import train

    out = tmp_path / "run"
    out.mkdir()
    (out / "thesis.tex").write_text("x")
    data = _image_folder(tmp_path / "data")
    result = CliRunner().invoke(train, ["--out", str(out), "--steps", "1", "--data", str(data),
                                        "--preset", "DeCo-tiny/16", "--image-size", "16",
                                        "--batch-size", "2", "--no-progress"])
    one_line_error(result, "not a training run", "thesis.tex")
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def _image_folder(root: Path, corrupt: bool = False) -> Path:
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), (40 * i, 90, 200)).save(root / c / f"{i}.png")
    if corrupt:
        (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def test_a_corrupt_image_in_a_training_folder_is_named(tmp_path):
    from training.data import ImageFolder

    data = _image_folder(tmp_path / "data", corrupt=True)
    folder = ImageFolder(data, (16, 16), split="train", holdout=0.0)
    with pytest.raises(ValueError, match=r"broken\.png: cannot read this image"):
        [folder[i] for i in range(len(folder))]


# ---------------------------------------------------------------------------------------------
# 8. One line instead of a traceback


def _config_with(tmp_path: Path, ckpt: Path, **changes) -> Path:
    out = tmp_path / "ck"
    shutil.copytree(ckpt, out)
    config = json.loads((out / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("key,value", [("hidden_size", "64"), ("num_heads", 2.5),
                                       ("patch_size", 0)])
def test_a_mistyped_config_json_is_named(tmp_path, ckpt, key, value):
    bad = _config_with(tmp_path, ckpt, **{key: value})
    one_line_error(cli("sample", bad, "--steps", "2", "--out", tmp_path / "x.png"),
                   "config.json", key)


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d["model"].update(patch_size=0), "patch_size must be a positive integer"),
    (lambda d: d["sampler_defaults"].update(guidance_interval=[0.1, 5]), "guidance_interval"),
    (lambda d: d["artifacts"][0].update(bytes="abc"), "bytes must be a non-negative integer"),
    (lambda d: d["artifacts"][0].update(sha256=17), "sha256 must be 64 hex digits"),
], ids=["patch_size-0", "guidance_interval-5", "bytes-abc", "sha256-int"])
def test_malformed_manifest_fields_are_named(tmp_path, bundle, edit, needle):
    _edit_manifest(bundle, edit)
    one_line_error(cli("sample", bundle, "--steps", "2", "--out", tmp_path / "x.png"),
                   "manifest.json", needle)
    one_line_error(cli("validate", bundle, "--hashes-only"), needle)


def test_a_manifest_without_artifacts_does_not_validate(bundle):
    _edit_manifest(bundle, lambda d: d.update(artifacts=[]))
    one_line_error(cli("validate", bundle, "--hashes-only"), "lists no artifacts")


def test_another_models_graph_with_a_rehashed_manifest_is_refused_at_load(tmp_path, bundle):
    from deco_export import DeCo, get_preset
    from deco_export.export.graphs import example_inputs, graph_modules
    from deco_export.export.onnx import export_graph

    other = DeCo(get_preset("DeCo-tiny/16", hidden_size=32, num_heads=2, dit_depth=1)).eval()
    inputs = example_inputs(other, "dit", 2, 64, 64, seed=0)
    export_graph(graph_modules(other, "fp32")["dit"], "dit", inputs, tmp_path / "dit.onnx", 18,
                 False)
    shutil.copy(tmp_path / "dit.onnx", bundle / "dit.onnx")
    _rehash(bundle, "dit.onnx")
    assert rb.verify(bundle) == []
    one_line_error(cli("sample", bundle, "--steps", "2", "--out", tmp_path / "x.png"),
                   "dit.onnx", "belongs to another model")


@pytest.mark.parametrize("steps", ["0", "-1", "1000000000000", "10000000"])
def test_sample_steps_out_of_bounds_are_refused_at_once(tmp_path, ckpt, steps):
    started = time.monotonic()
    one_line_error(cli("sample", ckpt, "--steps", steps, "--out", tmp_path / "x.png"), "steps")
    assert time.monotonic() - started < 30
    assert not (tmp_path / "x.png").exists()


def test_out_in_an_unwritable_place_is_one_line_naming_it(tmp_path, ckpt):
    result = deco("sample", str(ckpt), "--steps", "2", "--out", "/sys/x.png")
    line = one_line_error(result, "/sys/x.png")
    assert "permission" in line.lower() or "read-only" in line.lower()


def test_export_to_an_unwritable_place_is_one_line_naming_it(tmp_path, ckpt):
    line = one_line_error(cli("export", "onnx", ckpt, "/sys/deco-bundle"), "/sys/deco-bundle")
    assert "permission" in line.lower() or "read-only" in line.lower()


def test_deco_debug_shows_the_traceback(tmp_path, ckpt):
    result = deco("sample", str(ckpt), "--steps", "2", "--out", "/sys/x.png",
                  env={"DECO_DEBUG": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_convert_into_the_current_directory_is_refused(tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    one_line_error(cli("convert", GOLDEN_CKPT, "."), "current directory")
    assert list(here.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 9. Missing config keys are named, never filled with DeCo-XL defaults


@pytest.mark.parametrize("key", ["image_size", "hidden_size"])
def test_a_missing_config_key_is_named(tmp_path, ckpt, key):
    bad = _config_with(tmp_path, ckpt, **{key: None})
    one_line_error(cli("sample", bad, "--steps", "2", "--out", tmp_path / "x.png"),
                   "config.json", key)
    assert not (tmp_path / "x.png").exists()


def test_bad_json_names_the_file(tmp_path, ckpt):
    bad = tmp_path / "ck"
    shutil.copytree(ckpt, bad)
    (bad / "config.json").write_text("{not json")
    one_line_error(cli("sample", bad, "--steps", "2", "--out", tmp_path / "x.png"),
                   str(bad / "config.json"))


# ---------------------------------------------------------------------------------------------
# 10. Deployed files follow the umask


def _modes(root: Path) -> set[tuple[str, int]]:
    return {("d" if p.is_dir() else "f", stat.S_IMODE(p.stat().st_mode))
            for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask,dirs,files", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_convert_follows_the_umask(tmp_path, umask, dirs, files):
    old = os.umask(umask)
    try:
        assert cli("convert", GOLDEN_CKPT, tmp_path / "ck").exit_code == 0
    finally:
        os.umask(old)
    assert _modes(tmp_path / "ck") == {("d", dirs), ("f", files)}


def test_an_exported_bundle_follows_the_umask(session_bundle):
    assert _modes(session_bundle) == {("d", 0o755), ("f", 0o644)}


# ---------------------------------------------------------------------------------------------
# 11. Symlinks never lead out of a bundle


def test_a_symlinked_artifact_is_refused_without_its_targets_size(bundle, tmp_path):
    (bundle / "decoder.onnx").unlink()
    (bundle / "decoder.onnx").symlink_to("/etc/passwd")
    _rehash(bundle, "decoder.onnx")  # the attacker re-hashes; the link is still refused
    problems = rb.verify(bundle)
    assert len(problems) == 1 and "decoder.onnx" in problems[0]
    assert "symbolic link" in problems[0]
    assert str(Path("/etc/passwd").stat().st_size) not in problems[0]
    with pytest.raises(rb.BundleError, match="symbolic link"):
        runtimes.load(bundle)
    one_line_error(cli("validate", bundle, "--hashes-only"), "symbolic link")


def test_an_artifact_under_a_symlinked_directory_is_refused(bundle, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(bundle / "refresh.onnx", outside / "refresh.onnx")
    (bundle / "sub").symlink_to(outside)
    _edit_manifest(bundle, lambda d: [a.update(file="sub/refresh.onnx")
                                      for a in d["artifacts"] if a["graph"] == "refresh"])
    problems = rb.verify(bundle)
    assert problems and "sub is a symbolic link" in problems[0]


# ---------------------------------------------------------------------------------------------
# 12. Smaller promises


def test_make_demo_installs_what_draws_the_plots():
    makefile = (REPO / "Makefile").read_text()
    demo = makefile.split("\ndemo:")[1].split("\n\n")[0]
    wanted = demo.split('-e ".[')[1].split("]")[0].split(",")
    extras = {}  # name = [...] lines of [project.optional-dependencies]
    section = (REPO / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1]
    section = section.split("\n[")[0]
    for line in section.splitlines():
        if " = [" in line and not line.startswith("#"):
            name, _, deps = line.partition(" = ")
            extras[name.strip()] = deps
    assert any("matplotlib" in extras[name] for name in wanted), (wanted, extras)


def test_out_jpg_writes_a_jpeg(tmp_path, ckpt):
    out = tmp_path / "x.jpg"
    result = cli("sample", ckpt, "--steps", "2", "--classes", "1", "--out", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:3] == b"\xff\xd8\xff"


def test_out_with_an_unknown_extension_is_refused_before_sampling(tmp_path, ckpt):
    one_line_error(cli("sample", ckpt, "--steps", "2", "--out", tmp_path / "x.txt"),
                   "unknown image type '.txt'")
    assert not (tmp_path / "x.txt").exists()


@pytest.mark.parametrize("kwargs,needle", [
    ({"steps": 2.7}, "steps must be a positive integer"),
    ({"steps": True}, "steps must be a positive integer"),
    ({"seed": 1.5}, "seed must be a non-negative integer"),
    ({"seed": [0, True]}, "seeds must be non-negative integers"),
], ids=["steps-2.7", "steps-True", "seed-1.5", "seed-list-True"])
def test_api_refuses_non_integer_steps_and_seeds(session_bundle, kwargs, needle):
    with runtimes.load(session_bundle) as pipe, pytest.raises(ValueError, match=needle):
        pipe.generate(class_labels=[1, 2], output_type="np", **{"steps": 2, **kwargs})


def test_load_of_a_file_says_it_is_not_a_bundle_directory(session_bundle):
    with pytest.raises(rb.BundleError, match="is a file, not a bundle directory"):
        runtimes.load(session_bundle / "dit.onnx")


def test_validate_on_a_moved_bundle_suggests_checkpoint(bundle):
    _edit_manifest(bundle, lambda d: d["source"].update(path="/elsewhere/tiny"))
    one_line_error(cli("validate", bundle, "--steps", "2"), "/elsewhere/tiny", "--checkpoint")
