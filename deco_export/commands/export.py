"""``deco export``: the group of exporters, one verb per target format."""

from __future__ import annotations

import click

from .group import LazyGroup


@click.group(cls=LazyGroup, lazy={
    "onnx": "deco_export.commands.export_onnx:export_onnx_command",
    "coreml": "deco_export.commands.export_coreml:coreml_command",
    "tensorrt": "deco_export.commands.export_tensorrt:tensorrt_command",
})
def export() -> None:
    """Export a model into a bundle: ONNX graphs, Core ML packages, TensorRT engines."""
