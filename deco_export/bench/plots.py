"""The report's PNG plots (matplotlib, imported when they are drawn)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .catalogue import REFERENCE
from .report import row_label


def write_plots(report: Mapping[str, Any], out: Path) -> list[Path]:
    """latency.png (ms/image per backend and precision, one panel per steps x batch) and
    speed_quality.png (speed-up against PSNR). matplotlib is imported here, with Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = report["rows"]
    groups = sorted({(r["steps"], r["batch"]) for r in rows})
    if not groups:
        return []
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 1.2 + 0.45 * len(rows)),
                             squeeze=False)
    for ax, (steps, batch) in zip(axes[:, 0], groups, strict=True):
        sel = [r for r in rows if (r["steps"], r["batch"]) == (steps, batch)][::-1]
        y = np.arange(len(sel))
        med = [r["ms_per_image"] for r in sel]
        p90 = [r["p90_ms_per_image"] - r["ms_per_image"] for r in sel]
        colors = ["#888888" if r["backend"] == REFERENCE else "#3b75af" for r in sel]
        ax.barh(y, med, xerr=[np.zeros(len(sel)), p90], color=colors, capsize=3)
        ax.set_yticks(y, [row_label(r) for r in sel], fontsize=8)
        ax.set_title(f"{steps} steps, batch {batch}", fontsize=9)
        ax.set_xlabel("ms per image (median, whisker to p90)", fontsize=8)
        for yi, r in zip(y, sel, strict=True):
            if r.get("speed_up"):
                ax.text(r["p90_ms_per_image"], yi, f"  {r['speed_up']:.2f}x", va="center",
                        fontsize=7)
        ax.set_xlim(0, 1.18 * max(r["p90_ms_per_image"] for r in sel))
    fig.tight_layout()
    latency = out / "latency.png"
    fig.savefig(latency, dpi=120)
    plt.close(fig)

    cap = 100.0
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    labels = list(dict.fromkeys(row_label(r) for r in rows))
    groups_order = list(dict.fromkeys((r["steps"], r["batch"]) for r in rows))
    markers = "osD^v<>pXh"
    colors = plt.get_cmap("tab10")
    for r in rows:
        if r.get("speed_up") is None or r["backend"] == REFERENCE:
            continue
        q = r.get("psnr_db")
        q = cap if q is None or q > cap else q
        ax.scatter(r["speed_up"], q, s=36, color=colors(labels.index(row_label(r)) % 10),
                   marker=markers[groups_order.index((r["steps"], r["batch"])) % len(markers)])
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=colors(i % 10), label=label)
               for i, label in enumerate(labels) if not label.startswith(REFERENCE)]
    handles += [Line2D([], [], ls="", marker=markers[i % len(markers)], color="#555555",
                       label=f"{steps} steps, batch {batch}")
                for i, (steps, batch) in enumerate(groups_order)]
    ax.legend(handles=handles, fontsize=7, loc="lower left")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("speed-up against the reference sampler (log scale)")
    ax.set_ylabel(f"PSNR vs PyTorch fp32 (dB, identical shown at {cap:g})")
    ax.axhline(40, color="#cc4444", lw=0.8, ls="--")
    ax.axvline(1, color="#888888", lw=0.8)
    ax.set_title("speed against image change")
    fig.tight_layout()
    quality = out / "speed_quality.png"
    fig.savefig(quality, dpi=120)
    plt.close(fig)
    return [latency, quality]
