"""The ``deco`` command line. Verbs mirror the Python API; each fails with a one-line reason and
a non-zero exit (set DECO_DEBUG=1 for the traceback).

Training verbs (``train``, ``eval``) live in the ``training`` package and are mounted through
the ``deco.commands`` entry-point group, so this package never imports ``training``.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

import click

# Errors a user can cause and fix: shown as one line, never as a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError,
                                                 NotADirectoryError, IsADirectoryError)


class DecoGroup(click.Group):
    """A click group that turns user errors into one-line messages and mounts plugin verbs."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except USER_ERRORS as err:
            if os.environ.get("DECO_DEBUG"):
                raise
            message = str(err).strip() or type(err).__name__
            raise click.ClickException(message) from None
        except ModuleNotFoundError as err:
            if os.environ.get("DECO_DEBUG"):
                raise
            raise click.ClickException(
                f"{err.name} is not installed; install the matching extra, e.g. "
                f"pip install 'deco-export[{extra_for(err.name)}]'"
            ) from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *plugin_commands()})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None:
            return command
        entry = plugin_commands().get(name)
        return entry.load() if entry is not None else None


def plugin_commands() -> dict:
    return {e.name: e for e in entry_points(group="deco.commands")}


def extra_for(module: str | None) -> str:
    top = (module or "").split(".")[0]
    return {
        "torch": "torch", "safetensors": "torch", "onnx": "onnx", "onnxruntime": "onnx",
        "onnxscript": "onnx", "coremltools": "coreml", "tensorrt": "tensorrt",
        "matplotlib": "train", "scipy": "eval", "tqdm": "torch",
    }.get(top, "dev")


@click.group(cls=DecoGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deco-export")
def main() -> None:
    """DeCo: faithful model, split-graph export and fast sampling on every runtime."""


# ---------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------


@main.command()
@click.argument("reference_ckpt", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--weights", type=click.Choice(["ema", "online"]), default="ema", show_default=True,
              help="ema_denoiser.* (used for every reported result) or denoiser.*")
@click.option("--image-size", default=None,
              help="native size HxW, e.g. 256x256 (default: inferred)")
def convert(reference_ckpt: Path, out_dir: Path, weights: str, image_size: str | None) -> None:
    """Import a reference Lightning checkpoint into a checkpoint directory (safetensors)."""
    from .checkpoint import convert_reference, read_metadata

    size = parse_size(image_size) if image_size else None
    out = convert_reference(reference_ckpt, out_dir, weights=weights, image_size=size)
    meta = read_metadata(out)
    click.echo(f"wrote {out} ({meta['num_parameters']:,} parameters, {weights} weights)")


def parse_size(text: str) -> tuple[int, int]:
    """'256' or '256x192' (height x width)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"cannot read size {text!r}; write HEIGHTxWIDTH, e.g. 64x64") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) <= 0:
        raise ValueError(f"cannot read size {text!r}; write HEIGHTxWIDTH, e.g. 64x64")
    return sizes[0], sizes[1]


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        return [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise ValueError(
            f"cannot read {what} {text!r}; write integers separated by commas"
        ) from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
