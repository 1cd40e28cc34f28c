"""The hallucination-audit report: one self-contained ``report.html`` and the same figures in ``report.json``.

:func:`build_report` takes the results of a super-resolution run as plain data (volumes, the model card, metrics
and a calibration curve computed elsewhere) and writes both files atomically. It wires the parts together:
:mod:`~gen_sr.audit.clusters` (clusters, peaks, foreground, profile), :mod:`~gen_sr.audit.summary` (the verdict
and what a flag means), :mod:`~gen_sr.audit.figures` (PNG data URIs) and :mod:`~gen_sr.audit.page` (the jinja2
page: inline CSS, no script, no external resource, every user-supplied string escaped). This is a research tool,
not for diagnosis.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.affines import apply_affine

from gen_sr.audit.clusters import (
    BACKGROUND,
    PeakRule,
    foreground_mask,
    on_grid,
    ranked_peaks,
    risk_clusters,
    risk_peaks,
    slice_profile,
)
from gen_sr.audit.figures import calibration_plot, orthogonal_views, profile_plot
from gen_sr.audit.page import DISCLAIMER, render_page
from gen_sr.audit.summary import DisagreementStage, data_disagreement, geometry, thin_structures, verdict
from gen_sr.io import atomic_write, json_ready, write_json
from gen_sr.physics import StructureVisibility
from gen_sr.risk import Calibration, DataDisagreement, Mismatch
from gen_sr.volume import Volume

__all__ = ["BACKGROUND", "DISCLAIMER", "PeakRule", "build_report", "risk_clusters", "risk_peaks"]


def build_report(output_dir: str | Path, *, lr: Volume, mean: Volume, std: Volume, risk: Volume, dc_residual: Volume,
                 disagreement: Volume | None = None, disagreement_flag: DataDisagreement | None = None,
                 disagreement_stage: DisagreementStage = "output",
                 card: dict[str, Any], risk_threshold: float, calibration: Calibration | None,
                 calibration_mismatch: Mismatch | None,
                 masks: dict[str, Volume] | None = None,
                 brain_mask: Volume | None = None, reference: Volume | None = None,
                 metrics: dict[str, dict[str, float]] | None = None, baseline_notes: dict[str, str] | None = None,
                 calibration_curve: dict[str, Any] | None = None, input_name: str, sr_axis: int,
                 intensity_range: float | None = None,
                 outside_training: Sequence[str] | None = None,
                 peak_rule: PeakRule | None = None,
                 visibility: Sequence[StructureVisibility] | None = None) -> dict[str, Any]:
    """Write ``report.html`` and ``report.json`` into ``output_dir`` (created if missing), atomically.

    All maps are brought onto the risk map's grid (the LR, and any map on another grid, by linear resampling), and
    shown in RAS+ orientation; positions are scanner (world) mm, RAS+. The verdict's percentage counts flagged
    voxels (risk > ``risk_threshold``) inside ``brain_mask`` (a mask volume, 1 inside), else the brain of the tissue
    ``masks``, else the SR mean's foreground (see :func:`~gen_sr.audit.clusters.foreground_mask`); the per-slice
    profile runs along the risk map's voxel axis ``sr_axis``. The peaks table and the views' centre follow
    ``peak_rule`` (default :class:`PeakRule`).

    Args:
        metrics: ``{method: {metric: value}}``, shown when given (with the reference).
        baseline_notes: ``{method: note}`` for the baselines of ``metrics`` that computed something other than they
            are named (:func:`~gen_sr.eval.baselines.baseline_note`), said under the table.
        calibration_curve: ``{"nominal": [...], "observed": [...]}`` and optional scalars (``alpha``, ``lambda``).
        intensity_range: the input's robust intensity range in input units (the pipeline's
            ``intensity_normalization(lr).scale``), which turns the threshold into an error size.
        calibration: the calibration as the risk map applied it (its scale, spread and miss rate ``alpha``: coverage
            ``1 − alpha``), ``None`` uncalibrated.
        calibration_mismatch: why that calibration was not made for the run (its settings, grid, scan or noise;
            :meth:`~gen_sr.pipelines.LatentDiffusionSRPipeline.calibration_mismatch`), ``None`` where it was (and
            uncalibrated): the verdict says where not, and claims no coverage. Required, so that no caller claims
            coverage by leaving it out.
        outside_training: the run record's sentences on where the input lies outside the trained regime
            (``None``: not checked).
        disagreement: the data-disagreement map of a run given a noise std
            (:meth:`~gen_sr.risk.DataDisagreement.statistic`), flagged at ``disagreement_flag``'s threshold (default:
            the class defaults) and shown as "Where the output departs from the data" (``None``: the section says
            that it needs a noise std); ``disagreement_stage``: what it is of (see
            :func:`~gen_sr.audit.summary.data_disagreement`).
        visibility: what the measurements keep of thin structures (:func:`~gen_sr.physics.structure_visibility`
            of the run's operator), shown as "What the slices cannot show" (``None``: not shown).

    Returns:
        The JSON payload (what ``report.json`` holds).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t, rule = float(risk_threshold), peak_rule or PeakRule()
    r = np.asarray(risk.data, dtype=np.float64)
    maps = {"mean": on_grid(mean, risk), "lr": on_grid(lr, risk), "std": on_grid(std, risk),
            "dc": on_grid(dc_residual, risk)}
    departs = None
    if disagreement is not None:
        flag = disagreement_flag or DataDisagreement()
        maps["disagreement"] = on_grid(disagreement, risk)
    if reference is not None:
        maps["reference"] = on_grid(reference, risk)
    fg, region = foreground_mask(maps["mean"], {k: on_grid(m, risk) for k, m in (masks or {}).items()},
                                 None if brain_mask is None else on_grid(brain_mask, risk, order=0))
    all_clusters = risk_clusters(risk, t, masks=masks, top=None)
    peaks, rule_record = ranked_peaks(risk, t, fg, rule, region.mask, masks=masks)
    flagged = (r > t) & fg
    if disagreement is not None:
        d = Volume(np.where(fg, maps["disagreement"], 0.0), risk.affine)  # its regions inside the counted region
        departs = data_disagreement(flag, flagged=int(np.count_nonzero(flag.flags(d.data))),
                                    foreground_voxels=int(fg.sum()), region=region,
                                    clusters=risk_clusters(d, flag.threshold, masks=masks, top=5),
                                    stage=disagreement_stage)
    counted = risk_clusters(Volume(np.where(fg, r, 0.0), risk.affine), t, masks=masks, top=None)  # in the region
    summary = verdict(flagged=int(np.count_nonzero(flagged)), foreground_voxels=int(fg.sum()), region=region,
                      voxel_mm3=abs(float(np.linalg.det(risk.affine[:3, :3]))), flagged_of_volume=float(np.mean(r > t)),
                      clusters=counted, threshold=t, calibration=calibration, mismatch=calibration_mismatch,
                      intensity_range=intensity_range, exceedance=_exceedance(maps, flagged, fg, t, intensity_range),
                      peak=peaks[0] if peaks else None, peak_fallback=rule_record["fallback"])
    # ------------------------------------------------------------------ orthogonal views in RAS+
    can = {k: Volume(a, risk.affine).canonical() for k, a in {**maps, "risk": r}.items()}
    centre, centred_on = _view_centre(can["mean"], all_clusters, peaks)
    figures = orthogonal_views(can, centre, t, None if disagreement is None else flag.threshold, disagreement_stage)
    profile = slice_profile(r, fg, t, sr_axis)
    figures.append({"id": "profile", "title": f"Mean risk and flagged fraction per slice along voxel axis {sr_axis}",
                    "uri": profile_plot(profile, t, sr_axis, risk.spacing[sr_axis])})
    if calibration_curve is not None:
        figures.append({"id": "calibration", "title": "Observed against nominal coverage",
                        "uri": calibration_plot(calibration_curve)})
    payload = json_ready({
        "input_name": str(input_name), "disclaimer": DISCLAIMER, "verdict": summary, "risk_threshold": t,
        "calibrated": calibration is not None, "calibration_holds": calibration_mismatch is None,
        "calibration_mismatch": calibration_mismatch, "card": card,
        "clusters": all_clusters[:10], "n_clusters": len(all_clusters), "peaks": peaks,
        "peak_rule": rule_record, "geometry": geometry(lr.affine),
        "outside_training": None if outside_training is None else [str(s) for s in outside_training],
        "views": {"centred_on": centred_on, "centre_mm": apply_affine(can["mean"].affine, centre),
                  "rule": rule_record["text"]},
        "profile": {**profile, "axis": sr_axis, "spacing_mm": risk.spacing[sr_axis]},
        "metrics": metrics, "baseline_notes": dict(baseline_notes or {}), "calibration_curve": calibration_curve,
        "thin_structures": None if visibility is None else thin_structures(visibility),
        "data_disagreement": departs,
        "figures": [{"id": f["id"], "title": f["title"]} for f in figures],
    })
    page = render_page(payload, figures)
    write_json(out / "report.json", payload)
    atomic_write(out / "report.html", lambda p: p.write_text(page, encoding="utf-8"))
    return payload


def _exceedance(maps: dict[str, np.ndarray], flagged: np.ndarray, fg: np.ndarray, threshold: float,
                intensity_range: float | None) -> dict[str, float | None] | None:
    """Against the reference: the percentages of flagged and of unflagged foreground voxels whose error exceeds
    the flag's error size ``threshold × intensity_range`` (``None`` without a reference or the range)."""
    if "reference" not in maps or intensity_range is None:
        return None
    off = np.abs(maps["mean"] - maps["reference"]) > threshold * intensity_range
    unflagged = fg & ~flagged
    return {name: 100 * float(off[m].mean()) if m.any() else None
            for name, m in (("flagged_percent", flagged), ("unflagged_percent", unflagged))}


def _view_centre(grid: Volume, clusters: list[dict[str, Any]],
                 peaks: list[dict[str, Any]]) -> tuple[np.ndarray, str]:
    """The voxel of the RAS+ ``grid`` the views go through, and what it is: the first highest-risk place (the
    peak, not a centroid: the centroid of a curved cluster, a rim or a ribbon, can lie outside it), else the
    volume centre."""
    if not peaks:
        return (np.asarray(grid.shape) - 1) // 2, "the volume centre"
    world = np.asarray(peaks[0]["position_mm"], dtype=np.float64)
    if np.allclose(world, clusters[0]["peak_mm"], atol=1e-6):
        centred_on = "the peak of the highest-risk cluster"
    else:
        centred_on = (f"the first of the highest-risk places (risk {peaks[0]['risk']:.3g}, in cluster "
                      f"#{peaks[0]['cluster']})")
    voxel = np.rint(apply_affine(np.linalg.inv(grid.affine), world))
    return np.clip(voxel, 0, np.asarray(grid.shape) - 1).astype(int), centred_on
