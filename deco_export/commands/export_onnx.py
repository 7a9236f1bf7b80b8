"""``deco export onnx``: a checkpoint -> a bundle of parity-gated ONNX graphs."""

from __future__ import annotations

from pathlib import Path

import click

from runtimes.bundle import ONNX_PRECISIONS

from .options import echo_step, export_flags, model_text_encoder, parse_size, single_value


@click.command("onnx")
@click.argument("model", metavar="CHECKPOINT")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--precision", "precisions", multiple=True,
              type=click.Choice(list(ONNX_PRECISIONS)), default=("fp32",), show_default=True,
              help="repeat for several variants; int8 = fp32 graph with int8 weights (CPU)")
@click.option("--int8-weights", type=click.Choice(["int8-7bit", "int8", "uint8"]),
              default=None,
              help="with --precision int8: how weights are quantized. int8-7bit (default) is "
                   "exact on every x86 CPU; int8 (8-bit) saturates on CPUs without VNNI; uint8 "
                   "runs u8 x u8 kernels (docs/benchmarks.md)")
@click.option("--opset", type=int, default=18, show_default=True,
              help="18 (portable) or 23 (native Attention op)")
@click.option("--image-size", default=None,
              help="HxW to export at: the bundle's default size (default: the model's)")
@click.option("--size-range", default=None,
              help="MIN:MAX sizes the graphs serve, e.g. 32:128 or 32x64:128x256 (HxW), "
                   "multiples of the patch size [half to twice the export size]; one size "
                   "(64:64) exports fixed-size graphs")
@click.option("--weights", type=click.Choice(["ema", "online"]), default="ema",
              help="for reference .ckpt files")
@click.option("--text-encoder", default=None,
              help="text-to-image: a local transformers directory or 'minilm'; the bundle gets "
                   "text_encoder.onnx, tokenizer.json and the encoded negative prompt [the one the "
                   "checkpoint's metadata names, e.g. default-t2i's minilm]")
@click.option("--text-encoder-precision", "text_encoder_precisions", multiple=True,
              type=click.Choice(list(ONNX_PRECISIONS)),
              help="text-to-image: also write the text encoder at this precision (repeat for "
                   "several), gated on its features; fp32 is always written")
@click.option("--negative-prompt", "negative_prompts", multiple=True,
              help="text-to-image: the prompt of the unconditional half [empty]")
@export_flags
def export_onnx_command(model: str, bundle: Path, precisions: tuple[str, ...],
                        int8_weights: str | None, opset: int,
                        image_size: str | None, size_range: str | None, parity_steps: int,
                        weights: str,
                        force: bool, text_encoder: str | None,
                        text_encoder_precisions: tuple[str, ...],
                        negative_prompts: tuple[str, ...]) -> None:
    """Write dit.onnx, decoder.onnx and refresh.onnx (+ manifest) into BUNDLE; the plain DiT
    baseline writes its one graph, pixel_dit.onnx.

    CHECKPOINT is an embedded model ('default', 'default-t2i' or their '-distilled'
    students), a checkpoint directory
    or a reference .ckpt.
    The export is gated on parity with PyTorch; a failing export leaves nothing behind.
    """
    from ..export.onnx import export_onnx
    from ..export.options import ExportOptions
    from ..export.quantize import INT8_WEIGHTS
    from ..sources import load_model

    if int8_weights is not None and "int8" not in (*precisions, *text_encoder_precisions):
        raise click.UsageError("--int8-weights applies to int8 graphs: add --precision int8 "
                               "(or --text-encoder-precision int8)")
    negative_prompt = single_value(negative_prompts, "--negative-prompt")
    net, source = load_model(model, weights=weights)
    if not net.config.is_text_to_image and negative_prompt is not None:
        raise click.UsageError(f"--negative-prompt is for text-to-image models; {model} is "
                               "class-conditional")
    size = parse_size(image_size) if image_size else None
    sizes = None
    if size_range is not None:
        from runtimes.sizes import parse_size_range

        sizes = parse_size_range(size_range, size or net.config.image_size,
                                 net.config.patch_size)
    encoder = model_text_encoder(net.config, text_encoder, model,
                                 say=lambda msg: click.echo(f"  {msg}", err=True))
    if encoder is None and negative_prompt is not None:
        raise click.UsageError("--negative-prompt is encoded by the bundle's text encoder: "
                               "give --text-encoder DIR (or 'minilm') too")
    if encoder is None and text_encoder_precisions:
        raise click.UsageError("--text-encoder-precision needs a text encoder: give "
                               "--text-encoder DIR (or 'minilm') too")
    options = ExportOptions(
        image_size=size, source=source, parity_steps=parity_steps, progress=echo_step,
        force=force, negative_prompt=(negative_prompt or "") if encoder is not None else None)
    export_onnx(net, bundle, options, precisions=precisions, opset=opset, text_encoder=encoder,
                size_range=sizes, int8=INT8_WEIGHTS[int8_weights or "int8-7bit"],
                text_encoder_precisions=("fp32", *text_encoder_precisions))
    click.echo(f"wrote {bundle}")
