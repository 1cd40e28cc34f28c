"""Calibrating the sample std into intervals with a coverage guarantee.

The interval of a voxel is ``mean ± λ·σ``; its loss on a volume is the fraction of voxels (inside the evaluation
mask) whose truth falls outside, ``L(λ) = mean(|x − x̂| > λ σ)``, which never increases with ``λ``. Calibration
volumes are the exchangeable units (never voxels: the voxels of one volume are not independent). Two rules choose
``λ̂`` from the losses ``L_1 … L_n`` of ``n`` calibration volumes:

* ``"rcps"`` (default): a risk-controlling prediction set (Bates et al. 2021; Angelopoulos et al. 2022). ``λ̂`` is
  the smallest ``λ`` from which on an upper confidence bound of the mean loss stays at or below ``α``, so that with
  probability at least ``1 − δ`` over the calibration draw the expected miss rate on a new volume is at most
  ``α``. The bound is Hoeffding–Bentkus (``"hb"``) or Hoeffding (``"hoeffding"``). The price of the guarantee is
  conservatism: with few volumes, coverage lands above ``1 − α``.
* ``"crc"``: conformal risk control (Angelopoulos et al. 2023): the smallest ``λ`` with
  ``(n R̂(λ) + 1) / (n + 1) ≤ α``. It bounds the miss rate in expectation over the calibration draw, not with
  probability ``1 − δ``, and is tight: coverage lands within ``1 / (n + 1)`` of the target.

What ``λ̂`` multiplies is an :class:`IntervalShape`: the sample std ``σ`` by default, or ``σ`` plus a noise floor and
an edge term. The sample spread misses what is the same in every sample (the autoencoder's error at edges, the
measurement noise the projection keeps), and how much of that a volume holds depends on the region: with the plain
std, a calibration fitted on mid-brain slabs under-covers a pole of the brain. :func:`choose_shape` picks the shape
whose calibration transfers best when each calibration volume is left out in turn (:func:`transfer_coverage`); the
guarantee then holds for that shape (chosen on the same volumes, so only approximately).

Units: :func:`split_units` cuts volumes into blocks of equal brain volume, so that the mean of the units' miss rates
is the miss rate over voxels. ``calibration.json`` in a model folder holds the result; the pipeline then reports
``risk = λ̂ u`` as a fraction of the input's robust intensity range: the half-width of the calibrated interval.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d
from scipy.stats import binom

from gen_sr.volume import atomic_write

__all__ = ["CALIBRATION_FILE", "SHAPE_CANDIDATES", "Calibration", "CalibrationVolume", "IntervalShape",
           "balanced_cuts", "calibration_volumes", "choose_shape", "fit_calibration", "hb_p_value", "miss_rate",
           "split_units", "transfer_coverage", "upper_bound"]

CALIBRATION_FILE = "calibration.json"


def miss_rate(error: np.ndarray, std: np.ndarray, lam: float | np.ndarray,
              mask: np.ndarray | None = None) -> np.ndarray:
    """Fraction of voxels outside ``mean ± λ σ`` for each ``λ``.

    Args:
        error: ``x − x̂`` (any shape).
        std: ``σ``, same shape.
        lam: one value or an array of them.
        mask: boolean, same shape; only these voxels count.

    Returns:
        An array shaped like ``lam``.
    """
    e, s = np.abs(np.asarray(error, dtype=np.float64)), np.asarray(std, dtype=np.float64)
    if mask is not None:
        e, s = e[np.asarray(mask, dtype=bool)], s[np.asarray(mask, dtype=bool)]
    e, s = e.ravel(), s.ravel()
    # A voxel misses for every λ below its ratio |e| / σ: the miss rate is the ratios' survival function.
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(s > 0, e / s, np.where(e > 0, np.inf, 0.0))
    ratio.sort()
    lam_arr = np.asarray(lam, dtype=np.float64)
    return 1.0 - np.searchsorted(ratio, lam_arr, side="right") / max(ratio.size, 1)


def hb_p_value(risk_hat: float | np.ndarray, n: int, alpha: float) -> float | np.ndarray:
    """Hoeffding–Bentkus p-value of the null "the mean loss exceeds ``alpha``" given the mean ``risk_hat`` of ``n``
    losses in [0, 1] (Bates et al. 2021, eq. 13); vectorised over ``risk_hat``."""
    r = np.asarray(risk_hat, dtype=np.float64)
    a = np.clip(np.minimum(r, alpha), 1e-12, 1 - 1e-12)
    kl = a * np.log(a / alpha) + (1 - a) * np.log((1 - a) / (1 - alpha))
    p = np.minimum(np.exp(-n * kl), math.e * binom.cdf(np.ceil(n * r), n, alpha))
    return float(p) if p.ndim == 0 else p


def upper_bound(risk_hat: float, n: int, delta: float, bound: str = "hb") -> float:
    """``1 − δ`` upper confidence bound of the mean loss (for reporting; the Hoeffding–Bentkus one by bisection)."""
    if bound == "hoeffding":
        return min(1.0, risk_hat + math.sqrt(math.log(1 / delta) / (2 * n)))
    lo, hi = risk_hat, 1.0
    for _ in range(60):  # the largest α that is still not rejected at level δ
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if hb_p_value(risk_hat, n, mid) > delta else (lo, mid)
    return hi


@dataclass(frozen=True)
class IntervalShape:
    """Which per-voxel spread ``u`` the calibrated interval ``mean ± λ u`` scales; the default is the sample std.

    ``u = G_s * std + noise_floor · σ_noise + edge_weight · |∇(G_1 * mean)|``: the std, Gaussian-smoothed over
    ``smoothing`` voxels (eight samples estimate a std with about 25 % relative noise per voxel); a floor in units
    of the measurement noise std (noise the projection keeps in every sample, which their spread cannot show); and
    a term for edges, where the autoencoder's representation error concentrates and is the same in every sample.
    All three terms scale with the intensities, so ``λ`` does not depend on units.

    Attributes:
        smoothing: Gaussian sigma in voxels for the std (0: none).
        noise_floor: weight of the measurement noise std.
        edge_weight: weight of the gradient magnitude (per voxel) of the mean, smoothed over one voxel.
    """

    smoothing: float = 0.0
    noise_floor: float = 0.0
    edge_weight: float = 0.0

    def spread(self, std: torch.Tensor | np.ndarray, mean: torch.Tensor | np.ndarray,
               noise_std: float = 0.0) -> torch.Tensor | np.ndarray:
        """The spread ``u`` of volumes ``std`` and ``mean``, shaped ``(..., X, Y, Z)`` (the last three axes are
        spatial), returned as the type of ``std``; ``noise_std`` in the same units."""
        as_numpy = isinstance(std, np.ndarray)
        s = torch.from_numpy(np.array(std, dtype=np.float64)) if as_numpy else std
        u = _smooth(s, self.smoothing) if self.smoothing else s.clone()
        if self.noise_floor:
            u = u + self.noise_floor * float(noise_std)
        if self.edge_weight:
            m = torch.from_numpy(np.array(mean, dtype=np.float64)) if as_numpy else mean
            m = _smooth(m.to(u), 1.0)
            u = u + self.edge_weight * torch.stack(torch.gradient(m, dim=(-3, -2, -1))).square().sum(0).sqrt()
        return u.numpy() if as_numpy else u.to(std.dtype)


def _smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of the last three axes (reflecting at the borders)."""
    kernel = gaussian_1d(torch.tensor(float(sigma)), normalize=True).to(x)
    flat = x.reshape(-1, 1, *x.shape[-3:])
    return separable_filtering(flat, [kernel] * 3, mode="reflect").reshape(x.shape)


@dataclass
class Calibration:
    """A fitted interval scale; saved as ``calibration.json`` in a model folder.

    Attributes:
        scale: ``λ̂``: intervals are ``mean ± scale · u``, with ``u`` the spread of ``shape`` (the std by default).
        alpha: target miss rate (coverage ``1 − alpha``).
        delta: allowed probability that the guarantee fails (``"rcps"``).
        method: ``"rcps"`` or ``"crc"``.
        bound: the upper confidence bound of ``"rcps"``.
        num_volumes: calibration volumes used.
        risk_hat: mean miss rate on the calibration volumes at ``scale``.
        risk_upper: its ``1 − δ`` upper bound.
        details: where the calibration data came from (free-form, recorded as given).
        shape: the spread that ``scale`` multiplies (files without one mean the plain std).
    """

    scale: float
    alpha: float
    delta: float
    method: str
    bound: str
    num_volumes: int
    risk_hat: float
    risk_upper: float
    details: dict = field(default_factory=dict)
    shape: IntervalShape = field(default_factory=IntervalShape)

    def __post_init__(self) -> None:
        if isinstance(self.shape, dict):  # as read back from JSON
            self.shape = IntervalShape(**self.shape)

    def halfwidth(self, std: torch.Tensor | np.ndarray, mean: torch.Tensor | np.ndarray,
                  noise_std: float = 0.0) -> torch.Tensor | np.ndarray:
        """Half-width ``λ̂ u`` of the calibrated interval around ``mean`` (see :meth:`IntervalShape.spread`)."""
        return self.scale * self.shape.spread(std, mean, noise_std)

    def describe(self) -> str:
        """The interval in words, e.g. for run records and reports."""
        s = self.shape
        terms = [f"std smoothed over {s.smoothing:g} voxels" if s.smoothing else "std"]
        terms += [f"{s.noise_floor:g} x noise std"] if s.noise_floor else []
        terms += [f"{s.edge_weight:g} x |gradient of the mean|"] if s.edge_weight else []
        return f"mean ± {self.scale:.4g} x ({' + '.join(terms)})"

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CALIBRATION_FILE
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(asdict(self), indent=2) + "\n"))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Calibration | None:
        """The calibration of a model folder, or ``None`` when it has none."""
        path = Path(folder) / CALIBRATION_FILE
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))


def fit_calibration(
    errors: Sequence[np.ndarray],
    stds: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None] | None = None,
    *,
    alpha: float = 0.1,
    delta: float = 0.1,
    method: Literal["rcps", "crc"] = "rcps",
    bound: Literal["hb", "hoeffding"] = "hb",
    max_scale: float = 100.0,
    num_grid: int = 4000,
    details: dict | None = None,
) -> Calibration:
    """Choose ``λ̂`` from calibration volumes; see the module docstring.

    Args:
        errors: per volume, ``x − x̂`` (truth minus estimate), any shape.
        stds: per volume, the sample std, same shapes.
        masks: per volume, the voxels that count (e.g. the brain), or ``None`` for all.
        alpha, delta: the target miss rate and the failure probability.
        method, bound: the rule and, for ``"rcps"``, the upper confidence bound.
        max_scale, num_grid: the ``λ`` grid (geometric from ``1e-3`` to ``max_scale``, plus 0).

    Raises:
        ValueError: for fewer than 2 volumes, or when even ``max_scale`` cannot reach ``alpha``.
    """
    n = len(errors)
    if n < 2 or len(stds) != n:
        raise ValueError(f"calibration needs at least 2 volumes with one std map each, got {n} and {len(stds)}")
    if not (0 < alpha < 1 and 0 < delta < 1):
        raise ValueError(f"alpha and delta must lie in (0, 1), got {alpha} and {delta}")
    grid = np.concatenate([[0.0], np.geomspace(1e-3, max_scale, num_grid)])
    masks = list(masks) if masks is not None else [None] * n
    losses = np.stack([miss_rate(e, s, grid, m) for e, s, m in zip(errors, stds, masks, strict=True)])
    risk = losses.mean(axis=0)  # non-increasing along the grid
    if method == "crc":
        ok = (n * risk + 1) / (n + 1) <= alpha
    elif method == "rcps":
        if bound == "hb":
            ok = hb_p_value(risk, n, alpha) <= delta
        else:
            ok = risk + math.sqrt(math.log(1 / delta) / (2 * n)) <= alpha
    else:
        raise ValueError(f"method must be 'rcps' or 'crc', not {method!r}")
    # λ̂: the start of the last run of accepted values (every λ from there on is accepted)
    if not ok[-1]:
        need = {"crc": math.ceil(1 / alpha - 1), "hoeffding": math.ceil(math.log(1 / delta) / (2 * alpha**2)),
                "hb": math.ceil(math.log(delta) / math.log(1 - alpha))}["crc" if method == "crc" else bound]
        raise ValueError(f"no scale up to {max_scale} reaches a miss rate of {alpha} with {n} volumes "
                         f"(mean miss rate there: {risk[-1]:.3f}); this rule needs at least {need} volumes even "
                         "when nothing misses: use more calibration volumes, or a larger alpha or delta")
    first = len(ok) - int(np.argmin(ok[::-1])) if not ok.all() else 0
    scale = float(grid[first])
    return Calibration(scale=scale, alpha=alpha, delta=delta, method=method, bound=bound, num_volumes=n,
                       risk_hat=float(risk[first]), risk_upper=upper_bound(float(risk[first]), n, delta, bound),
                       details=dict(details or {}))


@dataclass
class CalibrationVolume:
    """One calibration volume, super-resolved, on the HR grid (``(X, Y, Z)`` arrays).

    Attributes:
        name: a label.
        error: ``truth − mean``.
        mean, std: the pipeline's estimate and sample std.
        mask: the voxels that count.
        noise_std: the measurement noise std, in the same units.
    """

    name: str
    error: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    mask: np.ndarray
    noise_std: float = 0.0

    def coverage(self, calibration: Calibration) -> float:
        """Fraction of the mask's voxels inside the calibrated interval."""
        u = calibration.shape.spread(self.std, self.mean, self.noise_std)
        return 1.0 - float(miss_rate(self.error, u, calibration.scale, self.mask))


def calibration_volumes(
    pipe: Any,
    cases: Sequence[Any],
    *,
    masks: Callable[[Any], np.ndarray] | None = None,
    progress: bool = True,
    cache: str | Path | None = None,
    **pipe_kwargs: Any,
) -> list[CalibrationVolume]:
    """Super-resolve calibration cases.

    Args:
        pipe: the pipeline.
        cases: :class:`gen_sr.eval.evaluate.Case` objects (HR truth, simulated LR, operator, noise level).
        masks: per case, the voxels that count (default: the reference's foreground).
        cache: a folder that keeps each case's truth, mean and std (``<name>.npz``, written atomically) and reuses
            them on the next call, for benchmarks that re-analyse; it does not record the pipeline's settings.
        pipe_kwargs: passed to the pipeline.
    """
    from tqdm.auto import tqdm

    from gen_sr.eval.metrics import region_masks

    volumes = []
    for case in tqdm(cases, desc="calibrate", unit="volume", disable=not progress):
        hr, mean, std = _super_resolved(pipe, case, cache, pipe_kwargs)
        mask = masks(case) if masks is not None else region_masks(hr)["brain"]
        volumes.append(CalibrationVolume(case.name, hr - mean, mean, std, np.asarray(mask, dtype=bool),
                                         case.noise_std))
    return volumes


def _super_resolved(pipe: Any, case: Any, cache: str | Path | None, pipe_kwargs: dict) -> tuple[np.ndarray, ...]:
    """``(truth, mean, std)`` of one case in float64, from ``cache`` where it holds them (stored as float32; a first
    run returns the stored values too)."""
    from gen_sr.eval.evaluate import super_resolve

    keys = ("hr", "mean", "std")
    path = None if cache is None else Path(cache) / (case.name.replace(" ", "_") + ".npz")
    if path is not None and path.exists():
        with np.load(path) as z:
            arrays = [z[k] for k in keys]
    else:
        out = super_resolve(pipe, case, output_type="np", keep_samples=False, **pipe_kwargs)
        arrays = [case.hr.data, out.mean, out.std]
        if path is not None:
            arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
            atomic_write(path, lambda tmp: np.savez_compressed(tmp, **dict(zip(keys, arrays, strict=True))))
    return tuple(np.asarray(a, dtype=np.float64) for a in arrays)


def split_units(
    volumes: Sequence[CalibrationVolume],
    shape: IntervalShape = IntervalShape(),
    *,
    blocks: int = 1,
    axis: int = 0,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Cut every volume into ``blocks`` slabs along ``axis``, each one calibration unit.

    With one template (as in the demo) this is the only way to get enough units; slabs of one volume are only
    approximately exchangeable, which the calibration record says. The slabs hold equal numbers of mask voxels (as
    nearly as whole slices allow), so that the mean of their miss rates is the miss rate over voxels: with equal-width
    slabs, a sliver of the brain's edge would weigh as much as its centre.

    Returns:
        ``(errors, spreads, masks)``, one entry per unit with any mask voxel; the spread is ``shape``'s.
    """
    parts = [_volume_units(v, shape.spread(v.std, v.mean, v.noise_std), blocks, axis) for v in volumes]
    return _concat(parts)


def balanced_cuts(mask: np.ndarray, parts: int, axis: int = 0) -> np.ndarray:
    """Indices along ``axis`` that cut ``mask`` into ``parts`` slabs holding equal numbers of mask voxels, as nearly
    as whole slices allow (for ``np.split``; duplicates dropped, so a small mask may give fewer slabs)."""
    counts = np.cumsum(np.moveaxis(mask, axis, 0).reshape(mask.shape[axis], -1).sum(1))
    return np.unique(np.searchsorted(counts, counts[-1] * np.arange(1, parts) / parts, side="right"))


def _volume_units(v: CalibrationVolume, spread: np.ndarray, blocks: int, axis: int) -> list[tuple]:
    """``(error, spread, mask)`` of each non-empty block of one volume (see :func:`split_units`)."""
    cuts = balanced_cuts(v.mask, blocks, axis)
    blocks_of = [np.split(a, cuts, axis=axis) for a in (v.error, spread, v.mask)]
    return [part for part in zip(*blocks_of, strict=True) if part[2].any()]


def _concat(parts: Sequence[list[tuple]]) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    units = [unit for part in parts for unit in part]
    return [u[0] for u in units], [u[1] for u in units], [u[2] for u in units]


def transfer_coverage(volumes: Sequence[CalibrationVolume], shape: IntervalShape = IntervalShape(), *,
                      blocks: int = 1, axis: int = 0, **fit: Any) -> list[float]:
    """Leave-one-volume-out: the coverage of each volume under a calibration fitted on the others' units.

    How far these land from ``1 − α`` is what a new volume should expect when it is not exchangeable with the
    calibration data (another region of the brain, another scanner). ``fit``: :func:`fit_calibration` options.
    """
    if len(volumes) < 2:
        raise ValueError("leave-one-out needs at least 2 calibration volumes")
    spreads = [shape.spread(v.std, v.mean, v.noise_std) for v in volumes]  # once per volume, not once per fold
    parts = [_volume_units(v, u, blocks, axis) for v, u in zip(volumes, spreads, strict=True)]
    result = []
    for k, left_out in enumerate(volumes):
        cal = fit_calibration(*_concat([p for j, p in enumerate(parts) if j != k]), **fit)
        result.append(1.0 - float(miss_rate(left_out.error, spreads[k], cal.scale, left_out.mask)))
    return result


SHAPE_CANDIDATES = tuple(IntervalShape(s, f, e) for s in (0.0, 1.0) for f in (0.0, 0.5, 1.0)
                         for e in (0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2))
"""The interval shapes :func:`choose_shape` tries by default (the plain std first)."""


def choose_shape(volumes: Sequence[CalibrationVolume], candidates: Sequence[IntervalShape] = SHAPE_CANDIDATES, *,
                 blocks: int = 1, axis: int = 0, alpha: float = 0.1, progress: bool = False,
                 **fit: Any) -> tuple[IntervalShape, list[dict]]:
    """The interval shape whose calibration transfers best between calibration volumes: the smallest root mean
    square distance of the leave-one-volume-out coverages (:func:`transfer_coverage`) from ``1 − α``; ties go to
    the earlier candidate. Needs at least 3 volumes.

    Returns:
        The shape and one row per candidate: ``{"shape", "coverages", "rms"}``.
    """
    if len(volumes) < 3:
        raise ValueError(f"choosing the interval shape needs at least 3 calibration volumes, got {len(volumes)}")
    from tqdm.auto import tqdm

    rows = []
    for shape in tqdm(candidates, desc="interval shapes", unit="shape", disable=not progress):
        cov = transfer_coverage(volumes, shape, blocks=blocks, axis=axis, alpha=alpha, **fit)
        rows.append({"shape": dataclasses.asdict(shape), "coverages": cov,
                     "rms": float(np.sqrt(np.mean((np.asarray(cov) - (1 - alpha)) ** 2)))})
    best = min(range(len(rows)), key=lambda i: rows[i]["rms"])
    return candidates[best], rows
