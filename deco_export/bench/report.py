"""The Markdown report and the table the CLI prints."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .catalogue import REFERENCE

SOLVER_NAMES = {"euler": "Euler", "ab2": "Adams-Bashforth 2", "heun": "Heun",
                "heun_reuse": "Heun (slope reuse)", "ab3": "Adams-Bashforth 3",
                "dpm++2m": "DPM-Solver++ 2M", "unipc": "UniPC (bh2)",
                "table": "coefficient table"}


def _ms(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return ""
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _s(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def _db(row: Mapping[str, Any]) -> str:
    if "max_abs_error" not in row:
        return ""
    if row.get("psnr_db") is None:
        return "identical" if row["max_abs_error"] == 0 else "inf"
    return f"{row['psnr_db']:.1f}"


def _gflops(row: Mapping[str, Any]) -> str:
    return "" if row.get("gflops") is None else f"{row['gflops']:.1f}"


def _percent(row: Mapping[str, Any]) -> str:
    """'% of peak (DiT calls alone)' of a row, '' where no peak bounds it."""
    whole, dit = row.get("percent_of_peak"), row.get("dit_percent_of_peak")
    if whole is None:
        return ""
    return f"{whole:.0f}%" + ("" if dit is None else f" ({dit:.0f}%)")


def peaks_line(env: Mapping[str, Any]) -> str:
    """'GEMM peak fp32 91 GFLOP/s, bf16 205, int8 (reason)' and the CPU flags that matter."""
    flags = env.get("cpu_flags") or {}
    have = [name for name, on in flags.items() if on]
    text = f"CPU flags {', '.join(have) or 'none of ' + ', '.join(flags)}"
    peaks = env.get("gemm_peak") or {}
    if peaks:
        parts = [f"{p} {v['gflops']:.0f}" if v.get("gflops") else f"{p} not measured "
                 f"({v.get('reason', '')})" for p, v in peaks.items()]
        size = next((v["size"] for v in peaks.values() if v.get("size")), None)
        text += (f"; measured GEMM peak (GFLOP/s, {size}^3 products, the best run of a "
                 f"probe before and one after the rows) " + ", ".join(parts))
    return text


def row_label(row: Mapping[str, Any]) -> str:
    cfg = "ref" if row["cfg_mode"] == "reference" else "fast"
    return f"{row['backend']} {row['precision']} ({cfg} CFG)"


def markdown_table(report: Mapping[str, Any]) -> str:
    """The results table (reference row first; unavailable backends last, with the reason).
    A text-to-image report's stage column starts with the text encoder and its share of the
    generation."""
    text = bool(report.get("text"))
    stages = "text encoder (share) / DiT / decoder / other ms" if text else (
        "DiT / decoder / other ms")
    head = ("| backend | precision | CFG | batch | steps (NFE) | ms/image | p90 | images/s "
            f"| speed-up | {stages} | GFLOP/s | % of peak (DiT) | PSNR dB | max abs err "
            "| load s cold / warm | first run s | peak RSS MiB |")
    lines = [head, "|" + "---|" * 3 + "---:|" * 14]
    for r in report["rows"]:
        st = r["stages_ms_per_image"]
        stage = f"{_ms(st['dit'])} / {_ms(st['decoder'])} / {_ms(st['sampler_overhead'])}"
        if st["fused_step"]:
            stage = f"fused step {_ms(st['fused_step'])} / other {_ms(st['sampler_overhead'])}"
        if "text_encoder" in st:
            stage = (f"{_ms(st['text_encoder'])} ({100 * r['text_encoder_share']:.1f}%) / "
                     + stage)
        mem = "" if r.get("peak_rss_mib") is None else f"{r['peak_rss_mib']:.0f}"
        if r.get("gpu_memory_mib") is not None:
            mem += f" (GPU {r['gpu_memory_mib']:.0f})"
        speed = "" if r.get("speed_up") is None else f"{r['speed_up']:.2f}x"
        spread = r.get("speed_up_per_round") or []
        if len(spread) > 1 and r["backend"] != REFERENCE:
            speed += f" ({min(spread):.2f}–{max(spread):.2f})"
        err = "" if "max_abs_error" not in r else f"{r['max_abs_error']:.1e}"
        lines.append(
            f"| {r['backend']} | {r['precision']} | "
            f"{'reference' if r['cfg_mode'] == 'reference' else 'fast'} | {r['batch']} | "
            f"{r['steps']} ({r.get('nfe', r['steps'])}) | {_ms(r['ms_per_image'])} | "
            f"{_ms(r['p90_ms_per_image'])} | "
            f"{r['images_per_s']:.2f} | {speed} | {stage} | {_gflops(r)} | {_percent(r)} | "
            f"{_db(r)} | {err} | "
            f"{_s(r['load_s']['cold_s'])} / {_s(r['load_s']['warm_s'])} | "
            f"{_s(r['first_run_s'])} | {mem} |")
    merged: dict[tuple[str, str, str], list[str]] = {}  # one line per backend and reason
    for u in report["unavailable"]:
        merged.setdefault((u["backend"], u["status"], u["reason"]), []).append(u["precision"])
    for (backend, status, reason), precisions in merged.items():
        lines.append(f"| {backend} | {', '.join(precisions)} | | | | {status}: {reason} |"
                     + " |" * 11)
    return "\n".join(lines) + "\n"


def markdown_report(report: Mapping[str, Any]) -> str:
    """A self-contained Markdown section: what was measured, where, the table, the notes."""
    env, s, model = report["environment"], report["settings"], report["model"]
    gpus = ", ".join(f"{g['name']} (driver {g['driver']})" for g in env.get("gpus") or [])
    libs = env["libraries"]
    size = "x".join(str(v) for v in report.get("image_size") or model.get("image_size") or [])
    bounds = report.get("guidance_bounds") or "(]"
    lines = [
        f"**Model** {report['source']['input']} ({model['hidden_size']} wide, "
        f"{model['dit_depth']} DiT blocks, patch {model['patch_size']}) at {size}; "
        f"**sampler** {SOLVER_NAMES.get(report.get('solver', 'euler'), report.get('solver'))}, "
        f"CFG {report['guidance']} on {bounds[0]}{report['guidance_interval'][0]}, "
        f"{report['guidance_interval'][1]}{bounds[1]}, "
        f"sharing {s['sharing'] or 'off'}; median and p90 of {s['repeats']} runs after "
        f"{s['warmup']} warm-up run(s)"
        + (f", in each of {s['rounds']} interleaved rounds" if s.get("rounds", 1) > 1 else "")
        + "; times per image.",
        "",
        f"**Machine** {env['cpu_model']}, {env.get('cpu_affinity', env['cpu_count'])} usable "
        f"cores, threads {s['threads'] or 'library default'}, "
        f"{'GPU ' + gpus if gpus else 'no GPU'}; {env['os']}; Python {env['python']}, "
        + ", ".join(f"{k} {libs[k]}" for k in ("torch", "onnxruntime", "onnxruntime-gpu",
                                               "openvino", "tensorrt", "coremltools") if k in libs)
        + f". Load average {env.get('load_average_start')} at the start, "
        f"{env.get('load_average_end')} at the end. {peaks_line(env)}.",
        "",
        markdown_table(report),
    ]
    if report.get("text"):
        t = report["text"]
        prompts = "; ".join(f"'{p}'" for p in t["prompts"])
        lines += [f"Text to image: prompts {prompts} (image i of a batch takes prompt i mod "
                  f"{len(t['prompts'])}), encoded once per generation by {t['encoder']} "
                  f"({t['text_len']} tokens x {t['text_dim']}) on every row, the negative "
                  "prompt from the bundle's stored encoding. The text path (y_embedder, "
                  "refine blocks, text keys/values and attention to them) is "
                  f"{100 * t['text_path_flop_share']:.1f}% of a DiT call's matrix-product "
                  "FLOPs at this size (deco_export.flops).", ""]
    load = env.get("load_average_start") or []
    usable = env.get("cpu_affinity", env["cpu_count"]) or 1
    if load and load[0] > usable and not s["threads"]:
        lines += [f"Note: the load average ({load[0]}) exceeded the {usable} usable cores. "
                  "Spinning thread pools (PyTorch's OpenMP, ONNX Runtime's intra-op pool) slow "
                  "down badly on an oversubscribed machine; compare with `--threads 1`.", ""]
    builds = [b for b in report["source"].get("build", []) if b.get("seconds") is not None]
    if builds:
        lines.append("Build: " + "; ".join(
            f"{b['runtime']} {b.get('graph', '')} {b['precision']} {b['seconds']:.1f} s "
            f"({b['status']})".replace("  ", " ") for b in builds) + ".")
        lines.append("")
    lines.append(
        "Speed-up and image change are against the first row of the same batch and steps "
        "(PyTorch eager fp32, both CFG halves every step, as the reference samples). "
        "PSNR is on [-1, 1] images. GFLOP/s: the analytic matrix-product FLOPs of the "
        "generation (deco_export.flops) over its median time; % of peak: against the measured "
        "GEMM peak at the row's precision (fp16 rows against fp32), in brackets the DiT calls "
        "alone.")
    if report.get("fid"):
        lines += ["", fid_table(report["fid"])]
    return "\n".join(lines) + "\n"


def fid_table(fid: Mapping[str, Any]) -> str:
    """FID/KID per backend and precision (``deco bench --fid``)."""
    rows = list(fid["rows"].values())
    real = rows[0]["num_real"] if rows else 0
    lines = [f"FID/KID of {fid['samples']} images per row ({fid['steps']} steps, the held-out "
             f"class mix, the same noise on every row) against {real} held-out "
             f"'{fid['data']}' images, with the offline FID Inception:", "",
             "| backend | precision | CFG | FID | KID x1e3 |", "|---|---|---|---:|---:|"]
    for r in rows:
        cfg = "reference" if r["cfg_mode"] == "reference" else "fast"
        lines.append(f"| {r['backend']} | {r['precision']} | {cfg} | {r['fid']:.2f} | "
                     f"{r['kid'] * 1e3:.2f} ± {r['kid_std'] * 1e3:.2f} |")
    return "\n".join(lines) + "\n"
