"""``deco export coreml``: Core ML packages (ML programs) for a bundle."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..export.coreml import (
    COMPRESSIONS,
    COMPUTE_UNITS,
    DEFAULT_COMPUTE_UNITS,
    DEFAULT_TARGET,
    DEPLOYMENT_TARGETS,
    FP32_ISLANDS,
    PRECISIONS,
)
from .options import echo_step, export_flags, model_text_encoder, parse_int_list, parse_size

if TYPE_CHECKING:
    import numpy as np

    from ..model import DeCo


@click.command("coreml")
@click.argument("source", metavar="CHECKPOINT_OR_BUNDLE")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--precision", "precisions", multiple=True, type=click.Choice(PRECISIONS),
              default=("fp16",), show_default=True, help="repeat for several variants")
@click.option("--target", type=click.Choice(DEPLOYMENT_TARGETS), default=DEFAULT_TARGET,
              show_default=True, help="minimum deployment target")
@click.option("--batch-sizes", default="", help="batch sizes beyond 1 and 2, e.g. 4,8")
@click.option("--compute-units", type=click.Choice(COMPUTE_UNITS),
              default=DEFAULT_COMPUTE_UNITS, show_default=True,
              help="recorded for the runtime (CPU_AND_NE: consider --fp32-islands none)")
@click.option("--compress", "compression", type=click.Choice(COMPRESSIONS), default="none",
              show_default=True, help="8-bit linear weights, or 6-/4-bit palettes")
@click.option("--fp32-islands", default="all", show_default=True,
              help=f"what stays fp32 in fp16 packages: all, none or {','.join(FP32_ISLANDS)}")
@click.option("--image-size", default=None, help="HxW (default: the model's, or the bundle's)")
@click.option("--sizes", "extra_sizes", default="",
              help="more HxW sizes the packages accept, e.g. 32x64,128x128 (Core ML enumerates "
                   "them; a fixed size is fastest on the Neural Engine)")
@click.option("--license", "license_text", default=None, help="licence text for the metadata")
@click.option("--weights", type=click.Choice(["ema", "online"]), default="ema",
              help="for reference .ckpt files")
@click.option("--checkpoint", default=None,
              help="the checkpoint behind a bundle, when its recorded path is not valid here")
@click.option("--text-encoder", default=None,
              help="text-to-image: a local transformers directory or 'minilm' that encodes "
                   "--negative-prompt into the bundle [the one the checkpoint's metadata names; "
                   "a bundle source's stored encoding]")
@click.option("--negative-prompt", default="", show_default=True,
              help="text-to-image: the prompt of the unconditional half")
@click.option("--verbose", is_flag=True, help="show coremltools' progress bars")
@export_flags
def coreml_command(source: str, out: Path, precisions: tuple[str, ...], target: str,
                   batch_sizes: str, compute_units: str, compression: str, fp32_islands: str,
                   image_size: str | None, extra_sizes: str, license_text: str | None,
                   parity_steps: int,
                   weights: str, checkpoint: str | None, text_encoder: str | None,
                   negative_prompt: str, verbose: bool, force: bool) -> None:
    """Write dit, decoder and refresh .mlpackage files (ML programs) into the bundle OUT.

    CHECKPOINT_OR_BUNDLE is 'default', a checkpoint directory, a reference .ckpt, or an
    exported bundle (its recorded checkpoint is used; OUT may be that same bundle). fp16
    packages are named dit.fp16.mlpackage, fp32 ones dit.mlpackage. On macOS the export is
    gated on parity with PyTorch; elsewhere only its structure is checked.
    """
    from ..export.coreml import export_coreml, import_coremltools, load_source
    from ..export.options import ExportOptions

    import_coremltools()
    model, record, bundle_size = load_source(source, weights=weights, checkpoint=checkpoint)
    size = parse_size(image_size) if image_size else bundle_size
    negative, negative_text = negative_prompt_for(model, source, text_encoder, negative_prompt)
    started = time.perf_counter()
    options = ExportOptions(image_size=size, source=record, parity_steps=parity_steps,
                            progress=echo_step, force=force, negative_prompt_embeds=negative,
                            negative_prompt=negative_text)
    export_coreml(
        model, out, options, precisions=precisions, target=target,
        batch_sizes=parse_int_list(batch_sizes, "batch sizes"), compute_units=compute_units,
        compression=compression, fp32_islands=fp32_islands, license=license_text,
        verbose=verbose,
        image_sizes=[parse_size(s) for s in extra_sizes.replace(" ", "").split(",") if s],
    )
    click.echo(f"wrote {out} ({time.perf_counter() - started:.0f} s)")


def negative_prompt_for(model: DeCo, source: str, text_encoder: str | None,
                        negative_prompt: str) -> tuple[np.ndarray | None, str | None]:
    """The encoded negative prompt a text-to-image Core ML export stores, and its text: from
    ``--text-encoder`` (or the one the checkpoint names), else from a bundle source's stored
    encoding; (None, None) for a class-conditional model or when neither exists."""
    encoder = model_text_encoder(model.config, text_encoder, source)
    if encoder is not None:
        return encoder.encode([negative_prompt]), negative_prompt
    from ..sources import is_bundle

    if model.config.is_text_to_image and is_bundle(source):
        from runtimes import bundle as rb

        manifest = rb.read_manifest(source)
        stored = rb.read_negative_embeds(source, manifest)
        if stored is not None and manifest.text is not None:
            return stored, manifest.text.negative_prompt
    return None, None
