"""Faults and bad input, third round (docs/reliability.md, cases 13 and on).

Training that turns NaN, concurrent runs into one directory, verbs writing over a user's files,
pipelines shared across threads, a tampered text path, requests too large for memory, signals
during an export and options checked only after the work. Concurrency, signal and memory cases
run real processes; memory limits are set inside the child (``resource.setrlimit``), never on
the machine.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from tests.deco_export.test_faults import DECO, ENV, cli, deco, one_line_error, tree
from tests.helpers import GaussianFlowBackend, interruptible

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
        [*DECO, *train_args(images, out, "--steps", "100000", "--ckpt-every", "0",
                            "--sample-every", "0")],
        env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        preexec_fn=interruptible)
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


# ---------------------------------------------------------------------------------------------
# One pipeline, many threads


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "torch"])
def test_one_pipeline_is_safe_to_share_across_threads(c2i_bundle, backend):
    # OpenVINO's one infer request per graph was shared: 3 of 3 runs gave wrong images.
    if backend == "openvino":
        pytest.importorskip("openvino")
    import runtimes

    options = {"threads": 1} if backend == "openvino" else {}
    with runtimes.load(c2i_bundle, backend=backend, **options) as pipe:
        def one(seed: int) -> np.ndarray:
            return np.asarray(pipe.generate(class_labels=[seed % 3], seed=seed, steps=3,
                                            output_type="np").images)

        seeds = list(range(6))
        alone = [one(s) for s in seeds]
        for _ in range(3):
            with ThreadPoolExecutor(len(seeds)) as pool:
                together = list(pool.map(one, seeds))
            for seed, a, b in zip(seeds, alone, together, strict=True):
                assert np.abs(a - b).max() <= 1e-5, (backend, seed)


# ---------------------------------------------------------------------------------------------
# The text path of a text-to-image bundle


@pytest.fixture(scope="module")
def t2i_bundle(t2i_text_bundle) -> Path:
    """The golden T2I model with a tiny random Qwen3 (48 wide) as its text encoder and the
    empty negative prompt encoded by it (shared: see tests/conftest.py)."""
    return t2i_text_bundle


@pytest.fixture
def t2i_copy(tmp_path, t2i_bundle) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(t2i_bundle, out)
    return out


def rehash(bundle: Path, rel: str) -> None:
    """Rewrite manifest.json with the file's current hash and size, as an attacker would."""
    from runtimes import bundle as rb
    from runtimes import fileio

    manifest = rb.read_manifest(bundle)
    sha, size = fileio.sha256_path(bundle / rel), fileio.path_size(bundle / rel)
    for art in manifest.artifacts:
        if art.file == rel:
            art.sha256, art.bytes = sha, size
        if rel in art.extra_files:
            art.extra_files[rel], art.extra_bytes[rel] = sha, size
    text = manifest.text
    if text is not None and text.embeds_file == rel:
        raw = dict(text.to_dict())
        raw["negative_prompt_embeds"] = {**raw["negative_prompt_embeds"], "sha256": sha,
                                         "bytes": size}
        manifest.text = rb.TextSection.from_dict(raw)
    rb.write_manifest(bundle, manifest)


def test_eight_threads_making_the_first_prompt_call_together(t2i_bundle):
    # The session was opened without a lock: 8 of 10 runs crashed with AttributeError.
    import runtimes

    for _ in range(5):
        pipe = runtimes.load(t2i_bundle)
        barrier = threading.Barrier(8)

        def encode(i: int, pipe=pipe, barrier=barrier) -> np.ndarray:
            barrier.wait()
            return pipe.text_encoder.encode([f"a photo of cat {i % 2}"])

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(encode, range(8)))
        for i, features in enumerate(got):
            assert np.array_equal(features, got[i % 2])


def test_a_text_encoder_swapped_after_load_is_refused(t2i_copy):
    import runtimes
    from runtimes.bundle import BundleError

    pipe = runtimes.load(t2i_copy)
    onnx = t2i_copy / "text_encoder.onnx"
    data = bytearray(onnx.read_bytes())
    data[-100] ^= 0xFF  # same size, other bytes
    onnx.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="text_encoder.onnx: sha256 does not match"):
        pipe.generate(prompt="a cat", steps=2, output_type="np")


def test_a_prompt_that_is_not_valid_text_is_refused_in_one_line(t2i_bundle, tmp_path):
    # A byte the locale cannot decode reaches Python as a lone surrogate: was a traceback.
    result = deco("sample", t2i_bundle, "--prompt", "a cat \udcff", "--steps", "2",
                  "--out", tmp_path / "x.png")
    one_line_error(result, "not valid text", "UTF-8")
    assert not (tmp_path / "x.png").exists()


def _alter_an_initializer(path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    onnx.save(model, str(path))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _replace_the_negative_prompt(bundle: Path) -> None:
    path = bundle / "negative_prompt.npy"
    np.save(path, np.roll(np.load(path), 1, axis=-1))  # other features, same shape and scale


@pytest.mark.parametrize("damage, rel, words", [
    (_truncate, "text_encoder.onnx", "ONNX Runtime cannot open it"),
    (_alter_an_initializer, "text_encoder.onnx", "differs from the PyTorch encoder"),
    (_replace_the_negative_prompt, "negative_prompt.npy", "fresh encoding of the stored negative"),
])
def test_validate_reruns_the_text_paths_gate(t2i_copy, damage, rel, words):
    # With the hashes rewritten, validate used to pass all three.
    damage(t2i_copy / rel) if rel.endswith(".onnx") else damage(t2i_copy)
    rehash(t2i_copy, rel)
    one_line_error(cli("validate", t2i_copy, "--steps", "2"), rel, words)


def test_validate_passes_an_intact_text_path(t2i_bundle):
    result = cli("validate", t2i_bundle, "--steps", "2")
    assert result.exit_code == 0, result.output
    assert "text encoder: 4 prompts" in result.output and "negative prompt" in result.output


# ---------------------------------------------------------------------------------------------
# Flags that do not apply, images and output files


@pytest.mark.parametrize("args, words", [
    (["sample", "default-t2i", "--prompt", "a cat", "--classes", "1"],
     "--classes is for class-conditional models"),
    (["sample", "default-t2i", "--prompt", "a cat", "--negative-prompt", "blurry",
      "--negative-prompt", "dark"], "--negative-prompt was given 2 times"),
    (["export", "onnx", "default", "{tmp}/b", "--negative-prompt", "blurry"],
     "--negative-prompt is for text-to-image models"),
    (["export", "onnx", "default-t2i", "{tmp}/b", "--negative-prompt", "a", "--negative-prompt",
      "b"], "--negative-prompt was given 2 times"),
    (["bench", "default", "--out", "{tmp}/o", "--prompt", "a cat"],
     "--prompt is for text-to-image bundles"),
])
def test_flags_that_do_not_apply_are_refused(tmp_path, args, words):
    result = cli(*(a.format(tmp=tmp_path) for a in args))
    one_line_error(result, words)
    assert list(tmp_path.iterdir()) == []


def test_sixteen_bit_pngs_train_as_their_gray_levels(tmp_path):
    # Pillow's convert("RGB") clips 16-bit values to 255: every image trained as white.
    from training.data import load_dataset

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            level = 16384 * (i + 1)  # a quarter, a half and three quarters of 65535
            Image.fromarray(np.full((16, 16), level, np.uint16)).save(tmp_path / c / f"{i}.png")
    data = load_dataset(str(tmp_path), "train", (16, 16), holdout=0.0)
    levels = sorted({int(data[i][0].float().mean()) for i in range(len(data))})
    assert levels == [64, 128, 191], levels  # round(16384 * k / 257)


def _png_claiming_to_be(width: int, height: int, path: Path) -> None:
    """A tiny valid PNG whose header claims ``width`` x ``height`` pixels."""
    import struct
    import zlib

    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    path.write_bytes(bytes(data))


def test_a_decompression_bomb_in_a_training_folder_is_named(images, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(images, data)
    bomb = data / "red" / "bomb.png"
    _png_claiming_to_be(40000, 40000, bomb)
    one_line_error(cli(*train_args(data, tmp_path / "run", "--steps", "2")), str(bomb),
                   "cannot read this image")


def test_out_keeps_a_private_files_mode_and_writes_through_a_symlink(tmp_path):
    private = tmp_path / "private.png"
    private.write_bytes(b"old")
    private.chmod(0o600)
    real = tmp_path / "real.png"
    real.write_bytes(b"old")
    link = tmp_path / "link.png"
    link.symlink_to(real)
    for out in (private, link):
        result = cli("sample", "default", "--steps", "1", "--classes", "0", "--out", out)
        assert result.exit_code == 0, result.output
    assert private.stat().st_mode & 0o777 == 0o600
    assert private.read_bytes()[:4] == b"\x89PNG"
    assert link.is_symlink() and real.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------
# Memory, sizes and signals (real processes; the memory limit is set inside the child)

LIMITED = """
import resource, sys
limit = int(float(sys.argv[1]) * (1 << 30))
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from deco_export.cli import main
sys.argv = ["deco", *sys.argv[2:]]
sys.exit(main())
"""


def deco_limited(gib: float, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    """``deco ARGS`` in a child whose address space is limited to ``gib`` GiB."""
    return subprocess.run([sys.executable, "-c", LIMITED, str(gib), *map(str, args)], env=ENV,
                          text=True, capture_output=True, timeout=timeout)


@pytest.mark.parametrize("args, words", [
    (["--size", "4096x4096"], "4096x4096 needs about"),
    (["--per-class", "100000"], "a grid of 900000 images"),
    (["--scale", "2000"], "--scale 2000 needs about"),
])
def test_sample_requests_beyond_the_memory_limit_are_refused_before_sampling(
        tmp_path, args, words):
    # Were a MemoryError traceback, minutes of silence, or the kernel's OOM killer.
    result = deco_limited(4, "sample", "default", *args, "--out", tmp_path / "x.png")
    line = one_line_error(result, words, "GiB", "address-space limit", "DECO_MAX_MEMORY")
    assert "sampling" not in result.stderr, line  # refused before the first step
    assert not (tmp_path / "x.png").exists()


def test_training_beyond_the_memory_limit_is_refused_before_loading_data(images, tmp_path):
    result = deco_limited(4, *train_args(images, tmp_path / "run", "--image-size", "2048x2048"))
    one_line_error(result, "training at 2048x2048", "GiB", "--batch-size")
    assert not (tmp_path / "run").exists()


def test_the_memory_limit_can_be_raised(monkeypatch):
    from runtimes.memory import MemoryLimitError, check_memory

    monkeypatch.setenv("DECO_MAX_MEMORY", "1")
    with pytest.raises(MemoryLimitError, match="DECO_MAX_MEMORY=1"):
        check_memory(2 << 30, "two GiB", "ask for less")
    monkeypatch.setenv("DECO_MAX_MEMORY", "3")
    check_memory(2 << 30, "two GiB", "ask for less")


def test_a_huge_size_range_is_planned_without_listing_every_size():
    # parity_sizes listed every height x width of 16:100000 (39 million pairs): MemoryError.
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30)); "
            "from runtimes.sizes import parse_size_range; "
            "print(parse_size_range('16:100000', (32, 32), 4).parity_sizes())")
    result = subprocess.run([sys.executable, "-c", code], env=ENV, text=True,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[(32, 32), (16, 32)]"


def test_a_file_of_the_wrong_size_is_refused_without_hashing_it(t2i_copy, monkeypatch):
    # A 20 GB tokenizer.json (no size in the manifest) was hashed in full (122 s) before being
    # refused; an export now records the sizes of extra files, checked before any hash.
    from runtimes import bundle as rb

    with open(t2i_copy / "tokenizer.json", "r+b") as fh:
        fh.truncate(20 << 30)  # sparse: 20 GB long, nothing written
    hashed: list[str] = []
    monkeypatch.setattr(rb, "sha256_path", lambda p: hashed.append(Path(p).name) or "0" * 64)
    problems = rb.verify(t2i_copy)
    assert problems[0].startswith("tokenizer.json: 21474836480 bytes, the manifest says")
    assert "tokenizer.json" not in hashed and hashed  # the others are still hashed


def test_extra_files_record_their_size(t2i_bundle):
    from runtimes import bundle as rb

    art = rb.read_manifest(t2i_bundle).find_artifact("onnx", "text_encoder", "fp32")
    assert art.extra_bytes["tokenizer.json"] == (t2i_bundle / "tokenizer.json").stat().st_size


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_an_export_removes_its_staging_directory(tmp_path, signum):
    # SIGTERM left a hidden .NAME.staging-* directory until the next export to the same path.
    out = tmp_path / "bundle"
    proc = subprocess.Popen([*DECO, "export", "onnx", "default", str(out)], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=interruptible)
    try:
        deadline = time.monotonic() + 120
        while not any(".staging-" in p.name for p in tmp_path.iterdir()):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signum)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    assert list(tmp_path.iterdir()) == [], output


def test_sample_draws_large_counts_in_chunks_with_bounded_memory(tmp_path):
    # `deco sample --per-class 400` held every image in one batch (5.7 GB at 900); 360 images
    # of the default model took 512 MB more than 18 before, 40 MB (the grid) after.
    peaks = []
    for per_class in (2, 40):
        code = ("import atexit, resource, sys; atexit.register(lambda: print("
                "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); "
                "from deco_export.cli import main; sys.argv = ['deco', *sys.argv[1:]]; "
                "sys.exit(main())")
        result = subprocess.run(
            [sys.executable, "-c", code, "sample", "default", "--per-class", str(per_class),
             "--steps", "1", "--out", str(tmp_path / f"{per_class}.png")],
            env=ENV, text=True, capture_output=True, timeout=300)
        assert result.returncode == 0, result.stderr
        peaks.append(int(result.stderr.strip().splitlines()[-1]) * 1024)
    assert peaks[1] - peaks[0] < 150 << 20, peaks


# ---------------------------------------------------------------------------------------------
# Tracebacks and misleading errors, across the verbs


@pytest.mark.parametrize("verb", ["sample", "train"])
@pytest.mark.parametrize("device", ["tpu", "cuda:7"])
def test_a_device_this_machine_lacks_is_one_line(images, tmp_path, verb, device):
    # --device tpu was torch's RuntimeError traceback.
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    args = (["sample", "default", "--steps", "1", "--out", str(tmp_path / "x.png")]
            if verb == "sample" else train_args(images, tmp_path / "run"))
    one_line_error(cli(*args, "--device", device), repr(device))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, words", [
    (["calibrate", "default-t2i", "--budget", "4"], "text-to-image model"),
    (["bench", "default", "--out", "{tmp}/o", "--timeout", "0"], "--timeout must be a positive"),
    (["bench", "default", "--out", "{tmp}/o", "--timeout", "nan"], "--timeout must be a positive"),
    (["bench", "default", "--out", "{tmp}/o", "--guidance", "nan"], "--guidance must be a finite"),
    (["sample", "default", "--cols", "0", "--out", "{tmp}/x.png"], "--cols must be >= 1"),
    (["sample", "default", "--classes", ",", "--out", "{tmp}/x.png"], "--classes is empty"),
])
def test_options_are_checked_before_any_work(tmp_path, args, words):
    # Each failed only after sampling or benchmarking (or misleadingly, or as a traceback).
    result = cli(*(a.format(tmp=tmp_path) for a in args))
    one_line_error(result, words)
    assert "sampling" not in result.output and not (tmp_path / "x.png").exists()


@pytest.fixture(scope="module")
def t2i_pipeline():
    from deco_export.sampling import open_pipeline

    return open_pipeline("default-t2i")


@pytest.mark.parametrize("kwargs, words", [
    ({"prompt": "a cat", "negative_prompt": []}, "negative_prompt is an empty list"),
    ({"prompt_embeds": "nan"}, "prompt embeddings hold NaN"),
    ({"prompt_embeds": "ok", "negative_prompt_embeds": "inf"}, "negative prompt embeddings hold"),
    ({"prompt_embeds": "empty"}, "prompt embeddings are empty"),
])
def test_bad_conditions_are_refused_before_sampling(t2i_pipeline, kwargs, words):
    # negative_prompt=[] was a traceback; NaN embeddings ran every step, then blamed --guidance.
    c = t2i_pipeline.model_config
    arrays = {"ok": np.zeros((1, c.text_len, c.text_dim), np.float32),
              "nan": np.full((1, c.text_len, c.text_dim), np.nan, np.float32),
              "inf": np.full((1, c.text_len, c.text_dim), np.inf, np.float32),
              "empty": np.zeros((0, c.text_len, c.text_dim), np.float32)}
    kwargs = {k: arrays.get(v, v) if isinstance(v, str) and k.endswith("embeds") else v
              for k, v in kwargs.items()}
    steps: list[int] = []
    with pytest.raises(ValueError, match=words):
        t2i_pipeline.generate(**kwargs, steps=2, callback=lambda i, n, t: steps.append(i))
    assert steps == []


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs: a disk that fills up (skipped where mounting is not allowed)."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_named_by_every_writer(full_disk, images):
    # Training's checkpoint was a SafetensorError traceback; writes named no path.
    one_line_error(cli("sample", "default", "--steps", "1", "--scale", "40", "--out",
                       full_disk / "x.png"), str(full_disk / "x.png"), "disk is full")
    one_line_error(cli(*train_args(images, full_disk / "run", "--steps", "2")),
                   str(full_disk / "run"), "disk is full")
    leftovers = [p.name for p in full_disk.rglob("*") if ".tmp" in p.name]
    assert leftovers == []


def test_running_out_of_memory_in_onnxruntime_is_not_called_a_damaged_bundle(c2i_bundle):
    # Was "... failed in ONNX Runtime; run `deco validate` on the bundle, or export it again".
    code = f"""
import resource
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
import runtimes
pipe = runtimes.load({str(c2i_bundle)!r})
try:
    pipe.generate(class_labels=[0] * 600, height=128, width=128, steps=1, output_type="np")
except Exception as exc:
    print(type(exc).__name__, exc)
"""
    result = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True,
                            env={**ENV, "DECO_MAX_MEMORY": "1000"}, timeout=300)
    assert "ran out of memory" in result.stdout, result.stdout + result.stderr
    assert "deco validate" not in result.stdout


@pytest.mark.parametrize("extra, words", [
    (["--text-encoder", "/nowhere"], "--text-encoder is for text-to-image presets"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_training_flags_that_do_not_apply_are_refused(images, tmp_path, extra, words):
    # Both trained silently: the encoder was ignored, 0 threads meant "all".
    one_line_error(cli(*train_args(images, tmp_path / "run", *extra)), words)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, words", [
    (["--device", "tpu"], "'tpu' is not a device"),
    (["--steps", "0"], "--steps must lie in 1..10000"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--cfg", "nan"], "--cfg must be a finite number"),
])
def test_eval_options_are_checked_before_any_work(images, extra, words):
    # --device tpu was a RuntimeError traceback; the others waited for the data and model.
    one_line_error(cli("eval", "--data", images, "--checkpoint", "default", *extra), words)


class _SlowBackend(GaussianFlowBackend):
    """The analytic backend with a DiT call slow enough for two threads to overlap; like a
    backend of device buffers or CUDA graphs, it does not declare itself thread-safe."""

    def dit(self, x_t, t, y):
        time.sleep(0.05)
        return super().dit(x_t, t, y)


def test_a_backend_that_is_not_thread_safe_refuses_a_second_generation():
    import runtimes
    from runtimes.backend import BackendError

    backend = _SlowBackend()
    pipe = runtimes.DeCoPipeline(backend, backend.model_config(), {"steps": 6})
    started = threading.Event()

    def first() -> np.ndarray:
        return pipe.generate([0], output_type="np",
                             callback=lambda i, n, t: started.set()).images

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(first)
        assert started.wait(10)
        with pytest.raises(BackendError, match="one generation at a time"):
            pipe.generate([1], output_type="np")
        images = running.result()
    alone = pipe.generate([0], output_type="np").images  # free again afterwards
    assert np.array_equal(images, alone)


@pytest.mark.parametrize("rel, content, words", [
    ("tokenizer.json", b"{not json", "not a tokenizer file"),
    ("text_encoder.onnx", b"\x08\x07trunc", "ONNX Runtime cannot open it"),
])
def test_a_broken_text_path_with_rewritten_hashes_is_one_line(t2i_copy, tmp_path, rel, content,
                                                              words):
    # Both were tracebacks from tokenizers / onnxruntime on the first prompt.
    (t2i_copy / rel).write_bytes(content)
    rehash(t2i_copy, rel)
    result = deco("sample", t2i_copy, "--prompt", "a cat", "--steps", "2", "--out",
                  tmp_path / "x.png")
    one_line_error(result, rel, words)
    assert not (tmp_path / "x.png").exists()
