"""Training objective: the golden frequency-aware loss, flow-matching convention, dropout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.losses import (
    FrequencyLoss,
    dct_matrix,
    drop_labels,
    frequency_weights,
    interpolate,
    jpeg_quant_tables,
    rgb_to_ycbcr,
    sample_t,
)


def test_frequency_loss_matches_reference(golden):
    pred = torch.from_numpy(golden["loss_v_pred"])
    true = torch.from_numpy(golden["loss_v_true"])
    got = FrequencyLoss(quality=85, mode="inv_gamma", gamma=1.0)(pred, true).item()
    want = float(golden["freq_loss"])
    assert abs(got - want) <= 1e-5 * abs(want)
    assert abs(F.mse_loss(pred, true).item() - float(golden["fm_loss"])) <= 1e-6


def test_frequency_weights_match_reference(golden):
    w = frequency_weights(85, "inv_gamma", 1.0).numpy()
    want = golden["freq_weights"]
    assert w.shape == (3, 8, 8)
    np.testing.assert_allclose(w, want, rtol=1e-5, atol=0)
    np.testing.assert_allclose(w.mean(axis=(1, 2)), 1.0, rtol=1e-6)


def test_jpeg_tables_ijg_rule():
    q = jpeg_quant_tables(85)  # scale 30: floor((base*30 + 50)/100)
    assert q[0, 0, 0] == 5 and q[0, 0, 1] == 3 and q[1, 0, 0] == 5 and q[1, 7, 7] == 30
    q50 = jpeg_quant_tables(50)  # scale 100: the base tables
    assert q50[0, 0, 0] == 16 and q50[2, 7, 7] == 99
    assert jpeg_quant_tables(1).max() == 255 and jpeg_quant_tables(100).min() == 1


def test_dct_is_orthonormal_dct_ii():
    c = dct_matrix(8, torch.float64)
    torch.testing.assert_close(c @ c.T, torch.eye(8, dtype=torch.float64))
    x = torch.arange(8, dtype=torch.float64)
    n = torch.arange(8, dtype=torch.float64)
    k = 3
    want = (2 / 8) ** 0.5 * (x * torch.cos(torch.pi * (2 * n + 1) * k / 16)).sum()
    torch.testing.assert_close((c @ x)[k], want)


def test_ycbcr_has_no_offsets():
    grey = torch.full((1, 3, 2, 2), 0.7)
    ycc = rgb_to_ycbcr(grey)
    torch.testing.assert_close(ycc[:, 0], torch.full((1, 2, 2), 0.7))
    torch.testing.assert_close(ycc[:, 1:], torch.zeros(1, 2, 2, 2), atol=1e-6, rtol=0)


def test_frequency_loss_reflect_pads_odd_sizes():
    a, b = torch.randn(2, 3, 12, 20), torch.randn(2, 3, 12, 20)
    val = FrequencyLoss()(a, b)
    assert torch.isfinite(val) and val > 0
    assert FrequencyLoss()(a, a) == 0


def test_frequency_loss_is_float32_under_autocast():
    a, b = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        val = FrequencyLoss()(a.bfloat16(), b)
    assert val.dtype == torch.float32


def test_uniform_mode_is_mse_in_the_ycbcr_dct_domain():
    a, b = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    # Orthonormal DCT preserves energy: the uniform-weight loss equals MSE of the YCbCr error.
    want = F.mse_loss(rgb_to_ycbcr(a), rgb_to_ycbcr(b))
    torch.testing.assert_close(FrequencyLoss(mode="uniform")(a, b), want)
    with pytest.raises(ValueError):
        frequency_weights(mode="nope")


def test_flow_matching_convention():
    x, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    x_t, v = interpolate(x, eps, torch.tensor([0.0, 1.0, 0.5, 0.25]))
    torch.testing.assert_close(x_t[0], eps[0])  # t = 0 is noise
    torch.testing.assert_close(x_t[1], x[1])  # t = 1 is data
    torch.testing.assert_close(x_t[2], 0.5 * x[2] + 0.5 * eps[2])
    torch.testing.assert_close(v, x - eps)


def test_logit_normal_time_and_shift():
    g = torch.Generator().manual_seed(0)
    t = sample_t(20000, generator=g)
    assert 0 < t.min() and t.max() < 1 and abs(t.median().item() - 0.5) < 0.02
    g = torch.Generator().manual_seed(0)
    ts = sample_t(20000, shift=3.0, generator=g)
    torch.testing.assert_close(ts, t / (t + (1 - t) * 3.0))
    assert ts.mean() < t.mean()  # shift > 1 moves samples toward noise


def test_label_dropout():
    y = torch.arange(10).repeat(1000)
    g = torch.Generator().manual_seed(0)
    out = drop_labels(y, 0.2, null_class=10, generator=g)
    frac = (out == 10).float().mean().item()
    assert 0.18 < frac < 0.22
    kept = out != 10
    assert torch.equal(out[kept], y[kept])
    coins = torch.tensor([0.05, 0.5])
    assert drop_labels(torch.tensor([3, 4]), 0.1, 10, coins=coins).tolist() == [10, 4]
    assert torch.equal(drop_labels(y, 0.0, 10), y)
