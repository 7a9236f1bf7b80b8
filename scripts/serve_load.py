"""Load test of `deco serve` on loopback: Poisson arrivals at several rates against the server
with the step-level batcher on (``--max-batch N``) and off (``--max-batch 1``, one request at a
time), bounded in requests and time.

Rates are multiples of the request-at-a-time capacity measured first (1 / the latency of one
request alone), so a multiple above 1 saturates that mode. For each mode and rate it reports
throughput (images/s, from the first arrival to the last answer), p50/p95/p99 latency and the
mean images per tick (the server's ``deco_tick_batch_images`` histogram), writes the results as
JSON and a markdown table, and plots throughput and p95 against the offered rate.

    python scripts/serve_load.py BUNDLE --out-json load.json --plot docs/img/serve-load.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

from runtimes.cpu import cpu_model

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ("grinning face", "red heart", "thumbs up", "rocket", "sun with face", "pizza",
           "rainbow", "cat face", "snowflake", "four leaf clover", "crown", "ghost")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`deco serve BUNDLE` in a process of its own, stopped with SIGTERM."""

    def __init__(self, bundle: Path, max_batch: int, threads: int) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deco_export.cli", "serve", str(bundle), "--port",
             str(self.port), "--max-batch", str(max_batch), "--max-queue", "10000",
             "--max-n", "1", "--threads", str(threads), "--log-level", "warning"],
            env=env, cwd=REPO)
        end = time.monotonic() + 300
        while True:
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError("deco serve did not start")
            time.sleep(0.2)

    def ticks(self) -> tuple[float, float]:
        """(sum of images over ticks, ticks) from /metrics."""
        text = httpx.get(self.base + "/metrics", timeout=10).text
        total = float(re.search(r"^deco_tick_batch_images_sum (\S+)$", text, re.M).group(1))
        count = float(re.search(r"^deco_tick_batch_images_count (\S+)$", text, re.M).group(1))
        return total, count

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def body_maker(base: str, steps: int | None) -> Callable[[int], dict]:
    """Request i's body: a prompt (text-to-image) or a class (class-conditional), seed i."""
    model = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]
    extra = {} if steps is None else {"steps": steps}
    if model["family"] == "t2i":
        return lambda i: {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, **extra}
    classes = len(model["classes"])
    return lambda i: {"class_label": i % classes, "seed": i, **extra}


async def one(client: httpx.AsyncClient, base: str, payload: dict) -> float | None:
    start = time.monotonic()
    try:
        r = await client.post(base + "/v1/images/generations", json=payload)
    except (httpx.HTTPError, asyncio.CancelledError):
        return None
    return time.monotonic() - start if r.status_code == 200 else None


async def poisson(base: str, rate: float, count: int, time_limit: float, seed: int,
                  body: Callable[[int], dict]) -> dict:
    """``count`` requests with exponential gaps of mean 1 / ``rate``; whatever is unanswered
    ``time_limit`` seconds after the last arrival is cancelled and counted as unfinished."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, count)
    arrivals = np.cumsum(gaps) - gaps[0]
    limits = httpx.Limits(max_connections=count + 4, max_keepalive_connections=count + 4)
    timeout = float(arrivals[-1]) + time_limit + 30
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.monotonic()
        finish: list[float] = []

        async def fire(i: int, at: float) -> float | None:
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            latency = await one(client, base, body(1000 * seed + i))
            if latency is not None:
                finish.append(time.monotonic() - t0)
            return latency

        tasks = [asyncio.ensure_future(fire(i, float(a))) for i, a in enumerate(arrivals)]
        done, late = await asyncio.wait(tasks, timeout=float(arrivals[-1]) + time_limit)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    latencies = np.array([t.result() for t in done if t.result() is not None])
    span = max(finish) if finish else float("nan")
    out = {"offered_per_s": rate, "requests": count, "completed": int(latencies.size),
           "images_per_s": latencies.size / span if finish else 0.0}
    for q in (50, 95, 99):
        out[f"p{q}_s"] = float(np.percentile(latencies, q)) if latencies.size else float("nan")
    return out


def run_mode(bundle: Path, max_batch: int, multiples: list[float], count: int,
             time_limit: float, threads: int, steps: int | None = None,
             capacity: float | None = None) -> tuple[list[dict], float]:
    """One server, every rate; ``capacity`` None measures it here (1 / the mean latency of
    three requests alone) and returns it, so the first mode sets the rates of both."""
    server = Server(bundle, max_batch, threads)
    try:
        body = body_maker(server.base, steps)
        asyncio.run(poisson(server.base, 100.0, 2, 120, 99, body))  # warm-up
        if capacity is None:
            alone = [asyncio.run(poisson(server.base, 100.0, 1, 120, 90 + k, body))["p50_s"]
                     for k in range(3)]
            capacity = 1.0 / float(np.mean(alone))
            print(f"one request alone: {1 / capacity:.3f} s -> {capacity:.2f} images/s",
                  flush=True)
        rows = []
        for k, m in enumerate(multiples):
            before = server.ticks()
            row = asyncio.run(poisson(server.base, m * capacity, count, time_limit, k + 1, body))
            after = server.ticks()
            ticks = after[1] - before[1]
            row["images_per_tick"] = (after[0] - before[0]) / ticks if ticks else float("nan")
            row["max_batch"] = max_batch
            row["multiple"] = m
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        code = server.stop()
    if code != 0:
        raise RuntimeError(f"deco serve exited {code} after SIGTERM")
    return rows, capacity


def graph_costs(bundle: Path, threads: int, batches=(1, 2, 8, 32), repeats: int = 10) -> dict:
    """ms per call of the DiT and the decoder at each batch, in this process: what a tick
    costs as it gathers rows (a cost that grows in proportion to the rows leaves batching
    nothing to gain)."""
    import runtimes

    pipe = runtimes.load(bundle, backend="onnxruntime", intra_op_threads=threads)
    be, cfg = pipe.backend, pipe.model_config
    h, w = pipe.size_range().default
    rng = np.random.default_rng(0)
    text = rng.standard_normal((1, cfg.text_len, cfg.text_dim)).astype(np.float32)
    tokens = be.embed_text(text) if pipe.is_text_to_image else None
    out = {}
    for b in batches:
        x = rng.standard_normal((b, cfg.in_channels, h, w)).astype(np.float32)
        t = np.full(b, 0.5, np.float32)
        y = np.repeat(tokens, b, 0) if tokens is not None else np.zeros(b, np.int64)
        cond = be.dit(x, t, y)
        for name, args in (("dit", (x, t, y)), ("decoder", (x, cond))):
            call = getattr(be, name)
            call(*args)
            start = time.perf_counter()
            for _ in range(repeats):
                call(*args)
            out[f"{name}_b{b}_ms"] = (time.perf_counter() - start) / repeats * 1e3
    pipe.close()
    return out


def table(results: dict) -> str:
    lines = ["| mode | offered (req/s) | done | images/s | p50 (s) | p95 (s) | p99 (s) | "
             "images per tick |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, rows in results["modes"].items():
        for r in rows:
            lines.append(
                f"| {mode} | {r['offered_per_s']:.2f} | {r['completed']}/{r['requests']} | "
                f"{r['images_per_s']:.2f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
                f"{r['p99_s']:.2f} | {r['images_per_tick']:.2f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for mode, rows in results["modes"].items():
        rate = [r["offered_per_s"] for r in rows]
        ax1.plot(rate, [r["images_per_s"] for r in rows], "o-", label=mode)
        ax2.plot(rate, [r["p95_s"] for r in rows], "o-", label=mode)
    ax1.plot(rate, rate, ":", color="grey", label="offered")
    ax1.set(xlabel="offered load (requests/s)", ylabel="images/s", title="throughput")
    ax2.set(xlabel="offered load (requests/s)", ylabel="p95 latency (s)", title="p95 latency",
            yscale="log")
    ax1.legend()
    ax2.legend()
    fig.suptitle(results["title"], fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--multiples", default="0.5,1,2,4",
                    help="offered rates as multiples of the request-at-a-time capacity")
    ap.add_argument("--requests", type=int, default=32, help="requests per rate")
    ap.add_argument("--time-limit", type=float, default=120.0,
                    help="seconds after a rate's last arrival before its unanswered requests "
                         "are cancelled")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per request [the bundle's sampler default]")
    ap.add_argument("--threads", type=int, default=1, help="the server's ONNX Runtime threads")
    ap.add_argument("--costs-only", action="store_true",
                    help="only time the DiT and decoder calls at batch 1, 2, 8, 32")
    ap.add_argument("--out-json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--cpu", default=cpu_model(),
                    help="the CPU named in the plot's title")
    args = ap.parse_args()
    if args.costs_only:
        print(json.dumps(graph_costs(args.bundle, args.threads), indent=2))
        return
    multiples = [float(m) for m in args.multiples.split(",")]
    # request-at-a-time first: its capacity sets the rates both modes are offered
    serial, capacity = run_mode(args.bundle, 1, multiples, args.requests, args.time_limit,
                                args.threads, args.steps)
    batched, _ = run_mode(args.bundle, args.max_batch, multiples, args.requests,
                          args.time_limit, args.threads, args.steps, capacity)
    results = {"bundle": str(args.bundle), "alone_s": 1 / capacity, "capacity_per_s": capacity,
               "multiples": multiples, "cpu": args.cpu,
               "title": f"deco serve, {args.bundle.name}, {args.cpu}",
               "modes": {"request-at-a-time": serial,
                         f"step batcher (max {args.max_batch})": batched}}
    print(table(results))
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
