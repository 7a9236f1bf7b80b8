"""``deco sample``: a grid of images from a bundle (any runtime) or a checkpoint (PyTorch),
one PNG per image that records how it was made (``--out-dir``), or that image again
(``--from``)."""

from __future__ import annotations

from pathlib import Path

import click

from .options import CatalogueHelp, SolverChoice, parse_size, single_value


@click.command()
@click.argument("source", metavar="BUNDLE_OR_CHECKPOINT", required=False)
@click.option("--backend", default=None, cls=CatalogueHelp,
              help="{bundle} (bundles) or {checkpoint} (checkpoints); default: {default} for "
                   "bundles, {checkpoint} for checkpoints")
@click.option("--precision", default=None, help="[fp32]")
@click.option("--allow-below-gate", is_flag=True,
              help="run int8 graphs that `deco validate` measured below their gate on this CPU")
@click.option("--providers", default=None, help="ONNX Runtime providers, e.g. cuda,cpu")
@click.option("--device", default=None,
              help="torch backend device; openvino: CPU, GPU or NPU [cpu]")
@click.option("--classes", default=None,
              help="comma-separated class indices or names (the bundle's id2label, e.g. "
                   "'Flags,Objects') [every class of a model with <= 16, else 0..7]")
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
              help="the model's recommended few-step setting (its family's, or a "
                   "guidance-distilled model's own; docs/sampling.md), or the "
                   "bundle's fewest-step tuned solver table that is at least as accurate; "
                   "--solver, --steps, --guidance-edges and --shift override its parts")
@click.option("--shift", type=float, default=None,
              help="timestep shift s; s > 1 spends more steps near noise [the model's]")
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
@click.option("--text-encoder-providers", default=None,
              help="text-to-image: where a bundle's text_encoder.onnx runs, e.g. cuda [cpu]")
@click.option("--text-encoder-precision", type=click.Choice(["fp32", "fp16", "int8"]),
              default=None, help="text-to-image: which of the bundle's exported text "
                                 "encoders runs [fp32]")
@click.option("--reduce-memory", is_flag=True,
              help="text-to-image: unload the text encoder once the prompts are encoded")
@click.option("--size", default=None, help="HxW to sample at (default: the model's)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="the grid [samples.png, none with --out-dir alone]; with --from, the image "
                   "[IMAGE.again.png]")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="also write each image as DIR/INDEX-seedSEED.png with its generation "
                   "parameters in PNG text chunks")
@click.option("--from", "from_image", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="make an image written by --out-dir again, from its recorded "
                                 "parameters (on its backend and precision unless given)")
@click.option("--cols", type=int, default=None, help="grid columns")
@click.option("--scale", type=int, default=None,
              help="enlarge each image by pixel repetition [small images to >= 128 px]")
@click.option("--preview-every", type=int, default=None, metavar="K",
              help="every K steps, write the clean estimate x_t + (1 - t) v of the images "
                   "so far to OUT's name with .preview before the extension (DIR/preview.png with "
                   "--out-dir alone)")
@click.option("--image", "init_image", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="image-to-image: start from this image (its size unless "
                                 "--size is given)")
@click.option("--strength", type=float, default=None,
              help="with --image: 0 keeps it, 1 ignores it [0.8; 1.0 with --mask]")
@click.option("--mask", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="with --image: inpaint where the mask is white, keep the rest")
def sample(source: str | None, backend: str | None, precision: str | None, allow_below_gate: bool,
           providers: str | None, device: str | None, classes: str | None, per_class: int,
           steps: int | None, guidance: float | None, solver: str | None,
           guidance_edges: bool | None, fast: bool, shift: float | None,
           sharing: str | None, sharing_mode: str, prompts: tuple[str, ...],
           negative_prompts: tuple[str, ...], text_encoder: str | None,
           text_encoder_providers: str | None, text_encoder_precision: str | None,
           reduce_memory: bool, size: str | None, seed: int,
           out: Path | None, out_dir: Path | None, from_image: Path | None, cols: int | None,
           scale: int | None, preview_every: int | None, init_image: Path | None,
           strength: float | None, mask: Path | None) -> None:
    """Sample a grid of images; the same seed gives the same image on every backend."""
    from runtimes.image import image_format

    from ..sampling import (
        default_backend,
        open_pipeline,
        parse_classes,
        parse_sharing,
        preview_writer,
        progress_callback,
        start_image,
    )

    if out is not None:
        image_format(out)  # an unknown extension fails before the model loads
    if from_image is not None:
        given = {"--classes": classes, "--prompt": prompts, "--steps": steps,
                 "--guidance": guidance, "--solver": solver, "--shift": shift,
                 "--sharing": sharing, "--size": size, "--image": init_image,
                 "--strength": strength, "--mask": mask, "--out-dir": out_dir,
                 "--negative-prompt": negative_prompts}
        if clash := [name for name, value in given.items() if value]:
            raise click.UsageError(
                f"--from takes the generation parameters from the image; drop {', '.join(clash)}"
                " (it takes only BUNDLE, --backend, --precision, --providers, --device, --out)")
        regenerate(from_image, source, backend, precision, providers, device, out)
        return
    if preview_every is not None and preview_every < 1:
        raise click.UsageError("--preview-every must be >= 1")
    if allow_below_gate and "int8" not in (precision, text_encoder_precision):
        raise click.UsageError("--allow-below-gate applies to int8 graphs: add --precision int8 "
                               "(or --text-encoder-precision int8)")
    if cols is not None and cols < 1:
        raise click.UsageError(f"--cols must be >= 1, got {cols}")
    negative_prompt = single_value(negative_prompts, "--negative-prompt")
    if per_class < 1 or (scale is not None and scale < 1):
        raise click.UsageError("--per-class and --scale must be >= 1")
    if out is None and out_dir is None:
        out = Path("samples.png")
    source = source or "default"
    backend = backend or default_backend(source)
    precision, device = precision or "fp32", device or "cpu"
    pipe = open_pipeline(source, backend=backend, precision=precision, providers=providers,
                         device=device, text_encoder_providers=text_encoder_providers,
                         reduce_memory=reduce_memory, allow_below_gate=allow_below_gate,
                         text_encoder_precision=text_encoder_precision)
    height, width = parse_size(size) if size else (None, None)
    if pipe.is_text_to_image:
        if not prompts:
            raise click.UsageError("this is a text-to-image model: give --prompt TEXT")
        if classes is not None:
            raise click.UsageError("--classes is for class-conditional models; this one takes "
                                   "--prompt")
        attach_text_encoder(pipe, text_encoder)
        condition: dict = {"prompt": [p for _ in range(per_class) for p in prompts],
                           "negative_prompt": negative_prompt}
        count = len(prompts)
    else:
        if prompts or negative_prompt or text_encoder:
            raise click.UsageError("--prompt, --negative-prompt and --text-encoder are for "
                                   "text-to-image models; this one takes --classes")
        num_classes = pipe.model_config.num_classes
        distinct = pipe.class_indices(parse_classes(classes)) if classes else list(
            range(num_classes if num_classes <= 16 else 8))
        if not distinct:
            raise click.UsageError(f"--classes {classes!r} lists no class; give e.g. "
                                   "--classes 0,3")
        condition = {"class_labels": [c for _ in range(per_class) for c in distinct]}
        count = len(distinct)
    if fast:
        from runtimes.sampler import fast_psnr_db, fast_sampler
        from runtimes.solver_tables import TUNED, fast_table

        family, distilled = pipe.model_config.family, pipe.model_config.guidance_distilled
        preset = fast_sampler(family, distilled)
        shift = preset.get("shift") if shift is None else shift
        manifest, min_psnr_db = pipe.manifest, fast_psnr_db(family, distilled)
        table = None if (solver or steps or manifest is None or min_psnr_db is None) else (
            fast_table(manifest.solver_tables, manifest.model_hash,
                       pipe.sampler_config(guidance=guidance, shift=shift), min_psnr_db))
        if table is not None:  # a tuned table at least as good in fewer evaluations
            solver, steps = TUNED, table.nfe
        solver = solver or preset["solver"]
        steps = steps or preset["num_steps"]
        guidance_edges = preset["guidance_edges"] if guidance_edges is None else guidance_edges
    if per_class > 1 and cols is None:
        cols = count
    if init_image is not None:
        condition.update(start_image(init_image, strength, mask))
    elif strength is not None or mask is not None:
        raise click.UsageError("--strength and --mask need --image")
    on_step = None
    if preview_every is not None:
        preview = (out.with_name(f"{out.stem}.preview{out.suffix}") if out is not None
                   else out_dir / "preview.png")  # type: ignore[operator]
        on_step = preview_writer(preview, preview_every, cols=cols, scale=scale)
    from runtimes.image import legible_scale, save_grid
    from runtimes.memory import check_generation, check_memory, grid_bytes
    from runtimes.noise import noise_for_keys

    items = condition.get("class_labels", condition.get("prompt"))
    total = len(items)
    if height is None and init_image is not None:  # the image's size is the default
        width, height = condition["image"].size
    h, w = (height, width) if height is not None else tuple(pipe.model_config.image_size)
    # Checked before sampling: the grid is the one thing that holds every image at once.
    check_memory(grid_bytes(total, h, w, scale or legible_scale(h, w)),
                 f"a grid of {total} images of {h}x{w} at --scale "
                 f"{scale or legible_scale(h, w)}", "lower --per-class or --scale")
    # And before drawing a chunk's noise, which is as large as its images.
    check_generation(pipe.model_config, min(total, SAMPLE_CHUNK), h, w,
                     "lower --size or --per-class")
    sharing_plan = parse_sharing(sharing, sharing_mode)
    images: list = []
    # Chunks bound the sampler's memory; image i keeps the noise of key [seed, i] whatever the
    # chunk, so the images are those of one call (and of `generate(seed=seed)`).
    chunks = range(0, total, SAMPLE_CHUNK)
    for n, start in enumerate(chunks):
        part = {k: v[start:start + SAMPLE_CHUNK] if isinstance(v, list) else v
                for k, v in condition.items()}
        keys = [(seed, i) for i in range(start, min(total, start + SAMPLE_CHUNK))]
        noise = noise_for_keys(keys, (pipe.model_config.in_channels, h, w))
        label = "sampling" if len(chunks) == 1 else f"sampling {n + 1}/{len(chunks)}"
        with progress_callback(label) as callback:
            result = pipe.generate(**part, steps=steps, guidance=guidance, solver=solver,
                                   guidance_edges=guidance_edges, shift=shift, noise=noise,
                                   height=height, width=width, sharing=sharing_plan,
                                   callback=callback, on_step=on_step)
        images += result.images

    width, height = images[0].size
    written = []
    if out_dir is not None:
        from ..provenance import model_sha256, write_images
        from ..sources import is_embedded

        config = pipe.sampler_config(steps=steps, guidance=guidance, solver=solver, shift=shift,
                                     guidance_edges=guidance_edges)
        record = {
            "source": source if is_embedded(source) else str(Path(source).resolve()),
            "model_sha256": model_sha256(source), "backend": backend,
            "precision": precision, "device": device, "providers": providers, "seed": seed,
            "steps": config.num_steps,
            "solver": config.solver, "guidance": config.guidance,
            "guidance_interval": list(config.guidance_interval), "shift": config.shift,
            "guidance_edges": config.guidance_edges,
            "sharing": sharing, "sharing_mode": sharing_mode, "size": [height, width],
        }
        if pipe.is_text_to_image:
            record.update(prompts=condition["prompt"], negative_prompt=negative_prompt,
                          text_encoder=text_encoder)
            if text_encoder_precision is not None:  # its features differ: the pixels too
                record["text_encoder_precision"] = text_encoder_precision
        else:
            record["class_labels"] = condition["class_labels"]
        if init_image is not None:
            record.update(image=init_image, strength=strength, mask=mask)
        written = write_images(images, out_dir, record)
    if out is not None:
        save_grid(images, out, cols=cols, scale=scale or legible_scale(height, width))
        written.insert(0, out)
    click.echo(f"wrote {', '.join(map(str, written[:3]))}{' ...' if len(written) > 3 else ''} "
               f"({len(images)} images, seed {seed})")


SAMPLE_CHUNK = 16  # images per generate call: a batch's speed, with bounded memory


def attach_text_encoder(pipe, text_encoder: str | None) -> None:
    """Give a text-to-image pipeline the encoder named on the command line (or keep the
    bundle's own)."""
    if text_encoder is None and pipe.text_encoder is None:
        raise click.UsageError(
            "--prompt needs --text-encoder DIR (the model's text encoder, e.g. a local "
            "Qwen3-1.7B directory) or 'minilm', or a bundle that holds text_encoder.onnx"
        )
    if text_encoder is not None:
        from ..text_encoders import load_text_encoder

        cfg = pipe.model_config
        pipe.text_encoder = load_text_encoder(text_encoder, cfg.text_len, cfg.text_dim)


def regenerate(image: Path, source: str | None, backend: str | None, precision: str | None,
               providers: str | None, device: str | None, out: Path | None) -> None:
    """``deco sample --from IMAGE [SOURCE]``: the recorded call again, its image written with
    the same parameters (and the source, backend and precision this run used)."""
    from runtimes.image import save_png

    from ..provenance import check_model, generate_arguments, read_record, record_text
    from ..sampling import open_pipeline, progress_callback

    record = read_record(image)
    source = source or record["source"]
    record.update(source=str(source), backend=backend or record["backend"],
                  precision=precision or record["precision"],
                  device=device or record.get("device") or "cpu",
                  providers=providers or record.get("providers"))
    check_model(image, record, source)
    pipe = open_pipeline(source, backend=record["backend"], precision=record["precision"],
                         providers=record["providers"], device=record["device"],
                         text_encoder_precision=record.get("text_encoder_precision"))
    if pipe.is_text_to_image:
        attach_text_encoder(pipe, record.get("text_encoder"))
    with progress_callback("sampling") as callback:
        result = pipe.generate(**generate_arguments(record), callback=callback)
    out = out or Path(f"{image.stem}.again.png")
    save_png(result.images[record["index"]], out, text=record_text(record))
    click.echo(f"wrote {out} (image {record['index']} of the recorded call, seed "
               f"{record['seed']}, {record['backend']} {record['precision']})")
