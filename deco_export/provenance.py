"""Images that say how they were made: the generation parameters as PNG text chunks, and the
``generate`` call that makes the same pixels again from them.

Each parameter is one iTXt chunk ``deco:<name>`` holding its JSON value, so ``exiftool`` or
``identify -verbose`` shows them and `read_record` gets them back typed. A record describes
the whole call that made the image (every label or prompt of its batch) and the image's
index in it: regenerating the same call on the same backend and precision gives the same
pixels, whatever a backend's kernels do with the batch size.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtimes.errors import DecoError

__all__ = ["KEY_PREFIX", "RECORD_FORMAT", "RecordError", "check_model", "generate_arguments",
           "model_sha256", "read_record", "record_text", "sha256_of", "write_images"]

KEY_PREFIX = "deco:"
RECORD_FORMAT = 1


class RecordError(DecoError, ValueError):
    """An image without generation parameters, or parameters that no longer apply."""


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_sha256(source: str | Path) -> str | None:
    """The sha256 of the weights behind a bundle (its source checkpoint's, from the manifest)
    or a checkpoint (a deco checkpoint directory's recorded weights hash, else the file's)."""
    from runtimes.bundle import read_manifest

    from .sources import is_bundle, model_path

    if is_bundle(source):
        sha = (read_manifest(source).source or {}).get("sha256")
        return str(sha) if sha else None
    path = model_path(source)
    if path.is_dir():
        meta = path / "metadata.json"
        sha = json.loads(meta.read_text()).get("weights_sha256") if meta.is_file() else None
        return str(sha) if sha else None
    return sha256_of(path) if path.is_file() else None


def record_text(record: dict[str, Any]) -> dict[str, str]:
    """A record as PNG text chunks: one ``deco:<name>`` per parameter, its value as JSON."""
    return {f"{KEY_PREFIX}{key}": json.dumps(value, ensure_ascii=False)
            for key, value in {"format": RECORD_FORMAT, **record}.items()}


def write_images(images: Sequence[Any], out_dir: str | Path,
                 record: dict[str, Any]) -> list[Path]:
    """Write each image of a call as ``out_dir/INDEX-seedSEED.png`` with the call's record,
    its index and its label or prompt as text chunks (atomically, one by one). An input image
    or mask given as a path is recorded as its resolved path and sha256."""
    from runtimes.image import save_png

    record = dict(record)
    for name in ("image", "mask"):
        if isinstance(record.get(name), Path):
            path = record[name].resolve()
            record[name] = {"path": str(path), "sha256": sha256_of(path)}
    out_dir = Path(out_dir)
    written = []
    for index, image in enumerate(images):
        own = {**record, "index": index}
        if "class_labels" in record:
            own["class"] = record["class_labels"][index]
        if "prompts" in record:
            own["prompt"] = record["prompts"][index]
        path = out_dir / f"{index:03d}-seed{record['seed']}.png"
        written.append(save_png(image, path, text=record_text(own)))
    return written


def check_model(image: str | Path, record: dict[str, Any], source: str | Path) -> None:
    """Refuse to regenerate ``image`` from other weights than the ones that made it."""
    made_by, have = record.get("model_sha256"), model_sha256(source)
    if made_by and have and made_by != have:
        raise RecordError(
            f"{image} was made by the model with sha256 {made_by[:16]}..., but {source} holds "
            f"{have[:16]}...; pass the bundle or checkpoint it was made with"
        )


def read_record(path: str | Path) -> dict[str, Any]:
    """The generation parameters an image written by ``deco sample --out-dir`` carries."""
    from runtimes.image import png_text

    chunks = png_text(path)
    record = {key[len(KEY_PREFIX):]: json.loads(value) for key, value in chunks.items()
              if key.startswith(KEY_PREFIX)}
    if not record:
        raise RecordError(
            f"{path} carries no generation parameters; pass a PNG written by `deco sample "
            "--out-dir`"
        )
    if record.get("format") != RECORD_FORMAT:
        raise RecordError(
            f"{path} records generation parameters in format {record.get('format')!r}; this "
            f"version reads format {RECORD_FORMAT}"
        )
    return record


def generate_arguments(record: dict[str, Any]) -> dict[str, Any]:
    """The ``pipe.generate`` keywords that repeat a recorded call (the input image and mask of
    an image-to-image run are read from their recorded paths and checked by sha256)."""
    from .sampling import parse_sharing, start_image

    args: dict[str, Any] = {
        "steps": record["steps"], "solver": record["solver"], "guidance": record["guidance"],
        "guidance_interval": tuple(record["guidance_interval"]), "shift": record["shift"],
        "seed": record["seed"], "height": record["size"][0], "width": record["size"][1],
        "sharing": parse_sharing(record.get("sharing"), record.get("sharing_mode", "reuse")),
        "guidance_edges": bool(record.get("guidance_edges", False)),
    }
    if "prompts" in record:
        args["prompt"] = record["prompts"]
        args["negative_prompt"] = record.get("negative_prompt")
    else:
        args["class_labels"] = record["class_labels"]
    if record.get("image") is None:
        return args
    paths = {}
    for name in ("image", "mask"):
        entry = record.get(name)
        if entry is None:
            continue
        path = paths[name] = Path(entry["path"])
        if not path.is_file() or sha256_of(path) != entry["sha256"]:
            raise RecordError(
                f"the {name} this image was made from ({path}) is missing or has changed "
                "(sha256 differs); restore it to regenerate"
            )
    args.update(start_image(paths["image"], record.get("strength"), paths.get("mask")))
    return args
