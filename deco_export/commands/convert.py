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
@click.option("--force", is_flag=True,
              help="replace OUT_DIR when it is not a conversion of this file (only once the new "
                   "checkpoint is complete)")
def convert(reference_ckpt: Path, out_dir: Path, weights: str, image_size: str | None,
            force: bool) -> None:
    """Import a reference Lightning checkpoint into a checkpoint directory (safetensors).

    OUT_DIR must be absent, empty or an earlier conversion of the same file."""
    from ..checkpoint import convert_reference, read_metadata

    size = parse_size(image_size) if image_size else None
    out = convert_reference(reference_ckpt, out_dir, weights=weights, image_size=size,
                            force=force)
    meta = read_metadata(out)
    click.echo(f"wrote {out} ({meta['num_parameters']:,} parameters, {weights} weights)")
