"""The rows a benchmark knows, read from the backend catalogue (`runtimes.catalogue`), and the
names every part of the bench shares.

Each backend's entry lists its bench rows (`runtimes.catalogue.BenchRow`); a backend
registered in the catalogue is a row kind here without an edit. `KINDS` is a live view: it
reads the catalogue each time, so a backend registered after this module was imported is
there too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runtimes import catalogue
from runtimes.catalogue import BackendEntry, BenchRow
from runtimes.errors import DecoError

from ..backends import REFERENCE_ROW as REFERENCE

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
CFG_MODES = ("fast", "reference")
PROGRESS_MARK = "@deco-bench-progress"


class BenchError(DecoError, RuntimeError):
    """The benchmark cannot produce a trustworthy report (e.g. the reference row failed)."""


@dataclass(frozen=True)
class BackendKind:
    """A row kind: one bench row of one catalogue entry.

    name: the row's name; entry: the backend's catalogue entry; row: its `BenchRow` (the
    description, the factory options, whether the CPU's GEMM peak bounds it).
    """

    entry: BackendEntry
    row: BenchRow

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def description(self) -> str:
        return self.row.description

    @property
    def backend(self) -> str:
        """The catalogue name the row loads (``runtimes.load(..., backend=...)``)."""
        return self.entry.name

    @property
    def runtime(self) -> str | None:
        """The manifest runtime whose artefacts the row reads."""
        return self.entry.runtime

    @property
    def runs_checkpoint(self) -> bool:
        """The row runs the checkpoint (a PyTorch row), not the bundle's artefacts."""
        return self.entry.source == "checkpoint"

    @property
    def on_cpu(self) -> bool:
        return self.row.on_cpu

    @property
    def options(self) -> Mapping[str, Any]:
        return self.row.options

    def load_options(self, threads: int | None) -> dict[str, Any]:
        """What the worker passes to the backend's factory: the entry's shared-machine
        defaults, the row's options and the bench's thread count."""
        options: dict[str, Any] = {**self.entry.cli_defaults, **self.row.options}
        if threads and self.entry.bench_threads:
            options[self.entry.bench_threads] = threads
        return options

    def load_spec(self, threads: int | None) -> dict[str, Any]:
        """What a worker process needs to open the row's backend: its catalogue name, its
        factory (so a backend registered in the driver's process is found in the worker's),
        the manifest runtime it reads, what it runs and its load options."""
        return {"backend": self.backend, "factory": self.entry.factory,
                "runtime": self.runtime, "source": self.entry.source,
                "options": self.load_options(threads)}


def backend_kinds() -> list[BackendKind]:
    """Every row kind: the PyTorch rows first, then the CPU rows, then the accelerators'."""
    kinds = [BackendKind(entry, row) for entry in catalogue.entries().values()
             for row in entry.rows()]
    return sorted(kinds, key=lambda k: (not k.runs_checkpoint, not k.on_cpu))


class _LiveKinds(Mapping[str, BackendKind]):
    """Row name -> `BackendKind`, read from the catalogue at each use."""

    def _now(self) -> dict[str, BackendKind]:
        return {k.name: k for k in backend_kinds()}

    def __getitem__(self, name: str) -> BackendKind:
        return self._now()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._now())

    def __len__(self) -> int:
        return len(self._now())


KINDS: Mapping[str, BackendKind] = _LiveKinds()


def aliases() -> dict[str, tuple[str, ...]]:
    """Other names ``--backends`` takes: a backend's name or alias (every row of it) and a
    row's own aliases."""
    kinds = backend_kinds()
    out: dict[str, tuple[str, ...]] = {}
    for kind in kinds:
        for alias in kind.row.aliases:
            out[alias] = (kind.name,)
    rows = {k.name for k in kinds}
    for entry in catalogue.entries().values():
        for name in (entry.name, *entry.aliases):
            if name not in rows:
                out[name] = tuple(k.name for k in kinds if k.entry.name == entry.name)
    return out


# The GEMM peak that bounds a row of each precision (fp16 on a CPU computes in fp32).
PEAK_PRECISION = {"fp32": "fp32", "fp16": "fp32", "bf16": "bf16", "int8": "int8"}


def expand_backends(names: Iterable[str]) -> list[str]:
    """Backend names and aliases ("onnxruntime" = every ONNX Runtime provider) -> row names."""
    kinds, more = KINDS, aliases()
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name in kinds:
            picked: Sequence[str] = (name,)
        elif name in more:
            picked = more[name]
        else:
            known = ", ".join([*kinds, *more])
            raise ValueError(f"unknown backend {raw!r}; choose from {known}")
        out += [p for p in picked if p not in out]
    return out


@dataclass(frozen=True)
class RowSpec:
    """One backend x precision x CFG mode: one worker process, one row per batch x steps."""

    backend: str
    precision: str
    cfg_mode: str

    @property
    def key(self) -> str:
        return f"{self.backend}-{self.precision}" + ("-refcfg" if self.cfg_mode == "reference"
                                                     and self.backend != REFERENCE else "")

    @property
    def kind(self) -> BackendKind:
        return KINDS[self.backend]
