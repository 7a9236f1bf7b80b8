"""A backend is one catalogue entry: registered in one place, it is a backend of ``deco
sample``, a row of ``deco bench`` (whose worker processes find it by its factory's module
path) and a ``deco validate --backend`` gate, with no other edit."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

import runtimes
from deco_export.cli import main
from runtimes import catalogue
from runtimes.bundle import Manifest, write_manifest
from runtimes.catalogue import BackendEntry
from runtimes.sampler import release_sampler

NAME = "throwaway"


def throwaway_backend(bundle_dir, manifest, *, precision="fp32", **options):
    """The throw-away backend: PyTorch eager on the checkpoint the bundle names."""
    from deco_export.backends.torch_backend import from_bundle

    return from_bundle(bundle_dir, manifest, precision=precision, **options)


def throwaway_probe(precision, options, gpu):
    return None if precision == "fp32" else f"{NAME} runs fp32 only"


@pytest.fixture
def throwaway():
    runtimes.register_backend(BackendEntry(
        NAME, f"{__name__}:throwaway_backend", runtime="torch",
        probe=f"{__name__}:throwaway_probe", description="a backend registered by a test"))
    try:
        yield NAME
    finally:
        catalogue.unregister(NAME)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, golden_ckpt):
    """A bundle with no artefacts: its manifest names the golden checkpoint."""
    from deco_export.sources import load_model

    model, record = load_model(golden_ckpt)
    root = tmp_path_factory.mktemp("catalogue") / "bundle"
    root.mkdir()
    write_manifest(root, Manifest(model=replace(model.config, image_size=(64, 64)).to_dict(),
                                  sampler_defaults=release_sampler(model.config.family),
                                  source=record))
    return root


def _run(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_an_unregistered_backend_is_unknown(bundle, tmp_path):
    result = CliRunner().invoke(main, ["sample", str(bundle), "--backend", NAME, "--steps", "1",
                                       "--out", str(tmp_path / "grid.png")])
    assert result.exit_code != 0 and f"unknown backend {NAME!r}" in result.output


def test_sample_runs_a_registered_backend(throwaway, bundle, tmp_path):
    assert NAME in runtimes.available_backends()
    help_text = _run(["sample", "--help"])
    assert NAME in help_text
    _run(["sample", str(bundle), "--backend", NAME, "--classes", "1", "--steps", "2",
          "--out-dir", str(tmp_path / "images")])
    (image,) = sorted((tmp_path / "images").glob("*.png"))
    assert json.loads(Image.open(image).text["deco:backend"]) == NAME


def test_validate_gates_a_registered_backend(throwaway, bundle):
    out = _run(["validate", str(bundle), "--backend", NAME, "--steps", "2"])
    assert f"{NAME} fp32" in out


def test_bench_runs_a_registered_backend_in_its_workers(throwaway, bundle, tmp_path):
    out = tmp_path / "bench"
    _run(["bench", str(bundle), "--out", str(out), "--backends", NAME,
          "--precisions", "fp32,fp16", "--batch-sizes", "1", "--steps", "2", "--repeats", "1",
          "--warmup", "0", "--threads", "1", "--peak-size", "64", "--no-progress",
          "--no-plots"])
    report = json.loads((out / "bench.json").read_text())
    statuses = {(b["backend"], b["precision"]): b["status"] for b in report["backends"]}
    assert statuses[(NAME, "fp32")] == "ok"
    assert {"backend": NAME, "precision": "fp16", "status": "unavailable",
            "reason": f"{NAME} runs fp32 only"} in report["unavailable"]
    assert Path(out / "bench.md").read_text().count(NAME) >= 1
