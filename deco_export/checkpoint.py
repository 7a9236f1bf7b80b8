"""Checkpoint IO: our directory format, and import of the reference's Lightning checkpoints.

Our format is a directory::

    model.safetensors   the weights (our key names)
    config.json         DeCoConfig
    metadata.json       source, sha256 of model.safetensors, parameter count, package version

It is written into a temporary sibling directory and renamed into place, so a crash never
leaves a half-written checkpoint where a reader could find it.

The reference's loaders skip missing or mis-shaped tensors with a print; here every mismatch
is an error that lists each tensor.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from runtimes import fileio
from runtimes.errors import ConfigError, DecoError
from runtimes.fileio import sha256_file

from .config import DeCoConfig
from .model import DeCo, PixelDiT, build_model

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
METADATA_NAME = "metadata.json"

REFERENCE_PREFIXES = {"ema": "ema_denoiser.", "online": "denoiser."}


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


def save_pretrained(model: DeCo | PixelDiT, path: str | Path, source: str | None = None,
                    extra_metadata: dict[str, Any] | None = None, force: bool = False,
                    protect: tuple[Path, ...] = ()) -> Path:
    """Write ``model`` as a checkpoint directory at ``path``: staged beside it complete, then
    swapped in by one rename under the directory's write lock. ``path`` must be absent, empty
    or a checkpoint of the same source (`check_target`); ``force`` replaces anything else."""
    out = Path(path)
    identity = _identity({"source": source, **(extra_metadata or {})})
    check_target(out, identity, force, protect)
    assert_finite(model.state_dict(), source=str(source or "the model"))
    with fileio.staging_dir(out) as staging:
        tmp = staging.path
        state = {k: v.detach().to("cpu", torch.float32).contiguous()
                 for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
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
        with fileio.lock(out):
            check_target(out, identity, force, protect)  # again: another writer may have won
            fileio.clean_stale(out)
            fileio.swap_directory(tmp, out)
    return out


def read_metadata(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / METADATA_NAME).read_text())


def load_config(path: str | Path) -> DeCoConfig:
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
        return DeCoConfig.from_json(text, where=str(file))
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def load_pretrained(path: str | Path, device: str | torch.device = "cpu",
                    verify: bool = True) -> DeCo | PixelDiT:
    """Load a checkpoint directory (DeCo or the plain-DiT baseline, as its config says); checks
    the weights' sha256 against the metadata."""
    path = Path(path)
    config = load_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_NAME}; the checkpoint is incomplete")
    if verify and (path / METADATA_NAME).is_file():
        expected = read_metadata(path).get("weights_sha256")
        if expected and sha256_file(weights) != expected:
            raise CheckpointError(
                f"{weights} does not match the sha256 in {METADATA_NAME}: the file was changed "
                "or is corrupt; re-create the checkpoint"
            )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {weights}: {err}") from None
    model = build_model(config)
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


def load_state_strict(model: DeCo | PixelDiT, state: dict[str, torch.Tensor], source: str) -> None:
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


# ---------------------------------------------------------------------------------------------
# Reference (Lightning) checkpoints
# ---------------------------------------------------------------------------------------------


def reference_key_to_ours(key: str) -> str:
    """Map a reference denoiser key (prefix removed) to ours: only the prefix changes."""
    if key.startswith("dec_net."):
        return "decoder." + key[len("dec_net."):]
    if key.startswith("x_embedder."):
        return "decoder." + key
    return "dit." + key


def read_reference_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True; every failure becomes a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (not a torch.save zip archive; truncated, or "
            "another kind of file)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path} holds Python objects beyond tensors, so it is refused under "
                f"torch.load(weights_only=True) ({text}). Loading it would execute code from "
                "the file; re-save its state_dict with torch.save on a trusted machine"
            ) from None
        raise CheckpointError(f"cannot read {path}: {text} (truncated or corrupt file?)") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of ``prefix{i}.*`` blocks (0 when there are none)."""
    depth = len(prefix.split("."))
    indices = {int(k.split(".")[depth - 1]) for k in state if k.startswith(prefix)}
    return 1 + max(indices) if indices else 0


def detect_family(state: dict[str, torch.Tensor]) -> str:
    """"t2i" when the (our-key) state dict has a text embedder, else "c2i"."""
    return "t2i" if "dit.y_embedder.proj.weight" in state else "c2i"


def infer_config(state: dict[str, torch.Tensor], image_size: tuple[int, int] | None = None
                 ) -> DeCoConfig:
    """Recover the model shape (and family, from the keys) from a (our-key) state dict."""
    family = detect_family(state)
    text: dict[str, Any] = {}
    try:
        hidden = state["dit.s_embedder.proj.weight"].shape[0]
        patch_in = state["dit.s_embedder.proj.weight"].shape[1]
        head_dim = state["dit.blocks.0.attn.q_norm.weight"].shape[0]
        dec_hidden = state["decoder.input_proj.weight"].shape[0]
        in_channels = state["decoder.final_layer.linear.weight"].shape[0]
        if family == "t2i":
            num_classes = 0
            text = {
                "family": "t2i",
                "text_dim": state["dit.y_embedder.proj.weight"].shape[1],
                "text_len": state["dit.y_pos_embedding"].shape[1],
                "refine_depth": _count_blocks(state, "dit.text_refine_blocks."),
            }
        else:
            num_classes = state["dit.y_embedder.embedding_table.weight"].shape[0] - 1
    except KeyError as err:
        kind = "text-to-image" if family == "t2i" else "class-conditional"
        raise CheckpointError(
            f"the checkpoint has no tensor {err.args[0]!r}: it is not a {kind} DeCo model "
            "(PixNerd and baseline checkpoints are not supported)"
        ) from None
    patch = round((patch_in / in_channels) ** 0.5)
    if image_size is None:
        native = 512 if family == "t2i" else 256
        image_size = (native, native) if patch == 16 else (patch * 8, patch * 8)
    return DeCoConfig(
        hidden_size=hidden, num_heads=hidden // head_dim,
        dit_depth=_count_blocks(state, "dit.blocks."),
        decoder_hidden_size=dec_hidden, decoder_depth=_count_blocks(state, "decoder.res_blocks."),
        patch_size=patch, num_classes=num_classes, in_channels=in_channels,
        image_size=image_size, **text,
    )


def load_reference(path: str | Path, weights: str = "ema",
                   image_size: tuple[int, int] | None = None) -> DeCo:
    """Load a reference Lightning checkpoint (``zehongma/DeCo`` layout) into :class:`DeCo`.

    The family (class labels or text) is read from the keys: a ``y_embedder.proj`` means the
    text-to-image model (``t2i_DeCo.ckpt``).

    ``weights="ema"`` takes ``ema_denoiser.*`` (what every reported result used);
    ``"online"`` takes ``denoiser.*``.
    """
    if weights not in REFERENCE_PREFIXES:
        raise CheckpointError(
            f"weights must be one of {sorted(REFERENCE_PREFIXES)}, not {weights!r}"
        )
    ckpt = read_reference_checkpoint(path)
    state_dict = ckpt.get("state_dict", ckpt)
    prefix = REFERENCE_PREFIXES[weights]
    picked = {k[len(prefix):]: v for k, v in state_dict.items()
              if isinstance(k, str) and k.startswith(prefix)}
    if not picked:
        found = sorted({k.split(".")[0] for k in state_dict if isinstance(k, str)})
        raise CheckpointError(
            f"{path} has no '{prefix}*' tensors (found prefixes {found}); it is not a reference "
            "DeCo checkpoint" + (", or choose the other --weights" if found else "")
        )
    state = {reference_key_to_ours(k): v for k, v in picked.items()}
    model = DeCo(infer_config(state, image_size))
    load_state_strict(model, state, source=f"{path} ({prefix}*)")
    return model.eval()


def convert_reference(path: str | Path, out: str | Path, weights: str = "ema",
                      image_size: tuple[int, int] | None = None, force: bool = False) -> Path:
    """`deco convert`: reference .ckpt -> our checkpoint directory. ``out`` must be absent,
    empty or a conversion of the same file (``force`` replaces anything else)."""
    sha = sha256_file(path) if Path(path).is_file() else None
    check_target(Path(out), sha, force, protect=(Path(path),))  # before the slow load
    model = load_reference(path, weights=weights, image_size=image_size)
    return save_pretrained(
        model, out, source=str(Path(path).resolve()),
        extra_metadata={"source_sha256": sha, "source_weights": weights}, force=force,
        protect=(Path(path),),
    )


def load_any(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu"
             ) -> DeCo | PixelDiT:
    """A checkpoint directory of ours, or a reference ``.ckpt`` file."""
    path = Path(path)
    if path.is_dir():
        return load_pretrained(path, device=device)
    return load_reference(path, weights=weights).to(device)
