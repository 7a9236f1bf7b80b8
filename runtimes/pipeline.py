"""Application API: ``runtimes.load(bundle)`` -> `DeCoPipeline` -> ``pipe.generate(...)``.

Mirrors diffusers' pipelines: a pipeline owns a backend (the model) and builds a sampler
configuration (the scheduler) per call from the bundle's defaults and the caller's overrides.

Backends are found by name in a small registry of ``"module:attribute"`` strings, imported only
when used. Other packages add backends through the ``runtimes.backends`` entry-point group: an
entry named after the backend points to a function that registers it, called the first time
that name is asked for. deco-export registers its PyTorch backends so (without ``runtimes``
importing torch)::

    [project.entry-points."runtimes.backends"]
    torch = "deco_export.backends:register"

and ``deco_export.backends.register`` calls, for each::

    runtimes.register_backend("torch", "deco_export.backends.torch_backend:from_bundle",
                              runtime="torch")
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from runtimes import bundle as _bundle
from runtimes import catalogue as _catalogue
from runtimes.backend import (
    BackendError,
    close_backend,
    supports_decoder_split,
    supports_text_embedding,
    takes_guidance,
)
from runtimes.bundle import BundleError, Manifest, model_config_from_manifest
from runtimes.config import ModelConfig
from runtimes.errors import ConfigError, DecoError
from runtimes.image import ImageInputError, image_input, mask_input, to_pil, to_uint8
from runtimes.int8 import check_int8_load
from runtimes.memory import check_generation
from runtimes.noise import check_noise, noise_for_keys, sample_noise
from runtimes.sampler import SamplerConfig, SamplingCost, SamplingPlan, make_plan, sample
from runtimes.sharing import (
    SharingSchedule,
    SimilarityAccumulator,
    dp_schedule,
    resolve_sharing,
    save_schedule,
    schedule_key,
)
from runtimes.sizes import SizeError, SizeRange
from runtimes.solver_tables import TUNED, tuned_config
from runtimes.solvers import get_solver
from runtimes.steps import (
    Cancellable,
    GenerationInterrupted,
    GenerationTask,
    Inpainting,
    StepHook,
    StepState,
    noised,
)
from runtimes.text_encoder import bundle_text_encoder

__all__ = [
    "CalibrationResult",
    "ClassNameError",
    "DeCoPipeline",
    "GenerationOutput",
    "available_backends",
    "create_backend",
    "load",
    "record_schedule",
    "register_backend",
]

OUTPUT_TYPES = ("pil", "np", "uint8")


def _is_bool(value: Any) -> bool:
    """True for True/False: Python treats them as 1/0, which is never what a caller meant."""
    return isinstance(value, (bool, np.bool_))


def _is_text(value: Any) -> bool:
    """A prompt or a list of prompts (what diffusers' pipelines take first)."""
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and bool(value)
                                      and all(isinstance(v, str) for v in value))


def _either(name: str, value: Any, alias: str, alias_value: Any) -> Any:
    """One setting under its own name or diffusers' (``steps`` / ``num_inference_steps``)."""
    if value is not None and alias_value is not None:
        raise ValueError(f"{name}= and {alias}= are the same setting; pass one of them")
    return value if value is not None else alias_value


class ClassNameError(DecoError, ValueError):
    """A class name the model does not know, or one that names two classes."""


ENTRY_POINT_GROUP = _catalogue.ENTRY_POINT_GROUP


def register_backend(
    name: str | _catalogue.BackendEntry, factory: str | Callable[..., Any] | None = None, *,
    runtime: str | None = None, **entry_fields: Any,
) -> None:
    """Make ``runtimes.load(..., backend=name)`` use ``factory``: a catalogue entry
    (`runtimes.catalogue.BackendEntry`), so ``deco sample``, ``deco bench`` and ``deco
    validate`` see the backend too.

    ``factory`` is a callable or a lazy ``"package.module:Attribute"`` string. It is called as
    ``factory(bundle_dir, manifest, precision=precision, **backend_options)`` (``providers`` is
    among the options when the caller gave it) and must return a `Backend`. ``runtime`` names
    the manifest runtime whose artifacts the backend reads ("onnx", "coreml", "tensorrt"), so
    ``load`` verifies only those files; None verifies the whole bundle. A factory whose
    precisions read another precision's artefacts (OpenVINO's bf16 reads the fp32 graphs)
    offers ``artifact_precision(precision)``, so ``load`` verifies those. ``entry_fields``
    are the entry's other fields (its probe, bench rows, pip extra, ...); ``name`` may also be
    a whole `BackendEntry`.
    """
    if isinstance(name, _catalogue.BackendEntry):
        _catalogue.register(name)
        return
    if factory is None:
        raise ValueError("register_backend needs a factory (a callable or 'module:Attribute')")
    _catalogue.register(_catalogue.BackendEntry(name, factory, runtime=runtime, **entry_fields))


def available_backends() -> list[str]:
    """Registered backend names and those other packages offer through the
    ``runtimes.backends`` entry points (neither means the library is installed)."""
    return sorted(_catalogue.entries())


def _factory(name: str) -> tuple[Callable[..., Any], _catalogue.BackendEntry]:
    entry = _catalogue.entry(name)
    return entry.load_factory(), entry


@dataclass
class GenerationOutput:
    """What ``generate`` returns.

    images: a list of PIL images ("pil"); the float32 samples (B, C, H, W) in about [-1, 1]
        exactly as the sampler produced them, before uint8 conversion ("np"); or (B, H, W, C)
        uint8 ("uint8").
    class_labels / seed: what was generated (seed None when noise was given); class_labels is
        empty for a text-to-image model (``prompts`` holds the prompts when they were given).
    cost: graph calls and per-sample passes (`SamplingCost`, from `SamplingPlan.cost`;
        ``cost.to_dict()`` is its JSON form).
    config: the resolved sampler settings.
    stopped_after: None for a finished run; for a stopped one (`GenerationInterrupted`), the
        steps taken, and ``images`` is the clean estimate after the last of them.
    """

    images: Any
    class_labels: list[int]
    seed: int | list[int] | None
    cost: SamplingCost = field(default_factory=SamplingCost.nothing)
    config: SamplerConfig | None = None
    prompts: list[str] | None = None
    stopped_after: int | None = None


# Where they lived before the typed section (runtimes.bundle reads and verifies it).
TEXT_SECTION = _bundle.TEXT_SECTION
bundle_negative_embeds = _bundle.read_negative_embeds


@dataclass
class CalibrationResult:
    """A StatisticDP calibration: the similarity matrix and one schedule per budget K."""

    similarity: np.ndarray
    schedules: dict[str, SharingSchedule]
    num_evaluations: int
    config: SamplerConfig


class DeCoPipeline:
    """Class-conditional DeCo generation on any backend.

    backend: a `Backend` (ONNX Runtime, PyTorch, ...). model_config: `ModelConfig` or its dict
    (patch_size, num_classes, in_channels, image_size are used). sampler_defaults: the
    `SamplerConfig` (or its manifest dict) used where a call leaves a setting out. schedules:
    calibrated sharing schedules by key (the bundle manifest's "schedules"). id2label: class
    names by index (default: the manifest's), so ``class_labels`` takes names
    (`get_label_ids`). reduce_memory: unload the text encoder (``text_encoder.unload()``) once
    a generation's prompts are encoded, so its weights are not resident while sampling or
    between generations (each prompt encoding loads it again).
    """

    def __init__(
        self,
        backend: Any,
        model_config: ModelConfig | Mapping[str, Any],
        sampler_defaults: SamplerConfig | Mapping[str, Any] | None = None,
        *,
        schedules: Mapping[str, Mapping[str, Any]] | None = None,
        manifest: Manifest | None = None,
        text_encoder: Any = None,
        negative_prompt_embeds: np.ndarray | None = None,
        id2label: Mapping[int | str, str] | None = None,
        reduce_memory: bool = False,
    ) -> None:
        self.backend = backend
        self.text_encoder = text_encoder
        self.reduce_memory = reduce_memory
        self.negative_prompt_embeds = negative_prompt_embeds
        self.model_config = (
            model_config
            if isinstance(model_config, ModelConfig)
            else model_config_from_manifest(model_config, where="model_config")[0]
        )
        self.sampler_defaults = (
            sampler_defaults
            if isinstance(sampler_defaults, SamplerConfig)
            else SamplerConfig.from_dict(sampler_defaults)
        )
        self.schedules = dict(schedules or {})
        self.manifest = manifest
        names = id2label if id2label is not None else (
            manifest.id2label if manifest is not None else {})
        self.id2label: dict[int, str] = {int(k): str(v) for k, v in names.items()}
        self._generating = threading.Lock()

    # -- configuration ----------------------------------------------------------------------

    def sampler_config(
        self,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        solver: str | None = None,
        shift: float | None = None,
        timesteps: Sequence[float] | None = None,
        cfg_mode: str = "fast",
        guidance_bounds: str | None = None,
        guidance_edges: bool | None = None,
    ) -> SamplerConfig:
        """The bundle's sampler defaults with the given overrides applied
        (``dataclasses.replace``; the config checks every value). ``solver="tuned"`` runs the
        bundle's tuned solver table fitted for these steps, guidance, interval and shift
        (`runtimes.solver_tables`; a ConfigError when it has none)."""
        if timesteps is not None and steps is not None and len(timesteps) != steps + 1:
            raise ConfigError(
                f"steps={steps} but {len(timesteps)} timesteps were given (need steps + 1); "
                f"pass only timesteps="
            )
        if _is_bool(guidance) or _is_bool(shift):
            raise ConfigError("guidance and shift must be numbers, not True/False")
        given = {"num_steps": steps, "guidance": guidance, "solver": solver, "shift": shift,
                 "guidance_bounds": guidance_bounds, "cfg_mode": cfg_mode,
                 "guidance_edges": guidance_edges,
                 "guidance_interval": None if guidance_interval is None else tuple(
                     guidance_interval)}
        overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        if timesteps is not None:
            overrides["timesteps"] = tuple(timesteps)
        elif steps is not None:
            overrides["timesteps"] = None  # a step count replaces the defaults' explicit grid
        tuned = solver == TUNED
        if tuned:
            overrides.pop("solver")
        elif solver is not None and get_solver(solver).name != "table":
            overrides["coefficients"] = None  # a table belongs to the "table" solver
        config = replace(self.sampler_defaults, **overrides)
        if tuned:  # the bundle's table fitted for these steps, guidance, interval and shift
            manifest = self.manifest
            config = tuned_config(manifest.solver_tables if manifest else {},
                                  manifest.model_hash if manifest else None, config)
        return config

    def plan(
        self, config: SamplerConfig, sharing: Any = None
    ) -> SamplingPlan:
        """Precompute the sampling plan, resolving a sharing spec against its evaluation count."""
        n_eval = make_plan(config).num_evaluations
        return make_plan(config, resolve_sharing(sharing, n_eval, self.schedules))

    # -- validation ---------------------------------------------------------------------------

    def size_range(self) -> SizeRange | None:
        """The image sizes this pipeline's backend serves (`Manifest.size_range` for the
        backend's runtime); None without a bundle (a model in memory runs any multiple of the
        patch size)."""
        if self.manifest is None:
            return None
        return self.manifest.size_range(getattr(self.backend, "runtime", None))

    @property
    def labels(self) -> dict[str, int]:
        """Class index by name: every comma-separated synonym of each ``id2label`` entry
        ("tench, Tinca tinca" gives "tench" and "Tinca tinca"), as diffusers' DiT pipeline."""
        out: dict[str, int] = {}
        for index, names in sorted(self.id2label.items()):
            for name in names.split(","):
                out.setdefault(name.strip(), index)
        return out

    def get_label_ids(self, names: str | Sequence[str]) -> list[int]:
        """Class indices for class names (case-insensitive; a name two classes share is an
        error naming both)."""
        names = [names] if isinstance(names, str) else list(names)
        if not self.id2label:
            raise ClassNameError(
                f"this model does not name its classes, so {names[0]!r} means nothing to it; "
                f"pass class indices 0..{self.model_config.num_classes - 1}"
            )
        folded: dict[str, set[int]] = {}
        for index, entry in self.id2label.items():
            for synonym in entry.split(","):
                folded.setdefault(synonym.strip().casefold(), set()).add(index)
        out = []
        for name in names:
            found = folded.get(str(name).strip().casefold())
            if not found:
                import difflib

                close = difflib.get_close_matches(str(name), list(self.labels), n=3)
                hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
                raise ClassNameError(
                    f"unknown class name {name!r}; {hint}pipe.labels lists this model's "
                    f"{len(self.id2label)} classes (or pass indices)"
                )
            if len(found) > 1:
                raise ClassNameError(
                    f"class name {name!r} is ambiguous (classes {sorted(found)}: "
                    f"{'; '.join(self.id2label[i] for i in sorted(found))}); pass the index"
                )
            out.append(next(iter(found)))
        return out

    def class_indices(self, class_labels: Any) -> list[int]:
        """Validated class indices for ``class_labels`` (indices or names, one or a list)."""
        if isinstance(class_labels, (int, np.integer, str)) and not isinstance(class_labels,
                                                                                bool):
            class_labels = [class_labels]
        if class_labels is not None and not isinstance(class_labels, np.ndarray):
            class_labels = [self.get_label_ids(lab)[0] if isinstance(lab, str) else lab
                            for lab in class_labels]
        labels = list(np.asarray(class_labels).reshape(-1)) if class_labels is not None else []
        if not labels:
            raise ValueError("class_labels is empty: give at least one class index")
        n = self.model_config.num_classes
        out = []
        for lab in labels:
            if isinstance(lab, (bool, np.bool_)) or not float(lab).is_integer():
                raise ValueError(f"class label {lab!r} is not an integer class index")
            lab = int(lab)
            if not 0 <= lab <= n:
                raise ValueError(
                    f"class label {lab} is out of range: this model has {n} classes, use 0..{n - 1}"
                    f" (or {n}, the null class, for an unconditional sample)"
                )
            out.append(lab)
        return out

    def _size(self, height: int | None, width: int | None, noise: Any) -> tuple[int, int]:
        if noise is not None and np.ndim(noise) == 4:
            height = int(np.shape(noise)[2]) if height is None else height
            width = int(np.shape(noise)[3]) if width is None else width
        default = self.model_config.image_size
        if height is None or width is None:
            if default is None:
                raise ValueError(
                    "this model config has no image_size; pass height= and width= (multiples of "
                    f"the patch size {self.model_config.patch_size})"
                )
            height = default[0] if height is None else height
            width = default[1] if width is None else width
        p = self.model_config.patch_size
        for name, v in (("height", height), ("width", width)):
            if _is_bool(v) or not isinstance(v, (int, np.integer, float)) or int(v) != v:
                raise SizeError(f"{name}={v!r} is not an integer number of pixels")
        height, width = int(height), int(width)
        sizes = self.size_range()
        if sizes is not None:
            return sizes.check(height, width)
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % p:
                lo = max(p, (int(v) // p) * p)
                raise SizeError(
                    f"{name}={v} is not a positive multiple of the patch size {p}; use e.g. {lo} "
                    f"or {lo + p}"
                )
        return int(height), int(width)

    # -- generation ---------------------------------------------------------------------------

    @property
    def is_text_to_image(self) -> bool:
        return self.model_config.is_text_to_image

    def _encode(self, prompts: Sequence[str]) -> np.ndarray:
        if self.text_encoder is None:
            raise ValueError(
                "this pipeline has no text encoder; pass prompt_embeds= (and "
                "negative_prompt_embeds=) from your own encoder, or load it with text_encoder="
            )
        return np.asarray(self.text_encoder.encode(list(prompts)), dtype=np.float32)

    def text_conditions(
        self,
        prompt: str | Sequence[str] | None,
        prompt_embeds: np.ndarray | None,
        negative_prompt: str | Sequence[str] | None,
        negative_prompt_embeds: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(cond, uncond) text embeddings (B, L, C) float32 for a text-to-image model.

        The unconditional rows come from ``negative_prompt_embeds``, else the encoded
        ``negative_prompt``, else the bundle's stored encoding of its negative prompt (the
        empty prompt by default), else the encoded empty prompt; a guidance-distilled model,
        which never runs them, needs none of these.
        """
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass prompt= or prompt_embeds= (one of the two)")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts:
                raise ValueError("prompt is empty: give at least one prompt")
            cond = self._encode(prompts)
        else:
            cond = np.asarray(prompt_embeds, dtype=np.float32)
        shape = (self.model_config.text_len,
                 self.model_config.text_dim)
        if cond.ndim != 3 or tuple(cond.shape[1:]) != shape:
            raise ValueError(
                f"prompt embeddings must be (B, {shape[0]}, {shape[1]}) for this model, got "
                f"{cond.shape}; encode prompts with the model's text encoder"
            )
        if negative_prompt_embeds is not None:
            uncond = np.asarray(negative_prompt_embeds, dtype=np.float32)
        elif negative_prompt is not None:
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(
                negative_prompt)
            if not negatives:
                raise ValueError("negative_prompt is an empty list: give a prompt (or one per "
                                 "image), or leave it out for the bundle's stored one")
            uncond = self._encode(negatives)
        elif self.negative_prompt_embeds is not None:
            uncond = self.negative_prompt_embeds
        elif takes_guidance(self.backend):
            # A guidance-distilled model runs no unconditional half: no row of these is read,
            # so it needs no negative prompt (nor a text encoder to make one).
            uncond = np.zeros_like(cond[:1])
        else:
            uncond = self._encode([""])
        if uncond.ndim == 2:
            uncond = uncond[None]
        if uncond.shape[1:] != cond.shape[1:] or uncond.shape[0] not in (1, cond.shape[0]):
            raise ValueError(
                f"negative prompt embeddings must be (1 or {cond.shape[0]}, {shape[0]}, "
                f"{shape[1]}), got {uncond.shape}"
            )
        # Refused here, named, rather than as "sample diverged ... lower --guidance" after the
        # last step.
        for name, rows in (("prompt", cond), ("negative prompt", uncond)):
            if rows.shape[0] == 0:
                raise ValueError(f"the {name} embeddings are empty (0 rows); give one per image")
            if not np.isfinite(rows).all():
                raise ValueError(f"the {name} embeddings hold NaN or infinite values; check the "
                                 "text encoder that made them")
        if uncond.shape[0] != cond.shape[0]:
            uncond = np.repeat(uncond, cond.shape[0], axis=0)
        return cond, uncond

    def generate(
        self,
        class_labels: Sequence[int | str] | int | str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        solver: str | None = None,
        shift: float | None = None,
        timesteps: Sequence[float] | None = None,
        seed: int | Sequence[int] = 0,
        noise: np.ndarray | None = None,
        output_type: str = "pil",
        cfg_mode: str = "fast",
        sharing: Any = None,
        callback: Callable[[int, int, float], None] | None = None,
        height: int | None = None,
        width: int | None = None,
        guidance_bounds: str | None = None,
        fused_step: bool | None = None,
        *,
        decoder_split: bool = True,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        guidance_edges: bool | None = None,
        on_step: Callable[[StepState], Any] | None = None,
        cancel: Cancellable | None = None,
        return_partial: bool = False,
        image: Any = None,
        strength: float | None = None,
        mask_image: Any = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        latents: np.ndarray | None = None,
        num_images_per_prompt: int = 1,
    ) -> GenerationOutput:
        """Generate one image per class label (label ``num_classes`` gives an unconditional one),
        or, for a text-to-image bundle, one per prompt (``prompt=``, or ``prompt_embeds=``
        (B, L, C) from your own encoder; see `text_conditions` for the negative prompt).

        Settings left as None come from the bundle's sampler defaults. ``noise`` (B, C, H, W)
        replaces the seeded noise (see `runtimes.noise` for how seeds map to noise).
        ``sharing``: None, a ratio (0.5), a list of DiT evaluation indices, a calibrated
        schedule key, a dict ({"ratio": 0.75, "mode": "fresh_t"}) or a `SharingSchedule`.
        ``callback(step_index, num_steps, t)`` runs after every step (a progress bar).
        ``on_step(state)`` also runs after every step and sees the images: a `StepState` with
        the step, t, the latents x_t and the clean estimate x̂ = x_t + (1 - t) v (numpy, the
        batch); returning `runtimes.STOP` from it, or setting ``cancel`` (a
        `threading.Event`), ends the run after that step with `GenerationInterrupted`, whose
        ``output`` is the partial result; ``return_partial=True`` returns that instead (its
        ``stopped_after`` says how many steps ran).

        Image-to-image: ``image`` (see `runtimes.image.image_input`: PIL RGB, uint8, or float
        in [-1, 1]; one image for the batch or one per image; its size is the default size)
        and ``strength`` in [0, 1] (default 0.8, 1.0 with a mask). The run starts at the first
        time t0 of the solver's grid at or above 1 - strength, from x = t0 image + (1 - t0) eps
        (t = 1 is data here), so it takes the last steps of the full run: strength 0 returns
        the image, strength 1 ignores it. Inpainting: ``mask_image`` (white = generate, black =
        keep; see `runtimes.image.mask_input`); after every step the kept pixels are set to
        the image re-noised to the new t, so they end as the image exactly.
        diffusers' names are accepted: ``num_inference_steps`` (``steps``), ``guidance_scale``
        (``guidance``), ``latents`` (``noise``), ``num_images_per_prompt`` (each prompt or
        label repeated, consecutively); on a text-to-image model the first positional argument
        is the prompt, and ``class_labels`` takes class names (see `get_label_ids`).
        ``fused_step`` controls
        the backend's whole-step capability (None: use it where it applies; see `sample`).
        ``decoder_split`` False runs the fused decoder on steps that reuse the DiT's condition
        instead of the cached modulation's pixel part (see `sample`). ``guidance_edges`` puts
        a step boundary on each edge of the guidance interval (`SamplerConfig`).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        steps = _either("steps", steps, "num_inference_steps", num_inference_steps)
        guidance = _either("guidance", guidance, "guidance_scale", guidance_scale)
        noise = _either("noise", noise, "latents", latents)
        if _is_bool(num_images_per_prompt) or not isinstance(
                num_images_per_prompt, (int, np.integer)) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got "
                             f"{num_images_per_prompt!r}")
        repeat = int(num_images_per_prompt)
        if self.is_text_to_image and _is_text(class_labels):  # pipe("a red fox"), as diffusers
            if prompt is not None:
                raise ValueError("the prompt was given twice (positionally and as prompt=)")
            prompt, class_labels = class_labels, None  # type: ignore[assignment]
        uncond: np.ndarray | None = None
        prompts: list[str] | None = None
        if self.is_text_to_image:
            if class_labels is not None:
                raise ValueError("this is a text-to-image model: pass prompt= or prompt_embeds=, "
                                 "not class labels")
            cond, uncond = self.text_conditions(prompt, prompt_embeds, negative_prompt,
                                                negative_prompt_embeds)
            unload = getattr(self.text_encoder, "unload", None)
            if self.reduce_memory and callable(unload):
                unload()
            if prompt is not None:
                prompts = [prompt] if isinstance(prompt, str) else list(prompt)
                prompts = [p for p in prompts for _ in range(repeat)]
            cond, uncond = np.repeat(cond, repeat, axis=0), np.repeat(uncond, repeat, axis=0)
            labels: list[int] = []
            batch = cond.shape[0]
        else:
            if prompt is not None or prompt_embeds is not None:
                raise ValueError("this is a class-conditional model: pass class_labels, not a "
                                 "prompt")
            labels = [lab for lab in self.class_indices(class_labels) for _ in range(repeat)]
            cond = np.asarray(labels, dtype=np.int64)
            batch = len(labels)
        init = self._init_image(image, strength, mask_image, batch)
        if init is not None and noise is None:
            height = init[0].shape[2] if height is None else height
            width = init[0].shape[3] if width is None else width
        h, w = self._size(height, width, noise)
        # Settings first: a bad one fails before anything is allocated.
        config = self.sampler_config(
            steps=steps, guidance=guidance, guidance_interval=guidance_interval, solver=solver,
            shift=shift, timesteps=timesteps, cfg_mode=cfg_mode, guidance_bounds=guidance_bounds,
            guidance_edges=guidance_edges,
        )
        check_generation(self.model_config, batch, h, w)
        shape = (batch, self.model_config.in_channels, h, w)
        if init is not None and init[0].shape[2:] != shape[2:]:
            raise ImageInputError(
                f"the image is {init[0].shape[2]}x{init[0].shape[3]} (HxW) but this call "
                f"generates {h}x{w}; resize it, or leave height/width out to use its size"
            )
        if init is not None and init[1] is not None and init[1].shape[2:] != shape[2:]:
            raise ImageInputError(
                f"the mask is {init[1].shape[2]}x{init[1].shape[3]} (HxW) but the image is "
                f"{h}x{w}; give a mask of the image's size"
            )
        steps_left = -1
        if init is not None:  # the last steps of the full run, from t0 = 1 - strength on
            grid = config.grid()
            start = int(np.argmax(grid >= np.float32(1.0 - init[2]) - np.float32(1e-6)))
            steps_left = grid.size - 1 - start
            if steps_left:
                config = dataclasses.replace(config,
                                             timesteps=tuple(float(t) for t in grid[start:]))
        if noise is not None:
            x0 = check_noise(noise, shape)
            used_seed: int | list[int] | None = None
        else:
            x0 = sample_noise(seed, *shape)
            used_seed = seed if isinstance(seed, (int, np.integer)) else list(seed)
        inpainting = None
        if init is not None:
            known = np.ascontiguousarray(np.broadcast_to(init[0], shape), dtype=np.float32)
            if steps_left == 0:  # strength 0: nothing to generate
                return GenerationOutput(*self._images(known, output_type), labels, used_seed,
                                        SamplingCost.nothing(), config, prompts)
            t0 = float(config.grid()[0])
            if init[1] is not None:
                inpainting = Inpainting(known, init[1], x0)
            x0 = noised(known, x0, t0)
        plan = self.plan(config, sharing)
        hook = None
        if on_step is not None or cancel is not None or inpainting is not None:
            hook = StepHook(self.backend, plan.grid, on_step=on_step, cancel=cancel,
                            inpainting=inpainting)
        split = decoder_split and supports_decoder_split(self.backend)
        embedded = self.is_text_to_image and supports_text_embedding(self.backend)
        distilled = takes_guidance(self.backend)

        def output(x: np.ndarray, stopped_after: int | None = None) -> GenerationOutput:
            return GenerationOutput(*self._images(x, output_type), labels, used_seed,
                                    plan.cost(batch, split, embedded, distilled), config,
                                    prompts, stopped_after)

        try:
            with self._one_generation_at_a_time():
                x = sample(
                    self.backend, x0, cond, plan,
                    null_class=None if uncond is not None else self.model_config.null_class,
                    uncond=uncond, callback=callback, fused_step=fused_step,
                    decoder_split=decoder_split, after_step=hook,
                )
        except GenerationInterrupted as stopped:
            stopped.output = output(stopped.clean_estimate, stopped.steps_done)
            if return_partial:
                return stopped.output  # type: ignore[no-any-return]
            raise
        return output(x)

    __call__ = generate

    @staticmethod
    def _images(x: np.ndarray, output_type: str) -> tuple[Any]:
        if output_type == "np":
            return (x,)
        if output_type == "uint8":
            return (to_uint8(x),)
        return (to_pil(to_uint8(x)),)

    def _init_image(self, image: Any, strength: float | None, mask_image: Any,
                    batch: int) -> tuple[np.ndarray, np.ndarray | None, float] | None:
        """(image (1 or B, C, H, W), mask (1 or B, 1, H, W) or None, strength) of an
        image-to-image or inpainting call; None for one from noise."""
        if image is None:
            if strength is not None or mask_image is not None:
                raise ValueError("strength= and mask_image= need image= (the image to start "
                                 "from)")
            return None
        if strength is None:
            strength = 1.0 if mask_image is not None else 0.8
        if _is_bool(strength) or not isinstance(strength, (int, float, np.number)) or not (
                0.0 <= float(strength) <= 1.0):
            raise ValueError(f"strength must be a number in [0, 1] (0 keeps the image, 1 "
                             f"ignores it), got {strength!r}")
        known = image_input(image, self.model_config.in_channels)
        mask = mask_input(mask_image) if mask_image is not None else None
        for name, a in (("image", known), ("mask_image", mask)):
            if a is not None and a.shape[0] not in (1, batch):
                raise ImageInputError(
                    f"{name} holds {a.shape[0]} images for a batch of {batch}; give one for "
                    "all or one per image")
        return known, mask, float(strength)

    def submit(self, *args: Any, **kwargs: Any) -> GenerationTask:
        """Start ``generate(*args, **kwargs)`` in a worker thread and return its
        `GenerationTask` (``cancel()``, ``latest``, ``result()``, ``future``): the form a GUI
        application uses. One pipeline runs one generation at a time."""
        return GenerationTask(self.generate, *args, **kwargs)
    @contextlib.contextmanager
    def _one_generation_at_a_time(self) -> Iterator[None]:
        """Nothing for a ``thread_safe`` backend; otherwise a second thread's generation is
        refused (not queued: a caller sharing such a pipeline has a bug to fix, not a wait)."""
        if getattr(self.backend, "thread_safe", False):
            yield
            return
        if not self._generating.acquire(blocking=False):
            name = getattr(self.backend, "name", type(self.backend).__name__)
            raise BackendError(
                f"this pipeline's {name} backend is generating in another thread and runs one "
                "generation at a time; give each thread its own pipeline (runtimes.load)"
            )
        try:
            yield
        finally:
            self._generating.release()

    # -- sharing calibration ------------------------------------------------------------------

    def calibrate_sharing(
        self,
        class_labels: Sequence[int],
        budgets: int | Sequence[int],
        *,
        steps: int | None = None,
        guidance: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        solver: str | None = None,
        shift: float | None = None,
        seed: int = 0,
        batch_size: int = 4,
        mode: str = "reuse",
        model_hash: str | None = None,
        height: int | None = None,
        width: int | None = None,
        callback: Callable[[int, int, float], None] | None = None,
    ) -> CalibrationResult:
        """StatisticDP calibration: sample with the DiT at every evaluation, accumulate the mean
        token cosine matrix between evaluations, and solve the DP for each budget K.

        The run uses ``cfg_mode="reference"`` so every evaluation sees the same [uncond; cond]
        batch (as DDT's calibration does), in chunks of ``batch_size`` labels to bound memory.
        Schedules are keyed by `schedule_key` (model hash defaults to the bundle's source
        checkpoint sha256).
        """
        labels = self.class_indices(class_labels)
        h, w = self._size(height, width, None)
        config = self.sampler_config(
            steps=steps, guidance=guidance, guidance_interval=guidance_interval, solver=solver,
            shift=shift, cfg_mode="reference",
        )
        plan = make_plan(config)
        n_eval = plan.num_evaluations
        acc = SimilarityAccumulator(n_eval)

        def record(k: int, cond: Any) -> None:
            acc.add(k, self.backend.to_numpy(cond))

        c = self.model_config.in_channels
        for start in range(0, len(labels), max(1, batch_size)):
            chunk = labels[start : start + max(1, batch_size)]
            keys = [(int(seed), start + i) for i in range(len(chunk))]
            x0 = noise_for_keys(keys, (c, h, w))
            sample(
                self.backend, x0, np.asarray(chunk, np.int64), plan,
                null_class=self.model_config.null_class, callback=callback, on_condition=record,
            )
        sim = acc.matrix
        if model_hash is None:
            source = self.manifest.source if self.manifest is not None else {}
            model_hash = str(source.get("sha256", "unknown"))
        budget_list = [budgets] if isinstance(budgets, int) else list(budgets)
        out: dict[str, SharingSchedule] = {}
        for k in budget_list:
            key = schedule_key(
                model_hash, config.num_steps, config.shift, config.guidance, k, config.solver
            )
            out[key] = dp_schedule(
                sim, k, mode=mode, key=key, solver=config.solver, steps=config.num_steps,
                shift=config.shift, guidance=config.guidance,
                guidance_interval=list(config.guidance_interval), calibration_samples=len(labels),
                seed=int(seed),
            )
        return CalibrationResult(sim, out, n_eval, config)

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        close_backend(self.backend)

    def __enter__(self) -> DeCoPipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def record_schedule(
    bundle_dir: str | os.PathLike[str], key: str, schedule: SharingSchedule
) -> Path:
    """Save ``schedule`` as ``schedules/<key>.json`` in the bundle and record it (with its hash)
    in the manifest, so ``generate(sharing=key)`` finds it and ``verify`` checks it."""
    root = Path(bundle_dir)
    from runtimes.locks import lock  # writers only: a generation never takes it

    with lock(root):  # serialised with exports; the manifest is read under the lock
        manifest = _bundle.read_manifest(root)
        rel = f"schedules/{key}.json"
        path = root / rel
        if path.exists():
            path.unlink()
        save_schedule(path, key, schedule)
        entry = {
            **schedule.to_dict(),
            "file": rel,
            "sha256": _bundle.sha256_file(path),
            "bytes": path.stat().st_size,
        }
        manifest.add_schedule(key, entry)
        _bundle.write_manifest(root, manifest)
    return path


def _on_cpu(providers: Any) -> bool:
    """True when ONNX Runtime providers run the graphs on the CPU (the default)."""
    if providers is None:
        return True
    names = providers.split(",") if isinstance(providers, str) else [
        p if isinstance(p, str) else p[0] for p in providers]
    return all(str(n).strip().lower() in ("cpu", "cpuexecutionprovider") for n in names)


def create_backend(name: str, bundle_dir: str | os.PathLike[str] | None, manifest: Any,
                   **options: Any) -> Any:
    """The registered backend ``name``, created as ``load`` creates it but without reading or
    verifying a bundle: for callers that already hold the manifest (or, for the PyTorch
    backends, the model: ``model=...``, and then ``bundle_dir`` and ``manifest`` may be None)."""
    factory, _ = _factory(name)
    return factory(bundle_dir, manifest, **options)


def load(
    bundle_dir: str | os.PathLike[str],
    backend: str = "onnxruntime",
    precision: str = "fp32",
    providers: Any = None,
    verify: bool = True,
    allow_below_gate: bool = False,
    *,
    text_encoder_providers: Any = None,
    text_encoder_precision: str = "fp32",
    reduce_memory: bool = False,
    **backend_options: Any,
) -> DeCoPipeline:
    """Open a bundle: read the manifest, verify the hashes of the files the backend will read,
    create the backend and return a `DeCoPipeline`.

    ``providers`` (ONNX Runtime: "cpu", "cuda", "tensorrt", "coreml") and ``backend_options``
    (e.g. ``intra_op_threads=2``) are passed to the backend. A text-to-image bundle's text
    encoder runs in ONNX Runtime on ``text_encoder_providers`` (default CPU, whatever the
    backend: e.g. "cuda") from its ``text_encoder_precision`` artefact (fp16 and int8 where
    the export wrote them, int8 checked like the graphs); ``reduce_memory``
    unloads it after each generation's prompts are encoded (see `DeCoPipeline`). int8 graphs
    on the CPU are checked against the kind of CPU their gate ran on (`runtimes.int8`): a
    warning where they are not proven, an `Int8GateError` where they were measured below the
    gate here, unless ``allow_below_gate``.
    """
    root = Path(bundle_dir)
    manifest = _bundle.read_manifest(root)
    factory, entry = _factory(backend)
    runtime = entry.runtime
    # A backend whose precision is a setting on another precision's artefacts (OpenVINO's bf16
    # runs the fp32 ONNX graphs) names the artefacts it reads, so those are the ones verified.
    artifact_precision = entry.artifact_precision(precision)
    if verify:
        problems = _bundle.verify(
            root, runtime=runtime, precision=artifact_precision if runtime else None,
            manifest=manifest,
        )
        if problems:
            raise BundleError(
                f"{root} failed verification:\n  "
                + "\n  ".join(problems)
                + "\n(load(..., verify=False) skips this check)"
            )
    if precision == "int8" and runtime == "onnx" and _on_cpu(providers):
        check_int8_load(root, manifest, allow_below_gate=allow_below_gate)
    if text_encoder_precision == "int8" and _on_cpu(text_encoder_providers):
        check_int8_load(root, manifest, allow_below_gate=allow_below_gate, text_encoder=True)
    options = dict(backend_options)
    if providers is not None:
        options["providers"] = providers
    encoder_options = {} if text_encoder_providers is None else {
        "providers": text_encoder_providers}
    be = factory(root, manifest, precision=precision, **options)
    return DeCoPipeline(
        be, manifest.model, manifest.sampler_defaults, schedules=manifest.schedules,
        manifest=manifest, negative_prompt_embeds=bundle_negative_embeds(root, manifest),
        text_encoder=bundle_text_encoder(root, manifest, precision=text_encoder_precision,
                                         verify=verify, **encoder_options),
        reduce_memory=reduce_memory,
    )
