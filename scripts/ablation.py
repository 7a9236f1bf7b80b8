"""Does decoupling pay? DeCo against a plain pixel DiT at equal compute, by one command.

Three arms, trained with the same data, seed, batch, steps and learning rate:

* ``dit``: the plain pixel DiT with N + 2 blocks (``--model baseline``), flow matching alone;
* ``deco``: DeCo with N DiT blocks + the pixel decoder, flow matching + frequency-aware loss;
* ``deco-nofreq``: the same DeCo with the frequency loss off.

Each arm trains in its own process (``--threads`` each), checkpoints every ``--ckpt-every``
steps, then scores its checkpoints with FID and KID against the held-out split: the last
checkpoint with ``--num-samples``, the earlier ones with ``--curve-samples`` (cheaper), all with
the same labels and the same per-sample noise across arms. ``report`` adds a paired bootstrap of
the KID difference (DeCo arm minus baseline) and writes docs/eval/ablation.json and the plots
and sample grids under docs/img/ that docs/ablation.md shows.

Everything is resumable: rerunning the command continues unfinished trainings from their last
checkpoint (the trainer's ``--resume``) and skips finished evaluations.

    python scripts/ablation.py all --out runs/ablation            # train, evaluate, report
    python scripts/ablation.py arm deco --out runs/ablation        # one arm (what ``all`` runs)
    python scripts/ablation.py report --out runs/ablation          # tables and plots only
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see training/cli.py

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]

ARMS: dict[str, dict[str, Any]] = {
    "dit": {"label": "plain pixel DiT (N+2 blocks)", "baseline": True, "freq_weight": 0.0},
    "deco": {"label": "DeCo (N blocks + decoder)", "baseline": False, "freq_weight": 1.0},
    "deco-nofreq": {"label": "DeCo, no frequency loss", "baseline": False, "freq_weight": 0.0},
}
BASELINE_ARM = "dit"
GRID_PER_CLASS = 4
GRID_SEED = 10_000  # noise of the sample grids, disjoint from the evaluation seeds 0..N-1


@dataclasses.dataclass
class Plan:
    """The settings every arm shares; saved as ``<out>/plan.json`` and checked on rerun."""

    preset: str = "DeCo-T/4"
    data: str = "emoji"
    steps: int = 300
    ckpt_every: int = 50
    eval_every: int = 150
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 100
    ema_decay: float = 0.99
    seed: int = 0
    num_samples: int = 1000
    curve_samples: int = 100
    sample_steps: int = 50
    cfg: float = 3.2
    threads: int = 1

    def eval_points(self) -> list[int]:
        """Curve points: every ``eval_every`` steps and the last step."""
        points = set(range(self.eval_every, self.steps + 1, self.eval_every)) | {self.steps}
        return sorted(points)

    def samples_at(self, step: int) -> int:
        return self.num_samples if step == self.steps else self.curve_samples


def arm_preset(plan: Plan, arm: str) -> str:
    from deco_export.config import baseline_preset

    return baseline_preset(plan.preset) if ARMS[arm]["baseline"] else plan.preset


def train_config(plan: Plan, arm: str, out: Path):
    from training.trainer import TrainConfig

    return TrainConfig(
        preset=arm_preset(plan, arm), data=plan.data, out=str(out / arm), steps=plan.steps,
        batch_size=plan.batch_size, lr=plan.lr, warmup_steps=plan.warmup_steps,
        ema_decay=plan.ema_decay, freq_weight=ARMS[arm]["freq_weight"], seed=plan.seed,
        device="cpu", threads=plan.threads, log_every=25, sample_every=0,
        ckpt_every=plan.ckpt_every, keep_checkpoints=0, progress=False,
        # The trainer's own end-of-run grid, kept cheap; the evaluated grids use 50 steps.
        sample_steps=8, sample_per_class=2,
    )  # fmt: skip


def load_plan(out: Path, given: Plan | None) -> Plan:
    """The run's plan; a rerun may lengthen ``steps`` and change evaluation sizes only."""
    path = out / "plan.json"
    if not path.is_file():
        if given is None:
            raise click.ClickException(f"{path} is missing; start the run with 'all' first")
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(given), indent=1) + "\n")
        return given
    saved = Plan(**json.loads(path.read_text()))
    if given is None:
        return saved
    free = {"steps", "ckpt_every", "eval_every", "num_samples", "curve_samples", "threads"}
    for f in dataclasses.fields(Plan):
        if f.name not in free and getattr(saved, f.name) != getattr(given, f.name):
            raise click.ClickException(
                f"{out} was started with {f.name}={getattr(saved, f.name)!r}, not "
                f"{getattr(given, f.name)!r}; use the same settings or another --out"
            )
    path.write_text(json.dumps(dataclasses.asdict(given), indent=1) + "\n")
    return given


# ------------------------------------------------------------------------------------------------
# One arm: train (resumable), then evaluate its checkpoints
# ------------------------------------------------------------------------------------------------


def run_training(plan: Plan, arm: str, out: Path) -> None:
    import torch

    from training.state import latest_checkpoint
    from training.trainer import train

    torch.set_num_threads(plan.threads)
    cfg = train_config(plan, arm, out)
    latest = latest_checkpoint(out / arm / "checkpoints")
    if latest is not None and int(json.loads((latest / "state.json").read_text())["step"]) >= (
        plan.steps
    ):
        print(f"[{arm}] training finished earlier ({latest.name})", flush=True)
        return
    print(f"[{arm}] training {cfg.preset} to step {plan.steps}", flush=True)
    train(cfg, resume=latest is not None)


CHUNK = 50  # samples per evaluation unit: the unit of progress and of resuming


def chunk_path(out: Path, arm: str, step: int, index: int) -> Path:
    return out / arm / "eval" / f"step_{step:07d}" / f"chunk_{index:04d}.npz"


def eval_labels(plan: Plan, real_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The labels of samples 0..num_samples-1, the same for every arm and checkpoint.

    The held-out class mix for ``num_samples``, shuffled with a fixed seed, so that every prefix
    (a checkpoint scored on fewer samples, or a run cut short) keeps about the same mix and is
    the same prefix in every arm.
    """
    from training.metrics import proportional_labels

    labels = proportional_labels(real_labels, plan.num_samples, num_classes)
    return labels[np.random.default_rng(plan.seed).permutation(len(labels))]


def work_order(plan: Plan) -> list[tuple[int, int]]:
    """(step, chunk) units in the order they are done.

    The last checkpoint's first ``curve_samples`` come first, then every earlier checkpoint's
    ``curve_samples`` (the curves), then the rest of the last checkpoint: a run stopped at any
    point has its curves and the longest common prefix of the final samples.
    """
    last, n_curve = plan.steps, -(-plan.curve_samples // CHUNK)
    order = [(last, i) for i in range(n_curve)]
    order += [(s, i) for s in plan.eval_points() if s != last for i in range(n_curve)]
    order += [(last, i) for i in range(n_curve, -(-plan.num_samples // CHUNK))]
    return order


def evaluate_arm(plan: Plan, arm: str, out: Path) -> None:
    """Generate and score the arm's checkpoints chunk by chunk (see :func:`work_order`).

    Sample i has label ``eval_labels[i]`` and noise from seed i in every arm (training.metrics
    .generate), so the arms' samples are paired. Each chunk stores its Inception features;
    FID and KID are computed over chunks by ``report``.
    """
    import torch

    from deco_export.config import get_preset
    from runtimes.image import save_grid
    from training.metrics import (
        HeldOutScorer,
        generate,
        inception_features,
        load_generator,
    )
    from training.sample import grid_labels

    torch.set_num_threads(plan.threads)
    ckpts = out / arm / "checkpoints"
    todo = [(s, i) for s, i in work_order(plan)
            if not chunk_path(out, arm, s, i).is_file() and (ckpts / f"step_{s:07d}").is_dir()]
    if not todo:
        return
    scorer = HeldOutScorer(plan.data, get_preset(arm_preset(plan, arm)).image_size, device="cpu")
    models: dict[int, torch.nn.Module] = {}
    labels_all = None
    for step, index in todo:
        t0 = time.time()
        if step not in models:
            models.clear()
            models[step] = load_generator(ckpts / f"step_{step:07d}", "cpu")
        model = models[step]
        if labels_all is None:
            labels_all = eval_labels(plan, scorer.real_labels, model.config.num_classes)
        lo, hi = index * CHUNK, min((index + 1) * CHUNK, plan.num_samples)
        images = generate(model, labels_all[lo:hi], num_steps=plan.sample_steps,
                          cfg_scale=plan.cfg, seed=lo, batch_size=CHUNK)
        t_gen = time.time() - t0
        feats = inception_features(scorer.net, images, batch_size=CHUNK)
        path = chunk_path(out, arm, step, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, features=feats.astype(np.float32), labels=labels_all[lo:hi],
                 generate_s=t_gen, eval_s=time.time() - t0)
        tmp.replace(path)
        print(f"[{arm}] step {step} samples {lo}-{hi}: {time.time() - t0:.0f} s", flush=True)
        if step == plan.steps and index == 0 and not (out / arm / "grid.png").is_file():
            glabels = grid_labels(model.config.num_classes, GRID_PER_CLASS).numpy()
            grid = generate(model, glabels, num_steps=plan.sample_steps, cfg_scale=plan.cfg,
                            seed=GRID_SEED, batch_size=CHUNK)
            save_grid(grid, out / arm / "grid.png", cols=GRID_PER_CLASS, scale=2, pad_value=255)


def read_features(out: Path, arm: str, step: int, limit: int) -> np.ndarray | None:
    """Features of the arm's samples 0..n-1 at ``step`` for the longest complete prefix of
    chunks, at most ``limit`` samples (None when there is none)."""
    parts, index = [], 0
    while index * CHUNK < limit and chunk_path(out, arm, step, index).is_file():
        with np.load(chunk_path(out, arm, step, index)) as d:
            parts.append(d["features"].astype(np.float64))
        index += 1
    if not parts:
        return None
    return np.concatenate(parts)[:limit]


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def throughput(plan: Plan, out: Path, arm: str) -> tuple[float | None, float | None]:
    """(median training images/s, training wall seconds) from the run's log.

    Each record's rate covers the steps since the previous record, so the wall time is the sum
    of steps x batch / rate over the records: optimizer steps only, without process start-up,
    checkpoints or the steps a restart redid (the log keeps one record per step range).
    """
    log = out / arm / "log.jsonl"
    if not log.is_file():
        return None, None
    recs = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    if not recs:
        return None, None
    wall, prev = 0.0, 0
    for r in recs:
        wall += (r["step"] - prev) * plan.batch_size / r["img_per_s"]
        prev = r["step"]
    return float(np.median([r["img_per_s"] for r in recs])), wall


def score(feats: np.ndarray, real: np.ndarray) -> dict[str, float]:
    from training.metrics import fid_from_features, kid_from_features

    kid, kid_std = kid_from_features(feats, real)
    return {"fid": fid_from_features(feats, real), "kid": kid, "kid_std": kid_std,
            "num_samples": len(feats)}


def collect(plan: Plan, out: Path) -> dict[str, Any]:
    """Scores over the samples every arm has: the curves on ``curve_samples`` per checkpoint,
    the last checkpoint on the longest prefix all arms completed (``num_samples`` when done)."""
    from deco_export import machine
    from deco_export.config import get_preset
    from deco_export.flops import TRAINING_FACTOR, training_flops
    from runtimes.cache import cache_dir as default_cache_dir
    from training.metrics import HeldOutScorer, paired_kid_bootstrap, real_features

    size = get_preset(plan.preset).image_size
    try:  # the features the arms cached; the Inception is loaded only when they are missing
        real = real_features(plan.data, size, None, None, cache_dir=default_cache_dir())[0]
    except TypeError:  # not cached: no network was given to compute them
        real = HeldOutScorer(plan.data, size, device="cpu").real
    final = {arm: read_features(out, arm, plan.steps, plan.num_samples) for arm in ARMS}
    done = [f for f in final.values() if f is not None]
    n_final = min(len(f) for f in done) if len(done) == len(ARMS) else 0
    result: dict[str, Any] = {
        "plan": dataclasses.asdict(plan), "final_samples": n_final, "num_real": len(real),
        "arms": {}, "cpu": machine.cpu_description(),
    }  # fmt: skip
    for arm, spec in ARMS.items():
        cfg = get_preset(arm_preset(plan, arm))
        img_per_s, wall = throughput(plan, out, arm)
        curve = []
        for step in plan.eval_points():
            feats = read_features(out, arm, step, plan.curve_samples)
            if feats is not None and len(feats) == plan.curve_samples:
                curve.append({"step": step, **score(feats, real)})
        rec = {
            "label": spec["label"], "preset": arm_preset(plan, arm),
            "freq_weight": spec["freq_weight"], "config": cfg.to_dict(),
            "parameters": _num_parameters(cfg),
            "forward_flops": training_flops(cfg, *cfg.image_size) // TRAINING_FACTOR,
            "train_flops_per_image": training_flops(cfg, *cfg.image_size),
            "train_img_per_s": img_per_s, "train_wall_s": wall,
            "curve": curve,
        }  # fmt: skip
        if n_final:
            rec["final"] = {"step": plan.steps, **score(final[arm][:n_final], real)}
        result["arms"][arm] = rec
    if n_final:
        base = final[BASELINE_ARM][:n_final]
        for arm in ARMS:
            if arm != BASELINE_ARM:
                boot = paired_kid_bootstrap(final[arm][:n_final], base, real)
                result["arms"][arm]["kid_vs_baseline"] = boot
                result["arms"][arm]["kid_boot_se"] = boot["se_a"]
                result["arms"][BASELINE_ARM]["kid_boot_se"] = boot["se_b"]
        # What the frequency-aware loss adds: DeCo with it against DeCo without it.
        result["kid_freq_loss"] = paired_kid_bootstrap(
            final["deco"][:n_final], final["deco-nofreq"][:n_final], real
        )
    return result


def _num_parameters(cfg) -> int:
    from deco_export.model import build_model

    return build_model(cfg).num_parameters()


def plot_curves(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for rec in result["arms"].values():
        if not rec["curve"]:
            continue
        steps = [c["step"] for c in rec["curve"]]
        axes[0].plot(steps, [c["fid"] for c in rec["curve"]], "o-", label=rec["label"])
        axes[1].errorbar(steps, [c["kid"] * 1e3 for c in rec["curve"]],
                         yerr=[c["kid_std"] * 1e3 for c in rec["curve"]], fmt="o-",
                         capsize=3, label=rec["label"])
    plan = result["plan"]
    for ax, name in zip(axes, ("FID", "KID x1e3"), strict=True):
        ax.set_xlabel("training step")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(
        f"{plan['data']} {plan['preset']} vs its plain-DiT baseline: {plan['curve_samples']} "
        "samples per point, the same noise and labels in every arm", fontsize=9
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_report(plan: Plan, out: Path, docs: Path, command: str) -> dict[str, Any]:
    result = collect(plan, out)
    result["command"] = command
    (docs / "eval").mkdir(parents=True, exist_ok=True)
    (docs / "eval" / "ablation.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_curves(result, docs / "img" / "ablation-fid.png")
    for arm in ARMS:
        grid = out / arm / "grid.png"
        if grid.is_file():
            (docs / "img" / f"ablation-{arm}.png").write_bytes(grid.read_bytes())
    return result


def table(result: dict[str, Any]) -> str:
    rows = [
        "| model | params | train GFLOPs/img | train img/s | train wall | FID | KID x1e3 ± se "
        "| KID diff vs baseline x1e3 [95 % CI] |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for arm, r in result["arms"].items():
        last = r.get("final")
        fid = f"{last['fid']:.2f}" if last else "—"
        se = r.get("kid_boot_se", last["kid_std"] if last else None)
        kid = f"{last['kid'] * 1e3:.1f} ± {se * 1e3:.1f}" if last else "—"
        boot = r.get("kid_vs_baseline")
        diff = (f"{boot['diff'] * 1e3:+.1f} [{boot['lo'] * 1e3:+.1f}, {boot['hi'] * 1e3:+.1f}]"
                if boot else "(baseline)" if arm == BASELINE_ARM else "—")
        ips = f"{r['train_img_per_s']:.1f}" if r["train_img_per_s"] else "—"
        wall = f"{r['train_wall_s'] / 60:.0f} min" if r["train_wall_s"] else "—"
        rows.append(
            f"| {r['label']} (`{r['preset']}`) | {r['parameters'] / 1e6:.2f} M "
            f"| {r['train_flops_per_image'] / 1e9:.3f} | {ips} | {wall} | {fid} | {kid} | {diff} |"
        )
    return "\n".join(rows)


def curve_table(result: dict[str, Any]) -> str:
    """FID and KID per checkpoint on the curve samples, one column per arm."""
    arms = result["arms"]
    steps = sorted({c["step"] for r in arms.values() for c in r["curve"]})
    head = "| step | " + " | ".join(f"{r['label']} FID / KID x1e3" for r in arms.values()) + " |"
    rows = [head, "|---:|" + "---:|" * len(arms)]
    for step in steps:
        cells = []
        for r in arms.values():
            c = next((c for c in r["curve"] if c["step"] == step), None)
            cells.append(f"{c['fid']:.1f} / {c['kid'] * 1e3:.1f}" if c else "—")
        rows.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def plan_options(fn):
    defaults = Plan()
    for f in reversed(dataclasses.fields(Plan)):
        value = getattr(defaults, f.name)
        fn = click.option(f"--{f.name.replace('_', '-')}", f.name, default=value,
                          type=type(value), show_default=True)(fn)
    return fn


@click.group()
def cli() -> None:
    """DeCo vs a plain pixel DiT at equal compute (train, evaluate, report)."""


@cli.command()
@click.argument("arm", type=click.Choice(list(ARMS)))
@click.option("--out", required=True, type=click.Path(file_okay=False))
def arm(arm: str, out: str) -> None:
    """Train one arm to the plan's steps (resuming), then evaluate its checkpoints."""
    plan = load_plan(Path(out), None)
    run_training(plan, arm, Path(out))
    evaluate_arm(plan, arm, Path(out))


@cli.command(name="all")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--docs", default=str(REPO / "docs"), show_default=True, type=click.Path())
@plan_options
def run_all(out: str, docs: str, **kw: Any) -> None:
    """Run the three arms in parallel processes, wait, then write the report."""
    plan = load_plan(Path(out), Plan(**kw))
    procs = {}
    for name in ARMS:
        log = open(Path(out) / f"{name}.log", "a")
        env = {**os.environ, "OMP_NUM_THREADS": str(plan.threads), "PYTHONPATH": str(REPO)}
        procs[name] = subprocess.Popen(
            [sys.executable, __file__, "arm", name, "--out", out], stdout=log,
            stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    failed = [name for name, p in procs.items() if p.wait() != 0]
    if failed:
        raise click.ClickException(
            f"arm(s) {', '.join(failed)} failed; see {out}/<arm>.log and rerun the same command"
        )
    command = "python scripts/ablation.py all --out " + out + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in dataclasses.asdict(plan).items()
        if v != getattr(Plan(), k)
    )
    result = write_report(plan, Path(out), Path(docs), command)
    click.echo(table(result) + "\n\n" + curve_table(result))


@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--docs", default=str(REPO / "docs"), show_default=True, type=click.Path())
@click.option("--command", "command", default="", help="the command to record in the JSON")
def report(out: str, docs: str, command: str) -> None:
    """Write docs/eval/ablation.json and the plots from what is evaluated so far."""
    plan = load_plan(Path(out), None)
    result = write_report(plan, Path(out), Path(docs), command)
    click.echo(table(result) + "\n\n" + curve_table(result))


@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--samples", default=96, show_default=True, help="per arm, labels cycling")
def speckles(out: str, samples: int) -> None:
    """Isolated outlier pixels per sample at each arm's last checkpoint (the counter of
    scripts/studies/speckle_study.py; seeds 0..samples-1, the plan's steps and CFG)."""
    import torch

    from training.metrics import generate, load_generator
    from training.metrics import speckles as count

    plan = load_plan(Path(out), None)
    torch.set_num_threads(plan.threads)
    result = {}
    for name in ARMS:
        model = load_generator(Path(out) / name / "checkpoints" / f"step_{plan.steps:07d}", "cpu")
        labels = np.arange(samples) % model.config.num_classes
        images = generate(model, labels, num_steps=plan.sample_steps, cfg_scale=plan.cfg,
                          seed=0, batch_size=CHUNK)
        result[name] = float(np.mean(count(images)))
    click.echo(json.dumps({"samples": samples, "speckles_per_image": result}))


if __name__ == "__main__":
    cli()
