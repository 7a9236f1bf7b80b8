"""ONNX export of a text-to-image model's text encoder: ``text_encoder.onnx`` and the
``tokenizer.json`` that feeds it, so an application encodes prompts with onnxruntime and
``tokenizers`` only (no torch, no transformers).

The graph maps (input_ids, attention_mask) (B, L) int64 to the last hidden state (B, L, C)
float32. It is traced with the written-out attention of
:func:`deco_export.text_encoders.zero_masked_rows_attention`, so the empty prompt's fully
masked rows give zeros as the PyTorch encoder's SDPA does. ``tokenizer.json`` carries right
padding to exactly L tokens and truncation at L. Weights above 2 GB (Qwen3-1.7B in fp32) go to
external data. The export is gated: every prompt of a fixed list, the empty one included,
against the PyTorch encoder (max abs error <= 1e-4 relative to the features' scale).

Smaller copies for memory (the fp32 Qwen3-1.7B is 7 GB): ``text_encoder.fp16.onnx`` (traced
in float16, the I/O as at fp32) and ``text_encoder.int8.onnx`` (the fp32 graph through the
package's one int8 path, `deco_export.export.quantize`), each gated on the same prompts by the
signal-to-noise ratio of its features (`deco_export.parity.TEXT_ENCODER_MIN_SNR`); an
encoder that loses too much at a precision is refused there, with the figure.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runtimes.bundle import ONNX_PRECISIONS
from runtimes.graphs import get_graph

from ..parity import TEXT_ENCODER_MIN_SNR, GraphParity, finite, max_abs_error, psnr, snr

if TYPE_CHECKING:
    from .quantize import Int8Settings

TEXT_ENCODER_GRAPH = get_graph("text_encoder")  # its names and axes, in runtimes.graphs
TEXT_ENCODER_FILE = "text_encoder.onnx"
TOKENIZER_FILE = "tokenizer.json"
PARITY_PROMPTS = ("", "a photo of a cat", "Unrealistic, JPEG artifacts.",
                  "an astronaut riding a horse on the moon, detailed, 4k " * 8)
MAX_RELATIVE_ERROR = 1e-4
TEXT_ENCODER_PRECISIONS = ONNX_PRECISIONS  # fp32 (always), fp16, int8 (fp32's graph, quantized)
TRACE_DTYPES = {"fp32": "float32", "fp16": "float16"}
EXTERNAL_DATA_BYTES = 1_800_000_000


class TextEncoderExportError(ValueError):
    """The exported text encoder does not reproduce the PyTorch one; nothing is written."""

    snr_db: float | None = None  # a reduced precision's worst feature SNR, below its gate


def write_tokenizer(encoder: Any, path: Path) -> None:
    """The encoder's fast tokenizer with its padding (right, to max_length) and truncation."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(encoder.tokenizer.backend_tokenizer.to_str())
    tok.no_padding()
    tok.enable_truncation(encoder.max_length)
    tok.enable_padding(direction="right", pad_id=int(encoder.tokenizer.pad_token_id),
                       pad_token=str(encoder.tokenizer.pad_token), length=encoder.max_length)
    tok.save(str(path))


def export_text_encoder_graph(encoder: Any, path: Path, opset: int = 18,
                              dtype: str = "float32") -> bool:
    """Trace ``encoder`` (a TransformersTextEncoder) to ONNX at ``path``, its weights and
    compute in ``dtype`` (the graph's inputs and float32 output are the same at every dtype);
    True when the weights went to external data."""
    import torch

    from ..text_encoders import EXPORT_ATTENTION, TransformersTextEncoder
    from .graphs import quiet
    from .trace_cache import export_onnx_file

    traced = TransformersTextEncoder(encoder.directory, encoder.max_length, dtype=dtype,
                                     attention=EXPORT_ATTENTION)

    class Graph(torch.nn.Module):
        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            return out.last_hidden_state.float()

    tokens = traced.tokenize(list(PARITY_PROMPTS[:2]))
    inputs = (torch.from_numpy(tokens.input_ids), torch.from_numpy(tokens.attention_mask))
    weight_bytes = sum(p.numel() * p.element_size() for p in traced.model.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The optimizer's constant folding reports the tokenizer-shaped constants it leaves alone.
    with quiet("torch.onnx._internal.exporter._registration",
               "onnxscript.optimizer._constant_folding"):
        export_onnx_file(
            Graph(traced.model).eval(), inputs, path, opset=opset,
            input_names=list(TEXT_ENCODER_GRAPH.input_names),
            output_names=list(TEXT_ENCODER_GRAPH.output_names),
            dynamic_shapes=tuple({i: batch for i, axis in enumerate(s.shape) if axis == "batch"}
                                 for s in TEXT_ENCODER_GRAPH.inputs), external_data=external,
        )
    return external


def text_encoder_parity(encoder: Any, onnx_path: Path, tokenizer_path: Path,
                        precision: str = "fp32") -> list[GraphParity]:
    """The ONNX graph fed by ``tokenizer.json`` against the PyTorch fp32 encoder, prompt by
    prompt; the tokens must be identical. fp32 must match to rounding on every prompt; a
    reduced ``precision`` must keep its features' worst `snr` over the prompts at
    `TEXT_ENCODER_MIN_SNR` (figures recorded per prompt)."""
    from tokenizers import Tokenizer

    from .onnx_tools import ort_session

    tok = Tokenizer.from_file(str(tokenizer_path))
    session = ort_session(onnx_path)
    results = []
    for prompt in PARITY_PROMPTS:
        ids = np.array([tok.encode(prompt).ids], dtype=np.int64)
        mask = np.array([tok.encode(prompt).attention_mask], dtype=np.int64)
        ref_tokens = encoder.tokenize([prompt])
        if not (np.array_equal(ids, ref_tokens.input_ids)
                and np.array_equal(mask, ref_tokens.attention_mask)):
            raise TextEncoderExportError(
                f"tokenizer.json tokenizes {prompt[:40]!r} differently from the encoder's "
                "tokenizer; the text encoder cannot be exported faithfully"
            )
        got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        want = encoder.encode([prompt])
        results.append(GraphParity(f"text_encoder[{len(results)}]", 1,
                                   max_abs_error(want, got), psnr(want, got),
                                   snr_db=None if precision == "fp32" else snr(want, got)))
        scale = float(np.abs(want).max()) or 1.0
        if precision == "fp32" and not (
                results[-1].max_abs_error <= MAX_RELATIVE_ERROR * max(scale, 1.0)):
            raise TextEncoderExportError(
                f"{onnx_path.name} differs from the PyTorch encoder on prompt "
                f"{prompt[:40]!r} by {results[-1].max_abs_error:.2e} (features up to "
                f"{scale:.1f}); nothing was written"
            )
    if precision != "fp32":
        worst = min(results, key=lambda r: r.snr_db if r.snr_db is not None else math.inf)
        limit = TEXT_ENCODER_MIN_SNR[precision]
        if not (worst.snr_db is not None and worst.snr_db >= limit):
            prompt = PARITY_PROMPTS[results.index(worst)]
            error = TextEncoderExportError(
                f"{onnx_path.name}: the {precision} text encoder's features on prompt "
                f"{prompt[:40]!r} have a {worst.snr_db:.1f} dB SNR against the PyTorch fp32 "
                f"encoder's, below the {limit:g} dB gate; nothing was written (keep the "
                "fp32 text encoder, or try another precision)"
            )
            error.snr_db = worst.snr_db
            raise error
    return results


def export_text_encoder(encoder: Any, txn: Any, opset: int = 18, progress: Any = None,
                        precisions: Sequence[str] = ("fp32",),
                        int8: Int8Settings | None = None) -> None:
    """Stage ``text_encoder.onnx`` + ``tokenizer.json`` in a bundle transaction, gated, and
    the text encoder at each other of ``precisions`` (``text_encoder.fp16.onnx``: traced in
    float16; ``text_encoder.int8.onnx``: the fp32 graph quantized by `quantize_int8` with
    ``int8``), each held to its own gate on the features and recorded with it (the int8 one
    with the CPU it ran on: `runtimes.int8`). fp32 is always written: it is the reference,
    what the stored negative prompt is encoded with, and what ``runtimes.load`` opens."""
    from runtimes.cpu import cpu_record

    from .onnx_tools import check_onnx, onnx_file_name, tool_versions
    from .quantize import Int8Settings, quantize_int8

    unknown = [p for p in precisions if p not in TEXT_ENCODER_PRECISIONS]
    if unknown:
        raise ValueError(f"text encoder precision must be one of "
                         f"{list(TEXT_ENCODER_PRECISIONS)}, not {unknown[0]!r}")
    say = progress or (lambda _msg: None)
    tokenizer = txn.staging / TOKENIZER_FILE
    write_tokenizer(encoder, tokenizer)
    sizes: dict[str, int | str] = {"text_len": encoder.max_length, "text_dim": encoder.dim}
    fp32_path, fp32_external = txn.staging / TEXT_ENCODER_FILE, False
    for precision in ["fp32", *sorted(set(precisions) - {"fp32"}, key=precisions.index)]:
        name = onnx_file_name("text_encoder", precision)
        path = txn.staging / name
        details: dict[str, Any] = {}
        if precision == "int8":
            # The copy reads its weights from fp32's data file, if any; the quantizer writes
            # its own (``text_encoder.int8.onnx.data``).
            external = fp32_external
            shutil.copyfile(fp32_path, path)
            settings = int8 or Int8Settings()
            say(f"quantizing {name} from {TEXT_ENCODER_FILE} ({settings.describe()})")
            details["quantization"] = quantize_int8(path, external, settings)
        else:
            say(f"exporting {name} (opset {opset})")
            external = export_text_encoder_graph(encoder, path, opset,
                                                 dtype=TRACE_DTYPES[precision])
        if precision == "fp32":
            fp32_external = external
        check_onnx(path)
        say(f"checking {name} in ONNX Runtime against PyTorch fp32")
        parity = text_encoder_parity(encoder, path, tokenizer, precision)
        record: dict[str, Any] = {"graphs": [r.to_dict() for r in parity]}
        if precision != "fp32":
            worst = min(r.snr_db for r in parity if r.snr_db is not None)
            record["features"] = {"snr_db": finite(worst), "status": "passed",
                                  "threshold_db": TEXT_ENCODER_MIN_SNR[precision],
                                  "prompts": len(parity), "cpu": cpu_record()}
            say(f"text encoder {precision}: worst feature SNR {worst:.1f} dB")
        data = sorted(p for p in txn.staging.iterdir() if p.name.startswith(name + "."))
        txn.add_artifact(
            runtime="onnx", graph="text_encoder", precision=precision, path=path,
            extra_files=[tokenizer, *data],
            inputs=[s.resolve(sizes).to_dict() for s in TEXT_ENCODER_GRAPH.inputs],
            outputs=[s.resolve(sizes).to_dict() for s in TEXT_ENCODER_GRAPH.outputs],
            details={"opset": opset, "exporter": "torch.onnx dynamo", "external_data": external,
                     "tokenizer": TOKENIZER_FILE, "source": str(encoder.directory),
                     "model_type": str(encoder.model.config.model_type),
                     "fully_masked_rows": "zero", **details},
            parity=record,
            tools=tool_versions(),
        )
