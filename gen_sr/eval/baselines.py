"""The baselines every SR claim is measured against, on the same grid and in the same masks as the model.

* Interpolation between the LR voxel centres onto the HR grid (:data:`BASELINES`): trilinear, cubic B-spline and
  k-space zero-filling (sinc: the Dirichlet kernel, exact on band-limited signals); see
  :meth:`gen_sr.physics.AcquisitionOperator.interpolate`.
* A deterministic regression model: the same UNet trained with L1 instead of diffusion, one config away
  (``--unet.objective=regression --noise_schedule.prediction_type=sample``). It is a pipeline like the model, run
  with one sample by :func:`gen_sr.eval.evaluate.evaluate` (``regression=``), so it needs nothing here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gen_sr.eval.cases import Case

__all__ = ["BASELINES", "baseline"]

BASELINES = {"trilinear": "linear", "cubic": "cubic", "sinc": "sinc"}
"""Baseline name → :meth:`AcquisitionOperator.interpolate` method."""


def baseline(case: Case, name: str) -> np.ndarray:
    """A baseline reconstruction of the case on the HR grid ``(X, Y, Z)`` (see :data:`BASELINES`)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}")
    return case.operator.interpolate(case.lr_tensor(), BASELINES[name])[0, 0].numpy()
