"""The hallucination audit of one LR volume: super-resolve (or reuse a run's outputs), write the maps as NIfTI, and
build the self-contained report (:mod:`gen_sr.audit.report`).

With a reference HR volume on the SR grid, the audit also measures SR and every baseline against it (inside the
brain mask, or the reference's foreground) and draws the calibration plot: observed coverage of ``mean ± k·σ_eff``
against the nominal coverage of a Gaussian with ``σ_eff = λ̂ u / z_{1−α/2}``, ``u`` the calibration's spread (the
std, or the std with a noise floor and an edge term), so that the nominal ``1 − α`` interval is exactly the
calibrated one; without a calibration, ``σ_eff = σ``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import norm

from gen_sr.audit.report import build_report
from gen_sr.errors import InputError
from gen_sr.eval.baselines import BASELINES, baseline, baseline_note
from gen_sr.eval.cases import Case
from gen_sr.eval.evaluate import estimate_metrics
from gen_sr.eval.metrics import foreground
from gen_sr.eval.uncertainty import coverage
from gen_sr.io import check_output_dir, sidecar_path
from gen_sr.physics import AcquisitionOperator, structure_visibility
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.risk import (
    Calibration,
    DataDisagreement,
    Mismatch,
    interval_noise_std,
    risk_map,
)
from gen_sr.run_record import RunRecord, describe_risk, run_calibration
from gen_sr.volume import Volume, covers, load_volume, resample_to, save_volume

__all__ = ["AUDIT_FILES", "DISAGREEMENT_FILE", "MAP_FILES", "NOMINAL_COVERAGE", "audit", "reuse_outputs"]

NOMINAL_COVERAGE = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
MAP_FILES = {"mean": "sr_mean.nii.gz", "std": "sr_std.nii.gz", "risk": "risk.nii.gz",
             "dc_residual": "dc_residual.nii.gz"}
DISAGREEMENT_FILE = "data_disagreement.nii.gz"
"""The data-disagreement map (:class:`~gen_sr.risk.DataDisagreement`), written for runs given a noise std."""
AUDIT_FILES = (*MAP_FILES.values(), DISAGREEMENT_FILE, "report.html", "report.json")
"""Every file an audit writes into its output folder (an existing one is replaced only with ``overwrite``)."""


def _centre(volume: Volume) -> np.ndarray:
    """The world position (mm) of a volume's centre."""
    return volume.affine[:3, :3] @ ((np.asarray(volume.shape) - 1) / 2) + volume.affine[:3, 3]


def reuse_outputs(pipe: LatentDiffusionSRPipeline, lr: Volume, sr_path: str | Path, std_path: str | Path,
                  calibration_region: Any = None) -> tuple[dict[str, Volume], RunRecord]:
    """Maps of an earlier ``gen-sr super-resolve`` run: its mean and std files and the ``.json`` beside the mean.

    The risk is recomputed from the std with the model's current calibration (with ``calibration_region``, the
    pipeline's argument, where it has a scale per region), and the data-consistency residual (and, for a run given a
    noise std, the data disagreement) from the mean with the run's recorded operator, so they match what the
    pipeline would report.
    """
    sr_path, meta_path = Path(sr_path), sidecar_path(sr_path)
    if not meta_path.is_file():
        raise InputError("has no run record beside it (the .json that super-resolve writes)", sr_path,
                         f"expected {meta_path.name}")
    try:
        run = RunRecord.from_dict(json.loads(meta_path.read_text()))
        operator = run.acquisition()
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"is not a super-resolve run record ({e})", meta_path) from None
    recorded = run.input_digest  # none in records from before it was kept
    if recorded is not None and recorded != lr.canonical().digest():
        raise InputError(f"was made from another input than {lr.source or 'the one given'} (its record's digest "
                         "differs)", sr_path, "give the scan it super-resolved as --input")
    if recorded is None:
        warnings.warn(f"{meta_path} predates the scan's digest in run records: that the run was made from "
                      f"{lr.source or 'this input'} is checked by its grid and field of view only", stacklevel=3)
    given, lr = lr, pipe.measured_input(lr, run)  # a calibration region is a mask on the given input's grid
    mean, std = load_volume(sr_path), load_volume(std_path)
    written = run.output_digests or {}  # none in earlier records
    for key, path, volume in (("mean", sr_path, mean), ("std", std_path, std)):
        if key in written and written[key] != volume.digest():
            raise InputError(f"is not the {key} this run record was written with", path,
                             f"give the {key} that super-resolve wrote beside {meta_path.name}")
    if mean.shape != std.shape or not np.allclose(mean.affine, std.affine, atol=1e-4):
        raise InputError("is not on the grid of the SR mean", std_path)
    canon_mean, canon_lr = mean.canonical(), lr.canonical()
    if tuple(operator.hr_shape) != canon_mean.shape or tuple(operator.lr_shape) != canon_lr.shape:
        raise InputError("does not belong to this input: its operator maps "
                         f"{tuple(operator.hr_shape)} to {tuple(operator.lr_shape)}", meta_path)
    offset = float(np.linalg.norm(_centre(canon_mean) - _centre(canon_lr)))
    if offset > max(canon_lr.spacing):
        raise InputError(f"does not lie over this input: its field of view is {offset:.1f} mm away from it", sr_path,
                         "give the scan it super-resolved as --input")
    as_tensor = lambda v: torch.from_numpy(v.data.astype(np.float64))[None, None]  # noqa: E731
    dc = operator.residual_map(as_tensor(canon_mean), as_tensor(canon_lr))[0, 0].numpy()
    norm = pipe.intensity_normalization(canon_lr.data)
    scale, sigma = norm.scale, run.noise_std or 0.0  # not known (None): its projections were exact
    disagreement = None
    if sigma > 0:  # in the pipeline's normalised units, as the pipeline computed it (its foreground is not offset-free)
        normalised = [torch.from_numpy(norm(v.data.astype(np.float64)))[None, None] for v in (canon_mean, canon_lr)]
        disagreement = DataDisagreement().statistic(operator, *normalised, sigma / scale)[0, 0].numpy()
    region = None if calibration_region is None else pipe.calibration_region_mask(given, calibration_region, mean)
    calibration = run_calibration(pipe, run, warn=True)
    counted = interval_noise_std(calibration, sigma, run.noise_std_in_plane)
    risk = risk_map(std.data, mean.data, calibration, counted, scale, region)
    maps = {"mean": mean, "std": std, "risk": std.with_data(np.asarray(risk, dtype=np.float32)),
            "dc_residual": canon_mean.with_data(dc.astype(np.float32)).reorient(mean.orientation)}
    if disagreement is not None:
        maps["data_disagreement"] = canon_mean.with_data(disagreement.astype(np.float32)).reorient(mean.orientation)
    return maps, run


def _as_applied(calibration: Calibration | None, region_given: bool) -> Calibration | None:
    """``calibration`` as a run's risk map applied it: one fitted per region, for a run not given the region, with the
    larger of its two scales everywhere (:meth:`~gen_sr.risk.Calibration.scale_map`)."""
    if calibration is None or calibration.outside_scale is None or region_given:
        return calibration
    return replace(calibration, scale=float(calibration.scale_map()), outside_scale=None)


def _mismatch(pipe: LatentDiffusionSRPipeline, calibration: Calibration | None, run: RunRecord,
              lr: Volume) -> Mismatch | None:
    """Why a run's calibration was not made for it, ``None`` where it was
    (:meth:`LatentDiffusionSRPipeline.calibration_mismatch`; ``lr``: the input as the run measured it; a record without
    its settings: as far as the scan says)."""
    return pipe.calibration_mismatch(calibration, run.sampling, lr.canonical(), run.grid_spacing)


def _calibration_curve(std: np.ndarray, mean: np.ndarray, error: np.ndarray, mask: np.ndarray,
                       calibration: Calibration | None, noise_std: float,
                       region: np.ndarray | None = None) -> dict[str, Any]:
    """Observed coverage of the intervals at nominal levels: the calibrated interval (or ± z σ uncalibrated)
    widened or narrowed as a Gaussian's would be (``region``: see :meth:`gen_sr.risk.Calibration.scale_map`)."""
    alpha = calibration.alpha if calibration is not None else 0.1
    lam = calibration.scale if calibration is not None else float(norm.ppf(1 - alpha / 2))
    spread = std
    if calibration is not None:  # the per-voxel scale relative to λ̂ goes into the spread
        spread = calibration.shape.spread(std, mean, noise_std) * (np.asarray(calibration.scale_map(region)) / lam)
    k = norm.ppf((1 + np.asarray(NOMINAL_COVERAGE)) / 2) * lam / norm.ppf(1 - alpha / 2)
    observed = coverage(spread, error, k, mask)
    return {"nominal": list(NOMINAL_COVERAGE), "observed": [float(v) for v in observed], "alpha": alpha,
            "lambda": lam, "calibrated": calibration is not None}


def audit(
    pipe: LatentDiffusionSRPipeline,
    lr: Volume,
    output_dir: str | Path,
    *,
    input_name: str,
    model_name: str = "",
    reference: Volume | None = None,
    masks: dict[str, Volume] | None = None,
    brain_mask: Volume | None = None,
    reuse: tuple[str | Path, str | Path] | None = None,
    calibration_region: Any = None,
    risk_threshold: float = 0.1,
    overwrite: bool = False,
    timings: dict[str, float] | None = None,
    **pipe_kwargs: Any,
) -> dict[str, Any]:
    """Audit one LR volume; writes the four NIfTI maps (five with a noise std: the data disagreement),
    ``report.html`` and ``report.json`` into ``output_dir``.

    Args:
        pipe: the pipeline (its calibration, if any, sets the risk units).
        lr: the LR input.
        input_name, model_name: how the report names the input and the model (escaped there).
        reference: the HR truth covering the SR grid (resampled onto it linearly: exact where the grids align,
            as when the LR was simulated from it), for metrics and the calibration plot.
        masks: tissue probability maps on the SR grid, e.g. ``{"GM": gm, "WM": wm}``, for cluster labels.
        brain_mask: where metrics and the flagged fraction are counted (default: the tissue maps' union, else the
            foreground).
        reuse: ``(sr_mean_path, sr_std_path)`` of an earlier ``super-resolve`` run instead of sampling again.
        calibration_region: for a calibration fitted per region, the same mask on the input's grid (the pipeline's
            argument).
        risk_threshold: risk above which a voxel is flagged (a fraction of the robust intensity range).
        overwrite: replace existing outputs.
        timings: the time in seconds of each phase that made ``pipe`` for this run, e.g. an adaptation's
            (:attr:`gen_sr.training.scan_fit.ScanFit.timings`: ``adapt_s``, ``calibrate_s``, ``compare_s``): the
            card's ``timings_s`` holds them before the run's own (as ``super-resolve --adapt`` records them).
        pipe_kwargs: for the pipeline call (``num_samples``, ``num_inference_steps``, ``generator``, ...).

    Returns:
        The report's JSON payload. Its ``outside_training`` lists where the input lies outside the trained regime
        (from the run record, or checked now for a reused run recorded without it).
    """
    given = [v.source for v in (lr, reference, brain_mask, *(masks or {}).values()) if v is not None and v.source]
    out = check_output_dir(output_dir, overwrite, AUDIT_FILES, inputs=[*given, *(reuse or ())])
    if brain_mask is not None:
        _check_mask(brain_mask)
    given_volumes = {"reference": (reference, "give the HR volume the LR was made from, or another that covers the "
                                              "input's field of view"),
                     "brain mask": (brain_mask, "give a brain mask on the input's field of view"),
                     **{f"{name} tissue map": (m, f"give the {name} tissue map on the input's field of view")
                        for name, m in (masks or {}).items()}}
    if reuse is None:  # before any sampling: a reference or mask that does not fit the output grid is an error
        geometry = {k: v for k, v in pipe_kwargs.items() if k in _GEOMETRY_ARGUMENTS}
        _check_cover(given_volumes, pipe.output_grid(lr, **geometry))
    if reuse is not None:
        maps, run = reuse_outputs(pipe, lr, *reuse, calibration_region=calibration_region)
        _check_cover(given_volumes, maps["mean"])
    else:
        result = pipe(lr, output_type="np", keep_samples=False, calibration_region=calibration_region,
                      **pipe_kwargs)
        maps = {k: lr.with_data(np.asarray(getattr(result, k), np.float32), result.affine) for k in MAP_FILES}
        if result.data_disagreement is not None:
            maps["data_disagreement"] = lr.with_data(np.asarray(result.data_disagreement, np.float32), result.affine)
        run = result.record
    given, lr = lr, pipe.measured_input(lr, run)  # the views, baselines and checks on the grid the run measured
    grid = maps["mean"]  # masks and tissue maps onto the SR grid
    masks = {k: resample_to(m, grid) for k, m in masks.items()} if masks else None
    brain_mask = resample_to(brain_mask, grid, order=0) if brain_mask is not None else None
    calibration = run_calibration(pipe, run)  # the run or reuse_outputs warned already
    mismatch = _mismatch(pipe, calibration, run, lr)
    # described as the map written here was made: a reused run's is recomputed with the model's current calibration,
    # so its record's own description (run.risk) may be out of date
    risk = describe_risk(calibration, mismatch, calibration_region=calibration_region is not None)
    operator = run.acquisition()
    metrics = curve = None
    if reference is not None:  # before anything is written: a reference that does not fit is an error
        region = (None if calibration_region is None  # a mask on the given input's grid, as the run took it
                  else pipe.calibration_region_mask(given, calibration_region, maps["mean"].canonical()))
        metrics, curve = _against_reference(maps, lr, reference, operator, run, brain_mask, masks, calibration,
                                            region)
    notes = {name: note for name in BASELINES if metrics and (note := baseline_note(operator, name)) is not None}
    out.mkdir(parents=True, exist_ok=True)
    for key, name in {**MAP_FILES, "data_disagreement": DISAGREEMENT_FILE}.items():
        if key in maps:
            save_volume(maps[key], out / name, overwrite=True)
        else:  # a run without a noise std has no disagreement map: none of an earlier audit stays beside it
            (out / name).unlink(missing_ok=True)
    adapted = pipe.model_card.adapted
    if adapted is not None:  # the model that made the output is the folder's, adapted (the Adaptation row says how)
        label, _ = adapted.describe()
        unet = "pretrained" if adapted.steps == 0 else adapted.kept
        model_name = f"{model_name}, {label} {Path(adapted.source).name} ({unet} UNet)"
    card = {"input": input_name, "model": model_name, "operator": operator.describe(),
            "lr_spacing_mm": [round(float(s), 4) for s in lr.spacing],
            "sr_spacing_mm": [round(float(s), 4) for s in maps["mean"].spacing],
            "sampler": run.scheduler, "steps": run.num_inference_steps,
            "samples": run.num_samples, "seeds": list(run.seeds),
            "guidance": run.guidance, "noise_std": run.noise_std,
            "noise_std_estimated": run.noise_std_estimated,
            "noise_std_in_plane": (run.noise_std_in_plane  # the one its interval counted, if any
                                   if calibration is not None and calibration.for_unknown_noise else None),
            "relative_residual_max": run.max_relative_residual,
            "capped_fraction": operator.capped_fraction() if run.capped_fraction is None else run.capped_fraction,
            "calibration": asdict(calibration) if calibration is not None else "none (uncalibrated)",
            "interval": calibration.describe() if calibration is not None else "none (uncalibrated)",
            "risk": risk.to_dict(), "timings_s": {**(timings or {}), **run.timings} or None}
    if run.coarsened_input is not None:
        card["coarsened_input"] = run.coarsened_input.to_dict()
    if pipe.model_card.adapted is not None:
        card["adaptation"] = asdict(pipe.model_card.adapted)
    canon_lr = lr.canonical()
    norm = pipe.intensity_normalization(canon_lr.data)
    axes = pipe.input_axes(canon_lr, operator)  # the RAS+ axes the run super-resolved; the views follow the first
    axis = axes[0]
    outside = run.outside_training  # runs recorded before the check have none: check now
    outside = pipe.outside_training(canon_lr, operator, norm, axes) if outside is None else list(outside)
    stage = "output"  # a refitted run's map: its mean before the refit, or only what remains of a reused output
    if run.refit_disagreement:
        stage = "after_refit" if reuse is not None else "before_refit"
    return build_report(out, lr=lr, mean=maps["mean"], std=maps["std"], risk=maps["risk"],
                        dc_residual=maps["dc_residual"], disagreement=maps.get("data_disagreement"),
                        disagreement_stage=stage,
                        card=card, risk_threshold=risk_threshold,
                        calibration=_as_applied(calibration, calibration_region is not None),
                        calibration_mismatch=mismatch,
                        masks=masks, brain_mask=brain_mask, reference=reference,
                        metrics=metrics, baseline_notes=notes,
                        calibration_curve=curve, input_name=input_name,
                        sr_axis=next(a for a in range(3) if maps["risk"].axis_to_canonical(a) == axis),
                        intensity_range=float(norm.scale),
                        outside_training=outside, visibility=structure_visibility(operator))


_GEOMETRY_ARGUMENTS = ("affine", "lr_spacing", "target_spacing", "operator", "slice_profile", "slice_thickness",
                       "volume_index")
"""The pipeline arguments that decide the SR grid (:meth:`LatentDiffusionSRPipeline.output_grid`)."""


def _check_mask(mask: Volume) -> None:
    """A brain mask holds values in [0, 1] (1 inside; a probability map is cut at 0.5), and some voxels inside."""
    low, high = float(np.nanmin(mask.data)), float(np.nanmax(mask.data))
    if low < 0 or high > 1 or high < 0.5:
        raise InputError(f"is not a brain mask: its values run from {low:.4g} to {high:.4g}", mask.source,
                         "give a mask holding 1 inside the brain and 0 outside")


def _check_cover(volumes: dict[str, tuple[Volume | None, str]], grid: Volume) -> None:
    """A reference, brain mask or tissue map (``volumes``: by what it is, the volume and the advice for one that does
    not cover) must cover every voxel centre of the SR grid ``grid``, and a brain mask hold some of it."""
    canon = grid.canonical()  # said alike whichever orientation it is given in
    where = "the SR grid, {} RAS+ voxels of {} mm".format(" × ".join(map(str, canon.shape)),
                                                          " × ".join(f"{s:.3g}" for s in canon.spacing))
    for what, (volume, advice) in volumes.items():
        if volume is None:
            continue
        if not covers(volume, grid):
            raise InputError(f"does not cover {where}", volume.source, advice)
        if what == "brain mask" and not (resample_to(volume, canon, order=0).data >= 0.5).any():
            raise InputError(f"holds no voxel of {where}", volume.source, "give the brain mask of this scan")


def _against_reference(maps: dict[str, Volume], lr: Volume, reference: Volume, operator: AcquisitionOperator,
                       run: RunRecord, brain_mask: Volume | None, masks: dict[str, Volume] | None,
                       calibration: Calibration | None,
                       region: np.ndarray | None = None) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Metrics of SR and every baseline against the reference, and the calibration curve, in RAS+."""
    mean = maps["mean"].canonical()
    ref = resample_to(reference, mean)  # exact where the grids align (e.g. the LR was simulated from it)
    if brain_mask is not None:
        mask = brain_mask.canonical().data >= 0.5
    elif masks:
        mask = sum(m.canonical().data for m in masks.values()) >= 0.5
    else:
        mask = foreground(ref.data)
    case = Case("input", ref, lr.canonical(), operator, run.noise_std or 0.0)
    truth = ref.data.astype(np.float64)
    data_range = float(np.ptp(truth[mask]))
    std = maps["std"].canonical().data
    metrics = {"gen_sr": estimate_metrics(mean.data, truth, mask, data_range, std=std)}
    for name in BASELINES:
        metrics[name] = estimate_metrics(baseline(case, name), truth, mask, data_range)
    return metrics, _calibration_curve(std, mean.data, truth - mean.data, mask, calibration, case.noise_std, region)
