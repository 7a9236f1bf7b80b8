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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runtimes.graphs import get_graph

from ..parity import GraphParity, max_abs_error, psnr

TEXT_ENCODER_GRAPH = get_graph("text_encoder")  # its names and axes, in runtimes.graphs
TEXT_ENCODER_FILE = "text_encoder.onnx"
TOKENIZER_FILE = "tokenizer.json"
PARITY_PROMPTS = ("", "a photo of a cat", "Unrealistic, JPEG artifacts.",
                  "an astronaut riding a horse on the moon, detailed, 4k " * 8)
MAX_RELATIVE_ERROR = 1e-4
EXTERNAL_DATA_BYTES = 1_800_000_000


class TextEncoderExportError(ValueError):
    """The exported text encoder does not reproduce the PyTorch one; nothing is written."""


def write_tokenizer(encoder: Any, path: Path) -> None:
    """The encoder's fast tokenizer with its padding (right, to max_length) and truncation."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(encoder.tokenizer.backend_tokenizer.to_str())
    tok.no_padding()
    tok.enable_truncation(encoder.max_length)
    tok.enable_padding(direction="right", pad_id=int(encoder.tokenizer.pad_token_id),
                       pad_token=str(encoder.tokenizer.pad_token), length=encoder.max_length)
    tok.save(str(path))


def export_text_encoder_graph(encoder: Any, path: Path, opset: int = 18) -> bool:
    """Trace ``encoder`` (a TransformersTextEncoder) to ONNX at ``path``; True when the weights
    went to external data."""
    import torch

    from ..text_encoders import EXPORT_ATTENTION, TransformersTextEncoder
    from .graphs import quiet

    traced = TransformersTextEncoder(encoder.directory, encoder.max_length,
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
        program = torch.onnx.export(
            Graph(traced.model).eval(), inputs, dynamo=True, opset_version=opset,
            input_names=list(TEXT_ENCODER_GRAPH.input_names),
            output_names=list(TEXT_ENCODER_GRAPH.output_names),
            dynamic_shapes=tuple({i: batch for i, axis in enumerate(s.shape) if axis == "batch"}
                                 for s in TEXT_ENCODER_GRAPH.inputs), verbose=False,
        )
    program.save(str(path), external_data=external)
    return external


def text_encoder_parity(encoder: Any, onnx_path: Path, tokenizer_path: Path
                        ) -> list[GraphParity]:
    """The ONNX graph fed by ``tokenizer.json`` against the PyTorch encoder, prompt by prompt;
    the tokens must be identical."""
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
                                   max_abs_error(want, got), psnr(want, got)))
        scale = float(np.abs(want).max()) or 1.0
        if not results[-1].max_abs_error <= MAX_RELATIVE_ERROR * max(scale, 1.0):
            raise TextEncoderExportError(
                f"text_encoder.onnx differs from the PyTorch encoder on prompt "
                f"{prompt[:40]!r} by {results[-1].max_abs_error:.2e} (features up to "
                f"{scale:.1f}); nothing was written"
            )
    return results


def export_text_encoder(encoder: Any, txn: Any, opset: int = 18,
                        progress: Any = None) -> None:
    """Stage ``text_encoder.onnx`` + ``tokenizer.json`` in a bundle transaction, gated."""
    from .onnx_tools import check_onnx, tool_versions

    say = progress or (lambda _msg: None)
    path = txn.staging / TEXT_ENCODER_FILE
    tokenizer = txn.staging / TOKENIZER_FILE
    say(f"exporting {TEXT_ENCODER_FILE} (opset {opset})")
    write_tokenizer(encoder, tokenizer)
    external = export_text_encoder_graph(encoder, path, opset)
    check_onnx(path)
    say(f"checking {TEXT_ENCODER_FILE} in ONNX Runtime against PyTorch")
    parity = text_encoder_parity(encoder, path, tokenizer)
    data = sorted(p for p in txn.staging.iterdir() if p.name.startswith(TEXT_ENCODER_FILE + "."))
    sizes: dict[str, int | str] = {"text_len": encoder.max_length, "text_dim": encoder.dim}
    txn.add_artifact(
        runtime="onnx", graph="text_encoder", precision="fp32", path=path,
        extra_files=[tokenizer, *data],
        inputs=[s.resolve(sizes).to_dict() for s in TEXT_ENCODER_GRAPH.inputs],
        outputs=[s.resolve(sizes).to_dict() for s in TEXT_ENCODER_GRAPH.outputs],
        details={"opset": opset, "exporter": "torch.onnx dynamo", "external_data": external,
                 "tokenizer": TOKENIZER_FILE, "source": str(encoder.directory),
                 "model_type": str(encoder.model.config.model_type),
                 "fully_masked_rows": "zero"},
        parity={"graphs": [r.to_dict() for r in parity]},
        tools=tool_versions(),
    )
