"""Guidance-distilled student against its CFG teacher: paired KID and ms/image on ONNX Runtime.

For each family, both models are exported to ONNX (fp32) and sampled through the same
runtime from the same seeds and conditions, the teacher with classifier-free guidance (two
passes on guided steps) and the student in one pass, at the release guidance and solver, at the
release step count and at a few-step count. KID is against the held-out emoji images; the
difference student - teacher has a paired bootstrap 90% interval (the same samples resampled
jointly). ms/image is the wall time of the generation calls divided by the images, measured
in the same run, arms interleaved batch by batch so machine load affects both alike. For
text-to-image the prompts are encoded once up front (the same embeddings for both arms), so the
text encoder is not in the timing. It produced the distillation table of docs/sampling.md.

    python scripts/studies/distill_study.py --family c2i --teacher default --student S \
        --out OUT.json

``--follow`` (t2i) pairs each prompt with the held-out image it names and adds prompt
following (top-1 / top-5 retrieval of that image by Inception features) for both arms.

``--effective-guidance W1,W2,...`` adds where the student's guidance lands: the student at the
release guidance against the teacher with CFG at each Wi, from the same noises and conditions
at the few-step count (mean squared pixel difference, and each arm's pixel standard deviation,
which guidance raises), so an under- or over-guided student shows as a nearest Wi away from
the release guidance.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from deco_export.studies import condition_rows


def export(source: str, bundle: Path) -> Path:
    if not (bundle / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "deco_export.cli", "export", "onnx", source,
                        str(bundle), "--parity-steps", "4"], check=True)
    return bundle


def conditions(family: str, scorer, n: int, seed: int, follow: bool) -> tuple[dict, Any]:
    """Labels in held-out proportions (c2i) or held-out captions' embeddings (t2i), and for
    ``follow`` the position of each prompt's emoji among the scorer's features (the prompts
    are then the held-out captions in the scorer's order, cycled, instead of drawn)."""
    if family == "c2i":
        return {"class_labels": [int(v) for v in scorer.labels(n, 9)]}, None
    from deco_export.studies import held_out_prompts
    from deco_export.text_encoders import minilm_encoder
    from training.captions import load_captioned

    target = None
    if follow:
        prompts, target = held_out_prompts(len(scorer.real), (32, 32), n)
    else:
        captions = load_captioned("emoji", "test", (32, 32)).captions
        rng = np.random.default_rng(seed)
        prompts = [captions[int(i)][0] for i in rng.integers(0, len(captions), n)]
    encoder = minilm_encoder(16)
    embeds = np.asarray(encoder.encode(prompts), dtype=np.float32)
    # The teacher's unconditional half: the empty prompt, as a bundle without a stored negative
    # prompt uses.
    return {"prompt_embeds": embeds,
            "negative_prompt_embeds": np.asarray(encoder.encode([""]), np.float32)}, target


def effective_guidance(pipes: dict[str, Any], cond: dict, num: int, steps: int,
                       guidance: float, scales: list[float]) -> dict[str, Any]:
    """The student at ``guidance`` against the teacher at each of ``scales`` (``num`` images,
    seeds 0..num-1, ``steps`` steps): mean squared difference in [-1, 1] pixels, and each
    arm's pixel standard deviation."""
    part = condition_rows(cond, 0, num)

    def images(arm: str, w: float) -> np.ndarray:
        out = pipes[arm].generate(**part, seed=list(range(num)), steps=steps, guidance=w,
                                  output_type="np")
        return np.asarray(out.images, np.float64)

    student = images("student", guidance)
    compared = []
    for w in scales:
        teacher = images("teacher", w)
        compared.append({"teacher_guidance": w,
                         "mse": float(((teacher - student) ** 2).mean()),
                         "teacher_std": float(teacher.std())})
    return {"student_guidance": guidance, "steps": steps, "num_samples": num,
            "student_std": float(student.std()), "teacher": compared,
            "nearest": min(compared, key=lambda r: r["mse"])["teacher_guidance"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=["c2i", "t2i"], required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--work", required=True, help="directory for the bundles")
    ap.add_argument("--num", type=int, default=200)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--few-steps", type=int, default=10)
    ap.add_argument("--follow", action="store_true",
                    help="t2i: prompts paired with held-out images; adds prompt following")
    ap.add_argument("--effective-guidance", default="",
                    help="teacher guidance scales to compare the student at the release "
                         "guidance with, e.g. 1,2,2.6,3.2,3.8,4.5")
    ap.add_argument("--no-kid", action="store_true",
                    help="only --effective-guidance: no KID settings")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import runtimes
    from deco_export.machine import cpu_description  # the CPU record every study writes
    from runtimes.sampler import release_sampler
    from training.metrics import (
        HeldOutScorer,
        inception_features,
        paired_kid_bootstrap,
        prompt_following,
    )

    work = Path(args.work)
    bundles = {"teacher": export(args.teacher, work / "teacher"),
               "student": export(args.student, work / "student")}
    pipes = {arm: runtimes.load(path, backend="onnxruntime", intra_op_threads=1)
             for arm, path in bundles.items()}
    release = release_sampler(args.family)
    scorer = HeldOutScorer("emoji", (32, 32), device="cpu")
    cond, target = conditions(args.family, scorer, args.num, seed=7, follow=args.follow)
    result: dict = {"family": args.family, "cpu": cpu_description(), "num_samples": args.num,
                    "num_real": len(scorer.real), "guidance": release.guidance,
                    "solver": release.solver, "teacher": args.teacher,
                    "student": args.student, "settings": []}
    if args.effective_guidance:
        result["effective_guidance"] = effective_guidance(
            pipes, cond, min(args.num, 48), args.few_steps, release.guidance,
            [float(w) for w in args.effective_guidance.split(",")])
        print(json.dumps(result["effective_guidance"]), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for steps in () if args.no_kid else (args.few_steps, release.num_steps):  # short first
        images: dict[str, list[np.ndarray]] = {"teacher": [], "student": []}
        seconds = {"teacher": 0.0, "student": 0.0}
        for start in range(0, args.num, args.batch):
            part = condition_rows(cond, start, start + args.batch)
            seeds = list(range(start, min(start + args.batch, args.num)))
            for arm, pipe in pipes.items():
                t0 = time.perf_counter()
                out = pipe.generate(**part, seed=seeds, steps=steps, output_type="uint8")
                seconds[arm] += time.perf_counter() - t0
                images[arm].append(np.asarray(out.images))
        feats = {arm: inception_features(scorer.net, np.concatenate(imgs), device="cpu")
                 for arm, imgs in images.items()}
        boot = paired_kid_bootstrap(feats["student"], feats["teacher"], scorer.real, level=0.90)
        ms = {arm: 1000 * s / args.num for arm, s in seconds.items()}
        row = {"steps": steps, "kid_diff_student_minus_teacher": boot,
               "ms_per_image": ms, "speed_ratio": ms["student"] / ms["teacher"]}
        if target is not None:
            row["follow"] = {arm: {k: v for k, v in prompt_following(f, scorer.real, target)
                                   .items() if k in ("top1", "top5")}
                             for arm, f in feats.items()}
        result["settings"].append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")  # after every row


if __name__ == "__main__":
    main()
