"""What a benchmark measures: ``BenchSettings`` and its checks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from .catalogue import CFG_MODES, PRECISIONS, REFERENCE, expand_backends

# The prompts a text-to-image benchmark encodes when none are given: fixed, so two runs (and
# every row of one run) time the same text encoder work. Image i of a batch gets prompt
# i mod len(prompts).
DEFAULT_PROMPTS = (
    "a photo of a cat sitting on a windowsill",
    "a red fox in the snow at dawn",
    "an astronaut riding a horse on the moon",
    "a bowl of ramen on a wooden table, studio lighting",
)


@dataclass
class BenchSettings:
    """What to measure. ``backends=None`` means every known backend; ``precisions=None`` means
    each backend's natural ones (fp32 for PyTorch on the CPU, what the bundle holds for the
    runtimes)."""

    backends: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()
    precisions: tuple[str, ...] | None = None
    batch_sizes: tuple[int, ...] = (1, 4)
    steps: tuple[int, ...] = (50,)
    repeats: int = 5
    warmup: int = 1
    rounds: int = 1
    threads: int | None = None
    sharing: str | None = None
    sharing_mode: str = "reuse"
    cfg_mode: str = "fast"
    device: str = "auto"
    guidance: float | None = None
    seed: int = 0
    image_size: tuple[int, int] | None = None
    checkpoint: str | None = None
    timeout_s: float = 1800.0
    plots: bool = True
    # The GEMM peak probe's matrix size (0: no probe, no roofline columns).
    peak_size: int = 2048
    progress: bool = True
    fid_data: str | None = None
    fid_samples: int = 500
    # Text-to-image bundles: the prompts to encode (empty: DEFAULT_PROMPTS).
    prompts: tuple[str, ...] = ()
    # The solver of every row (None: the bundle's sampler default); rows report its NFE.
    solver: str | None = None

    QUICK: ClassVar[dict[str, Any]] = {"batch_sizes": (1, 4), "steps": (10,), "repeats": 2,
                                       "warmup": 1, "peak_size": 1024}

    @classmethod
    def quick(cls, **overrides: Any) -> BenchSettings:
        """`--quick`: batch 1 and 4, 10 steps, 2 repeats, none of the rows the catalogue marks
        slow to build (torch.compile's): well under two minutes for a small model on two busy
        cores."""
        from .catalogue import backend_kinds

        skip = tuple(k.name for k in backend_kinds() if not k.row.quick)
        return cls(**{**cls.QUICK, "skip": skip, **overrides})

    def check(self) -> None:
        """Raise ValueError naming the first bad setting (one line, for the CLI)."""
        if self.backends is not None:
            self.backends = tuple(expand_backends(self.backends))
        self.skip = tuple(expand_backends(self.skip))
        if REFERENCE in self.skip:
            raise ValueError(f"{REFERENCE} cannot be skipped: every speed-up and image "
                             "difference is measured against it")
        if self.precisions is not None:
            bad = [p for p in self.precisions if p not in PRECISIONS]
            if bad or not self.precisions:
                raise ValueError(f"unknown precision {bad[0] if bad else '(none)'}; choose from "
                                 f"{', '.join(PRECISIONS)}")
        for name, values in (("batch size", self.batch_sizes), ("step count", self.steps)):
            if not values or any(int(v) != v or v < 1 for v in values):
                raise ValueError(f"every {name} must be a positive integer, got {list(values)}")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {self.repeats}")
        # Checked here, not when the first row has run for that long (or never stops).
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"--timeout must be a positive number of seconds, got "
                             f"{self.timeout_s}")
        if self.guidance is not None and not math.isfinite(self.guidance):
            raise ValueError(f"--guidance must be a finite number, got {self.guidance}")
        if self.rounds < 1:
            raise ValueError(f"--rounds must be at least 1, got {self.rounds}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be 0 or more, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if self.cfg_mode not in CFG_MODES:
            raise ValueError(f"--cfg-mode must be one of {', '.join(CFG_MODES)}, not "
                             f"{self.cfg_mode!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        if self.fid_data is not None and self.fid_samples < 2:
            raise ValueError(f"--fid-samples must be at least 2, got {self.fid_samples}")
        if self.peak_size < 0:
            raise ValueError(f"--peak-size must be >= 0 (0 skips the GEMM peak probe), not "
                             f"{self.peak_size}")
        if any(not p.strip() for p in self.prompts):
            raise ValueError("--prompt must not be empty (the negative prompt is the bundle's)")
        if self.solver is not None:
            from runtimes.solvers import get_solver

            self.solver = get_solver(self.solver).name
        if self.sharing_mode not in ("reuse", "fresh_t"):
            raise ValueError(f"--sharing-mode must be reuse or fresh_t, not {self.sharing_mode!r}")
