"""The numbers of the hallucination-audit report: high-risk clusters, the places to look first, the foreground the
flagged fraction counts and the per-slice risk profile.

:func:`risk_clusters` finds the connected high-risk regions and :func:`risk_peaks` the local maxima inside them.
:class:`PeakRule` keeps the places the report points at (its peaks table and the centre of its views) away from the
outer voxels of the field of view and inside the brain mask, away from its rim, where edges and empty border slices
raise the spread of the samples without pointing at anatomy; :func:`ranked_peaks` applies it, falling back to the
unrestricted maxima when nothing else exceeds the threshold. Positions are scanner (world) coordinates in mm, RAS+.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from nibabel.affines import apply_affine
from scipy import ndimage

from gen_sr.eval.metrics import foreground
from gen_sr.volume import Volume, resample_to

__all__ = ["BACKGROUND", "CountedRegion", "PeakRule", "foreground_mask", "on_grid", "ranked_peaks", "risk_clusters",
           "risk_peaks", "slice_profile"]

BACKGROUND = "background/other"


def on_grid(volume: Volume, ref: Volume, order: int = 1) -> np.ndarray:
    """``volume``'s voxels on ``ref``'s grid, as float64."""
    return np.asarray(resample_to(volume, ref, order).data, dtype=np.float64)


def risk_clusters(risk: Volume, threshold: float, *, masks: dict[str, Volume] | None = None, top: int | None = 10,
                  min_voxels: int = 1) -> list[dict[str, Any]]:
    """The connected components (26-connectivity) of ``risk > threshold``, highest peak risk first, then largest.

    Args:
        risk: the risk map.
        threshold: voxels strictly above it are high-risk.
        masks: tissue probability maps by class name, e.g. ``{"GM": gm, "WM": wm}``, resampled (linear) onto the
            risk grid when on another grid.
        top: how many clusters to return; ``None`` for all.
        min_voxels: smaller clusters are dropped.

    Returns:
        One dict per cluster: ``rank`` (1-based), ``centroid_mm`` (world position of the unweighted centroid of its
        voxel centres), ``peak_mm`` (world position of its highest-risk voxel), ``size_mm3`` (voxels × voxel volume,
        ``|det|`` of the affine's 3x3), ``voxels``, ``peak_risk``, ``mean_risk``, ``bbox`` (``start``/``stop`` voxel
        indices in ``risk``'s voxel order, stop exclusive), ``tissue`` and ``tissue_mean``. ``tissue`` is the mask
        class with the highest mean probability inside the cluster, or ``"background/other"`` when every class's
        mean is below 0.5; with no masks, ``tissue`` is ``None`` and ``tissue_mean`` empty.
    """
    data = np.asarray(risk.data, dtype=np.float64)
    labels, keep, counts, peaks = _ranked_components(data, threshold, min_voxels)
    if not keep:
        return []
    n = len(counts)
    idx = np.arange(1, n + 1)
    means = ndimage.mean(data, labels, idx)
    centres = apply_affine(risk.affine, np.asarray(ndimage.center_of_mass(labels > 0, labels, idx),
                                                   dtype=np.float64).reshape(n, 3))
    peak_at = apply_affine(risk.affine, np.asarray(ndimage.maximum_position(data, labels, idx),
                                                   dtype=np.float64).reshape(n, 3))
    boxes = ndimage.find_objects(labels)
    tissue_means = {name: ndimage.mean(on_grid(m, risk), labels, idx) for name, m in (masks or {}).items()}
    voxel_mm3 = abs(float(np.linalg.det(risk.affine[:3, :3])))
    clusters = []
    for rank, i in enumerate(keep[:top] if top is not None else keep, start=1):
        fractions = {name: float(v[i]) for name, v in tissue_means.items()}
        clusters.append({
            "rank": rank, "centroid_mm": centres[i].tolist(), "peak_mm": peak_at[i].tolist(),
            "size_mm3": float(counts[i]) * voxel_mm3, "voxels": int(counts[i]), "peak_risk": float(peaks[i]),
            "mean_risk": float(means[i]),
            "bbox": {"start": [s.start for s in boxes[i]], "stop": [s.stop for s in boxes[i]]},
            "tissue": _tissue(fractions), "tissue_mean": fractions,
        })
    return clusters


def risk_peaks(risk: Volume, threshold: float, *, masks: dict[str, Volume] | None = None, top: int = 10,
               min_distance_mm: float = 10.0, allowed: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Where to look inside the clusters: local maxima of ``risk`` above ``threshold``, highest first, each at least
    ``min_distance_mm`` from every higher one kept (as FSL ``cluster`` lists local maxima). One cluster can be a
    whole cortical rim; its peaks still point at places.

    Args:
        risk, threshold, masks: as in :func:`risk_clusters`.
        top: how many peaks to return.
        min_distance_mm: smallest distance between two peaks, in mm.
        allowed: a boolean array on ``risk``'s grid; only local maxima (of the whole map) at its true voxels are
            kept (``None``: everywhere).

    Returns:
        One dict per peak: ``rank`` (1-based), ``position_mm``, ``risk``, ``cluster`` (its cluster's rank in
        :func:`risk_clusters` with every cluster kept) and ``tissue`` (as in :func:`risk_clusters`, from the masks'
        values at the peak; ``None`` without masks).
    """
    data = np.asarray(risk.data, dtype=np.float64)
    labels, keep, _, _ = _ranked_components(data, threshold)
    rank_of = {i + 1: rank for rank, i in enumerate(keep, start=1)}  # label -> cluster rank
    local = (data > threshold) & (data == ndimage.maximum_filter(data, size=3, mode="nearest"))
    if allowed is not None:
        local &= np.asarray(allowed, dtype=bool)
    candidates = np.argwhere(local)
    candidates = candidates[np.argsort(-data[local], kind="stable")]
    world = apply_affine(risk.affine, candidates).reshape(-1, 3)
    on_risk_grid = {name: on_grid(m, risk) for name, m in (masks or {}).items()}
    kept: list[int] = []
    for k in range(len(candidates)):
        if len(kept) == top:
            break
        if not kept or np.min(np.linalg.norm(world[kept] - world[k], axis=1)) >= min_distance_mm:
            kept.append(k)
    peaks = []
    for rank, k in enumerate(kept, start=1):
        voxel = tuple(candidates[k])
        peaks.append({"rank": rank, "position_mm": world[k].tolist(), "risk": float(data[voxel]),
                      "cluster": rank_of.get(int(labels[voxel])),
                      "tissue": _tissue({name: float(m[voxel]) for name, m in on_risk_grid.items()})})
    return peaks


@dataclass(frozen=True)
class PeakRule:
    """Which voxels may be reported as a highest-risk place or centre the views.

    A voxel qualifies when it lies at least ``border_voxels`` voxels inside every face of the field of view (along
    axes more than ``4 × border_voxels`` voxels long: a thin slab, such as the demo's 4 voxels, has no inside along
    its thin axis, and its faces are cuts through anatomy, not empty border slices) and inside the foreground (the
    brain mask, holes filled), more than ``rim_mm`` mm (Euclidean) from its boundary.
    When no qualifying local maximum exceeds the threshold, the unrestricted maxima are used. The clusters are not
    restricted.
    """

    border_voxels: int = 2
    rim_mm: float = 3.0

    def allowed(self, foreground: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
        """The qualifying voxels of a grid with ``foreground`` (boolean) and voxel ``spacing`` in mm."""
        fg = ndimage.binary_fill_holes(np.asarray(foreground, dtype=bool))
        inside = np.zeros(fg.shape, dtype=bool)
        k = max(int(self.border_voxels), 0)
        inside[tuple(slice(k, n - k) if n > 4 * k else slice(None) for n in fg.shape)] = True
        if fg.all() or not fg.any():
            return inside
        # the distance to the nearest voxel centre outside; the boundary lies half a voxel nearer
        depth = ndimage.distance_transform_edt(fg, sampling=spacing) - 0.5 * min(spacing)
        return inside & fg & (depth > self.rim_mm)

    def describe(self, region: str) -> str:
        """The rule in words, ``region`` naming the mask (e.g. ``"brain mask"``)."""
        return (f"ranked only among voxels inside the {region}, more than {self.rim_mm:g} mm from its boundary, and at "
                f"least {self.border_voxels} voxel(s) inside the edge of the field of view (edges and empty border "
                "slices raise the spread without pointing at anatomy; the clusters table is not restricted); when no "
                "such voxel exceeds the threshold, over the whole volume")


def ranked_peaks(risk: Volume, threshold: float, foreground: np.ndarray, rule: PeakRule, region: str, *,
                 masks: dict[str, Volume] | None = None, top: int = 10,
                 min_distance_mm: float = 10.0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """:func:`risk_peaks` under ``rule`` (falling back to every voxel when nothing qualifies), and a record of the
    rule: its parameters and text, how many voxels qualify, whether it fell back, and the unrestricted maximum."""
    allowed = rule.allowed(foreground, tuple(float(s) for s in risk.spacing))
    peaks = risk_peaks(risk, threshold, masks=masks, top=top, min_distance_mm=min_distance_mm, allowed=allowed)
    fallback = not peaks
    if fallback:
        peaks = risk_peaks(risk, threshold, masks=masks, top=top, min_distance_mm=min_distance_mm)
    data = np.asarray(risk.data, dtype=np.float64)
    at = np.unravel_index(int(np.argmax(data)), data.shape)
    record = {**asdict(rule), "min_distance_mm": min_distance_mm, "text": rule.describe(region),
              "qualifying_voxels": int(allowed.sum()),
              "fallback": fallback, "max_risk": float(data[at]),
              "max_at_mm": apply_affine(risk.affine, np.asarray(at, dtype=np.float64)).tolist(),
              "max_qualifies": bool(allowed[at])}
    return peaks, record


def _ranked_components(data: np.ndarray, threshold: float,
                       min_voxels: int = 1) -> tuple[np.ndarray, list[int], np.ndarray, np.ndarray]:
    """The connected components (26-connectivity) of ``data > threshold``, ranked as :func:`risk_clusters` ranks
    them: ``(labels, keep, counts, peaks)``, where ``keep`` lists component indices (label − 1) with at least
    ``min_voxels`` voxels, highest peak first, then largest, and ``counts``/``peaks`` are per component."""
    labels, n = ndimage.label(data > threshold, structure=np.ones((3, 3, 3), dtype=bool))
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    peaks = np.asarray(ndimage.maximum(data, labels, np.arange(1, n + 1)), dtype=np.float64).reshape(n)
    keep = sorted((i for i in range(n) if counts[i] >= min_voxels), key=lambda i: (-peaks[i], -counts[i]))
    return labels, keep, counts, peaks


def _tissue(fractions: dict[str, float]) -> str | None:
    """The class with the highest mean probability, ``BACKGROUND`` when all are below 0.5, ``None`` without any."""
    if not fractions:
        return None
    tissue = max(fractions, key=fractions.__getitem__)
    return tissue if fractions[tissue] >= 0.5 else BACKGROUND


@dataclass(frozen=True)
class CountedRegion:
    """The region the verdict's percentage counts, as the report's texts name it (:func:`foreground_mask` decides).

    Attributes:
        name: ``"brain"`` only where a brain mask or tissue maps define it; else ``"foreground"`` (the SR mean's,
            which holds the scalp and skull too), or ``"whole volume"`` where neither holds a voxel.
        how: how it was found (empty for the whole volume).
    """

    name: Literal["brain", "foreground", "whole volume"]
    how: str = ""

    @property
    def label(self) -> str:
        """The name with how it was found, e.g. ``brain (the given brain mask)``."""
        return f"{self.name} ({self.how})" if self.how else self.name

    @property
    def mask(self) -> str:
        """The mask it is, for :meth:`PeakRule.describe`: ``brain mask``, ``foreground`` or ``whole volume``."""
        return "brain mask" if self.name == "brain" else self.name


def foreground_mask(mean: np.ndarray, masks: dict[str, np.ndarray],
                    brain_mask: np.ndarray | None = None) -> tuple[np.ndarray, CountedRegion]:
    """The voxels that the verdict's percentage counts, and what they are: the given ``brain_mask`` (voxels ≥ 0.5)
    where there is one, else the brain (sum of the tissue masks ≥ 0.5) when masks are given, else the SR mean above
    10 % of its robust (0.5-99.5 percentile) range, holes filled (the foreground: the head, not the brain)."""
    if brain_mask is not None:
        fg, region = brain_mask >= 0.5, CountedRegion("brain", "the given brain mask")
    elif masks:
        fg, region = sum(masks.values()) >= 0.5, CountedRegion("brain", "tissue masks, summed probability ≥ 0.5")
    else:
        fg, region = foreground(mean), CountedRegion("foreground", "SR mean above 10 % of its robust intensity range")
    return (fg, region) if fg.any() else (np.ones_like(mean, dtype=bool), CountedRegion("whole volume"))


def slice_profile(risk: np.ndarray, fg: np.ndarray, threshold: float, axis: int) -> dict[str, list[float]]:
    """Mean risk and flagged fraction inside the foreground, per slice along voxel ``axis`` (NaN: no foreground)."""
    r, f = np.moveaxis(risk, axis, 0), np.moveaxis(fg, axis, 0)
    n = f.reshape(len(f), -1).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (r * f).reshape(len(r), -1).sum(axis=1) / n
        frac = ((r > threshold) & f).reshape(len(r), -1).sum(axis=1) / n
    return {"slice": list(range(len(r))), "mean_risk": mean.tolist(), "flagged_fraction": frac.tolist()}
