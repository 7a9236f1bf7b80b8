"""The exporters' side of a bundle: stage artefacts, gate them, then commit them all at once.

Every exporter (ONNX, Core ML, TensorRT) writes through :class:`BundleTransaction`:

* files are written into a staging directory next to the bundle (same filesystem),
* artefacts are described as they are made (I/O specs, details, parity, tool versions),
* the end-to-end gate samples through the runtime sampler with the staged artefacts and
  through PyTorch fp32 from the same noise,
* on success the staged files move into the bundle and the manifest is rewritten (by
  ``runtimes.bundle``, the one reader and writer); on any exception the staging directory is
  removed and an existing bundle is left exactly as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from runtimes import bundle as rb

from ..config import DeCoConfig
from ..model import DeCo
from ..parity import END_TO_END_MIN_PSNR, check_end_to_end_gate, finite, max_abs_error, psnr

PARITY_LABELS = (1, 2)  # with the null class in front: an unguided and two guided samples
PARITY_GUIDANCE = 3.2


class BundleTransaction:
    """Context manager that adds artefacts to ``bundle`` atomically (see module docstring)."""

    def __init__(self, bundle: str | Path, config: DeCoConfig, image_size: tuple[int, int],
                 source: dict[str, Any] | None = None,
                 sampler_defaults: dict[str, Any] | None = None):
        self.bundle = Path(bundle)
        self.config = config
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.source = source or {}
        self.sampler_defaults = sampler_defaults
        self.staging: Path
        self.artifacts: list[rb.Artifact] = []

    # -- context -----------------------------------------------------------------------------

    def __enter__(self) -> BundleTransaction:
        if self.bundle.exists() and not self.bundle.is_dir():
            raise ValueError(f"{self.bundle} exists and is not a directory; choose a bundle folder")
        self.manifest = self._base_manifest()
        self.bundle.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.bundle.name}.staging-",
                                             dir=self.bundle.parent))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)

    def _base_manifest(self) -> rb.Manifest:
        """The existing manifest (to extend it), or a new one for this model."""
        if (self.bundle / rb.MANIFEST_NAME).is_file():
            manifest = rb.read_manifest(self.bundle)
            if manifest.model != self._model_dict():
                raise ValueError(
                    f"{self.bundle} holds a different model ({manifest.model}); export into a "
                    "new bundle directory"
                )
            return manifest
        defaults = self.sampler_defaults or default_sampler_settings(self.config)
        return rb.Manifest(model=self._model_dict(), sampler_defaults=defaults,
                           source=dict(self.source), package_version=package_version())

    def _model_dict(self) -> dict[str, Any]:
        d = self.config.to_dict()
        d["image_size"] = list(self.image_size)
        return d

    # -- artefacts ---------------------------------------------------------------------------

    def add_artifact(self, *, runtime: str, graph: str, precision: str, path: Path,
                     inputs: list[dict], outputs: list[dict], details: dict | None = None,
                     parity: dict | None = None, tools: dict | None = None,
                     extra_files: list[Path] | None = None) -> rb.Artifact:
        """Describe a staged file (or directory, e.g. ``.mlpackage``) as a bundle artefact."""
        path = Path(path)
        artifact = rb.Artifact(
            runtime=runtime, graph=graph, precision=precision,
            file=path.relative_to(self.staging).as_posix(),
            sha256=rb.sha256_path(path), bytes=rb.path_size(path),
            inputs=inputs, outputs=outputs, details=dict(details or {}),
            parity=dict(parity or {}), tools=dict(tools or {}),
            extra_files={p.relative_to(self.staging).as_posix(): rb.sha256_path(p)
                         for p in (extra_files or [])},
        )
        self.artifacts = [a for a in self.artifacts
                          if (a.runtime, a.graph, a.precision) != (runtime, graph, precision)]
        self.artifacts.append(artifact)
        return artifact

    def _staged_manifest(self) -> rb.Manifest:
        manifest = rb.Manifest.from_dict(self.manifest.to_dict())
        manifest.artifacts = []
        for artifact in self.artifacts:
            manifest.add_artifact(artifact)
        return manifest

    def record_end_to_end(self, runtime: str, precision: str, figures: dict[str, Any]) -> None:
        for artifact in self.artifacts:
            if (artifact.runtime, artifact.precision) == (runtime, precision):
                artifact.parity["end_to_end"] = dict(figures)

    def end_to_end_parity(self, model: DeCo, backend: str, precision: str, steps: int = 10,
                          seed: int = 0, runtime: str | None = None,
                          **backend_options: Any) -> dict[str, Any]:
        """Sample through ``backend`` with the staged artefacts and through PyTorch fp32 from
        the same noise (reference CFG mode, guidance on); record and gate the PSNR."""
        import runtimes

        rb.write_manifest(self.staging, self._staged_manifest())
        try:
            pipe = runtimes.load(self.staging, backend=backend, precision=precision,
                                 verify=False, **backend_options)
            figures = end_to_end_figures(model, pipe, self.image_size, steps, seed)
        finally:
            (self.staging / rb.MANIFEST_NAME).unlink(missing_ok=True)
        check_end_to_end_gate(precision, figures["psnr_db"], what=f"{backend} {precision} export")
        figures["threshold_db"] = END_TO_END_MIN_PSNR[precision]
        self.record_end_to_end(runtime or runtime_of(backend), precision,
                               {**figures, "psnr_db": finite(figures["psnr_db"])})
        return figures

    # -- commit ------------------------------------------------------------------------------

    def _commit(self) -> None:
        if not self.artifacts:
            raise ValueError("nothing was exported; the bundle is unchanged")
        manifest = self.manifest
        for artifact in self.artifacts:
            manifest.add_artifact(artifact)
        if not self.bundle.exists():
            rb.write_manifest(self.staging, manifest)
            os.replace(self.staging, self.bundle)
            return
        for artifact in self.artifacts:
            for rel in [artifact.file, *artifact.extra_files]:
                target = self.bundle / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(self.staging / rel, target)
        rb.write_manifest(self.bundle, manifest)


def end_to_end_figures(model: DeCo, pipe: Any, image_size: tuple[int, int], steps: int,
                       seed: int) -> dict[str, Any]:
    """Sample the same noise through ``pipe`` and through PyTorch fp32 eager; compare images.

    Labels put the null class first, then two real classes; guidance is on (reference CFG
    mode), so both branches and the guidance arithmetic are exercised.
    """
    import runtimes

    from ..torch_backend import TorchBackend

    reference = runtimes.DeCoPipeline(
        TorchBackend(model, device="cpu"), model_config=model.config.to_dict(),
        sampler_defaults=default_sampler_settings(model.config))
    labels = [model.config.null_class, *(min(c, model.config.num_classes - 1)
                                         for c in PARITY_LABELS)]
    images = []
    for p in (pipe, reference):
        try:
            out = p.generate(class_labels=labels, steps=steps, guidance=PARITY_GUIDANCE,
                             seed=seed, output_type="np", cfg_mode="reference",
                             height=image_size[0], width=image_size[1])
        finally:
            p.close()
        images.append(np.asarray(out.images, dtype=np.float32))
    got, expected = images
    return {"status": "passed", "steps": steps, "seed": seed, "guidance": PARITY_GUIDANCE,
            "batch": len(labels), "max_abs_error": max_abs_error(expected, got),
            "psnr_db": psnr(expected, got, data_range=2.0)}


def runtime_of(backend: str) -> str:
    return {"onnxruntime": "onnx", "coreml": "coreml", "tensorrt": "tensorrt"}.get(backend, backend)


def default_sampler_settings(config: DeCoConfig) -> dict[str, Any]:
    """The reference c2i sampler (100 Euler steps, CFG 3.2 on (0.1, 1])."""
    return {"solver": "euler", "steps": 100, "guidance": 3.2, "guidance_interval": [0.1, 1.0],
            "shift": 1.0}


def package_version() -> str:
    from .. import __version__

    return __version__
