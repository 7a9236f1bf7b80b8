"""DiT-sharing schedules: uniform and explicit schedules, StatisticDP, similarity, JSON."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from runtimes.sharing import (
    SharingSchedule,
    SimilarityAccumulator,
    dp_schedule,
    explicit_schedule,
    load_schedule,
    resolve_sharing,
    save_schedule,
    schedule_key,
    segment_cost,
    statistic_dp,
    uniform_schedule,
)


def _random_similarity(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.2, 1.0, size=(n, n))
    s = (s + s.T) / 2
    np.fill_diagonal(s, 1.0)
    return s


def _brute_force(s: np.ndarray, k: int) -> float:
    n = s.shape[0]
    return min(
        segment_cost(s, [0, *rest]) for rest in itertools.combinations(range(1, n), k - 1)
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dp_matches_brute_force(seed):
    s = _random_similarity(8, seed)
    for k in range(1, 9):
        starts = statistic_dp(s, k)
        assert len(starts) == k and starts[0] == 0 and starts == sorted(set(starts))
        assert segment_cost(s, starts) == pytest.approx(_brute_force(s, k), abs=1e-12)


def test_dp_finds_block_starts_and_edge_budgets():
    # Three blocks of steps whose conditions agree within a block and differ across blocks.
    n, starts = 10, [0, 3, 7]
    s = np.full((n, n), 0.1)
    for a, b in itertools.pairwise([*starts, n]):
        s[a:b, a:b] = 0.95
    np.fill_diagonal(s, 1.0)
    assert statistic_dp(s, 3) == starts
    assert statistic_dp(s, 1) == [0]
    assert statistic_dp(s, n) == list(range(n))
    with pytest.raises(ValueError, match="budget K"):
        statistic_dp(s, 0)
    with pytest.raises(ValueError, match="square"):
        statistic_dp(np.ones((3, 4)), 2)


def test_dp_reads_only_the_lower_triangle():
    # S[l, j] with l >= j: similarity of a later step to the segment start.
    s = _random_similarity(7, 5)
    t = s.copy()
    t[np.triu_indices(7, 1)] = -5.0
    assert statistic_dp(s, 3) == statistic_dp(t, 3)


def test_uniform_schedules():
    assert uniform_schedule(10, ratio=0.0).dit_steps == tuple(range(10))
    assert uniform_schedule(10, ratio=0.5).dit_steps == (0, 2, 4, 6, 8)
    assert uniform_schedule(100, ratio=0.75).budget == 25
    s = uniform_schedule(100, ratio=0.8)
    assert s.budget == 20 and s.dit_steps[:3] == (0, 5, 10) and s.ratio == pytest.approx(0.8)
    assert uniform_schedule(10, every=3).dit_steps == (0, 3, 6, 9)
    with pytest.raises(ValueError, match="exactly one"):
        uniform_schedule(10)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        uniform_schedule(10, ratio=1.0)


def test_explicit_schedule_adds_step_zero_and_checks_range():
    assert explicit_schedule([4, 2], 6).dit_steps == (0, 2, 4)
    with pytest.raises(ValueError, match="outside 0..5"):
        explicit_schedule([1, 6], 6)
    with pytest.raises(ValueError, match="made for 6"):
        explicit_schedule([1], 6).mask(7)
    with pytest.raises(ValueError, match="mode"):
        SharingSchedule((0,), 3, mode="stale")


def _naive_similarity(runs: list[list[np.ndarray]]) -> np.ndarray:
    n = len(runs[0])
    total, count = np.zeros((n, n)), 0
    for conds in runs:
        flat = [c.reshape(-1, c.shape[-1]).astype(np.float64) for c in conds]
        flat = [f / np.linalg.norm(f, axis=1, keepdims=True) for f in flat]
        for i, j in itertools.product(range(n), repeat=2):
            total[i, j] += (flat[i] * flat[j]).sum()
        count += flat[0].shape[0]
    return total / count


def test_similarity_accumulator_matches_the_naive_matrix(tmp_path):
    rng = np.random.default_rng(0)
    n = 6
    base = rng.standard_normal((4, 5, 16))
    runs = [[base + 0.3 * i * rng.standard_normal(base.shape) for i in range(n)] for _ in range(2)]
    want = _naive_similarity(runs)
    for kwargs in ({"store_dtype": np.float32, "block": 4},
                   {"store_dtype": np.float32, "spill_dir": tmp_path}):
        acc = SimilarityAccumulator(n, **kwargs)
        for conds in runs:
            for i, c in enumerate(conds):
                acc.add(i, c)
        np.testing.assert_allclose(acc.matrix, want, atol=1e-6)
        assert acc.runs == 2 and acc.tokens == 40
    assert list(tmp_path.iterdir()) == []  # the spill file is removed after each run
    acc = SimilarityAccumulator(n)  # float16 storage
    for i, c in enumerate(runs[0]):
        acc.add(i, c)
    np.testing.assert_allclose(acc.matrix, _naive_similarity(runs[:1]), atol=2e-3)


def test_similarity_accumulator_errors():
    acc = SimilarityAccumulator(3)
    with pytest.raises(ValueError, match="expected the condition of step 0"):
        acc.add(1, np.ones((2, 4)))
    acc.add(0, np.ones((2, 4)))
    with pytest.raises(ValueError, match="cfg_mode='reference'"):
        acc.add(1, np.ones((4, 4)))
    with pytest.raises(ValueError, match="no finished calibration run"):
        _ = SimilarityAccumulator(2).matrix


def test_schedule_json_round_trip_by_key(tmp_path):
    s = _random_similarity(12, 3)
    key = schedule_key("ab" * 32, 12, 1.0, 3.2, 4)
    assert key == "abababababababab-n12-s1-g3.2-k4"
    assert schedule_key("ab", 12, 3.0, 1.0, 4, solver="heun") == "ab-n12-s3-g1-k4-heun"
    sched = dp_schedule(s, 4, mode="fresh_t", key=key)
    path = tmp_path / "schedules.json"
    save_schedule(path, key, sched)
    save_schedule(path, "other", uniform_schedule(12, ratio=0.5))
    loaded = load_schedule(path, key)
    assert loaded == sched and loaded.method == "statistic_dp" and loaded.mode == "fresh_t"
    assert loaded.meta["key"] == key
    assert sorted(json.loads(path.read_text())["schedules"]) == sorted([key, "other"])
    with pytest.raises(KeyError, match="has: "):
        load_schedule(path, "missing")


def test_resolve_sharing_specs():
    assert resolve_sharing(None, 10) is None
    assert resolve_sharing(0.5, 10).dit_steps == (0, 2, 4, 6, 8)
    assert resolve_sharing([0, 5], 10).dit_steps == (0, 5)
    assert resolve_sharing({"every": 5, "mode": "fresh_t"}, 10).mode == "fresh_t"
    assert resolve_sharing({"steps": [3]}, 10).dit_steps == (0, 3)
    stored = {"k": uniform_schedule(10, ratio=0.8).to_dict()}
    assert resolve_sharing("k", 10, stored).dit_steps == (0, 5)
    with pytest.raises(ValueError, match=r"this bundle has: k"):
        resolve_sharing("nope", 10, stored)
    with pytest.raises(ValueError, match="ambiguous"):
        resolve_sharing(True, 10)
