"""``deco export tensorrt``: TensorRT engines for this machine's GPU from a bundle's ONNX."""

from __future__ import annotations

from pathlib import Path

import click

from runtimes.backends import tensorrt_profiles as tp

from ..export.options import ExportOptions
from ..export.tensorrt import ENGINE_PRECISIONS, BuildSettings, export_tensorrt
from .options import echo_step, export_flags


@click.command("tensorrt")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--precision", "precisions", multiple=True,
              type=click.Choice(list(ENGINE_PRECISIONS)),
              help="repeat for several; default: every precision the bundle has ONNX graphs for")
@click.option("--batch-buckets", default=",".join(map(str, tp.DEFAULT_BATCH_BUCKETS)),
              show_default=True,
              help="user batch sizes; each also gets its CFG-doubled engine batch (b -> b, 2b)")
@click.option("--no-cfg", is_flag=True,
              help="build only the user batches (for sampling without guidance)")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="builder optimisation level (higher: longer builds, maybe faster engines)")
@click.option("--workspace-gib", type=float, default=None,
              help="workspace memory limit for tactics, in GiB (default: TensorRT's)")
@click.option("--tf32", is_flag=True, help="let fp32 engines use TF32 (faster, fails the fp32 "
              "parity gate on large models)")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="timing cache file (default: one per TensorRT version and GPU under "
                   "~/.cache/deco/tensorrt)")
@click.option("--checkpoint", default=None,
              help="the source checkpoint for the parity gate, when the manifest's path is not "
                   "valid here")
@click.option("--gpu", "device_id", type=int, default=0, show_default=True,
              help="the index of the GPU to build for")
@click.option("--device", "old_device_id", type=int, default=None, hidden=True,
              help="the GPU index (now --gpu; --device names the device a model runs on)")
@export_flags
def tensorrt_command(bundle: Path, precisions: tuple[str, ...], batch_buckets: str, no_cfg: bool,
                     opt_level: int, workspace_gib: float | None, tf32: bool,
                     timing_cache: Path | None, checkpoint: str | None, device_id: int,
                     old_device_id: int | None, force: bool, parity_steps: int) -> None:
    """Build TensorRT engines for this machine's GPU from BUNDLE's ONNX graphs.

    Engines are keyed by ONNX hash, precision, batch profiles, TensorRT version and GPU; up to
    date ones are kept, stale or foreign ones rebuilt. Each new engine must pass the parity
    gate against PyTorch before it enters the bundle. Needs TensorRT and an NVIDIA GPU.
    """
    if old_device_id is not None:
        click.echo("Warning: `deco export tensorrt --device N` is deprecated, use --gpu N (in "
                   "every other verb --device names the device a model runs on)", err=True)
        device_id = old_device_id
    workspace = None if workspace_gib is None else int(workspace_gib * (1 << 30))
    settings = BuildSettings(tp.parse_buckets(batch_buckets), not no_cfg, opt_level, workspace,
                             tf32)
    options = ExportOptions(parity_steps=parity_steps, progress=echo_step, force=force)
    lines = export_tensorrt(
        bundle, options, precisions=precisions or None, settings=settings,
        timing_cache=timing_cache, checkpoint=checkpoint, device_id=device_id)
    for line in lines:
        click.echo(line)
