"""The hallucination-audit page: ``report.html`` rendered from the jinja2 template ``templates/report.html.j2``.

The template is rendered with autoescaping, so every string (input name, card, mask and metric names) is escaped
there; this module only turns the report's payload into labelled rows and tables of :class:`Cell` (text, right
alignment, bold). The page embeds its figures as data URIs and its CSS inline: no script, no external resource.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from gen_sr.audit.figures import FigureRecord
from gen_sr.audit.summary import (
    INTENSITY_UNIT,
    coords,
    grouped,
    number,
    per_scan_basis,
    per_scan_coverage,
    seconds,
)
from gen_sr.config import ConfigError, config_from_dict
from gen_sr.model_card import Adaptation
from gen_sr.risk import MISMATCH_WORDING, Calibration, grid_text, mismatch_text
from gen_sr.run_record import RiskRecord
from gen_sr.schedulers import sampler_text

__all__ = ["DISCLAIMER", "Cell", "Table", "card_rows", "render_page", "table"]

DISCLAIMER = ("Research tool, not for diagnosis. The risk map flags where the super-resolved image may differ from the "
              "true anatomy; an unflagged region is not proof that it is correct.")
_HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "nrmse": False, "hfen": False, "mse": False, "rmse": False,
                     "mae": False, "lpips": False}
_UNITS = {"psnr": "dB"}
_METRIC_NOTES = {
    "psnr": "PSNR: peak signal-to-noise ratio over the reference's intensity range in the counted region",
    "ssim": "SSIM: structural similarity (1: identical)",
    "nrmse": "NRMSE: ‖estimate − reference‖ / ‖reference‖",
    "hfen": "HFEN: the NRMSE of Laplacian-of-Gaussian filtered images (errors in edges and fine texture)",
    "spearman": "spearman: rank correlation of the samples' std with |error| (1: the std ranks the error perfectly)",
    "ause": "ause: area between the sparsification curves of the std and of the error itself (0: perfect ranking)",
    "uce": "uce: the mean gap between the error's and the std's variance in bins of std (squared intensity units)",
    "ence": "ence: the mean relative gap between the std and the RMS error in bins of std (0: calibrated std)",
    "coverage_1sigma": "coverage_1sigma / 2sigma: the share of voxels whose error lies within ±1 / ±2 std (a "
                       "Gaussian's: 0.68 / 0.95)",
}
"""What each column of the metrics table means, said under it."""
_METHODS = {"crc": "conformal risk control", "rcps": "risk-controlling prediction sets"}
_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")), autoescape=True,
                          undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


@dataclass(frozen=True)
class Cell:
    """One table cell: its text (escaped when rendered), right-aligned when ``numeric``, bold when ``bold``."""

    text: str
    numeric: bool = False
    bold: bool = False


@dataclass(frozen=True)
class Table:
    """A table: a header row and body rows of cells, and a CSS class."""

    header: list[Cell]
    rows: list[list[Cell]]
    cls: str = ""


def table(header: Sequence[str], rows: Sequence[Sequence[str | Cell]], *, numeric: range = range(0),
          cls: str = "") -> Table:
    """A :class:`Table` from strings (or ready cells); the columns in ``numeric`` are right-aligned."""
    def cell(col: int, c: str | Cell) -> Cell:
        return Cell(c.text, col in numeric, c.bold) if isinstance(c, Cell) else Cell(c, col in numeric)
    return Table([cell(i, h) for i, h in enumerate(header)], [[cell(i, c) for i, c in enumerate(r)] for r in rows],
                 cls)


# ----------------------------------------------------------------------------------------------------- card
def _plain(v: Any) -> str:
    """Any card value in one line: scalars as :func:`number`, lists comma-separated, dicts as ``key: value``."""
    if isinstance(v, Mapping):
        return "; ".join(f"{k}: {_plain(x)}" for k, x in v.items())
    if isinstance(v, list | tuple):
        return ", ".join(_plain(x) for x in v)
    if isinstance(v, str):
        return "; ".join(line.strip() for line in v.splitlines() if line.strip())
    return number(v)


def _spacing(v: Any) -> str:
    return " × ".join(f"{float(s):g}" for s in v) + " mm" if isinstance(v, list | tuple) else _plain(v)


def _seeds(v: Any) -> str:
    """Seeds as whole numbers (a run is reproduced from them), the middle of a long list left out."""
    if isinstance(v, list | tuple) and len(v) > 6:
        return f"{', '.join(map(str, v[:3]))}, …, {v[-1]} ({len(v)} seeds)"
    return ", ".join(map(str, v)) if isinstance(v, list | tuple) else _plain(v)


def _noise(v: Any) -> str:
    if isinstance(v, int | float) and not isinstance(v, bool):
        return "0 (noise-free)" if v == 0 else f"{v:.4g} ({INTENSITY_UNIT})"
    return _plain(v)


def _calibration(v: Any) -> str:
    """``conformal risk control (crc), α = 0.1 (coverage 90 %), from 96 units of 8 volumes; …``: a calibration
    record as the card holds it (``asdict``); anything else (e.g. ``none (uncalibrated)``), as it stands."""
    try:
        cal = Calibration(**v)
    except (TypeError, ValueError):
        return _plain(v)
    method, details = cal.method, cal.details
    units, volumes = details.get("units"), details.get("volumes")
    text = f"{_METHODS.get(method, method)} ({method}), α = {cal.alpha:g} (coverage {100 * (1 - cal.alpha):g} %)"
    if method == "rcps":
        text += f", δ = {cal.delta:g} ({cal.bound} bound)"
    if units is not None:
        text += f", from {units} units" + (f" of {len(volumes)} volumes" if isinstance(volumes, list) else "")
    else:  # a record from before the units were recorded: num_volumes counts them all the same
        text += f", from {cal.num_units} units"
    at_grid = ""
    if cal.scale_per_mm is not None:
        at_grid = f": {cal.scale_per_mm:.4g} per mm" + (
            f", {cal.scale:.4g} on this run's {cal.grid_spacing:g} mm grid" if cal.grid_spacing is not None else "")
    if grid := grid_text(cal):  # else: a record that says nothing of grids
        text += f" ({grid}{at_grid})"
    text += f"; miss rate on the calibration data {cal.risk_hat:.3f}"
    if cal.per_scan:
        text += f". Per-scan: {per_scan_basis(cal)}"
        if cal.for_unknown_noise:
            text += ". Made for runs whose noise std is not known (the interval counts the noise read in-plane)"
        if (coverage := per_scan_coverage(cal)) is not None:
            text += f"; {coverage}" if cal.for_unknown_noise else f". {coverage[0].upper()}{coverage[1:]}"
    if cal.outside_scale is not None:
        text += (f". Fitted per region: scale {cal.scale:.3g} in the calibration region (the mask given), "
                 f"{cal.outside_scale:.3g} in the rest of the foreground")
    if isinstance(details.get("noisy_reference_scale"), int | float):
        text += (f". The scale is extrapolated to noise-free references ({details['noisy_reference_scale']:.3g} "
                 "against references holding noise)")
    return text


def _adaptation(v: Any) -> str:
    """What was done on the scan (:meth:`gen_sr.model_card.Adaptation.describe`), e.g. ``adapted on lr.nii.gz (200
    steps, 180 s, ...)``; a record this version cannot read, as it stands."""
    try:
        label, text = config_from_dict(Adaptation, dict(v)).describe()
    except (ConfigError, TypeError, ValueError):
        return _plain(v)
    return f"{label} {text}"


def _risk(v: Any) -> str:
    """The run's risk (:class:`~gen_sr.run_record.RiskRecord`): uncalibrated, or calibrated and, where its
    calibration was not made for the run, why (``mismatch``); a record that does not say, as it stands."""
    try:
        risk = RiskRecord.from_dict(v)
    except ValueError:  # no risk record (RiskRecord.from_dict raises nothing else), as a run record reads it
        return _plain(v)
    if not risk.calibrated:
        return "the samples' std ÷ the input's robust intensity range (uncalibrated)"
    if risk.holds is None or not (risk.holds or risk.mismatch in MISMATCH_WORDING):
        return _plain(v)
    return ("the calibrated interval's half-width ÷ the input's robust intensity range"
            + ("" if risk.holds else f"; {mismatch_text(risk.mismatch)}"))


_ADAPTATION_PHASES = {"adapt_s": "adapt", "compare_s": "compare with the pretrained UNet",
                      "calibrate_s": "calibrate on the scan"}
"""An adaptation's phases (:attr:`gen_sr.training.scan_fit.ScanFit.timings`), as the timings row names them."""


def _timings(v: Any) -> str:
    """The time of each phase: ``prepare 2.2 s, denoise 180 s, ...``; after an adaptation, its phases first:
    ``adaptation: adapt 95 s, ...; sampling: prepare 2.2 s, ...``."""
    if not isinstance(v, Mapping):
        return _plain(v)
    times = {str(k): float(x) for k, x in v.items() if isinstance(x, int | float)}
    sampling = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {seconds(x)}" for k, x in times.items()
                         if k not in _ADAPTATION_PHASES)
    adaptation = ", ".join(f"{name} {seconds(times[k])}" for k, name in _ADAPTATION_PHASES.items() if k in times)
    return f"adaptation: {adaptation}; sampling: {sampling}" if adaptation else sampling


def _coarsened(v: Any) -> str:
    if not isinstance(v, Mapping):
        return _plain(v)
    return (f"from {_spacing(v.get('from_spacing'))} to {_spacing(v.get('to_spacing'))} (RAS+), by k-space truncation, "
            "for the SR voxel spacing asked")


def _capped(v: Any) -> str:
    if not isinstance(v, int | float):
        return _plain(v)
    return "none" if v == 0 else f"{100 * v:.0f} % of the slices' components (they measure them too weakly)"


_CARD: dict[str, tuple[str, Callable[[Any], str]]] = {
    "input": ("Input", _plain), "model": ("Model", _plain), "operator": ("Acquisition (RAS+ axes)", _plain),
    "hr_spacing_mm": ("HR voxel spacing", _spacing), "lr_spacing_mm": ("LR voxel spacing", _spacing),
    "sr_spacing_mm": ("SR voxel spacing", _spacing), "sampler": ("Sampler", _plain), "steps": ("Sampler steps", _plain),
    "samples": ("Posterior samples", _plain), "seeds": ("Seeds", _seeds), "guidance": ("Data consistency", _plain),
    "coarsened_input": ("Input resampled", _coarsened), "noise_std": ("Measurement noise std", _noise),
    "noise_std_estimated": ("Noise std", lambda v: "read from the scan's background air (--noise-std auto)" if v
                            else "as given"),
    "relative_residual_max": ("Largest relative residual ‖A x − y‖ / ‖y‖", _plain),
    "capped_fraction": ("Exact fits capped for the noise gain", _capped),
    "calibration": ("Calibration", _calibration), "risk": ("Risk", _risk), "timings_s": ("Timings", _timings),
    "adaptation": ("Adaptation", _adaptation),
}


def card_rows(card: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The model card as short labelled rows (the full record stays in ``report.json``)."""
    rows = []
    steps = card.get("steps") if isinstance(card.get("sampler"), str) and isinstance(card.get("steps"), int) else None
    for key, value in card.items():
        if key == "interval":
            rows.append(("Interval", _plain(value)))  # as Calibration.describe words it
        elif key == "noise_std" and not value and card.get("noise_std_estimated"):  # not known: fitted exactly
            rows.append((_CARD[key][0], _noise_not_known(card)))
        elif (key == "noise_std_in_plane" or (key == "steps" and steps is not None)
              or (key == "noise_std_estimated" and value and "noise_std" in card and not card["noise_std"])):
            continue  # said in the noise std's row (one row for a noise std not known), and the sampler's
        elif key == "sampler" and isinstance(value, str):  # its recorded name (the run record's) in words
            rows.append((_CARD[key][0], sampler_text(value, steps)))
        else:
            label, fmt = _CARD.get(key, (str(key), _plain))
            rows.append((label, fmt(value)))
    return rows


def _noise_not_known(card: Mapping[str, Any]) -> str:
    """The noise std row of a run that had none: its slices fitted exactly, and what its interval did about it."""
    text = ("not known: the scan has no background air to read it from (--noise-std auto), so its slices were "
            "fitted exactly, without one; ")
    in_plane = card.get("noise_std_in_plane")  # on the card where the interval counted it
    if isinstance(in_plane, int | float):
        return text + (f"the calibrated interval counts the noise read in-plane from its slices ({in_plane:.3g}), as "
                       "calibrated for such runs; give --noise-std for a noise-aware fit")
    return text + "the calibrated interval, made for noise-free slices, under-covers a noisy scan: give --noise-std"


# ----------------------------------------------------------------------------------------------------- tables
def _metrics_table(metrics: Mapping[str, Mapping[str, float | None]], notes: Mapping[str, str]) -> Table:
    """The metrics, one row per method; a method with a note (``notes``: said under the table) marked ``*``."""
    names = list(dict.fromkeys(k for row in metrics.values() for k in row))
    best = {}
    for name in names:
        direction = _HIGHER_IS_BETTER.get(name.lower())
        values = [v for row in metrics.values() if isinstance(v := row.get(name), int | float) and np.isfinite(v)]
        if direction is not None and values:
            best[name] = max(values) if direction else min(values)
    header = ["method"] + [f"{n} [{_UNITS[n.lower()]}]" if n.lower() in _UNITS else n for n in names]
    rows = [[f"{method} *" if method in notes else method]
            + [Cell(number(row.get(n)), bold=row.get(n) is not None and row.get(n) == best.get(n)) for n in names]
            for method, row in metrics.items()]
    return table(header, rows, numeric=range(1, len(header)))


def _xyz(position: Sequence[float]) -> list[str]:
    return [f"{float(x):.1f}" for x in position]


def _cluster_table(clusters: Sequence[Mapping[str, Any]], value: str = "risk") -> Table | None:
    """Clusters of :func:`~gen_sr.audit.clusters.risk_clusters`; ``value`` names the mapped quantity."""
    if not clusters:
        return None
    tissue = any(c["tissue"] is not None for c in clusters)
    rows = [[str(c["rank"]), *_xyz(c["centroid_mm"]), grouped(c["size_mm3"]), grouped(c["voxels"]),
             f"{c['peak_risk']:.3g}", f"{c['mean_risk']:.3g}", coords(c["peak_mm"])] + ([c["tissue"]] if tissue else [])
            for c in clusters]
    return table(["#", "x [mm]", "y [mm]", "z [mm]", "size [mm³]", "voxels", f"peak {value}", f"mean {value}",
                  "peak at [mm]"] + (["tissue"] if tissue else []), rows, numeric=range(1, 8))


def _peak_table(peaks: Sequence[Mapping[str, Any]]) -> Table | None:
    if not peaks:
        return None
    tissue = any(q["tissue"] is not None for q in peaks)
    rows = [[str(q["rank"]), *_xyz(q["position_mm"]), f"{q['risk']:.3g}", str(q["cluster"])]
            + ([q["tissue"]] if tissue else []) for q in peaks]
    return table(["#", "x [mm]", "y [mm]", "z [mm]", "risk", "cluster"] + (["tissue"] if tissue else []), rows,
                 numeric=range(1, 6))


def _calibration_tables(curve: Mapping[str, Any]) -> tuple[Table, Table]:
    params = table(["parameter", "value"], [[str(k), number(x)] for k, x in curve.items()
                                            if k not in ("nominal", "observed")], numeric=range(1, 2))
    pairs = table(["nominal coverage", "observed coverage"],
                  [[number(a), number(b)] for a, b in zip(curve["nominal"], curve["observed"], strict=False)],
                  numeric=range(2))
    return params, pairs


def _thin_structure_table(section: Mapping[str, Any] | None) -> Table | None:
    if section is None or not section["rows"]:
        return None
    return table(["axis (RAS+)", "layer thickness (mm)", "kept on a slice centre", "kept between slices"],
                 [[f"{r['axis']} ({r['direction']})", f"{r['size_mm']:g}", f"{r['best_percent']:.0f} %",
                   f"{r['worst_percent']:.0f} %"] for r in section["rows"]], numeric=range(1, 4))


# ----------------------------------------------------------------------------------------------------- page
def render_page(payload: Mapping[str, Any], figures: Sequence[FigureRecord]) -> str:
    """``report.html`` for a report ``payload`` (what ``report.json`` holds) and its ``figures``."""
    from gen_sr import __version__

    geometry = payload["geometry"]
    card = card_rows(payload["card"])
    if payload["verdict"].get("intensity_range") is not None:
        card.append(("Robust intensity range of the input", f"{payload['verdict']['intensity_range']:.4g} "
                                                           f"({INTENSITY_UNIT}; risk is a fraction of it)"))
    card.append(("Input obliquity", f"{geometry['max_obliquity_deg']:.1f}° "
                                    f"({'oblique' if geometry['oblique'] else 'not oblique'})"))
    curve = payload.get("calibration_curve")
    notes = payload.get("baseline_notes") or {}
    by_id = {f["id"]: f for f in figures}
    context = {
        "p": payload, "v": payload["verdict"], "disclaimer": DISCLAIMER, "version": __version__,
        "card": table(["field", "value"], card, cls="kv"),
        "views": [f for f in figures if f["id"].startswith("view_")],
        "centre": coords(payload["views"]["centre_mm"]), "threshold": f"{payload['risk_threshold']:g}",
        "peak_max_at": coords(payload["peak_rule"]["max_at_mm"]),
        "clusters": _cluster_table(payload["clusters"]), "peaks": _peak_table(payload["peaks"]),
        "profile": by_id["profile"], "calibration": by_id.get("calibration"),
        "metrics": _metrics_table(payload["metrics"], notes) if payload["metrics"] else None,
        "baseline_notes": [f"* {note}." for note in notes.values()],
        "metric_notes": [note for name, note in _METRIC_NOTES.items()
                         if any(name in map(str.lower, row) for row in (payload["metrics"] or {}).values())],
        "calibration_tables": _calibration_tables(curve) if curve is not None and "calibration" in by_id else None,
        "thin_structures": _thin_structure_table(payload["thin_structures"]),
        "disagreement_clusters": _cluster_table((payload["data_disagreement"] or {}).get("clusters", []),
                                                "disagreement"),
    }
    return _ENV.get_template("report.html.j2").render(context)
