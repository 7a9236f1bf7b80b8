"""Glue between the CLI and the runtime sampler: open a pipeline from a bundle or a checkpoint,
read sharing specs, show progress. The sampling itself lives once, in ``runtimes.sampler``."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from runtimes.sampler import release_sampler

from .backends import CHECKPOINT_BACKEND
from .sources import is_bundle


def bundle_backends() -> list[str]:
    """The catalogue's backends that run a bundle's artefacts (``--backend`` for a bundle)."""
    from runtimes.catalogue import entries

    return [name for name, entry in entries().items() if entry.source == "bundle"]


def default_backend(source: str | Path) -> str:
    """The backend a source runs on when none is named: the catalogue's first for a bundle
    (ONNX Runtime), PyTorch for a checkpoint."""
    return bundle_backends()[0] if is_bundle(source) else CHECKPOINT_BACKEND


def backend_options(backend: str, providers: str | None = None, device: str = "cpu"
                    ) -> dict[str, Any]:
    """The factory options of ``backend`` from the command line: ``--providers`` (a comma
    list), the options its catalogue entry takes from the command line (OpenVINO's
    ``--device``) and its shared-machine defaults (ONNX Runtime's idle threads sleep, the
    command line's counterpart of OMP_WAIT_POLICY=PASSIVE for torch, set by
    deco_export.commands)."""
    from runtimes.catalogue import entry

    found = entry(backend)
    options: dict[str, Any] = dict(found.cli_defaults)
    if providers:
        options["providers"] = [p.strip() for p in providers.split(",") if p.strip()]
    cli = {"device": device}
    options.update({option: cli[flag] for flag, option in found.cli_options.items()
                    if flag in cli})
    return options


def open_pipeline(source: str | Path, backend: str | None = None, precision: str = "fp32",
                  providers: str | None = None, device: str = "cpu", compile: bool = False,
                  allow_below_gate: bool = False, text_encoder_providers: str | None = None,
                  reduce_memory: bool = False, text_encoder_precision: str | None = None):
    """A ``runtimes.DeCoPipeline`` for a bundle (any runtime) or a checkpoint (PyTorch).

    ``allow_below_gate``: open int8 graphs measured below their gate on this CPU.
    ``text_encoder_providers`` places a bundle's ONNX text encoder ("cuda") and
    ``text_encoder_precision`` picks its exported precision (fp16, int8); ``reduce_memory``
    unloads the text encoder once each generation's prompts are encoded."""
    import runtimes

    backend = backend or default_backend(source)
    if is_bundle(source):
        if backend == CHECKPOINT_BACKEND:
            raise ValueError(
                f"{source} is an exported bundle; the {CHECKPOINT_BACKEND} backend samples "
                f"checkpoints. Use --backend {'|'.join(bundle_backends())}, or pass the "
                f"checkpoint"
            )
        options = backend_options(backend, providers, device)
        if allow_below_gate:
            options["allow_below_gate"] = True
        if text_encoder_providers:
            options["text_encoder_providers"] = text_encoder_providers
        if text_encoder_precision:
            options["text_encoder_precision"] = text_encoder_precision
        return runtimes.load(source, backend=backend, precision=precision,
                             reduce_memory=reduce_memory, **options)
    if backend != CHECKPOINT_BACKEND:
        raise ValueError(
            f"{source} is a checkpoint, which only the torch backend runs; export it first "
            f"(`deco export onnx {source} BUNDLE`) to use {backend}"
        )
    from .backends import create_backend
    from .devices import torch_device
    from .labels import id2label_for
    from .sources import load_model, model_path
    from .text_encoders import LazyTextEncoder, recorded_text_encoder

    torch_device(device)  # a bad name is one line, before the model loads
    model, record = load_model(source)
    backend_obj = create_backend(CHECKPOINT_BACKEND, model, device=device, precision=precision,
                                 compile=compile)
    cfg = model.config
    encoder = None
    if cfg.is_text_to_image and (name := recorded_text_encoder(model_path(source))):
        encoder = LazyTextEncoder(name, cfg.text_len, cfg.text_dim)
    return runtimes.DeCoPipeline(backend_obj, model_config=cfg, text_encoder=encoder,
                                 sampler_defaults=release_sampler(cfg.family),
                                 id2label=id2label_for(cfg, record),
                                 reduce_memory=reduce_memory)


def parse_sharing(text: str | None, mode: str = "reuse") -> Any:
    """CLI spelling of a DiT-sharing schedule -> a spec ``runtimes`` understands.

    '0.5' (ratio), 'every:4', '0,3,6,9' (explicit steps), 'path.json[#key]' (a saved schedule),
    or a key of a schedule stored in the bundle.
    """
    if text is None or text.strip().lower() in ("", "none", "off", "0", "0.0"):
        return None if mode == "reuse" else {"ratio": 0.0, "mode": mode}
    text = text.strip()
    if text.startswith("every:"):
        return {"every": int(text.split(":", 1)[1]), "mode": mode}
    if "," in text:
        return {"steps": [int(s) for s in text.split(",") if s.strip()], "mode": mode}
    with contextlib.suppress(ValueError):
        return {"ratio": float(text), "mode": mode}
    path, _, key = text.partition("#")
    if path.endswith(".json"):
        data = json.loads(Path(path).read_text())
        schedules = data.get("schedules", data)
        if not key:
            if len(schedules) != 1:
                raise ValueError(f"{path} holds {len(schedules)} schedules; pick one: {path}#KEY")
            key = next(iter(schedules))
        spec = dict(schedules[key])
        spec["mode"] = mode if mode != "reuse" else spec.get("mode", "reuse")
        return spec
    return text


def preview_writer(path: Path, every: int, cols: int | None = None,
                   scale: int | None = None) -> Any:
    """A step callback that writes the grid of clean estimates to ``path`` every ``every``
    steps (atomically: a viewer polling the file never reads half an image)."""
    from runtimes.image import legible_scale, save_grid, to_uint8

    def write(state: Any) -> None:
        if (state.step + 1) % every and state.step + 1 < state.num_steps:
            return
        images = to_uint8(state.clean_estimate)
        height, width = images.shape[1:3]
        save_grid(images, path, cols=cols, scale=scale or legible_scale(height, width))

    return write


@contextlib.contextmanager
def progress_callback(description: str) -> Iterator[Any]:
    """A tqdm bar fed by the sampler's ``callback(step, num_steps, t)``."""
    from tqdm.auto import tqdm

    bar = None

    def callback(step: int, num_steps: int, t: float) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=num_steps, desc=description, unit="step", leave=False)
        bar.set_postfix(t=f"{t:.3f}", refresh=False)  # drawn once, by the update
        bar.update(1)

    try:
        yield callback
    finally:
        if bar is not None:
            bar.close()


def parse_classes(text: str) -> list[int | str]:
    """``--classes``: comma-separated class indices or names ("0,4" or "Flags,Objects")."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("--classes is empty: give class indices or names, comma-separated")
    return [int(item) if item.lstrip("-").isdigit() else item for item in items]


def start_image(path: Path, strength: float | None, mask: Path | None) -> dict:
    """``generate``'s image-to-image arguments from the command line's files: greyscale and
    palette images read as RGB, a mask as greyscale."""
    from PIL import Image

    with Image.open(path) as opened:
        picture = opened.convert("RGB") if opened.mode in ("L", "P") else opened.copy()
    arguments: dict = {"image": picture, "strength": strength}
    if mask is not None:
        with Image.open(mask) as opened:
            arguments["mask_image"] = opened.convert("L")
    return arguments
