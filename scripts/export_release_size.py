"""Export a text-to-image DeCo of the released size (`DeCo-T2I`, 1,133,759,395 parameters, 4.5 GB
of fp32 weights) to ONNX through the same parity-gated `export_onnx` as every bundle, and record
what it took: wall time per stage, peak resident memory, the files (external data) and the gate's
figures.

The weights are random (no checkpoint is downloaded here), with the layers the reference
initialises to zero drawn small instead, so the gate compares non-trivial outputs. The export
size is small (64x64 by default, range 32..128): the graphs are the released graphs (dynamic
height and width), and the gate's PyTorch and ONNX Runtime runs stay minutes on a CPU. Its
figures are the release-size export section of docs/benchmarks.md.

    python scripts/export_release_size.py --out /tmp/release-bundle --json release-export.json
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import click
import torch

from deco_export import get_preset
from deco_export.export.onnx import export_onnx
from deco_export.model import random_model
from runtimes import bundle as rb


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@click.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="the bundle to write")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="write the figures here as JSON")
@click.option("--image-size", default=64, show_default=True, help="square export size")
@click.option("--parity-steps", default=4, show_default=True)
@click.option("--threads", default=2, show_default=True)
def main(out: Path, json_path: Path | None, image_size: int, parity_steps: int,
         threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    stamps: list[tuple[str, float, float]] = []

    def say(msg: str) -> None:
        now = time.perf_counter() - started
        stamps.append((msg, round(now, 1), round(peak_rss_gib(), 2)))
        click.echo(f"[{now:7.1f} s, peak {peak_rss_gib():5.2f} GiB] {msg}", err=True)

    config = get_preset("DeCo-T2I")
    model = random_model(config)
    params = sum(p.numel() for p in model.parameters())
    say(f"built DeCo-T2I: {params:,} parameters")
    negative = torch.randn(1, config.text_len, config.text_dim).numpy()
    export_onnx(model, out, precisions=("fp32",), image_size=(image_size, image_size),
                source={"path": "random-init DeCo-T2I", "sha256": None},
                parity_steps=parity_steps, progress=say, negative_prompt_embeds=negative,
                negative_prompt="")
    say("export committed")
    manifest = rb.read_manifest(out)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    arts = {a.graph: {"file": a.file, "bytes": a.bytes,
                      "external_data": (a.details or {}).get("external_data"),
                      "worst_graph_error": max(g["max_abs_error"] for g in a.parity["graphs"]),
                      "end_to_end_psnr_db": [r["psnr_db"] for r in
                                             a.parity.get("end_to_end_sizes", [])]}
            for a in manifest.artifacts}
    result = {
        "preset": "DeCo-T2I", "parameters": params, "image_size": [image_size, image_size],
        "sizes": manifest.sizes.to_dict() if manifest.sizes else None,
        "parity_steps": parity_steps, "threads": threads,
        "wall_s": round(time.perf_counter() - started, 1), "peak_rss_gib": round(peak_rss_gib(), 2),
        "stages": [{"what": m, "at_s": t, "peak_rss_gib": r} for m, t, r in stamps],
        "files_bytes": files, "artifacts": arts,
        "torch": torch.__version__, "python": sys.version.split()[0],
    }
    text = json.dumps(result, indent=2)
    click.echo(text)
    if json_path is not None:
        json_path.write_text(text + "\n")


if __name__ == "__main__":
    main()
