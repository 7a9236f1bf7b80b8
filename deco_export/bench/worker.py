"""One backend x precision in a fresh process: ``python -m deco_export.bench.worker --worker
SPEC.json`` loads the row's backend, times every batch x steps and writes the result JSON.

Runtime rows stay torch-free (nothing here imports torch at module level, nor does the
``deco_export`` package); PyTorch rows import what they need."""

from __future__ import annotations

import contextlib
import json
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.config import ModelConfig
from runtimes.fileio import atomic_write_text

from ..messages import one_line
from .catalogue import PROGRESS_MARK, REFERENCE
from .machine import peak_rss_mib, process_gpu_mib, rss_mib
from .text import TimedTextEncoder, prompts_for
from .timing import TimingBackend


def labels_for(batch: int, num_classes: int) -> list[int]:
    """Fixed, spread-out class labels (never the null class)."""
    return [(i * 37) % num_classes for i in range(batch)]


def open_pipeline(spec: Mapping[str, Any]) -> Any:
    """A DeCoPipeline for the worker's row (the first call also imports its runtime): the
    backend the row's catalogue entry names, with the row's load options."""
    import runtimes
    from runtimes import catalogue

    row, load = spec["row"], spec["load"]
    name = load["backend"]
    if name not in catalogue.entries():  # registered in the driver's process only
        runtimes.register_backend(name, load["factory"], runtime=load["runtime"],
                                  source=load["source"])
    options = dict(load["options"])
    threads = spec.get("threads")
    if load["source"] == "bundle":
        return runtimes.load(spec["bundle"], backend=name, precision=row["precision"], **options)

    import torch

    from deco_export.backends import create_backend
    from deco_export.sources import load_model

    if threads:
        torch.set_num_threads(int(threads))
    model, _ = load_model(spec["checkpoint"])
    backend_obj = create_backend(name, model, device=spec["device"], precision=row["precision"],
                                 **options)
    return runtimes.DeCoPipeline(backend_obj, model_config=spec["model"],
                                 sampler_defaults=spec["sampler_defaults"])


def timed_text_encoder(pipe: Any, spec: Mapping[str, Any]) -> TimedTextEncoder | None:
    """For a text-to-image row: give ``pipe`` the bundle's ONNX text encoder (at the row's
    thread count) and its stored negative prompt, the text encoder wrapped to time its calls;
    None for a class-conditional row."""
    if not ModelConfig.from_dict(spec["model"]).is_text_to_image:
        return None
    from runtimes import bundle as rb
    from runtimes.pipeline import bundle_negative_embeds
    from runtimes.text_encoder import bundle_text_encoder

    manifest = rb.read_manifest(spec["bundle"])
    options = {"intra_op_threads": spec["threads"]} if spec.get("threads") else {}
    encoder = bundle_text_encoder(spec["bundle"], manifest, **options)
    if encoder is None:
        raise ValueError(f"{spec['bundle']} has no text encoder to encode the prompts")
    timed = TimedTextEncoder(encoder)
    pipe.text_encoder = timed
    if pipe.negative_prompt_embeds is None:
        pipe.negative_prompt_embeds = bundle_negative_embeds(spec["bundle"], manifest)
    return timed


def conditions(spec: Mapping[str, Any], batch: int) -> dict[str, Any]:
    """The generate() condition of one batch: class labels, or the row's prompts."""
    model = spec["model"]
    if ModelConfig.from_dict(model).is_text_to_image:
        return {"prompt": prompts_for(batch, spec.get("prompts") or ())}
    return {"class_labels": labels_for(batch, int(model["num_classes"]))}


def _close(pipe: Any) -> None:
    with contextlib.suppress(Exception):
        pipe.close()


def measure(spec: Mapping[str, Any], progress: Callable[[], None] | None = None
            ) -> dict[str, Any]:
    """Load the row's backend cold and warm, then time every batch x steps (in this process)."""
    import runtimes

    tick = progress or (lambda: None)
    row = spec["row"]
    started = time.perf_counter()
    pipe = open_pipeline(spec)
    cold = time.perf_counter() - started
    _close(pipe)
    del pipe
    started = time.perf_counter()
    pipe = open_pipeline(spec)
    warm = time.perf_counter() - started
    proxy = TimingBackend(pipe.backend)
    pipe.backend = proxy
    encoder = timed_text_encoder(pipe, spec)
    rss_loaded = rss_mib()
    model = spec["model"]
    c, (h, w) = int(model["in_channels"]), spec["image_size"]
    out_dir = Path(spec["outputs"])
    runs = []
    for steps in spec["steps"]:
        for batch in spec["batch_sizes"]:
            noise = runtimes.sample_noise(spec["seed"], batch, c, h, w)
            condition = conditions(spec, batch)

            def once(noise: np.ndarray = noise, condition: dict[str, Any] = condition,
                     steps: int = steps) -> tuple[float, dict[str, float], Any]:
                proxy.reset()
                if encoder is not None:
                    encoder.reset()
                proxy.synchronize()
                start = time.perf_counter()
                out = pipe.generate(**condition, steps=steps, guidance=spec["guidance"],
                                    solver=spec.get("solver"),
                                    noise=noise, output_type="np", cfg_mode=row["cfg_mode"],
                                    sharing=spec["sharing"] if row["backend"] != REFERENCE
                                    else None)
                proxy.synchronize()
                total = time.perf_counter() - start
                tick()
                seconds = dict(proxy.seconds)
                if encoder is not None:
                    seconds["text_encoder"] = encoder.seconds
                return total, seconds, out

            first_s, first_stages, result = once()
            # warmup 0: the first run is a measured one; otherwise warm-up runs are untimed.
            totals, stages = ([first_s], [first_stages]) if spec["warmup"] == 0 else ([], [])
            for _ in range(spec["warmup"] - 1):
                once()
            while len(totals) < spec["repeats"]:
                total, seconds, result = once()
                totals.append(total)
                stages.append(seconds)
            path = out_dir / f"{spec['key']}_s{steps}_b{batch}.npy"
            np.save(path, np.asarray(result.images, dtype=np.float32))
            runs.append({
                "batch": batch, "steps": steps, "seconds": totals, "first_run_s": first_s,
                "stages": {k: [s[k] for s in stages] for k in (
                    "dit", "decoder", "step", *(("text_encoder",) if encoder else ()))},
                "calls": dict(proxy.calls, **({"text_encoder": encoder.calls,
                                               "prompts_encoded": encoder.prompts}
                                              if encoder else {})),
                "cost": result.cost.to_dict(), "images": path.name,
            })
    fid_images = None
    if spec.get("fid"):
        fid_images = generate_fid_set(pipe, spec, out_dir / f"{spec['key']}_fid.npy", tick)
    record: dict[str, Any] = {
        "status": "ok",
        "fid_images": fid_images,
        "load": {"cold_s": cold, "warm_s": warm},
        "memory": {"rss_after_load_mib": rss_loaded},
        "runs": runs,
        "torch_imported": "torch" in sys.modules,
    }
    describe = getattr(proxy.inner, "describe", None)
    if callable(describe):
        with contextlib.suppress(Exception):
            record["describe"] = describe()
    threads: dict[str, Any] = {"requested": spec.get("threads")}
    if "torch" in sys.modules:
        import torch

        threads["torch"] = torch.get_num_threads()
        if torch.cuda.is_available() and str(spec["device"]).startswith("cuda"):
            record["memory"]["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20,
                                                     1)
    if "onnxruntime" in sys.modules:
        threads["onnxruntime_intra_op"] = spec.get("threads") or "onnxruntime default"
    if "openvino" in sys.modules:
        threads["openvino_inference"] = spec.get("threads") or "openvino default"
    record["threads"] = threads
    if "gpu_peak_mib" not in record["memory"]:
        gpu = process_gpu_mib()
        if gpu is not None:
            record["memory"]["gpu_mib_at_end"] = gpu
    _close(pipe)
    record["memory"]["peak_rss_mib"] = peak_rss_mib()
    return record


def generate_fid_set(pipe: Any, spec: Mapping[str, Any], path: Path,
                     tick: Callable[[], None]) -> str:
    """The row's FID/KID image set: the held-out class mix, image i from noise seed
    ``seed + 1000 + i`` on every row (so rows differ only by backend), saved as uint8."""
    from runtimes.image import to_uint8

    fid = spec["fid"]
    labels, batch, base = fid["labels"], fid["batch"], spec["seed"] + 1000
    chunks = []
    for start in range(0, len(labels), batch):
        part = labels[start:start + batch]
        out = pipe.generate(class_labels=part, steps=fid["steps"], guidance=spec["guidance"],
                            solver=spec.get("solver"),
                            seed=[base + start + i for i in range(len(part))], output_type="np",
                            cfg_mode=spec["row"]["cfg_mode"],
                            sharing=spec["sharing"] if spec["row"]["backend"] != REFERENCE
                            else None)
        chunks.append(to_uint8(np.asarray(out.images)))
        tick()
    np.save(path, np.concatenate(chunks))
    return path.name


def worker_main(argv: Sequence[str]) -> int:
    """Entry point of a worker process: ``--worker SPEC.json``; writes ``spec['result']``."""
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m deco_export.bench.worker --worker SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())

    def tick() -> None:
        print(PROGRESS_MARK, flush=True)

    try:
        record = measure(spec, tick)
    except Exception as exc:  # a row that says why, not a crashed benchmark
        traceback.print_exc()
        loading = isinstance(exc, ImportError) or type(exc).__name__ == "BackendError"
        record = {"status": "unavailable" if loading else "failed",
                  "reason": f"{type(exc).__name__}: {one_line(exc)}" if str(exc).strip()
                  else type(exc).__name__,
                  "memory": {"peak_rss_mib": peak_rss_mib()}}
    atomic_write_text(spec["result"], json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
