"""`import runtimes` and a generation on an OS without ``fcntl`` or ``os.uname`` (Windows)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.helpers import REPO

WITHOUT_POSIX = textwrap.dedent(
    """
    import importlib.abc, os, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"fcntl", "termios", "pwd", "grp", "resource"}:
                raise ImportError(f"{name} does not exist on this OS")
            return None

    sys.meta_path.insert(0, Block())
    import numpy  # numpy asks os.uname on Linux only; on Windows it does not
    for name in ("uname", "pread", "pwrite"):
        delattr(os, name)

    import runtimes
    import runtimes.backends.coreml, runtimes.backends.onnxruntime, runtimes.backends.openvino
    import runtimes.backends.tensorrt
    from runtimes.bundle import Manifest, write_manifest
    from tests.helpers import GaussianFlowBackend

    root = sys.argv[1]
    be = GaussianFlowBackend()
    os.makedirs(root)
    write_manifest(root, Manifest(model=be.model_config(), sampler_defaults={"steps": 3}))
    runtimes.register_backend("analytic-portable", lambda *a, **k: be)
    with runtimes.load(root, backend="analytic-portable") as pipe:
        out = pipe.generate([0, 1], seed=3, output_type="uint8")
    assert out.images.shape[0] == 2
    print("ok", "fcntl" in sys.modules)
    """
)


def test_import_and_generate_without_fcntl_or_uname(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", WITHOUT_POSIX, str(tmp_path / "bundle")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["ok", "False"], proc.stderr[-3000:]
