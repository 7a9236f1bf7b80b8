"""`deco serve`: the OpenAI-shaped API over the step-level batcher, on the golden bundle. The
image a request gets is the one `pipe.generate` gives for its seed; bad requests get one JSON
error naming the field; a full queue gets 429 with Retry-After; a stream sends a preview per
step; a client that leaves frees its slot; SIGTERM finishes the request in flight and exits 0.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette", reason="deco serve needs the serve extra")
pytest.importorskip("uvicorn", reason="deco serve needs the serve extra")
from PIL import Image
from starlette.testclient import TestClient

import runtimes
from deco_export.serve import ServeSettings, create_app
from tests.helpers import REPO, PromptFeatures


@pytest.fixture(scope="module")
def pipe(golden_onnx_bundle):
    return runtimes.load(golden_onnx_bundle, backend="onnxruntime")


@pytest.fixture
def client(pipe):
    app = create_app(pipe, ServeSettings(max_batch=4, max_queue=1, max_n=2, model_id="golden",
                                         max_body=2048))
    with TestClient(app) as c:
        yield c


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def events(lines) -> list[tuple[str, dict]]:
    out, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[len("data: "):])))
    return out


def test_the_image_is_the_offline_image_of_its_seed(client, pipe):
    r = client.post("/v1/images/generations",
                    json={"class_label": 3, "seed": 5, "steps": 4, "n": 2, "size": "64x32"})
    assert r.status_code == 200, r.text
    body = r.json()
    offline = pipe.generate(class_labels=[3], seed=5, steps=4, num_images_per_prompt=2,
                            height=32, width=64, output_type="uint8").images
    assert len(body["data"]) == 2
    for item, want in zip(body["data"], offline, strict=True):
        np.testing.assert_array_equal(decode(item["b64_json"]), want)
    assert body["parameters"]["seed"] == 5 and body["parameters"]["size"] == "64x32"


def test_url_answers_are_served(client):
    r = client.post("/v1/images/generations",
                    json={"class_label": "0", "steps": 2, "response_format": "url"})
    assert r.status_code == 200, r.text
    url = r.json()["data"][0]["url"]
    image = client.get(url)
    assert image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (64, 64)
    assert client.get("/v1/images/files/nothing.png").status_code == 404


def test_stream_sends_a_preview_per_step_then_the_image(client, pipe):
    with client.stream("POST", "/v1/images/generations",
                       json={"class_label": 1, "seed": 2, "steps": 5, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        got = events(r.iter_lines())
    steps = [d for name, d in got if name == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]
    assert decode(steps[0]["preview"]).shape == (64, 64, 3)
    name, done = got[-1]
    offline = pipe.generate(class_labels=[1], seed=2, steps=5, output_type="uint8").images[0]
    assert name == "done"
    np.testing.assert_array_equal(decode(done["data"][0]["b64_json"]), offline)
    # the last preview is the image itself (t = 1 after the last step: x̂ = x_1)
    assert decode(steps[-1]["preview"]).shape == offline.shape


@pytest.mark.parametrize(("body", "status", "names"), [
    ({"class_label": 1, "colour": "red"}, 400, "unknown field 'colour'"),
    ({"class_label": 1, "n": 3}, 400, "n must be between 1 and 2"),
    ({"class_label": 1, "size": "1024x1024"}, 400, "size 1024x1024"),
    ({"class_label": 1, "size": "big"}, 400, "WIDTHxHEIGHT"),
    ({"class_label": 1, "steps": "ten"}, 400, "steps must be an integer"),
    ({"class_label": 1, "steps": 0}, 400, "steps must be between"),
    ({"class_label": 1, "solver": "rk45"}, 400, "unknown solver"),
    ({"class_label": 1, "guidance_scale": True}, 400, "guidance_scale must be a number"),
    ({}, 400, "class_label is missing"),
    ({"prompt": "a fox"}, 400, "send class_label"),
    ({"class_label": 99}, 400, "out of range"),
    ({"class_label": "no such class"}, 400, "class_label"),
    ({"class_label": 1, "model": "other"}, 404, "model 'other'"),
    ([1, 2], 400, "JSON object"),
    ({"class_label": 1, "user": "x" * 4000}, 413, "larger than 2048 bytes"),
])
def test_bad_requests_get_one_error_naming_the_problem(client, body, status, names):
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert names in error["message"] and "\n" not in error["message"]


def test_a_body_that_is_not_json(client):
    r = client.post("/v1/images/generations", content=b"{not json",
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]


def test_models_health_metrics_and_page(client):
    models = client.get("/v1/models").json()["data"][0]
    assert models["id"] == "golden" and models["family"] == "c2i"
    assert len(models["classes"]) == 10 and models["sizes"]["default"] == "64x64"
    assert client.get("/health").json()["status"] == "ok"
    client.post("/v1/images/generations", json={"class_label": 1, "steps": 2})
    text = client.get("/metrics").text
    for name in ("deco_queue_depth", "deco_tick_batch_images_bucket",
                 "deco_request_latency_seconds_bucket", "deco_images_per_second",
                 'deco_requests_total{status="200"}'):
        assert name in text
    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text


def test_api_key(pipe):
    app = create_app(pipe, ServeSettings(api_key="s3cret"))
    with TestClient(app) as c:
        body = {"class_label": 1, "steps": 1}
        assert c.post("/v1/images/generations", json=body).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert c.post("/v1/images/generations", json=body, headers=wrong).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/images/generations", json=body, headers=good).status_code == 200
        assert c.get("/metrics").status_code == 401 and c.get("/health").status_code == 200


@pytest.fixture(scope="module")
def t2i_pipe(golden_t2i_onnx_bundle):
    return runtimes.load(golden_t2i_onnx_bundle, backend="onnxruntime")


def test_text_to_image_prompts(t2i_pipe):
    app = create_app(t2i_pipe, ServeSettings(max_batch=2))
    with TestClient(app) as c:
        post = lambda body: c.post("/v1/images/generations", json=body)  # noqa: E731
        refused = post({"prompt": "a fox", "steps": 2})
        assert refused.status_code == 400 and "no text encoder" in refused.json()["error"][
            "message"]
        t2i_pipe.text_encoder = PromptFeatures(t2i_pipe.model_config.text_len,
                                               t2i_pipe.model_config.text_dim)
        try:
            assert "prompt is empty" in post({"prompt": "  "}).json()["error"]["message"]
            assert "not class_label" in post({"class_label": 1}).json()["error"]["message"]
            r = post({"prompt": "a fox", "negative_prompt": "blur", "seed": 4, "steps": 3,
                      "size": "64x32"})
            assert r.status_code == 200, r.text
            offline = t2i_pipe.generate(prompt="a fox", negative_prompt="blur", seed=4,
                                        steps=3, height=32, width=64,
                                        output_type="uint8").images[0]
            np.testing.assert_array_equal(decode(r.json()["data"][0]["b64_json"]), offline)
            assert c.get("/v1/models").json()["data"][0]["family"] == "t2i"
        finally:
            t2i_pipe.text_encoder = None


def wait_for(predicate, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.02)


def test_full_queue_gets_429_and_a_client_that_leaves_frees_its_slot(pipe):
    app = create_app(pipe, ServeSettings(max_batch=1, max_queue=1))
    with TestClient(app) as c:
        health = lambda: c.get("/health").json()  # noqa: E731
        long = {"class_label": 1, "steps": 400, "stream": True}
        with c.stream("POST", "/v1/images/generations", json=long) as first:
            lines = first.iter_lines()
            wait_for(lambda: health()["in_flight"] == 1)
            queued = threading.Thread(
                target=c.post, args=("/v1/images/generations",),
                kwargs={"json": {"class_label": 2, "steps": 2}}, daemon=True)
            queued.start()
            wait_for(lambda: health()["queue_depth"] == 1)
            full = c.post("/v1/images/generations", json={"class_label": 3, "steps": 2})
            assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
            assert "queue is full" in full.json()["error"]["message"]
            assert next(lines).startswith("event: ")
        # the streaming client left: its request leaves the batch, the queued one runs
        queued.join(timeout=60)
        wait_for(lambda: health()["in_flight"] == 0 and health()["queue_depth"] == 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_deco_serve_process_frees_a_gone_clients_slot_drains_on_sigterm_exits_0(
        golden_onnx_bundle):
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "deco_export.cli", "serve", str(golden_onnx_bundle),
         "--port", str(port), "--log-level", "warning"], env=env, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _up(base), timeout=120)
        # a client that gives up frees its slot: its request leaves at the next tick
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/images/generations",
                       json={"class_label": 4, "steps": 2000}, timeout=2)
        wait_for(lambda: httpx.get(f"{base}/health").json()["in_flight"] == 0, timeout=15)
        result: dict = {}

        def request() -> None:
            result["r"] = httpx.post(f"{base}/v1/images/generations",
                                     json={"class_label": 4, "steps": 60}, timeout=120)

        worker = threading.Thread(target=request)
        worker.start()
        wait_for(lambda: httpx.get(f"{base}/health").json()["in_flight"] == 1)
        proc.send_signal(signal.SIGTERM)
        worker.join(timeout=120)
        assert result["r"].status_code == 200  # the request in flight was finished
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _up(base: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{base}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
