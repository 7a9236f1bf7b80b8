"""``deco sample``: a grid of images from a bundle (any runtime) or a checkpoint (PyTorch)."""

from __future__ import annotations

from pathlib import Path

import click

from .options import SolverChoice, parse_int_list, parse_size, single_value


@click.command()
@click.argument("source", metavar="BUNDLE_OR_CHECKPOINT", default="default")
@click.option("--backend", default=None,
              help="onnxruntime, openvino, coreml, tensorrt (bundles) or torch (checkpoints); "
                   "default: onnxruntime for bundles, torch for checkpoints")
@click.option("--precision", default="fp32", show_default=True)
@click.option("--providers", default=None, help="ONNX Runtime providers, e.g. cuda,cpu")
@click.option("--device", default="cpu", show_default=True,
              help="torch backend device; openvino: CPU, GPU or NPU")
@click.option("--classes", default=None,
              help="comma-separated labels [every class of a model with <= 16, else 0..7]")
@click.option("--per-class", type=int, default=1, show_default=True,
              help="images per label; the grid then has one column per label")
@click.option("--steps", type=int, default=None, help="default: the bundle's sampler default")
@click.option("--guidance", type=float, default=None)
@click.option("--solver", type=SolverChoice(), default=None)
@click.option("--shift", type=float, default=None)
@click.option("--sharing", default=None,
              help="DiT sharing: a ratio (0.5), 'every:K', a step list '0,2,4', or a schedule "
                   "JSON written by `deco calibrate`")
@click.option("--sharing-mode", type=click.Choice(["reuse", "fresh_t"]), default="reuse",
              show_default=True, help="reuse the condition, or cache h and refresh e_t")
@click.option("--prompt", "prompts", multiple=True,
              help="text-to-image: a prompt (repeat for several images)")
@click.option("--negative-prompt", "negative_prompts", multiple=True,
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
def sample(source: str, backend: str | None, precision: str, providers: str | None, device: str,
           classes: str | None, per_class: int, steps: int | None, guidance: float | None,
           solver: str | None, shift: float | None, sharing: str | None, sharing_mode: str,
           prompts: tuple[str, ...], negative_prompts: tuple[str, ...], text_encoder: str | None,
           size: str | None, seed: int, out: Path, cols: int | None, scale: int | None) -> None:
    """Sample a grid of images; the same seed gives the same image on every backend."""
    from runtimes.image import image_format

    from ..sampling import open_pipeline, parse_sharing, progress_callback

    image_format(out)  # an unknown extension fails before the model loads
    negative_prompt = single_value(negative_prompts, "--negative-prompt")
    pipe = open_pipeline(source, backend=backend, precision=precision, providers=providers,
                         device=device)
    if per_class < 1 or (scale is not None and scale < 1):
        raise click.UsageError("--per-class and --scale must be >= 1")
    height, width = parse_size(size) if size else (None, None)
    if pipe.is_text_to_image:
        if not prompts:
            raise click.UsageError("this is a text-to-image model: give --prompt TEXT")
        if classes is not None:
            raise click.UsageError("--classes is for class-conditional models; this one takes "
                                   "--prompt")
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
        if not distinct:
            raise click.UsageError(f"--classes {classes!r} lists no class; give e.g. "
                                   "--classes 0,3")
        condition = {"class_labels": [c for _ in range(per_class) for c in distinct]}
        count = len(distinct)
    if per_class > 1 and cols is None:
        cols = count
    from runtimes.image import legible_scale, save_grid
    from runtimes.memory import check_memory, grid_bytes
    from runtimes.noise import noise_for_keys

    items = condition.get("class_labels", condition.get("prompt"))
    total = len(items)
    h, w = (height, width) if size else tuple(pipe.model_config.image_size)
    scale = scale or legible_scale(h, w)
    if cols is not None and cols < 1:
        raise click.UsageError(f"--cols must be >= 1, got {cols}")
    # Checked before sampling: the grid is the one thing that holds every image at once.
    check_memory(grid_bytes(total, h, w, scale), f"a grid of {total} images of {h}x{w} at "
                 f"--scale {scale}", "lower --per-class or --scale")
    plan = parse_sharing(sharing, sharing_mode)
    images: list = []
    # Chunks bound the sampler's memory; image i keeps the noise of key [seed, i] whatever the
    # chunk, so the images are those of one call.
    chunks = range(0, total, SAMPLE_CHUNK)
    for n, start in enumerate(chunks):
        part = {k: v[start:start + SAMPLE_CHUNK] if isinstance(v, list) else v
                for k, v in condition.items()}
        keys = [(seed, i) for i in range(start, min(total, start + SAMPLE_CHUNK))]
        noise = noise_for_keys(keys, (pipe.model_config.in_channels, h, w))
        label = "sampling" if len(chunks) == 1 else f"sampling {n + 1}/{len(chunks)}"
        with progress_callback(label) as callback:
            result = pipe.generate(**part, steps=steps, guidance=guidance, solver=solver,
                                   shift=shift, noise=noise, height=height, width=width,
                                   sharing=plan, callback=callback)
        images += result.images
    save_grid(images, out, cols=cols, scale=scale)
    click.echo(f"wrote {out} ({len(images)} images, seed {seed})")


SAMPLE_CHUNK = 16  # images per generate call: a batch's speed, with bounded memory
