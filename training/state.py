"""Resumable training checkpoints: tensors in safetensors, everything else in JSON.

Layout of ``<run>/checkpoints/step_<N>/``::

    model.safetensors       online DeCo weights (deco_export key names)
    ema.safetensors         fp32 EMA weights
    repa_head.safetensors   REPA projection head, reference keys diffusion_trainer.proj.0.*
    optimizer.safetensors   optimizer state tensors, keys "<param index>.<name>"
    rng.safetensors         torch RNG states: "rank<r>.cpu", "rank<r>.cuda<i>", "noise"
    state.json              step, data position, optimizer hyper-parameters, python/numpy RNG
                            states per rank, run and model configs

A checkpoint is written into a hidden temporary directory, every file is fsync'ed, and only
then is the directory renamed to ``step_<N>``; older checkpoints are removed afterwards (moved
aside first, so a half-deleted one never looks complete). A process killed at any moment
leaves the newest complete checkpoint as the one ``latest_checkpoint`` finds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from deco_export.pretrained import safetensors_errors
from runtimes.fileio import fsync_dir, fsync_file

__all__ = [
    "CheckpointData",
    "capture_rng",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "optimizer_from_flat",
    "optimizer_to_flat",
    "restore_rng",
    "save_checkpoint",
]

FORMAT_VERSION = 1
PREFIX = "step_"


# ------------------------------------------------------------------------------------------------
# RNG
# ------------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU + CUDA) RNG states, picklable."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        cuda = state["torch_cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------------------------------------
# Optimizer state
# ------------------------------------------------------------------------------------------------


def optimizer_to_flat(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into safetensors tensors and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    for idx, st in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


# ------------------------------------------------------------------------------------------------
# Save / load
# ------------------------------------------------------------------------------------------------


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with safetensors_errors(path):
        save_file(_cpu(tensors), str(path), metadata={"format": "pt"})
    fsync_file(path)


def _save_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    fsync_file(path)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints (renamed into place, so complete by construction), oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit():
            found.append((int(p.name[len(PREFIX) :]), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    ckpts = list_checkpoints(directory)
    return ckpts[-1] if ckpts else None


def _remove(path: Path) -> None:
    """Rename aside, then delete: an interrupted delete never leaves a 'step_*' fragment."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_stale(directory: str | Path) -> None:
    """Remove temporary and trash directories left by an interrupted save."""
    d = Path(directory)
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    directory: str | Path,
    step: int,
    *,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    rng: dict[str, Any],
    state: dict[str, Any],
    repa_head: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Write ``step_<step>`` atomically and keep the newest ``keep`` checkpoints (0 = all).

    ``rng`` maps "rank<r>" to :func:`capture_rng` dicts, plus "noise": the shared noise
    generator state. ``state`` is JSON-able run state (step position, configs).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"{PREFIX}{step:07d}"
    tmp = d / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _save_tensors(model, tmp / "model.safetensors")
        _save_tensors(ema, tmp / "ema.safetensors")
        if repa_head is not None:
            _save_tensors(repa_head, tmp / "repa_head.safetensors")
        opt_tensors, opt_meta = optimizer_to_flat(optimizer)
        _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        rng_tensors: dict[str, torch.Tensor] = {"noise": rng["noise"]}
        host_rng: dict[str, Any] = {}
        for rank_key, st in rng.items():
            if rank_key == "noise":
                continue
            rng_tensors[f"{rank_key}.cpu"] = st["torch_cpu"]
            for i, s in enumerate(st.get("torch_cuda", [])):
                rng_tensors[f"{rank_key}.cuda{i}"] = s
            host_rng[rank_key] = {"python": st["python"], "numpy": st["numpy"]}
        _save_tensors(rng_tensors, tmp / "rng.safetensors")
        _save_json(
            {
                "format_version": FORMAT_VERSION,
                "step": step,
                **state,
                "optimizer": opt_meta,
                "rng": host_rng,
            },
            tmp / "state.json",
        )
        fsync_dir(tmp)
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        fsync_dir(d)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for old in list_checkpoints(d)[:-keep]:
            _remove(old)
    return final


class CheckpointData(dict):
    """What :func:`load_checkpoint` returns (a dict with attribute access for readability)."""

    __getattr__ = dict.__getitem__


def load_checkpoint(path: str | Path, rank: int = 0) -> CheckpointData:
    """Read a checkpoint directory; ``rng`` is this rank's state (rank 0's if absent)."""
    p = Path(path)
    meta = json.loads((p / "state.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{p}: unsupported checkpoint format {meta.get('format_version')}")
    rng_t = load_file(str(p / "rng.safetensors"))
    key = f"rank{rank}" if f"rank{rank}" in meta["rng"] else "rank0"
    rng = dict(meta["rng"][key])
    rng["torch_cpu"] = rng_t[f"{key}.cpu"]
    cuda = sorted(
        (k for k in rng_t if k.startswith(f"{key}.cuda")), key=lambda k: int(k[len(key) + 5 :])
    )
    if cuda:
        rng["torch_cuda"] = [rng_t[k] for k in cuda]
    head = p / "repa_head.safetensors"
    return CheckpointData(
        path=p,
        step=meta["step"],
        state=meta,
        model=load_file(str(p / "model.safetensors")),
        ema=load_file(str(p / "ema.safetensors")),
        repa_head=load_file(str(head)) if head.is_file() else None,
        optimizer=optimizer_from_flat(
            load_file(str(p / "optimizer.safetensors")), meta["optimizer"]
        ),
        rng=rng,
        noise_rng=rng_t["noise"],
    )
