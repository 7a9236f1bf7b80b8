"""`deco bench`: one benchmark across runtimes, precisions, batch sizes and step counts.

Users pick a runtime from this report, so it is built to be trusted:

* **One model, one noise.** Every row samples the same model (a bundle's graphs, or the
  checkpoint it was exported from) from the same seeded noise and labels, so speed and image
  quality are compared like for like.
* **The reference row first.** Row one is the reference-style sampler: PyTorch eager fp32 with
  both CFG halves ([uncond; cond]) every step, as the reference DeCo code samples. Every other
  row reports its speed-up against it (same batch, same steps) and its image change against it
  (max abs error, PSNR on [-1, 1] images).
* **One process per backend.** Each backend x precision runs in a fresh Python process, so the
  peak RSS (``VmHWM``) belongs to that backend alone and a crash costs one row. Runtime workers
  never import torch (``python -m deco_export.bench.worker`` imports no torch at module level),
  so an ONNX Runtime row's memory is what an application embedding ``runtimes`` would see.
* **Per-stage times.** The backend object is wrapped in `TimingBackend`, which implements the
  same protocol and times the DiT and decoder calls (synchronising async GPU backends around
  each call); what remains of the wall time is sampler overhead (the guidance arithmetic, the
  Euler update, host copies).
* **Nothing silently dropped.** A backend the machine cannot run (no GPU, no TensorRT, Core ML
  off macOS, a precision the bundle lacks) is a row with the reason.

Timings are medians (and p90) of ``repeats`` runs after ``warmup`` runs. On a shared machine read
the speed-up ratios rather than the absolute numbers.

FID/KID are not computed here: they need the offline Inception network of the training extra,
which deco_export never imports. Use ``deco eval`` for them.
"""


from __future__ import annotations

from .aggregate import assemble_rows, merge_rounds, summarise_run
from .availability import natural_precisions, plan_rows, unavailable_reason
from .catalogue import (
    CFG_MODES,
    KINDS,
    PRECISIONS,
    REFERENCE,
    BackendKind,
    BenchError,
    RowSpec,
    aliases,
    backend_kinds,
    expand_backends,
)
from .machine import environment, peak_rss_mib
from .plots import write_plots
from .report import (
    fid_table,
    markdown_report,
    markdown_table,
    row_label,
)
from .run import SCHEMA, run_benchmark
from .settings import BenchSettings
from .source import Source, prepare_source
from .timing import TimingBackend

__all__ = [
    "CFG_MODES",
    "KINDS",
    "PRECISIONS",
    "REFERENCE",
    "SCHEMA",
    "BackendKind",
    "BenchError",
    "BenchSettings",
    "RowSpec",
    "Source",
    "TimingBackend",
    "aliases",
    "assemble_rows",
    "backend_kinds",
    "environment",
    "expand_backends",
    "fid_table",
    "markdown_report",
    "markdown_table",
    "merge_rounds",
    "natural_precisions",
    "peak_rss_mib",
    "plan_rows",
    "prepare_source",
    "row_label",
    "run_benchmark",
    "summarise_run",
    "unavailable_reason",
    "write_plots",
]
