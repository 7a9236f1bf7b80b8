#!/usr/bin/env python
"""Which int8 quantization settings hold the 40 dB gate, and what each costs, on this CPU.

Protocol: per model, the fp32 graphs are exported once at the model's size; each setting
quantizes copies of them (`deco_export.export.quantize`), and the export gate's own end-to-end
check (`bundle_io.end_to_end_figures`: 10 steps, guidance on, reference CFG mode, with and
without DiT sharing, the worse PSNR of the two against PyTorch fp32 eager) gives the PSNR. Speed:
ms/image of a 10-step fast-CFG generation at batch 1 and one thread through ONNX Runtime, the
fp32 graphs and every setting interleaved over rounds, median of the rounds after a warm-up;
the speed-up is against the fp32 graphs in the same run. The CPU's model and int8 flags head
the output (the int8 kernel ONNX Runtime picks depends on them).

    python scripts/int8_settings.py --cases golden64,default,default-t2i \
        --out docs/eval/int8-settings-avx2.json
    python scripts/int8_settings.py --cases dit-s16-256,dit-b16-256 --settings int8,int8-7bit
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from deco_export.export.quantize import INT8_WEIGHTS, Int8Settings

# `deco export onnx --int8-weights` choices, and the default with one scale per weight tensor.
SETTINGS = {**INT8_WEIGHTS, "int8-7bit-per-tensor": Int8Settings(per_channel=False)}
CASES = ("golden64", "default", "default-t2i", "dit-s16-256", "dit-b16-256")
def build_model(case: str) -> Any:
    from deco_export.bench.cases import case_model
    from deco_export.sources import load_model
    from tests.helpers import GOLDEN_CKPT

    if case in ("default", "default-t2i"):
        return load_model(case)[0]
    return case_model(case, GOLDEN_CKPT, seed=0)


def quantized_copy(fp32_bundle: Path, out: Path, settings: Int8Settings) -> Path:
    """The bundle with each fp32 graph replaced in place by its int8 version (loaded as
    "fp32" with verification off: a study copy, never a bundle anyone ships)."""
    from deco_export.export.quantize import quantize_int8

    shutil.copytree(fp32_bundle, out)
    for path in sorted(out.glob("*.onnx")):
        if path.name != "text_encoder.onnx":
            quantize_int8(path, external_data=False, settings=settings)
    return out


def condition(model: Any, batch: int) -> dict[str, Any]:
    cfg = model.config
    if cfg.is_text_to_image:
        rng = np.random.default_rng(0)
        return {"prompt_embeds": rng.standard_normal((batch, cfg.text_len, cfg.text_dim),
                                                     dtype=np.float32),
                "negative_prompt_embeds": rng.standard_normal((1, cfg.text_len, cfg.text_dim),
                                                              dtype=np.float32)}
    return {"class_labels": [1 % cfg.num_classes] * batch}


def time_rows(model: Any, bundles: dict[str, Path], steps: int, rounds: int) -> dict[str, float]:
    """Median ms/image per row over interleaved rounds (one warm-up each)."""
    import runtimes

    size = model.config.image_size
    pipes = {name: runtimes.load(path, backend="onnxruntime", precision="fp32", verify=False,
                                 intra_op_threads=1) for name, path in bundles.items()}
    cond = condition(model, 1)
    run = {name: (lambda p=p: p.generate(**cond, steps=steps, seed=0, output_type="np",
                                         height=size[0], width=size[1]))
           for name, p in pipes.items()}
    for f in run.values():
        f()
    times: dict[str, list[float]] = {name: [] for name in run}
    for _ in range(rounds):
        for name, f in run.items():
            t0 = time.perf_counter()
            f()
            times[name].append(1000 * (time.perf_counter() - t0))
    for p in pipes.values():
        p.close()
    return {name: statistics.median(ts) for name, ts in times.items()}


def study(case: str, settings: list[str], steps: int, rounds: int, work: Path) -> dict[str, Any]:
    import runtimes
    from deco_export.export.bundle_io import end_to_end_figures
    from deco_export.export.onnx import export_onnx
    from runtimes.sizes import SizeRange

    model = build_model(case)
    size = tuple(model.config.image_size)
    fp32 = work / case / "fp32"
    export_onnx(model, fp32, precisions=("fp32",), image_size=size,
                size_range=SizeRange.fixed(size, model.config.patch_size),
                source={"kind": "study", "case": case})
    bundles = {"fp32": fp32}
    result: dict[str, Any] = {"case": case, "image_size": list(size), "settings": {}}
    for name in settings:
        path = quantized_copy(fp32, work / case / name, SETTINGS[name])
        bundles[name] = path
        pipe = runtimes.load(path, backend="onnxruntime", precision="fp32", verify=False)
        figures = end_to_end_figures(model, pipe, size, 10, 0)
        result["settings"][name] = {"settings": SETTINGS[name].to_dict(),
                                    "psnr_db": round(float(figures["psnr_db"]), 2),
                                    "max_abs_error": float(figures["max_abs_error"])}
        print(f"{case} {name}: {figures['psnr_db']:.1f} dB", flush=True)
    ms = time_rows(model, bundles, steps, rounds)
    result["ms_per_image"] = {k: round(v, 2) for k, v in ms.items()}
    for name in settings:
        result["settings"][name]["speed_up_vs_fp32"] = round(ms["fp32"] / ms[name], 3)
        print(f"{case} {name}: {ms[name]:.1f} ms/image, {ms['fp32'] / ms[name]:.2f}x fp32",
              flush=True)
    return result


def main() -> None:
    from runtimes.cpu import cpu_flags, cpu_model, int8_kernel

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="golden64,default,default-t2i")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    cases = args.cases.split(",")
    settings = args.settings.split(",")
    env = {"cpu": cpu_model(), "int8_kernel": int8_kernel(),
           "flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))}
    print(json.dumps(env), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="int8-study-") as tmp:
        for case in cases:
            results.append(study(case, settings, args.steps, args.rounds, Path(tmp)))
    report = {"environment": env, "steps": args.steps, "rounds": args.rounds,
              "results": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
