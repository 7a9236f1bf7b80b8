"""Memory a request needs, estimated before anything is allocated, against what the process may
use.

Without this, an image size or a batch too large for the machine ended in the kernel's OOM
killer (nothing said, other processes killed with it), a MemoryError traceback, or minutes of
swapping. The estimate is an upper-bound model of the largest live arrays, not a measurement:
the DiT's attention scores (quadratic in the tokens, one layer at a time at inference, every
layer kept for the backward pass in training), its token activations, the pixel decoder's
per-pixel features and the images themselves.

The limit is the smallest of: the memory the system reports available, the address-space
limit left to this process (``ulimit -v``, `resource.RLIMIT_AS`), and the control group's
limit. ``DECO_MAX_MEMORY`` (GiB) replaces it, to allow a request the estimate refuses (or to
refuse earlier).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from runtimes.errors import DecoError

__all__ = ["MAX_MEMORY_ENV", "MemoryLimitError", "check_generation", "check_memory",
           "generation_bytes", "grid_bytes", "memory_limit", "training_step_bytes"]

MAX_MEMORY_ENV = "DECO_MAX_MEMORY"
GIB = float(1 << 30)
FLOAT = 4  # bytes of a float32


class MemoryLimitError(DecoError, MemoryError):
    """A request needs more memory than this process may use; nothing was allocated."""


def _tokens(config: Any, height: int, width: int) -> int:
    p = int(config.patch_size)
    return max(1, height // p) * max(1, width // p)


def generation_bytes(config: Any, batch: int, height: int, width: int,
                     guided: bool = True) -> int:
    """Peak bytes of generating ``batch`` images of ``height`` x ``width`` (both CFG halves
    at once when ``guided``)."""
    rows = batch * (2 if guided else 1)
    tokens = _tokens(config, height, width)
    pixels = height * width
    attention = 2 * rows * int(config.num_heads) * tokens * tokens * FLOAT  # scores + softmax
    activations = 12 * rows * tokens * int(config.hidden_size) * FLOAT
    decoder = 6 * rows * pixels * int(config.decoder_hidden_size) * FLOAT
    images = 8 * batch * int(config.in_channels) * pixels * FLOAT  # x, v, solver history
    return attention + activations + decoder + images


def check_generation(config: Any, batch: int, height: int, width: int,
                     fix: str = "generate fewer or smaller images per call") -> None:
    """`check_memory` for generating ``batch`` images of ``height`` x ``width``: the one
    refusal that both `Pipeline.generate` and a caller that draws the noise itself (before
    allocating it) give."""
    check_memory(generation_bytes(config, batch, height, width),
                 f"generating {batch} image(s) of {height}x{width}", fix)


def training_step_bytes(config: Any, micro_batch: int, height: int, width: int) -> int:
    """Peak bytes of one training micro-batch: every DiT layer's attention and activations and
    the decoder's per-pixel features are kept for the backward pass."""
    tokens = _tokens(config, height, width)
    pixels = height * width
    depth = int(config.dit_depth) + int(getattr(config, "refine_depth", 0) or 0)
    per_layer = (3 * int(config.num_heads) * tokens * tokens
                 + 16 * tokens * int(config.hidden_size)) * FLOAT
    decoder = 8 * int(config.decoder_depth) * pixels * int(config.decoder_hidden_size) * FLOAT
    images = 16 * int(config.in_channels) * pixels * FLOAT
    return micro_batch * (depth * per_layer + decoder + images)


def grid_bytes(count: int, height: int, width: int, scale: int = 1) -> int:
    """Bytes of a grid of ``count`` RGB images, each enlarged ``scale`` times (and its PNG)."""
    return 2 * count * 3 * (height * scale) * (width * scale)


def _meminfo_available() -> tuple[int, str] | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available system memory"
    except (OSError, ValueError, IndexError):
        return None
    return None


def _address_space_left() -> tuple[int, str] | None:
    try:
        import resource  # POSIX only: Windows has no address-space limit to read
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    used = 0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                used = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return max(0, soft - used), f"address-space limit of {soft / GIB:.1f} GiB (ulimit -v)"


def _cgroup_left() -> tuple[int, str] | None:
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((root / "memory.current").read_text().strip())
        return max(0, int(limit) - used), f"control group limit of {int(limit) / GIB:.1f} GiB"
    except (OSError, ValueError):
        return None


def memory_limit() -> tuple[int, str]:
    """(bytes this process may still allocate, what sets that limit)."""
    text = os.environ.get(MAX_MEMORY_ENV)
    if text:
        try:
            gib = float(text)
        except ValueError:
            gib = float("nan")
        if not gib > 0 or gib == float("inf"):
            raise MemoryLimitError(f"{MAX_MEMORY_ENV}={text!r}: give the memory limit in GiB, "
                                   "a positive number such as 16")
        return int(gib * GIB), f"{MAX_MEMORY_ENV}={text}"
    found = [x for x in (_meminfo_available(), _address_space_left(), _cgroup_left())
             if x is not None]
    if not found:
        return 1 << 62, "no known limit"
    return min(found)


def check_memory(need: int, what: str, fix: str) -> None:
    """Raise `MemoryLimitError` when ``need`` bytes exceed `memory_limit` (one line: the
    request, its size, the limit and how to get under it or raise it)."""
    limit, source = memory_limit()
    if need <= limit:
        return
    raise MemoryLimitError(
        f"{what} needs about {need / GIB:.1f} GiB, more than the {limit / GIB:.1f} GiB this "
        f"process may use ({source}); {fix}, or set {MAX_MEMORY_ENV}=GiB to allow more"
    )
