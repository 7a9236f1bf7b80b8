"""`deco export tensorrt BUNDLE`: TensorRT engines built from a bundle's ONNX graphs.

One engine per graph (dit, decoder and, when exported, refresh) and precision, built on the GPU
that will run it:

* **Strongly typed networks** from the bundle's fp32 / fp16 / bf16 ONNX: layer precision
  follows the graph's tensor types (fp32 statistics stay fp32), not builder flags.
* **One profile per engine batch.** User batch buckets (default 1, 2, 4, 8) count the
  CFG doubling: bucket b needs engine batch 2b for guided steps and b for unguided ones
  (`runtimes.backends.tensorrt_profiles`). The backend pads a batch up to its bucket and captures a
  CUDA graph per bucket (and image size). The batch of a profile is static; its height and
  width span the bundle's size range (`runtimes.sizes`) with the optimum at the default size,
  so one engine serves every size the ONNX graphs do; a bundle of fixed-size graphs gets
  static profiles at its size.
* **A timing cache** per TensorRT version and GPU, reused by every build on the machine
  (``~/.cache/deco/tensorrt``; ``--timing-cache`` moves it).
* **Cache keys.** Each engine is keyed by its ONNX sha256, precision, profiles, builder options,
  TensorRT version, GPU name and compute capability, and lives at
  ``engines/<graph>-<precision>-<key>/<graph>.plan``. Up-to-date engines are kept; a stale one
  (its ONNX changed) or a foreign one (another TensorRT or GPU) is rebuilt, and only that graph.
* **Gated like every export.** Each new engine is compared with PyTorch eager fp32 at every
  engine batch, then the sampler runs end to end through the TensorRT backend from the same
  noise as PyTorch; only engines that pass move into the bundle (`BundleTransaction`).

``tensorrt`` and ``cuda-python`` are imported inside the functions that need them; without them
the command fails with one line that names the install and the NVIDIA GPU it needs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from runtimes import bundle as rb
from runtimes.backend import BackendError
from runtimes.backends import tensorrt_keys as tk
from runtimes.backends import tensorrt_profiles as tp
from runtimes.config import ModelConfig
from runtimes.errors import DecoError
from runtimes.graphs import graphs_for
from runtimes.sizes import SizeRange

from .options import ExportOptions, Progress


class TensorRTUnavailable(DecoError, RuntimeError):
    """TensorRT, cuda-python or a CUDA GPU is missing; the message says what to install."""


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or TensorRTUnavailable with a one-line fix."""
    from runtimes.backends.cuda_device import INSTALL_HINT

    try:
        import tensorrt
    except ImportError as exc:  # also the bindings wheel without libnvinfer / libnvonnxparser
        raise TensorRTUnavailable(
            f"TensorRT is not installed ({exc}); {INSTALL_HINT}") from None
    return tensorrt


def machine_environment(trt: Any, device_id: int = 0) -> tk.EngineEnvironment:
    """TensorRT version, GPU name and compute capability of this machine."""
    from runtimes.backends.cuda_device import import_cuda
    from runtimes.backends.tensorrt_engine import cuda_environment

    try:
        return cuda_environment(trt, import_cuda(), device_id)
    except BackendError as exc:
        raise TensorRTUnavailable(
            f"no usable CUDA GPU {device_id} ({exc}); TensorRT builds engines on the NVIDIA GPU "
            "that will run them"
        ) from None


# ---------------------------------------------------------------------------------------------
# What to build (pure: no TensorRT needed)


@dataclass(frozen=True)
class BuildSettings:
    """Everything about a build that the user chooses."""

    buckets: tuple[int, ...] = tp.DEFAULT_BATCH_BUCKETS
    cfg: bool = True
    builder_optimization_level: int = 3
    workspace_bytes: int | None = None
    tf32: bool = False

    @property
    def engine_batches(self) -> tuple[int, ...]:
        return tp.engine_batches(self.buckets, self.cfg)

    @property
    def build(self) -> dict[str, Any]:
        return tk.build_options(self.builder_optimization_level, self.workspace_bytes, self.tf32)

    def for_model(self, model: ModelConfig) -> BuildSettings:
        """These settings for ``model``: a guidance-distilled model never runs an
        [uncond; cond] batch, so its engines need no doubled batches."""
        return replace(self, cfg=False) if model.guidance_distilled and self.cfg else self


@dataclass(frozen=True)
class BuildItem:
    """One engine: build it (with the reason) or keep the one the bundle has."""

    precision: str
    graph: str
    onnx: rb.Artifact
    key: tk.EngineKey
    action: str  # "build" or "keep"
    reason: str
    existing: rb.Artifact | None

    def describe(self) -> str:
        verb = "up to date" if self.action == "keep" else f"build ({self.reason})"
        return f"{self.graph} {self.precision}: {verb} -> {self.key.relpath}"


# int8 ONNX graphs are ONNX Runtime's dynamic quantization (DynamicQuantizeLinear +
# MatMulInteger); TensorRT's parser takes Q/DQ int8 only, so engines build from the float graphs.
ENGINE_PRECISIONS = ("fp32", "fp16", "bf16")


def onnx_precisions(manifest: rb.Manifest) -> list[str]:
    """Precisions for which the bundle has both the dit and decoder ONNX graphs that TensorRT
    can build engines from."""
    return [p for p in ENGINE_PRECISIONS
            if all(manifest.has_artifact("onnx", g, p)
                   for g, spec in graphs_for(manifest.model).items() if spec.required)]


def check_sources(bundle_dir: str | os.PathLike[str], manifest: rb.Manifest,
                  precisions: Sequence[str] | None) -> list[str]:
    """The precisions to build, after checking the bundle has their ONNX graphs."""
    have = onnx_precisions(manifest)
    wanted = list(precisions) if precisions else have
    if not wanted:
        raise ValueError(
            f"{bundle_dir} has no ONNX graphs to build engines from; export them first with "
            f"`deco export onnx CHECKPOINT {bundle_dir}`"
        )
    for precision in wanted:
        if precision not in ENGINE_PRECISIONS:
            raise ValueError(f"TensorRT engines build at {', '.join(ENGINE_PRECISIONS)}, not "
                             f"{precision!r} (int8 graphs are for ONNX Runtime)")
        if precision not in have:
            raise ValueError(
                f"{bundle_dir} has no {precision} ONNX graphs (it has "
                f"{', '.join(have) or 'none'}); "
                f"export them with `deco export onnx CHECKPOINT {bundle_dir} --precision "
                f"{precision}` or pick another precision"
            )
    if manifest.model.image_size is None:
        raise ValueError(f"{bundle_dir}: the manifest's model has no image_size; export again")
    return wanted


def plan_builds(bundle_dir: str | os.PathLike[str], manifest: rb.Manifest,
                precisions: Sequence[str] | None, env: tk.EngineEnvironment,
                settings: BuildSettings, force: bool = False) -> list[BuildItem]:
    """The engines ``deco export tensorrt`` would build or keep, and why."""
    wanted = check_sources(bundle_dir, manifest, precisions)
    size = manifest.model.image_size
    span = engine_sizes(manifest)
    root = Path(bundle_dir)
    items: list[BuildItem] = []
    for precision in wanted:
        for graph in graphs_for(manifest.model):
            onnx = manifest.get_artifact("onnx", graph, precision)
            if onnx is None:
                continue
            key = tk.EngineKey(graph, precision, onnx.sha256, size, settings.engine_batches,
                               env.tensorrt_version, env.gpu_name, env.compute_capability,
                               settings.build, None if span is None else span.to_dict())
            existing = manifest.get_artifact("tensorrt", graph, precision)
            action, reason = "build", "no engine yet"
            if force:
                reason = "--force"
            elif existing is not None:
                recorded = existing.details.get("key")
                plan = root / existing.file
                if existing.details.get("cache_key") == key.digest:
                    if plan.is_file() and plan.stat().st_size == existing.bytes:
                        action, reason = "keep", "up to date"
                    else:
                        reason = "its plan file is missing or truncated"
                elif isinstance(recorded, dict):
                    kind, reasons = tk.describe_mismatch(recorded, key.fields())
                    reason = f"{kind or 'changed'}: " + "; ".join(reasons or ["key differs"])
                else:
                    reason = "its manifest entry has no cache key"
            items.append(BuildItem(precision, graph, onnx, key, action, reason, existing))
    return items


def engine_sizes(manifest: rb.Manifest) -> SizeRange | None:
    """The size range the engines' profiles span: the ONNX graphs' range (None when they have
    one size, and the profiles are static)."""
    span = manifest.size_range("onnx")
    if span is None or span.is_fixed:
        return None
    return SizeRange(span.min_size, span.max_size, span.default, span.multiple)


def artifact_details(item: BuildItem, settings: BuildSettings) -> dict[str, Any]:
    """The manifest "details" of a new engine: its cache key and the fields it hashes (what
    the backend checks before loading), and the build settings in readable form."""
    return {
        "cache_key": item.key.digest,
        "key": item.key.fields(),
        "onnx_file": item.onnx.file,
        "batch_buckets": list(settings.buckets),
        "cfg_doubling": settings.cfg,
        "engine_batches": list(settings.engine_batches),
        "strongly_typed": True,
        **settings.build,
        **({} if item.key.sizes is None else {"sizes": dict(item.key.sizes)}),
    }


# ---------------------------------------------------------------------------------------------
# Building one engine (TensorRT)


def build_engine(trt: Any, onnx_path: Path, plan_path: Path, profiles: Sequence[tp.Profile],
                 settings: BuildSettings, timing_cache: Path, say: Progress) -> dict[str, Any]:
    """Parse ``onnx_path`` into a strongly typed network, build it with one optimisation
    profile per engine batch, write the plan, and fold new timings into the timing cache."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # TensorRT 11 types every network strongly
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ValueError(
            f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: "
            f"{errors[0] if errors else 'unknown error'}"
            + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
        )
    config = builder.create_builder_config()
    config.builder_optimization_level = settings.builder_optimization_level
    if settings.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:  # fp32 engines meet the fp32 parity gate only without TF32
        (config.set_flag if settings.tf32 else config.clear_flag)(tf32)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if cache is None or not config.set_timing_cache(cache, False):
        say(f"timing cache {timing_cache} is from another TensorRT/GPU; starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    for profile in profiles:
        p = builder.create_optimization_profile()
        for name in profile.shapes:
            p.set_shape(name, *profile.bounds(name))  # min, opt, max
        config.add_optimization_profile(p)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ValueError(
            f"TensorRT could not build {onnx_path.name} (see its log above); give it more "
            "memory (--workspace-gib), fewer or smaller batch buckets, or a lower --opt-level"
        )
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    with open(plan_path, "wb") as fh:
        fh.write(memoryview(serialized))
    rb.atomic_write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return {"build_seconds": round(time.perf_counter() - started, 1),
            "timing_cache": str(timing_cache)}


def engine_parity(model: Any, graph: str, plan: Path, batches: Sequence[int],
                  image_size: tuple[int, int], seed: int, device_id: int,
                  sizes: Sequence[tuple[int, int]] | None = None) -> list[Any]:
    """The engine's outputs against PyTorch eager fp32 at every engine batch, at each of
    ``sizes`` (default ``image_size`` only)."""
    from runtimes.backends.tensorrt_runner import EngineRunner

    from ..parity import GraphParity, max_abs_error, psnr
    from .graphs import example_inputs, input_names, output_names, reference_outputs

    config = model.config
    runner = EngineRunner(plan, graph, device_id, config)
    results = []
    try:
        for (height, width), n in ((s, n) for s in sizes or [image_size] for n in batches):
            inputs = example_inputs(model, graph, n, height, width, seed=seed + n)
            expected = reference_outputs(model, graph, inputs)
            feeds = {k: v.numpy()
                     for k, v in zip(input_names(config, graph), inputs, strict=True)}
            got = runner.run(feeds)
            names = [o for o in output_names(config, graph) if o in got]
            for name, ref in zip(output_names(config, graph), expected, strict=True):
                if name not in got:
                    continue
                label = graph if len(names) == 1 else f"{graph}.{name}"
                ref_np = ref.numpy()
                results.append(GraphParity(label, n, max_abs_error(ref_np, got[name]),
                                           psnr(ref_np, got[name]), height, width))
    finally:
        runner.close()
    return results


# ---------------------------------------------------------------------------------------------
# The export


def export_tensorrt(
    bundle: str | os.PathLike[str],
    options: ExportOptions | None = None,
    *,
    precisions: Sequence[str] | None = None,
    settings: BuildSettings | None = None,
    timing_cache: str | os.PathLike[str] | None = None,
    checkpoint: str | None = None,
    device_id: int = 0,
    **shared: Any,
) -> list[str]:
    """Build (or keep) the bundle's TensorRT engines for this machine; return report lines.
    ``options`` (or the same fields as keywords, ``shared``) are every exporter's settings
    (`ExportOptions`: the parity gate's steps (0 skips it) and seed, progress, and ``force``,
    which rebuilds engines that are up to date); the export size, source and negative prompt
    are the bundle's.

    ``checkpoint`` is the PyTorch model the parity gate compares with (default: the source the
    manifest names). Nothing changes in the bundle unless every new engine passes its gate.
    """
    opts = ExportOptions.of(options, shared, "export_tensorrt")
    force, parity_steps, seed, say = opts.force, opts.parity_steps, opts.seed, opts.say
    root = Path(bundle)
    manifest = rb.read_manifest(root)
    settings = (settings or BuildSettings()).for_model(manifest.model)
    if not manifest.model.has_decoder:
        raise ValueError(
            f"{root} holds the plain DiT baseline (one graph, pixel_dit), which runs on ONNX "
            "Runtime only; use --backend onnxruntime"
        )
    check_sources(root, manifest, precisions)  # before TensorRT: a wrong bundle says so first
    trt = require_tensorrt()
    env = machine_environment(trt, device_id)
    say(f"TensorRT {env.tensorrt_version} on {env.gpu_name} (compute capability "
        f"{env.compute_capability})")
    items = plan_builds(root, manifest, precisions, env, settings, force)
    for item in items:
        say(item.describe())
    if all(item.action == "keep" for item in items):
        return [f"engines up to date for {env.gpu_name}, TensorRT {env.tensorrt_version}:",
                *(f"  {item.describe()}" for item in items)]

    from ..sources import bundle_source_model

    model = bundle_source_model(root, manifest, checkpoint)
    cache_path = Path(timing_cache) if timing_cache else tk.timing_cache_path(env)
    image_size = manifest.model.image_size
    span = engine_sizes(manifest)
    checked = span.parity_sizes() if span is not None else [image_size]
    lines: list[str] = []
    from ..parity import check_graph_gate
    from .bundle_io import BundleTransaction
    from .graphs import io_specs

    with BundleTransaction(root, model.config, image_size, manifest.source) as txn:
        for precision in sorted({i.precision for i in items if i.action == "build"}):
            group = [i for i in items if i.precision == precision]
            parity = []
            for item in group:
                plan = txn.staging / item.key.relpath
                record = txn.staging / item.key.json_relpath
                inputs, outputs = (io_specs(model.config, item.graph) if span is not None
                                   else io_specs(model.config, item.graph, *image_size))
                details = artifact_details(item, settings)
                results: list[Any] = []
                extra = [record]
                if item.action == "keep" and item.existing is not None:
                    # Staged beside the new engines so the end-to-end gate samples with all.
                    plan = txn.staging / item.existing.file
                    extra = [txn.staging / rel for rel in item.existing.extra_files]
                    for rel in [item.existing.file, *item.existing.extra_files]:
                        _link(root / rel, txn.staging / rel)
                    details = dict(item.existing.details)
                    results = list(item.existing.parity.get("graphs", []))
                else:
                    say(f"building {item.key.relpath} from {item.onnx.file} "
                        f"(engine batches {list(settings.engine_batches)})")
                    profiles = tp.profiles_for(item.graph, manifest.model, image_size,
                                               settings.engine_batches, span)
                    info = build_engine(trt, root / item.onnx.file, plan, profiles, settings,
                                        cache_path, say)
                    details.update(info)
                    details["profiles"] = [p.to_dict() for p in profiles]
                    rb.atomic_write_text(record, _json(tk.engine_record(
                        item.key, rb.sha256_file(plan), plan.stat().st_size,
                        built=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info)))
                    say(f"checking {item.graph} {precision} against PyTorch at every engine batch")
                    found = engine_parity(model, item.graph, plan, settings.engine_batches,
                                          image_size, seed, device_id, checked)
                    parity += found
                    results = [r.to_dict() for r in found]
                txn.add_artifact(
                    runtime="tensorrt", graph=item.graph, precision=precision, path=plan,
                    extra_files=extra, inputs=[s.to_dict() for s in inputs],
                    outputs=[s.to_dict() for s in outputs], details=details,
                    parity={"graphs": results}, tools=_tools(trt, env),
                )
            check_graph_gate(precision, parity, what=f"TensorRT {precision} engines")
            if parity_steps > 0:
                runs = []
                for h, w in checked:
                    say(f"sampling end to end through TensorRT ({precision}, {parity_steps} "
                        f"steps, {h}x{w})")
                    figures = txn.end_to_end_parity(model, "tensorrt", precision, parity_steps,
                                                    seed, runtime="tensorrt",
                                                    image_size=(h, w), device_id=device_id)
                    runs.append(f"{h}x{w} {figures['psnr_db']:.1f} dB")
                e2e = f"end to end {', '.join(runs)}"
            else:
                txn.record_end_to_end("tensorrt", precision, {
                    "status": "not run", "reason": "--parity-steps 0"})
                e2e = "end to end not run (--parity-steps 0)"
            worst = max((r.max_abs_error for r in parity), default=float("nan"))
            lines.append(f"tensorrt {precision}: worst graph error {worst:.2e}, {e2e}")
    for item in items:
        lines.append(f"  {item.describe()}")
    return lines


def _link(src: Path, dst: Path) -> None:
    """Put an existing bundle file into the staging tree (hard link; copy across devices)."""
    from runtimes.staging import copy_tree_into

    if src.is_dir():
        copy_tree_into(src, dst)
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        import shutil

        shutil.copy2(src, dst)


def _json(d: dict[str, Any]) -> str:
    import json

    return json.dumps(d, indent=2, sort_keys=True) + "\n"


def _tools(trt: Any, env: tk.EngineEnvironment) -> dict[str, str]:
    tools = {"tensorrt": str(trt.__version__), "gpu": env.gpu_name,
             "compute_capability": env.compute_capability}
    try:
        from importlib.metadata import version

        tools["cuda-python"] = version("cuda-python")
    except Exception:  # the cuda-bindings package alone, or a source install
        pass
    return tools
