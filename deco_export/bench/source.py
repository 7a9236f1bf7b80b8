"""The model a benchmark runs: a bundle and its checkpoint, or a checkpoint exported here
(and timed as build time)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from runtimes.bundle import ONNX_PRECISIONS
from runtimes.sampler import release_sampler

from .availability import has_artifacts
from .catalogue import KINDS
from .settings import BenchSettings

ONNX_PARITY_STEPS = 4  # end-to-end gate of an export made by the benchmark (part of build time)


@dataclass
class Source:
    input: str
    kind: str  # "bundle" or "checkpoint"
    bundle: Path
    checkpoint: str
    build: list[dict[str, Any]] = field(default_factory=list)


def check_bundle_size(bundle: Path, manifest: Any, size: tuple[int, int]) -> None:
    """Refuse a benchmark size the bundle's graphs do not serve (one line naming the range):
    a bundle exported with a size range runs every size inside it."""
    default = tuple(manifest.model.image_size)
    if tuple(size) == default:
        return
    span = manifest.size_range("onnx")
    if span is None or span.is_fixed:
        raise ValueError(
            f"{bundle} runs at {default[0]}x{default[1]} only (fixed-size graphs); export it "
            "again with --size-range to benchmark other sizes"
        )
    span.check(*size, where=f"{bundle}'s graphs serve")


def prepare_source(source: str | Path, out: Path, settings: BenchSettings,
                   say: Callable[[str], None]) -> tuple[Source, Any]:
    """Resolve ``source``; export a checkpoint's ONNX graphs into ``out/bundle`` (build time).

    Returns the source record and the bundle's manifest. The checkpoint is loaded here once to
    check that it is the model the bundle holds (the workers load their own copies).
    """
    from runtimes import bundle as rb

    from ..sources import bundle_source, is_bundle, load_model

    text = str(source)
    if is_bundle(text):
        bundle = Path(text)
        manifest = rb.read_manifest(bundle)
        bundle_source(bundle, manifest, settings.checkpoint, use="the reference row runs it")
        checkpoint = settings.checkpoint or manifest.source["path"]
        if settings.image_size is not None:
            check_bundle_size(bundle, manifest, settings.image_size)
        src = Source(text, "bundle", bundle, str(checkpoint))
        for art in manifest.artifacts:
            seconds = (art.details or {}).get("export_seconds")
            if art.runtime == "onnx" and seconds is not None:
                src.build.append({"runtime": "onnx", "graph": art.graph,
                                  "precision": art.precision, "status": "from manifest",
                                  "seconds": seconds})
        return src, manifest

    model, record = load_model(text)
    if model.config.is_text_to_image:
        raise ValueError(
            f"{text} is a text-to-image model: benchmark a bundle with its text encoder, "
            f"exported with `deco export onnx {text} BUNDLE --text-encoder DIR`"
        )
    size = settings.image_size or tuple(model.config.image_size)
    bundle = out / "bundle"
    src = Source(text, "checkpoint", bundle, text)
    manifest = rb.read_manifest(bundle) if is_bundle(bundle) else None
    if manifest is not None:
        same = ((manifest.source or {}).get("sha256") == record.get("sha256")
                and list(manifest.model.image_size) == list(size))
        if not same:
            raise ValueError(f"{bundle} holds another model or size; remove it or choose "
                             "another --out")
    wanted = _onnx_precisions_to_build(settings)
    from ..export.onnx import export_onnx

    for precision in wanted:
        if manifest is not None and has_artifacts(manifest, "onnx", precision):
            src.build.append({"runtime": "onnx", "precision": precision, "status": "reused",
                              "seconds": None})
            continue
        say(f"exporting ONNX {precision} graphs into {bundle} (build time)")
        started = time.perf_counter()
        export_onnx(model, bundle, precisions=(precision,), image_size=size, source=record,
                    parity_steps=ONNX_PARITY_STEPS)
        src.build.append({"runtime": "onnx", "precision": precision, "status": "built",
                          "seconds": round(time.perf_counter() - started, 2),
                          "parity_steps": ONNX_PARITY_STEPS})
        manifest = rb.read_manifest(bundle)
    if manifest is None:  # no ONNX row asked for: an empty manifest still describes the model

        manifest = rb.Manifest(model=replace(model.config, image_size=tuple(size)),
                               sampler_defaults=release_sampler(model.config.family),
                               source=record)
    return src, manifest


def _onnx_precisions_to_build(settings: BenchSettings) -> list[str]:
    chosen = settings.backends if settings.backends is not None else tuple(KINDS)
    if not any(KINDS[n].runtime == "onnx" for n in chosen if n not in settings.skip):
        return []
    asked = settings.precisions if settings.precisions is not None else ("fp32", "fp16")
    return [p for p in ONNX_PRECISIONS if p in asked]
