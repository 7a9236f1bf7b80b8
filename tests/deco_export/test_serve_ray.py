"""The Ray scale-out of `deco serve`'s engine on a local Ray instance: a Serve deployment of
two replicas answers requests on both with the single server's pixels, and the Ray Data
recipe makes each row's image across two workers."""

from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile

import numpy as np
import pytest
from PIL import Image

import runtimes
from tests.helpers import REPO

ray = pytest.importorskip("ray", reason="the Ray deployment needs ray[serve,data]")
serve = pytest.importorskip("ray.serve", reason="the Ray deployment needs ray[serve]")


@pytest.fixture(scope="module")
def local_ray():
    # Ray's session directory holds Unix sockets, whose paths must stay short: a directory of
    # its own under the system's temp root, removed afterwards.
    root = tempfile.mkdtemp(prefix="ray", dir=os.environ.get("PYTEST_DEBUG_TEMPROOT", "/tmp"))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir=root,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}})
    serve.start(proxy_location="Disabled")  # requests go through handles: no HTTP proxy
    yield
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)


def test_two_replicas_answer_with_the_single_servers_pixels(local_ray, golden_onnx_bundle):
    from deco_export.serve import ServeSettings
    from deco_export.serve.ray_app import deployment

    handle = serve.run(deployment(golden_onnx_bundle, replicas=2,
                                  settings=ServeSettings(max_batch=4, model_id="golden")),
                       name="deco", route_prefix=None)
    bodies = [{"class_label": i % 10, "seed": i, "steps": 3} for i in range(8)]
    answers = [r.result(timeout_s=300) for r in
               [handle.generate.remote(b) for b in bodies]]
    pipe = runtimes.load(golden_onnx_bundle, backend="onnxruntime")
    for body, answer in zip(bodies, answers, strict=True):
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["data"][0]["b64_json"]))))
        want = pipe.generate(class_labels=[body["class_label"]], seed=body["seed"], steps=3,
                             output_type="uint8").images[0]
        np.testing.assert_array_equal(got, want)
    assert len({a["replica"] for a in answers}) == 2  # requests spread over both replicas
    bad = handle.generate.remote({"class_label": 1, "n": 99}).result(timeout_s=60)
    assert bad["status"] == 400 and "n must be" in bad["error"]["message"]
    serve.delete("deco")


def test_ray_data_recipe_makes_each_rows_image(local_ray, golden_onnx_bundle):
    from deco_export.serve.ray_app import generate_images

    rows = [{"seed": s, "class_label": s % 10} for s in range(6)]
    out = generate_images(golden_onnx_bundle, rows, workers=2, batch_size=2, steps=3,
                          num_cpus=1).take_all()
    pipe = runtimes.load(golden_onnx_bundle, backend="onnxruntime")
    for row in out:
        want = pipe.generate(class_labels=[int(row["class_label"])], seed=int(row["seed"]),
                             steps=3, output_type="uint8").images[0]
        np.testing.assert_array_equal(row["image"], want)
    assert sorted(int(r["seed"]) for r in out) == list(range(6))
    assert len({r["worker"] for r in out}) == 2  # the rows were spread over both workers
