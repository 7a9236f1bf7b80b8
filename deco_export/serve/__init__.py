"""``deco serve``: the step-level batcher (`runtimes.batching`) behind an OpenAI-shaped HTTP
API, with a page at ``/``. Needs the ``serve`` extra (Starlette, uvicorn, prometheus_client)."""

from .app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
