"""Core ML export: the DiT, the pixel decoder and the refresh graph as ML program packages.

Files (next to the ONNX graphs in the same bundle; fp32 has no suffix, as for ONNX)::

    dit.fp16.mlpackage  decoder.fp16.mlpackage  refresh.fp16.mlpackage   (default)
    dit.mlpackage       decoder.mlpackage       refresh.mlpackage        (--precision fp32)

Weight compression does not change the name: a bundle holds one Core ML artefact per graph and
precision, and the manifest's ``details.compression`` says how it was compressed.

How a graph is made:

* The fp32 graph wrapper (float32 I/O, see ``graphs.py``) is traced with ``torch.jit.trace``
  and converted to an ML program. fp16 is chosen here, per operation, by coremltools'
  ``FP16ComputePrecision`` rather than by tracing an fp16 copy: the op selector keeps the
  numerically sensitive operations in fp32 ("fp32 islands", see `FP32_ISLANDS`) and everything
  else runs in fp16. The islands are found through the TorchScript module scopes coremltools
  keeps on every MIL operation, so they follow the model's structure, not operation names.
* The batch is flexible through enumerated shapes (1 and 2 for classifier-free guidance, plus
  any sizes asked for). Core ML before iOS 18 / macOS 15 allows enumerated shapes on one input
  only: there the image-like input (``x_t``, or ``hidden`` for refresh) is enumerated and the
  other batch-carrying inputs get a bounded range; since every input shares the batch, the
  enumerated input decides which batches run. From iOS 18 / macOS 15 all inputs are enumerated
  together.
* The image size is fixed (the default size: the fast path on the Neural Engine) unless more
  sizes are listed (``image_sizes``, ``--sizes``): then they are enumerated with the batch on
  the same inputs, the others taking a range over the token count. The trace computes the RoPE
  tables and reshapes from the input's shape, so one program serves every listed size; the
  manifest records the list in each artefact's ``details["sizes"]``.
* Labels are int32 (Core ML has no int64 inputs); graph outputs are float32 and named.
* Optional weight compression after conversion: 8-bit linear (per-channel symmetric) or 6- and
  4-bit palettisation (1-D k-means look-up tables; per tensor, or per group of 16 output
  channels from iOS 18 / macOS 15 on). Only learned weights are compressed; the RoPE tables and
  the decoder's folded DCT position term keep their precision. `compress_package` compresses a
  saved package without converting again.

On Linux coremltools converts and saves but cannot predict, so the export records the
structure (inputs, shapes, operation counts by precision, fp32 islands, compression) and marks
parity "not run". On macOS every graph is compared with PyTorch and the whole sampler runs end
to end through the Core ML backend against PyTorch fp32 under the same gate as ONNX.

The package in layers: ``targets`` (choices, coremltools), ``precision`` (the fp32 islands),
``convert`` (one graph), ``compress`` (weights), ``inspect`` (structure of a program or a
package) and ``export`` (every graph and precision into a bundle).
"""

from __future__ import annotations

from ..graphs import GRAPH_NAMES, example_inputs, graph_modules
from .compress import (
    WEIGHT_THRESHOLD,
    compress_model,
    compress_package,
    kmeans_lut,
)
from .convert import (
    PRIMARY_INPUT,
    check_ranks,
    convert_graph,
    unsupported_ops,
)
from .export import (
    coreml_file_name,
    export_coreml,
    load_source,
)
from .inspect import (
    ProgramReport,
    inspect_package,
    program_report,
)
from .precision import (
    FP32_ISLANDS,
    PrecisionPolicy,
    island_of,
    parse_islands,
)
from .targets import (
    COMPRESSIONS,
    COMPUTE_UNITS,
    DEFAULT_COMPUTE_UNITS,
    DEFAULT_TARGET,
    DEPLOYMENT_TARGETS,
    INSTALL_HINT,
    PRECISIONS,
    CoreMLExportError,
    import_coremltools,
)

__all__ = [
    "COMPRESSIONS",
    "COMPUTE_UNITS",
    "DEFAULT_COMPUTE_UNITS",
    "DEFAULT_TARGET",
    "DEPLOYMENT_TARGETS",
    "FP32_ISLANDS",
    "GRAPH_NAMES",
    "INSTALL_HINT",
    "PRECISIONS",
    "PRIMARY_INPUT",
    "WEIGHT_THRESHOLD",
    "CoreMLExportError",
    "PrecisionPolicy",
    "ProgramReport",
    "check_ranks",
    "compress_model",
    "compress_package",
    "convert_graph",
    "coreml_file_name",
    "example_inputs",
    "export_coreml",
    "graph_modules",
    "import_coremltools",
    "inspect_package",
    "island_of",
    "kmeans_lut",
    "load_source",
    "parse_islands",
    "program_report",
    "unsupported_ops",
]
