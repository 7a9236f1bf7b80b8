"""``deco validate``: re-check a bundle's hashes and parity gates."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--steps", type=int, default=10, show_default=True)
@click.option("--hashes-only", is_flag=True, help="verify the files' sha256 and stop")
@click.option("--checkpoint", default=None,
              help="the source checkpoint, when the manifest's path is not valid here")
@click.option("--backend", default=None,
              help="gate this runtime backend on the bundle instead, e.g. openvino")
@click.option("--precision", default=None,
              help="gate only the bundle's ONNX graphs of this precision (int8: on this CPU, "
                   "recorded in the manifest); with --backend: the precision to gate "
                   "(default fp32; openvino: fp32 or bf16)")
def validate(bundle: Path, steps: int, hashes_only: bool, checkpoint: str | None,
             backend: str | None, precision: str | None) -> None:
    """Verify every file's sha256 and re-run the parity gate of each ONNX artefact, or gate a
    runtime backend (--backend) per graph and end to end."""
    from ..validate import validate_backend, validate_bundle

    progress = lambda msg: click.echo(f"  {msg}", err=True)  # noqa: E731
    if backend is not None and not hashes_only:
        report, _ = validate_backend(bundle, backend, precision or "fp32",
                                     checkpoint=checkpoint, steps=steps, progress=progress)
    else:
        report = validate_bundle(bundle, checkpoint=checkpoint, steps=steps,
                                 hashes_only=hashes_only, progress=progress,
                                 precisions=[precision] if precision else None)
    for line in report:
        click.echo(line)
