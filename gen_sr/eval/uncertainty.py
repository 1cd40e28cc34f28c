"""How good an uncertainty map is, measured against the true error.

All functions take flat or shaped numpy arrays of the same size (``std``: the predicted uncertainty per voxel,
``error``: the true absolute error ``|estimate − reference|``) and an optional boolean ``mask`` of the voxels that
count.

* :func:`spearman`: rank correlation of ``std`` with ``|error|``; :func:`spearman_ceiling`: what it would be if the
  errors were drawn from ``N(0, std²)``, the most a map of that shape can reach.
* :func:`sparsification`: the sparsification curves and AUSE (area between the curve of ``std`` and the oracle's).
* :func:`calibration_curve`, :func:`uce`, :func:`ence`: binned calibration of predicted against observed error.
* :func:`coverage`, :func:`miss_rate`: empirical coverage of ``mean ± k·std`` intervals, and its complement.
* :func:`auroc`: how well a score separates two classes of voxels (e.g. risk against ``|error| > τ``).
"""

from __future__ import annotations

import numpy as np
from scipy.integrate import trapezoid
from scipy.stats import rankdata

__all__ = ["auroc", "calibration_curve", "coverage", "ence", "miss_rate", "sparsification", "spearman",
           "spearman_ceiling", "uce", "uncertainty_report"]


def _flat(*arrays: np.ndarray | None, mask: np.ndarray | None = None) -> list[np.ndarray]:
    out = []
    for a in arrays:
        a = np.asarray(a, dtype=np.float64)
        out.append((a[np.asarray(mask, dtype=bool)] if mask is not None else a).ravel())
    if len({a.size for a in out}) != 1:
        raise ValueError(f"arrays differ in size: {[a.size for a in out]}")
    return out


def auroc(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``labels`` (the Mann–Whitney U statistic, ties
    counted as one half). ``nan`` when one class is empty."""
    (s,) = _flat(scores, mask=mask)
    (pos,) = _flat(np.asarray(labels, dtype=bool), mask=mask)
    pos = pos.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(std: np.ndarray, error: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Spearman rank correlation of the predicted ``std`` with the absolute ``error``."""
    s, e = _flat(std, np.abs(error), mask=mask)
    if np.ptp(s) == 0 or np.ptp(e) == 0:
        return float("nan")
    return float(np.corrcoef(rankdata(s), rankdata(e))[0, 1])


def spearman_ceiling(std: np.ndarray, mask: np.ndarray | None = None, seed: int = 0) -> float:
    """The :func:`spearman` that ``std`` would reach if it were exactly right: against errors drawn from
    ``N(0, std²)`` per voxel (seeded). Even then ``|error|`` scatters around ``std`` (a half-normal's spread), so a
    ``std`` map that varies little from voxel to voxel ranks the error poorly however well it is calibrated: this is
    the most the map's own shape allows, and a measured Spearman near it means the map is as good as its shape."""
    (s,) = _flat(std, mask=mask)
    return spearman(s, s * np.random.default_rng(seed).standard_normal(s.shape))


def sparsification(std: np.ndarray, error: np.ndarray, mask: np.ndarray | None = None,
                   num_fractions: int = 50, measure: str = "mae") -> dict[str, list[float] | float]:
    """Sparsification curves and the area between them (AUSE).

    Voxels are removed in order of decreasing ``std`` (the model's curve) or of decreasing ``|error|`` (the oracle's
    curve); after removing each fraction, the error of the remaining voxels is recorded, normalised by the error of
    all voxels. A perfect uncertainty follows the oracle; AUSE is the area between the two curves (0 is perfect;
    a random ordering gives roughly the area under the oracle curve's complement).

    Args:
        std, error: per-voxel predicted std and signed or absolute error.
        num_fractions: fractions ``0, 1/n, …, (n−1)/n`` are removed.
        measure: ``"mae"`` or ``"rmse"`` of the remaining voxels.

    Returns:
        ``{"fractions", "model", "oracle", "random" (the constant 1), "ause"}``.
    """
    s, e = _flat(std, np.abs(error), mask=mask)
    if measure not in ("mae", "rmse"):
        raise ValueError(f"measure must be 'mae' or 'rmse', not {measure!r}")
    fractions = np.arange(num_fractions) / num_fractions

    def curve(order: np.ndarray) -> np.ndarray:
        kept = (e[order] if measure == "mae" else e[order] ** 2)[::-1]  # ascending uncertainty: keep the start
        totals = np.cumsum(kept)
        n_keep = np.maximum(1, np.round((1 - fractions) * e.size).astype(int))
        values = totals[n_keep - 1] / n_keep
        values = values if measure == "mae" else np.sqrt(values)
        return values / values[0] if values[0] > 0 else values

    model = curve(np.argsort(-s, kind="stable"))
    oracle = curve(np.argsort(-e, kind="stable"))
    ause = float(trapezoid(model - oracle, fractions))
    return {"fractions": fractions.tolist(), "model": model.tolist(), "oracle": oracle.tolist(), "ause": ause}


def calibration_curve(std: np.ndarray, error: np.ndarray, mask: np.ndarray | None = None,
                      num_bins: int = 10) -> dict[str, list[float]]:
    """Binned calibration: voxels in ``num_bins`` equal-count bins of ``std``; per bin, the root mean variance
    (RMV, the predicted error) and the observed RMSE. A calibrated ``std`` lies on the diagonal."""
    s, e = _flat(std, error, mask=mask)
    order = np.argsort(s, kind="stable")
    bins = [b for b in np.array_split(order, num_bins) if b.size]
    return {
        "rmv": [float(np.sqrt(np.mean(s[b] ** 2))) for b in bins],
        "rmse": [float(np.sqrt(np.mean(e[b] ** 2))) for b in bins],
        "count": [int(b.size) for b in bins],
    }


def uce(std: np.ndarray, error: np.ndarray, mask: np.ndarray | None = None, num_bins: int = 10) -> float:
    """Uncertainty calibration error (Laves et al. 2020): ``Σ_m (n_m / N) |MSE_m − mean σ²_m|`` over equal-count
    bins of ``std``, in squared intensity units."""
    c = calibration_curve(std, error, mask, num_bins)
    n = np.asarray(c["count"], dtype=np.float64)
    gap = np.abs(np.square(c["rmse"]) - np.square(c["rmv"]))
    return float(np.sum(n / n.sum() * gap))


def ence(std: np.ndarray, error: np.ndarray, mask: np.ndarray | None = None, num_bins: int = 10) -> float:
    """Expected normalised calibration error (Levi et al. 2019): ``mean_m |RMV_m − RMSE_m| / RMV_m`` (unitless)."""
    c = calibration_curve(std, error, mask, num_bins)
    rmv, rmse = np.asarray(c["rmv"]), np.asarray(c["rmse"])
    ok = rmv > 0
    return float(np.mean(np.abs(rmv[ok] - rmse[ok]) / rmv[ok])) if ok.any() else float("nan")


def miss_rate(error: np.ndarray, std: np.ndarray, lam: float | np.ndarray,
              mask: np.ndarray | None = None) -> np.ndarray:
    """Fraction of voxels whose truth lies outside ``mean ± λ·std`` (``|error| > λ·std``), for each ``λ``.

    Args:
        error: ``x − x̂`` (any shape).
        std: the spread, same shape.
        lam: one value or an array of them.
        mask: boolean, same shape; only these voxels count.

    Returns:
        An array shaped like ``lam``.
    """
    s, e = _flat(std, np.abs(error), mask=mask)
    # A voxel misses for every λ below its ratio |e| / σ: the miss rate is the ratios' survival function.
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(s > 0, e / s, np.where(e > 0, np.inf, 0.0))
    ratio.sort()
    return 1.0 - np.searchsorted(ratio, np.asarray(lam, dtype=np.float64), side="right") / max(ratio.size, 1)


def coverage(std: np.ndarray, error: np.ndarray, k: float | np.ndarray = 1.0,
             mask: np.ndarray | None = None) -> float | np.ndarray:
    """Fraction of voxels whose truth lies in ``mean ± k·std`` (``1 −`` :func:`miss_rate`); ``k`` may be an
    array."""
    covered = 1.0 - miss_rate(error, std, k, mask)
    return float(covered) if np.ndim(k) == 0 else covered


def uncertainty_report(std: np.ndarray, error: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """The summary figures of this module for one volume: Spearman, AUSE, UCE, ENCE, coverage at ±1σ and ±2σ."""
    return {
        "spearman": spearman(std, error, mask),
        "ause": float(sparsification(std, error, mask)["ause"]),
        "uce": uce(std, error, mask),
        "ence": ence(std, error, mask),
        "coverage_1sigma": float(coverage(std, error, 1.0, mask)),
        "coverage_2sigma": float(coverage(std, error, 2.0, mask)),
    }
