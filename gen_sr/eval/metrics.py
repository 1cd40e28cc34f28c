"""Image-quality metrics on numpy arrays or torch tensors, optionally inside a mask."""

from __future__ import annotations

import numpy as np

__all__ = ["psnr"]


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
