"""The baselines every SR claim is measured against, on the same grid and in the same masks as the model.

* Interpolation between the LR voxel centres onto the HR grid (:data:`BASELINES`): trilinear, cubic B-spline and
  k-space zero-filling (sinc: the Dirichlet kernel, exact on band-limited signals); see
  :meth:`gen_sr.physics.AcquisitionOperator.interpolate`.
* A deterministic regression model: the same UNet trained with L1 instead of diffusion, one config away
  (``--unet.objective=regression --noise_schedule.prediction_type=sample``). It is a pipeline like the model, run
  with one sample by :func:`gen_sr.eval.evaluate.evaluate` (``regression=``), so it needs nothing here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from gen_sr.physics import CUBIC_MIN_SAMPLES, interpolation_method

if TYPE_CHECKING:
    from gen_sr.eval.cases import Case
    from gen_sr.physics import AcquisitionOperator

__all__ = ["BASELINES", "baseline", "baseline_note", "baseline_notes", "linear_axes"]

BASELINES = {"trilinear": "linear", "cubic": "cubic", "sinc": "sinc"}
"""Baseline name → :meth:`AcquisitionOperator.interpolate` method."""


def linear_axes(operator: AcquisitionOperator, name: str) -> tuple[int, ...]:
    """The axes along which baseline ``name`` interpolates linearly though it is named otherwise: for ``cubic``,
    the axes ``operator`` interpolates along (:attr:`~gen_sr.physics.AcquisitionOperator.axes`) with fewer than
    :data:`~gen_sr.physics.CUBIC_MIN_SAMPLES` LR samples (:func:`~gen_sr.physics.interpolation_method`); ``()`` for
    any other baseline."""
    method = BASELINES[name]
    return tuple(a for a in operator.axes if interpolation_method(method, operator.lr_shape[a]) != method)


def baseline_note(operator: AcquisitionOperator, name: str) -> str | None:
    """What baseline ``name`` computed on ``operator``'s input where that is not what it is named, as a sentence for
    the note under a table of baselines (the audit report's, ``gen-sr evaluate``'s), e.g. ``cubic: ... linear
    interpolation, so its figures are trilinear's``; ``None`` where it is what it is named (:func:`linear_axes`)."""
    axes = linear_axes(operator, name)
    if not axes:
        return None
    n = [operator.lr_shape[a] for a in axes]
    where = " and ".join(f"RAS+ axis {a} ({k} slice{'' if k == 1 else 's'})" for a, k in zip(axes, n, strict=True))
    linear = next(b for b, method in BASELINES.items() if method == "linear")
    same = (f"so its figures are {linear}'s" if set(axes) == set(operator.axes)
            else "so it is cubic along the other axes only")
    return (f"{name}: the input has too few slices for a cubic spline (at least {CUBIC_MIN_SAMPLES}) along {where}, "
            f"where it was computed as linear interpolation, {same}")


def baseline_notes(cases: Sequence[Case], names: Sequence[str] = tuple(BASELINES)) -> list[str]:
    """:func:`baseline_note` of each baseline in ``names`` over ``cases``, each note once, naming the volumes it is
    about where it is not about every case."""
    volumes: dict[str, list[str]] = {}
    for case in cases:
        for name in names:
            if (note := baseline_note(case.operator, name)) is not None:
                volumes.setdefault(note, []).append(case.name)
    return [note if len(of) == len(cases) else f"{note} (volumes {', '.join(of)})" for note, of in volumes.items()]


def baseline(case: Case, name: str) -> np.ndarray:
    """A baseline reconstruction of the case on the HR grid ``(X, Y, Z)`` (see :data:`BASELINES`)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}")
    return case.operator.interpolate(case.lr_tensor(), BASELINES[name])[0, 0].numpy()
