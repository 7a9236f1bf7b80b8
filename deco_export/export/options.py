"""What every exporter takes beside its own settings, in one object documented once.

`export_onnx`, `export_coreml` and `export_tensorrt` each take ``options=ExportOptions(...)``
and their own settings; the fields below are also accepted as keyword arguments of each
exporter (``export_onnx(model, bundle, force=True)``), so callers of the keyword form keep
working. The command-line verbs declare the matching flags once (`shared export options` in
``deco_export/commands/options.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = ["ExportOptions", "Progress"]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportOptions:
    """The settings every exporter shares.

    image_size: (height, width) the graphs are exported at, the bundle's default size
        (default: the model's; a bundle source's for Core ML).
    source: the checkpoint record the manifest stores (`deco_export.sources.load_model`'s).
    parity_steps: sampler steps of the end-to-end parity gate (TensorRT: 0 skips it).
    seed: the seed of the gate's example inputs and noise.
    progress: called with one line per step of the export (None: silent).
    force: replace what the output holds where the export would otherwise refuse or keep it:
        a directory that is not a bundle of this checkpoint (replaced only once the new bundle
        is complete), or TensorRT engines that are up to date (rebuilt).
    negative_prompt_embeds: a text-to-image model's encoded negative prompt (1, L, C), stored
        in the bundle for the unconditional half; negative_prompt: its text.
    """

    image_size: tuple[int, int] | None = None
    source: dict[str, Any] | None = None
    parity_steps: int = 10
    seed: int = 0
    progress: Progress | None = None
    force: bool = False
    negative_prompt_embeds: Any = None
    negative_prompt: str | None = None

    @classmethod
    def of(cls, options: ExportOptions | None, given: Mapping[str, Any],
           exporter: str) -> ExportOptions:
        """``options`` (default all defaults) with the keyword arguments ``given`` of the
        exporter ``exporter`` applied; a keyword no exporter takes is a TypeError, as Python
        gives for a misspelt argument."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise TypeError(f"{exporter}() got unexpected keyword argument(s) "
                            f"{', '.join(unknown)}")
        return replace(options or cls(), **given)

    def say(self, message: str) -> None:
        """Report one step of the export."""
        if self.progress is not None:
            self.progress(message)
