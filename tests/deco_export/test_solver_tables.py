"""Tuned solver tables (`deco calibrate BUNDLE --solver --nfe N`): the fit lowers the held-out
error below the untuned AB2 and Euler grids at the same NFE, tables round-trip through the
manifest, ``solver="tuned"`` finds them or names what exists, and ``deco validate``'s re-check
fails on a tampered table.

One fit of the golden tiny model (32x32, 4 steps, an 8-step teacher) is shared by the module;
the bundle runs the model through a registered torch backend (the manifest handling and the
fit are under test here; ONNX Runtime parity is tested elsewhere).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import runtimes
from deco_export.cli import main
from deco_export.solver_tuning import (
    parse_nfe,
    recheck_solver_tables,
    search_split,
    tune_solver_tables,
)
from runtimes.bundle import read_manifest, write_manifest
from runtimes.errors import ConfigError
from runtimes.sampler import sample
from runtimes.solver_tables import SolverTable, fast_table, solver_table_key
from tests.helpers import torch_backed_bundle

BACKEND = "solver-tables-test-torch"
NFE = 4
FIT = {"samples": 4, "heldout": 4, "iterations": 8, "teacher_steps": 8, "lr": 0.05}


@pytest.fixture(scope="module")
def plain_bundle(tmp_path_factory, golden_ckpt) -> Path:
    """A bundle of the golden model (32x32) whose backend is the model in PyTorch."""
    from deco_export.checkpoint import convert_reference

    base = tmp_path_factory.mktemp("tables")
    ck = convert_reference(golden_ckpt, base / "tiny", image_size=(32, 32))
    return torch_backed_bundle(base / "bundle", ck, BACKEND)


@pytest.fixture(scope="module")
def tuned_bundle(plain_bundle, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tuned") / "bundle"
    shutil.copytree(plain_bundle, root)
    tune_solver_tables(root, [NFE], backend=BACKEND, **FIT)
    return root


@pytest.fixture
def bundle_copy(tuned_bundle, tmp_path) -> Path:
    root = tmp_path / "bundle"
    shutil.copytree(tuned_bundle, root)
    return root


def test_the_fit_beats_the_untuned_grids_on_held_out_noises(tuned_bundle):
    (table,) = read_manifest(tuned_bundle).solver_tables.values()
    h = table.heldout
    assert table.nfe == NFE and h["noises"] == FIT["heldout"] and h["seed"] != table.fit["seed"]
    assert h["psnr_db"] > h["baselines"]["ab2 guidance_edges"] + 0.5
    assert h["psnr_db"] > h["baselines"]["euler guidance_edges"] + 0.5
    assert table.fit["loss_best"] < table.fit["loss_start"]
    grid = np.asarray(table.timesteps)
    assert grid[0] == 0.0 and grid[-1] == 1.0 and np.all(np.diff(grid) > 0)
    assert np.float32(0.1) in grid.astype(np.float32)  # the guidance edge stays a boundary
    # the split of the steps around the edge is the best of those screened, and the grid has it
    screened = {tuple(int(v) for v in k.split(",")): loss
                for k, loss in table.fit["screened"].items()}
    assert len(screened) >= 2 and tuple(table.fit["split"]) == min(screened, key=screened.get)
    assert int(np.flatnonzero(grid.astype(np.float32) == np.float32(0.1))[0]) == \
        table.fit["split"][0]


def test_the_split_search_climbs_to_the_lowest_screened_loss():
    seen = []

    def screen(split):
        seen.append(split)
        return (split[0] - 3) ** 2 + 0.1 * split[1]

    best, tried = search_split(screen, (1, 7))
    assert best == (3, 5) and set(tried) == {(1, 7), (2, 6), (3, 5), (4, 4)}
    assert len(seen) == len(set(seen))  # no split is fitted twice
    # three runs (two edges inside (0, 1)): steps move between neighbouring runs only
    best, _ = search_split(lambda s: float(abs(s[0] - 2) + abs(s[2] - 3)), (1, 1, 6))
    assert best == (2, 3, 3)


def test_tables_round_trip_through_the_manifest(tuned_bundle, tmp_path):
    manifest = read_manifest(tuned_bundle)
    (key, table) = next(iter(manifest.solver_tables.items()))
    assert key == solver_table_key(manifest.model_hash or "", NFE, table.guidance,
                                   table.guidance_interval, table.shift)
    write_manifest(tmp_path, manifest)
    again = read_manifest(tmp_path).solver_tables[key]
    assert again == table and again.heldout == table.heldout
    # A bundle without tables writes no section (older manifests stay byte-identical).
    manifest.solver_tables = {}
    assert "solver_tables" not in manifest.to_dict()


def test_a_mislabelled_table_is_refused_on_reading(bundle_copy):
    path = bundle_copy / "manifest.json"
    data = json.loads(path.read_text())
    (key,) = data["solver_tables"]
    data["solver_tables"][key]["nfe"] = NFE + 1
    path.write_text(json.dumps(data))
    with pytest.raises(runtimes.BundleError, match="solver_tables"):
        read_manifest(bundle_copy)


def test_tuned_runs_the_table_and_a_miss_names_what_exists(tuned_bundle):
    pipe = runtimes.load(tuned_bundle, backend=BACKEND)
    (table,) = pipe.manifest.solver_tables.values()
    config = pipe.sampler_config(solver="tuned", steps=NFE)
    assert config.solver == "table" and config.timesteps == table.timesteps
    assert config.coefficients == table.coefficients and config.guidance_edges
    noise = np.random.default_rng(5).standard_normal((1, 3, 32, 32), dtype=np.float32)
    tuned = pipe.generate(class_labels=[1], solver="tuned", steps=NFE, noise=noise,
                          output_type="np").images
    explicit = sample(pipe.backend, noise, [1], table.sampler_config(pipe.sampler_defaults),
                      null_class=pipe.model_config.null_class)
    np.testing.assert_array_equal(tuned, explicit)
    with pytest.raises(ConfigError) as err:
        pipe.sampler_config(solver="tuned", steps=NFE + 3)
    message = str(err.value)
    assert "\n" not in message and table.key in message
    assert "deco calibrate BUNDLE --solver --nfe" in message
    with pytest.raises(ConfigError, match="this bundle has"):
        pipe.sampler_config(solver="tuned", steps=NFE, guidance=2.0)


def test_bundles_without_tables_sample_as_before(plain_bundle):
    pipe = runtimes.load(plain_bundle, backend=BACKEND)
    assert pipe.manifest.solver_tables == {}
    assert pipe.sampler_config(steps=4) == replace(pipe.sampler_defaults, num_steps=4)
    with pytest.raises(ConfigError, match="this bundle has: none"):
        pipe.sampler_config(solver="tuned", steps=4)


def test_validate_recheck_passes_and_fails_on_a_tampered_table(bundle_copy):
    (line,) = recheck_solver_tables(bundle_copy, backend=BACKEND)
    assert line.endswith("passed")
    path = bundle_copy / "manifest.json"
    data = json.loads(path.read_text())
    (entry,) = data["solver_tables"].values()
    entry["coefficients"][NFE - 1][NFE - 2] += 1.5
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="worse"):
        recheck_solver_tables(bundle_copy, backend=BACKEND)


def test_the_cli_tunes_records_and_samples(plain_bundle, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(plain_bundle, root)
    result = CliRunner().invoke(main, [
        "calibrate", str(root), "--solver", "--nfe", "3", "--backend", BACKEND, "--samples", "2",
        "--heldout", "2", "--iterations", "2", "--teacher-steps", "8"])
    assert result.exit_code == 0, result.output
    assert "tuned dB" in result.output and "--solver tuned --steps 3" in result.output
    assert len(read_manifest(root).solver_tables) == 1
    out = tmp_path / "tuned.png"
    result = CliRunner().invoke(main, ["sample", str(root), "--solver", "tuned", "--steps", "3",
                                       "--classes", "1", "--backend", BACKEND, "--out", str(out)])
    assert result.exit_code == 0, result.output
    # --fast takes the tuned table (its held-out PSNR is above the family's few-step setting)
    fast = tmp_path / "fast.png"
    result = CliRunner().invoke(main, ["sample", str(root), "--fast", "--classes", "1",
                                       "--backend", BACKEND, "--out", str(fast)])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(fast)), np.asarray(Image.open(out)))
    result = CliRunner().invoke(main, ["sample", str(root), "--solver", "tuned", "--steps", "7",
                                       "--classes", "1", "--backend", BACKEND,
                                       "--out", str(tmp_path / "x.png")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "no tuned solver table" in result.output


def test_nfe_is_checked_before_any_work():
    assert parse_nfe("5,6,8,8") == [5, 6, 8]
    with pytest.raises(ValueError, match="not an integer"):
        parse_nfe("5,x")
    with pytest.raises(ValueError, match="out of range"):
        parse_nfe("1")


def test_a_table_that_is_not_lower_triangular_is_refused():
    with pytest.raises(ConfigError, match="lower"):
        SolverTable(model_sha256="0" * 64, nfe=2, guidance=1.0, guidance_interval=(0.0, 1.0),
                    shift=1.0, timesteps=(0.0, 0.5, 1.0), coefficients=((0.0, 0.1), (0.0, 0.0)))


def test_fast_takes_a_tuned_table_only_when_it_is_as_accurate(tuned_bundle):
    manifest = read_manifest(tuned_bundle)
    (table,) = manifest.solver_tables.values()
    tables, sha, defaults = manifest.solver_tables, manifest.model_hash, manifest.sampler_defaults
    psnr = float(table.heldout["psnr_db"])
    assert fast_table(tables, sha, defaults, psnr) == table
    assert fast_table(tables, sha, defaults, psnr + 0.1) is None
    assert fast_table(tables, sha, replace(defaults, guidance=2.0), 0.0) is None
    assert fast_table(tables, None, defaults, 0.0) is None
