"""The runtime sampler: reference time grid, solvers, CFG modes and DiT sharing."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from runtimes.sampler import (
    SamplerConfig,
    SamplingCost,
    guidance_flags,
    make_plan,
    sample,
    timesteps,
    torch_linspace,
)
from runtimes.sharing import explicit_schedule, uniform_schedule
from tests.helpers import GaussianFlowBackend, SplitGaussianFlowBackend

NULL = 3


def _noise(b: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, 3, 8, 8)).astype(np.float32)


# -- time grid --------------------------------------------------------------------------------


def test_grid_n100_boundary_leaves_eleven_steps_unguided():
    grid = timesteps(100)
    assert grid.dtype == np.float32 and grid.shape == (101,)
    assert grid[0] == 0.0 and grid[-1] == 1.0
    assert grid[10] == np.float32(0.099999994) and grid[10] < np.float32(0.1)
    flags = guidance_flags(grid[:-1], (0.1, 1.0), "(]")
    assert not flags[:11].any() and flags[11:].all() and flags.sum() == 89


def test_grid_matches_torch_linspace_bit_for_bit():
    torch = pytest.importorskip("torch")
    for n in (1, 2, 7, 25, 50, 100, 250):
        for shift in (1.0, 3.0):
            t = torch.linspace(0.0, 1 - 1.0 / n, n)
            t = torch.cat([t, torch.tensor([1.0])])
            ref = (t / (t + (1 - t) * shift)).numpy()
            assert np.array_equal(timesteps(n, shift), ref), (n, shift)
    assert np.array_equal(torch_linspace(0.0, 0.96, 250), torch.linspace(0.0, 0.96, 250).numpy())


def test_grid_shift_last_step_and_explicit_list():
    assert np.all(timesteps(10, shift=3.0)[1:-1] < timesteps(10)[1:-1])  # toward noise
    assert timesteps(250, last_step=0.04)[-2] == np.float32(0.96)
    cfg = SamplerConfig(timesteps=(0.0, 0.25, 0.7, 1.0))
    assert cfg.num_steps == 3 and np.array_equal(cfg.grid(), np.float32([0, 0.25, 0.7, 1]))
    with pytest.raises(ValueError, match="strictly increasing"):
        SamplerConfig(timesteps=(0.0, 0.5, 0.4, 1.0))
    with pytest.raises(ValueError, match="unknown solver"):
        SamplerConfig(solver="dpm")


def test_guidance_bounds_are_selectable_and_default_per_solver():
    t = np.float32([0.1, 0.5, 1.0])
    assert guidance_flags(t, (0.1, 1.0), "(]").tolist() == [False, True, True]
    assert guidance_flags(t, (0.1, 1.0), "()").tolist() == [False, True, False]
    assert guidance_flags(t, (0.1, 1.0), "[]").tolist() == [True, True, True]
    assert SamplerConfig(solver="ab2").bounds == "()"
    assert SamplerConfig(solver="euler").bounds == "(]"


# -- solvers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solver, order", [("euler", 1), ("heun", 2), ("heun_reuse", 2), ("ab2", 2)]
)
def test_solver_converges_at_its_order(solver, order):
    be = GaussianFlowBackend()
    noise, labels = _noise(), [0, 1]
    exact = be.exact(noise, labels)
    errs = []
    for n in (8, 16, 32):
        x = sample(be, noise, labels, SamplerConfig(solver=solver, num_steps=n), null_class=NULL)
        errs.append(np.abs(x - exact).max())
    rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(rates > order - 0.25), (solver, errs)


def test_evaluation_counts_follow_the_reference_samplers():
    n = 10
    assert make_plan(SamplerConfig(solver="euler", num_steps=n)).num_evaluations == n
    assert make_plan(SamplerConfig(solver="ab2", num_steps=n)).num_evaluations == n
    # exact Heun: 2 per step except the last (Euler); reuse mode: about 1 per step
    assert make_plan(SamplerConfig(solver="heun", num_steps=n)).num_evaluations == 2 * n - 1
    assert make_plan(SamplerConfig(solver="heun_reuse", num_steps=n)).num_evaluations == n


def test_ab2_weights_on_a_uniform_grid_and_accumulated_time():
    plan = make_plan(SamplerConfig(solver="ab2", num_steps=8))
    assert plan.coefficients[0] == (0.0, 1.0)
    np.testing.assert_allclose(plan.coefficients[3], (-0.5, 1.5), atol=1e-6)
    acc = make_plan(SamplerConfig(solver="ab2", num_steps=8, shift=3.0, accumulate_time=True))
    t = np.float32(0.0)
    for ev, dt in zip(acc.evaluations, acc.dts, strict=True):
        assert ev.t == t
        t = np.float32(t + np.float32(dt))


def test_callback_reports_every_step():
    seen = []
    cfg = SamplerConfig(num_steps=5)
    sample(GaussianFlowBackend(), _noise(1), [2], cfg, null_class=NULL,
           callback=lambda i, n, t: seen.append((i, n, t)))
    assert [s[0] for s in seen] == list(range(5)) and all(s[1] == 5 for s in seen)
    assert [s[2] for s in seen] == [float(v) for v in timesteps(5)[:-1]]


# -- CFG --------------------------------------------------------------------------------------


def _reference_euler(be, noise, labels, n, w, interval):
    """The reference EulerSampler loop, literally: [uncond; cond] every step."""
    grid = timesteps(n)
    b = len(labels)
    y = np.concatenate([np.full(b, NULL), labels]).astype(np.int64)
    x = noise.copy()
    for i in range(n):
        t_cur, dt = grid[i], grid[i + 1] - grid[i]
        x2 = np.concatenate([x, x])
        t2 = np.full(2 * b, t_cur, np.float32)
        out = be.decoder(x2, be.dit(x2, t2, y))
        u, c = out[:b], out[b:]
        g = w if (t_cur > np.float32(interval[0]) and t_cur <= np.float32(interval[1])) else 1.0
        x = x + (u + g * (c - u)) * dt
    return x


def test_reference_mode_reproduces_the_reference_loop_bit_for_bit():
    be = GaussianFlowBackend()
    noise, labels = _noise(3), np.array([0, 1, 2])
    cfg = SamplerConfig(num_steps=20, guidance=3.2, guidance_interval=(0.1, 1.0),
                        cfg_mode="reference")
    got = sample(be, noise, labels, cfg, null_class=NULL)
    want = _reference_euler(GaussianFlowBackend(), noise, labels, 20, 3.2, (0.1, 1.0))
    assert np.array_equal(got, want)


@pytest.mark.parametrize("solver", ["euler", "heun", "heun_reuse", "ab2"])
def test_fast_and_reference_cfg_agree(solver):
    noise, labels = _noise(2), [0, 2]
    out = {}
    for mode in ("fast", "reference"):
        cfg = SamplerConfig(solver=solver, num_steps=12, guidance=3.0,
                            guidance_interval=(0.3, 1.0), cfg_mode=mode)
        out[mode] = sample(GaussianFlowBackend(), noise, labels, cfg, null_class=NULL)
    np.testing.assert_allclose(out["fast"], out["reference"], atol=1e-5)


def test_fast_cfg_runs_the_unconditional_half_only_inside_the_interval():
    be = GaussianFlowBackend()
    cfg = SamplerConfig(num_steps=100, guidance=3.2, guidance_interval=(0.1, 1.0))
    sample(be, _noise(2), [0, 1], cfg, null_class=NULL)
    dit = be.batches("dit")
    assert dit == [2] * 11 + [4] * 89 and be.batches("decoder") == dit
    be = GaussianFlowBackend()
    sample(be, _noise(2), [0, 1], SamplerConfig(num_steps=6, guidance=1.0), null_class=NULL)
    assert be.batches("dit") == [2] * 6  # guidance 1: never the unconditional half
    be = GaussianFlowBackend()
    sample(be, _noise(2), [0, 1], SamplerConfig(num_steps=6, guidance=1.0, cfg_mode="reference"),
           null_class=NULL)
    assert be.batches("dit") == [4] * 6


# -- DiT sharing ------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["euler", "heun", "ab2", "ab3", "dpm++2m", "unipc"])
@pytest.mark.parametrize("cfg_mode", ["fast", "reference"])
def test_sharing_ratio_zero_is_bit_identical(solver, cfg_mode):
    noise, labels = _noise(2), [1, 2]
    cfg = SamplerConfig(solver=solver, num_steps=10, guidance=2.5, guidance_interval=(0.2, 1.0),
                        cfg_mode=cfg_mode)
    n_eval = make_plan(cfg).num_evaluations
    plain = sample(GaussianFlowBackend(), noise, labels, cfg, null_class=NULL)
    shared = sample(GaussianFlowBackend(), noise, labels, cfg, null_class=NULL,
                    sharing=uniform_schedule(n_eval, ratio=0.0))
    assert np.array_equal(plain, shared)


def test_reusing_the_condition_skips_dit_calls_and_changes_the_result():
    noise, labels = _noise(2), [0, 1]
    cfg = SamplerConfig(num_steps=12)
    be = GaussianFlowBackend()
    shared = sample(be, noise, labels, cfg, null_class=NULL,
                    sharing=uniform_schedule(12, every=4))
    assert len(be.batches("dit")) == 3 and len(be.batches("decoder")) == 12
    plain = sample(GaussianFlowBackend(), noise, labels, cfg, null_class=NULL)
    assert np.abs(shared - plain).max() > 1e-3  # a stale a(t), t is visible


def test_fresh_t_sharing_rebuilds_the_condition_with_the_current_time():
    # The analytic h does not depend on x_t, so refreshing the timestep makes sharing exact.
    noise, labels = _noise(2), [0, 1]
    cfg = SamplerConfig(num_steps=12, guidance=2.0, guidance_interval=(0.25, 1.0))
    be = GaussianFlowBackend()
    fresh = sample(be, noise, labels, cfg, null_class=NULL,
                   sharing=uniform_schedule(12, ratio=0.75, mode="fresh_t"))
    plain = sample(GaussianFlowBackend(), noise, labels, cfg, null_class=NULL)
    np.testing.assert_allclose(fresh, plain, atol=1e-5)
    assert len(be.batches("dit")) == 3 and len(be.batches("refresh")) == 12
    with pytest.raises(ValueError, match="fresh_t"):
        sample(GaussianFlowBackend(supports_refresh=False), noise, labels, cfg, null_class=NULL,
               sharing=uniform_schedule(12, ratio=0.5, mode="fresh_t"))


def test_sharing_across_the_guidance_boundary_keeps_both_halves():
    # The DiT runs at step 0 (unguided) and its condition is reused into guided steps: fast
    # mode must compute the unconditional half there too, and agree with reference mode.
    noise, labels = _noise(2), [0, 2]
    sched = explicit_schedule([0, 5], 10)
    out = {}
    for mode in ("fast", "reference"):
        cfg = SamplerConfig(num_steps=10, guidance=3.0, guidance_interval=(0.25, 1.0),
                            cfg_mode=mode)
        be = GaussianFlowBackend()
        out[mode] = sample(be, noise, labels, cfg, null_class=NULL, sharing=sched)
        assert be.batches("dit") == [4, 4]
    np.testing.assert_allclose(out["fast"], out["reference"], atol=1e-5)
    plan = make_plan(SamplerConfig(num_steps=10, guidance=3.0, guidance_interval=(0.25, 1.0)),
                     explicit_schedule([0, 5], 10))
    assert plan.cost(2).dit_calls == 2 and plan.cost(2).decoder_calls == 10


def test_schedule_for_another_length_is_refused():
    with pytest.raises(ValueError, match="made for 10 model evaluations"):
        make_plan(SamplerConfig(solver="heun", num_steps=10), uniform_schedule(10, ratio=0.5))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"noise must be \(B, C, H, W\)"):
        sample(GaussianFlowBackend(), _noise(2), [0], SamplerConfig(num_steps=2), null_class=NULL)


class FusedStepBackend(GaussianFlowBackend):
    """The analytic model with a whole-step capability, as a CUDA-graph backend offers it."""

    supports_step = True

    def step(self, x, y, t, dt, guidance):
        self.calls.append(("step", len(y)))
        b = len(x)
        if guidance is None:
            tt = np.full(b, t, np.float32)
            v = GaussianFlowBackend.decoder(self, x, GaussianFlowBackend.dit(self, x, tt, y))
        else:
            x2, tt = np.concatenate([x, x]), np.full(2 * b, t, np.float32)
            out = GaussianFlowBackend.decoder(self, x2, GaussianFlowBackend.dit(self, x2, tt, y))
            v = out[:b] + (out[b:] - out[:b]) * guidance
        return x + v * dt


@pytest.mark.parametrize("cfg_mode", ["fast", "reference"])
def test_fused_step_capability_gives_the_same_samples(cfg_mode):
    noise, labels = _noise(2), [0, 2]
    cfg = SamplerConfig(num_steps=12, guidance=3.0, guidance_interval=(0.3, 1.0),
                        cfg_mode=cfg_mode)
    be = FusedStepBackend()
    fused = sample(be, noise, labels, cfg, null_class=NULL)
    assert len(be.batches("step")) == 12
    plain = sample(FusedStepBackend(), noise, labels, cfg, null_class=NULL, fused_step=False)
    assert np.array_equal(fused, plain)
    be = FusedStepBackend()  # sharing and other solvers go through dit/decoder
    sample(be, noise, labels, cfg, null_class=NULL, sharing=uniform_schedule(12, ratio=0.5))
    assert be.batches("step") == [] and len(be.batches("dit")) == 6
    with pytest.raises(ValueError, match="fused_step=True"):
        sample(FusedStepBackend(), noise, labels, SamplerConfig(solver="heun", num_steps=3),
               null_class=NULL, fused_step=True)


def test_release_samplers_and_manifest_fallbacks_come_from_one_place():
    from runtimes.errors import ConfigError
    from runtimes.sampler import release_sampler

    # The manifest form of the release samplers is what exports have always written.
    assert release_sampler("c2i").to_dict() == {
        "solver": "euler", "steps": 100, "guidance": 3.2, "guidance_interval": [0.1, 1.0],
        "shift": 1.0}
    t2i = release_sampler("t2i")
    assert (t2i.solver, t2i.num_steps, t2i.guidance, t2i.shift) == ("ab2", 25, 4.0, 3.0)
    assert t2i.to_dict() == {
        "solver": "ab2", "steps": 25, "guidance": 4.0, "guidance_interval": [0.0, 1.0],
        "shift": 3.0, "guidance_bounds": "()", "accumulate_time": True}
    assert SamplerConfig.from_dict({}) == SamplerConfig.from_dict(None) == SamplerConfig()
    with pytest.raises(ConfigError, match="no released sampler"):
        release_sampler("t2v")


@pytest.mark.parametrize("config", [
    SamplerConfig(), SamplerConfig(solver="unipc", num_steps=8, guidance=3.2,
                                   guidance_interval=(0.1, 1.0), guidance_edges=True),
    SamplerConfig(solver="table", timesteps=(0.0, 0.4, 1.0), coefficients=((0, 0), (-0.5, 0)),
                  last_step=None, cfg_mode="reference"),
    SamplerConfig(num_steps=250, last_step=0.04, shift=3.0, accumulate_time=True),
])
def test_sampler_config_round_trips_through_the_manifest_form(config):
    import json

    d = json.loads(json.dumps(config.to_dict()))
    assert SamplerConfig.from_dict(d) == config


@pytest.mark.parametrize("key,value,needle", [
    ("steps", 2.5, "sampler_defaults.steps must be a positive integer"),
    ("steps", True, "sampler_defaults.steps"),
    ("guidance", "3", "sampler_defaults.guidance must be a finite number"),
    ("guidance_interval", [0.1, 5], "sampler_defaults.guidance_interval"),
    ("solver", "dpm", "unknown solver 'dpm'"),
    ("guidance_edges", 1, "sampler_defaults.guidance_edges must be true or false"),
])
def test_a_bad_manifest_value_is_a_config_error_naming_the_key(key, value, needle):
    from runtimes.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        SamplerConfig.from_dict({key: value})


def test_pipeline_overrides_are_replacements_of_the_bundle_defaults():
    from runtimes import DeCoPipeline, release_sampler

    be = GaussianFlowBackend()
    pipe = DeCoPipeline(be, be.model_config(), release_sampler("t2i").to_dict())
    assert pipe.sampler_defaults == release_sampler("t2i")
    got = pipe.sampler_config(steps=8, solver="unipc", guidance_edges=True)
    assert got == replace(release_sampler("t2i"), num_steps=8, solver="unipc",
                          guidance_edges=True)
    assert pipe.sampler_config() == release_sampler("t2i")


# -- the split decoder under DiT sharing ------------------------------------------------------


def _split_config(cfg_mode: str = "fast") -> SamplerConfig:
    return SamplerConfig(num_steps=10, guidance=3.0, guidance_interval=(0.25, 1.0),
                         cfg_mode=cfg_mode)


@pytest.mark.parametrize("cfg_mode", ["fast", "reference"])
def test_reused_steps_run_only_the_pixel_part_on_the_cached_modulation(cfg_mode):
    noise, labels = _noise(2), [0, 2]
    cfg, sched = _split_config(cfg_mode), uniform_schedule(10, ratio=0.5)
    be = SplitGaussianFlowBackend()
    split = sample(be, noise, labels, cfg, null_class=NULL, sharing=sched)
    kinds = [k for k, _ in be.calls]
    assert kinds.count("dit") == kinds.count("decoder_cond") == 5
    assert kinds.count("decoder_pixel") == 10 and "decoder" not in kinds
    # Each DiT run computes the modulation once and the next (reused) step takes it as is.
    dit_runs = [i for i, k in enumerate(kinds) if k == "dit"]
    assert all(kinds[i + 1] == "decoder_cond" for i in dit_runs)
    for j, made in enumerate(be.made):
        assert all(np.shares_memory(made, used) for used in be.used[2 * j:2 * j + 2])
    fused_be = SplitGaussianFlowBackend()
    fused = sample(fused_be, noise, labels, cfg, null_class=NULL, sharing=sched,
                   decoder_split=False)
    assert fused_be.batches("decoder_cond") == [] and len(fused_be.batches("decoder")) == 10
    plain = sample(GaussianFlowBackend(), noise, labels, cfg, null_class=NULL, sharing=sched)
    assert np.array_equal(split, fused) and np.array_equal(split, plain)


def test_the_fused_decoder_runs_where_no_later_step_reuses_the_condition():
    noise, labels = _noise(2), [0, 2]
    cfg = _split_config()
    be = SplitGaussianFlowBackend()
    plain = sample(be, noise, labels, cfg, null_class=NULL)
    assert be.batches("decoder_cond") == be.batches("decoder_pixel") == []
    assert np.array_equal(plain, sample(GaussianFlowBackend(), noise, labels, cfg,
                                        null_class=NULL))
    # DiT at 0, 1, 2, 6: evaluations 0 and 1 are not reused (fused decoder), 2 and 6 are.
    be = SplitGaussianFlowBackend()
    sample(be, noise, labels, cfg, null_class=NULL, sharing=explicit_schedule([0, 1, 2, 6], 10))
    kinds = [k for k, _ in be.calls]
    assert kinds[:4] == ["dit", "decoder", "dit", "decoder"]
    assert kinds.count("decoder_cond") == 2 and kinds.count("decoder_pixel") == 8
    # fresh_t rebuilds the condition on every step, so there is nothing to cache.
    be = SplitGaussianFlowBackend()
    sample(be, noise, labels, cfg, null_class=NULL,
           sharing=uniform_schedule(10, ratio=0.5, mode="fresh_t"))
    assert be.batches("decoder_cond") == [] and len(be.batches("decoder")) == 10


def test_a_cached_modulation_keeps_both_halves_across_the_guidance_boundary():
    # Step 0 is unguided but its condition is reused into guided steps: the modulation is made
    # for [uncond; cond] once, its conditional half feeds step 0, the whole the guided steps.
    noise, labels = _noise(2), [0, 2]
    sched = explicit_schedule([0, 5], 10)
    out = {}
    for mode in ("fast", "reference"):
        be = SplitGaussianFlowBackend()
        out[mode] = sample(be, noise, labels, _split_config(mode), null_class=NULL,
                           sharing=sched)
        assert be.batches("decoder_cond") == [4, 4]
    assert be.batches("decoder_pixel") == [4] * 10
    fast = SplitGaussianFlowBackend()
    sample(fast, noise, labels, _split_config(), null_class=NULL, sharing=sched)
    pixel_batches = fast.batches("decoder_pixel")
    assert pixel_batches[0] == 2 and 4 in pixel_batches
    np.testing.assert_allclose(out["fast"], out["reference"], atol=1e-5)
    plan = make_plan(_split_config(), sched)
    cost = plan.cost(2, decoder_split=True)
    assert cost.decoder_cond_samples == 2 * 4 and plan.cost(2).decoder_cond_samples is None
    assert cost.decoder_calls == 10


def test_the_cost_round_trips_through_its_json_form():
    """A bench row stores the cost as JSON: only the counts that apply (the keys of earlier
    rows), read back to the same `SamplingCost`."""
    plan = make_plan(_split_config(), explicit_schedule([0, 5], 10))
    plain, full = plan.cost(2), plan.cost(2, decoder_split=True, text_embedding=True)
    assert set(plain.to_dict()) == {"steps", "evaluations", "dit_calls", "dit_samples",
                                    "decoder_calls", "decoder_samples"}
    assert set(full.to_dict()) - set(plain.to_dict()) == {
        "decoder_cond_samples", "text_embed_calls", "text_embed_samples"}
    for cost in (plain, full, SamplingCost.nothing()):
        assert SamplingCost.from_dict(json.loads(json.dumps(cost.to_dict()))) == cost
    # what read the cost when it was that dict reads it still
    assert full["decoder_cond_samples"] == full.decoder_cond_samples
    with pytest.raises(KeyError):
        plain["decoder_cond_samples"]


class _TextBackend:
    """numpy text-to-image backend whose DiT reads text tokens 2 * text + 1; with
    ``embeds=False`` it takes the raw text features and embeds them inside ``dit`` (a backend
    without the capability), so both must sample the same."""

    def __init__(self, embeds: bool) -> None:
        self.supports_text_embedding = embeds
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def embed_text(self, text: np.ndarray) -> np.ndarray:
        self.calls.append(("embed_text", text.shape))
        return text * 2.0 + 1.0

    def dit(self, x_t: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        self.calls.append(("dit", y.shape))
        tokens = y if self.supports_text_embedding else y * 2.0 + 1.0
        pooled = tokens.mean(axis=(1, 2))[:, None, None]
        return np.broadcast_to(pooled + t[:, None, None], (len(x_t), 4, 2)).astype(np.float32)

    def decoder(self, x_t: np.ndarray, cond: np.ndarray) -> np.ndarray:
        return (cond.mean(axis=(1, 2))[:, None, None, None] - x_t).astype(np.float32)

    def from_numpy(self, a: np.ndarray) -> np.ndarray:
        return a

    def to_numpy(self, a: np.ndarray) -> np.ndarray:
        return a

    def concat(self, arrays) -> np.ndarray:
        return np.concatenate(arrays)


@pytest.mark.parametrize("solver", ["euler", "ab2", "heun", "unipc", "dpm++2m"])
def test_text_is_embedded_once_for_every_step(solver):
    """A backend with `embed_text` gets [negative; prompts] once per generation and its DiT the
    tokens at every step; the samples equal a backend that embeds inside every DiT call."""
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    text = rng.standard_normal((2, 5, 3)).astype(np.float32)
    negative = rng.standard_normal((1, 5, 3)).astype(np.float32)
    cfg = SamplerConfig(solver=solver, num_steps=6, guidance=4.0, guidance_interval=(0.0, 1.0),
                        guidance_bounds="()", cfg_mode="fast")
    once, inside = _TextBackend(embeds=True), _TextBackend(embeds=False)
    got = sample(once, noise, text, cfg, uncond=negative)
    want = sample(inside, noise, text, cfg, uncond=negative)
    assert np.allclose(got, want, rtol=0, atol=1e-6)
    assert [c for c in once.calls if c[0] == "embed_text"] == [("embed_text", (4, 5, 3))]
    assert once.calls[0] == ("embed_text", (4, 5, 3))  # before the first step
    dits = [c for c in once.calls if c[0] == "dit"]
    assert len(dits) == len([c for c in inside.calls if c[0] == "dit"]) > 1
    assert {shape[0] for _, shape in dits} <= {2, 4}
