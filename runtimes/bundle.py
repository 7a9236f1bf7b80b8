"""The bundle: a directory an application ships, described by ``manifest.json``.

This is the one reader and the one writer of that manifest; every exporter (ONNX, Core ML,
TensorRT) and every backend goes through it, so the format cannot drift between them.

Layout::

    bundle/
      manifest.json     format + version, model config, sampler defaults, source checkpoint hash,
                        and per artifact: runtime, graph, precision, file, sha256, size,
                        inputs/outputs (names, shapes, dtypes), details (opset, cache keys, ...),
                        parity figures, tool versions, extra files (external data) with hashes
      dit.onnx, decoder.onnx, ...   (names are free; the manifest says which is which)
      schedules/*.json  DiT-sharing schedules, also recorded under "schedules"
    (manifest "solver_tables": solver tables tuned for the model, `runtimes.solver_tables`)

The "sizes" section is the range of image sizes the graphs serve (`runtimes.sizes.SizeRange`:
min and max height x width, the default size, the multiple); the artifacts' height, width and
token axes are then symbolic. A runtime compiled for fewer sizes records them in its artifacts'
``details["sizes"]``. A manifest without the section (written when graphs had one size) serves
the size its graphs' shapes name.

Graphs are declared in `runtimes.graphs` (names, inputs and outputs, per model family): "dit"
(x_t, t, y -> cond, hidden; a text-to-image model's DiT takes ``text_tokens`` (B, L, D)
float32 in place of the labels ``y``, from its "text_embed" graph: text -> text_tokens),
"decoder", the optional "refresh", and a text-to-image bundle's "text_encoder" (input_ids,
attention_mask -> hidden, with its tokenizer.json as an extra file).
Runtimes: "onnx", "coreml", "tensorrt". Precisions: "fp32",
"fp16", "bf16", and "int8" (ONNX graphs with int8 weights, quantized dynamically by ONNX
Runtime). Graph inputs and outputs are float32 / int64 whatever the precision: reduced precision
lives inside the graph.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from runtimes.fileio import (
    atomic_write_bytes,
    atomic_write_text,
    path_size,
    sha256_file,
    sha256_path,
)

from .config import ModelConfig
from .errors import ConfigError, DecoError
from .graphs import GRAPH_NAMES, GRAPH_SPECS, TensorSpec
from .sampler import SamplerConfig
from .sizes import SizeRange
from .solver_tables import SolverTable

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "GRAPHS",
    "MANIFEST_NAME",
    "ONNX_PRECISIONS",
    "PRECISIONS",
    "RUNTIMES",
    "SOLVER_TABLES_SECTION",
    "TEXT_SECTION",
    "Artifact",
    "BundleError",
    "Manifest",
    "ModelConfig",
    "SizeRange",
    "SolverTable",
    "TensorSpec",
    "TextSection",
    "atomic_write_bytes",
    "atomic_write_text",
    "path_size",
    "read_manifest",
    "read_negative_embeds",
    "sha256_file",
    "sha256_path",
    "verify",
    "write_manifest",
]

FORMAT = "deco-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
RUNTIMES = ("onnx", "coreml", "tensorrt")
GRAPHS = GRAPH_NAMES  # declared in runtimes.graphs, one record each
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
ONNX_PRECISIONS = ("fp32", "fp16", "int8")  # the variants `deco export onnx` writes


class BundleError(DecoError):
    """A bundle is missing, malformed or does not hold what was asked for.

    The message names the file or field at fault and how to fix it.
    """


# ---------------------------------------------------------------------------------------------
# Files


def _check_relative(file: str, what: str) -> str:
    p = PurePosixPath(file)
    if not file or p.is_absolute() or ".." in p.parts or "\\" in file:
        raise BundleError(
            f"{what}: file {file!r} must be a relative path inside the bundle (no '..', no "
            f"absolute paths, '/' separators); fix the exporter that wrote it"
        )
    return file


# ---------------------------------------------------------------------------------------------
# Records


@dataclass
class Artifact:
    """One exported graph for one runtime and precision.

    ``file`` is a file or a directory (a Core ML ``.mlpackage``) relative to the bundle;
    ``sha256`` and ``bytes`` come from `sha256_path` / `path_size`. ``extra_files`` maps further
    files the artifact needs (ONNX external data) to their sha256. ``inputs`` / ``outputs``
    accept `TensorSpec` objects or their dicts.
    """

    runtime: str
    graph: str
    precision: str
    file: str
    sha256: str
    bytes: int
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, Any] = field(default_factory=dict)
    extra_files: dict[str, str] = field(default_factory=dict)
    # Sizes of the extra files (manifests written before they were recorded have none): a file
    # of another size is refused without hashing it (a 20 GB tokenizer.json took minutes).
    extra_bytes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"artifact {self.runtime}/{self.graph}/{self.precision}"
        if self.runtime not in RUNTIMES:
            raise BundleError(f"{where}: runtime must be one of {RUNTIMES}")
        if self.graph not in GRAPHS:
            raise BundleError(f"{where}: graph must be one of {GRAPHS}")
        if self.precision not in PRECISIONS:
            raise BundleError(f"{where}: precision must be one of {PRECISIONS}")
        _check_relative(self.file, where)
        try:
            self.inputs = [TensorSpec.from_dict(s) for s in self.inputs]
            self.outputs = [TensorSpec.from_dict(s) for s in self.outputs]
        except ConfigError as exc:
            raise BundleError(f"{where}: {exc}; re-export the bundle") from None
        self.extra_files = {_check_relative(str(k), where): str(v)
                            for k, v in dict(self.extra_files).items()}
        for rel, size in dict(self.extra_bytes).items():
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise BundleError(f"manifest.json: {where}: extra_bytes of {rel} must be a "
                                  f"non-negative integer, got {size!r}; re-export the bundle")

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.runtime, self.graph, self.precision)

    def input(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((s for s in self.outputs if s.name == name), None)

    @classmethod
    def from_file(
        cls,
        bundle_dir: str | os.PathLike[str],
        runtime: str,
        graph: str,
        precision: str,
        file: str,
        *,
        inputs: Sequence[TensorSpec | Mapping[str, Any]] = (),
        outputs: Sequence[TensorSpec | Mapping[str, Any]] = (),
        details: Mapping[str, Any] | None = None,
        parity: Mapping[str, Any] | None = None,
        tools: Mapping[str, Any] | None = None,
        extra_files: Iterable[str] = (),
    ) -> Artifact:
        """Record a file (or directory) already written into ``bundle_dir``; hashes and sizes
        of it and of ``extra_files`` (paths relative to the bundle) are computed here."""
        root = Path(bundle_dir)
        path = root / _check_relative(file, f"artifact {runtime}/{graph}/{precision}")
        if not path.exists():
            raise BundleError(f"{path}: artifact file does not exist; write it before recording it")
        extra: dict[str, str] = {}
        extra_bytes: dict[str, int] = {}
        for rel in extra_files:
            p = root / _check_relative(rel, f"artifact {runtime}/{graph}/{precision}")
            if not p.exists():
                raise BundleError(f"{p}: extra file does not exist; write it before recording it")
            extra[rel] = sha256_path(p)
            extra_bytes[rel] = path_size(p)
        return cls(
            runtime=runtime,
            graph=graph,
            precision=precision,
            file=file,
            sha256=sha256_path(path),
            bytes=path_size(path),
            inputs=list(inputs),  # type: ignore[arg-type]
            outputs=list(outputs),  # type: ignore[arg-type]
            details=dict(details or {}),
            parity=dict(parity or {}),
            tools=dict(tools or {}),
            extra_files=extra,
            extra_bytes=extra_bytes,
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "runtime": self.runtime,
            "graph": self.graph,
            "precision": self.precision,
            "file": self.file,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "details": self.details,
            "parity": self.parity,
            "tools": self.tools,
        }
        if self.extra_files:
            d["extra_files"] = dict(self.extra_files)
        if self.extra_bytes:
            d["extra_bytes"] = dict(self.extra_bytes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Artifact:
        if not isinstance(d, Mapping):
            raise BundleError(
                f"manifest.json: an artifact is {d!r}, not an object; re-export the bundle"
            )
        name = "/".join(str(d.get(k, "?")) for k in ("runtime", "graph", "precision"))
        size = d.get("bytes")
        if "bytes" in d and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise BundleError(
                f"manifest.json: artifact {name}: bytes must be a non-negative integer, got "
                f"{size!r}; the manifest is damaged, re-export the bundle"
            )
        sha = d.get("sha256")
        if "sha256" in d and not (isinstance(sha, str) and len(sha) == 64
                                  and all(c in "0123456789abcdef" for c in sha)):
            raise BundleError(
                f"manifest.json: artifact {name}: sha256 must be 64 hex digits, got {sha!r}; the "
                "manifest is damaged, re-export the bundle"
            )
        for key in ("details", "parity", "tools", "extra_files", "extra_bytes"):
            if not isinstance(d.get(key, {}), Mapping):
                raise BundleError(
                    f"manifest.json: artifact {name}: {key} must be an object; re-export the "
                    "bundle"
                )
        try:
            return cls(
                runtime=str(d["runtime"]),
                graph=str(d["graph"]),
                precision=str(d["precision"]),
                file=str(d["file"]),
                sha256=str(d["sha256"]),
                bytes=int(d["bytes"]),
                inputs=list(d.get("inputs", [])),
                outputs=list(d.get("outputs", [])),
                details=dict(d.get("details", {})),
                parity=dict(d.get("parity", {})),
                tools=dict(d.get("tools", {})),
                extra_files=dict(d.get("extra_files", {})),
                extra_bytes=dict(d.get("extra_bytes", {})),
            )
        except KeyError as exc:
            raise BundleError(
                f"manifest.json: an artifact lacks the field {exc.args[0]!r}; re-export the bundle"
            ) from None


# The manifest section naming a class-conditional model's classes.
ID2LABEL_SECTION = "id2label"
TEXT_SECTION = "text"
SOLVER_TABLES_SECTION = "solver_tables"


@dataclass(frozen=True)
class TextSection:
    """A text-to-image bundle's "text" section: the negative prompt and the file that holds its
    encoding (1, L, C) float32, so the unconditional half never needs the text encoder. Read,
    written and verified here only; keys a newer writer adds are kept as they were."""

    negative_prompt: str | None = None
    embeds_file: str | None = None
    embeds_sha256: str | None = None
    embeds_bytes: int | None = None
    embeds_shape: tuple[int, ...] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def create(cls, negative_prompt: str | None, file: str, sha256: str, size: int,
               shape: Sequence[int]) -> TextSection:
        """The section an exporter writes for the encoding it stored at ``file``."""
        _check_relative(file, "text negative_prompt_embeds")
        return cls.from_dict({"negative_prompt": negative_prompt, "negative_prompt_embeds": {
            "file": file, "sha256": sha256, "bytes": int(size), "shape": [int(s) for s in shape]}})

    @classmethod
    def from_dict(cls, d: Any) -> TextSection:
        where = "manifest.json: text"
        if not isinstance(d, Mapping):
            raise BundleError(f"{where} must be an object; export the bundle again")
        embeds = d.get("negative_prompt_embeds")
        if embeds is None:
            return cls(negative_prompt=d.get("negative_prompt"), raw=dict(d))
        if not isinstance(embeds, Mapping) or not {"file", "sha256"} <= set(embeds):
            raise BundleError(f"{where}: negative_prompt_embeds needs a file and its sha256; "
                              "export the bundle again")
        size, shape = embeds.get("bytes"), embeds.get("shape")
        return cls(negative_prompt=d.get("negative_prompt"),
                   embeds_file=str(embeds["file"]), embeds_sha256=str(embeds["sha256"]),
                   embeds_bytes=None if size is None else int(size),
                   embeds_shape=None if shape is None else tuple(int(s) for s in shape),
                   raw=dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw)


def read_negative_embeds(bundle_dir: str | os.PathLike[str], manifest: Manifest
                         ) -> np.ndarray | None:
    """The encoded negative prompt a text-to-image bundle stores (float32), checked against its
    sha256; None when the bundle stores none."""
    text = manifest.text
    if text is None or text.embeds_file is None:
        return None
    path = Path(bundle_dir) / text.embeds_file
    if not path.is_file():
        raise BundleError(f"{path}: missing (the encoded negative prompt); export the bundle again")
    if sha256_file(path) != text.embeds_sha256:
        raise BundleError(
            f"{path}: sha256 does not match the manifest; the file was modified after export: "
            "restore it or export the bundle again"
        )
    stored: np.ndarray = np.load(path, allow_pickle=False)
    return stored.astype(np.float32)
@dataclass
class Manifest:
    """The whole ``manifest.json``. ``model`` and ``sampler_defaults`` (a `SamplerConfig`)
    may be given as dicts.

    ``model_extra`` keeps keys of the "model" section this version does not know (written by a
    newer exporter), so reading and rewriting a manifest never drops them. ``sizes`` is the
    range of image sizes the graphs serve (None for a bundle of fixed-size graphs; see
    `size_range`). ``text`` is a text-to-image bundle's `TextSection`.
    """

    model: ModelConfig
    sampler_defaults: SamplerConfig = field(default_factory=SamplerConfig)
    source: dict[str, Any] = field(default_factory=dict)
    package_version: str = ""
    artifacts: list[Artifact] = field(default_factory=list)
    schedules: dict[str, dict[str, Any]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    model_extra: dict[str, Any] = field(default_factory=dict)
    sizes: SizeRange | None = None
    text: TextSection | None = None
    solver_tables: dict[str, SolverTable] = field(default_factory=dict)

    def __post_init__(self) -> None:
        model: Any = self.model  # a ModelConfig, or its dict from a caller
        if not isinstance(model, ModelConfig):
            self.model, extra = model_config_from_manifest(model)
            self.model_extra = {**extra, **self.model_extra}
        defaults: Any = self.sampler_defaults
        if not isinstance(defaults, SamplerConfig):
            self.sampler_defaults = _sampler_defaults(defaults)
        sizes: Any = self.sizes
        if sizes is not None and not isinstance(sizes, SizeRange):
            self.sizes = _size_range(sizes, "manifest.json: sizes")

    @property
    def id2label(self) -> dict[int, str]:
        """Class names by index, the manifest's "id2label" section (``{"0": name, ...}``, as
        diffusers' DiT pipeline keeps it); empty when the bundle names no classes."""
        section = self.extra.get(ID2LABEL_SECTION) or {}
        if not isinstance(section, dict) or not all(
                str(k).isdigit() and isinstance(v, str) for k, v in section.items()):
            raise BundleError(f'manifest.json: "{ID2LABEL_SECTION}" must map class indices to '
                              "names; export the bundle again")
        return {int(k): v for k, v in section.items()}

    def size_range(self, runtime: str | None = None) -> SizeRange | None:
        """The sizes ``runtime``'s artifacts (all artifacts for None) serve: an artifact's own
        ``details["sizes"]`` (a compiled runtime's list), else the one size its fixed-size
        input names (bundles written before sizes were dynamic), else the manifest's range;
        None when nothing in the bundle limits the size."""
        p = self.model.patch_size
        # The sizes a bundle runs are the ones its DiT-stage graphs on the image (the DiT, or a
        # one-graph model) take: their records' stage and an x_t input say which those are.
        sized = {g.name for g in GRAPH_SPECS if g.stage == "dit" and "x_t" in g.input_names}
        for art in self.artifacts:
            if art.graph not in sized or (runtime is not None and art.runtime != runtime):
                continue
            own = art.details.get("sizes")
            if own is not None:
                where = f"manifest.json: artifact {'/'.join(art.key)}: details.sizes"
                return _size_range(own, where)
            spec = art.input("x_t")
            if spec is not None and len(spec.shape) == 4:
                h, w = spec.shape[2:]
                if isinstance(h, int) and isinstance(w, int):
                    return SizeRange.fixed((h, w), p)
        if self.sizes is not None:
            return self.sizes
        return None

    @property
    def model_hash(self) -> str | None:
        """The sha256 that keys what is calibrated for this model (sharing schedules, tuned
        solver tables): the source checkpoint's, else the DiT graph's; None when neither is
        recorded."""
        sha = (self.source or {}).get("sha256")
        if sha:
            return str(sha)
        return next((str(a.sha256) for a in self.artifacts if a.graph == "dit" and a.sha256),
                    None)

    def _describe(self, runtime: str | None = None) -> str:
        have = [
            "/".join(a.key) for a in self.artifacts if runtime is None or a.runtime == runtime
        ]
        return ", ".join(have) or "none"

    def get_artifact(self, runtime: str, graph: str, precision: str) -> Artifact | None:
        """The artifact for (runtime, graph, precision), or None."""
        return next((a for a in self.artifacts if a.key == (runtime, graph, precision)), None)

    def has_artifact(self, runtime: str, graph: str, precision: str) -> bool:
        return self.get_artifact(runtime, graph, precision) is not None

    def find_artifact(self, runtime: str, graph: str, precision: str) -> Artifact:
        """The artifact for (runtime, graph, precision); BundleError lists what exists."""
        art = self.get_artifact(runtime, graph, precision)
        if art is None:
            raise BundleError(
                f"this bundle has no {runtime} {graph} graph at {precision} (it has: "
                f"{self._describe()}); export it with `deco export {runtime} --precision "
                f"{precision}` or pick a precision the bundle has"
            )
        return art

    def add_artifact(self, artifact: Artifact) -> None:
        """Add ``artifact``, replacing any artifact with the same runtime/graph/precision."""
        self.artifacts = [a for a in self.artifacts if a.key != artifact.key]
        self.artifacts.append(artifact)

    def add_schedule(self, key: str, entry: Mapping[str, Any]) -> None:
        """Record a DiT-sharing schedule (``entry`` may name a ``file`` with its ``sha256``)."""
        if "file" in entry:
            _check_relative(str(entry["file"]), f"schedule {key}")
        self.schedules[key] = dict(entry)

    def add_solver_table(self, table: SolverTable) -> None:
        """Record a tuned solver table under its key (replacing one fitted for the same model,
        NFE, guidance, interval and shift)."""
        self.solver_tables[table.key] = table

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": FORMAT,
            "format_version": self.format_version,
            "model": {**self.model.to_dict(), **self.model_extra},
            "sampler_defaults": self.sampler_defaults.to_dict(),
            "source": self.source,
            "package_version": self.package_version,
            "artifacts": [a.to_dict() for a in self.artifacts],
            "schedules": self.schedules,
        }
        if self.sizes is not None:
            d["sizes"] = self.sizes.to_dict()
        if self.text is not None:
            d[TEXT_SECTION] = self.text.to_dict()
        if self.solver_tables:
            d[SOLVER_TABLES_SECTION] = {k: t.to_dict() for k, t in self.solver_tables.items()}
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        if d.get("format") != FORMAT:
            raise BundleError(
                f"manifest.json: format is {d.get('format')!r}, not {FORMAT!r}; this is not a "
                f"deco bundle"
            )
        version = d.get("format_version")
        if not isinstance(version, int):
            raise BundleError("manifest.json: format_version is missing; re-export the bundle")
        if version > FORMAT_VERSION:
            raise BundleError(
                f"manifest.json: format_version {version} is newer than this runtime reads "
                f"({FORMAT_VERSION}); upgrade deco-export"
            )
        if "model" not in d:
            raise BundleError("manifest.json: no 'model' section; re-export the bundle")
        if not isinstance(d["model"], Mapping):
            raise BundleError("manifest.json: 'model' must be an object; re-export the bundle")
        if not isinstance(d.get("artifacts", []), list):
            raise BundleError(
                "manifest.json: 'artifacts' must be a list; the manifest is damaged, export the "
                "bundle again"
            )
        known = {"format", "format_version", "model", "sampler_defaults", "source",
                 "package_version", "artifacts", "schedules", "sizes", TEXT_SECTION,
                 SOLVER_TABLES_SECTION}
        model, model_extra = model_config_from_manifest(d["model"])
        sizes = d.get("sizes")
        return cls(
            model=model,
            model_extra=model_extra,
            sampler_defaults=_sampler_defaults(d.get("sampler_defaults")),
            source=dict(d.get("source", {})),
            package_version=str(d.get("package_version", "")),
            artifacts=[Artifact.from_dict(a) for a in d.get("artifacts", [])],
            schedules={str(k): dict(v) for k, v in d.get("schedules", {}).items()},
            format_version=version,
            extra={k: v for k, v in d.items() if k not in known},
            sizes=None if sizes is None else _size_range(sizes, "manifest.json: sizes"),
            text=None if d.get(TEXT_SECTION) is None else TextSection.from_dict(d[TEXT_SECTION]),
            solver_tables=_solver_tables(d.get(SOLVER_TABLES_SECTION)),
        )


def _sampler_defaults(d: Any) -> SamplerConfig:
    """The "sampler_defaults" section as a `SamplerConfig`, or a BundleError naming the key."""
    try:
        return SamplerConfig.from_dict(d)
    except ConfigError as exc:
        raise BundleError(f"manifest.json: {exc}; fix the manifest or re-export the bundle"
                          ) from None


def _solver_tables(d: Any) -> dict[str, SolverTable]:
    """The "solver_tables" section by key, or a BundleError naming the table at fault."""
    if d is None:
        return {}
    where = f"manifest.json: {SOLVER_TABLES_SECTION}"
    if not isinstance(d, Mapping):
        raise BundleError(f"{where} must be an object; fix the manifest or calibrate again")
    tables = {}
    for key, entry in d.items():
        try:
            table = SolverTable.from_dict(entry)
        except ConfigError as exc:
            raise BundleError(f"{where}.{key}: {exc}; run `deco calibrate BUNDLE --solver` "
                              "again") from None
        if table.key != key:
            raise BundleError(f"{where}.{key}: the table was fitted for {table.key}; run "
                              "`deco calibrate BUNDLE --solver` again")
        tables[str(key)] = table
    return tables


def _size_range(d: Any, where: str) -> SizeRange:
    """A "sizes" record, or a BundleError naming where it is malformed."""
    if isinstance(d, SizeRange):
        return d
    try:
        return SizeRange.from_dict(d, where=where)
    except ConfigError as exc:
        raise BundleError(f"{exc}; fix the manifest or re-export the bundle") from None


def model_config_from_manifest(
    d: Any, where: str = "manifest.json: model config"
) -> tuple[ModelConfig, dict[str, Any]]:
    """The manifest's "model" section as a `ModelConfig`, plus the keys it does not know.

    Manifests written before the T2I family existed lack ``family`` / ``architecture`` and read
    as a class-conditional DeCo model; a missing or malformed field is a `BundleError`.
    """
    if isinstance(d, ModelConfig):
        return d, {}
    if not isinstance(d, Mapping):
        raise BundleError(f"{where}: must be an object; re-export the bundle")
    known = set(ModelConfig.field_names())
    try:
        config = ModelConfig.from_dict({k: v for k, v in d.items() if k in known}, where=where,
                                       fix="re-export the bundle with a current deco-export")
    except ConfigError as exc:
        raise BundleError(str(exc)) from None
    return config, {k: v for k, v in d.items() if k not in known}


# ---------------------------------------------------------------------------------------------
# Reading, writing, verifying


def read_manifest(bundle_dir: str | os.PathLike[str]) -> Manifest:
    """Parse ``bundle_dir/manifest.json``; BundleError says what is wrong and how to fix it."""
    root = Path(bundle_dir)
    if root.is_file():
        raise BundleError(
            f"{root} is a file, not a bundle directory; pass the directory that holds "
            f"{MANIFEST_NAME} (e.g. {root.parent})"
        )
    if not root.is_dir():
        raise BundleError(
            f"{root}: no such bundle directory; export one with `deco export onnx CHECKPOINT "
            f"{root}`"
        )
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(
            f"{path}: missing, so {root} is not a deco bundle (or its export did not finish); "
            f"export it again"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(
            f"{path}: not valid JSON ({exc}); the file is damaged, export again"
        ) from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object; the file is damaged, export again")
    return Manifest.from_dict(data)


def write_manifest(bundle_dir: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (the bundle is valid before and after, never between)."""
    path = Path(bundle_dir) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path


def _symlink_in(root: Path, rel: str) -> str | None:
    """The first symbolic link on the way from ``root`` to ``rel`` or inside it (a directory
    artifact's members), as a path relative to ``root``; None when there is none."""
    path = root
    for part in PurePosixPath(rel).parts:
        path = path / part
        if path.is_symlink():
            return path.relative_to(root).as_posix()
    if path.is_dir():
        for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
            for name in [*dirnames, *filenames]:
                member = Path(dirpath) / name
                if member.is_symlink():
                    return member.relative_to(root).as_posix()
    return None


def verify(
    bundle_dir: str | os.PathLike[str],
    *,
    runtime: str | None = None,
    precision: str | None = None,
    manifest: Manifest | None = None,
) -> list[str]:
    """Check every file the manifest lists (or only one runtime / precision) against its size
    and sha256. Returns one line per problem, each starting with the file's path in the bundle;
    an empty list means the bundle is intact."""
    root = Path(bundle_dir)
    if manifest is None:
        try:
            manifest = read_manifest(root)
        except BundleError as exc:
            return [str(exc)]
    # (relative path, expected sha256, expected size or None, where it is listed)
    entries: list[tuple[str, str, int | None, str]] = []
    for art in manifest.artifacts:
        if runtime is not None and art.runtime != runtime:
            continue
        if precision is not None and art.precision != precision:
            continue
        where = "/".join(art.key)
        entries.append((art.file, art.sha256, art.bytes, where))
        entries.extend((rel, sha, art.extra_bytes.get(rel), where)
                       for rel, sha in art.extra_files.items())
    text = manifest.text
    if text is not None and text.embeds_file and text.embeds_sha256:  # read by every runtime
        entries.append((text.embeds_file, text.embeds_sha256, text.embeds_bytes,
                        "text negative_prompt_embeds"))
    if runtime is None and precision is None:
        for key, entry in manifest.schedules.items():
            if "file" in entry and "sha256" in entry:
                size = entry.get("bytes")
                entries.append((str(entry["file"]), str(entry["sha256"]),
                                None if size is None else int(size), f"schedule {key}"))
    problems: list[str] = []
    seen: set[str] = set()
    to_hash: list[tuple[str, str, str]] = []
    # Every cheap check (paths, links, sizes) before any hash: a file of the wrong size is
    # named without being hashed (a 20 GB tokenizer.json took minutes), and before the hashes
    # of the files listed with it.
    for rel, sha, size, where in entries:
        if rel in seen:  # a file shared by several artifacts is checked once
            continue
        seen.add(rel)
        try:
            _check_relative(rel, where)
        except BundleError as exc:
            problems.append(str(exc))
            continue
        path = root / rel
        link = _symlink_in(root, rel)
        if link is not None:
            problems.append(
                f"{rel}: {link} is a symbolic link ({where}); a bundle holds its artifacts as "
                "regular files inside it: replace the link by the file or export again"
            )
            continue
        if not os.path.lexists(path):
            problems.append(
                f"{rel}: missing ({where}); restore the file or export the bundle again"
            )
            continue
        actual = path_size(path)
        if size is not None and actual != size:
            problems.append(
                f"{rel}: {actual} bytes, the manifest says {size} ({where}), so its sha256 cannot "
                "match; the file was changed or truncated after export: restore it or export the "
                "bundle again"
            )
            continue
        to_hash.append((rel, sha, where))
    for rel, sha, where in to_hash:
        digest = sha256_path(root / rel)
        if digest != sha:
            problems.append(
                f"{rel}: sha256 {digest[:16]}... does not match the manifest's {sha[:16]}... "
                f"({where}); the file was modified after export: restore it or export again"
            )
    return problems
