"""Per-scan calibration: conformal intervals fitted on the scan's own held-out in-plane slices.

A model adapted on a scan (:func:`gen_sr.training.adaptation.adapt`) kept some of its in-plane slices out of the
fine-tuning (``ModelCard.adapted.held_out_slices``). Those slices are high-resolution truth: degraded along each
in-plane axis in turn with the scan's own slices, they pose the same problem as the real through-plane one, and the
errors of the adapted model on them calibrate its interval (:func:`gen_sr.eval.calibration.calibrate`; each slice in
each direction cut into ``blocks`` units of equal foreground).

Why blocks: conformal risk control on ``n`` units picks the smallest ``λ`` with ``(n R̂(λ) + 1) / (n + 1) ≤ α``,
so the units themselves must be covered to ``1 − (α (n + 1) − 1) / n``: 95 % for the 18 units of 9 held-out slices in
two directions at ``α = 0.1``, which over-covers a scan by about 5 points; with 4 blocks each (72 units) the margin
is about 1 point (91.3 %). Blocks of one slice are only approximately exchangeable, as the blocks of
:func:`gen_sr.eval.calibration.split_units` are.

Noise and foreground: the held-out slices hold the scan's noise, which their simulated thick slices average down;
given the scan's noise std, the problems are topped up to it and projected noise-aware, as the real run is
(:func:`scan_cases`). Units count the scan's foreground (:func:`held_out_foreground`), not each slice's own.

The assumption, as in SMORE and ECLARE: the scan's statistics are alike in-plane and through-plane, so that the
errors on the simulated in-plane problem are exchangeable with those of the real one. Anatomy is not isotropic, so
this holds only approximately; the calibration record says so, and ``benchmarks/adaptation_benchmark.py`` measures
the coverage it gives on real heads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
import torch

from gen_sr.data import recorrupt, top_up_noise
from gen_sr.errors import InputError
from gen_sr.eval.calibration import CalibrationResult, calibrate
from gen_sr.eval.cases import Case, SRModel, simulate_case
from gen_sr.eval.metrics import foreground
from gen_sr.model_card import Adaptation
from gen_sr.volume import Volume

__all__ = ["ASSUMPTION", "calibrate_on_scan", "held_out_foreground", "held_out_truth", "recorrupted_case",
           "scan_cases"]

ASSUMPTION = ("per-scan: fitted on the scan's own held-out in-plane slices, degraded along each in-plane axis with "
              "the scan's slices; it assumes the statistics in-plane and through-plane are alike (as SMORE and ECLARE "
              "do)")
_AXES = "RAS"


def _record(pipe: SRModel) -> Adaptation:
    record = pipe.model_card.adapted
    if record is None:
        raise InputError("the model was not adapted to a scan, so there are no held-out in-plane slices to calibrate "
                         "on", hint="adapt it first (gen-sr fit), or use gen-sr calibrate")
    return record


def held_out_truth(lr: Volume, record: Adaptation) -> Volume:
    """The held-out in-plane slices of the scan (RAS+), stacked along its coarse axis into one HR volume ``(X, Y,
    Z)``. Its spacing along that axis is set to the finest in-plane one, the spacing of the real output there; a 2D
    model slices across that axis, so each slice is one image of the scan as it was acquired."""
    canon = lr.canonical()
    if tuple(canon.shape) != tuple(record.lr_shape):
        raise InputError(f"is {' x '.join(map(str, canon.shape))} voxels in RAS+, but the model was adapted on a "
                         f"{' x '.join(map(str, record.lr_shape))} scan ({record.source})", lr.source,
                         "calibrate on the scan the model was adapted on")
    spacing = list(canon.spacing)
    spacing[record.axis] = min(s for a, s in enumerate(spacing) if a != record.axis)
    data = np.take(canon.data, record.held_out_slices, axis=record.axis)
    return Volume(data, np.diag([*spacing, 1.0]), source=f"{lr.source}: held-out in-plane slices")


def scan_cases(lr: Volume, record: Adaptation, seed: int = 0, noise_std: float = 0.0,
               recorrupt: bool = False, clean_scan: Volume | None = None) -> list[Case]:
    """The simulated problems of a per-scan calibration, one per held-out in-plane slice and in-plane axis: the
    slice (:func:`held_out_truth`) degraded along that axis with the scan's own slices. Each is one calibration
    unit. Slices outside the scan's foreground (:func:`held_out_foreground`) pose no problem and are left out.

    Noise: the slice holds the scan's own noise, ``noise_std`` per voxel (its units), but the simulated slices
    average it down below what the real thick slices hold. With ``noise_std`` > 0 each simulated slice is topped up to
    it (:func:`gen_sr.data.top_up_noise`, seeded) and the case carries it, so that the pipeline projects as noise-aware
    as on the real scan: the problems then have the real one's noise. With 0 they are noise-free.

    ``recorrupt``: the truth's noise is then no longer shared by the problem and its reference
    (:func:`recorrupted_case`): a model is not rewarded for keeping the measured noise, and the error against the
    reference ranks models as the error against the clean slice would, up to a constant. ``clean_scan`` (benchmarks
    of simulated scans): the same scan without its noise, whose held-out slices become the references."""
    return [case for case, _ in _cases_and_masks(lr, record, seed, noise_std, recorrupt, clean_scan)]


def recorrupted_case(case: Case, noise_std: float, rng: np.random.Generator) -> Case:
    """A noise-free simulated ``case`` whose truth holds white noise of std ``noise_std`` per voxel, posed with
    independent noise in its problem and its reference (:func:`gen_sr.data.recorrupt`): its thick slices hold
    ``noise_std`` exactly, as the real scan's, and its reference holds more noise, the same for every model, which adds
    a constant to their mean squared errors and does not change their order. Where ``A`` averages too little for
    that, the case is topped up as :func:`scan_cases` does without recorruption."""
    pair = recorrupt(torch.from_numpy(case.hr.data.astype(np.float64))[None, None], case.operator, noise_std, rng)
    if pair is None:
        return _noise_matched(case, noise_std, rng)
    y, reference = (t[0, 0].numpy() for t in pair)
    return dataclasses.replace(case, hr=case.hr.with_data(reference.astype(np.result_type(case.hr.data, np.float32))),
                               lr=case.lr.with_data(y.astype(case.lr.data.dtype)), noise_std=noise_std)


def held_out_foreground(lr: Volume, record: Adaptation) -> np.ndarray:
    """The scan's foreground (:func:`gen_sr.eval.metrics.foreground` of the whole scan) on its held-out slices,
    stacked as :func:`held_out_truth` stacks them: where calibration counts. A slice's own foreground would find
    "objects" in a slice that holds only rounding noise (beyond the head), and count them."""
    mask = foreground(lr.canonical().data)
    return np.take(mask, record.held_out_slices, axis=record.axis)


def _cases_and_masks(lr: Volume, record: Adaptation, seed: int = 0, noise_std: float = 0.0,
                     recorrupt: bool = False, clean_scan: Volume | None = None) -> list[tuple[Case, np.ndarray]]:
    truth, inside = held_out_truth(lr, record), held_out_foreground(lr, record)
    if clean_scan is not None and recorrupt:
        raise ValueError("clean_scan gives the references: there is nothing to recorrupt")
    clean = None if clean_scan is None else held_out_truth(clean_scan, record)
    rng = np.random.default_rng(seed)
    noisy = recorrupted_case if recorrupt and noise_std > 0 else _noise_matched
    out = []
    for j, index in enumerate(record.held_out_slices):
        start, stop = [0, 0, 0], list(truth.shape)
        start[record.axis], stop[record.axis] = j, j + 1
        mask = inside[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))]
        if not mask.any():
            continue
        one = truth.crop(start, stop)
        cases = [noisy(simulate_case(one, f"slice {index} degraded along {_AXES[axis]}", axis=axis,
                                     thickness=record.slice_thickness, spacing=record.slice_spacing,
                                     profile=record.profile, seed=seed), noise_std, rng)
                 for axis in range(3) if axis != record.axis]
        if clean is not None:  # the same problems, judged against the slice without its noise
            cases = [dataclasses.replace(c, hr=clean.crop(start, stop)) for c in cases]
        out += [(case, mask) for case in cases]
    return out


def _noise_matched(case: Case, noise_std: float, rng: np.random.Generator) -> Case:
    """``case`` with its LR topped up to ``noise_std`` per voxel, and carrying it (0: unchanged)."""
    if noise_std <= 0:
        return case
    y, _ = top_up_noise(case.lr_tensor(), case.operator, noise_std, rng)
    return dataclasses.replace(case, lr=case.lr.with_data(y[0, 0].numpy().astype(case.lr.data.dtype)),
                               noise_std=noise_std)


def calibrate_on_scan(pipe: SRModel, lr: Volume, *, alpha: float = 0.1, delta: float = 0.1,
                      method: Literal["rcps", "crc"] = "crc", blocks: int = 4, progress: bool = True,
                      details: dict[str, Any] | None = None, noise_std: float = 0.0, recorrupt: bool = False,
                      clean_scan: Volume | None = None, **pipe_kwargs: Any) -> CalibrationResult:
    """Calibrate an adapted model on its scan's held-out in-plane slices (see the module docstring).

    Args:
        pipe: a model adapted on ``lr`` (its card's ``adapted`` record names the held-out slices).
        lr: that scan.
        alpha, delta, method: the rule (:func:`gen_sr.eval.calibration.fit_calibration`); ``"crc"`` by default, as
            one scan gives few units (one per held-out slice and in-plane direction).
        blocks: units per held-out slice and direction, cut along the first in-plane axis (see the module
            docstring).
        details: added to the calibration record.
        noise_std: the scan's noise std per voxel in its units, as the pipeline is given it for the real run
            (:func:`scan_cases`: the problems are brought up to it); 0 for noise-free problems.
        recorrupt: pose the problems with noise independent of their references' (:func:`recorrupted_case`); for
            ranking models by the error (``CalibrationResult.rmse``), not for the interval: the references hold
            more noise than the slices.
        clean_scan: for benchmarks, where the scan was simulated: the same scan without its noise, whose held-out
            slices are then the references of the same problems (an oracle: how far the held-out slices' own noise
            moves the calibration).
        pipe_kwargs: for the pipeline calls (``num_samples``, ``num_inference_steps``, ``generator``, ...).
    """
    record = _record(pipe)
    pairs = _cases_and_masks(lr, record, noise_std=noise_std, recorrupt=recorrupt, clean_scan=clean_scan)
    if not pairs:
        raise InputError("has no foreground in any of its held-out in-plane slices", lr.source,
                         "check that it is the scan the model was adapted on")
    cases, masks = [c for c, _ in pairs], {id(c): m for c, m in pairs}
    axis = min(a for a in range(3) if a != record.axis)
    info = {"per_scan": True, "assumption": ASSUMPTION, "scan": record.source,
            "held_out_slices": list(record.held_out_slices), "noise_std": noise_std,
            "recorrupted": recorrupt and noise_std > 0, "clean_references": clean_scan is not None, **(details or {})}
    try:
        return calibrate(pipe, cases, alpha=alpha, delta=delta, method=method, blocks=blocks, axis=axis,
                         details=info, progress=progress, masks=lambda case: masks[id(case)],
                         slice_normal=record.axis, **pipe_kwargs)
    except ValueError as e:
        raise InputError(f"cannot calibrate on the scan's {len(cases) // 2} held-out in-plane slices with foreground x "
                         f"2 directions x {blocks} blocks: {e}",
                         lr.source, "hold out more slices (a smaller holdout_every) or raise alpha") from e
