"""The HTTP face of the step-level batcher: an OpenAI-shaped image API on Starlette.

``POST /v1/images/generations`` (JSON, or server-sent events with ``stream: true``: a ``step``
event per step with a small preview, x̂ = x_t + (1 - t) v, then ``done`` with the response),
``GET /v1/images/files/{name}`` (the ``url`` answers, kept for ``url_ttl`` seconds),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus) and the page at ``/``.

Every request becomes one `runtimes.batching.Job`; the batcher ticks in a thread of its own
and the event loop only waits on futures, so a slow client never stalls a tick. A client that
goes away cancels its job, which leaves the batch after the step in flight.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from runtimes.batching import BatchError, Job, QueueFull, StepBatcher
from runtimes.image import to_uint8
from runtimes.steps import GenerationInterrupted, StepState

from .metrics import CONTENT_TYPE, ServeMetrics
from .requests import ApiError, ImageRequest, parse_request

__all__ = ["ServeSettings", "create_app", "png_bytes"]

_POLL_S = 0.2  # how often a waiting request checks that its client is still there


@dataclass(frozen=True)
class ServeSettings:
    """How the server batches and what it accepts.

    max_batch: images in flight (1: one request at a time); max_queue: requests waiting
    before 429; max_n: images per request (at most max_batch); api_key: the bearer token
    /v1 and /metrics require (None: open); url_ttl: seconds a ``url`` answer is served;
    max_body: bytes a request body may hold; model_id: the name /v1/models gives;
    preview_size: the longest side of a streamed preview in pixels.
    """

    max_batch: int = 8
    max_queue: int = 64
    max_n: int = 4
    api_key: str | None = None
    url_ttl: float = 600.0
    max_body: int = 64 * 1024
    model_id: str = "deco"
    preview_size: int = 64


def png_bytes(image: np.ndarray) -> bytes:
    """One (C, H, W) float image in [-1, 1] as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint8(image[None])[0]).save(buf, format="PNG")
    return buf.getvalue()


def _preview(state: StepState, size: int) -> str:
    """The first image's clean estimate, shrunk by an integer stride to about ``size`` px."""
    x0 = state.clean_estimate[0]
    stride = max(1, -(-max(x0.shape[1:]) // size))
    return base64.b64encode(png_bytes(x0[:, ::stride, ::stride])).decode("ascii")


class _Files:
    """PNGs answered as URLs, each served until its time is up."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._items: dict[str, tuple[float, bytes]] = {}
        self._lock = threading.Lock()

    def add(self, data: bytes) -> str:
        name = f"{secrets.token_urlsafe(12)}.png"
        now = time.monotonic()
        with self._lock:
            self._items = {k: v for k, v in self._items.items() if v[0] > now}
            self._items[name] = (now + self.ttl, data)
        return name

    def get(self, name: str) -> bytes | None:
        with self._lock:
            item = self._items.get(name)
        return item[1] if item is not None and item[0] > time.monotonic() else None


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def create_app(pipe: Any, settings: ServeSettings | None = None) -> Starlette:
    """The server for ``pipe`` (a `runtimes.DeCoPipeline`): batcher, routes and metrics."""
    cfg = settings or ServeSettings()
    max_n = max(1, min(cfg.max_n, cfg.max_batch))
    batcher_ref: list[StepBatcher] = []
    metrics = ServeMetrics(batcher_ref)
    stored = _Files(cfg.url_ttl)
    page = files("deco_export.serve").joinpath("static/index.html").read_text("utf-8")

    def batcher() -> StepBatcher:
        if not batcher_ref:
            raise ApiError(503, "the server is starting; retry in a moment")
        return batcher_ref[0]

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(),
                                                                    cfg.api_key):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                           headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> Any:
        declared = request.headers.get("content-length")
        too_large = ApiError(413, f"the body is larger than {cfg.max_body} bytes; send a "
                                  "smaller request")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_body:
            raise too_large
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > cfg.max_body:
                raise too_large
        try:
            return json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the body is not JSON; send a JSON object such as "
                                "{\"prompt\": \"a red fox\"}") from None

    def submit(req: ImageRequest, on_step: Any = None) -> Job:
        try:
            return batcher().submit(on_step=on_step, **req.kwargs)
        except QueueFull as exc:
            seconds = str(int(np.ceil(exc.retry_after)))
            raise ApiError(429, str(exc), headers={"Retry-After": seconds}) from None
        except BatchError as exc:
            raise ApiError(503, str(exc)) from None

    async def answer(request: Request, req: ImageRequest, job: Job) -> dict[str, Any]:
        """The OpenAI response of a finished job (images as base64 or as URLs)."""
        output = job.result()
        pngs = await run_in_threadpool(lambda: [png_bytes(x) for x in output.images])
        metrics.finished(req.images, time.monotonic() - job.submitted)
        data = []
        for png in pngs:
            if req.response_format == "url":
                name = stored.add(png)
                data.append({"url": str(request.url_for("image_file", name=name))})
            else:
                data.append({"b64_json": base64.b64encode(png).decode("ascii")})
        return {"created": int(time.time()), "data": data, "parameters": req.parameters}

    def failure(exc: BaseException) -> ApiError:
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, GenerationInterrupted):
            return ApiError(499, "the request was cancelled")
        return ApiError(500 if not isinstance(exc, ValueError) else 400, str(exc))

    async def generations(request: Request) -> Response:
        authorize(request)
        req = parse_request(pipe, await read_body(request), max_n=max_n, model_id=cfg.model_id)
        if req.stream:
            return await stream(request, req)
        job = submit(req)
        done = asyncio.wrap_future(job.future)
        while not done.done():
            await asyncio.wait({done}, timeout=_POLL_S)
            if not done.done() and await request.is_disconnected():
                job.cancel()  # leaves the batch after the step in flight
                done.cancel()  # nobody reads its GenerationInterrupted
                metrics.requests.labels("499").inc()
                return Response(status_code=499)
        if done.exception() is not None:
            raise failure(done.exception())  # type: ignore[arg-type]
        body = await answer(request, req, job)
        metrics.requests.labels("200").inc()
        return JSONResponse(body)

    async def stream(request: Request, req: ImageRequest) -> Response:
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def on_step(state: StepState) -> None:  # in the request's sampling thread
            event = {"step": state.step + 1, "num_steps": state.num_steps, "t": state.t,
                     "preview": _preview(state, cfg.preview_size)}
            loop.call_soon_threadsafe(steps.put_nowait, event)

        job = submit(req, on_step)
        done = asyncio.wrap_future(job.future)

        async def events() -> AsyncIterator[bytes]:
            try:
                yield _sse("queued", {"queue_depth": batcher().queue_depth})
                while True:
                    get = asyncio.ensure_future(steps.get())
                    await asyncio.wait({get, done}, return_when=asyncio.FIRST_COMPLETED)
                    if get.done():
                        yield _sse("step", get.result())
                        continue
                    get.cancel()
                    while not steps.empty():
                        yield _sse("step", steps.get_nowait())
                    break
                if done.exception() is not None:
                    error = failure(done.exception())  # type: ignore[arg-type]
                    metrics.requests.labels(str(error.status)).inc()
                    yield _sse("error", error.body())
                    return
                body = await answer(request, req, job)
                metrics.requests.labels("200").inc()
                yield _sse("done", body)
            finally:
                if not job.future.done():
                    job.cancel()  # the client went away: free the slot at the next tick
                    done.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    async def image_file(request: Request) -> Response:
        data = stored.get(request.path_params["name"])
        if data is None:
            raise ApiError(404, f"no image {request.path_params['name']}: URLs are served for "
                                f"{cfg.url_ttl:g} s; ask again with response_format b64_json "
                                "to keep the bytes")
        return Response(data, media_type="image/png")

    async def models(request: Request) -> Response:
        authorize(request)
        model = pipe.model_config
        sizes = pipe.size_range()
        entry: dict[str, Any] = {
            "id": cfg.model_id, "object": "model", "created": 0, "owned_by": "deco-export",
            "family": "t2i" if pipe.is_text_to_image else "c2i",
            "sampler_defaults": pipe.sampler_defaults.to_dict(),
            "max_n": max_n,
        }
        if sizes is not None:
            entry["sizes"] = {"description": sizes.describe(),
                              "default": f"{sizes.default[1]}x{sizes.default[0]}"}
        if not pipe.is_text_to_image:
            entry["classes"] = [pipe.id2label.get(i, str(i)) for i in range(model.num_classes)]
        return JSONResponse({"object": "list", "data": [entry]})

    async def health(request: Request) -> Response:
        b = batcher_ref[0] if batcher_ref else None
        return JSONResponse({"status": "ok" if b is not None else "starting",
                             "in_flight": b.in_flight if b else 0,
                             "queue_depth": b.queue_depth if b else 0,
                             "max_batch": cfg.max_batch,
                             "auth": cfg.api_key is not None})

    async def metrics_page(request: Request) -> Response:
        authorize(request)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        if exc.status != 200:
            metrics.requests.labels(str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        batcher_ref.append(StepBatcher(pipe, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                                       on_tick=metrics.on_tick).start())
        try:
            yield
        finally:  # every accepted request finishes before the process exits
            await run_in_threadpool(batcher_ref[0].close, True)

    routes = [
        Route("/", index),
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route("/v1/images/files/{name}", image_file, name="image_file"),
        Route("/v1/models", models),
        Route("/health", health),
        Route("/metrics", metrics_page),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={ApiError: api_error})
