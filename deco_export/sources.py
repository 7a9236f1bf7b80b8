"""Where a model comes from: an embedded default, a checkpoint directory, or a reference
``.ckpt``. One resolver, so every CLI verb accepts the same spellings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The models that ship inside the package, by the name the command line takes.
EMBEDDED_MODELS = {
    "default": Path(__file__).parent / "default",  # class-conditional, emoji groups, 32x32
    "default-t2i": Path(__file__).parent / "default_t2i",  # text-to-image, emoji names, 32x32
    # their guidance-distilled students (`deco distill-guidance`): the guided image in one pass
    "default-distilled": Path(__file__).parent / "default_distilled",
    "default-t2i-distilled": Path(__file__).parent / "default_t2i_distilled",
}
DEFAULT_NAME = "default"
DEFAULT_DIR = EMBEDDED_MODELS[DEFAULT_NAME]


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def is_embedded(spec: str | Path) -> bool:
    """Whether ``spec`` names a model shipped in the package (`EMBEDDED_MODELS`)."""
    return str(spec) in EMBEDDED_MODELS


def embedded_model_dir(name: str = DEFAULT_NAME) -> Path:
    path = EMBEDDED_MODELS[name]
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded model {name!r} is missing from {path}; reinstall deco-export or pass "
            "a checkpoint path"
        )
    return path


def model_path(spec: str | Path) -> Path:
    """The directory or file a model spelling names: an embedded model's directory, else the
    path itself."""
    return embedded_model_dir(str(spec)) if is_embedded(spec) else Path(spec)


def load_model(spec: str | Path, weights: str = "ema"):
    """(model, source record) for 'default', a checkpoint directory or a reference .ckpt."""
    from .checkpoint import load_any, read_metadata, sha256_file

    path = model_path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; pass {' or '.join(repr(n) for n in EMBEDDED_MODELS)}, a "
            "checkpoint directory or a reference .ckpt"
        )
    if is_bundle(path):
        raise ValueError(
            f"{path} is an exported bundle, not a checkpoint; export from the checkpoint it was "
            "made from (its manifest names it under 'source')"
        )
    model = load_any(path, weights=weights)
    if path.is_dir():
        meta = read_metadata(path, missing_ok=True)
        source: dict[str, Any] = {"path": str(spec) if is_embedded(spec) else
                                  str(path.resolve()), "sha256": meta.get("weights_sha256"),
                                  "kind": "deco-checkpoint"}
    else:
        source = {"path": str(path.resolve()), "sha256": sha256_file(path),
                  "kind": "reference-lightning", "weights": weights}
    return model, source


def bundle_source(root: str | Path, manifest: Any, checkpoint: str | None = None,
                  use: str = "the parity gate compares every artefact with PyTorch"):
    """(model, source record) of the checkpoint a bundle was exported from, checked to be the
    same model: the one answer to "where is this bundle's PyTorch model, and is it this one".

    The manifest names the source, its sha256 and (for a reference ``.ckpt``) which weights
    were exported; ``checkpoint`` overrides the path when the bundle has moved machines (then the
    sha256 is not enforced, the model shape still is). ``use`` says in errors why it is needed.
    """
    recorded = dict(manifest.source or {})
    source = checkpoint or recorded.get("path")
    if not source:
        raise ValueError(
            f"{root} does not name its source checkpoint; pass --checkpoint PATH ({use})"
        )
    if checkpoint is None and not is_embedded(source) and not Path(source).exists():
        raise FileNotFoundError(
            f"the source checkpoint {source} named in {Path(root) / 'manifest.json'} is not on "
            "this machine (was the bundle moved?); pass it with --checkpoint PATH"
        )
    model, record = load_model(source, weights=recorded.get("weights", "ema"))
    expected = recorded.get("sha256")
    if checkpoint is None and expected and record.get("sha256") != expected:
        raise ValueError(
            f"the checkpoint at {source} is not the one {root} was exported from (sha256 "
            "differs); pass the original with --checkpoint"
        )
    if not model.config.same_weights_as(manifest.model):
        raise ValueError(f"{source} is a different model from the one in {root}")
    return model, record


def bundle_source_model(root: str | Path, manifest: Any, checkpoint: str | None = None):
    """The PyTorch model a bundle was exported from, in fp32 on the CPU: the parity reference
    of every gate (see `bundle_source`)."""
    model, _ = bundle_source(root, manifest, checkpoint)
    return model.float().cpu().eval()
