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
import importlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtimes import bundle as _bundle
from runtimes import fileio
from runtimes.backend import (
    BackendError,
    close_backend,
    supports_decoder_split,
    supports_text_embedding,
)
from runtimes.bundle import BundleError, Manifest, SamplerDefaults, model_config_from_manifest
from runtimes.config import ModelConfig
from runtimes.image import to_pil, to_uint8
from runtimes.memory import check_memory, generation_bytes
from runtimes.noise import check_noise, noise_for_keys, sample_noise
from runtimes.sampler import SamplerConfig, SamplingPlan, make_plan, sample
from runtimes.sharing import (
    SharingSchedule,
    SimilarityAccumulator,
    dp_schedule,
    resolve_sharing,
    save_schedule,
    schedule_key,
)
from runtimes.sizes import SizeError, SizeRange
from runtimes.text_encoder import bundle_text_encoder

__all__ = [
    "CalibrationResult",
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


@dataclass(frozen=True)
class _Entry:
    factory: str | Callable[..., Any]
    runtime: str | None


_REGISTRY: dict[str, _Entry] = {
    "onnxruntime": _Entry("runtimes.backends.onnxruntime:OnnxRuntimeBackend", "onnx"),
    "tensorrt": _Entry("runtimes.backends.tensorrt:TensorRTBackend", "tensorrt"),
    "coreml": _Entry("runtimes.backends.coreml:CoreMLBackend", "coreml"),
    "openvino": _Entry("runtimes.backends.openvino:OpenVinoBackend", "onnx"),
}
_ALIASES = {"ort": "onnxruntime", "onnx": "onnxruntime"}
ENTRY_POINT_GROUP = "runtimes.backends"


def register_backend(
    name: str, factory: str | Callable[..., Any], *, runtime: str | None = None
) -> None:
    """Make ``runtimes.load(..., backend=name)`` use ``factory``.

    ``factory`` is a callable or a lazy ``"package.module:Attribute"`` string. It is called as
    ``factory(bundle_dir, manifest, precision=precision, **backend_options)`` (``providers`` is
    among the options when the caller gave it) and must return a `Backend`. ``runtime`` names
    the manifest runtime whose artifacts the backend reads ("onnx", "coreml", "tensorrt"), so
    ``load`` verifies only those files; None verifies the whole bundle. A factory whose
    precisions read another precision's artefacts (OpenVINO's bf16 reads the fp32 graphs)
    offers ``artifact_precision(precision)``, so ``load`` verifies those.
    """
    if not name or not isinstance(name, str):
        raise ValueError("a backend name must be a non-empty string")
    _REGISTRY[name] = _Entry(factory, runtime)


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {e.name: e for e in entry_points(group=ENTRY_POINT_GROUP)}


def available_backends() -> list[str]:
    """Registered backend names and those other packages offer through the
    ``runtimes.backends`` entry points (neither means the library is installed)."""
    return sorted({*_REGISTRY, *_entry_points()})


def _factory(name: str) -> tuple[Callable[..., Any], str | None]:
    key = _ALIASES.get(name, name)
    entry = _REGISTRY.get(key)
    if entry is None and key in (found := _entry_points()):
        found[key].load()()  # the package's registration function
        entry = _REGISTRY.get(key)
    if entry is None:
        raise ValueError(
            f"unknown backend {name!r}: registered backends are {', '.join(available_backends())}"
            f" (deco-export[torch] adds 'torch' and 'torch-cuda')"
        )
    if callable(entry.factory):
        return entry.factory, entry.runtime
    module_name, _, attr = entry.factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"backend {name!r} needs {module_name}, which cannot be imported ({exc}); install its "
            f"runtime library"
        ) from exc
    return getattr(module, attr), entry.runtime


@dataclass
class GenerationOutput:
    """What ``generate`` returns.

    images: a list of PIL images ("pil"); the float32 samples (B, C, H, W) in about [-1, 1]
        exactly as the sampler produced them, before uint8 conversion ("np"); or (B, H, W, C)
        uint8 ("uint8").
    class_labels / seed: what was generated (seed None when noise was given); class_labels is
        empty for a text-to-image model (``prompts`` holds the prompts when they were given).
    cost: graph calls and per-sample passes (see `SamplingPlan.cost`).
    config: the resolved sampler settings.
    """

    images: Any
    class_labels: list[int]
    seed: int | list[int] | None
    cost: dict[str, int] = field(default_factory=dict)
    config: SamplerConfig | None = None
    prompts: list[str] | None = None


# The manifest section of a text-to-image bundle: the negative prompt and the file holding its
# encoding, so the unconditional half never needs the text encoder.
TEXT_SECTION = "text"


def bundle_negative_embeds(root: str | os.PathLike[str], manifest: Manifest) -> np.ndarray | None:
    """The encoded negative (empty) prompt a text-to-image bundle stores, checked against its
    sha256; None when the bundle stores none."""
    entry = (manifest.extra.get(TEXT_SECTION) or {}).get("negative_prompt_embeds")
    if not entry:
        return None
    path = Path(root) / str(entry["file"])
    if not path.is_file():
        raise BundleError(f"{path}: missing (the encoded negative prompt); export the bundle again")
    if _bundle.sha256_file(path) != entry.get("sha256"):
        raise BundleError(
            f"{path}: sha256 does not match the manifest; the file was modified after export: "
            "restore it or export the bundle again"
        )
    stored: np.ndarray = np.load(path, allow_pickle=False)
    return stored.astype(np.float32)


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
    (patch_size, num_classes, in_channels, image_size are used). sampler_defaults: the settings
    used when a call leaves them out. schedules: calibrated sharing schedules by key (the
    bundle manifest's "schedules").
    """

    def __init__(
        self,
        backend: Any,
        model_config: ModelConfig | Mapping[str, Any],
        sampler_defaults: SamplerDefaults | Mapping[str, Any] | None = None,
        *,
        schedules: Mapping[str, Mapping[str, Any]] | None = None,
        manifest: Manifest | None = None,
        text_encoder: Any = None,
        negative_prompt_embeds: np.ndarray | None = None,
    ) -> None:
        self.backend = backend
        self.text_encoder = text_encoder
        self.negative_prompt_embeds = negative_prompt_embeds
        self.model_config = (
            model_config
            if isinstance(model_config, ModelConfig)
            else model_config_from_manifest(model_config, where="model_config")[0]
        )
        self.sampler_defaults = (
            sampler_defaults
            if isinstance(sampler_defaults, SamplerDefaults)
            else SamplerDefaults.from_dict(sampler_defaults)
        )
        self.schedules = dict(schedules or {})
        self.manifest = manifest
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
    ) -> SamplerConfig:
        """The bundle's sampler defaults with the given overrides applied."""
        d = self.sampler_defaults
        if timesteps is not None and steps is not None and len(timesteps) != steps + 1:
            raise ValueError(
                f"steps={steps} but {len(timesteps)} timesteps were given (need steps + 1); "
                f"pass only timesteps="
            )
        if steps is not None and (isinstance(steps, bool)
                                  or not isinstance(steps, (int, np.integer))):
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if _is_bool(guidance) or _is_bool(shift):
            raise ValueError("guidance and shift must be numbers, not True/False")
        g = d.guidance if guidance is None else float(guidance)
        if not np.isfinite(g) or g < 0:
            raise ValueError(f"guidance must be a finite number >= 0, got {guidance}")
        return SamplerConfig(
            solver=solver or d.solver,
            num_steps=int(steps if steps is not None else d.steps),
            shift=float(shift if shift is not None else d.shift),
            timesteps=tuple(timesteps) if timesteps is not None else None,
            last_step=d.get("last_step"),
            guidance=g,
            guidance_interval=tuple(guidance_interval or d.guidance_interval),  # type: ignore[arg-type]
            guidance_bounds=guidance_bounds or d.get("guidance_bounds"),
            cfg_mode=cfg_mode,
            accumulate_time=bool(d.get("accumulate_time", False)),
        )

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

    def _labels(self, class_labels: Any) -> list[int]:
        if isinstance(class_labels, (int, np.integer)) and not isinstance(class_labels, bool):
            class_labels = [class_labels]
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
        return self.model_config.family == "t2i"

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
        empty prompt by default), else the encoded empty prompt.
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
        class_labels: Sequence[int] | int | None = None,
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
    ) -> GenerationOutput:
        """Generate one image per class label (label ``num_classes`` gives an unconditional one),
        or, for a text-to-image bundle, one per prompt (``prompt=``, or ``prompt_embeds=``
        (B, L, C) from your own encoder; see `text_conditions` for the negative prompt).

        Settings left as None come from the bundle's sampler defaults. ``noise`` (B, C, H, W)
        replaces the seeded noise (see `runtimes.noise` for how seeds map to noise).
        ``sharing``: None, a ratio (0.5), a list of DiT evaluation indices, a calibrated
        schedule key, a dict ({"ratio": 0.75, "mode": "fresh_t"}) or a `SharingSchedule`.
        ``callback(step_index, num_steps, t)`` runs after every step. ``fused_step`` controls
        the backend's whole-step capability (None: use it where it applies; see `sample`).
        ``decoder_split`` False runs the fused decoder on steps that reuse the DiT's condition
        instead of the cached modulation's pixel part (see `sample`).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        uncond: np.ndarray | None = None
        prompts: list[str] | None = None
        if self.is_text_to_image:
            if class_labels is not None:
                raise ValueError("this is a text-to-image model: pass prompt= or prompt_embeds=, "
                                 "not class labels")
            cond, uncond = self.text_conditions(prompt, prompt_embeds, negative_prompt,
                                                negative_prompt_embeds)
            if prompt is not None:
                prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            labels: list[int] = []
            batch = cond.shape[0]
        else:
            if prompt is not None or prompt_embeds is not None:
                raise ValueError("this is a class-conditional model: pass class_labels, not a "
                                 "prompt")
            labels = self._labels(class_labels)
            cond = np.asarray(labels, dtype=np.int64)
            batch = len(labels)
        h, w = self._size(height, width, noise)
        # Settings first: a bad one fails before anything is allocated.
        config = self.sampler_config(
            steps=steps, guidance=guidance, guidance_interval=guidance_interval, solver=solver,
            shift=shift, timesteps=timesteps, cfg_mode=cfg_mode, guidance_bounds=guidance_bounds,
        )
        plan = self.plan(config, sharing)
        check_memory(generation_bytes(self.model_config, batch, h, w),
                     f"generating {batch} image(s) of {h}x{w}",
                     "generate fewer or smaller images per call")
        shape = (batch, self.model_config.in_channels, h, w)
        if noise is not None:
            x0 = check_noise(noise, shape)
            used_seed: int | list[int] | None = None
        else:
            x0 = sample_noise(seed, *shape)
            used_seed = seed if isinstance(seed, (int, np.integer)) else list(seed)
        with self._one_generation_at_a_time():
            x = sample(
                self.backend, x0, cond, plan,
                null_class=None if uncond is not None else self.model_config.null_class,
                uncond=uncond, callback=callback, fused_step=fused_step,
                decoder_split=decoder_split,
            )
        if output_type == "np":
            images: Any = x
        elif output_type == "uint8":
            images = to_uint8(x)
        else:
            images = to_pil(to_uint8(x))
        split = decoder_split and supports_decoder_split(self.backend)
        embedded = self.is_text_to_image and supports_text_embedding(self.backend)
        return GenerationOutput(images, labels, used_seed, plan.cost(batch, split, embedded),
                                config, prompts)

    __call__ = generate

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
        labels = self._labels(class_labels)
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
    with fileio.lock(root):  # serialised with exports; the manifest is read under the lock
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
    **backend_options: Any,
) -> DeCoPipeline:
    """Open a bundle: read the manifest, verify the hashes of the files the backend will read,
    create the backend and return a `DeCoPipeline`.

    ``providers`` (ONNX Runtime: "cpu", "cuda", "tensorrt", "coreml") and ``backend_options``
    (e.g. ``intra_op_threads=2``) are passed to the backend.
    """
    root = Path(bundle_dir)
    manifest = _bundle.read_manifest(root)
    factory, runtime = _factory(backend)
    # A backend whose precision is a setting on another precision's artefacts (OpenVINO's bf16
    # runs the fp32 ONNX graphs) names the artefacts it reads, so those are the ones verified.
    reads = getattr(factory, "artifact_precision", None)
    artifact_precision = reads(precision) if callable(reads) else precision
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
    options = dict(backend_options)
    if providers is not None:
        options["providers"] = providers
    be = factory(root, manifest, precision=precision, **options)
    return DeCoPipeline(
        be, manifest.model, manifest.sampler_defaults, schedules=manifest.schedules,
        manifest=manifest, negative_prompt_embeds=bundle_negative_embeds(root, manifest),
        text_encoder=bundle_text_encoder(root, manifest, verify=verify),
    )
