"""`deco validate`: verify a bundle's hashes and re-run the parity gate of its ONNX artefacts.

The gate needs the PyTorch model the bundle was exported from; the manifest records its path
and sha256, and ``--checkpoint`` points elsewhere when the bundle has moved machines.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from runtimes import bundle as rb

from .parity import check_end_to_end_gate, check_graph_gate
from .sources import bundle_source_model


def validate_bundle(bundle: str | Path, checkpoint: str | None = None, steps: int = 10,
                    hashes_only: bool = False, seed: int = 1,
                    progress: Callable[[str], None] | None = None) -> list[str]:
    """Return report lines; raise ValueError naming every problem found."""
    say = progress or (lambda _msg: None)
    bundle = Path(bundle)
    say("verifying sha256 of every file")
    problems = rb.verify(bundle)
    if problems:
        raise ValueError(f"{bundle} failed verification:\n  " + "\n  ".join(problems))
    manifest = rb.read_manifest(bundle)
    files = sum(1 + len(a.extra_files) for a in manifest.artifacts)
    lines = [f"hashes: {files} files match the manifest"]
    if hashes_only:
        return lines

    model = bundle_source_model(bundle, manifest, checkpoint)

    from .export.bundle_io import end_to_end_figures
    from .export.onnx import graph_parity

    height, width = manifest.model["image_size"]
    onnx_precisions = sorted({a.precision for a in manifest.artifacts if a.runtime == "onnx"})
    for precision in onnx_precisions:
        results = []
        for artifact in manifest.artifacts:
            if artifact.runtime == "onnx" and artifact.precision == precision:
                say(f"re-running parity of {artifact.file}")
                results += graph_parity(model, artifact.graph, bundle / artifact.file, height,
                                        width, seed)
        check_graph_gate(precision, results, what=f"{bundle} ONNX {precision}")
        import runtimes

        say(f"sampling end to end through ONNX Runtime ({precision}, {steps} steps)")
        pipe = runtimes.load(bundle, backend="onnxruntime", precision=precision, verify=False)
        figures = end_to_end_figures(model, pipe, (height, width), steps, seed)
        check_end_to_end_gate(precision, figures["psnr_db"], what=f"{bundle} ONNX {precision}")
        worst = max(r.max_abs_error for r in results)
        lines.append(f"onnx {precision}: worst graph error {worst:.2e}, end to end "
                     f"{figures['psnr_db']:.1f} dB over {steps} steps: passed")
    for runtime in sorted({a.runtime for a in manifest.artifacts} - {"onnx"}):
        lines.append(f"{runtime}: hashes verified; its parity figures are in the manifest "
                     "(re-run them with its exporter on a machine that runs it)")
    return lines
