"""The image sizes a bundle serves: one range of heights and widths, recorded in its manifest.

The exported graphs take height and width as dynamic axes (the DiT computes its RoPE tables
from its input's shape), so one bundle samples at any size whose sides are multiples of the
patch size inside the range it was exported for; a runtime whose artifacts are compiled for a
list of sizes (Core ML's enumerated shapes) narrows the range to that list. A bundle written
before sizes were dynamic holds graphs of one size: its range is that size alone.

No torch, no numpy: the manifest reader (`runtimes.bundle`), the pipeline's size check and the
exporters all use this one record.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

__all__ = ["SizeError", "SizeRange", "parse_size", "parse_size_range"]

Size = tuple[int, int]


class SizeError(ConfigError):
    """An image size the bundle's graphs do not serve (outside the range, not a multiple of the
    patch size, or not one of a compiled runtime's sizes); the message names the range."""


def _pair(value: Any, what: str) -> Size:
    if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
        raise ConfigError(f"{what} must be [height, width] in pixels, got {value!r}")
    return int(value[0]), int(value[1])


def _fmt(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


@dataclass(frozen=True)
class SizeRange:
    """Heights in [min_size[0], max_size[0]] and widths in [min_size[1], max_size[1]], both
    multiples of ``multiple`` (the patch size); ``default`` is the size a call without one
    samples at (the model's own). ``enumerated``, when set, lists the only sizes a compiled
    runtime accepts (each inside the range)."""

    min_size: Size
    max_size: Size
    default: Size
    multiple: int
    enumerated: tuple[Size, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "min_size", _pair(self.min_size, "sizes.min"))
        object.__setattr__(self, "max_size", _pair(self.max_size, "sizes.max"))
        object.__setattr__(self, "default", _pair(self.default, "sizes.default"))
        m = self.multiple
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError(f"sizes.multiple must be a positive integer, got {m!r}")
        for name, size in (("min", self.min_size), ("max", self.max_size),
                           ("default", self.default)):
            if size[0] % m or size[1] % m:
                raise ConfigError(f"sizes.{name} {_fmt(size)} is not a multiple of {m}")
        if not (self.min_size[0] <= self.default[0] <= self.max_size[0]
                and self.min_size[1] <= self.default[1] <= self.max_size[1]):
            raise ConfigError(
                f"sizes: the default {_fmt(self.default)} is outside {_fmt(self.min_size)} to "
                f"{_fmt(self.max_size)}; choose a range that holds the export size "
                "(--image-size)"
            )
        if self.enumerated is not None:
            listed = tuple(_pair(s, "sizes.enumerated") for s in self.enumerated)
            outside = [s for s in listed if not self._in_range(*s)]
            if not listed or outside:
                raise ConfigError(
                    f"sizes.enumerated must list sizes inside {self.describe_range()}, got "
                    f"{[list(s) for s in listed]}"
                )
            object.__setattr__(self, "enumerated", tuple(dict.fromkeys(listed)))

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def fixed(cls, size: Sequence[int], multiple: int) -> SizeRange:
        """One size only: what a bundle of fixed-size graphs serves."""
        pair = _pair(tuple(size), "image size")
        return cls(pair, pair, pair, multiple)

    @classmethod
    def around(cls, default: Sequence[int], multiple: int, factor: int = 2) -> SizeRange:
        """The default range of an export: each side from default/factor (rounded down to the
        multiple, at least one multiple) to default*factor."""
        d = _pair(tuple(default), "image size")
        low = tuple(max(multiple, (s // factor) // multiple * multiple) for s in d)
        return cls((low[0], low[1]), (d[0] * factor, d[1] * factor), d, multiple)

    def with_enumerated(self, sizes: Iterable[Sequence[int]]) -> SizeRange:
        return SizeRange(self.min_size, self.max_size, self.default, self.multiple,
                         tuple(_pair(tuple(s), "size") for s in sizes))

    # -- queries -----------------------------------------------------------------------------

    @property
    def is_fixed(self) -> bool:
        return self.min_size == self.max_size or (self.enumerated is not None
                                                  and len(self.enumerated) == 1)

    def _in_range(self, height: int, width: int) -> bool:
        return (self.min_size[0] <= height <= self.max_size[0]
                and self.min_size[1] <= width <= self.max_size[1]
                and height % self.multiple == 0 and width % self.multiple == 0)

    def contains(self, height: int, width: int) -> bool:
        if self.enumerated is not None:
            return (height, width) in self.enumerated
        return self._in_range(height, width)

    def heights(self) -> list[int]:
        return list(range(self.min_size[0], self.max_size[0] + 1, self.multiple))

    def widths(self) -> list[int]:
        return list(range(self.min_size[1], self.max_size[1] + 1, self.multiple))

    def _parity_candidates(self, target: int) -> list[Size]:
        """Per height, the widths nearest ``target / height`` (and their neighbours, so a
        non-square one is among them): the sizes `parity_sizes` can pick, in time linear in
        the heights. Listing every height x width pair of a range such as 16:100000 took
        tens of GB."""
        widths = self.widths()
        out: list[Size] = []
        for h in self.heights():
            i = bisect.bisect_left(widths, target / h)
            out += [(h, widths[j]) for j in range(max(0, i - 2), min(len(widths), i + 2))]
        out += [(h, w) for h in self.heights()[:2] for w in widths[:2]]
        return out

    def describe_range(self) -> str:
        if self.min_size == self.max_size:
            return f"{_fmt(self.min_size)} only"
        return (f"{_fmt(self.min_size)} to {_fmt(self.max_size)} in steps of {self.multiple}")

    def describe(self) -> str:
        if self.enumerated is not None:
            return "one of " + ", ".join(_fmt(s) for s in self.enumerated)
        return self.describe_range()

    def check(self, height: int, width: int, where: str = "this bundle serves") -> Size:
        """(height, width) when served, else a one-line `SizeError` naming the range."""
        if not self.contains(height, width):
            fix = ("pick one of them or export with --sizes listing it"
                   if self.enumerated is not None
                   else "pick a size there or export with a --size-range that holds it")
            raise SizeError(
                f"{height}x{width} is not a size {where}: height x width "
                f"{self.describe()} (default {_fmt(self.default)}); {fix}"
            )
        return int(height), int(width)

    def parity_sizes(self) -> list[Size]:
        """The sizes an export's parity gate checks: the default and, where the range allows,
        a second, non-square one (half the default's area when possible, so the check stays
        cheap); both are served sizes."""
        area = self.default[0] * self.default[1]
        square = self.default[0] == self.default[1]
        candidates = (self.enumerated if self.enumerated is not None
                      else self._parity_candidates(area // 2))
        others = [s for s in candidates if s != self.default]
        if not others:
            return [self.default]

        def rank(s: Size) -> tuple[int, int, int, int]:
            wrong_shape = (s[0] == s[1]) if square else 0
            return (int(wrong_shape), abs(2 * s[0] * s[1] - area), s[0], s[1])

        return [self.default, min(others, key=rank)]

    # -- serialisation -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"min": list(self.min_size), "max": list(self.max_size),
                             "default": list(self.default), "multiple": self.multiple}
        if self.enumerated is not None:
            d["enumerated"] = [list(s) for s in self.enumerated]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "manifest.json: sizes") -> SizeRange:
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where} must be an object, got {d!r}")
        try:
            listed = d.get("enumerated")
            return cls(d["min"], d["max"], d["default"], d["multiple"],
                       None if listed is None else tuple(tuple(s) for s in listed))
        except KeyError as exc:
            raise ConfigError(f"{where} lacks {exc.args[0]!r} (needs min, max, default, "
                              "multiple)") from None
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"{where}: {exc}") from None


def _sides(text: str) -> Size:
    """'64' (square) or '64x32' (height x width, '*' for 'x'); ValueError otherwise."""
    sides = [int(v) for v in text.lower().replace("*", "x").split("x")]
    if len(sides) == 1:
        sides *= 2
    if len(sides) != 2:
        raise ValueError(text)
    return sides[0], sides[1]


def parse_size(text: str) -> Size:
    """'256' or '256x192' (height x width): the one reader of a size the user typed."""
    try:
        size = _sides(text)
    except ValueError:
        size = (0, 0)
    if min(size) <= 0:
        raise ConfigError(f"cannot read size {text!r}; write HEIGHTxWIDTH, e.g. 64x64")
    return size


def parse_size_range(text: str, default: Sequence[int], multiple: int) -> SizeRange:
    """'32:128' (both sides) or '32x64:128x256' (HEIGHTxWIDTH), the model's size as default."""
    parts = text.lower().replace(" ", "").split(":")
    try:
        if len(parts) != 2:
            raise ValueError(text)
        ends = [_sides(part) for part in parts]
    except ValueError:
        raise ConfigError(f"cannot read size range {text!r}; write MIN:MAX, e.g. 32:128 or "
                          "32x64:128x256 (height x width)") from None
    return SizeRange(ends[0], ends[1], (int(default[0]), int(default[1])), multiple)
