"""``deco sample``: a grid of images from a bundle (any runtime) or a checkpoint (PyTorch)."""

from __future__ import annotations

from pathlib import Path

import click

from .options import SolverChoice, parse_int_list, parse_size


@click.command()
@click.argument("source", metavar="BUNDLE_OR_CHECKPOINT", default="default")
@click.option("--backend", default=None,
              help="onnxruntime, openvino, coreml, tensorrt (bundles) or torch (checkpoints); "
                   "default: onnxruntime for bundles, torch for checkpoints")
@click.option("--precision", default="fp32", show_default=True)
@click.option("--allow-below-gate", is_flag=True,
              help="run int8 graphs that `deco validate` measured below their gate on this CPU")
@click.option("--providers", default=None, help="ONNX Runtime providers, e.g. cuda,cpu")
@click.option("--device", default="cpu", show_default=True,
              help="torch backend device; openvino: CPU, GPU or NPU")
@click.option("--classes", default=None,
              help="comma-separated labels [every class of a model with <= 16, else 0..7]")
@click.option("--per-class", type=int, default=1, show_default=True,
              help="images per label; the grid then has one column per label")
@click.option("--steps", type=int, default=None,
              help="solver steps [the bundle's sampler default]")
@click.option("--guidance", type=float, default=None)
@click.option("--solver", type=SolverChoice(), default=None,
              help="the ODE solver [the bundle's sampler default]; see docs/sampling.md")
@click.option("--guidance-edges/--no-guidance-edges", default=None,
              help="a step boundary on each edge of the guidance interval, multistep history "
                   "restarted there [the bundle's default: off]")
@click.option("--fast", is_flag=True,
              help="the family's recommended few-step setting (docs/sampling.md); --solver, "
                   "--steps and --guidance-edges override its parts")
@click.option("--shift", type=float, default=None)
@click.option("--sharing", default=None,
              help="DiT sharing: a ratio (0.5), 'every:K', a step list '0,2,4', or a schedule "
                   "JSON written by `deco calibrate`")
@click.option("--sharing-mode", type=click.Choice(["reuse", "fresh_t"]), default="reuse",
              show_default=True, help="reuse the condition, or cache h and refresh e_t")
@click.option("--prompt", "prompts", multiple=True,
              help="text-to-image: a prompt (repeat for several images)")
@click.option("--negative-prompt", default=None,
              help="text-to-image: default the bundle's stored (empty) negative prompt")
@click.option("--text-encoder", default=None,
              help="text-to-image: a local transformers directory (Qwen3-1.7B for the release) "
                   "or 'minilm'; nothing is downloaded [a bundle's own text_encoder.onnx]")
@click.option("--size", default=None, help="HxW to sample at (default: the model's)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("samples.png"),
              show_default=True)
@click.option("--cols", type=int, default=None, help="grid columns")
@click.option("--scale", type=int, default=None,
              help="enlarge each image by pixel repetition [small images to >= 128 px]")
def sample(source: str, backend: str | None, precision: str, allow_below_gate: bool,
           providers: str | None, device: str,
           classes: str | None, per_class: int, steps: int | None, guidance: float | None,
           solver: str | None, guidance_edges: bool | None, fast: bool, shift: float | None,
           sharing: str | None, sharing_mode: str,
           prompts: tuple[str, ...], negative_prompt: str | None, text_encoder: str | None,
           size: str | None, seed: int, out: Path, cols: int | None, scale: int | None) -> None:
    """Sample a grid of images; the same seed gives the same image on every backend."""
    from runtimes.image import image_format

    from ..sampling import open_pipeline, parse_sharing, progress_callback

    image_format(out)  # an unknown extension fails before the model loads
    if allow_below_gate and precision != "int8":
        raise click.UsageError("--allow-below-gate applies to int8 graphs: add --precision int8")
    pipe = open_pipeline(source, backend=backend, precision=precision, providers=providers,
                         device=device, allow_below_gate=allow_below_gate)
    if per_class < 1 or (scale is not None and scale < 1):
        raise click.UsageError("--per-class and --scale must be >= 1")
    height, width = parse_size(size) if size else (None, None)
    if pipe.is_text_to_image:
        if not prompts:
            raise click.UsageError("this is a text-to-image model: give --prompt TEXT")
        if text_encoder is None and pipe.text_encoder is None:
            raise click.UsageError(
                "--prompt needs --text-encoder DIR (the model's text encoder, e.g. a local "
                "Qwen3-1.7B directory) or 'minilm', or a bundle that holds text_encoder.onnx"
            )
        if text_encoder is not None:
            from ..text_encoders import load_text_encoder

            cfg = pipe.model_config
            pipe.text_encoder = load_text_encoder(text_encoder, cfg.text_len,
                                                  cfg.text_dim)
        condition: dict = {"prompt": [p for _ in range(per_class) for p in prompts],
                           "negative_prompt": negative_prompt}
        count = len(prompts)
    else:
        if prompts or negative_prompt or text_encoder:
            raise click.UsageError("--prompt, --negative-prompt and --text-encoder are for "
                                   "text-to-image models; this one takes --classes")
        num_classes = pipe.model_config.num_classes
        distinct = parse_int_list(classes, "classes") if classes else list(
            range(num_classes if num_classes <= 16 else 8))
        condition = {"class_labels": [c for _ in range(per_class) for c in distinct]}
        count = len(distinct)
    if fast:
        from runtimes.sampler import FAST_SAMPLERS

        preset = FAST_SAMPLERS[pipe.model_config.family]
        solver = solver or preset["solver"]
        steps = steps or preset["num_steps"]
        guidance_edges = preset["guidance_edges"] if guidance_edges is None else guidance_edges
    if per_class > 1 and cols is None:
        cols = count
    with progress_callback("sampling") as callback:
        result = pipe.generate(**condition, steps=steps, guidance=guidance,
                               solver=solver, guidance_edges=guidance_edges, shift=shift,
                               seed=seed, height=height,
                               width=width, sharing=parse_sharing(sharing, sharing_mode),
                               callback=callback)
    from runtimes.image import legible_scale, save_grid

    width, height = result.images[0].size
    save_grid(result.images, out, cols=cols, scale=scale or legible_scale(height, width))
    click.echo(f"wrote {out} ({len(result.images)} images, seed {seed})")
