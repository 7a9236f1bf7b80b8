"""Seeded starting noise, identical for every backend and independent of batch composition.

Sample i of a call with seed s is drawn on the host with
``np.random.Generator(np.random.Philox(np.random.SeedSequence([s, i]))).standard_normal(
(C, H, W), dtype=np.float32)``. Generating on the CPU with a counter-based generator keyed per
sample means: the same seed gives the same images on ONNX Runtime, PyTorch, TensorRT or Core ML;
image i does not change when the batch grows or shrinks around it; and numpy's Philox stream is
stable across platforms and numpy versions.

This is not the reference's ``torch.randn``; to reproduce a reference image exactly, pass its
noise array to the pipeline instead of a seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["check_noise", "noise_for_keys", "sample_noise"]


def noise_for_keys(keys: Sequence[Sequence[int]], shape: Sequence[int]) -> np.ndarray:
    """A float32 standard normal array of ``shape`` per entropy key, stacked (len(keys), *shape)."""
    out = np.empty((len(keys), *shape), dtype=np.float32)
    for n, key in enumerate(keys):
        entropy = [int(k) for k in key]
        if any(k < 0 for k in entropy):
            raise ValueError(f"seeds must be non-negative integers, got {entropy}")
        gen = np.random.Generator(np.random.Philox(np.random.SeedSequence(entropy)))
        out[n] = gen.standard_normal(tuple(shape), dtype=np.float32)
    return out


def sample_noise(
    seed: int | Sequence[int], batch: int, channels: int, height: int, width: int
) -> np.ndarray:
    """Noise (batch, C, H, W) float32.

    ``seed`` is an int (sample i uses the key [seed, i]) or a list of ``batch`` ints, one per
    sample (sample i uses [seeds[i], 0], so ``seed=[s]`` gives the first image of ``seed=s``).
    """
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        keys = [(int(seed), i) for i in range(batch)]
    else:
        if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence | np.ndarray):
            raise ValueError(
                f"seed must be a non-negative integer or a list of them (one per image), got "
                f"{seed!r}"
            )
        seeds = list(seed)
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
                raise ValueError(f"seeds must be non-negative integers, got {s!r} in {seeds}")
        if len(seeds) != batch:
            raise ValueError(
                f"got {len(seeds)} seeds for {batch} images; give one seed per image or one int"
            )
        keys = [(int(s), 0) for s in seeds]
    return noise_for_keys(keys, (channels, height, width))


def check_noise(noise: np.ndarray, expected_shape: tuple[int, ...]) -> np.ndarray:
    """Validate caller-supplied noise; returns it as contiguous float32.

    Raises ValueError naming the problem (wrong shape, non-finite values) and the fix.
    """
    a = np.asarray(noise)
    if a.shape != tuple(expected_shape):
        raise ValueError(
            f"noise has shape {a.shape} but this call needs {tuple(expected_shape)} "
            f"(one (C, H, W) array per class label); pass noise of that shape or use seed="
        )
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"noise must be a float array, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.all(np.isfinite(a)):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise ValueError(
            f"noise contains {bad} NaN or infinite values; pass finite standard normal noise"
        )
    return a
