"""The exporters' side of a bundle: stage artefacts, gate them, then commit them all at once.

Every exporter (ONNX, Core ML, TensorRT) writes through :class:`BundleTransaction`:

* the target must be absent, empty, or a bundle of the same model exported from the same
  source checkpoint (sha256); anything else is refused before any work, naming the path and the
  fix (``force=True`` replaces it wholesale, and only once the new bundle is complete). The
  source checkpoint's own directory, and the current directory, are never a target;
* files are written into a staging directory next to the bundle (same filesystem),
* artefacts are described as they are made (I/O specs, details, parity, tool versions),
* the end-to-end gate samples through the runtime sampler with the staged artefacts and
  through PyTorch fp32 from the same noise,
* the commit takes the bundle's write lock (`runtimes.locks.lock`), re-reads the manifest
  (another export may have committed meanwhile), completes the staging directory with every
  file of the existing bundle that this export does not replace, writes the merged manifest
  there and swaps the whole directory in with one rename. At every instant the bundle path holds
  the old complete bundle or the new one. On any exception the staging directory is removed and
  an existing bundle is left exactly as it was; a killed export's staging directory is removed
  by the next export.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtimes import bundle as rb
from runtimes.config import ModelConfig
from runtimes.cpu import cpu_record
from runtimes.int8 import Int8KernelWarning
from runtimes.locks import lock
from runtimes.sampler import SamplerConfig, release_sampler
from runtimes.sizes import SizeRange
from runtimes.staging import (
    StagingDir,
    clean_stale,
    copy_tree_into,
    staging_dir,
    swap_directory,
)

from ..labels import id2label_for
from ..model import DeCo
from ..parity import END_TO_END_MIN_PSNR, check_end_to_end_gate, finite, max_abs_error, psnr

PARITY_LABELS = (1, 2)  # with the null class in front: an unguided and two guided samples
PARITY_GUIDANCE = release_sampler("c2i").guidance  # guided at the c2i release's scale
PARITY_SHARING = 0.5  # the DiT on every second step: reused steps run the split decoder
NEGATIVE_EMBEDS_NAME = "negative_prompt.npy"


class TargetError(rb.BundleError):
    """The export's target directory holds something the export must not overwrite."""


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def source_location(source: dict[str, Any]) -> Path | None:
    """The source checkpoint's path on this machine (the embedded default's directory for
    'default'), or None when the record names none that exists."""
    text = (source or {}).get("path")
    if not text:
        return None
    if text == "default":
        from ..sources import DEFAULT_DIR

        return DEFAULT_DIR.resolve()
    path = Path(text)
    return path.resolve() if path.exists() else None


class BundleTransaction:
    """Context manager that adds artefacts to ``bundle`` atomically (see module docstring)."""

    def __init__(self, bundle: str | Path, config: ModelConfig, image_size: tuple[int, int],
                 source: dict[str, Any] | None = None,
                 sampler_defaults: SamplerConfig | None = None, force: bool = False,
                 negative_prompt_embeds: np.ndarray | None = None,
                 negative_prompt: str | None = None, sizes: SizeRange | None = None):
        """``sizes``: the range of image sizes the exported graphs serve (their height and
        width axes dynamic), recorded as the manifest's "sizes"; None keeps the bundle's."""
        self.bundle = Path(bundle)
        self.sizes = sizes
        self.negative_prompt_embeds = negative_prompt_embeds
        self.negative_prompt = negative_prompt
        self.config = config
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.source = source or {}
        self.sampler_defaults = sampler_defaults
        self.force = force
        self.staging: Path
        self._staging: StagingDir | None = None
        # This export's artefacts, kept by the manifest's own rule (one per runtime, graph and
        # precision; a later one replaces an earlier one).
        self._added = rb.Manifest(model=config)
        self.solver_tables: list[rb.SolverTable] = []
        self._text_section: rb.TextSection | None = None  # the manifest's "text" section

    # -- context -----------------------------------------------------------------------------

    def __enter__(self) -> BundleTransaction:
        self.manifest = self._base_manifest()
        clean_stale(self.bundle)
        try:
            self._staging = staging_dir(self.bundle)  # dropped unowned, it removes itself
            self.staging = self._staging.path
            if self.negative_prompt_embeds is not None:
                self._stage_negative_embeds()
        except BaseException:  # __exit__ does not run when __enter__ fails
            if self._staging is not None:
                self._staging.remove()
            raise
        return self

    def _stage_negative_embeds(self) -> None:
        """Write the encoded negative prompt into the bundle and name it in the manifest's
        "text" section, so the unconditional half never needs the text encoder."""
        config = self.config
        embeds = np.asarray(self.negative_prompt_embeds, dtype=np.float32)
        if embeds.ndim == 2:
            embeds = embeds[None]
        if not config.is_text_to_image or embeds.shape != (1, config.text_len, config.text_dim):
            raise ValueError(
                f"negative prompt embeddings must be (1, {config.text_len}, {config.text_dim}) "
                f"for a text-to-image model, got {embeds.shape}"
            )
        path = self.staging / NEGATIVE_EMBEDS_NAME
        np.save(path, embeds, allow_pickle=False)
        self._text_section = rb.TextSection.create(
            self.negative_prompt, NEGATIVE_EMBEDS_NAME, rb.sha256_file(path), rb.path_size(path),
            embeds.shape)
        self.manifest.text = self._text_section

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            if self._staging is not None:
                self._staging.remove()

    # -- the target ----------------------------------------------------------------------------

    def _refuse(self, problem: str) -> TargetError:
        return TargetError(
            f"{self.bundle} {problem}; export into a new or empty directory, or pass --force to "
            "replace it (it is replaced only once the new bundle is complete)"
        )

    def _check_protected(self) -> None:
        """Paths no export may replace, even with force: the source and the working directory."""
        target = self.bundle.resolve()
        src = source_location(self.source)
        if src is not None and (_inside(src, target) or _inside(target, src)):
            raise TargetError(
                f"{self.bundle} is the source checkpoint's own directory ({src}); exporting there "
                "would destroy the checkpoint: export into a new directory, e.g. "
                f"{target.parent / (target.name + '-bundle')}"
            )
        cwd = Path.cwd().resolve()
        if _inside(cwd, target):
            raise TargetError(
                f"{self.bundle} is the current directory (or holds it); a bundle is swapped in "
                "whole, so name a new directory, e.g. ./bundle"
            )

    def _existing(self) -> rb.Manifest | None:
        """The manifest of the bundle at the target when an export may extend it; None when
        the target is absent or empty, or will be replaced wholesale (force)."""
        self._check_protected()
        target = self.bundle
        if not os.path.lexists(target):
            return None
        if target.is_symlink() or not target.is_dir():
            raise TargetError(
                f"{target} exists and is not a directory; choose a bundle directory (absent or "
                "empty)"
            )
        if not any(target.iterdir()):
            return None
        if not (target / rb.MANIFEST_NAME).is_file():
            if self.force:
                return None
            raise self._refuse("is not empty and is not a deco bundle (no manifest.json)")
        try:
            manifest = rb.read_manifest(target)
        except rb.BundleError as exc:
            if self.force:
                return None
            raise self._refuse(f"holds a damaged bundle ({exc})") from None
        if manifest.model != self.model_config:
            if self.force:
                return None
            raise self._refuse(
                f"holds a different model ({manifest.model.to_dict()}, this export: "
                f"{self.model_config.to_dict()})"
            )
        if self.sizes is not None and manifest.sizes not in (None, self.sizes):
            if self.force:
                return None
            raise self._refuse(
                f"was exported for sizes {manifest.sizes.describe()} (this export: "
                f"{self.sizes.describe()}); its other graphs were checked at those"
            )
        theirs, ours = (manifest.source or {}).get("sha256"), self.source.get("sha256")
        if theirs != ours:
            if self.force:
                return None
            raise self._refuse(
                f"was exported from another checkpoint (source sha256 {str(theirs)[:12]}..., this "
                f"export's {str(ours)[:12]}...); mixing them would break its parity figures"
            )
        return manifest

    def _base_manifest(self) -> rb.Manifest:
        """The existing manifest (to extend it), or a new one for this model."""
        manifest = self._existing()
        if manifest is not None:
            return manifest
        defaults = self.sampler_defaults or release_sampler(self.config.family)
        labels = id2label_for(self.config, self.source)
        return rb.Manifest(model=self.model_config, sampler_defaults=defaults,
                           source=dict(self.source), package_version=package_version(),
                           sizes=self.sizes,
                           extra={rb.ID2LABEL_SECTION: labels} if labels else {})

    @property
    def model_config(self) -> ModelConfig:
        """The exported model: the checkpoint's config at the size the graphs were made for."""
        return dataclasses.replace(self.config, image_size=self.image_size)

    # -- artefacts ---------------------------------------------------------------------------

    def add_artifact(self, *, runtime: str, graph: str, precision: str, path: Path,
                     inputs: Sequence[rb.TensorSpec | Mapping[str, Any]],
                     outputs: Sequence[rb.TensorSpec | Mapping[str, Any]],
                     details: dict | None = None,
                     parity: dict | None = None, tools: dict | None = None,
                     extra_files: list[Path] | None = None) -> rb.Artifact:
        """Describe a staged file (or directory, e.g. ``.mlpackage``) as a bundle artefact."""
        artifact = rb.Artifact.from_file(
            self.staging, runtime, graph, precision,
            Path(path).relative_to(self.staging).as_posix(), inputs=inputs, outputs=outputs,
            details=details, parity=parity, tools=tools,
            extra_files=[p.relative_to(self.staging).as_posix() for p in (extra_files or [])])
        self._added.add_artifact(artifact)
        return artifact

    @property
    def artifacts(self) -> list[rb.Artifact]:
        """The artefacts this export staged so far."""
        return self._added.artifacts

    def add_solver_table(self, table: rb.SolverTable) -> None:
        """Record a tuned solver table (`runtimes.solver_tables`) with this commit; a
        transaction of tables alone changes only the manifest."""
        self.solver_tables.append(table)

    def _staged_manifest(self) -> rb.Manifest:
        manifest = rb.Manifest.from_dict(self.manifest.to_dict())
        manifest.sizes = self.sizes or manifest.sizes
        manifest.artifacts = []
        for artifact in self.artifacts:
            manifest.add_artifact(artifact)
        return manifest

    def record_end_to_end(self, runtime: str, precision: str, figures: dict[str, Any]) -> None:
        """Store end-to-end figures on the runtime's artefacts at ``precision``: figures at the
        bundle's default size (or without a size) as "end_to_end", and every sized run in
        "end_to_end_sizes" (one entry per size, the last run of a size kept)."""
        size = (figures.get("height"), figures.get("width"))
        for artifact in self.artifacts:
            if (artifact.runtime, artifact.precision) != (runtime, precision):
                continue
            if size == (None, None) or size == self.image_size:
                artifact.parity["end_to_end"] = dict(figures)
            if size != (None, None):
                runs = [r for r in artifact.parity.get("end_to_end_sizes", [])
                        if (r.get("height"), r.get("width")) != size]
                artifact.parity["end_to_end_sizes"] = [*runs, dict(figures)]

    def end_to_end_parity(self, model: DeCo, backend: str, precision: str, steps: int = 10,
                          seed: int = 0, runtime: str | None = None,
                          image_size: tuple[int, int] | None = None,
                          **backend_options: Any) -> dict[str, Any]:
        """Sample through ``backend`` with the staged artefacts and through PyTorch fp32 from
        the same noise (reference CFG mode, guidance on) at ``image_size`` (default the
        bundle's size); record and gate the PSNR, with the CPU it ran on."""
        import runtimes

        height, width = image_size or self.image_size
        rb.write_manifest(self.staging, self._staged_manifest())
        try:
            with warnings.catch_warnings():  # this run is the gate the warning asks for
                warnings.simplefilter("ignore", Int8KernelWarning)
                pipe = runtimes.load(self.staging, backend=backend, precision=precision,
                                     verify=False, allow_below_gate=True, **backend_options)
            figures = end_to_end_figures(model, pipe, (height, width), steps, seed)
        finally:
            (self.staging / rb.MANIFEST_NAME).unlink(missing_ok=True)
        check_end_to_end_gate(precision, figures["psnr_db"],
                              what=f"{backend} {precision} export at {height}x{width}")
        figures["threshold_db"] = END_TO_END_MIN_PSNR[precision]
        figures["cpu"] = cpu_record()  # int8 kernels differ by CPU kind: runtimes.int8
        self.record_end_to_end(runtime or runtime_of(backend), precision,
                               {**figures, "psnr_db": finite(figures["psnr_db"])})
        return figures

    # -- commit ------------------------------------------------------------------------------

    def _commit(self) -> None:
        if not self.artifacts and not self.solver_tables:
            raise ValueError("nothing was exported; the bundle is unchanged")
        with lock(self.bundle):
            # Re-read under the lock: another export may have committed since this one began.
            existing = self._existing()
            manifest = existing if existing is not None else self._base_manifest()
            for artifact in self.artifacts:
                manifest.add_artifact(artifact)
            for table in self.solver_tables:
                manifest.add_solver_table(table)
            manifest.sizes = self.sizes or manifest.sizes
            if self._text_section is not None:
                manifest.text = self._text_section
            if existing is not None:
                copy_tree_into(self.bundle, self.staging, skip={rb.MANIFEST_NAME})
            rb.write_manifest(self.staging, manifest)
            swap_directory(self.staging, self.bundle)


def end_to_end_figures(model: DeCo, pipe: Any, image_size: tuple[int, int], steps: int,
                       seed: int) -> dict[str, Any]:
    """Sample the same noise through ``pipe`` and through PyTorch fp32 eager; compare images.

    Labels put the null class first, then two real classes; guidance is on (reference CFG
    mode), so both branches and the guidance arithmetic are exercised. A DeCo model is sampled
    twice, without DiT sharing and with sharing `PARITY_SHARING` (where the backend has the
    split decoder, the reused steps run its pixel graph on the cached modulation): ``psnr_db``
    and ``max_abs_error`` are the worse of the two, so one gate holds both paths, and
    ``sharing`` keeps the shared run's own figures.
    """
    import runtimes

    from ..backends.torch_backend import TorchBackend

    config = model.config
    reference = runtimes.DeCoPipeline(
        TorchBackend(model, device="cpu"), model_config=config,
        sampler_defaults=release_sampler(config.family))
    if config.is_text_to_image:
        # Unit-scale stand-ins for encoded prompts (the graphs see only embeddings); three
        # prompts against one negative row, the guidance arithmetic on.
        rng = np.random.default_rng(seed)
        condition: dict[str, Any] = {
            "prompt_embeds": rng.standard_normal((3, config.text_len, config.text_dim),
                                                 dtype=np.float32),
            "negative_prompt_embeds": rng.standard_normal((1, config.text_len, config.text_dim),
                                                          dtype=np.float32)}
        batch = 3
    else:
        labels = [config.null_class, *(min(c, config.num_classes - 1) for c in PARITY_LABELS)]
        condition = {"class_labels": labels}
        batch = len(labels)
    sharings = [None, PARITY_SHARING] if config.has_decoder else [None]
    images: list[list[np.ndarray]] = []
    for p in (pipe, reference):
        try:
            images.append([np.asarray(p.generate(
                **condition, steps=steps, guidance=PARITY_GUIDANCE, seed=seed,
                output_type="np", cfg_mode="reference", height=image_size[0],
                width=image_size[1], sharing=sharing).images, dtype=np.float32)
                for sharing in sharings])
        finally:
            p.close()
    errors = [max_abs_error(expected, got) for got, expected in zip(*images, strict=True)]
    psnrs = [psnr(expected, got, data_range=2.0) for got, expected in zip(*images, strict=True)]
    figures: dict[str, Any] = {"status": "passed", "steps": steps, "seed": seed,
                               "guidance": PARITY_GUIDANCE, "batch": batch,
                               "height": int(image_size[0]), "width": int(image_size[1]),
                               "max_abs_error": max(errors), "psnr_db": min(psnrs)}
    if len(sharings) > 1:
        figures["sharing"] = {"ratio": PARITY_SHARING, "max_abs_error": errors[1],
                              "psnr_db": finite(psnrs[1])}
    return figures


def runtime_of(backend: str) -> str:
    """The manifest runtime whose artefacts ``backend`` reads (its catalogue entry's)."""
    from runtimes.catalogue import entry

    return entry(backend).runtime or backend


def package_version() -> str:
    from .. import __version__

    return __version__
