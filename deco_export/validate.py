"""`deco validate`: verify a bundle's hashes and re-run the parity gate of its ONNX artefacts
(and re-measure each tuned solver table's held-out error), or gate a runtime backend that
runs them (``--backend openvino --precision bf16``).

The gate needs the PyTorch model the bundle was exported from; the manifest records its path
and sha256, and ``--checkpoint`` points elsewhere when the bundle has moved machines. A backend
whose precision is a runtime setting rather than an exported artefact (OpenVINO's bf16 on the
fp32 graphs) has no export step to hold its gate, so this is where it is held: every graph
through the backend against PyTorch eager fp32 at batch 1 and 3, then the whole sampler.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtimes import bundle as rb
from runtimes.backend import offers
from runtimes.cpu import int8_kernel
from runtimes.graphs import get_graph, graphs_for
from runtimes.int8 import Int8KernelWarning, record_int8_gate

from .parity import (
    END_TO_END_MIN_PSNR,
    GraphParity,
    check_end_to_end_gate,
    check_graph_gate,
    max_abs_error,
    psnr,
)
from .sources import bundle_source_model
from .validate_text import validate_text_path


def validate_bundle(bundle: str | Path, checkpoint: str | None = None, steps: int = 10,
                    hashes_only: bool = False, seed: int = 1,
                    progress: Callable[[str], None] | None = None,
                    precisions: Sequence[str] | None = None) -> list[str]:
    """Return report lines; raise ValueError naming every problem found.

    ``precisions``: the ONNX precisions to gate (default every one the bundle has). An int8
    gate's result on this CPU is recorded in the manifest by kind of int8 kernel
    (`runtimes.int8`), passed or not, so loads on this kind of CPU know it.
    """
    say = progress or (lambda _msg: None)
    bundle = Path(bundle)
    say("verifying sha256 of every file")
    problems = rb.verify(bundle)
    if problems:
        raise ValueError(f"{bundle} failed verification:\n  " + "\n  ".join(problems))
    manifest = rb.read_manifest(bundle)
    if not manifest.artifacts:
        raise rb.BundleError(
            f"{bundle / rb.MANIFEST_NAME} lists no artifacts, so there is nothing to validate; "
            "the bundle is incomplete or damaged: export it again"
        )
    files = sum(1 + len(a.extra_files) for a in manifest.artifacts)
    lines = [f"hashes: {files} files match the manifest"]
    if hashes_only:
        return lines
    # The text encoder's precisions are its own (validate_text_path gates each of them).
    onnx_precisions = sorted({a.precision for a in manifest.artifacts
                              if a.runtime == "onnx" and a.graph != "text_encoder"})
    missing = sorted(set(precisions or ()) - set(onnx_precisions))
    if missing:
        raise rb.BundleError(
            f"{bundle} has no ONNX {', '.join(missing)} graphs (it has "
            f"{', '.join(onnx_precisions) or 'none'}); export them with `deco export onnx "
            f"... --precision {missing[0]}`")
    lines += validate_text_path(bundle, manifest, say)

    model = bundle_source_model(bundle, manifest, checkpoint)

    from .export.bundle_io import end_to_end_figures
    from .export.onnx import graph_parity

    height, width = manifest.model.image_size
    checked = parity_sizes(manifest, "onnx")
    for precision in precisions or onnx_precisions:
        results = []
        for artifact in manifest.artifacts:
            if artifact.graph == "text_encoder":
                # Its reference is the text encoder's own directory, not the checkpoint:
                # validate_text_path re-ran its gate above.
                continue
            if artifact.runtime == "onnx" and artifact.precision == precision:
                say(f"re-running parity of {artifact.file}")
                results += graph_parity(model, artifact.graph, bundle / artifact.file, height,
                                        width, seed, checked)
        check_graph_gate(precision, results, what=f"{bundle} ONNX {precision}")
        import runtimes

        runs = []
        worst_db = math.inf
        for h, w in checked:
            say(f"sampling end to end through ONNX Runtime ({precision}, {steps} steps, "
                f"{h}x{w})")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Int8KernelWarning)  # this is the proof
                pipe = runtimes.load(bundle, backend="onnxruntime", precision=precision,
                                     verify=False, allow_below_gate=True)
            figures = end_to_end_figures(model, pipe, (h, w), steps, seed)
            worst_db = min(worst_db, figures["psnr_db"])
            runs.append(f"{h}x{w} {figures['psnr_db']:.1f} dB")
        if precision == "int8":
            threshold = END_TO_END_MIN_PSNR[precision]
            record_int8_gate(bundle, worst_db, worst_db >= threshold, threshold)
            check_end_to_end_gate(
                precision, worst_db, what=f"{bundle} ONNX int8 on this CPU ({int8_kernel()} "
                "int8 kernels)", consequence="recorded in the manifest: loads of its int8 "
                "graphs on this kind of CPU are refused (use fp32, or allow_below_gate=True)")
        else:
            check_end_to_end_gate(precision, worst_db, what=f"{bundle} ONNX {precision}")
        worst = max(r.max_abs_error for r in results)
        where = f" on {int8_kernel()} int8 kernels (recorded)" if precision == "int8" else ""
        lines.append(f"onnx {precision}: worst graph error {worst:.2e}, end to end "
                     f"{', '.join(runs)} over {steps} steps{where}: passed")
    if manifest.solver_tables:  # each tuned table's held-out error, measured again here
        from .solver_tuning import recheck_solver_tables

        lines += recheck_solver_tables(bundle, say=say)
    for runtime in sorted({a.runtime for a in manifest.artifacts} - {"onnx"}):
        lines.append(f"{runtime}: hashes verified; its parity figures are in the manifest "
                     "(re-run them with its exporter on a machine that runs it)")
    return lines


def parity_sizes(manifest: rb.Manifest, runtime: str) -> list[tuple[int, int]]:
    """The sizes a gate checks: the default and a non-square one of the range ``runtime``'s
    artifacts serve (the model's size alone for fixed-size graphs)."""
    sizes = manifest.size_range(runtime)
    return sizes.parity_sizes() if sizes is not None else [manifest.model.image_size]


PARITY_BATCHES = (1, 3)
_CONSEQUENCE = "this backend and precision must not be used for this bundle"


def backend_graph_parity(model: Any, backend: Any, height: int, width: int,
                         seed: int = 1) -> list[GraphParity]:
    """Each graph call of a runtime ``backend`` (numpy in, numpy out) against PyTorch eager
    fp32 at batch 1 and 3, on the exporters' realistic inputs."""
    from .export.graphs import example_inputs, reference_outputs

    # Every call the backend answers, by the graph record that declares it.
    calls: dict[str, list[tuple[str, Callable[..., Any]]]] = {}
    for graph, spec in graphs_for(model.config).items():
        answered = [(output, getattr(backend, method)) for method, output in spec.calls
                    if offers(backend, method)]
        if answered:
            calls[graph] = answered
    results = []
    for batch in PARITY_BATCHES:
        for graph, outputs in calls.items():
            spec = get_graph(graph, model.config)
            inputs = example_inputs(model, graph, batch, height, width, seed=seed + batch)
            expected = dict(zip(spec.output_names, reference_outputs(model, graph, inputs),
                                strict=False))
            feeds = [backend.from_numpy(x.numpy()) for x in inputs]
            for name, call in outputs:
                got = np.asarray(backend.to_numpy(call(*feeds)))
                label = f"{graph}.{name}" if len(spec.outputs) > 1 else graph
                ref_np = expected[name].numpy()
                results.append(GraphParity(label, batch, max_abs_error(ref_np, got),
                                           psnr(ref_np, got), height, width))
    return results


def gate_backend(model: Any, open_pipeline: Callable[[], Any], precision: str,
                 image_size: tuple[int, int], *, steps: int = 10, seed: int = 1,
                 what: str = "backend", progress: Callable[[str], None] | None = None,
                 ) -> tuple[list[str], dict[str, Any]]:
    """The parity gate of one backend at one precision: every graph call against PyTorch fp32
    (`backend_graph_parity`), then the whole sampler end to end, with the thresholds of
    `deco_export.parity`. ``open_pipeline()`` returns a fresh `runtimes.DeCoPipeline` on the
    backend (called twice: each check closes its own). Returns the report lines and the
    figures; raises ParityError below a gate."""
    from .export.bundle_io import end_to_end_figures

    say = progress or (lambda _msg: None)
    height, width = image_size
    say(f"running every graph through {what} against PyTorch")
    pipe = open_pipeline()
    try:
        results = backend_graph_parity(model, pipe.backend, height, width, seed)
    finally:
        pipe.close()
    check_graph_gate(precision, results, what=what, consequence=_CONSEQUENCE)
    say(f"sampling end to end through {what} ({steps} steps)")
    figures = end_to_end_figures(model, open_pipeline(), (height, width), steps, seed)
    check_end_to_end_gate(precision, figures["psnr_db"], what=f"{what} at {height}x{width}",
                          consequence=_CONSEQUENCE)
    worst_err = max(r.max_abs_error for r in results)
    worst_db = min(r.psnr_db for r in results)
    line = (f"{what}: worst graph error {worst_err:.2e} ({worst_db:.1f} dB), end to end "
            f"{figures['psnr_db']:.1f} dB over {steps} steps at {height}x{width}: passed")
    return [line], {"graphs": [r.to_dict() for r in results], "end_to_end": figures}


def validate_backend(bundle: str | Path, backend: str, precision: str,
                     checkpoint: str | None = None, steps: int = 10, seed: int = 1,
                     progress: Callable[[str], None] | None = None,
                     **backend_options: Any) -> tuple[list[str], dict[str, Any]]:
    """Gate the runtime ``backend`` (a `runtimes.load` name) at ``precision`` on ``bundle``
    (see `gate_backend`); the first load verifies the files it reads."""
    import runtimes

    bundle = Path(bundle)
    manifest = rb.read_manifest(bundle)
    model = bundle_source_model(bundle, manifest, checkpoint)
    loads = iter([True])

    def open_pipeline() -> Any:
        return runtimes.load(bundle, backend=backend, precision=precision,
                             verify=next(loads, False), **backend_options)

    pipe = open_pipeline()
    try:  # the sizes the backend's artifacts serve
        checked = parity_sizes(manifest, getattr(pipe.backend, "runtime", "onnx"))
    finally:
        pipe.close()
    lines: list[str] = []
    figures: dict[str, Any] = {"graphs": [], "end_to_end_sizes": []}
    for h, w in checked:
        more, found = gate_backend(model, open_pipeline, precision, (h, w), steps=steps,
                                   seed=seed, what=f"{bundle} {backend} {precision}",
                                   progress=progress)
        lines += more
        figures["graphs"] += found["graphs"]
        figures.setdefault("end_to_end", found["end_to_end"])
        figures["end_to_end_sizes"].append(found["end_to_end"])
    return lines, figures
