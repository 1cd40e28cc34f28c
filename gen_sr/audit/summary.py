"""The sentences of the hallucination-audit report and their number formats: the verdict, what a flagged voxel
means, and the geometry (coordinate frame, obliquity). Everything here goes into ``report.json`` as well as the
page."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from nibabel.affines import obliquity

from gen_sr.audit.clusters import CountedRegion
from gen_sr.physics import StructureVisibility
from gen_sr.risk import MISMATCH_WORDING, Calibration, DataDisagreement, IntervalShape, Mismatch, mismatch_text

__all__ = ["DISAGREEMENT_STAGES", "FRAME", "INTENSITY_UNIT", "DisagreementStage", "coords", "data_disagreement",
           "flag_meaning", "geometry", "grouped", "number", "peaks_where", "per_scan_basis", "per_scan_coverage",
           "seconds", "thin_structures", "verdict"]

FRAME = "scanner (world) coordinates in mm, RAS+ (x: left → right, y: posterior → anterior, z: inferior → superior)"
INTENSITY_UNIT = "input intensity units"
DisagreementStage = Literal["output", "before_refit", "after_refit"]
"""What a data-disagreement map is of (:func:`data_disagreement`)."""
DISAGREEMENT_STAGES: dict[DisagreementStage, str] = {
    "output": "of the output",
    "before_refit": "of the samples' mean before the refit: the output was then fitted to the data where they disagree",
    "after_refit": "of the reused output, after its run's refit: only what remains, not where the refit acted (the "
                   "super-resolve run's --data-disagreement map shows that)",
}
"""The one wording of what a data-disagreement map is of, for the report's text, its image and the terminal."""
RAS_AXES = ("x: left → right", "y: posterior → anterior", "z: inferior → superior")
OBLIQUE_DEG = 0.01  # voxel axes rotated by more than this from the scanner axes: an oblique input


def number(v: Any) -> str:
    """A table value: yes/no for booleans, a dash for missing or NaN, ∞, or 4 significant digits."""
    if isinstance(v, bool) or v is None:
        return {True: "yes", False: "no", None: "—"}[v]
    if isinstance(v, int | float | np.number):
        return "∞" if v == math.inf else "—" if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


def grouped(v: float) -> str:
    """A size or count as a plain number: thousands grouped, no exponent (37,970), 3 digits below 100."""
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def coords(xyz: Sequence[float]) -> str:
    """A world position, ``(x, y, z)`` in mm to 0.1 mm (no unit)."""
    return "({})".format(", ".join(f"{float(x):.1f}" for x in xyz))


def seconds(v: float) -> str:
    """A duration: whole seconds from 10 s up, 2 digits below."""
    return f"{v:.0f} s" if v >= 10 else f"{v:.2g} s"


def _amount(fraction: float, intensity_range: float | None) -> str:
    """A fraction of the input's robust intensity range as an intensity (``4.79 input intensity units``), or as that
    fraction where the range is not known."""
    if intensity_range is None:
        return f"{fraction:.3g} × the input's robust intensity range"
    return f"{fraction * intensity_range:.3g} {INTENSITY_UNIT}"


def _size(threshold: float, intensity_range: float | None) -> tuple[str, str]:
    """The error size a flag stands for: short (``0.0922``) and with its derivation."""
    amount = _amount(threshold, intensity_range)
    if intensity_range is None:
        return amount, amount
    return f"{threshold * intensity_range:.3g}", (f"{amount} (the threshold {threshold:g} × the input's robust "
                                                   f"intensity range {intensity_range:.4g})")


def per_scan_basis(calibration: Calibration) -> str:
    """What a per-scan calibration (:attr:`~gen_sr.risk.Calibration.per_scan`) was fitted on and what it assumes, as
    the card's calibration row and the summary say it: ``fitted on 9 (of 11; the others hold no foreground) held-out
    in-plane slices of the scan the model was adapted on, degraded along each in-plane axis with its slices; it
    assumes the scan's statistics in-plane and through-plane are alike``."""
    held = calibration.details.get("held_out_slices")
    used = calibration.details.get("slices_with_foreground")  # not in records made before it was recorded
    if not isinstance(held, list):
        slices = "held-out in-plane slices"
    elif not isinstance(used, list):
        slices = f"the held-out in-plane slices with foreground ({len(held)} held out)"
    elif len(used) < len(held):
        slices = f"{len(used)} (of {len(held)}; the others hold no foreground) held-out in-plane slices"
    else:
        slices = f"{len(held)} held-out in-plane slices"
    return (f"fitted on {slices} of the scan the model was adapted on, degraded along each in-plane axis with its "
            "slices; it assumes the scan's statistics in-plane and through-plane are alike")


def per_scan_coverage(calibration: Calibration) -> str | None:
    """How far the assumption of a per-scan calibration (:func:`per_scan_basis`) was seen to hold: the through-plane
    coverage measured for such calibrations (``details["measured_coverage"]``), or, for one made for runs whose noise
    std is not known, that it was not measured; ``None`` for a record that says neither."""
    if calibration.for_unknown_noise:  # older records carry the known-noise figures: not its own
        return "its coverage through-plane was not measured for scans whose noise std is not known"
    measured = calibration.details.get("measured_coverage")
    if isinstance(measured, list | tuple) and len(measured) == 2:
        return (f"where this was measured, on real and validation heads along every slice axis, the per-scan 90 % "
                f"interval covered {100 * float(measured[0]):.0f}-{100 * float(measured[1]):.0f} % of voxels "
                "through-plane, as heads are not alike along every axis")
    return None


def _guarantee(calibration: Calibration) -> str:
    """What the calibration's guarantee is over, in the summary's "if it holds" clause."""
    if not calibration.per_scan:
        return "it is a guarantee on average over inputs like the calibration data"
    coverage = per_scan_coverage(calibration)
    return ("calibrated on this scan's own held-out in-plane slices, it is a guarantee on average over in-plane "
            "problems like theirs, and holds through-plane as far as the scan's statistics in-plane and through-plane "
            "are alike" + ("" if coverage is None else f"; {coverage}"))


def peaks_where(fallback: bool, region: str) -> str:
    """Where the highest-risk places were ranked (:func:`~gen_sr.audit.clusters.ranked_peaks`; ``region``: the
    counted region's name), as the verdict and the demo say it: ``away from the brain's rim``, or ``over the whole
    volume`` where nothing there exceeds the threshold."""
    if fallback:
        return "over the whole volume"
    return "away from the volume's edges" if region == "whole volume" else f"away from the {region}'s rim"


def _no_coverage(short: str) -> str:
    """What a flag without a calibration that holds leaves open (the end of :func:`flag_meaning`'s text)."""
    return f"errors larger than {short} can occur anywhere, flagged or not, and no flagged fraction is expected."


def _spread_exceeds(calibration: Calibration, short: str, threshold: float, intensity_range: float | None) -> str:
    """Where the interval ``mean ± λ̂ u`` of ``calibration`` is wider than the flag's error size ``X`` (``short``),
    the spread ``u`` (the samples' std, or the calibration's spread of it) exceeds ``X / λ̂``: that, in words, at each
    scale it applied (one, or one in the calibration region and one outside it)."""
    plain = calibration.shape == IntervalShape()
    spread = "the samples' standard deviation" if plain else f"the spread {calibration.shape.describe()}"
    at = lambda scale: _amount(threshold / scale, intensity_range)  # noqa: E731
    if calibration.outside_scale is None:
        return f"{spread} exceeds {at(calibration.scale)} ({short} ÷ the scale {calibration.scale:.4g})"
    return (f"{spread} exceeds {at(calibration.scale)} in the calibration region and "
            f"{at(calibration.outside_scale)} outside it ({short} ÷ the scale {calibration.scale:.4g} in it, "
            f"{calibration.outside_scale:.4g} outside)")


def flag_meaning(threshold: float, *, calibration: Calibration | None, mismatch: Mismatch | None,
                 intensity_range: float | None, unflagged_fraction: float, region: str) -> tuple[str, float | None]:
    """What a flagged voxel means, and the bound (in %) on unflagged voxels off by more than the flag's error size
    (``None`` when nothing bounds it).

    Flagged means risk > threshold, i.e. the calibrated interval's half-width (or, uncalibrated, the std) exceeds
    ``X = threshold × intensity_range``. A calibration with miss rate ``alpha`` bounds the misses over all voxels,
    not the flagged fraction; the misses it allows could all fall among the unflagged voxels, so at most
    ``alpha / unflagged_fraction`` of those can be off by more than ``X``. A calibration that does not hold for the
    run still set the risk map's scale: the text gives the spread a flag stands for at that scale, and says why it
    bounds nothing.

    Args:
        calibration: the calibration as the risk map applied it (``None``: uncalibrated).
        mismatch: why it was not made for the run (:data:`~gen_sr.risk.Mismatch`), ``None`` where it was.
    """
    short, size = _size(threshold, intensity_range)
    if calibration is None:
        return (f"Where flagged, the samples' standard deviation exceeds {size}: they disagree by that much, so the "
                f"shown intensity is uncertain there. Without a calibration this says nothing about coverage: "
                f"{_no_coverage(short)}"), None
    if mismatch is not None:
        return (f"Where flagged, the interval of the model's calibration, {calibration.describe()}, is wider than "
                f"±{size}: {_spread_exceeds(calibration, short, threshold, intensity_range)}, so the shown intensity "
                f"is uncertain there. The risk map uses that calibration, but {mismatch_text(mismatch)}. So its "
                f"interval says nothing about coverage here: {_no_coverage(short)}"), None
    alpha = calibration.alpha
    text = (f"Where flagged, the truth may differ from the shown intensity by more than {size}: there the calibrated "
            f"{100 * (1 - alpha):g} % interval is wider than ±{short}, so an error of that size cannot be ruled out. A "
            "flagged voxel is uncertain, not necessarily wrong. Calibration does not set how much should be flagged "
            "(that depends on how wide the intervals are, not on their coverage); it bounds the misses.")
    if unflagged_fraction <= 0:
        return text, None
    bound = min(100.0, 100 * alpha / unflagged_fraction)
    text += (f" If it holds for this input ({_guarantee(calibration)}), the truth lies outside its interval in at "
             f"most {100 * alpha:g} % of voxels, so at most {bound:.3g} % of the unflagged voxels "
             f"({100 * unflagged_fraction:.1f} % of the {region}) can be off by more than {short}.")
    return text, bound


def _percent(v: float | None) -> str:
    return "—" if v is None else f"{v:.3g} %"


def verdict(*, flagged: int, foreground_voxels: int, region: CountedRegion, voxel_mm3: float,
            flagged_of_volume: float, clusters: list[dict[str, Any]], threshold: float,
            calibration: Calibration | None, mismatch: Mismatch | None, intensity_range: float | None,
            exceedance: dict[str, float | None] | None, peak: dict[str, Any] | None = None,
            peak_fallback: bool = False) -> dict[str, Any]:
    """The report's verdict: the one-line ``text``, what a flag means and the counts behind them.

    Args:
        flagged, foreground_voxels: flagged voxels inside the counted region, and its size, in voxels.
        region: the counted region (:func:`~gen_sr.audit.clusters.foreground_mask`; its name is the text's).
        flagged_of_volume: the flagged fraction of the whole volume.
        clusters: every cluster of the flagged voxels inside the foreground (:func:`~gen_sr.audit.clusters.
            risk_clusters` of the risk there), which the text's "largest cluster" names.
        peak, peak_fallback: the first of the highest-risk places (:func:`~gen_sr.audit.clusters.ranked_peaks`: away
            from the region's rim, or with ``peak_fallback`` over the whole volume), where the report's views point:
            the place the text names (not the largest cluster's own peak, which may lie on the rim the peaks leave
            out).
        exceedance: against a reference, the percentages of flagged and unflagged voxels whose error exceeds the
            flag's error size, or ``None``.
        calibration: the calibration as the risk map applied it (``None``: uncalibrated).
        mismatch: for a calibrated run, why its calibration was not made for it, ``None`` where it was
            (:meth:`~gen_sr.pipelines.LatentDiffusionSRPipeline.calibration_mismatch`); where not, the risk keeps
            its units but no coverage.
    """
    calibrated = calibration is not None
    pct = 100 * flagged / foreground_voxels
    label = ("uncalibrated" if not calibrated else "calibrated" if mismatch is None
             else f"calibrated {MISMATCH_WORDING[mismatch].label}")
    text = f"{pct:.1f} % of the {region.name} flagged high-risk (risk > {threshold:g}, {label})"
    largest = max(clusters, key=lambda c: c["voxels"], default=None)
    if largest is not None:
        text += f"; largest cluster {grouped(largest['size_mm3'])} mm³"
    if peak is not None:
        text += f"; highest-risk place {peaks_where(peak_fallback, region.name)} at {coords(peak['position_mm'])} mm"
    meaning, bound = flag_meaning(threshold, calibration=calibration, mismatch=mismatch if calibrated else None,
                                  intensity_range=intensity_range, unflagged_fraction=1 - flagged / foreground_voxels,
                                  region=region.name)
    observed = None
    if exceedance is not None and intensity_range is not None:
        observed = (f"Against the reference: {_percent(exceedance['flagged_percent'])} of the flagged and "
                    f"{_percent(exceedance['unflagged_percent'])} of the unflagged voxels of the {region.name} are "
                    f"off by more than {threshold * intensity_range:.3g}.")
    return {
        "text": text, "flagged_percent": pct, "flagged_voxels": flagged, "flagged_mm3": flagged * voxel_mm3,
        "foreground_voxels": foreground_voxels, "foreground": region.label, "region": region.name,
        "flagged_percent_of_volume": 100 * flagged_of_volume, "n_clusters": len(clusters), "largest_cluster": largest,
        "meaning": meaning, "error_size": None if intensity_range is None else threshold * intensity_range,
        "intensity_range": intensity_range, "alpha": calibration.alpha if calibrated else None,
        "unflagged_miss_bound_percent": bound,
        "observed": observed, "observed_exceedance": exceedance,
        "risk_note": _risk_note(calibration, mismatch),
    }


def _risk_note(calibration: Calibration | None, mismatch: Mismatch | None) -> str:
    if calibration is None:
        return ("Uncalibrated: risk is the sample spread relative to the intensity range; the threshold has no "
                "coverage guarantee.")
    source = ("the model's per-scan calibration, on held-out in-plane slices of the scan it was adapted on (card)"
              if calibration.per_scan else "the model's calibration (card)")
    if mismatch is not None:
        return (f"Calibrated {MISMATCH_WORDING[mismatch].label}: the risk scale comes from {source}, but "
                f"{mismatch_text(mismatch)}.")
    if calibration.per_scan:
        coverage = per_scan_coverage(calibration)
        return (f"Calibrated: the risk scale comes from the model's per-scan calibration (card), "
                f"{per_scan_basis(calibration)}" + ("" if coverage is None else f"; {coverage}") + ".")
    return f"Calibrated: the risk scale comes from {source}."


def geometry(affine: np.ndarray) -> dict[str, Any]:
    """The input's geometry for the report: the coordinate frame and the obliquity of its voxel axes (nibabel's
    :func:`~nibabel.affines.obliquity`, in degrees), with a sentence saying what it means for the views."""
    angles = np.degrees(obliquity(np.asarray(affine, dtype=np.float64)))
    worst = float(np.max(angles))
    oblique = worst > OBLIQUE_DEG
    note = (f"The input is oblique: its voxel axes are rotated by up to {worst:.1f}° from the scanner axes "
            f"(per voxel axis: {', '.join(f'{a:.1f}°' for a in angles)}). Positions are scanner coordinates; the "
            f"views show the voxel planes closest to sagittal, coronal and axial, tilted by up to {worst:.1f}° from "
            "the true planes." if oblique else
            "The input is not oblique: its voxel axes run along the scanner axes.")
    return {"frame": FRAME, "obliquity_deg": angles.tolist(), "max_obliquity_deg": worst, "oblique": oblique,
            "note": note}


def thin_structures(records: Sequence[StructureVisibility]) -> dict[str, Any]:
    """What the measurements cannot show: per acquired RAS+ axis and structure thickness, the fraction of a
    structure's contrast that reaches them (:func:`~gen_sr.physics.structure_visibility`, on the operator of the
    RAS+ grid), in percent, and the sentence that reads the table."""
    rows = [{"axis": r.axis, "direction": RAS_AXES[r.axis], "size_mm": r.size_mm, "best_percent": 100 * r.best,
             "worst_percent": 100 * r.worst} for r in records]
    text = ("Each measured slice averages the tissue across its thickness, so a structure thinner than a slice "
            "reaches the data with only part of its contrast: the table gives that part for layers of several "
            "thicknesses parallel to the slices, lying on a slice centre (the best case) or between two slices; a "
            "small lesion of the same thickness keeps less. What the slices lose, only the model's prior can fill "
            "in, and a prior trained without lesions does not: in the lesion stress test of the demo model, lesions "
            "half a slice thick appeared about as faint as the slices carry them (fainter still with noise; "
            "lesions 1.5 slices thick lost contrast too, until the refit where the data disagree gave it back), "
            "and its samples agreed there, so the risk map did not flag them. Expect the same of any model trained "
            "without lesions: a lesion thinner than a slice (with noise and without the refit, a larger one too) may "
            "appear faint, or not at all, without a flag. Where the output departs from the measured data, the next "
            "section shows it.")
    return {"text": text, "rows": rows}


def data_disagreement(flag: DataDisagreement, *, flagged: int, foreground_voxels: int, region: CountedRegion,
                      clusters: list[dict[str, Any]],
                      stage: DisagreementStage = "output") -> dict[str, Any]:
    """The section on where the output departs from the measured data (:class:`~gen_sr.risk.DataDisagreement`):
    the flagged share of the foreground, its largest clusters (:func:`~gen_sr.audit.clusters.risk_clusters` of the
    statistic) and what they mean. ``stage``: the map is of the output (``"output"``), of the samples' mean before the
    pipeline refitted the data where it exceeded the refit level (``"before_refit"``), or of a reused output after
    that refit (``"after_refit"``: only what remains), as :data:`DISAGREEMENT_STAGES` words it. ``region``: the
    counted region, as the verdict's."""
    name = region.name
    pct = 100 * flagged / max(foreground_voxels, 1)
    level = (f"(the local mean of the squared residual over a {flag.size_mm:g} mm window is more than "
             f"{flag.threshold:g} times its typical value in the measured slices, which the noise-aware projection "
             "holds at the noise level)")
    spread = ("The samples' spread cannot show this: where the model's prior pulls every sample alike away from what "
              "the slices carry (for example a lesion shown fainter than the data allow), the samples agree and the "
              "risk map stays low.")
    validated = ("Measured on validation brains with inserted lesions at SNR 30 (the demo model, without the refit): "
                 "the regions above this level held about twice the error of the rest, and about half of the 6 mm "
                 "lesions that the model showed fainter than the slices carry lay in one. It is a measurement of "
                 "disagreement, not a lesion detector: a region below the level is not proof of a faithful output.")
    if stage == "before_refit":
        text = (f"In {pct:.1f} % of the {name} the model's samples departed from the measured slices by more than "
                f"their noise explains {level}. This map is {DISAGREEMENT_STAGES[stage]}. {spread} After the refit "
                "the output agrees with what the slices measure, but what they cannot measure there (detail finer "
                f"than a slice) still comes from a prior that disagreed with the data. {validated} Compare the output "
                "with the input slices at these places.")
    elif stage == "after_refit":
        text = (f"{pct:.1f} % of the {name} still departs from the measured slices by more than their noise "
                f"explains {level}. This map is {DISAGREEMENT_STAGES[stage]}. {spread}")
    else:
        text = (f"{pct:.1f} % of the {name} departs from the measured slices by more than their noise explains "
                f"{level}. {spread} The output no longer fits the measurements there. {validated} Where it is high, "
                "compare the output with the input slices.")
    return {"text": text, "flagged_percent": pct, "flagged_voxels": flagged, "size_mm": flag.size_mm,
            "threshold": flag.threshold, "stage": stage, "definition": flag.describe(stage == "before_refit"),
            "clusters": clusters}
