"""``deco serve``: a bundle behind an OpenAI-shaped image API, requests batched step by step
(`deco_export.serve`); SIGTERM or Ctrl-C finishes the requests in flight, then exits."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import click

from runtimes.errors import DecoError


class ServeUnavailable(DecoError):
    """The ``serve`` extra is not installed."""


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (loopback; 0.0.0.0 opens it to the network)")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--backend", default="onnxruntime", show_default=True)
@click.option("--precision", default="fp32", show_default=True)
@click.option("--max-batch", type=click.IntRange(1), default=8, show_default=True,
              help="images sampled at once, one DiT and one decoder call per tick (1: one "
                   "request at a time)")
@click.option("--max-queue", type=click.IntRange(0), default=64, show_default=True,
              help="requests waiting for a slot before 429")
@click.option("--max-n", type=click.IntRange(1), default=4, show_default=True,
              help="images per request (at most --max-batch)")
@click.option("--api-key", envvar="DECO_API_KEY", default=None,
              help="require Authorization: Bearer KEY on /v1 and /metrics [$DECO_API_KEY]")
@click.option("--url-ttl", type=float, default=600.0, show_default=True,
              help="seconds a response_format=url image is served")
@click.option("--model-id", default=None, help="the id /v1/models gives [the bundle's name]")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="ONNX Runtime intra-op threads [its default: one per core]")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(bundle: Path, host: str, port: int, backend: str, precision: str, max_batch: int,
          max_queue: int, max_n: int, api_key: str | None, url_ttl: float,
          model_id: str | None, threads: int | None, log_level: str) -> None:
    """Serve BUNDLE: POST /v1/images/generations (OpenAI's shape; stream: true for
    server-sent previews), GET /v1/models, /health, /metrics and a page at /."""
    try:
        import uvicorn

        from deco_export.serve import ServeSettings, create_app
    except ImportError as exc:
        raise ServeUnavailable(f"deco serve needs the serve extra ({exc.name} is missing): "
                               "pip install 'deco-export[serve]'") from None
    import runtimes
    from runtimes.interrupts import interrupts_handled

    if not _loopback(host) and api_key is None:
        click.echo(f"warning: listening on {host} without --api-key: anyone who reaches this "
                   "port can generate", err=True)
    options = {"intra_op_threads": threads} if threads is not None else {}
    pipe = runtimes.load(bundle, backend=backend, precision=precision, **options)
    settings = ServeSettings(max_batch=max_batch, max_queue=max_queue, max_n=max_n,
                             api_key=api_key, url_ttl=url_ttl,
                             model_id=model_id or bundle.resolve().name)
    app = create_app(pipe, settings)
    try:
        with interrupts_handled():  # SIGTERM / Ctrl-C: uvicorn drains, then returns
            uvicorn.run(app, host=host, port=port, log_level=log_level,
                        timeout_graceful_shutdown=None)
    finally:
        pipe.close()
