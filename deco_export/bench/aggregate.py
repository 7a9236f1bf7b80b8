"""Runs -> rows: medians and p90 per batch x steps, pooled rounds, image change against
the reference row, and the roofline: achieved GFLOP/s (the analytic FLOPs of what the row ran,
`deco_export.flops`, over its median time) and the percentage of this machine's measured GEMM
peak at the row's precision, for the whole generation and for the DiT calls alone."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.sampler import SamplingCost

from ..flops import graph_flops, sampling_flops, text_embedding_flops
from ..machine import roofline as roofline_of
from .catalogue import KINDS, PEAK_PRECISION, RowSpec


def _p90(values: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), 90))


def summarise_run(row: RowSpec, run: Mapping[str, Any]) -> dict[str, Any]:
    """Per-image medians, p90, best run, throughput and the per-stage split of one (batch,
    steps); a text-to-image run's text encoder is a stage of its own, with its share of the
    generation."""
    batch = run["batch"]
    totals = run["seconds"]
    median = statistics.median(totals)
    stages = run["stages"]
    encoder = stages.get("text_encoder")
    other = [t - stages["dit"][i] - stages["decoder"][i] - stages["step"][i]
             - (encoder[i] if encoder else 0.0) for i, t in enumerate(totals)]
    per_image = 1000.0 / batch
    text: dict[str, Any] = {}
    if encoder:
        # The share of the median generation, as the table shows the two medians.
        text = {"text_encoder_ms_per_image": statistics.median(encoder) * per_image,
                "text_encoder_share": statistics.median(encoder) / median if median else 0.0}
    return {
        "backend": row.backend, "precision": row.precision, "cfg_mode": row.cfg_mode,
        "batch": batch, "steps": run["steps"], "nfe": int(run["cost"]["evaluations"]),
        "ms_per_image": median * per_image,
        "p90_ms_per_image": _p90(totals) * per_image,
        "best_ms_per_image": min(totals) * per_image,
        "images_per_s": batch / median if median > 0 else None,
        "seconds_per_run": totals,
        "stages_ms_per_image": {
            "dit": statistics.median(stages["dit"]) * per_image,
            "decoder": statistics.median(stages["decoder"]) * per_image,
            "fused_step": statistics.median(stages["step"]) * per_image,
            "sampler_overhead": statistics.median(other) * per_image,
            **({"text_encoder": text["text_encoder_ms_per_image"]} if text else {}),
        },
        **({"text_encoder_share": text["text_encoder_share"]} if text else {}),
        "first_run_s": run["first_run_s"],
        "calls": run["calls"], "cost": run["cost"],
    }


def roofline_figures(row: Mapping[str, Any], run: Mapping[str, Any],
                     context: Mapping[str, Any]) -> dict[str, Any]:
    """A row's achieved GFLOP/s and % of peak (whole generation, and the DiT calls alone).

    ``context``: the model config, image size, measured peaks and the torch rows' device.
    The percentage is left out where the CPU's peak does not bound the row (a GPU row) or
    where no peak was measured at its precision.
    """
    model, (height, width) = context["model"], context["image_size"]
    cost = SamplingCost.from_dict(run["cost"])  # a worker's JSON record
    kind = KINDS[row["backend"]]
    on_cpu = kind.on_cpu and (not kind.runs_checkpoint or context.get("device", "cpu") == "cpu")
    peak_precision = PEAK_PRECISION.get(row["precision"], "fp32")
    peak = (context.get("peaks") or {}).get(peak_precision, {}).get("gflops") if on_cpu else None
    total = sampling_flops(model, cost, height, width)
    whole = roofline_of(total, statistics.median(run["seconds"]), peak)
    # The once-per-generation text embedding is timed in the DiT stage.
    dit_flops = (cost.dit_samples * graph_flops(model, "dit", 1, height, width)
                 + text_embedding_flops(model, cost, height, width))
    dit_s = statistics.median(run["stages"]["dit"])
    dit = roofline_of(dit_flops, dit_s, peak) if dit_s > 0 else {"gflops": None,
                                                                "percent_of_peak": None}
    return {"gflop_per_image": total / run["batch"] / 1e9, "gflops": whole["gflops"],
            "percent_of_peak": whole["percent_of_peak"], "dit_gflops": dit["gflops"],
            "dit_percent_of_peak": dit["percent_of_peak"],
            "peak_precision": peak_precision if peak else None}


def _quality(reference: np.ndarray, images: np.ndarray) -> dict[str, float | None]:
    from ..parity import finite, max_abs_error, psnr

    return {"max_abs_error": max_abs_error(reference, images),
            "psnr_db": finite(psnr(reference, images, data_range=2.0))}


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One worker result from several rounds: timed runs pooled, per-round medians kept (their
    spread shows how noisy the machine was), load times and peak memory from every round."""
    first = rounds[0]
    ok = [r for r in rounds if r.get("status") == "ok"]
    if first.get("status") != "ok" or len(rounds) == 1:
        return first
    merged = dict(first)
    merged["rounds"] = len(ok)
    failed = [r.get("reason", "") for r in rounds if r.get("status") != "ok"]
    if failed:
        merged["round_failures"] = failed
    runs = []
    for i, run in enumerate(first["runs"]):
        per = [r["runs"][i] for r in ok]
        runs.append({**run,
                     "seconds": [t for p in per for t in p["seconds"]],
                     "stages": {k: [v for p in per for v in p["stages"][k]]
                                for k in run["stages"]},
                     "round_median_s": [statistics.median(p["seconds"]) for p in per]})
    merged["runs"] = runs
    merged["load"] = {"cold_s": statistics.median(r["load"]["cold_s"] for r in ok),
                      "warm_s": statistics.median(r["load"]["warm_s"] for r in ok),
                      "cold_s_per_round": [r["load"]["cold_s"] for r in ok]}
    merged["memory"] = {**first["memory"],
                        "peak_rss_mib": max(r["memory"].get("peak_rss_mib") or 0 for r in ok)}
    return merged


def assemble_rows(results: list[tuple[RowSpec, dict[str, Any]]], work: Path,
                  roofline: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows ordered by (steps, batch) then backend order, the reference leading each group,
    with speed-up and image change against that group's reference row; with ``roofline``
    (see `roofline_figures`) also the achieved GFLOP/s and % of peak."""
    ref_result = results[0][1]
    reference = {(r["steps"], r["batch"]): r for r in ref_result["runs"]}
    rows = []
    for spec, result in results:
        if result.get("status") != "ok":
            continue
        for run in result["runs"]:
            row = summarise_run(spec, run)
            if roofline is not None and roofline.get("image_size"):
                row.update(roofline_figures(row, run, roofline))
            ref_run = reference.get((run["steps"], run["batch"]))
            if ref_run is not None:
                ref_ms = 1000.0 * statistics.median(ref_run["seconds"]) / run["batch"]
                row["speed_up"] = ref_ms / row["ms_per_image"] if row["ms_per_image"] else None
                row["speed_up_best"] = min(ref_run["seconds"]) / min(run["seconds"])
                if "round_median_s" in run and "round_median_s" in ref_run:
                    # With rounds, the headline is the median of the per-round ratios: each is
                    # measured minutes apart at most, so slow load drifts cancel in it.
                    per_round = [a / b for a, b in zip(ref_run["round_median_s"],
                                                       run["round_median_s"], strict=False)]
                    row["speed_up_per_round"] = per_round
                    row["speed_up_pooled"] = row["speed_up"]
                    row["speed_up"] = statistics.median(per_round)
                row.update(_quality(np.load(work / ref_run["images"]),
                                    np.load(work / run["images"])))
            row["load_s"] = result["load"]
            row["peak_rss_mib"] = result["memory"].get("peak_rss_mib")
            gpu = result["memory"].get("gpu_peak_mib", result["memory"].get("gpu_mib_at_end"))
            if gpu is not None:
                row["gpu_memory_mib"] = gpu
            rows.append(row)
    order = {spec.key: i for i, (spec, _) in enumerate(results)}
    rows.sort(key=lambda r: (r["steps"], r["batch"],
                             order[RowSpec(r["backend"], r["precision"], r["cfg_mode"]).key]))
    return rows
