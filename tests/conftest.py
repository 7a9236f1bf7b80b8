"""What every test shares: the golden fixtures, and a temp dir of the run's own that each test
must leave as it found it.

The temp dir: at start-up each pytest process (each xdist worker too) points ``tempfile`` and
``$TMPDIR`` (which the ``deco`` subprocesses inherit) at a fresh directory of its own, so what
another process writes meanwhile is never blamed on a test here. After every test that directory
must be empty again: whatever an export, a backend or a subprocess left there fails the test at
teardown, named. ``tmp_path`` stays where pytest keeps it (``$PYTEST_DEBUG_TEMPROOT``), and so
does torch's compile cache (``$TORCHINDUCTOR_CACHE_DIR``), which is reused from run to run."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import FIXTURES, GOLDEN_CKPT, GOLDEN_T2I_CKPT

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core: each computes on one thread (torch, numpy's BLAS) rather than every
    # worker's threads contending for every core. Set before anything imports torch.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

_RUN_TEMP_DIR = pytest.StashKey[Path]()
# What a library keeps in the temp dir once per machine, not per call: onnxruntime's
# telemetry session id (written on first use, read ever after), and the caches torch.compile
# keeps under `tempfile.gettempdir()` whatever $TORCHINDUCTOR_CACHE_DIR says (its precompiled
# headers and its key-value caches read inductor's default directory, not the variable).
MACHINE_STATE = frozenset({".ses", f"torchinductor_{getpass.getuser()}"})


def pytest_configure(config: pytest.Config) -> None:
    system = tempfile.gettempdir()
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", system)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                          str(Path(system) / f"torchinductor_{getpass.getuser()}"))
    private = Path(tempfile.mkdtemp(prefix="deco-tests-", dir=system))
    os.environ["TMPDIR"] = tempfile.tempdir = str(private)
    config.stash[_RUN_TEMP_DIR] = private


def pytest_unconfigure(config: pytest.Config) -> None:
    private = config.stash.get(_RUN_TEMP_DIR, None)
    if private is not None:
        shutil.rmtree(private, ignore_errors=True)


@pytest.fixture(autouse=True)
def _leaves_the_temp_dir_as_it_found_it(request: pytest.FixtureRequest):
    """Fail the test whose run left anything in the temp dir (and clear it for the next)."""
    yield
    private = request.config.stash[_RUN_TEMP_DIR]
    left = leftovers(private)
    if left:
        pytest.fail(f"left in the temp dir: {', '.join(left)}", pytrace=False)


def leftovers(directory: Path) -> list[str]:
    """The names in ``directory`` other than machine state, each removed once listed."""
    left = sorted(p.name for p in directory.iterdir() if p.name not in MACHINE_STATE)
    for name in left:
        path = directory / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return left


# ---------------------------------------------------------------------------------------------
# On several cores (`make test`: pytest-xdist, --dist loadfile --no-loadscope-reorder) a test
# file is one unit of work, so its module-scoped exports are built once; files that read the same
# expensive session-scoped export below are one unit, so it is built once too; and units start
# heaviest first, so that no long file is left to run alone at the end.

SHARED_UNITS = {
    "tests/deco_export/test_faults_round3.py": "t2i_text_bundle",
    "tests/deco_export/test_bench_t2i.py": "t2i_text_bundle",
    "tests/deco_export/test_text_encoder_placement.py": "t2i_text_bundle",
    # both export the embedded default-t2i: one after the other, the second reuses the traces
    "tests/deco_export/test_int8.py": "default_t2i_exports",
    "tests/deco_export/test_default_t2i.py": "default_t2i_exports",
    # the serving tests read the golden_onnx_bundle and golden_t2i_onnx_bundle exports
    "tests/runtimes/test_batching.py": "serve_bundles",
    "tests/deco_export/test_serve.py": "serve_bundles",
    "tests/deco_export/test_serve_page.py": "serve_bundles",
    "tests/deco_export/test_serve_ray.py": "serve_bundles",
    "tests/deco_export/test_serve_load.py": "serve_bundles",
}
# The slowest units, slowest first (per --durations on 2 cores: the shared T2I exports, the
# embedded default-t2i's exports, the Core ML conversions, the faults files' real exports and
# kills, the serving tests' exports); the others follow in file order.
HEAVIEST_FIRST = (
    "t2i_text_bundle",
    "default_t2i_exports",
    "tests/deco_export/test_coreml.py",
    "tests/deco_export/test_export_onnx.py",
    "tests/deco_export/test_faults.py",
    "serve_bundles",
    "tests/deco_export/test_export_distilled.py",
    "tests/deco_export/test_export_onnx_t2i_precisions.py",
    "tests/deco_export/test_text_encoder_precisions.py",
    "tests/deco_export/test_bench.py",
    "tests/deco_export/test_coreml_t2i.py",
    "tests/training/test_trainer.py",
)


def unit_of(nodeid: str) -> str:
    """The unit of work (one xdist worker runs all of it) of a test, by its node id."""
    path = nodeid.split("::", 1)[0]
    return SHARED_UNITS.get(path, path)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """--dist loadfile with the shared units above (xdist's own xdist_group marks no longer
    reach its scheduler on pytest 9)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class UnitScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return UnitScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker sorts alike: the order is the queue
        rank = {unit: i for i, unit in enumerate(HEAVIEST_FIRST)}
        items.sort(key=lambda item: rank.get(unit_of(item.nodeid), len(rank)))


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "deco_tiny_64.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def golden_meta() -> dict:
    return json.loads((FIXTURES / "deco_tiny_64.json").read_text())


@pytest.fixture(scope="session")
def golden_ckpt() -> Path:
    return GOLDEN_CKPT


@pytest.fixture(scope="session")
def golden_model():
    from deco_export.checkpoint import load_reference

    return load_reference(GOLDEN_CKPT, image_size=(64, 64))


@pytest.fixture(scope="session")
def golden_t2i() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "deco_t2i_tiny_64.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def golden_t2i_meta() -> dict:
    return json.loads((FIXTURES / "deco_t2i_tiny_64.json").read_text())


@pytest.fixture(scope="session")
def golden_t2i_ckpt() -> Path:
    return GOLDEN_T2I_CKPT


@pytest.fixture(scope="session")
def golden_t2i_model():
    from deco_export.checkpoint import load_reference

    return load_reference(GOLDEN_T2I_CKPT, image_size=(64, 64))


@pytest.fixture(scope="session")
def golden_onnx_bundle(tmp_path_factory, golden_model, golden_ckpt) -> Path:
    """The golden class-conditional model as an fp32 ONNX bundle (64x64, sizes 32..128)."""
    from deco_export.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("golden-onnx") / "bundle"
    export_onnx(golden_model, out, precisions=("fp32",), image_size=(64, 64),
                source={"path": str(golden_ckpt)}, parity_steps=2)
    return out


# ---------------------------------------------------------------------------------------------
# Exports that several test files read: built once per process, shared read-only (a test that
# changes one copies it first).


@pytest.fixture(scope="session")
def golden_ckpt_dir(tmp_path_factory, golden_model) -> Path:
    """The golden tiny model as a checkpoint directory."""
    from deco_export.checkpoint import save_pretrained

    return save_pretrained(golden_model, tmp_path_factory.mktemp("ckpt") / "tiny",
                           source="golden")


@pytest.fixture(scope="session")
def c2i_bundle(tmp_path_factory, golden_ckpt_dir) -> Path:
    """An fp32 ONNX bundle of ``golden_ckpt_dir`` (its source checkpoint runs the torch
    backend), exported under umask 022."""
    from deco_export.export.onnx import export_onnx
    from deco_export.sources import load_model

    old = os.umask(0o022)
    try:
        model, source = load_model(golden_ckpt_dir)
        out = tmp_path_factory.mktemp("bundle") / "bundle"
        export_onnx(model, out, precisions=("fp32",), source=source, parity_steps=2)
    finally:
        os.umask(old)
    return out


@pytest.fixture(scope="session")
def golden_t2i_onnx_bundle(tmp_path_factory, golden_t2i_model, golden_t2i_ckpt,
                           golden_t2i) -> Path:
    """The golden text-to-image model as an fp32 ONNX bundle with its stored negative prompt
    (no text encoder: callers pass text features as ``prompt_embeds``)."""
    from deco_export.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("golden-t2i-onnx") / "bundle"
    export_onnx(golden_t2i_model, out, precisions=("fp32",), image_size=(64, 64),
                source={"path": str(golden_t2i_ckpt)}, parity_steps=2,
                negative_prompt_embeds=golden_t2i["uncond_text"][:1], negative_prompt="")
    return out


@pytest.fixture(scope="session")
def t2i_text_bundle(tmp_path_factory, golden_t2i_ckpt) -> Path:
    """`deco export onnx` of the golden T2I checkpoint with a tiny random Qwen3 (48 wide, like
    the model's text features) as its text encoder: fp32, 64x64, a 2-step parity gate."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tests.helpers import export_with_tiny_encoder

    return export_with_tiny_encoder(tmp_path_factory.mktemp("t2i-text"), golden_t2i_ckpt)
