"""The PyTorch backends are found by name in the runtimes registry: ``runtimes.load(bundle,
backend="torch")`` runs the checkpoint the bundle names, exactly as the backend built by hand."""

from __future__ import annotations

import re
from importlib import import_module

import numpy as np
import pytest

import runtimes
from deco_export.backends import create_backend, register
from deco_export.backends.torch_backend import TorchBackend
from deco_export.sources import load_model
from runtimes.bundle import Manifest, write_manifest
from runtimes.sampler import release_sampler
from tests.helpers import REPO


@pytest.fixture(scope="module")
def golden_source(golden_ckpt):
    return load_model(golden_ckpt)


def _bundle(tmp_path, model, record):
    """A bundle with no artefacts: its manifest names the checkpoint it came from."""
    root = tmp_path / "bundle"
    root.mkdir()
    write_manifest(root, Manifest(model=model.config.to_dict(),
                                  sampler_defaults=release_sampler(model.config.family),
                                  source=record))
    return root


def _images(pipe):
    return pipe.generate(class_labels=[1, 7], steps=2, seed=5, output_type="np").images


def test_load_runs_the_bundles_checkpoint_through_the_registry(tmp_path, golden_source):
    model, record = golden_source
    register()  # what the runtimes.backends entry point does in an installed package
    pipe = runtimes.load(_bundle(tmp_path, model, record), backend="torch")
    assert isinstance(pipe.backend, TorchBackend)
    direct = runtimes.DeCoPipeline(TorchBackend(model), model.config.to_dict(),
                                   release_sampler(model.config.family))
    np.testing.assert_array_equal(_images(pipe), _images(direct))


def test_load_refuses_a_checkpoint_that_is_not_the_bundles(tmp_path, golden_source):
    model, record = golden_source
    register()
    root = _bundle(tmp_path, model, {**record, "sha256": "0" * 64})
    with pytest.raises(ValueError, match="not the one"):
        runtimes.load(root, backend="torch")


def test_create_backend_takes_a_model_in_memory(golden_source):
    model, _ = golden_source
    backend = create_backend("torch", model, precision="bf16")
    assert isinstance(backend, TorchBackend) and backend.precision == "bf16"


def test_the_entry_points_register_the_names_they_carry():
    text = (REPO / "pyproject.toml").read_text()  # tomllib is 3.11+
    section = text.split('[project.entry-points."runtimes.backends"]\n', 1)[1].split("\n[", 1)[0]
    entries = dict(re.findall(r'^([\w-]+) = "([^"]+)"$', section, re.MULTILINE))
    assert set(entries) == {"torch", "torch-cuda"}
    for name, target in entries.items():
        module, _, attr = target.partition(":")
        getattr(import_module(module), attr)()
        assert name in runtimes.available_backends()
