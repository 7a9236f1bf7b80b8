"""What ``GET /metrics`` reports, in Prometheus' text format: queue depth, requests in flight,
images per tick, tick and request latencies, images made (and their rate over the last
minute)."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from runtimes.batching import StepBatcher, TickStats

__all__ = ["CONTENT_TYPE", "ServeMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_RATE_WINDOW_S = 60.0


class ServeMetrics:
    """The server's metrics in a registry of their own (several apps in one process, as in
    tests, do not collide)."""

    def __init__(self, batcher_ref: list[StepBatcher]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("deco_queue_depth", "requests waiting for a slot", registry=r)
        self.in_flight = Gauge("deco_in_flight_requests", "requests being sampled", registry=r)
        self.queue_depth.set_function(lambda: batcher_ref[0].queue_depth if batcher_ref else 0)
        self.in_flight.set_function(lambda: batcher_ref[0].in_flight if batcher_ref else 0)
        self.batch_images = Histogram(
            "deco_tick_batch_images", "images in flight per tick (one DiT and one decoder call "
            "per size)", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64), registry=r)
        self.tick_seconds = Histogram(
            "deco_tick_seconds", "time of one tick", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.latency = Histogram(
            "deco_request_latency_seconds", "time from arrival to the finished image",
            registry=r, buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128))
        self.requests = Counter("deco_requests", "requests answered, by HTTP status",
                                ["status"], registry=r)
        self.images = Counter("deco_images", "images made", registry=r)
        self.images_per_second = Gauge(
            "deco_images_per_second", "images made per second over the last minute", registry=r)
        self._made: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self.images_per_second.set_function(self._rate)

    def on_tick(self, stats: TickStats) -> None:
        if stats.calls:
            self.batch_images.observe(stats.images)
            self.tick_seconds.observe(stats.seconds)

    def finished(self, images: int, seconds: float) -> None:
        self.images.inc(images)
        self.latency.observe(seconds)
        with self._lock:
            self._made.append((time.monotonic(), images))

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._made and self._made[0][0] < now - _RATE_WINDOW_S:
                self._made.popleft()
            return sum(n for _, n in self._made) / _RATE_WINDOW_S

    def render(self) -> bytes:
        return generate_latest(self.registry)
