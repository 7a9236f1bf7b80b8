"""Provider options for ONNX Runtime's TensorRT execution provider: the simpler route to
TensorRT, where ONNX Runtime builds and caches the engines itself (no bundle engines, no keys).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from runtimes.backends.tensorrt_keys import build_options

__all__ = ["ort_tensorrt_provider_options"]


def ort_tensorrt_provider_options(
    cache_dir: str | os.PathLike[str],
    *,
    device_id: int = 0,
    builder_optimization_level: int = 3,
    workspace_bytes: int | None = None,
    fp16_kernels: bool = False,
    cuda_graph: bool = False,
    profile: Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]] | None = None,
) -> dict[str, str]:
    """Provider options for ONNX Runtime's TensorRT execution provider: the simpler route,
    where ONNX Runtime builds and caches the engines itself.

    Use as ``runtimes.load(bundle, providers=[("tensorrt", opts), "cuda"])``. Engines and the
    timing cache go under ``cache_dir`` (e.g. ``BUNDLE/engines/ort-tensorrt``); ONNX Runtime
    names them by graph hash and GPU and rebuilds on a TensorRT version change. Precision comes
    from the graph: pick the bundle's fp16 graphs for fp16. ``fp16_kernels`` additionally lets
    TensorRT 10 run fp32 graphs in fp16 (weak typing; TensorRT 11 ignores it). ``profile`` maps
    input names to (min, opt, max) shapes for one graph; without it the provider builds for the
    shapes it sees (one engine per shape, cached). ``cuda_graph`` needs static shapes.
    """
    path = Path(cache_dir)
    opts: dict[str, str] = {
        "device_id": str(int(device_id)),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(path),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(path),
        "trt_builder_optimization_level": str(build_options(builder_optimization_level)[
            "builder_optimization_level"]),
    }
    if workspace_bytes is not None:
        opts["trt_max_workspace_size"] = str(build_options(3, workspace_bytes)["workspace_bytes"])
    if fp16_kernels:
        opts["trt_fp16_enable"] = "True"
    if cuda_graph:
        opts["trt_cuda_graph_enable"] = "True"
    if profile:
        for i, sel in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes",
                                 "trt_profile_max_shapes")):
            opts[sel] = ",".join(f"{name}:{'x'.join(str(int(d)) for d in shapes[i])}"
                                 for name, shapes in profile.items())
    return opts
