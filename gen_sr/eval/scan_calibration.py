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
(:func:`scan_cases`). A scan without background air, run with ``noise_std="auto"``, has no known noise std: its runs
project blind and their interval counts the noise read in-plane from the slices (``benchmarks/NOISE_UNKNOWN.md``), so
its problems are topped up to that estimate and calibrated as such runs (``noise_std=None``). Units count the scan's
foreground (:func:`held_out_foreground`), not each slice's own.

Region: a head with skull holds scalp and skull, where the error is larger beside the spread than in the brain; one
scale over the whole foreground is then too wide in the brain and too narrow outside it. Given a region of the scan
(``region``, e.g. a brain mask), the scale is fitted in the region and, apart, in the rest of the foreground (Mondrian
conformal prediction, Vovk et al. 2005: one calibration per class of voxels): ``Calibration.outside_scale``.

Reference noise: the held-out slices are the references, and they hold the scan's noise, which the truth of the real
output does not; at SNR 30 this widens ``λ̂`` (by 6-60 % on validation scans, ``benchmarks/ADAPTATION.md``). With
``reference_noise="extrapolate"`` the problems are recorrupted (:func:`recorrupted_case`: the input keeps the scan's
noise level, the reference holds noise of variance ``σ² (1 + 1/α²)`` independent of the input's, so of the output's),
the scale is fitted against those references and again with ``σ²`` and ``2σ²`` more independent noise in them, and
``λ̂²``, about linear in the references' noise variance, is extrapolated back to noise-free references (SIMEX, Cook and
Stefanski 1994). The independence is what the extrapolation needs: with the held-out slices as references (round 6
of ``benchmarks/ADAPTATION.md``) the noise-aware projection keeps part of the references' noise in the output, and
the line over-corrected. It is an estimate, without the finite-sample guarantee of the rule itself.

The assumption, as in SMORE and ECLARE: the scan's statistics are alike in-plane and through-plane, so that the
errors on the simulated in-plane problem are exchangeable with those of the real one. Anatomy is not isotropic, so
this holds only approximately; the calibration record says so, and ``benchmarks/adaptation_benchmark.py`` measures
the coverage it gives on real heads.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from gen_sr.data import recorrupt, recorrupted_reference_variance, top_up_noise
from gen_sr.errors import InputError
from gen_sr.eval.calibration import (
    CalibrationResult,
    CalibrationVolume,
    check_calibration_settings,
    fit_shape,
    fit_volumes,
    interval_shape,
    pooled_rmse,
    rule_bound,
    split_units,
    volumes_and_settings,
)
from gen_sr.eval.cases import Case, SRModel, simulate_case
from gen_sr.eval.metrics import foreground
from gen_sr.eval.uncertainty import miss_rate
from gen_sr.model_card import Adaptation
from gen_sr.physics import estimate_noise_std
from gen_sr.training.adaptation_defaults import REFERENCE_NOISE, ReferenceNoise
from gen_sr.volume import Volume

__all__ = ["ASSUMPTION", "MEASURED_COVERAGE", "REFERENCE_NOISE", "ReferenceNoise", "calibrate_on_scan",
           "check_noise_to_recorrupt", "extrapolate_to_zero_noise", "held_out_foreground", "held_out_truth",
           "recorrupted_case", "scan_cases"]

_EXTRA_NOISE = (1.0, 2.0)
"""The noise variances added to the references for the extrapolation, in units of the scan's noise variance."""
_NO_RECORRUPTION = ("the scan's slices average too little to recorrupt the problems with (gen_sr.data.recorrupt), so "
                    "the references' noise is not independent of the output's: the scale is fitted against them as "
                    "they are")

ASSUMPTION = ("per-scan: fitted on the scan's own held-out in-plane slices, degraded along each in-plane axis with "
              "the scan's slices; it assumes the statistics in-plane and through-plane are alike (as SMORE and ECLARE "
              "do)")
MEASURED_COVERAGE = (0.84, 0.96)
"""How far :data:`ASSUMPTION` held where it was measured: the through-plane coverage of the per-scan 90 % interval
ranged over this on the real and validation heads of ``benchmarks/ADAPTATION.md`` (4 mm slices along each axis,
noise-free and SNR 30, over the head and in the brain; rounds 6 and 7 and the Colin27 sections), all calibrated with
a known noise std (or 0). The calibration record carries it, so that a report can say what the interval promises;
a calibration for runs whose noise std is not known (``noise_std=None``: problems topped up to the in-plane noise
estimate, an upper one) was not measured, and its record does not carry it."""
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
    return [case for case, _, _ in _cases_and_masks(lr, record, seed, noise_std, recorrupt, clean_scan)]


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


def _held_out_region(lr: Volume, record: Adaptation, region: np.ndarray) -> np.ndarray:
    """``region`` (a mask on the scan's RAS+ grid) on the held-out slices, stacked as :func:`held_out_truth` does."""
    canon = lr.canonical()
    region = np.asarray(region) > 0
    if region.shape != canon.shape:
        raise InputError(f"the calibration region is {' x '.join(map(str, region.shape))} voxels, but the scan is "
                         f"{' x '.join(map(str, canon.shape))} in RAS+", lr.source,
                         "give a mask on the scan's own grid (e.g. a brain mask of the thick-slice scan)")
    return np.take(region, record.held_out_slices, axis=record.axis)


def _cases_and_masks(lr: Volume, record: Adaptation, seed: int = 0, noise_std: float = 0.0,
                     recorrupt: bool = False, clean_scan: Volume | None = None,
                     region: np.ndarray | None = None) -> list[tuple[Case, np.ndarray, np.ndarray]]:
    """Each problem of :func:`scan_cases` with the held-out foreground of its slice, and that foreground inside
    ``region`` (all of it without one)."""
    truth, inside = held_out_truth(lr, record), held_out_foreground(lr, record)
    in_region = inside if region is None else inside & _held_out_region(lr, record, region)
    if clean_scan is not None and recorrupt:
        raise ValueError("clean_scan gives the references: there is nothing to recorrupt")
    clean = None if clean_scan is None else held_out_truth(clean_scan, record)
    rng = np.random.default_rng(seed)
    noisy = recorrupted_case if recorrupt and noise_std > 0 else _noise_matched
    out = []
    for j, index in enumerate(record.held_out_slices):
        start, stop = [0, 0, 0], list(truth.shape)
        start[record.axis], stop[record.axis] = j, j + 1
        box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
        mask = inside[box]
        if not mask.any():
            continue
        one = truth.crop(start, stop)
        cases = [noisy(simulate_case(one, f"slice {index} degraded along {_AXES[axis]}", axis=axis,
                                     thickness=record.slice_thickness, spacing=record.slice_spacing,
                                     profile=record.profile, seed=seed, check_truth=False), noise_std, rng)
                 for axis in range(3) if axis != record.axis]
        if clean is not None:  # the same problems, judged against the slice without its noise
            cases = [dataclasses.replace(c, hr=clean.crop(start, stop)) for c in cases]
        out += [(case, mask, in_region[box]) for case in cases]
    return out


def _noise_matched(case: Case, noise_std: float, rng: np.random.Generator) -> Case:
    """``case`` with its LR topped up to ``noise_std`` per voxel, and carrying it (0: unchanged)."""
    if noise_std <= 0:
        return case
    y, _ = top_up_noise(case.lr_tensor(), case.operator, noise_std, rng)
    return dataclasses.replace(case, lr=case.lr.with_data(y[0, 0].numpy().astype(case.lr.data.dtype)),
                               noise_std=noise_std)


def check_noise_to_recorrupt(noise_std: float | None, asked: Sequence[tuple[str, bool]]) -> None:
    """Refuse a recorruption asked for where the scan's noise std is not known (``None``): there is no noise to pose
    the problems with. ``asked``: each option that recorrupts, as the caller names it (e.g. ``"recorrupt=True"``),
    and whether it was asked for.

    Raises:
        ValueError: one line naming the options asked for.
    """
    names = [name for name, on in asked if on]
    if noise_std is None and names:
        raise ValueError(f"{' and '.join(names)} need{'s' if len(names) == 1 else ''} the scan's noise std to "
                         "recorrupt the problems with, and it is not known")


def _slices_with_foreground(lr: Volume, record: Adaptation) -> list[int]:
    """The held-out in-plane slices (indices along ``record.axis`` of the scan in RAS+) that hold foreground: the
    ones the calibration's units come from (:func:`held_out_foreground`)."""
    inside = held_out_foreground(lr, record)
    return [int(index) for j, index in enumerate(record.held_out_slices)
            if np.take(inside, j, axis=record.axis).any()]


def calibrate_on_scan(pipe: SRModel, lr: Volume, *, alpha: float = 0.1, delta: float = 0.1,
                      method: Literal["rcps", "crc"] = "crc", blocks: int = 4, progress: bool = True,
                      details: dict[str, Any] | None = None, noise_std: float | None = 0.0, recorrupt: bool = False,
                      clean_scan: Volume | None = None, region: np.ndarray | None = None,
                      reference_noise: ReferenceNoise = REFERENCE_NOISE, seed: int = 0,
                      cache: str | Path | None = None, **pipe_kwargs: Any) -> CalibrationResult:
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
            (:func:`scan_cases`: the problems are brought up to it); 0 for noise-free problems. ``None``: not known,
            as for a scan without background air run with ``noise_std="auto"``
            (:func:`~gen_sr.pipelines.pipeline_latent_sr.resolve_noise_std`): calibrated for such runs
            (:attr:`~gen_sr.risk.SamplingSettings.noise_known` ``False``), as
            :func:`gen_sr.eval.calibration.calibrate` with ``noise_known=False`` does; the noise std read in-plane
            from the scan's slices (:func:`~gen_sr.physics.estimate_noise_std`, the one such a run's interval counts)
            is what the problems are brought up to and what their interval counts, and their projections are blind
            (without a noise std), as the run's are.
        recorrupt: pose the problems with noise independent of their references' (:func:`recorrupted_case`); for
            ranking models by the error (``CalibrationResult.rmse``), not for the interval: the references hold
            more noise than the slices. Only with a known noise std, as ``reference_noise="extrapolate"``: either
            with ``noise_std=None`` is a ``ValueError`` (:func:`check_noise_to_recorrupt`).
        clean_scan: for benchmarks, where the scan was simulated: the same scan without its noise, whose held-out
            slices are then the references of the same problems (an oracle: how far the held-out slices' own noise
            moves the calibration).
        region: a mask on the scan's RAS+ grid (e.g. its brain): the scale is fitted there, and apart in the rest
            of the foreground (``Calibration.outside_scale``; ``None`` where the rest has too little to fit on).
            The result's leave-one-out figures are the region's; its ``rmse`` counts the whole foreground, as
            without a region (it ranks models).
        reference_noise: ``"extrapolate"`` corrects the scale for the references' own noise (``noise_std`` > 0;
            see the module docstring: the problems are then recorrupted); ``"keep"`` (the default) fits it against
            the held-out slices as they are, noise and all.
        seed: the problems' noise and the extrapolation's.
        cache: a folder that keeps each problem's truth, mean and std and reuses them on the next call
            (:func:`gen_sr.eval.calibration.calibration_volumes`), for benchmarks that fit several rules on the same
            super-resolved problems; it records neither the pipeline's settings nor these arguments, so give each
            kind of problem (noise, recorruption, references) its own folder.
        pipe_kwargs: for the pipeline calls (``num_samples``, ``num_inference_steps``, ``generator``, ...).
    """
    record = _record(pipe)
    if reference_noise not in ("keep", "extrapolate"):
        raise ValueError(f"reference_noise must be 'keep' or 'extrapolate', not {reference_noise!r}")
    check_noise_to_recorrupt(noise_std, [("recorrupt=True", recorrupt),
                                         ("reference_noise='extrapolate'", reference_noise == "extrapolate")])
    known = noise_std is not None
    level = noise_std if known else estimate_noise_std(lr.canonical().data, record.axis)  # as the run reads it
    extrapolate = reference_noise == "extrapolate" and level > 0 and clean_scan is None  # known: checked above
    triples = _cases_and_masks(lr, record, seed=seed, noise_std=level, recorrupt=recorrupt or extrapolate,
                               clean_scan=clean_scan, region=region)
    if not triples:
        raise InputError("has no foreground in any of its held-out in-plane slices", lr.source,
                         "check that it is the scan the model was adapted on")
    cases, masks = [c for c, _, _ in triples], {c.name: m for c, m, _ in triples}
    inside = [r for _, _, r in triples]
    axis = min(a for a in range(3) if a != record.axis)
    reference_variance = recorrupted_reference_variance(cases[0].operator) if extrapolate else None
    note = {"reference_noise_note": _NO_RECORRUPTION} if extrapolate and reference_variance is None else {}
    extrapolate = reference_variance is not None
    info = {"per_scan": True, "assumption": ASSUMPTION,
            **({"measured_coverage": list(MEASURED_COVERAGE)} if known else {}),  # measured with a known noise std
            "scan": record.source, "held_out_slices": list(record.held_out_slices), "noise_std": noise_std,
            "slices_with_foreground": _slices_with_foreground(lr, record),
            **({} if known else {"in_plane_noise_std": level}),
            "recorrupted": (recorrupt or extrapolate) and level > 0,
            "clean_references": clean_scan is not None,
            "reference_noise": "extrapolate" if extrapolate else "keep", "region": region is not None, **note,
            **(details or {})}
    fit = {"alpha": alpha, "delta": delta, "method": method, "blocks": blocks, "axis": axis,
           "shape": interval_shape(known)}
    try:
        check_calibration_settings(len(cases), alpha=alpha, delta=delta, method=method, blocks=blocks)
        volumes, sampling = volumes_and_settings(pipe, cases, masks=lambda case: masks[case.name], progress=progress,
                                                 cache=cache, noise_known=known, in_plane=level, **pipe_kwargs)
        counted = volumes if region is None else [dataclasses.replace(v, mask=v.mask & r)
                                                  for v, r in zip(volumes, inside, strict=True)]
        result = fit_volumes(counted, details=info, sampling=sampling, **fit)
        if region is not None:  # the whole foreground's, as without a region: it ranks models
            result.rmse = pooled_rmse(volumes)
        if reference_variance is not None:
            _extrapolate(result, counted, seed, fit, reference_variance)
    except ValueError as e:
        raise InputError(f"cannot calibrate on the scan's {len(cases) // 2} held-out in-plane slices with foreground "
                         f"x 2 directions x {blocks} blocks{' in the region' if region is not None else ''}: {e}",
                         lr.source, "hold out more slices (a smaller holdout_every) or raise alpha") from e
    if region is not None:
        outside = [dataclasses.replace(v, mask=v.mask & ~r) for v, r in zip(volumes, inside, strict=True)]
        try:
            result.calibration.outside_scale = _scale(outside, seed, reference_variance, fit)[0]
        except ValueError as e:  # e.g. a skull-stripped scan: little or nothing outside the region
            result.calibration.details["outside_scale_error"] = str(e)
    return result


def _scale(volumes: list[CalibrationVolume], seed: int, reference_variance: float | None, fit: dict[str, Any],
           first: float | None = None) -> tuple[float, list[float]]:
    """``λ̂`` on the units of ``volumes`` (:func:`gen_sr.eval.calibration.fit_shape` with ``fit``; ``first``: that
    scale, where already fitted), and the scales it was made from. With ``reference_variance`` (the references' noise
    variance in units of the scan's, independent of the output's), corrected for the references' noise (the module
    docstring): fitted again with :data:`_EXTRA_NOISE` more noise in the references and extrapolated to none."""
    scales = [fit_shape(volumes, **fit).scale if first is None else first]
    if reference_variance is None:
        return scales[0], scales
    rng = np.random.default_rng([seed, 1])
    for extra in _EXTRA_NOISE:
        noisier = [dataclasses.replace(v, error=v.error + math.sqrt(extra) * v.noise_std
                                       * rng.standard_normal(v.error.shape)) for v in volumes]
        scales.append(fit_shape(noisier, **fit).scale)
    return extrapolate_to_zero_noise(_variances(reference_variance), scales), scales


def _variances(reference_variance: float) -> list[float]:
    """The references' noise variances of :func:`_scale`'s fits, in units of the scan's."""
    return [reference_variance, *(reference_variance + e for e in _EXTRA_NOISE)]


def _extrapolate(result: CalibrationResult, volumes: list[CalibrationVolume], seed: int, fit: dict[str, Any],
                 reference_variance: float) -> None:
    """``result``'s scale corrected for the references' noise (:func:`_scale`), in place; its ``risk_hat`` becomes
    the miss rate against the noisy references at that scale (and ``risk_upper`` the rule's bound there), and its
    details record the scales it was made from."""
    cal = result.calibration
    scale, scales = _scale(volumes, seed, reference_variance, fit, first=cal.scale)
    errors, spreads, masks = split_units(volumes, fit["shape"], blocks=fit["blocks"], axis=fit["axis"])
    risk = float(np.mean([miss_rate(e, u, scale, m) for e, u, m in zip(errors, spreads, masks, strict=True)]))
    cal.details |= {"noisy_reference_scale": cal.scale, "reference_noise_scales": scales,
                    "reference_noise_variances": _variances(reference_variance)}
    result.calibration = dataclasses.replace(cal, scale=scale, risk_hat=risk,
                                             risk_upper=rule_bound(cal.method, risk, cal.num_units, cal.delta,
                                                                   cal.bound))


def extrapolate_to_zero_noise(variances: list[float], scales: list[float]) -> float:
    """The scale at reference noise variance 0, from scales fitted at ``variances`` (in units of the scan's): a
    least-squares line through ``scale²`` against the variance, read at 0 (clipped at a tenth of the smallest scale,
    where the line falls below it)."""
    _, intercept = np.polyfit(np.asarray(variances, float), np.asarray(scales, float) ** 2, 1)
    return float(math.sqrt(max(intercept, (0.1 * min(scales)) ** 2)))
