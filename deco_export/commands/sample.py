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
@click.option("--preview-every", type=int, default=None, metavar="K",
              help="every K steps, write the clean estimate x_t + (1 - t) v of the images "
                   "so far to OUT's name with .preview before the extension")
@click.option("--image", "init_image", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="image-to-image: start from this image (its size unless "
                                 "--size is given)")
@click.option("--strength", type=float, default=None,
              help="with --image: 0 keeps it, 1 ignores it [0.8; 1.0 with --mask]")
@click.option("--mask", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="with --image: inpaint where the mask is white, keep the rest")
def sample(source: str, backend: str | None, precision: str, providers: str | None, device: str,
           classes: str | None, per_class: int, steps: int | None, guidance: float | None,
           solver: str | None, shift: float | None, sharing: str | None, sharing_mode: str,
           prompts: tuple[str, ...], negative_prompt: str | None, text_encoder: str | None,
           size: str | None, seed: int, out: Path, cols: int | None, scale: int | None,
           preview_every: int | None, init_image: Path | None, strength: float | None,
           mask: Path | None) -> None:
    """Sample a grid of images; the same seed gives the same image on every backend."""
    from runtimes.image import image_format

    from ..sampling import open_pipeline, parse_sharing, preview_writer, progress_callback

    image_format(out)  # an unknown extension fails before the model loads
    if preview_every is not None and preview_every < 1:
        raise click.UsageError("--preview-every must be >= 1")
    pipe = open_pipeline(source, backend=backend, precision=precision, providers=providers,
                         device=device)
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
    if per_class > 1 and cols is None:
        cols = count
    if init_image is not None:
        condition.update(start_image(init_image, strength, mask))
    elif strength is not None or mask is not None:
        raise click.UsageError("--strength and --mask need --image")
    on_step = None
    if preview_every is not None:
        on_step = preview_writer(out.with_name(f"{out.stem}.preview{out.suffix}"),
                                 preview_every, cols=cols, scale=scale)
    with progress_callback("sampling") as callback:
        result = pipe.generate(**condition, steps=steps, guidance=guidance,
                               solver=solver, shift=shift, seed=seed, height=height,
                               width=width, sharing=parse_sharing(sharing, sharing_mode),
                               callback=callback, on_step=on_step)
    from runtimes.image import legible_scale, save_grid

    width, height = result.images[0].size
    save_grid(result.images, out, cols=cols, scale=scale or legible_scale(height, width))
    click.echo(f"wrote {out} ({len(result.images)} images, seed {seed})")


def start_image(path: Path, strength: float | None, mask: Path | None) -> dict:
    """``generate``'s image-to-image arguments from the command line's files: greyscale and
    palette images read as RGB, a mask as greyscale."""
    from PIL import Image

    with Image.open(path) as opened:
        picture = opened.convert("RGB") if opened.mode in ("L", "P") else opened.copy()
    arguments: dict = {"image": picture, "strength": strength}
    if mask is not None:
        with Image.open(mask) as opened:
            arguments["mask_image"] = opened.convert("L")
    return arguments
