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

What ``λ̂`` multiplies is an :class:`~gen_sr.risk.IntervalShape`: the sample std ``σ`` by default, or ``σ`` plus a
noise floor and an edge term. The sample spread misses what is the same in every sample (the autoencoder's error at
edges, the measurement noise the projection keeps), and how much of that a volume holds depends on the region: with
the plain std, a calibration fitted on mid-brain slabs under-covers a pole of the brain. :func:`choose_shape` picks
the shape whose calibration transfers best when each calibration volume is left out in turn
(:func:`transfer_coverage`); the guarantee then holds for that shape (chosen on the same volumes, so only
approximately).

Units: :func:`split_units` cuts volumes into blocks of equal brain volume, so that the mean of the units' miss rates
is the miss rate over voxels. ``calibration.json`` in a model folder holds the result; the pipeline then reports
``risk = λ̂ u`` as a fraction of the input's robust intensity range: the half-width of the calibrated interval.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.stats import binom
from tqdm.auto import tqdm

from gen_sr.eval.cases import Case, SRModel, balanced_cuts, cases_noise_std, super_resolve
from gen_sr.eval.metrics import foreground
from gen_sr.eval.uncertainty import miss_rate
from gen_sr.io import atomic_write
from gen_sr.physics import estimate_noise_std
from gen_sr.risk import (
    NOISE_UNKNOWN_SHAPE,
    Calibration,
    CalibrationMismatchWarning,
    IntervalShape,
    SamplingSettings,
)

__all__ = [
    "SHAPE_CANDIDATES",
    "CalibrationResult",
    "CalibrationVolume",
    "calibrate",
    "calibrate_per_grid",
    "calibration_volumes",
    "case_grid",
    "check_calibration_settings",
    "choose_shape",
    "fit_calibration",
    "fit_shape",
    "fit_volumes",
    "hb_p_value",
    "interval_shape",
    "minimum_units",
    "pooled_rmse",
    "rule_bound",
    "split_units",
    "transfer_coverage",
    "unknown_noise_volumes",
    "upper_bound",
    "volumes_and_settings",
]


def hb_p_value(risk_hat: float | np.ndarray, n: int, alpha: float) -> float | np.ndarray:
    """Hoeffding–Bentkus p-value of the null "the mean loss exceeds ``alpha``" given the mean ``risk_hat`` of ``n``
    losses in [0, 1] (Bates et al. 2021, eq. 13); vectorised over ``risk_hat``."""
    r = np.asarray(risk_hat, dtype=np.float64)
    a = np.clip(np.minimum(r, alpha), 1e-12, 1 - 1e-12)
    kl = a * np.log(a / alpha) + (1 - a) * np.log((1 - a) / (1 - alpha))
    p = np.minimum(np.exp(-n * kl), math.e * binom.cdf(np.ceil(n * r), n, alpha))
    return float(p) if p.ndim == 0 else p


def minimum_units(method: str, alpha: float, delta: float, bound: str = "hb") -> int:
    """The fewest calibration units with which ``method`` can certify miss rate ``alpha`` at all (even when no voxel
    of any unit misses): CRC needs ``1 / (n + 1) <= alpha``; RCPS needs its upper bound at zero risk below ``alpha``."""
    if method == "crc":
        return math.ceil(1 / alpha - 1 - 1e-9)
    if bound == "hoeffding":
        return math.ceil(math.log(1 / delta) / (2 * alpha**2))
    return math.ceil(math.log(delta) / math.log(1 - alpha))


def rule_bound(method: str, risk_hat: float, n: int, delta: float, bound: str = "hb") -> float:
    """The bound a rule holds the miss rate to at a scale whose mean miss rate on ``n`` units is ``risk_hat``
    (:attr:`gen_sr.risk.Calibration.risk_upper`): for ``"crc"``, the conformal ``(n · risk_hat + 1) / (n + 1)`` (at
    most ``α`` at ``λ̂``); for ``"rcps"``, the ``1 − δ`` upper confidence bound ``bound`` (:func:`upper_bound`)."""
    if method == "crc":
        return (n * risk_hat + 1) / (n + 1)
    return upper_bound(risk_hat, n, delta, bound)


def upper_bound(risk_hat: float, n: int, delta: float, bound: str = "hb") -> float:
    """``1 − δ`` upper confidence bound of the mean loss (for reporting; the Hoeffding–Bentkus one by bisection)."""
    if bound == "hoeffding":
        return min(1.0, risk_hat + math.sqrt(math.log(1 / delta) / (2 * n)))
    lo, hi = risk_hat, 1.0
    for _ in range(60):  # the largest α that is still not rejected at level δ
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if hb_p_value(risk_hat, n, mid) > delta else (lo, mid)
    return hi


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
        need = minimum_units(method, alpha, delta, bound)
        if n < need:
            raise ValueError(f"no scale reaches a miss rate of {alpha:g} with {n} units: this rule needs at least "
                             f"{need} units even when nothing misses; use more calibration units, or a larger alpha "
                             "or delta")
        allowed = (f" (with {n} units {method} allows {((n + 1) * alpha - 1) / n:.3f})" if method == "crc" else
                   f" (rcps needs the miss rate's {1 - delta:g} upper bound below {alpha:g}, which {n} units do not "
                   "give there)")
        raise ValueError(f"no scale up to {max_scale:g} reaches a miss rate of {alpha:g} with {n} units: even there "
                         f"{risk[-1]:.3f} of the voxels miss{allowed}, where the std is about 0 and the mean errs; "
                         "use more calibration units, or a larger alpha or delta")
    first = len(ok) - int(np.argmin(ok[::-1])) if not ok.all() else 0
    scale = float(grid[first])
    return Calibration(scale=scale, alpha=alpha, delta=delta, method=method,
                       bound=bound if method == "rcps" else "", num_volumes=n, risk_hat=float(risk[first]),
                       risk_upper=rule_bound(method, float(risk[first]), n, delta, bound), details=dict(details or {}))


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
        return 1.0 - float(miss_rate(self.error, u, calibration.scale_map(), self.mask))


def calibration_volumes(
    pipe: SRModel,
    cases: Sequence[Case],
    *,
    masks: Callable[[Case], np.ndarray] | None = None,
    progress: bool = True,
    cache: str | Path | None = None,
    **pipe_kwargs: Any,
) -> list[CalibrationVolume]:
    """Super-resolve calibration cases.

    Args:
        pipe: the pipeline.
        cases: :class:`gen_sr.eval.cases.Case` objects (HR truth, simulated LR, operator, noise level).
        masks: per case, the voxels that count (default: the reference's foreground).
        cache: a folder (made where missing) that keeps each case's truth, mean and std (``<name>.npz``, written
            atomically) and reuses them on the next call, for benchmarks that re-analyse; it does not record the
            pipeline's settings.
        pipe_kwargs: passed to the pipeline.
    """
    volumes = []
    for case in tqdm(cases, desc="calibrate", unit="volume", disable=not progress):
        hr, mean, std = _super_resolved(pipe, case, cache, pipe_kwargs)
        mask = masks(case) if masks is not None else foreground(hr)
        volumes.append(CalibrationVolume(case.name, hr - mean, mean, std, np.asarray(mask, dtype=bool),
                                         case.noise_std))
    return volumes


def _super_resolved(pipe: SRModel, case: Case, cache: str | Path | None,
                    pipe_kwargs: dict[str, Any]) -> tuple[np.ndarray, ...]:
    """``(truth, mean, std)`` of one case in float64, from ``cache`` where it holds them (stored as float32; a first
    run returns the stored values too)."""
    keys = ("hr", "mean", "std")
    path = None if cache is None else Path(cache) / (case.name.replace(" ", "_") + ".npz")
    if path is not None and path.exists():
        with np.load(path) as z:
            arrays = [z[k] for k in keys]
    else:
        with warnings.catch_warnings():  # a calibration uses the mean and std, not the model's risk map
            warnings.simplefilter("ignore", CalibrationMismatchWarning)
            out = super_resolve(pipe, case, output_type="np", keep_samples=False, **pipe_kwargs)
        arrays = [case.hr.data, out.mean, out.std]
        if path is not None:
            arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
            path.parent.mkdir(parents=True, exist_ok=True)
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


def fit_shape(volumes: Sequence[CalibrationVolume], shape: IntervalShape = IntervalShape(), *, blocks: int = 1,
              axis: int = 0, **fit: Any) -> Calibration:
    """:func:`fit_calibration` on the units of ``volumes`` (:func:`split_units`) for the spread of ``shape``, which
    the returned calibration records. ``fit``: :func:`fit_calibration` options."""
    cal = fit_calibration(*split_units(volumes, shape, blocks=blocks, axis=axis), **fit)
    cal.shape = shape
    return cal


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
    rows = []
    for shape in tqdm(candidates, desc="interval shapes", unit="shape", disable=not progress):
        cov = transfer_coverage(volumes, shape, blocks=blocks, axis=axis, alpha=alpha, **fit)
        rows.append({"shape": dataclasses.asdict(shape), "coverages": cov,
                     "rms": float(np.sqrt(np.mean((np.asarray(cov) - (1 - alpha)) ** 2)))})
    best = min(range(len(rows)), key=lambda i: rows[i]["rms"])
    return candidates[best], rows


_OTHER_RULE = {"rcps": "crc", "crc": "rcps"}


@dataclass
class CalibrationResult:
    """What :func:`calibrate` found.

    Attributes:
        calibration: the fitted calibration (its ``details`` say where the data came from).
        transfer: each volume's coverage when the others calibrate (``None`` when that could not be fitted).
        transfer_error: why there is no transfer check, when there is none.
        alternative: the other rule (``crc`` for ``rcps`` and back) fitted on the same units, for comparison, or
            ``None`` when it cannot certify with them.
        alternative_error: why there is no alternative, when there is none.
        rmse: the root-mean-square error of the mean over the volumes' masks, voxels pooled, in the volumes' units
            (the calibration's ``details`` record it too): how well the model did on the calibration cases.
    """

    calibration: Calibration
    transfer: list[float] | None = None
    transfer_error: str | None = None
    alternative: Calibration | None = None
    alternative_error: str | None = None
    rmse: float | None = None


def pooled_rmse(volumes: Sequence[CalibrationVolume]) -> float:
    """The root-mean-square error of the mean over all volumes' mask voxels together."""
    squares = sum(float(np.sum(v.error[v.mask] ** 2)) for v in volumes)
    count = sum(int(v.mask.sum()) for v in volumes)
    return math.sqrt(squares / count) if count else float("nan")


def check_calibration_settings(num_volumes: int, *, alpha: float = 0.1, delta: float = 0.1,
                               method: str = "rcps", blocks: int = 1, interval: str = "std") -> None:
    """Refuse, before any sampling, settings that :func:`calibrate` cannot use (raises ``ValueError``)."""
    if not (0 < alpha < 1 and 0 < delta < 1):
        raise ValueError(f"alpha and delta must lie strictly between 0 and 1, got {alpha:g} and {delta:g}")
    if method not in ("rcps", "crc"):
        raise ValueError(f"method must be 'rcps' or 'crc', not {method!r}")
    if interval not in ("std", "auto"):
        raise ValueError(f"interval must be 'std' or 'auto', not {interval!r}")
    if blocks < 1:
        raise ValueError(f"blocks must be at least 1, got {blocks}")
    if num_volumes * blocks < 2:
        raise ValueError(f"calibration needs at least 2 units; {num_volumes} volume(s) x {blocks} block(s) give "
                         f"{num_volumes * blocks} (add volumes or --blocks)")
    if interval == "auto" and num_volumes < 3:
        raise ValueError(f"interval 'auto' chooses between shapes by leaving one volume out, and needs at least 3 "
                         f"volumes; got {num_volumes} (add volumes, or use interval 'std')")
    need = minimum_units(method, alpha, delta)
    or_delta = " or delta, or use crc" if method == "rcps" else ""  # delta is rcps's only
    if num_volumes * blocks < need:
        raise ValueError(f"{method} cannot reach a miss rate of {alpha:g} with {num_volumes * blocks} units "
                         f"({num_volumes} volume(s) x {blocks} block(s)): it needs at least {need} even when nothing "
                         f"misses (add volumes or --blocks, or raise alpha{or_delta})")


def calibrate(pipe: SRModel, cases: Sequence[Case], *, alpha: float = 0.1, delta: float = 0.1,
              method: Literal["rcps", "crc"] = "rcps", blocks: int = 1, axis: int = 0,
              interval: Literal["std", "auto"] = "std", details: dict[str, Any] | None = None, progress: bool = True,
              cache: str | Path | None = None, masks: Callable[[Case], np.ndarray] | None = None,
              noise_known: bool = True, per_mm: bool = False, **pipe_kwargs: Any) -> CalibrationResult:
    """Calibrate a model on simulated cases: super-resolve them, cut them into units, choose the interval shape
    (``interval="auto"``), fit ``λ̂`` and check how it transfers between volumes. The settings are checked before
    any sampling (:func:`check_calibration_settings`).

    Args:
        pipe: the model; its calibrations are not changed (to keep the result: ``pipe.calibrations =
            pipe.calibrations.with_record(result.calibration)``, then ``save_pretrained``).
        cases: calibration cases, exchangeable with the scans the model will see.
        alpha, delta, method: the rule (see :func:`fit_calibration`).
        blocks, axis: units per volume, cut along ``axis`` of the HR grid (:func:`split_units`).
        interval: ``"std"`` for ``mean ± λ̂·std``, or ``"auto"`` to choose a spread (:func:`choose_shape`).
        details: recorded in the calibration (where the data came from); units and transfer are added.
        progress, cache, masks: see :func:`calibration_volumes`.
        noise_known: ``False`` to calibrate runs whose noise std is not known (a scan without air): the cases are
            run without their noise std, and the interval is :data:`~gen_sr.risk.NOISE_UNKNOWN_SHAPE`'s, with each
            volume's noise read in-plane from its slices (:func:`unknown_noise_volumes`).
        per_mm: one scale per mm of the output voxel size, for every grid of the cases (``mean ± λ × voxel size ×
            std``; :attr:`~gen_sr.risk.Calibration.scale_per_mm`): each volume's std is weighed by its grid
            (:func:`case_grid`) before the fit. The samples' spread narrows as the voxels coarsen while the error
            does not, so the scale a plain std needs grows with the voxel size (``benchmarks/CALIBRATION_GRID.md``:
            adopted for runs with a noise std; the records of noise-free runs did not scale so). The plain std only
            (``interval="std"``), for runs whose noise is known.
        pipe_kwargs: for the pipeline call (``num_samples``, ``num_inference_steps``, ``generator``, ...).

    Raises:
        ValueError: unusable settings (before sampling), or a rule that cannot certify with these units.
    """
    check_calibration_settings(len(cases), alpha=alpha, delta=delta, method=method, blocks=blocks,
                               interval=interval)
    refit = pipe.sampling_settings(noise_std=cases_noise_std(cases), **pipe_kwargs).refit_disagreement
    if per_mm and (interval != "std" or not noise_known or not cases_noise_std(cases) or not refit):
        raise ValueError("a scale per mm of the voxel size is fitted for the plain std of runs with a noise std, which "
                         "refit the data where they disagree: not with interval 'auto', for runs whose noise is not "
                         "known, on noise-free volumes (their scales did not grow so with the voxel size) or without "
                         "the refit (whose records are the noise-free runs')")
    if per_mm and len({case_grid(c) for c in cases}) < 2:
        warnings.warn("every calibration volume is on one output grid: a scale per mm of the voxel size is then that "
                      "grid's scale over its voxel size, and holds near that grid only; add volumes on another grid "
                      "(e.g. resampled to 1.5 mm)", stacklevel=2)
    volumes, sampling = volumes_and_settings(pipe, cases, masks=masks, progress=progress, cache=cache,
                                             noise_known=noise_known, **pipe_kwargs)
    if per_mm:
        volumes = [dataclasses.replace(v, std=v.std * case_grid(c)) for v, c in zip(volumes, cases, strict=True)]
    result = fit_volumes(volumes, alpha=alpha, delta=delta, method=method, blocks=blocks, axis=axis,
                         interval=interval, details=details, progress=progress, sampling=sampling,
                         shape=interval_shape(noise_known))
    grids = tuple(sorted({case_grid(c) for c in cases}))

    def on_grids(cal: Calibration | None) -> Calibration | None:  # where it holds; per mm of the voxel size
        if cal is None:
            return None
        return dataclasses.replace(cal, fitted_grids=grids, scale_per_mm=cal.scale if per_mm else None)

    return dataclasses.replace(result, calibration=on_grids(result.calibration),
                               alternative=on_grids(result.alternative))


def case_grid(case: Case) -> float:
    """A case's output grid: the finest spacing of its HR volume, in mm (to 0.01 mm), as
    :attr:`gen_sr.run_record.RunRecord.grid_spacing` reads a run's."""
    return round(float(min(case.hr.spacing)), 2)


def calibrate_per_grid(pipe: SRModel, cases: Sequence[Case], *, alpha: float = 0.1, delta: float = 0.1,
                       method: Literal["rcps", "crc"] = "rcps", blocks: int = 1, axis: int = 0,
                       interval: Literal["std", "auto"] = "std", details: dict[str, Any] | None = None,
                       progress: bool = True, cache: str | Path | None = None,
                       masks: Callable[[Case], np.ndarray] | None = None, noise_known: bool = True,
                       **pipe_kwargs: Any) -> list[CalibrationResult]:
    """:func:`calibrate` apart for each output grid of the cases (:func:`case_grid`): the cases are super-resolved
    once, and each grid's volumes are fitted on their own, in order of the grids; each record carries its
    ``grid_spacing``, so that a run on that grid uses it (:meth:`gen_sr.risk.Calibrations.find`). The output grid sets
    the scale the std needs (``benchmarks/CALIBRATION_GRID.md``). Arguments as :func:`calibrate`'s; every grid needs
    the units its rule asks for."""
    grids = sorted({case_grid(c) for c in cases})
    for grid in grids:
        check_calibration_settings(sum(case_grid(c) == grid for c in cases), alpha=alpha, delta=delta, method=method,
                                   blocks=blocks, interval=interval)
    volumes, sampling = volumes_and_settings(pipe, cases, masks=masks, progress=progress, cache=cache,
                                             noise_known=noise_known, **pipe_kwargs)
    results = []
    for grid in grids:
        chosen = [v for v, c in zip(volumes, cases, strict=True) if case_grid(c) == grid]
        result = fit_volumes(chosen, alpha=alpha, delta=delta, method=method, blocks=blocks, axis=axis,
                             interval=interval, details={**(details or {}), "grid_spacing": grid}, progress=progress,
                             sampling=sampling, shape=interval_shape(noise_known))
        record = dataclasses.replace(result.calibration, grid_spacing=grid)
        results.append(dataclasses.replace(result, calibration=record))
    return results


def volumes_and_settings(pipe: SRModel, cases: Sequence[Case], *, masks: Callable[[Case], np.ndarray] | None,
                         progress: bool, cache: str | Path | None, noise_known: bool = True,
                         in_plane: float | None = None,
                         **pipe_kwargs: Any) -> tuple[list[CalibrationVolume], SamplingSettings]:
    """The calibration volumes of ``cases`` (:func:`calibration_volumes`; :func:`unknown_noise_volumes`, with
    ``in_plane``, where the noise is not known) and the sampler settings they were made with (a noise-free case set
    has no refit)."""
    if not noise_known:
        volumes = unknown_noise_volumes(pipe, cases, masks=masks, progress=progress, cache=cache, in_plane=in_plane,
                                        **pipe_kwargs)
        return volumes, pipe.sampling_settings(noise_std=0.0, noise_known=False, **pipe_kwargs)
    volumes = calibration_volumes(pipe, cases, masks=masks, progress=progress, cache=cache, **pipe_kwargs)
    return volumes, pipe.sampling_settings(noise_std=cases_noise_std(cases), **pipe_kwargs)


def unknown_noise_volumes(pipe: SRModel, cases: Sequence[Case], *, in_plane: float | None = None,
                          **kwargs: Any) -> list[CalibrationVolume]:
    """The calibration volumes of runs whose noise std is not known: each case super-resolved without its noise std
    (exact projections onto its slices, noise and all, as a scan without air is), and each volume's ``noise_std`` the
    one read in-plane from its slices (:func:`~gen_sr.physics.estimate_noise_std` across their coarsest axis, as the
    pipeline reads it), which :data:`~gen_sr.risk.NOISE_UNKNOWN_SHAPE` counts. ``in_plane``: that noise std for every
    case, where all were cut from one scan and it was read on the scan's own slices (the per-scan problems of
    :func:`gen_sr.eval.scan_calibration.calibrate_on_scan`, one voxel thick, have no slices of their own to read it
    in). ``kwargs``: as :func:`calibration_volumes`'."""
    blind = [dataclasses.replace(c, noise_std=0.0) for c in cases]
    volumes = calibration_volumes(pipe, blind, **kwargs)
    return [dataclasses.replace(v, noise_std=estimate_noise_std(c.lr.data, int(np.argmax(c.lr.spacing)))
                                if in_plane is None else in_plane)
            for v, c in zip(volumes, cases, strict=True)]


def interval_shape(noise_known: bool) -> IntervalShape:
    """The interval of a calibration with ``interval="std"``: the plain std, or for runs whose noise is not known
    :data:`~gen_sr.risk.NOISE_UNKNOWN_SHAPE`."""
    return IntervalShape() if noise_known else NOISE_UNKNOWN_SHAPE


def fit_volumes(volumes: Sequence[CalibrationVolume], *, alpha: float = 0.1, delta: float = 0.1,
                method: Literal["rcps", "crc"] = "rcps", blocks: int = 1, axis: int = 0,
                interval: Literal["std", "auto"] = "std", details: dict[str, Any] | None = None,
                progress: bool = False, sampling: SamplingSettings | None = None,
                shape: IntervalShape = IntervalShape()) -> CalibrationResult:
    """The fitting half of :func:`calibrate`, on volumes already super-resolved (:func:`calibration_volumes`): choose
    the interval shape (``interval="auto"``), fit ``λ̂`` on the volumes' units, check how it transfers between volumes
    and fit the other rule for comparison. ``sampling``: the settings the volumes were made with, recorded;
    ``shape``: the interval's spread where ``interval`` is ``"std"`` (default: the plain std)."""
    fit: dict[str, Any] = {"alpha": alpha, "delta": delta, "method": method}
    transfer, transfer_error = None, None
    if interval == "auto":  # every fit here leaves a volume out: with too few units, the rule cannot certify
        try:
            shape, rows = choose_shape(volumes, blocks=blocks, axis=axis, progress=progress, **fit)
        except ValueError as e:
            raise ValueError(f"cannot choose the interval shape: {e} (use more blocks or volumes, or interval "
                             "'std')") from e
        transfer = next(r["coverages"] for r in rows if IntervalShape(**r["shape"]) == shape)
    elif len(volumes) >= 2:
        try:
            transfer = transfer_coverage(volumes, shape, blocks=blocks, axis=axis, **fit)
        except ValueError as e:
            transfer_error = f"with a volume left out, {e}"
    units = split_units(volumes, shape, blocks=blocks, axis=axis)  # once: the spreads are the costly part
    rmse = pooled_rmse(volumes)
    record = {**(details or {}), "volumes": [v.name for v in volumes], "blocks_per_volume": blocks,
              "units": len(units[0]), "interval": interval if interval == "auto" else shape.describe(),
              "leave_one_volume_out_coverage": transfer, "rmse": rmse}
    result = CalibrationResult(dataclasses.replace(fit_calibration(*units, **fit, details=record), shape=shape,
                                                   sampling=sampling), transfer, transfer_error, rmse=rmse)
    try:  # the other rule on the same units, for comparison
        alternative = fit_calibration(*units, **(fit | {"method": _OTHER_RULE[method]}))
        result.alternative = dataclasses.replace(alternative, shape=shape, sampling=sampling)
    except ValueError as e:
        result.alternative_error = str(e)
    return result
