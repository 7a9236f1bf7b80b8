"""What several test packages share: the fixture paths and an analytic DeCo-shaped model.

The analytic model (``GaussianFlowBackend``) exists for sampler tests.

Data of class y is Gaussian, x ~ N(mu_y, s^2 I), with noise eps ~ N(0, I) and
x_t = t x + (1 - t) eps (t = 0 noise, t = 1 data). The flow-matching velocity is then closed
form, v(x_t, t, y) = mu_y + a(t) (x_t - t mu_y) with a(t) = (t s^2 - (1 - t)) / sigma(t)^2 and
sigma(t)^2 = t^2 s^2 + (1 - t)^2, and so is the ODE solution: x_t = t mu_y + sigma(t) eps, so
sampling from eps must end at mu_y + s eps. That lets tests measure solver error and order.

Split as DeCo is: the "DiT" maps (x_t, t, y) to a per-token condition that carries the class
mean of the token's patch plus a(t) and t (so reusing a stale condition is visible), and the
"decoder" turns (x_t, cond) into the velocity pixel by pixel. ``dit_hidden`` is the part that
does not depend on t, and ``refresh_condition`` adds the t-dependent features back, like
cond = SiLU(e_t + h).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOLDEN_CKPT = FIXTURES / "deco_tiny_64.ckpt"
GOLDEN_T2I_CKPT = FIXTURES / "deco_t2i_tiny_64.ckpt"


def interruptible() -> None:
    """``preexec_fn`` of a child process a test interrupts: SIGINT back to its default. A
    shell's background job (``nohup pytest ... &``) runs with SIGINT ignored and its children
    inherit that, so Python in them would never raise KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def sigint_raises() -> Iterator[None]:
    """SIGINT as an interactive Python has it, for the block (a background shell's job starts
    with it ignored, and then `runtimes.interrupts.interrupts_raise` leaves it alone)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _SignalsItselfWhenCollected:
    def __del__(self) -> None:
        # os.kill runs the handler before it returns: its KeyboardInterrupt is raised inside
        # this finalizer, and Python only prints "Exception ignored in ..."
        os.kill(os.getpid(), signal.SIGINT)


def interrupted_inside_a_finalizer() -> None:
    """Send this process SIGINT while a finalizer runs: the call returns normally."""
    _SignalsItselfWhenCollected()


def patchify(x: np.ndarray, p: int) -> np.ndarray:
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: np.ndarray, c: int, h: int, w: int, p: int) -> np.ndarray:
    b = tokens.shape[0]
    x = tokens.reshape(b, h // p, w // p, c, p, p).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


class GaussianFlowBackend:
    """numpy Backend whose velocity is the exact flow-matching velocity of Gaussian classes."""

    def __init__(
        self,
        num_classes: int = 3,
        channels: int = 3,
        size: int = 8,
        patch: int = 4,
        data_std: float = 0.5,
        seed: int = 0,
        supports_refresh: bool = True,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.num_classes, self.c, self.size, self.p, self.s = (
            num_classes, channels, size, patch, data_std
        )
        # Class means, plus the unconditional "class" (index num_classes) at their average.
        means = rng.uniform(-0.6, 0.6, size=(num_classes, channels, size, size))
        self.means = np.concatenate([means, means.mean(0, keepdims=True)]).astype(np.float64)
        self.supports_refresh = supports_refresh
        self.calls: list[tuple[str, int]] = []

    # model ------------------------------------------------------------------------------------

    def a(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, np.float64)
        s2 = self.s**2
        return (t * s2 - (1 - t)) / (t * t * s2 + (1 - t) ** 2)

    def exact(self, noise: np.ndarray, labels: Sequence[int]) -> np.ndarray:
        """The ODE solution at t = 1 (no guidance) from ``noise``."""
        return (self.means[np.asarray(labels)] + self.s * noise).astype(np.float64)

    def model_config(self) -> dict:
        return {
            # The condition is c p p + 2 wide; the sampler never reads hidden_size, so any
            # valid DeCo width (head dim a multiple of 4) does.
            "hidden_size": 64, "num_heads": 1, "dit_depth": 1,
            "decoder_hidden_size": 1, "decoder_depth": 1, "patch_size": self.p,
            "num_classes": self.num_classes, "in_channels": self.c,
            "image_size": [self.size, self.size],
        }

    # Backend protocol ------------------------------------------------------------------------

    def dit_hidden(self, x_t, t, y):
        self.calls.append(("dit", len(y)))
        mu = patchify(self.means[np.asarray(y)], self.p)  # (B, L, C p p)
        extra = np.zeros(mu.shape[:2] + (2,))
        return np.concatenate([mu, extra], axis=-1).astype(np.float32)

    def refresh_condition(self, hidden, t):
        self.calls.append(("refresh", len(t)))
        cond = np.array(hidden, dtype=np.float32, copy=True)
        t64 = np.asarray(t, np.float64)[:, None]
        cond[..., -2] = self.a(t64)
        cond[..., -1] = t64
        return cond

    def dit(self, x_t, t, y):
        cond = self.refresh_condition(self.dit_hidden(x_t, t, y), t)
        self.calls[-2:] = [("dit", len(y))]
        return cond

    def decoder(self, x_t, cond):
        self.calls.append(("decoder", len(x_t)))
        return self._velocity(x_t, self._per_pixel(cond))

    def _per_pixel(self, cond):
        """(B, 3, C, H, W) float64: the class mean, a(t) and t of every pixel, from cond."""
        cond = np.asarray(cond, np.float64)
        c, h, w, n = self.c, self.size, self.size, self.c * self.p * self.p
        mu = unpatchify(cond[..., :-2], c, h, w, self.p)
        a = unpatchify(np.repeat(cond[..., -2:-1], n, axis=-1), c, h, w, self.p)
        t = unpatchify(np.repeat(cond[..., -1:], n, axis=-1), c, h, w, self.p)
        return np.stack([mu, a, t], axis=1)

    @staticmethod
    def _velocity(x_t, per_pixel):
        mu, a, t = per_pixel[:, 0], per_pixel[:, 1], per_pixel[:, 2]
        return (mu + a * (np.asarray(x_t, np.float64) - t * mu)).astype(np.float32)

    def from_numpy(self, a):
        return np.array(a, copy=True)

    def to_numpy(self, a):
        return np.asarray(a)

    def concat(self, arrays):
        return np.concatenate(arrays, axis=0)

    # bookkeeping -------------------------------------------------------------------------------

    def batches(self, kind: str) -> list[int]:
        return [n for k, n in self.calls if k == kind]


class SplitGaussianFlowBackend(GaussianFlowBackend):
    """`GaussianFlowBackend` with the split decoder: ``decoder_cond`` gives the per-pixel
    (mean, a(t), t) the fused decoder derives from cond, ``decoder_pixel`` the velocity from
    them, with the fused decoder's arithmetic (so both paths agree bit for bit). Every
    modulation made and every one the pixel part received is kept, to check the caching."""

    supports_decoder_split = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.made: list[np.ndarray] = []
        self.used: list[np.ndarray] = []

    def decoder_cond(self, cond):
        self.calls.append(("decoder_cond", len(cond)))
        self.made.append(self._per_pixel(cond))
        return self.made[-1]

    def decoder_pixel(self, x_t, modulation):
        self.calls.append(("decoder_pixel", len(x_t)))
        self.used.append(modulation)
        return self._velocity(x_t, modulation)



def check_image_to_image(pipe: Any, condition: dict[str, Any], steps: int = 4) -> np.ndarray:
    """Image-to-image and inpainting on a real backend: strength 0 returns the image,
    strength 1 the generation from noise, and an inpainting run keeps the known half exactly
    while it generates the other anew. Returns the inpainted images."""
    h, w = pipe.model_config.image_size
    base = pipe.generate(**condition, steps=steps, seed=1, output_type="np").images
    image = np.clip(base[::-1], -1, 1)  # another image of the batch to start from
    kept = pipe.generate(**condition, steps=steps, image=image, strength=0.0, output_type="np")
    assert np.array_equal(kept.images, image)
    full = pipe.generate(**condition, steps=steps, seed=1, image=image, strength=1.0,
                         output_type="np").images
    assert np.array_equal(full, base)
    mask = np.zeros((h, w), np.float32)
    mask[:, : w // 2] = 1.0  # generate the left half
    out = pipe.generate(**condition, steps=steps, seed=2, image=image, mask_image=mask,
                        output_type="np").images
    assert np.array_equal(out[..., w // 2:], image[..., w // 2:])
    assert np.abs(out[..., : w // 2] - image[..., : w // 2]).max() > 0.05
    return np.asarray(out)


class PromptFeatures:
    """Text features (1, L, C) drawn from a generator seeded by the prompt: the golden text
    model's bundle has no text encoder, and a server test only needs prompts to become
    features."""

    def __init__(self, length: int, channels: int) -> None:
        self.shape = (length, channels)

    def encode(self, prompts):
        rows = []
        for p in prompts:
            seed = int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "little")
            rows.append(np.random.default_rng(seed).standard_normal(self.shape))
        return np.asarray(rows, dtype=np.float32)


def export_with_tiny_encoder(root: Path, checkpoint: Path, *flags: str) -> Path:
    """``deco export onnx`` of the tiny T2I checkpoint at 64x64 with a tiny random Qwen3 (48
    wide, like the model's text features) as its text encoder, written under ``root``; a 2-step
    parity gate. Returns the bundle."""
    from click.testing import CliRunner

    from deco_export.cli import main
    from tests.deco_export.test_text_encoders import build_tiny_qwen3

    encoder_dir = build_tiny_qwen3(root / "qwen3-48", hidden_size=48)
    result = CliRunner().invoke(main, [
        "export", "onnx", str(checkpoint), str(root / "bundle"), "--image-size", "64x64",
        "--parity-steps", "2", "--text-encoder", str(encoder_dir), *flags])
    assert result.exit_code == 0, result.output
    return root / "bundle"


def torch_backed_bundle(root: Path, checkpoint: Path, backend: str) -> Path:
    """A bundle directory at ``root`` with a manifest only, whose backend ``backend`` (registered
    here) runs the checkpoint's model in PyTorch: for tests of what reads a bundle's model
    (calibration, solver tuning) without exporting graphs."""
    import runtimes
    from deco_export.backends.torch_backend import TorchBackend
    from deco_export.checkpoint import load_pretrained, read_metadata
    from runtimes.bundle import Manifest, write_manifest
    from runtimes.sampler import release_sampler

    model = load_pretrained(checkpoint)
    runtimes.register_backend(backend, lambda root, manifest, precision, **kw:
                              TorchBackend(model))
    root.mkdir()
    write_manifest(root, Manifest(model=model.config.to_dict(),
                                  sampler_defaults=release_sampler(model.config.family),
                                  source={"path": str(checkpoint),
                                          "sha256": read_metadata(checkpoint)["weights_sha256"]}))
    return root
