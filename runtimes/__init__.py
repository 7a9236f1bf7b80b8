"""deco-export runtimes: a numpy-only core that samples DeCo on any backend.

    import runtimes
    pipe = runtimes.load("bundle/", backend="onnxruntime")
    images = pipe.generate(class_labels=[1, 2, 3], steps=50, guidance=3.2, seed=0).images

Conventions (as the reference DeCo code): t = 0 is pure noise, t = 1 is data; v = x - eps;
images are RGB in [-1, 1]; the null class is ``num_classes``.

Layout: `errors` (the user-facing error root), `config` (the model config), `backend` (the
two-call seam), `sampler` (the one sampler), `sharing` (DiT sharing schedules), `steps` (step
callbacks, cancel, inpainting), `noise`, `image`, `bundle` (the manifest reader/writer),
`pipeline` (load / generate), `backends.*` (runtime adapters, each importing its library
lazily). Nothing here imports torch or deco_export.
"""

from runtimes.backend import Backend, BackendError, RefreshBackend, supports_refresh
from runtimes.bundle import (
    Artifact,
    BundleError,
    Manifest,
    TensorSpec,
    read_manifest,
    verify,
    write_manifest,
)
from runtimes.config import ModelConfig
from runtimes.errors import ConfigError, DecoError
from runtimes.image import make_grid, save_png, to_pil, to_uint8
from runtimes.int8 import Int8GateError, Int8KernelWarning
from runtimes.noise import sample_noise
from runtimes.pipeline import (
    CalibrationResult,
    DeCoPipeline,
    GenerationOutput,
    available_backends,
    create_backend,
    load,
    record_schedule,
    register_backend,
)
from runtimes.sampler import (
    SamplerConfig,
    SamplingCost,
    SamplingPlan,
    make_plan,
    release_sampler,
    sample,
    timesteps,
)
from runtimes.sharing import (
    SharingSchedule,
    SimilarityAccumulator,
    dp_schedule,
    explicit_schedule,
    load_schedule,
    save_schedule,
    schedule_key,
    statistic_dp,
    uniform_schedule,
)
from runtimes.sizes import SizeError, SizeRange
from runtimes.steps import STOP, GenerationInterrupted, GenerationTask, StepState

__all__ = [
    "STOP",
    "Artifact",
    "Backend",
    "BackendError",
    "BundleError",
    "CalibrationResult",
    "ConfigError",
    "DeCoPipeline",
    "DecoError",
    "GenerationInterrupted",
    "GenerationOutput",
    "GenerationTask",
    "Int8GateError",
    "Int8KernelWarning",
    "Manifest",
    "ModelConfig",
    "RefreshBackend",
    "SamplerConfig",
    "SamplingCost",
    "SamplingPlan",
    "SharingSchedule",
    "SimilarityAccumulator",
    "SizeError",
    "SizeRange",
    "StepState",
    "TensorSpec",
    "available_backends",
    "create_backend",
    "dp_schedule",
    "explicit_schedule",
    "load",
    "load_schedule",
    "make_grid",
    "make_plan",
    "read_manifest",
    "record_schedule",
    "register_backend",
    "release_sampler",
    "sample",
    "sample_noise",
    "save_png",
    "save_schedule",
    "schedule_key",
    "statistic_dp",
    "supports_refresh",
    "timesteps",
    "to_pil",
    "to_uint8",
    "uniform_schedule",
    "verify",
    "write_manifest",
]
