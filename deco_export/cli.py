"""The ``deco`` command line. Verbs mirror the Python API; each fails with a one-line reason and
a non-zero exit (set DECO_DEBUG=1 for the traceback).

Training verbs (``train``, ``eval``) live in the ``training`` package and are mounted through
the ``deco.commands`` entry-point group, so this package never imports ``training``.
"""

from __future__ import annotations

import os
import sys

# On shared or busy machines OpenMP threads that spin while waiting slow every torch call
# several-fold; waiting passively costs nothing measurable when the machine is idle. This must
# be set before torch is imported, which is why the package imports torch lazily.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path

import click

from runtimes.backend import BackendError
from runtimes.bundle import ONNX_PRECISIONS, BundleError

# Errors a user can cause and fix: shown as one line, never as a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError,
    KeyError, BackendError, BundleError,
)


class LazyGroup(click.Group):
    """Subcommands imported on first use: Core ML and TensorRT verbs live beside their
    exporters, and `deco --help` stays fast."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            module, attr = self.lazy[name].split(":")
            self.add_command(getattr(import_module(module), attr), name)
        return super().get_command(ctx, name)


class DecoGroup(LazyGroup):
    """A click group that turns user errors into one-line messages and mounts plugin verbs."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except USER_ERRORS as err:
            if os.environ.get("DECO_DEBUG"):
                raise
            message = (err.args[0] if isinstance(err, KeyError) and err.args else str(err))
            message = str(message).strip() or type(err).__name__
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
        command = super().get_command(ctx, name)  # built-in and lazy verbs
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
        "openvino": "openvino", "matplotlib": "train", "scipy": "eval", "tqdm": "torch",
    }.get(top, "dev")


@click.group(cls=DecoGroup, context_settings={"help_option_names": ["-h", "--help"]}, lazy={
    "calibrate": "deco_export.calibrate:calibrate_command",
    "bench": "deco_export.bench:bench_command",
})
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


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


@main.group(cls=LazyGroup, lazy={
    "coreml": "deco_export.export.coreml:coreml_command",
    "tensorrt": "deco_export.export.tensorrt:tensorrt_command",
})
def export() -> None:
    """Export a model into a bundle: ONNX graphs, Core ML packages, TensorRT engines."""


@export.command("onnx")
@click.argument("model", metavar="CHECKPOINT")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--precision", "precisions", multiple=True,
              type=click.Choice(list(ONNX_PRECISIONS)), default=("fp32",), show_default=True,
              help="repeat for several variants; int8 = fp32 graph with int8 weights (CPU)")
@click.option("--opset", type=int, default=18, show_default=True,
              help="18 (portable) or 23 (native Attention op)")
@click.option("--image-size", default=None, help="HxW to export at (default: the model's)")
@click.option("--parity-steps", type=int, default=10, show_default=True,
              help="sampler steps of the end-to-end parity gate")
@click.option("--weights", type=click.Choice(["ema", "online"]), default="ema",
              help="for reference .ckpt files")
def export_onnx_command(model: str, bundle: Path, precisions: tuple[str, ...], opset: int,
                        image_size: str | None, parity_steps: int, weights: str) -> None:
    """Write dit.onnx, decoder.onnx and refresh.onnx (+ manifest) into BUNDLE.

    CHECKPOINT is 'default' (the embedded model), a checkpoint directory or a reference .ckpt.
    The export is gated on parity with PyTorch; a failing export leaves nothing behind.
    """
    from .export.onnx import export_onnx
    from .sources import load_model

    net, source = load_model(model, weights=weights)
    size = parse_size(image_size) if image_size else None
    export_onnx(net, bundle, precisions=precisions, opset=opset, image_size=size, source=source,
                parity_steps=parity_steps, progress=lambda msg: click.echo(f"  {msg}", err=True))
    click.echo(f"wrote {bundle}")


# ---------------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------------


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--steps", type=int, default=10, show_default=True)
@click.option("--hashes-only", is_flag=True, help="verify the files' sha256 and stop")
@click.option("--checkpoint", default=None,
              help="the source checkpoint, when the manifest's path is not valid here")
@click.option("--backend", default=None,
              help="gate this runtime backend on the bundle instead, e.g. openvino")
@click.option("--precision", default="fp32", show_default=True,
              help="with --backend: the precision to gate (openvino: fp32 or bf16)")
def validate(bundle: Path, steps: int, hashes_only: bool, checkpoint: str | None,
             backend: str | None, precision: str) -> None:
    """Verify every file's sha256 and re-run the parity gate of each ONNX artefact, or gate a
    runtime backend (--backend) per graph and end to end."""
    from .validate import validate_backend, validate_bundle

    progress = lambda msg: click.echo(f"  {msg}", err=True)  # noqa: E731
    if backend is not None and not hashes_only:
        report, _ = validate_backend(bundle, backend, precision, checkpoint=checkpoint,
                                     steps=steps, progress=progress)
    else:
        report = validate_bundle(bundle, checkpoint=checkpoint, steps=steps,
                                 hashes_only=hashes_only, progress=progress)
    for line in report:
        click.echo(line)


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------


@main.command()
@click.argument("source", metavar="BUNDLE_OR_CHECKPOINT", default="default")
@click.option("--backend", default=None,
              help="onnxruntime, coreml, tensorrt (bundles) or torch (checkpoints); "
                   "default: onnxruntime for bundles, torch for checkpoints")
@click.option("--precision", default="fp32", show_default=True)
@click.option("--providers", default=None, help="ONNX Runtime providers, e.g. cuda,cpu")
@click.option("--device", default="cpu", show_default=True, help="torch backend device")
@click.option("--classes", default=None,
              help="comma-separated labels [every class of a model with <= 16, else 0..7]")
@click.option("--per-class", type=int, default=1, show_default=True,
              help="images per label; the grid then has one column per label")
@click.option("--steps", type=int, default=None, help="default: the bundle's sampler default")
@click.option("--guidance", type=float, default=None)
@click.option("--solver", type=click.Choice(["euler", "heun", "adams2"]), default=None)
@click.option("--shift", type=float, default=None)
@click.option("--sharing", default=None,
              help="DiT sharing: a ratio (0.5), 'every:K', a step list '0,2,4', or a schedule "
                   "JSON written by `deco calibrate`")
@click.option("--sharing-mode", type=click.Choice(["reuse", "fresh_t"]), default="reuse",
              show_default=True, help="reuse the condition, or cache h and refresh e_t")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("samples.png"),
              show_default=True)
@click.option("--cols", type=int, default=None, help="grid columns")
@click.option("--scale", type=int, default=None,
              help="enlarge each image by pixel repetition [small images to >= 128 px]")
def sample(source: str, backend: str | None, precision: str, providers: str | None, device: str,
           classes: str | None, per_class: int, steps: int | None, guidance: float | None,
           solver: str | None, shift: float | None, sharing: str | None, sharing_mode: str,
           seed: int, out: Path, cols: int | None, scale: int | None) -> None:
    """Sample a grid of images; the same seed gives the same image on every backend."""
    from .sampling import open_pipeline, parse_sharing, progress_callback

    pipe = open_pipeline(source, backend=backend, precision=precision, providers=providers,
                         device=device)
    if per_class < 1 or (scale is not None and scale < 1):
        raise click.UsageError("--per-class and --scale must be >= 1")
    num_classes = pipe.model_config["num_classes"]
    distinct = parse_int_list(classes, "classes") if classes else list(
        range(num_classes if num_classes <= 16 else 8))
    labels = [c for _ in range(per_class) for c in distinct]
    if per_class > 1 and cols is None:
        cols = len(distinct)
    with progress_callback("sampling") as callback:
        result = pipe.generate(class_labels=labels, steps=steps, guidance=guidance,
                               solver=solver, shift=shift, seed=seed,
                               sharing=parse_sharing(sharing, sharing_mode), callback=callback)
    from runtimes.image import legible_scale, save_grid

    width, height = result.images[0].size
    save_grid(result.images, out, cols=cols, scale=scale or legible_scale(height, width))
    click.echo(f"wrote {out} ({len(labels)} images, seed {seed})")


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
