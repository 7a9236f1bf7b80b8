"""Our checkpoint directory format, read into and written from a model without importing the
model classes (so `DeCo.from_pretrained` and `deco_export.checkpoint` both build on it, and
neither imports the other back)::

    model.safetensors   the weights (our key names)
    config.json         ModelConfig
    metadata.json       source, sha256 of model.safetensors, parameter count, package version

It is written into a temporary sibling directory and renamed into place, so a crash never
leaves a half-written checkpoint where a reader could find it. Every tensor that does not fit
the model is an error that lists each one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from runtimes import fileio
from runtimes.config import ModelConfig
from runtimes.errors import ConfigError, DecoError
from runtimes.fileio import sha256_file
from runtimes.locks import lock
from runtimes.staging import clean_stale, staging_dir, swap_directory

M = TypeVar("M", bound=nn.Module)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
METADATA_NAME = "metadata.json"

class CheckpointError(DecoError, ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


def package_version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------------------------------------
# Our format
# ---------------------------------------------------------------------------------------------


def _identity(meta: dict[str, Any]) -> Any:
    """What makes two checkpoints "the same source": the source file's sha256 when recorded
    (`deco convert`), else the source description."""
    return meta.get("source_sha256") or meta.get("source")


def check_target(out: Path, identity: Any, force: bool = False,
                 protect: tuple[Path, ...] = ()) -> None:
    """Refuse to write a checkpoint over anything but an absent or empty directory or a
    checkpoint of the same source, naming the path and the fix. ``force`` allows replacing
    (the caller replaces only once the new checkpoint is complete); it never allows replacing
    the current directory or a directory that holds one of ``protect`` (the source file)."""
    target = out.resolve()
    for p in protect:
        if p.resolve() == target or target in p.resolve().parents:
            raise CheckpointError(
                f"{out} holds the source {p}; writing the checkpoint there would replace it: "
                "choose a new directory"
            )
    cwd = Path.cwd().resolve()
    if cwd == target or target in cwd.parents:
        raise CheckpointError(
            f"{out} is the current directory (or holds it); a checkpoint is swapped in whole, so "
            "name a new directory, e.g. ./model"
        )
    if not os.path.lexists(out):
        return
    if out.is_symlink() or not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory; choose a new directory")
    if force or not any(out.iterdir()):
        return
    fix = "choose a new or empty directory, or pass --force to replace it"
    if not (out / METADATA_NAME).is_file() or not (out / CONFIG_NAME).is_file():
        raise CheckpointError(f"{out} is not empty and is not a DeCo checkpoint; {fix}")
    try:
        existing = read_metadata(out)
    except (OSError, ValueError):
        raise CheckpointError(f"{out} holds a damaged checkpoint (metadata.json); {fix}") from None
    if existing.get("format") != "deco-checkpoint" or _identity(existing) != identity:
        raise CheckpointError(
            f"{out} holds a checkpoint of another source ({existing.get('source')}); {fix}"
        )


@contextlib.contextmanager
def safetensors_errors(shown: str | Path) -> Iterator[None]:
    """safetensors' I/O failures (a full disk) are a Rust error that carries the OS error only
    in its text: re-raised as the OSError it is, naming ``shown`` (the user's path, where the
    file written is a staging one), so the CLI prints one line with it."""
    try:
        yield
    except Exception as exc:
        match = re.search(r"os error (\d+)", str(exc))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), str(shown)) from None


def save_tensors(state: dict[str, torch.Tensor], path: Path, shown: Path | None = None) -> None:
    """``safetensors.torch.save_file`` with its I/O failures as OSErrors (`safetensors_errors`)."""
    with safetensors_errors(shown or path):
        save_file(state, str(path), metadata={"format": "pt"})


def save_pretrained(model: Any, path: str | Path, source: str | None = None,
                    extra_metadata: dict[str, Any] | None = None, force: bool = False,
                    protect: tuple[Path, ...] = ()) -> Path:
    """Write ``model`` as a checkpoint directory at ``path``: staged beside it complete, then
    swapped in by one rename under the directory's write lock. ``path`` must be absent, empty
    or a checkpoint of the same source (`check_target`); ``force`` replaces anything else."""
    out = Path(path)
    identity = _identity({"source": source, **(extra_metadata or {})})
    check_target(out, identity, force, protect)
    assert_finite(model.state_dict(), source=str(source or "the model"))
    with staging_dir(out) as staging:
        tmp = staging.path
        state = {k: v.detach().to("cpu", torch.float32).contiguous()
                 for k, v in model.state_dict().items()}
        save_tensors(state, tmp / WEIGHTS_NAME, shown=out / WEIGHTS_NAME)
        fileio.fsync_file(tmp / WEIGHTS_NAME)
        fileio.atomic_write_text(tmp / CONFIG_NAME, model.config.to_json() + "\n")
        metadata = {
            "format": "deco-checkpoint",
            "format_version": 1,
            "source": source,
            "weights_sha256": sha256_file(tmp / WEIGHTS_NAME),
            "num_parameters": model.num_parameters(),
            "package_version": package_version(),
            **(extra_metadata or {}),
        }
        fileio.atomic_write_text(tmp / METADATA_NAME,
                                 json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        with lock(out):
            check_target(out, identity, force, protect)  # again: another writer may have won
            clean_stale(out)
            swap_directory(tmp, out)
    return out


def read_metadata(path: str | Path, missing_ok: bool = False) -> dict[str, Any]:
    """A checkpoint directory's metadata; ``missing_ok``: {} for a directory without one (an
    older or hand-made checkpoint, whose provenance is then unknown)."""
    file = Path(path) / METADATA_NAME
    if missing_ok and not file.is_file():
        return {}
    return json.loads(file.read_text())


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"{path} is not a DeCo checkpoint directory (no {CONFIG_NAME}); pass a directory "
            "written by `deco convert` or save_pretrained"
        )
    file = path / CONFIG_NAME
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CheckpointError(
            f"{file}: not valid JSON ({err}); the file is damaged: re-create the checkpoint"
        ) from None
    try:
        return ModelConfig.from_json(text, where=str(file))
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def load_pretrained_as(build: Callable[[ModelConfig], M], path: str | Path,
                       device: str | torch.device = "cpu", verify: bool = True) -> M:
    """Load a checkpoint directory into ``build(config)`` (a model class, or a function that
    picks one from the config: `deco_export.model.build_model`); checks the weights' sha256
    against the metadata."""
    path = Path(path)
    config = load_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_NAME}; the checkpoint is incomplete")
    if verify:
        expected = read_metadata(path, missing_ok=True).get("weights_sha256")
        if expected and sha256_file(weights) != expected:
            raise CheckpointError(
                f"{weights} does not match the sha256 in {METADATA_NAME}: the file was changed "
                "or is corrupt; re-create the checkpoint"
            )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {weights}: {err}") from None
    model = build(config)
    load_state_strict(model, state, source=str(weights))
    return model.to(device).eval()


def assert_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights with NaN or inf values: they sample black images without any error."""
    bad = []
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            bad.append(f"{name} ({count} of {tensor.numel()})")
    if bad:
        more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
        raise CheckpointError(
            f"{source}: non-finite (NaN or inf) weights in {', '.join(bad[:3])}{more}; the "
            "checkpoint is corrupt or its training diverged: use an earlier or intact checkpoint"
        )


def load_state_strict(model: Any, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict that lists every missing, unexpected and mis-shaped tensor, and refuses
    non-finite weights."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected) if state[k].shape != expected[k].shape
    )
    problems = [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
    problems += [f"mis-shaped {k}" for k in misshaped]
    if problems:
        shown = "\n  ".join(problems[:40])
        more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
        raise CheckpointError(
            f"{source} does not fit a DeCo model of config {model.config.to_dict()}:\n  "
            f"{shown}{more}"
        )
    assert_finite(state, source)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
