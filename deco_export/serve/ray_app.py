"""Beyond one machine, on Ray: the same engine (a `runtimes.batching.StepBatcher` over one
pipeline per replica) as a Ray Serve deployment whose replicas autoscale, and a Ray Data recipe
that generates many images (a FID set, say) across workers.

Use ``deco serve`` for one machine (one process batches every request step by step); use the
deployment when requests outgrow one machine's batcher: Ray Serve routes each request to a
replica, and each replica batches its own requests step by step. Use `generate_images` for
offline sets: no HTTP, one pipeline per worker, ``batch_size`` seeds per call.

    import ray
    from ray import serve
    from deco_export.serve.ray_app import deployment, generate_images

    serve.run(deployment("out/bundle", max_replicas=4))     # HTTP on Ray Serve's port
    ds = generate_images("out/bundle", [{"seed": s, "class_label": s % 10} for s in range(50_000)],
                         workers=8)
    ds.write_images("fid-set", column="image", file_format="png")

A replica's answer is the one ``deco serve`` gives for the same body (the same seed gives the
same pixels), with the replica that made it under ``"replica"``.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import runtimes
from runtimes.batching import StepBatcher

from .app import ServeSettings, png_bytes
from .requests import ApiError, parse_request

__all__ = ["DecoReplica", "deployment", "generate_images"]


class DecoReplica:
    """One Ray Serve replica: a pipeline and its step batcher, answering the OpenAI-shaped
    body as ``POST /v1/images/generations`` does (``b64_json`` only)."""

    def __init__(self, bundle: str, backend: str, precision: str,
                 settings: ServeSettings) -> None:
        self.pipe = runtimes.load(bundle, backend=backend, precision=precision)
        self.settings = settings
        self.batcher = StepBatcher(self.pipe, max_batch=settings.max_batch,
                                   max_queue=settings.max_queue).start()
        self.replica = f"{os.uname().nodename}:{os.getpid()}"

    async def generate(self, body: Any) -> dict[str, Any]:
        """The response of one request body (an `ApiError`'s JSON body, with its status under
        ``"status"``, for a bad one)."""
        cfg = self.settings
        try:
            req = parse_request(self.pipe, body, max_n=min(cfg.max_n, cfg.max_batch),
                                model_id=cfg.model_id)
            if req.stream or req.response_format != "b64_json":
                raise ApiError(400, "the Ray deployment answers b64_json without streaming; "
                                    "use deco serve for url and stream", "response_format")
            job = self.batcher.submit(**req.kwargs)
        except ApiError as exc:
            return {**exc.body(), "status": exc.status}
        output = await asyncio.wrap_future(job.future)
        data = [{"b64_json": base64.b64encode(png_bytes(x)).decode("ascii")}
                for x in output.images]
        return {"created": int(time.time()), "data": data, "parameters": req.parameters,
                "replica": self.replica}

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        answer = await self.generate(await request.json())
        return JSONResponse(answer, status_code=int(answer.pop("status", 200)))

    def __del__(self) -> None:
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            batcher.close(drain=False, timeout=10)


def deployment(bundle: str | Path, *, backend: str = "onnxruntime", precision: str = "fp32",
               settings: ServeSettings | None = None, replicas: int | None = None,
               max_replicas: int = 4) -> Any:
    """The bound Ray Serve application: ``replicas`` fixed, or (None) autoscaled between 1 and
    ``max_replicas`` on the requests each replica holds (its ``max_batch``)."""
    from ray import serve

    cfg = settings or ServeSettings(model_id=Path(bundle).resolve().name)
    options: dict[str, Any] = {"max_ongoing_requests": cfg.max_batch + cfg.max_queue}
    if replicas is not None:
        options["num_replicas"] = int(replicas)
    else:
        options["autoscaling_config"] = {"min_replicas": 1, "max_replicas": int(max_replicas),
                                         "target_ongoing_requests": cfg.max_batch}
    replica = serve.deployment(DecoReplica, name="deco", **options)
    return replica.bind(str(Path(bundle).resolve()), backend, precision, cfg)


class _Generator:
    """A Ray Data worker: one pipeline, ``generate`` on each batch of rows."""

    def __init__(self, bundle: str, backend: str, precision: str,
                 generate_kwargs: dict[str, Any]) -> None:
        self.pipe = runtimes.load(bundle, backend=backend, precision=precision)
        self.kwargs = generate_kwargs
        self.worker = f"{os.uname().nodename}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        seeds = [int(s) for s in batch["seed"]]
        if "prompt" in batch:
            condition: dict[str, Any] = {"prompt": [str(p) for p in batch["prompt"]]}
        else:
            condition = {"class_labels": [int(c) for c in batch["class_label"]]}
        out = self.pipe.generate(**condition, seed=seeds, output_type="uint8", **self.kwargs)
        return {**batch, "image": np.asarray(out.images),
                "worker": np.array([self.worker] * len(seeds))}


def generate_images(bundle: str | Path, rows: Sequence[dict[str, Any]] | Any, *,
                    workers: int = 2, batch_size: int = 8, num_cpus: float = 1.0,
                    backend: str = "onnxruntime", precision: str = "fp32",
                    **generate_kwargs: Any) -> Any:
    """A Ray Dataset of ``rows`` (dicts with ``seed`` and ``class_label`` or ``prompt``; or a
    Dataset of them) with each row's image (H, W, 3) uint8 under ``"image"``, made by
    ``workers`` actors, ``batch_size`` rows per ``generate`` call. Row ``{"seed": s, ...}`` is
    the image ``pipe.generate(..., seed=s)`` gives. ``generate_kwargs`` (steps, guidance, ...)
    apply to every row."""
    import ray

    if not isinstance(rows, ray.data.Dataset):
        items = list(rows)  # a block per generate call, so every worker gets some
        rows = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) //
                                                                       batch_size)))
    # One call in flight per worker: a block waits for a free worker instead of queueing
    # behind a busy one.
    pool = ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1)
    return rows.map_batches(
        _Generator, batch_size=batch_size, batch_format="numpy", compute=pool,
        num_cpus=num_cpus,
        fn_constructor_kwargs={"bundle": str(Path(bundle).resolve()), "backend": backend,
                               "precision": precision, "generate_kwargs": generate_kwargs})
