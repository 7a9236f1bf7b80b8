#!/usr/bin/env python
"""Few-step solvers against the release sampler: paired FID/KID, prompt following and ms/image
on ONNX Runtime, for both embedded models (docs/sampling.md).

For each model (``default``, class-conditional; ``default-t2i``, text-to-image) it samples
``--num`` images from the same seeds and conditions with every arm:

* the release sampler at its own step count (the bundle's defaults: c2i Euler 100, CFG 3.2 on
  (0.1, 1]; t2i AB2 25, CFG 4 on (0, 1), shift 3);
* at each NFE of ``--nfe``, each setting of ``--settings``: the bundle's tuned table where it
  has one at that NFE (``deco calibrate BUNDLE --solver --nfe N``), UniPC and AB2 with guidance
  edges (the default), or without them;
* with ``--student``, the same arms of the model's guidance-distilled student, one pass per
  step at the same guidance, paired like the others with the teacher's release images.

Conditions: c2i labels in the held-out class proportions; t2i the first caption (the emoji's
name) of each held-out emoji in turn, encoded once up front with the model's own text encoder
(so the encoder is outside the timing). Images are scored with the FID Inception (pool3)
against the held-out emoji (`training.metrics.HeldOutScorer`): FID, KID, and for every
few-step arm the paired KID difference arm - release with its bootstrap interval
(`paired_kid_bootstrap`, ``--level``; the same samples and held-out images resampled jointly).
Prompt following (t2i): for each image, the rank of its prompted held-out emoji among all the
held-out emoji by cosine similarity of the Inception features; top-1 / top-5.

Time: ms/image is the wall time of the generation calls over the images, on ONNX Runtime at
one intra-op thread (``--threads``), every arm in the same process, interleaved batch by batch
(``--batch``) so the machine's load falls on all arms alike. After every batch the features
and times so far are saved (``--work``/kid-MODEL-NUM.npz) and the JSON is rewritten from them,
so a stopped run leaves a table at a smaller N (for c2i over the first classes only: the
labels are sorted by class, so only a complete run is representative); a rerun resumes from
the saved batches, and a rerun with more arms (a larger ``--nfe``) adds them to a finished run,
paired with its release images; each row records the pass it was timed in (``timed_in_pass``;
times compare within a pass).

    OMP_NUM_THREADS=1 python scripts/studies/solver_kid_study.py --num 300   # the docs run
    OMP_NUM_THREADS=1 python scripts/studies/solver_kid_study.py --models default-t2i \
        --student default-t2i-distilled --grid "release,ab2 e 16,student unipc e 8" \
        --out docs/eval/solver-kid-study-1000.json --plot docs/img/solver-kid-1000.png
                                        # one model of the 1,000-sample run (docs: both merged)
    python scripts/studies/solver_kid_study.py --num 8 --batch 4 --nfe 8 \\
        --work /tmp/ks --out /tmp/ks/out.json --plot /tmp/ks/out.png          # a dry run
    python scripts/studies/solver_kid_study.py --estimate 50                  # cost first
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import runtimes
from deco_export.studies import bundle_for, condition_rows, log, nfe_axes, save_figure
from runtimes.sampler import make_plan, release_sampler

FEW_STEP = (("tuned", {"solver": "tuned"}),
            ("unipc e", {"solver": "unipc", "guidance_edges": True}),
            ("ab2 e", {"solver": "ab2", "guidance_edges": True}),
            ("dpm e", {"solver": "dpm++2m", "guidance_edges": True}),
            ("unipc", {"solver": "unipc", "guidance_edges": False}),
            ("ab2", {"solver": "ab2", "guidance_edges": False}))
STUDENT = "student "  # prefix of the guidance-distilled student's arms


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="default,default-t2i")
    p.add_argument("--work", type=Path, default=Path("runs/solver-study"),
                   help="the fp32 ONNX bundles (with any tuned tables) and the saved batches")
    p.add_argument("--num", type=int, default=1000, help="images per arm")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--nfe", default="6,8,10,16")
    p.add_argument("--settings", default="tuned,unipc e,ab2 e",
                   help="the few-step settings run at each NFE, of: "
                        + ", ".join(label for label, _ in FEW_STEP)
                        + "; a trailing ' sX' samples at shift X instead of the bundle's "
                          "(e.g. 'dpm e s1')")
    p.add_argument("--student", default="",
                   help="an embedded guidance-distilled student of the model (one name per "
                        "model, e.g. 'default-distilled,default-t2i-distilled'): adds the arms "
                        "'student ARM' (one pass per step) for every arm, filtered by --arms")
    p.add_argument("--arms", default="",
                   help="only these arms, e.g. 'release,tuned 8,unipc e 8' (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--level", type=float, default=0.90)
    p.add_argument("--rounds", type=int, default=1000, help="bootstrap rounds")
    p.add_argument("--estimate", type=int, default=0,
                   help="time one batch of this many images per arm, project the cost, stop")
    p.add_argument("--grid", default="",
                   help="also draw the first 8 seeds' images of these arms, one row each, "
                        "into the plot's folder as solver-kid-grid-MODEL.png")
    p.add_argument("--out", type=Path, default=Path("docs/eval/solver-kid-study.json"))
    p.add_argument("--plot", type=Path, default=Path("docs/img/solver-kid.png"))
    return p.parse_args()


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    """'dpm e s1' -> ('dpm e', {..., 'shift': 1.0}): a known setting, optionally at a shift."""
    known = dict(FEW_STEP)
    base, _, last = text.rpartition(" ")
    if base in known and last.startswith("s"):
        try:
            return base, {**known[base], "shift": float(last[1:])}
        except ValueError:
            pass
    if text not in known:
        raise SystemExit(f"unknown --settings {text!r}; choose from {list(known)}, "
                         "optionally followed by ' sX' (shift X)")
    return text, dict(known[text])


def arms(pipe: Any, nfes: list[int], settings: str, only: str, student: bool
         ) -> list[dict[str, Any]]:
    """The release sampler, then each few-step setting at each NFE, then (with a student) the
    same arms of the guidance-distilled student: name, settings, NFE."""
    chosen = [s.strip() for s in settings.split(",") if s.strip()]
    parsed = {label: parse_setting(label) for label in chosen}
    shift = pipe.sampler_config().shift
    tables = {(t.nfe, t.shift) for t in (pipe.manifest.solver_tables or {}).values()}
    out = [{"arm": "release", "setting": "release", "settings": {},
            "nfe": make_plan(pipe.sampler_config()).num_evaluations}]
    for n in nfes:
        for label in chosen:
            base, kw = parsed[label]
            if base == "tuned" and (n, kw.get("shift", shift)) not in tables:
                continue
            config = pipe.sampler_config(steps=n, solver=kw["solver"], shift=kw.get("shift"),
                                         guidance_edges=kw.get("guidance_edges"))
            out.append({"arm": f"{label} {n}", "setting": label, "settings": {**kw, "steps": n},
                        "nfe": make_plan(config).num_evaluations})
    if student:  # the student's own tables are not the teacher's: no tuned arms
        out += [{**a, "arm": STUDENT + a["arm"], "setting": STUDENT + a["setting"]}
                for a in out if not a["setting"].startswith("tuned")]
    wanted = {a.strip() for a in only.split(",") if a.strip()}
    return [a for a in out if not wanted or a["arm"] in wanted]


def conditions(pipe: Any, name: str, scorer: Any, num: int) -> dict[str, Any]:
    """``generate`` keywords per image (labels, or prompt embeddings) and, for t2i, the index
    of each image's prompted emoji among the scorer's held-out features."""
    cfg = pipe.model_config
    if not cfg.is_text_to_image:
        return {"class_labels": np.asarray(scorer.labels(num, cfg.num_classes), np.int64)}
    from deco_export.sampling import open_pipeline
    from deco_export.studies import held_out_prompts

    prompts, target = held_out_prompts(len(scorer.real), tuple(cfg.image_size), num)
    encoder = open_pipeline(name).text_encoder
    return {"prompt_embeds": np.asarray(encoder.encode(prompts), np.float32),
            "negative_prompt_embeds": np.asarray(encoder.encode([""]), np.float32),
            "target": target, "prompts": prompts}


def generate(pipe: Any, cond: dict[str, Any], start: int, stop: int,
             settings: dict[str, Any]) -> tuple[np.ndarray, float]:
    """uint8 images of rows start..stop (seeds start..stop - 1) and the call's wall time."""
    part = condition_rows({k: v for k, v in cond.items() if k not in ("target", "prompts")},
                          start, stop)
    t0 = time.perf_counter()
    out = pipe.generate(**part, seed=list(range(start, stop)), output_type="uint8", **settings)
    return np.asarray(out.images), time.perf_counter() - t0


class OnnxInception:
    """The scorer's FID Inception run through ONNX Runtime (one thread): the same pool3
    features (checked against the TorchScript network on the first batch it sees) at about
    1.6x its speed on this CPU, called as the TorchScript module is by `inception_features`."""

    def __init__(self, net: Any, path: Path, threads: int) -> None:
        import onnxruntime as ort
        import torch

        if not path.is_file():
            tmp = path.with_suffix(".tmp.onnx")
            torch.onnx.export(net, (torch.zeros(2, 3, 299, 299),), str(tmp), input_names=["x"],
                              output_names=["f"], dynamic_axes={"x": {0: "b"}, "f": {0: "b"}},
                              opset_version=17, dynamo=False)
            tmp.rename(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.net: Any = net  # the reference until the first batch has been compared

    def __call__(self, x: Any) -> Any:
        import torch

        out = torch.from_numpy(self.session.run(None, {"x": x.numpy()})[0])
        if self.net is not None:
            with torch.no_grad():
                gap = float((self.net(x) - out).abs().max())
            if gap > 1e-3:
                raise SystemExit(f"ONNX Runtime's Inception features differ by {gap:.2e}")
            self.net = None
        return out


def score(state: dict[str, Any], real: np.ndarray, target: np.ndarray | None, level: float,
          rounds: int, num: int, earlier: dict[str, dict[str, Any]] | None = None
          ) -> list[dict[str, Any]]:
    """One row per arm that has images, from the saved features and times: each arm at its
    own count, paired with the release's images of the same seeds (FID and the full bootstrap
    once an arm has all ``num``; ``rounds`` // 5 before). A complete arm's row in ``earlier``
    (the report's, by arm) is kept as it is rather than bootstrapped again, so adding an arm
    to a finished run costs its own images only."""
    from training.metrics import (
        fid_from_features,
        kid_from_features,
        paired_kid_bootstrap,
        prompt_following,
    )

    rows = []
    for arm in state["arms"]:
        done = min(state["counted"][arm["arm"]], state["counted"]["release"])
        if done < 2:
            continue
        kept = (earlier or {}).get(arm["arm"])
        if kept is not None and done >= num and kept.get("num_samples") == done:
            rows.append(kept)
            continue
        f = state["feats"][arm["arm"]][:done]
        kid, kid_std = kid_from_features(f, real, num_subsets=100)
        row = {**{k: arm[k] for k in ("arm", "setting", "settings", "nfe")},
               "num_samples": done, "kid": kid, "kid_std": kid_std,
               "ms_per_image": 1000 * state["seconds"][arm["arm"]] / state["counted"][arm["arm"]],
               "timed_in_pass": next(i for i, names in enumerate(state["passes"])
                                     if arm["arm"] in names)}
        if done >= num:
            row["fid"] = fid_from_features(f, real)
        if arm["arm"] != "release":
            row["kid_diff_vs_release"] = paired_kid_bootstrap(
                f, state["feats"]["release"][:done], real, level=level,
                rounds=rounds if done >= num else max(rounds // 5, 1))
        if target is not None:
            row["follow"] = {k: v for k, v in prompt_following(f, real, target[:done]).items()
                             if k in ("top1", "top5")}
        rows.append(row)
    release_ms = rows[0]["ms_per_image"]
    for row in rows:
        row["time_vs_release"] = row["ms_per_image"] / release_ms
    return rows


def study(name: str, args: argparse.Namespace, report: dict[str, Any]) -> dict[str, Any]:
    from deco_export.machine import cpu_description
    from training.metrics import HeldOutScorer, inception_features

    bundle = bundle_for(name, args.work)
    pipe = runtimes.load(bundle, backend="onnxruntime", intra_op_threads=args.threads)
    cfg = pipe.model_config
    release = release_sampler(cfg.family)
    if pipe.sampler_defaults != release:
        raise SystemExit(f"{bundle}'s sampler defaults are not the release sampler {release}")
    scorer = HeldOutScorer("emoji", tuple(cfg.image_size), device="cpu")
    features = OnnxInception(scorer.net, args.work / "inception.onnx", args.threads)
    num = args.estimate or args.num
    cond = conditions(pipe, name, scorer, num)
    target = cond.get("target")
    students = dict(zip(args.models.split(","), args.student.split(","), strict=False))
    student = None
    if students.get(name):
        student = runtimes.load(bundle_for(students[name], args.work), backend="onnxruntime",
                                intra_op_threads=args.threads)
        if not student.model_config.guidance_distilled:
            raise SystemExit(f"{students[name]} is not guidance-distilled")
        if student.sampler_defaults != release:
            raise SystemExit(f"{students[name]}'s sampler defaults are not the release sampler")
    plan = arms(pipe, [int(v) for v in args.nfe.split(",") if v], args.settings, args.arms,
                student is not None)
    pipes = {a["arm"]: student if a["arm"].startswith(STUDENT) else pipe for a in plan}
    store = args.work / f"kid-{name}-{num}.npz"
    state: dict[str, Any] = {"arms": plan, "feats": {a["arm"]: np.zeros((0, 2048)) for a in plan},
                             "seconds": {a["arm"]: 0.0 for a in plan},
                             "counted": {a["arm"]: 0 for a in plan}, "feature_seconds": 0.0}
    state["passes"] = []
    if store.is_file() and not args.estimate:  # resume, and add arms to a finished run
        saved = np.load(store, allow_pickle=False)
        meta = json.loads(str(saved["meta"]))
        for i, arm in enumerate(meta["arms"]):
            if arm["arm"] not in state["feats"]:
                raise SystemExit(f"{store} holds the arm {arm['arm']!r}: ask for it too")
            state["feats"][arm["arm"]] = saved[f"f{i}"]
            for key in ("seconds", "counted"):
                state[key][arm["arm"]] = meta[key][arm["arm"]]
        state["feature_seconds"] = meta["feature_seconds"]
        state["passes"] = meta.get("passes", [[a["arm"] for a in meta["arms"]]])
        log(f"{name}: resuming at {state['counted']}")
    # Arms started in this process are timed together, interleaved batch by batch.
    state["passes"].append([a["arm"] for a in plan if state["counted"][a["arm"]] < num])
    result: dict[str, Any] = {
        "model": name, "family": cfg.family, "bundle_defaults": release.to_dict(),
        "conditions": ("held-out class proportions" if target is None else
                       "held-out emoji names in turn (first caption), encoded once"),
        "num_real": len(scorer.real), "cpu": cpu_description(), "threads": args.threads,
        "runtime": "onnxruntime fp32", "batch": args.batch, "level": args.level,
        "tables": {str(t.nfe): {"fit": dict(t.fit), "heldout_psnr_db": t.heldout.get("psnr_db")}
                   for t in (pipe.manifest.solver_tables or {}).values()},
        "student": students.get(name) or None, "loadavg_start": os.getloadavg()}
    def record() -> None:
        """Score the arms (a complete row of the report kept as it is) and rewrite the JSON."""
        earlier = {r["arm"]: r for old in report["results"] if old["model"] == name
                   for r in old.get("rows", [])}
        result["rows"] = score(state, scorer.real, target, args.level, args.rounds, num,
                               earlier)
        result["passes"] = state["passes"]
        result["loadavg_end"] = os.getloadavg()
        result["complete"] = min(state["counted"].values()) >= num
        report["results"] = [r for r in report["results"] if r["model"] != name] + [result]
        write(report, args)

    start = min(state["counted"].values())
    while start < num:
        stop = min(start + args.batch, num)
        for arm in plan:  # interleaved: every arm generates this batch before the next one
            if state["counted"][arm["arm"]] >= stop:
                continue
            images, seconds = generate(pipes[arm["arm"]], cond, start, stop, arm["settings"])
            t0 = time.perf_counter()
            f = inception_features(features, images, batch_size=50, device="cpu")
            state["feature_seconds"] += time.perf_counter() - t0
            state["feats"][arm["arm"]] = np.concatenate([state["feats"][arm["arm"]], f])
            state["seconds"][arm["arm"]] += seconds
            state["counted"][arm["arm"]] += stop - start
        start = stop
        if args.estimate:
            break
        meta = {k: v for k, v in state.items() if k != "feats"}
        arrays = {f"f{i}": state["feats"][a["arm"]] for i, a in enumerate(plan)}
        tmp = store.with_suffix(".tmp.npz")
        np.savez(tmp, meta=json.dumps(meta), **arrays)
        tmp.rename(store)
        record()
        shown = ", ".join(f"{r['arm']} {r['kid_diff_vs_release']['diff'] * 1e3:+.1f}"
                          for r in result["rows"][1:])
        log(f"{name}: {start}/{num} images; KID diff x1e-3: {shown}")
    if "rows" not in result and not args.estimate:  # a finished run asked again (--grid)
        record()
    if args.estimate:
        per_image = {a["arm"]: state["seconds"][a["arm"]] / num for a in plan}
        feature = state["feature_seconds"] / (num * len(plan))
        total = sum(per_image.values()) + feature * len(plan)
        log(f"{name}: s/image per arm {json.dumps({k: round(v, 3) for k, v in per_image.items()})}"
            f"; features {feature:.3f} s/image; {total:.2f} s per image of every arm: "
            f"{args.num} images take {total * args.num / 60:.1f} min")
        result["estimate"] = {"seconds_per_image": per_image, "feature_seconds": feature,
                              "minutes_for_num": total * args.num / 60}
    if args.grid:
        draw_grid(name, [a for a in plan if a["arm"] in args.grid.split(",")], pipes, cond,
                  args.plot.parent / f"solver-kid-grid-{name}.png", min(8, num))
    for p in {id(p): p for p in pipes.values()}.values():
        p.close()
    return result


def draw_grid(name: str, chosen: list[dict[str, Any]], pipes: dict[str, Any],
              cond: dict[str, Any], path: Path, count: int = 8) -> None:
    """The first ``count`` seeds of each chosen arm, one labelled row per arm: the same noises
    and conditions, so the rows differ only by the sampler (or the student)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(chosen), 1, figsize=(1.1 * count, 1.35 * len(chosen)),
                             squeeze=False)
    for ax, arm in zip(axes[:, 0], chosen, strict=True):
        images, _ = generate(pipes[arm["arm"]], cond, 0, count, arm["settings"])
        ax.imshow(np.concatenate(list(images), axis=1), interpolation="nearest")
        ax.set_title(f"{arm['arm']} ({arm['nfe']} NFE)", fontsize=8, loc="left")
        ax.axis("off")
    fig.suptitle(f"{name}: seeds 0-{count - 1}, the same noise and condition in every row",
                 fontsize=9)
    save_figure(fig, path)


def write(report: dict[str, Any], args: argparse.Namespace) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((args.out, json.dumps(report, indent=1) + "\n"),
                       (args.out.with_suffix(".md"), markdown(report))):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.rename(path)


def markdown(report: dict[str, Any]) -> str:
    """The table docs/sampling.md shows: one row per arm and model."""
    lines = ["| model | setting | NFE | N | FID | KID (x1e-3) | KID - release (x1e-3) "
             "[interval] | top-1 / top-5 | ms/image | time vs release |",
             "|---|---|---:|---:|---:|---:|---|---|---:|---:|"]
    for res in report["results"]:
        for row in res.get("rows", []):
            d = row.get("kid_diff_vs_release")
            diff = (f"{d['diff'] * 1e3:+.1f} [{d['lo'] * 1e3:+.1f}, {d['hi'] * 1e3:+.1f}]"
                    if d else "")
            f = row.get("follow")
            top = f"{f['top1']:.3f} / {f['top5']:.3f}" if f else ""
            fid = f"{row['fid']:.1f}" if "fid" in row else ""
            lines.append(f"| `{res['model']}` | {row['arm']} | {row['nfe']} | "
                         f"{row['num_samples']} | {fid} | {row['kid'] * 1e3:.1f} | {diff} | "
                         f"{top} | {row['ms_per_image']:.0f} | {row['time_vs_release']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """The paired KID difference (setting - release) with its interval against NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in report["results"] if r.get("rows")]
    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 4.6), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        rel = res["rows"][0]
        labels = list(dict.fromkeys(r["setting"] for r in res["rows"][1:]))
        for k, label in enumerate(labels):
            rows = sorted((r for r in res["rows"] if r["setting"] == label
                           and np.isfinite(r["kid_diff_vs_release"]["diff"])),
                          key=lambda r: r["nfe"])
            if not rows:
                continue
            x = np.array([r["nfe"] for r in rows]) * (1 + 0.02 * (k - (len(labels) - 1) / 2))
            d = np.array([[r["kid_diff_vs_release"][q] * 1e3 for q in ("diff", "lo", "hi")]
                          for r in rows])
            ax.errorbar(x, d[:, 0], yerr=[d[:, 0] - d[:, 1], d[:, 2] - d[:, 0]],
                        fmt="--o" if label.startswith(STUDENT) else "-o", ms=4, capsize=3,
                        color=f"C{k}", label=label)
        ax.axhline(0, color="k", lw=1)
        s = res["bundle_defaults"]
        nfe_axes(ax, f"KID(setting) - KID(release) (x1e-3), {res['level']:.0%} interval",
                 f"{res['model']}: against the release {s['solver']} {s['steps']} "
                 f"({rel['nfe']} NFE), {rel['num_samples']} samples", ticks=(6, 8, 10, 16),
                 legend={"fontsize": 8})
    save_figure(fig, path)


def plot_shift(report: dict[str, Any], path: Path) -> bool:
    """Where settings were run at other shifts (' sX'): the paired KID difference against the
    shift, one line per setting and NFE, the bundle's own shift included. False: none were."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple[str, str, int], list[tuple[float, list[float]]]] = {}
    for res in report["results"]:
        own = res["bundle_defaults"]["shift"]
        for row in res.get("rows", []):
            setting = row["setting"].removeprefix(STUDENT)
            if setting == "release":
                continue
            base, kw = parse_setting(setting)
            who = row["setting"][:len(row["setting"]) - len(setting)]  # a student's own line
            d = row["kid_diff_vs_release"]
            lines.setdefault((res["model"], who + base, row["nfe"]), []).append(
                (kw.get("shift", own), [d[q] * 1e3 for q in ("diff", "lo", "hi")]))
    lines = {k: sorted(v) for k, v in lines.items() if len(v) > 1}
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for k, ((model, base, nfe), points) in enumerate(lines.items()):
        x = np.array([p[0] for p in points]) * (1 + 0.015 * k)
        d = np.array([p[1] for p in points])
        ax.errorbar(x, d[:, 0], yerr=[d[:, 0] - d[:, 1], d[:, 2] - d[:, 0]], fmt="-o", ms=4,
                    capsize=3, color=f"C{k}", label=f"{model}: {base} {nfe}")
    ax.axhline(0, color="k", lw=1)
    ax.set_xscale("log")
    ax.set_xticks(sorted({p[0] for v in lines.values() for p in v}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("timestep shift s (s > 1: more steps near noise)")
    ax.set_ylabel("KID(setting) - KID(release) (x1e-3), interval")
    sizes = sorted({r["num_samples"] for res in report["results"] for r in res.get("rows", [])})
    ax.set_title("few-step settings at other shifts against the release sampler, "
                 f"{'/'.join(map(str, sizes))} samples", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def main() -> None:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"study": "few-step solvers against the release sampler",
                              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "results": []}
    if args.out.is_file() and not args.estimate:
        report["results"] = json.loads(args.out.read_text()).get("results", [])
    for name in (n for n in args.models.split(",") if n):
        study(name, args, report)
        if not args.estimate:
            plot(report, args.plot)
            plot_shift(report, args.plot.with_name(f"{args.plot.stem}-shift.png"))
    if not args.estimate:
        log(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
