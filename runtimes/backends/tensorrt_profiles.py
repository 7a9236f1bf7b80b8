"""TensorRT batch buckets, engine batches and optimisation profiles: plain Python, tested on
every machine; the exporter (``deco_export.export.tensorrt``) and the backend share it.

**Buckets and profiles.** With classifier-free guidance the sampler runs the graphs on
``[uncond; cond]``, so a user batch ``b`` needs engine batch ``2b`` inside the guidance interval
and ``b`` outside it (fast CFG skips the unconditional half there). A bucket therefore yields two
engine batches, and every engine gets one *static* optimisation profile (min = opt = max) per
engine batch:

* TensorRT tunes kernels for exactly the shapes that run. A batch between buckets is padded up
  to the next one, so an engine never runs at an untuned in-range shape (dynamic-shape engines
  have produced NaNs there, and the first call after a shape change is slow).
* Every profile is static, so each bucket can capture a CUDA graph of a whole sampler step:
  dynamic batches and CUDA graphs coexist instead of excluding each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runtimes.config import ModelConfig
from runtimes.graphs import get_graph
from runtimes.sizes import SizeRange

__all__ = [
    "DEFAULT_BATCH_BUCKETS",
    "MAX_ENGINE_BATCH",
    "Profile",
    "engine_batches",
    "guided_engine_batch",
    "normalize_buckets",
    "parse_buckets",
    "profiles_for",
    "unguided_engine_batch",
]

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8)
MAX_ENGINE_BATCH = 4096  # the ONNX exporter's dynamic batch bound



def normalize_buckets(buckets: Iterable[int]) -> tuple[int, ...]:
    """Sorted, de-duplicated positive user batch sizes."""
    try:
        values = sorted({int(b) for b in buckets})
    except (TypeError, ValueError):
        raise ValueError(
            f"batch buckets must be integers, got {buckets!r}; e.g. 1,2,4,8"
        ) from None
    if not values or values[0] < 1:
        raise ValueError(
            f"batch buckets must be positive integers, got {list(buckets)}; e.g. 1,2,4,8")
    return tuple(values)


def parse_buckets(text: str) -> tuple[int, ...]:
    """'1,2,4,8' -> (1, 2, 4, 8)."""
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        return normalize_buckets(int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"cannot read batch buckets {text!r}; write positive integers separated by commas, "
            "e.g. 1,2,4,8"
        ) from None


def engine_batches(buckets: Iterable[int], cfg: bool = True) -> tuple[int, ...]:
    """The engine batch sizes a set of user buckets needs.

    Each bucket ``b`` needs ``b`` (unguided steps) and, with guidance, ``2b`` (the
    [uncond; cond] batch): buckets (1, 2, 4, 8) give engine batches (1, 2, 4, 8, 16).
    """
    user = normalize_buckets(buckets)
    out = set(user)
    if cfg:
        out |= {2 * b for b in user}
    if max(out) > MAX_ENGINE_BATCH:
        raise ValueError(
            f"engine batch {max(out)} exceeds {MAX_ENGINE_BATCH}, the ONNX graphs' batch bound; "
            "choose smaller buckets"
        )
    return tuple(sorted(out))


def unguided_engine_batch(rows: int, batches: Sequence[int]) -> int:
    """The engine batch that runs ``rows`` rows: the smallest that holds them (rows are padded)."""
    if rows < 1:
        raise ValueError(f"a batch needs at least one row, got {rows}")
    for n in sorted(batches):
        if n >= rows:
            return n
    raise ValueError(
        f"batch of {rows} rows is larger than the largest engine batch {max(batches)} "
        f"(engine batches {sorted(batches)}; a guided batch of b images needs 2b rows); "
        f"rebuild the engines with larger buckets, e.g. `deco export tensorrt BUNDLE "
        f"--batch-buckets {','.join(str(b) for b in _suggest(rows))}`"
    )


def guided_engine_batch(batch: int, batches: Sequence[int]) -> int:
    """The engine batch for a guided step of ``batch`` images: the smallest even engine batch
    whose halves hold ``batch`` rows each ([uncond | pad; cond | pad])."""
    if batch < 1:
        raise ValueError(f"a batch needs at least one image, got {batch}")
    for n in sorted(batches):
        if n % 2 == 0 and n // 2 >= batch:
            return n
    raise ValueError(
        f"a guided batch of {batch} images needs an engine batch of at least {2 * batch} "
        f"(engine batches {sorted(batches)}); rebuild the engines with larger buckets, e.g. "
        f"`deco export tensorrt BUNDLE --batch-buckets "
        f"{','.join(str(b) for b in _suggest(batch))}`"
    )


def _suggest(rows: int) -> list[int]:
    out, b = [], 1
    while b < rows:
        out.append(b)
        b *= 2
    return [*out, b]


@dataclass(frozen=True)
class Profile:
    """One optimisation profile of one engine batch: every input's optimum shape
    (``shapes``) and, for graphs with dynamic height and width, the smallest and largest
    (``min_shapes`` / ``max_shapes``; None for a static profile, min = opt = max)."""

    batch: int
    shapes: dict[str, tuple[int, ...]]
    min_shapes: dict[str, tuple[int, ...]] | None = None
    max_shapes: dict[str, tuple[int, ...]] | None = None

    def bounds(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) of input ``name``, as `IOptimizationProfile.set_shape` takes them."""
        opt = self.shapes[name]
        return ((self.min_shapes or self.shapes)[name], opt, (self.max_shapes or self.shapes)[name])

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"batch": self.batch,
                             "shapes": {k: list(v) for k, v in self.shapes.items()}}
        if self.min_shapes is not None and self.max_shapes is not None:
            d["min_shapes"] = {k: list(v) for k, v in self.min_shapes.items()}
            d["max_shapes"] = {k: list(v) for k, v in self.max_shapes.items()}
        return d


def profiles_for(graph: str, model: ModelConfig | Mapping[str, Any], image_size: Sequence[int],
                 batches: Sequence[int], sizes: SizeRange | None = None) -> list[Profile]:
    """One profile per engine batch for ``graph`` of a model config (or its dict): static at
    ``image_size``, or, with a ``sizes`` range of several sizes, spanning it with the optimum
    at its default size."""
    if not isinstance(model, ModelConfig):
        model = ModelConfig.from_dict(model)
    spec = get_graph(graph, model)
    if sizes is not None and not sizes.is_fixed:
        return [Profile(n, {k: v[1] for k, v in shapes.items()},
                        {k: v[0] for k, v in shapes.items()},
                        {k: v[2] for k, v in shapes.items()})
                for n, shapes in spec.tensorrt_profile_ranges(model, sizes, batches)]
    return [Profile(n, shapes) for n, shapes in
            spec.tensorrt_profiles(model, int(image_size[0]), int(image_size[1]), batches)]
