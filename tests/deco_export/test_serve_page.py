"""The page at `/` of `deco serve`, in a real headless Chromium (Debian's `chromium` driven by
Playwright; no browser is downloaded): type a prompt, watch the preview update, get the image
with its parameters, then start a second one and cancel it, which frees its slot."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest

import runtimes
from tests.helpers import PromptFeatures

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if shutil.which("chromium") is None:
    pytest.skip("the browser test needs Debian's chromium (apt-get install chromium)",
                allow_module_level=True)
playwright = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs playwright (pip install playwright)")
uvicorn = pytest.importorskip("uvicorn", reason="deco serve needs the serve extra")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server(golden_t2i_onnx_bundle):
    from deco_export.serve import ServeSettings, create_app

    pipe = runtimes.load(golden_t2i_onnx_bundle, backend="onnxruntime")
    pipe.text_encoder = PromptFeatures(pipe.model_config.text_len, pipe.model_config.text_dim)
    app = create_app(pipe, ServeSettings(max_batch=4, model_id="golden-t2i"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < end, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def page(server):  # per test: the browser and its profile directory are gone at its end
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        tab = browser.new_page()
        tab.set_default_timeout(60_000)
        tab.goto(server + "/")
        yield tab
        browser.close()


def test_generate_with_live_preview_then_cancel(page, server):
    import httpx

    page.wait_for_selector("#prompt:visible")
    assert page.is_hidden("#class")
    page.fill("#prompt", "a lighthouse at dusk")
    page.fill("#steps", "30")
    page.fill("#seed", "7")
    previews: list[str] = []
    page.expose_function("sawPreview", lambda src: previews.append(src))
    page.evaluate("""() => new MutationObserver(() => window.sawPreview(
        document.getElementById('preview').src.slice(-40))).observe(
        document.getElementById('preview'), {attributes: true, attributeFilter: ['src']})""")
    page.click("#generate")
    page.wait_for_selector("#params:visible")
    assert page.text_content("#status") == "Done."
    assert page.get_attribute("#result", "src").startswith("data:image/png;base64,")
    assert '"seed": 7' in page.text_content("#params")
    assert '"prompt": "a lighthouse at dusk"' in page.text_content("#params")
    assert len(set(previews)) > 5  # the preview changed as the steps went by
    assert page.text_content("#progress") == "step 30 of 30"

    page.fill("#steps", "1000")
    page.click("#generate")
    page.wait_for_function("document.getElementById('progress').textContent.includes('step 3 ')")
    assert httpx.get(server + "/health").json()["in_flight"] == 1
    page.click("#cancel")
    page.wait_for_function("document.getElementById('status').textContent === 'Cancelled.'")
    end = time.monotonic() + 30
    while httpx.get(server + "/health").json()["in_flight"] != 0:
        assert time.monotonic() < end, "the cancelled request kept its slot"
        time.sleep(0.05)
