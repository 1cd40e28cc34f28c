"""Image-quality metrics on numpy arrays or torch tensors, optionally inside a mask or region of interest.

* :func:`psnr`, :func:`nrmse`, :func:`hfen` on arrays of any shape (2D or 3D images).
* :func:`ssim` per batch entry of ``(B, C, H, W)`` or ``(B, C, D, H, W)`` tensors (MONAI's SSIM), and
  :func:`ssim_volume` for one 2D or 3D array.
* :func:`image_metrics`: all four for one estimate, the figures the evaluation tables report.
* :func:`region_masks`: masks from a brain mask (else the reference's foreground), tissue probability maps
  (GM/WM) or a label map.

LPIPS is not provided: it needs pretrained network weights, which cannot be downloaded at run time; tables say so
with :data:`LPIPS_NOTE`.

Masks are boolean arrays of the image's shape; a metric "inside a mask" counts only those voxels (filters such as
SSIM's window and HFEN's Laplacian of Gaussian still see the whole image, so edges of the mask are not artefacts).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from scipy import ndimage

__all__ = ["LPIPS_NOTE", "hfen", "image_metrics", "nrmse", "psnr", "region_masks", "slice_jitter", "ssim",
           "ssim_volume"]

LPIPS_NOTE = "LPIPS left out: its pretrained network weights are not available offline"
HFEN_SIGMA = 1.5  # the Laplacian-of-Gaussian width of Ravishankar & Bresler (2011)


def _pair(estimate, reference, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    est, ref = np.asarray(estimate, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if est.shape != ref.shape:
        raise ValueError(f"shapes differ: {est.shape} vs {ref.shape}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != ref.shape:
            raise ValueError(f"the mask's shape {mask.shape} differs from the image's {ref.shape}")
        if not mask.any():
            raise ValueError("the mask is empty")
    return est, ref, mask


def _inside(a: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return a if mask is None else a[mask]


def _range(ref: np.ndarray, mask: np.ndarray | None) -> float:
    r = _inside(ref, mask)
    return float(r.max() - r.min())


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
    est, ref, mask = _pair(estimate, reference, mask)
    data_range = _range(ref, mask) if data_range is None else data_range
    mse = float(np.mean((_inside(est, mask) - _inside(ref, mask)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


def nrmse(estimate: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Normalised root-mean-square error ``‖x − r‖ / ‖r‖`` (the Euclidean normalisation), inside the mask."""
    est, ref, mask = _pair(estimate, reference, mask)
    den = float(np.linalg.norm(_inside(ref, mask)))
    return float(np.linalg.norm(_inside(est - ref, mask)) / den) if den > 0 else float("inf")


def hfen(estimate: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None,
         sigma: float = HFEN_SIGMA) -> float:
    """High-frequency error norm: :func:`nrmse` of the Laplacian-of-Gaussian filtered images (Ravishankar &
    Bresler 2011, ``sigma`` 1.5 voxels). It measures errors in edges and fine texture, which PSNR underweights."""
    est, ref, mask = _pair(estimate, reference, mask)
    log = lambda a: ndimage.laplace(ndimage.gaussian_filter(a, sigma))  # noqa: E731  (exactly 0 on constants)
    return nrmse(log(est), log(ref), mask)


def slice_jitter(estimate: np.ndarray, reference: np.ndarray, axis: int, mask: np.ndarray | None = None) -> float:
    """Slice-to-slice roughness along ``axis`` relative to the reference's: ``mean(Δx²) / mean(Δr²)`` over pairs of
    neighbouring voxels along ``axis`` that are both inside the mask.

    1 means as smooth across slices as the truth; above 1, neighbouring slices disagree more than the anatomy does
    (the seams or jitter of a 2D model run slice by slice); below 1, the estimate is blurred across ``axis``.
    """
    est, ref, mask = _pair(estimate, reference, mask)
    pairs = None if mask is None else np.logical_and(*(np.moveaxis(mask, axis, 0)[s] for s in (np.s_[:-1], np.s_[1:])))
    d_est, d_ref = (np.moveaxis(np.diff(a, axis=axis), axis, 0) for a in (est, ref))
    return float(np.mean(_inside(d_est, pairs) ** 2) / np.mean(_inside(d_ref, pairs) ** 2))


def _window(shape) -> int:
    win = min(11, *(int(n) for n in shape))
    return win - (1 - win % 2)  # an odd window that fits


def ssim(estimate: torch.Tensor, reference: torch.Tensor, data_range: float | None = None,
         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Structural similarity per batch entry, with MONAI's SSIM (Gaussian window 11, or the largest odd size that
    fits).

    Args:
        estimate: ``(B, C, H, W)`` or ``(B, C, D, H, W)``.
        reference: same shape.
        data_range: dynamic range of the reference; defaults to its ``max - min``.
        mask: boolean ``(B, C, *spatial)`` or ``spatial``; the SSIM map is averaged over these voxels (where its
            window fits inside the image).

    Returns:
        ``(B,)`` SSIM values.
    """
    from monai.metrics.regression import compute_ssim_and_cs

    if estimate.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(estimate.shape)} vs {tuple(reference.shape)}")
    if data_range is None:
        data_range = float(reference.max() - reference.min())
    spatial_dims = reference.ndim - 2
    win = _window(reference.shape[2:])
    ssim_map, _ = compute_ssim_and_cs(estimate.double(), reference.double(), spatial_dims, [win] * spatial_dims,
                                      [1.5] * spatial_dims, data_range=data_range)  # valid region: shrunk by win-1
    if mask is None:
        return ssim_map.flatten(1).mean(1).float()
    h = win // 2
    crop = (..., *[slice(h, n - h) for n in reference.shape[2:]])
    weight = torch.as_tensor(mask, dtype=torch.bool).expand_as(reference)[crop].to(ssim_map)
    return ((ssim_map * weight).flatten(1).sum(1) / weight.flatten(1).sum(1)).float()


def ssim_volume(estimate: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None,
                data_range: float | None = None) -> float:
    """:func:`ssim` of one 2D or 3D array (a volume is compared in 3D), inside the mask."""
    est, ref, mask = _pair(estimate, reference, mask)
    data_range = _range(ref, mask) if data_range is None else data_range
    as_t = lambda a: torch.from_numpy(a)[None, None]  # noqa: E731
    return float(ssim(as_t(est), as_t(ref), data_range, None if mask is None else as_t(mask))[0])


def image_metrics(estimate: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None,
                  data_range: float | None = None) -> dict[str, float]:
    """PSNR, SSIM, NRMSE and HFEN of one image against its reference, inside the mask.

    ``data_range`` (PSNR and SSIM) defaults to the reference's range inside the mask; pass one value to compare
    several methods on the same footing.
    """
    est, ref, mask = _pair(estimate, reference, mask)
    data_range = _range(ref, mask) if data_range is None else data_range
    return {"psnr": psnr(est, ref, mask, data_range), "ssim": ssim_volume(est, ref, mask, data_range),
            "nrmse": nrmse(est, ref, mask), "hfen": hfen(est, ref, mask)}


def foreground(data: np.ndarray, fraction: float = 0.1, *, smooth: float = 0.0,
               fill_holes: bool = True) -> np.ndarray:
    """The brain (or the imaged object) of an ``(X, Y, Z)`` volume: voxels above ``fraction`` of its robust
    intensity range (0.5-99.5 percentiles) over the range's low end, holes filled. The one definition of foreground
    that metrics, the audit report and the stress test share.

    Args:
        data: the volume.
        fraction: the threshold, as a fraction of the robust range.
        smooth: Gaussian sigma in voxels applied before thresholding (0: none).
        fill_holes: fill enclosed holes (ventricles, sulci seen in cross-section).
    """
    x = np.asarray(data, dtype=np.float64)
    lo, hi = np.percentile(x, [0.5, 99.5])
    inside = (ndimage.gaussian_filter(x, smooth) if smooth else x) > lo + fraction * (hi - lo)
    return ndimage.binary_fill_holes(inside) if fill_holes else inside


def region_masks(reference: np.ndarray | None = None, *, brain: np.ndarray | None = None,
                 tissues: Mapping[str, np.ndarray] | None = None, labels: np.ndarray | None = None,
                 label_names: Mapping[int, str] | None = None, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Named boolean masks to evaluate in.

    Args:
        reference: when given and no ``brain`` mask is, its :func:`foreground`, as ``"foreground"`` (it is no brain
            mask: a head's foreground holds the scalp and skull too).
        brain: a brain mask (non-zero voxels), as ``"brain"``.
        tissues: probability maps such as ``{"GM": gm, "WM": wm}``; a voxel belongs to the most probable tissue
            when that probability is at least ``threshold``.
        labels: an integer label map; each non-zero label becomes one mask.
        label_names: names for labels (default ``"label <n>"``).

    Returns:
        ``{"brain": ..., "GM": ..., ...}`` (``"foreground"`` in place of ``"brain"`` without a brain mask); empty
        masks are left out.
    """
    masks: dict[str, np.ndarray] = {}
    if brain is not None:
        masks["brain"] = np.asarray(brain) != 0
    elif reference is not None:
        masks["foreground"] = foreground(reference)
    if tissues:
        names = list(tissues)
        stack = np.stack([np.asarray(tissues[n], dtype=np.float64) for n in names])
        best, top = stack.argmax(0), stack.max(0)
        for i, name in enumerate(names):
            masks[name] = (best == i) & (top >= threshold)
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64)
        for value in np.unique(labels[labels != 0]):
            masks[(label_names or {}).get(int(value), f"label {value}")] = labels == value
    return {k: v for k, v in masks.items() if v.any()}
