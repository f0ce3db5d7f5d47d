"""diffgen.tools.metrics against hand-computed values, an independent SSIM, and known properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffgen.tools.metrics import (SSIM_C1, SSIM_C2, cosine_similarity, image_metrics, psnr, ssim, tensor_metrics,
                                   video_metrics)


def test_tensor_metrics_by_hand():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([1.0, 2.0, 3.0, 6.0])
    m = tensor_metrics(a, b)
    # diff = [0, 0, 0, -2]; <a, b> = 1 + 4 + 9 + 24 = 38, |a|^2 = 30, |b|^2 = 50.
    assert m["mae"] == 0.5 and m["mse"] == 1.0 and m["rmse"] == 1.0 and m["max_abs"] == 2.0
    assert m["cosine_similarity"] == pytest.approx(38 / math.sqrt(30 * 50), abs=1e-15)


def test_cosine_properties():
    x = torch.randn(3, 17, 5, generator=torch.Generator().manual_seed(0))
    assert cosine_similarity(x, x) == 1.0  # exactly, not merely close: the exactness check relies on it
    assert cosine_similarity(x, -x) == -1.0
    assert cosine_similarity(x, 3 * x) == pytest.approx(1.0, abs=1e-15)
    assert cosine_similarity(torch.zeros(4), torch.zeros(4)) == 1.0
    assert cosine_similarity(torch.zeros(4), torch.ones(4)) == 0.0
    assert cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == 0.0
    assert tensor_metrics(x.half(), x.half())["cosine_similarity"] == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        tensor_metrics(torch.zeros(2, 3), torch.zeros(3, 2))


def test_psnr_of_known_mse():
    zeros = np.zeros((8, 8, 3), np.uint8)
    assert psnr(zeros, zeros + 1) == pytest.approx(20 * math.log10(255), abs=1e-12)  # MSE 1: 48.13 dB
    assert psnr(zeros, zeros + 10) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-12)  # MSE 100
    assert psnr(zeros, zeros) == math.inf
    # MSE of half the pixels off by 20: 200 -> 25.12 dB; uint8 inputs must not wrap around.
    b = zeros.copy()
    b[:4] = 20
    assert psnr(b, zeros) == pytest.approx(10 * math.log10(255**2 / 200), abs=1e-12)


def _independent_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """One gray image, straight from Wang et al. 2004: an explicit 2-D gaussian weight per window
    position, loops instead of separable convolutions."""
    r = np.arange(11) - 5.0
    w = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11].astype(np.float64), y[i:i + 11, j:j + 11].astype(np.float64)
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            values.append(((2 * mx * my + SSIM_C1) * (2 * cxy + SSIM_C2))
                          / ((mx**2 + my**2 + SSIM_C1) * (vx + vy + SSIM_C2)))
    return float(np.mean(values))


def test_ssim_against_an_independent_computation():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 23), dtype=np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-40, 41, x.shape), 0, 255).astype(np.uint8)
    assert ssim(x, y) == pytest.approx(_independent_ssim(x, y), abs=1e-10)
    # RGB: the mean over channels of each channel's SSIM.
    rgb_x = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    rgb_y = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    per_channel = [_independent_ssim(rgb_x[..., c], rgb_y[..., c]) for c in range(3)]
    assert ssim(rgb_x, rgb_y) == pytest.approx(np.mean(per_channel), abs=1e-10)


def test_ssim_properties():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert ssim(x, y) == pytest.approx(ssim(y, x), abs=1e-12)
    assert -1.0 <= ssim(x, y) < 0.1  # independent noise images are structurally unrelated
    # Constant images have no variance: SSIM reduces to the luminance term (2ab + C1) / (a^2 + b^2 + C1).
    a, b = np.full((16, 16), 100, np.uint8), np.full((16, 16), 120, np.uint8)
    assert ssim(a, b) == pytest.approx((2 * 100 * 120 + SSIM_C1) / (100**2 + 120**2 + SSIM_C1), abs=1e-12)
    # Frames: the mean of the per-frame values.
    frames_x, frames_y = np.stack([x, y, x]), np.stack([y, y, x])
    assert ssim(frames_x, frames_y) == pytest.approx((ssim(x, y) + 1 + 1) / 3, abs=1e-12)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(np.zeros((10, 40), np.uint8), np.zeros((10, 40), np.uint8))


def test_ssim_matches_scikit_image_when_installed():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-30, 31, x.shape), 0, 255).astype(np.uint8)
    theirs = metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                           data_range=255, channel_axis=-1)
    assert ssim(x, y) == pytest.approx(theirs, abs=1e-6)


def test_video_metrics_first_middle_all():
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    cand = ref.copy()
    cand[2] = np.clip(cand[2].astype(int) + 4, 0, 255)  # only the middle frame differs
    m = video_metrics(ref, cand)
    assert m["first_frame"]["psnr_db"] == math.inf and m["first_frame"]["mae"] == 0
    assert m["middle_frame"]["index"] == 2
    assert m["middle_frame"] == {"index": 2, **image_metrics(ref[2], cand[2])}
    mse_all = float(((cand.astype(float) - ref) ** 2).mean())
    assert m["all_frames"]["frames"] == 5
    assert m["all_frames"]["mse"] == pytest.approx(mse_all, rel=1e-12)
    assert m["all_frames"]["psnr_db"] == pytest.approx(psnr(ref, cand), abs=1e-9)
    assert m["all_frames"]["ssim"] == pytest.approx((4 + m["middle_frame"]["ssim"]) / 5, abs=1e-12)
