"""Parity figures shared by every exporter: max abs error and PSNR against PyTorch eager fp32.

Thresholds live here once, so the ONNX, Core ML and TensorRT gates mean the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from runtimes.errors import DecoError

# Per precision: the worst per-graph max abs error, the lowest per-graph PSNR and the lowest
# end-to-end PSNR (images in [-1, 1]) an artefact or backend may have. fp32 graphs must match
# PyTorch to rounding. bf16 (OpenVINO's bf16 inference precision, PyTorch autocast, bf16
# engines) is held to 40 dB per graph and end to end, where a difference from fp32 shows only
# when measured. fp16/int8 per-graph errors are reported, not gated: their quality is judged
# on the images (int8 at the same 40 dB).
GRAPH_MAX_ABS = {"fp32": 1e-4}
GRAPH_MIN_PSNR = {"bf16": 40.0}
END_TO_END_MIN_PSNR = {"fp32": 60.0, "fp16": 35.0, "bf16": 40.0, "int8": 40.0}
# A text encoder at a reduced precision, against the PyTorch fp32 encoder: the lowest
# signal-to-noise ratio of its features (`snr`, every token: the DiT reads pads too) over the
# gate's prompts. A PSNR over the features' peak-to-peak would hide a broken encoder behind
# one large activation (an int8 all-MiniLM-L6-v2 whose pad rows point elsewhere measures 33 dB
# PSNR, 3 dB SNR). 40 dB: an error of 1% of the features' RMS; int8 may lose three times that.
TEXT_ENCODER_MIN_SNR = {"fp16": 40.0, "int8": 30.0}


def max_abs_error(reference: np.ndarray, test: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(reference, np.float64) - np.asarray(test, np.float64))))


def psnr(reference: np.ndarray, test: np.ndarray, data_range: float | None = None) -> float:
    """PSNR in dB; ``data_range`` defaults to the reference's peak-to-peak (2.0 for images)."""
    ref = np.asarray(reference, np.float64)
    mse = float(np.mean((ref - np.asarray(test, np.float64)) ** 2))
    if data_range is None:
        data_range = float(ref.max() - ref.min()) or 1.0
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def sample_accuracy(images: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How close a batch of samples is to reference samples of the same noises: the mean and
    the lowest per-image PSNR (data range 2, images in [-1, 1]; the figure solver studies and
    tuned solver tables report) and the largest absolute pixel error over the batch."""
    err = (np.asarray(images, np.float64) - np.asarray(reference, np.float64)).reshape(
        len(images), -1)
    per_image = 10 * np.log10(4.0 / np.maximum((err**2).mean(axis=1), 1e-20))
    return {"psnr_mean": float(per_image.mean()), "psnr_min": float(per_image.min()),
            "max_abs": float(np.abs(err).max())}


def snr(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-noise ratio in dB: the reference's energy over the error's (inf if exact)."""
    ref = np.asarray(reference, np.float64)
    noise = float(np.sum((ref - np.asarray(test, np.float64)) ** 2))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(float(np.sum(ref**2)), 1e-300) / noise)


@dataclass
class GraphParity:
    """One graph output against PyTorch at one batch (and image size, for graphs whose height
    and width are dynamic: the gate checks two sizes)."""

    graph: str
    batch: int
    max_abs_error: float
    psnr_db: float
    height: int | None = None
    width: int | None = None
    snr_db: float | None = None  # where the gate is on `snr` (a reduced-precision text encoder)

    def to_dict(self) -> dict:
        d = {"graph": self.graph, "batch": self.batch, "max_abs_error": self.max_abs_error,
             "psnr_db": finite(self.psnr_db)}
        if self.height is not None and self.width is not None:
            d.update(height=self.height, width=self.width)
        if self.snr_db is not None:
            d["snr_db"] = finite(self.snr_db)
        return d

    @property
    def where(self) -> str:
        size = "" if self.height is None else f", {self.height}x{self.width}"
        return f"{self.graph} graph (batch {self.batch}{size})"


def finite(value: float) -> float | None:
    """JSON has no infinity: an exact match is written as null."""
    return None if math.isinf(value) else value


class ParityError(DecoError, ValueError):
    """An export whose numbers fall below the gate; nothing is written."""


def check_graph_gate(precision: str, results: list[GraphParity], what: str,
                     consequence: str = "the export is wrong, nothing was written") -> None:
    """Raise ParityError for the worst graph output outside the precision's per-graph gate."""
    limit = GRAPH_MAX_ABS.get(precision)
    bad = [r for r in results if limit is not None and not r.max_abs_error <= limit]
    if bad:
        worst = max(bad, key=lambda r: r.max_abs_error)
        raise ParityError(
            f"{what}: {worst.where} at {precision} differs from PyTorch by "
            f"{worst.max_abs_error:.3g} > {limit:g}; {consequence}"
        )
    floor = GRAPH_MIN_PSNR.get(precision)
    low = [r for r in results if floor is not None and not r.psnr_db >= floor]
    if low:
        worst = min(low, key=lambda r: r.psnr_db)
        raise ParityError(
            f"{what}: {worst.where} at {precision} is {worst.psnr_db:.1f} dB from PyTorch "
            f"fp32, below the {floor:g} dB gate; {consequence}"
        )


def check_end_to_end_gate(precision: str, psnr_db: float, what: str,
                          consequence: str = "nothing was written") -> None:
    """Raise ParityError when the sampled images are below the precision's end-to-end gate."""
    limit = END_TO_END_MIN_PSNR[precision]
    if not psnr_db >= limit:
        raise ParityError(
            f"{what}: end-to-end images ({precision}) are {psnr_db:.1f} dB from PyTorch fp32, "
            f"below the {limit:g} dB gate; {consequence}"
        )
