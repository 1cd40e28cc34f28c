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
from gen_sr.risk import MISMATCH_WORDING, DataDisagreement, Mismatch, mismatch_text

__all__ = ["FRAME", "INTENSITY_UNIT", "coords", "data_disagreement", "flag_meaning", "geometry", "grouped", "number",
           "seconds", "thin_structures", "verdict"]

FRAME = "scanner (world) coordinates in mm, RAS+ (x: left → right, y: posterior → anterior, z: inferior → superior)"
INTENSITY_UNIT = "input intensity units"
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


def _size(threshold: float, intensity_range: float | None) -> tuple[str, str]:
    """The error size a flag stands for: short (``0.0922``) and with its derivation."""
    if intensity_range is None:
        text = f"{threshold:g} × the input's robust intensity range"
        return text, text
    x = threshold * intensity_range
    return f"{x:.3g}", (f"{x:.3g} {INTENSITY_UNIT} (the threshold {threshold:g} × the input's robust intensity range "
                        f"{intensity_range:.4g})")


def flag_meaning(threshold: float, *, calibrated: bool, alpha: float | None, intensity_range: float | None,
                 unflagged_fraction: float, region: str) -> tuple[str, float | None]:
    """What a flagged voxel means, and the bound (in %) on unflagged voxels off by more than the flag's error size
    (``None`` when nothing bounds it).

    Flagged means risk > threshold, i.e. the calibrated interval's half-width (or, uncalibrated, the std) exceeds
    ``X = threshold × intensity_range``. A calibration with miss rate ``alpha`` bounds the misses over all voxels,
    not the flagged fraction; the misses it allows could all fall among the unflagged voxels, so at most
    ``alpha / unflagged_fraction`` of those can be off by more than ``X``.
    """
    short, size = _size(threshold, intensity_range)
    if not calibrated:
        return (f"Where flagged, the samples' standard deviation exceeds {size}: they disagree by that much, so the "
                "shown intensity is uncertain there. Without a calibration this says nothing about coverage: errors "
                "larger than that can occur anywhere, flagged or not, and no flagged fraction is expected."), None
    cov = f"{100 * (1 - alpha):g} % " if alpha is not None else ""
    text = (f"Where flagged, the truth may differ from the shown intensity by more than {size}: there the calibrated "
            f"{cov}interval is wider than ±{short}, so an error of that size cannot be ruled out. A flagged voxel is "
            "uncertain, not necessarily wrong. Calibration does not set how much should be flagged (that depends on "
            "how wide the intervals are, not on their coverage); it bounds the misses.")
    if alpha is None or unflagged_fraction <= 0:
        return text, None
    bound = min(100.0, 100 * alpha / unflagged_fraction)
    text += (f" If it holds for this input (it is a guarantee on average over inputs like the calibration data), "
             f"the truth lies outside its interval in at most {100 * alpha:g} % of voxels, so at most {bound:.3g} % of "
             f"the unflagged voxels ({100 * unflagged_fraction:.1f} % of the {region}) can be off by more than "
             f"{short}.")
    return text, bound


def _percent(v: float | None) -> str:
    return "—" if v is None else f"{v:.3g} %"


def verdict(*, flagged: int, foreground_voxels: int, region: CountedRegion, voxel_mm3: float,
            flagged_of_volume: float, clusters: list[dict[str, Any]], threshold: float, calibrated: bool,
            mismatch: Mismatch | None, alpha: float | None, intensity_range: float | None,
            exceedance: dict[str, float | None] | None) -> dict[str, Any]:
    """The report's verdict: the one-line ``text``, what a flag means and the counts behind them.

    Args:
        flagged, foreground_voxels: flagged voxels inside the counted region, and its size, in voxels.
        region: the counted region (:func:`~gen_sr.audit.clusters.foreground_mask`; its name is the text's).
        flagged_of_volume: the flagged fraction of the whole volume.
        clusters: every cluster of the flagged voxels inside the foreground (:func:`~gen_sr.audit.clusters.
            risk_clusters` of the risk there), which the text's "largest cluster" names.
        exceedance: against a reference, the percentages of flagged and unflagged voxels whose error exceeds the
            flag's error size, or ``None``.
        mismatch: for a calibrated run, why its calibration was not made for it, ``None`` where it was
            (:meth:`~gen_sr.pipelines.LatentDiffusionSRPipeline.calibration_mismatch`); where not, the risk keeps
            its units but no coverage.
    """
    holds = calibrated and mismatch is None
    pct = 100 * flagged / foreground_voxels
    label = ("uncalibrated" if not calibrated else "calibrated" if holds
             else f"calibrated {MISMATCH_WORDING[mismatch].label}")
    text = f"{pct:.1f} % of the {region.name} flagged high-risk (risk > {threshold:g}, {label})"
    largest = max(clusters, key=lambda c: c["voxels"], default=None)
    if largest is not None:
        text += f"; largest cluster {grouped(largest['size_mm3'])} mm³, peak risk at {coords(largest['peak_mm'])} mm"
    meaning, bound = flag_meaning(threshold, calibrated=holds, alpha=alpha, intensity_range=intensity_range,
                                  unflagged_fraction=1 - flagged / foreground_voxels, region=region.name)
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
        "intensity_range": intensity_range, "alpha": alpha, "unflagged_miss_bound_percent": bound,
        "observed": observed, "observed_exceedance": exceedance,
        "risk_note": _risk_note(calibrated, mismatch),
    }


def _risk_note(calibrated: bool, mismatch: Mismatch | None) -> str:
    if not calibrated:
        return ("Uncalibrated: risk is the sample spread relative to the intensity range; the threshold has no "
                "coverage guarantee.")
    if mismatch is not None:
        return (f"Calibrated {MISMATCH_WORDING[mismatch].label}: the risk scale comes from the model's calibration "
                f"(card), but {mismatch_text(mismatch)}.")
    return "Calibrated: the risk scale comes from the model's calibration (card)."


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
                      stage: Literal["output", "before_refit", "after_refit"] = "output") -> dict[str, Any]:
    """The section on where the output departs from the measured data (:class:`~gen_sr.risk.DataDisagreement`):
    the flagged share of the foreground, its largest clusters (:func:`~gen_sr.audit.clusters.risk_clusters` of the
    statistic) and what they mean. ``stage``: the map is of the output (``"output"``), of the samples' mean before the
    pipeline refitted the data where it exceeded the refit level (``"before_refit"``), or of a reused output after
    that refit (``"after_refit"``: only what remains). ``region``: the counted region, as the verdict's."""
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
                f"their noise explains {level}, before the output was fitted to the data there (the pipeline's "
                f"refit where the data disagree). {spread} After the refit the output agrees with what the slices "
                "measure, but what they cannot measure there (detail finer than a slice) still comes from a prior "
                f"that disagreed with the data. {validated} Compare the output with the input slices at these places.")
    elif stage == "after_refit":
        text = (f"{pct:.1f} % of the {name} still departs from the measured slices by more than their noise "
                f"explains {level}. This map is computed from the reused output, after the run refitted the data "
                "where its samples departed from them: it shows only what remains, not where the refit acted (the "
                f"super-resolve run's --data-disagreement map shows that). {spread}")
    else:
        text = (f"{pct:.1f} % of the {name} departs from the measured slices by more than their noise explains "
                f"{level}. {spread} The output no longer fits the measurements there. {validated} Where it is high, "
                "compare the output with the input slices.")
    return {"text": text, "flagged_percent": pct, "flagged_voxels": flagged, "size_mm": flag.size_mm,
            "threshold": flag.threshold, "stage": stage, "definition": flag.describe(stage == "before_refit"),
            "clusters": clusters}
