"""Checkpoint IO: our directory format (`deco_export.pretrained`), and import of the reference's
Lightning checkpoints.

The reference's loaders skip missing or mis-shaped tensors with a print; here every mismatch
is an error that lists each tensor.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from runtimes.config import ModelConfig
from runtimes.fileio import sha256_file

from .model import DeCo, PixelDiT, build_model
from .pretrained import (
    CONFIG_NAME,
    METADATA_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    assert_finite,
    check_target,
    load_config,
    load_pretrained_as,
    load_state_strict,
    package_version,
    read_metadata,
    save_pretrained,
)

__all__ = [
    "CONFIG_NAME",
    "METADATA_NAME",
    "REFERENCE_PREFIXES",
    "WEIGHTS_NAME",
    "CheckpointError",
    "assert_finite",
    "check_target",
    "convert_reference",
    "detect_family",
    "infer_config",
    "load_any",
    "load_config",
    "load_pretrained",
    "load_reference",
    "load_state_strict",
    "package_version",
    "read_metadata",
    "read_reference_checkpoint",
    "reference_key_to_ours",
    "save_pretrained",
    "sha256_file",
]

REFERENCE_PREFIXES = {"ema": "ema_denoiser.", "online": "denoiser."}


def load_pretrained(path: str | Path, device: str | torch.device = "cpu",
                    verify: bool = True) -> DeCo | PixelDiT:
    """Load a checkpoint directory (DeCo or the plain-DiT baseline, as its config says); checks
    the weights' sha256 against the metadata."""
    return load_pretrained_as(build_model, path, device=device, verify=verify)


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
                 ) -> ModelConfig:
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
    return ModelConfig(
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
