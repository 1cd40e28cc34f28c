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

``calibration.json`` in a model folder holds the result; the pipeline then reports ``risk = λ̂ σ`` as a fraction of
the input's robust intensity range: the half-width of the calibrated interval.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.stats import binom

from gen_sr.volume import atomic_write

__all__ = ["CALIBRATION_FILE", "Calibration", "calibration_units", "fit_calibration", "hb_p_value", "miss_rate",
           "upper_bound"]

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


@dataclass
class Calibration:
    """A fitted interval scale; saved as ``calibration.json`` in a model folder.

    Attributes:
        scale: ``λ̂``: intervals are ``mean ± scale · std``.
        alpha: target miss rate (coverage ``1 − alpha``).
        delta: allowed probability that the guarantee fails (``"rcps"``).
        method: ``"rcps"`` or ``"crc"``.
        bound: the upper confidence bound of ``"rcps"``.
        num_volumes: calibration volumes used.
        risk_hat: mean miss rate on the calibration volumes at ``scale``.
        risk_upper: its ``1 − δ`` upper bound.
        details: where the calibration data came from (free-form, recorded as given).
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


def calibration_units(
    pipe: Any,
    cases: Sequence[Any],
    *,
    masks: Callable[[Any], np.ndarray] | None = None,
    blocks: int = 1,
    block_axis: int = 0,
    progress: bool = True,
    **pipe_kwargs: Any,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Super-resolve calibration cases and cut the results into exchangeable units.

    Args:
        pipe: the pipeline.
        cases: :class:`gen_sr.eval.evaluate.Case` objects (HR truth, simulated LR, operator).
        masks: per case, the voxels that count (default: the reference's foreground).
        blocks: cut every case into this many slabs along RAS+ ``block_axis``, each one unit. With one template
            (as in the demo) this is the only way to get enough units; slabs of one volume are only approximately
            exchangeable, which the calibration record says.
        pipe_kwargs: passed to the pipeline.

    Returns:
        ``(errors, stds, masks)``, one entry per unit.
    """
    from tqdm.auto import tqdm

    from gen_sr.eval.evaluate import super_resolve
    from gen_sr.eval.metrics import region_masks

    errors, stds, unit_masks = [], [], []
    for case in tqdm(cases, desc="calibrate", unit="volume", disable=not progress):
        out = super_resolve(pipe, case, output_type="np", keep_samples=False, **pipe_kwargs)
        mask = masks(case) if masks is not None else region_masks(case.hr.data)["brain"]
        err = case.hr.data.astype(np.float64) - out.mean
        for part in zip(*(np.array_split(a, blocks, axis=block_axis) for a in (err, out.std, mask)), strict=True):
            if part[2].any():
                errors.append(part[0])
                stds.append(part[1])
                unit_masks.append(part[2])
    return errors, stds, unit_masks
