"""How close two runs are: tensor metrics for latents, image metrics for decoded frames.

Tensors (latents after each denoising step), computed in float64 on the flattened tensors:
  cosine_similarity  <a, b> / (|a| |b|); 1.0 when both are zero, 0.0 when only one is
  mae, mse, rmse     mean |a - b|, mean (a - b)^2, sqrt(mse)
  max_abs            max |a - b|
Frames are 8-bit RGB (uint8 0..255, shape [H, W, 3] or [F, H, W, 3]), as the user saves them:
  psnr_db  10 log10(255^2 / MSE); +inf for identical frames
  ssim     Wang et al. 2004 ("Image quality assessment: from error visibility to structural
           similarity"), on each RGB channel and averaged over channels (and frames): an 11x11
           gaussian window with sigma 1.5 (normalised to sum 1), C1 = (0.01 * 255)^2,
           C2 = (0.03 * 255)^2, population (biased) local variances, and 'valid' filtering (no
           padding: the SSIM map is (H - 10) x (W - 10)). This equals
           skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
           use_sample_covariance=False, data_range=255, channel_axis=-1), which crops the same
           border from a padded filter.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = (0.01 * 255) ** 2
SSIM_C2 = (0.03 * 255) ** 2


def tensor_metrics(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Cosine similarity, MAE, MSE, RMSE and max abs error of two same-shaped tensors."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"tensors to compare differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    x = a.detach().flatten().to("cpu", torch.float64)
    y = b.detach().flatten().to("cpu", torch.float64)
    diff = x - y
    mse = float((diff * diff).mean())
    return {"cosine_similarity": cosine_similarity(x, y), "mae": float(diff.abs().mean()), "mse": mse,
            "rmse": math.sqrt(mse), "max_abs": float(diff.abs().max())}


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    x = a.detach().flatten().to("cpu", torch.float64)
    y = b.detach().flatten().to("cpu", torch.float64)
    xx, yy = float(x @ x), float(y @ y)
    if xx == 0.0 and yy == 0.0:
        return 1.0
    if xx == 0.0 or yy == 0.0:
        return 0.0
    # sqrt(xx * yy) rather than sqrt(xx) * sqrt(yy): for a == b it is exactly xx (IEEE sqrt of
    # a correctly rounded square), so identical tensors give exactly 1.0.
    return float(x @ y) / math.sqrt(xx * yy)


def _as_float64(frames) -> torch.Tensor:
    return torch.as_tensor(np.asarray(frames)).to(torch.float64)


def psnr(a, b, data_range: float = 255.0) -> float:
    """PSNR in dB of two same-shaped 8-bit images or frame stacks; +inf when they are identical."""
    x, y = _as_float64(a), _as_float64(b)
    if x.shape != y.shape:
        raise ValueError(f"images to compare differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = float(((x - y) ** 2).mean())
    return psnr_from_mse(mse, data_range)


def psnr_from_mse(mse: float, data_range: float = 255.0) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable gaussian filter of [N, 1, H, W], 'valid' region only."""
    x = F.conv2d(x, g.reshape(1, 1, -1, 1))
    return F.conv2d(x, g.reshape(1, 1, 1, -1))


def ssim(a, b) -> float:
    """Mean SSIM of two 8-bit images [H, W] or [H, W, C], or frame stacks [F, H, W, C] (see the
    module docstring for the definition); channels and frames are averaged."""
    x, y = _as_float64(a), _as_float64(b)
    if x.shape != y.shape:
        raise ValueError(f"images to compare differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() == 2:
        x, y = x[..., None], y[..., None]
    if x.dim() == 3:
        x, y = x[None], y[None]
    if x.dim() != 4:
        raise ValueError(f"SSIM takes [H, W], [H, W, C] or [F, H, W, C] images, not shape {tuple(x.shape)}")
    height, width = x.shape[1:3]
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} px, not {height}x{width}")
    g = _gaussian_window()
    # [F, H, W, C] -> [F * C, 1, H, W]: every channel of every frame is its own image.
    x = x.permute(0, 3, 1, 2).reshape(-1, 1, height, width)
    y = y.permute(0, 3, 1, 2).reshape(-1, 1, height, width)
    mu_x, mu_y = _filter(x, g), _filter(y, g)
    var_x = _filter(x * x, g) - mu_x * mu_x
    var_y = _filter(y * y, g) - mu_y * mu_y
    cov = _filter(x * y, g) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_x * mu_x + mu_y * mu_y + SSIM_C1) * (var_x + var_y + SSIM_C2))
    return float(ssim_map.mean())


def image_metrics(a, b) -> dict[str, float]:
    """PSNR (dB), SSIM, MAE, MSE and max abs error of two 8-bit images or frame stacks."""
    x, y = _as_float64(a), _as_float64(b)
    if x.shape != y.shape:
        raise ValueError(f"images to compare differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    diff = x - y
    mse = float((diff * diff).mean())
    return {"psnr_db": psnr_from_mse(mse), "ssim": ssim(a, b), "mae": float(diff.abs().mean()), "mse": mse,
            "max_abs": float(diff.abs().max())}


def video_metrics(a, b) -> dict[str, dict[str, float]]:
    """``image_metrics`` of the first frame, the middle frame (index F // 2) and all frames
    ([F, H, W, 3] stacks). Over all frames, MSE and MAE are means over every pixel and SSIM is
    the mean of the per-frame SSIMs; frames are taken one at a time to bound memory."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"videos to compare differ in shape: {a.shape} vs {b.shape}")
    per_frame = [image_metrics(a[i], b[i]) for i in range(a.shape[0])]
    mse = float(np.mean([m["mse"] for m in per_frame]))
    every = {"psnr_db": psnr_from_mse(mse), "ssim": float(np.mean([m["ssim"] for m in per_frame])),
             "mae": float(np.mean([m["mae"] for m in per_frame])), "mse": mse,
             "max_abs": max(m["max_abs"] for m in per_frame)}
    middle = a.shape[0] // 2
    return {"first_frame": per_frame[0], "middle_frame": {"index": middle, **per_frame[middle]},
            "all_frames": {"frames": a.shape[0], **every}}
