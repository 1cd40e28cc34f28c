"""Image-quality metrics on numpy arrays or torch tensors, optionally inside a mask."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["psnr", "ssim"]


def psnr(estimate: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None,
         data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB.

    Args:
        estimate: any shape.
        reference: same shape as ``estimate``.
        mask: boolean, same shape; only voxels inside count.
        data_range: peak-to-peak range of the reference; defaults to ``max - min`` of the reference (inside the mask).

    Returns:
        ``10 log10(range² / MSE)``; ``inf`` for identical inputs.
    """
    est, ref = np.asarray(estimate, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if est.shape != ref.shape:
        raise ValueError(f"shapes differ: {est.shape} vs {ref.shape}")
    if mask is not None:
        est, ref = est[mask], ref[mask]
    if data_range is None:
        data_range = float(ref.max() - ref.min())
    mse = float(np.mean((est - ref) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


def ssim(estimate: torch.Tensor, reference: torch.Tensor, data_range: float | None = None) -> torch.Tensor:
    """Structural similarity per batch entry, with MONAI's :class:`~monai.metrics.SSIMMetric` (Gaussian window 11).

    Args:
        estimate: ``(B, C, H, W)`` or ``(B, C, D, H, W)``.
        reference: same shape.
        data_range: dynamic range of the reference; defaults to its ``max - min``.

    Returns:
        ``(B,)`` SSIM values.
    """
    from monai.metrics import SSIMMetric

    if estimate.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(estimate.shape)} vs {tuple(reference.shape)}")
    if data_range is None:
        data_range = float(reference.max() - reference.min())
    spatial_dims = reference.ndim - 2
    win = min(11, *(int(n) for n in reference.shape[2:]))
    win -= 1 - win % 2  # an odd window that fits
    metric = SSIMMetric(spatial_dims=spatial_dims, data_range=data_range, win_size=win, reduction="none")
    return metric(estimate.float(), reference.float()).reshape(-1)
