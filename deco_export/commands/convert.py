"""``deco convert``: a reference Lightning checkpoint -> a checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import click

from .options import parse_size


@click.command()
@click.argument("reference_ckpt", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--weights", type=click.Choice(["ema", "online"]), default="ema", show_default=True,
              help="ema_denoiser.* (used for every reported result) or denoiser.*")
@click.option("--image-size", default=None,
              help="native size HxW, e.g. 256x256 (default: inferred)")
def convert(reference_ckpt: Path, out_dir: Path, weights: str, image_size: str | None) -> None:
    """Import a reference Lightning checkpoint into a checkpoint directory (safetensors)."""
    from ..checkpoint import convert_reference, read_metadata

    size = parse_size(image_size) if image_size else None
    out = convert_reference(reference_ckpt, out_dir, weights=weights, image_size=size)
    meta = read_metadata(out)
    click.echo(f"wrote {out} ({meta['num_parameters']:,} parameters, {weights} weights)")
