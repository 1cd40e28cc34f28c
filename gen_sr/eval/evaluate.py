"""The evaluation harness: simulate an acquisition of HR volumes, reconstruct with our model and every baseline on
the same grid, and measure everything in the same masks.

One :class:`Case` per HR volume holds the truth, the simulated LR and the exact acquisition operator (so SR and
baselines land on the HR grid voxel for voxel). :func:`evaluate` runs the model and the baselines over the cases and
returns one row per (volume, method); :func:`summarize` turns rows into a table of mean ± std across volumes, and
:func:`write_table` writes it as Markdown, CSV and JSON. ``gen-sr evaluate``, ``gen-sr calibrate``, the audit report
and the benchmarks all go through here.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gen_sr.data import slab, slab_bounds
from gen_sr.eval.baselines import BASELINES, baseline
from gen_sr.eval.calibration import balanced_cuts
from gen_sr.eval.metrics import LPIPS_NOTE, image_metrics, region_masks
from gen_sr.eval.uncertainty import coverage, uncertainty_report
from gen_sr.physics import AcquisitionOperator, AxisTransform, SliceAcquisition, simulate_acquisition
from gen_sr.volume import Volume, atomic_write, write_json

__all__ = ["Case", "calibration_slabs", "crop_to_foreground", "evaluate", "has_calibration_slab", "heldout_case",
           "heldout_slab", "markdown_table", "model_slab", "simulate_case", "summarize", "super_resolve",
           "training_slabs", "write_table", "write_table_files"]


@dataclass
class Case:
    """One HR volume and its simulated acquisition, all in RAS+ orientation.

    Attributes:
        name: a label for tables.
        hr: the truth.
        lr: the simulated acquisition, with its exact LR geometry.
        operator: the acquisition on the HR grid (``A``, with ``A(hr) ≈ lr`` up to noise).
        noise_std: the noise std added, in intensity units (0 for noise-free).
    """

    name: str
    hr: Volume
    lr: Volume
    operator: AcquisitionOperator
    noise_std: float

    def lr_tensor(self) -> torch.Tensor:
        """The measurement ``(1, 1, *lr_shape)`` in float64."""
        return torch.from_numpy(self.lr.data.astype(np.float64))[None, None]


def simulate_case(hr: Volume, name: str, *, axis: int = 2, thickness: float = 4.0, spacing: float | None = None,
                  profile: str = "gaussian", snr: float | None = None, seed: int = 0,
                  transforms: Sequence[AxisTransform] | None = None) -> Case:
    """Degrade an HR volume with through-plane slices along RAS+ ``axis`` (2: inferior-superior).

    Args:
        hr: any orientation; it is brought to RAS+ first.
        name: the case's label.
        thickness, spacing, profile: the slices (spacing defaults to the thickness).
        snr: Rician noise at this SNR, or ``None`` for noise-free.
        seed: noise seed.
        transforms: any acquisition instead of the slices (axes are RAS+ axes), e.g. the ``transforms`` of an
            operator JSON that ``gen-sr degrade --save-operator`` wrote.
    """
    canon = hr.canonical()
    transforms = list(transforms) if transforms is not None else [SliceAcquisition(axis, thickness, spacing, profile)]
    lr, operator, sigma = simulate_acquisition(canon, transforms, snr=snr, seed=seed)
    return Case(name, canon, lr, operator, sigma)


def heldout_case(pipe: Any, hr: Volume, name: str = "held-out slab", *, margin: int = 4, **simulate: Any) -> Case:
    """The slab of ``hr`` that the model folder records as never seen in training, cropped to the foreground's
    bounding box (plus ``margin`` voxels), degraded along the model's axis (``simulate``: see
    :func:`simulate_case`)."""
    return simulate_case(heldout_slab(pipe, hr, margin=margin), name, axis=pipe.sr_axis, **simulate)


def heldout_slab(pipe: Any, hr: Volume, *, margin: int = 4) -> Volume:
    """The slab of ``hr`` that the model folder records as never seen in training, in RAS+, cropped to the
    foreground's bounding box plus ``margin`` voxels."""
    return crop_to_foreground(model_slab(pipe, hr, "val"), margin)


def calibration_slabs(pipe: Any, hr: Volume, *, pieces: int = 1, margin: int = 4) -> list[tuple[str, Volume]]:
    """The calibration slab that the model folder records (training never saw it; ``data.calibration_fraction``),
    cropped to the foreground, and cut along RAS+ axis 0 (across sagittal slices, which stay whole) into ``pieces``
    parts of equal brain volume, each cropped to its foreground plus ``margin`` voxels. Several pieces let
    ``gen-sr calibrate --interval auto`` check how a calibration transfers between regions (lateral and medial).

    Returns:
        ``(name, volume)`` pairs in RAS+, named by their voxel ranges (``"y139-185 x0-71"``).
    """
    if not has_calibration_slab(pipe):
        raise ValueError("the model folder records no calibration slab (train with data.calibration_fraction > 0)")
    canon, axis = hr.canonical(), _holdout(pipe)["axis"]
    start, stop = _bounds(pipe, canon, "calibration")
    name = f"{'xyz'[axis]}{start[axis]}-{stop[axis] - 1}"
    whole = canon.crop(start, stop)
    start, stop = _foreground_box(whole, margin)
    x = [start[0], *(start[0] + balanced_cuts(region_masks(whole.crop(start, stop).data)["brain"], pieces)), stop[0]]
    out = []
    for a, b in itertools.pairwise(x):
        piece = whole.crop([a, *start[1:]], [b, *stop[1:]])
        out.append((name, piece) if pieces == 1 else (f"{name} x{a}-{b - 1}", crop_to_foreground(piece, margin)))
    return out


def has_calibration_slab(pipe: Any) -> bool:
    """Whether the model folder records a calibration slab that training never saw (``data.calibration_fraction``)."""
    return bool((pipe.config.acquisition.get("holdout") or {}).get("calibration_fraction"))


def training_slabs(pipe: Any, hr: Volume, *, margin: int = 4) -> list[tuple[str, Volume]]:
    """The training region of ``hr`` (all the model folder records as seen in training) cut into slabs as thick as
    the held-out slab, from its far end backwards, each cropped to the foreground like :func:`heldout_case`; a last
    slab thinner than half that is dropped. Errors there are in-sample: for studying how a calibration transfers
    between regions, not for calibrating (:func:`calibration_slabs`).

    Returns:
        ``(name, volume)`` pairs in RAS+, named by their voxel range along the held-out axis (``"y139-185"``).
    """
    canon, axis = hr.canonical(), _holdout(pipe)["axis"]
    width = canon.shape[axis] - _bounds(pipe, canon, "val")[0][axis]
    slabs, hi = [], _bounds(pipe, canon, "train")[1][axis]
    while hi - width // 2 > 0:
        lo_box, hi_box = [0, 0, 0], list(canon.shape)
        lo_box[axis], hi_box[axis] = max(hi - width, 0), hi
        name = f"{'xyz'[axis]}{lo_box[axis]}-{hi - 1}"
        slabs.append((name, crop_to_foreground(canon.crop(lo_box, hi_box), margin)))
        hi -= width
    return slabs


def model_slab(pipe: Any, hr: Volume, split: str) -> Volume:
    """The ``"train"``, ``"calibration"`` or ``"val"`` (held-out) slab of ``hr`` as the model folder records them
    (:func:`gen_sr.data.slab`), in RAS+."""
    holdout = _holdout(pipe)
    return slab(hr, split, holdout["axis"], holdout["fraction"], holdout.get("calibration_fraction", 0))


def _bounds(pipe: Any, canon: Volume, split: str) -> tuple[list[int], list[int]]:
    holdout = _holdout(pipe)
    return slab_bounds(canon.shape, holdout["axis"], holdout["fraction"], split, holdout.get("calibration_fraction", 0))


def _holdout(pipe: Any) -> dict:
    """The held-out slab the model folder records (``{"axis", "fraction"}``, and ``"calibration_fraction"`` when
    a calibration slab was reserved)."""
    holdout = pipe.config.acquisition.get("holdout")
    if not holdout:
        raise ValueError("the model folder records no held-out slab")
    return holdout


def crop_to_foreground(volume: Volume, margin: int = 4) -> Volume:
    """The bounding box of the foreground (:func:`~gen_sr.eval.metrics.region_masks`), plus ``margin`` voxels."""
    return volume.crop(*_foreground_box(volume, margin))


def _foreground_box(volume: Volume, margin: int) -> tuple[np.ndarray, np.ndarray]:
    box = np.argwhere(region_masks(volume.data)["brain"])
    return np.maximum(box.min(0) - margin, 0), np.minimum(box.max(0) + 1 + margin, volume.shape)


def super_resolve(pipe: Any, case: Case, **kwargs: Any) -> Any:
    """Run the pipeline on a case with its exact operator and noise level; outputs are on the HR grid."""
    return pipe(case.lr, operator=case.operator, noise_std=case.noise_std, **kwargs)


def evaluate(
    pipe: Any | None,
    cases: Sequence[Case],
    *,
    masks: Callable[[Case], dict[str, np.ndarray]] | None = None,
    baselines: Sequence[str] = tuple(BASELINES),
    regression: Any | None = None,
    method_name: str = "gen_sr",
    progress: bool = True,
    **pipe_kwargs: Any,
) -> list[dict[str, Any]]:
    """Reconstruct every case with the model (unless ``pipe`` is ``None``) and the baselines, and measure.

    Args:
        pipe: a :class:`~gen_sr.pipelines.LatentDiffusionSRPipeline`, or ``None`` for baselines only.
        cases: from :func:`simulate_case`.
        masks: per case, named boolean masks on the HR grid (default: the reference's foreground, "brain").
        baselines: baseline names.
        regression: a regression model's pipeline (``unet.objective=regression``), run once per case with one
            sample and its own default steps, as the method ``"regression (L1)"``.
        method_name: the model's name in the rows.
        progress: a progress bar over the cases.
        pipe_kwargs: passed to the pipeline (``num_samples``, ``num_inference_steps``, ``guidance``, ...).

    Returns:
        Rows ``{"volume", "method", "region", "seconds", "psnr", "ssim", "nrmse", "hfen", ...}``; the model's rows
        also hold the uncertainty figures (Spearman, AUSE, UCE, ENCE, coverage, and ``coverage_calibrated`` of
        ``mean ± λ̂·std`` when the model is calibrated) and the relative residual. PSNR and SSIM use one data range
        per case, the reference's inside the ``"brain"`` region (or the whole volume), for every method and region.
    """
    rows: list[dict[str, Any]] = []
    for case in tqdm(cases, desc="evaluate", unit="volume", disable=not progress):
        regions = masks(case) if masks is not None else region_masks(case.hr.data)
        ref = case.hr.data.astype(np.float64)
        data_range = float(np.ptp(ref[regions["brain"]] if "brain" in regions else ref))
        estimates: dict[str, tuple[np.ndarray, float, dict]] = {}
        models = {method_name: (pipe, pipe_kwargs), "regression (L1)": (regression, {"num_samples": 1})}
        for name, (model, kwargs) in models.items():
            if model is None:
                continue
            tic = time.perf_counter()
            out = super_resolve(model, case, output_type="np", keep_samples=False, **kwargs)
            extra = {"relative_residual": float(max(out.metadata["relative_residual"]))}
            if out.metadata["num_samples"] > 1:
                extra["std"] = out.std
                if (cal := getattr(model, "calibration", None)) is not None:
                    extra["halfwidth"] = cal.halfwidth(out.std, out.mean, case.noise_std)
            estimates[name] = (out.mean, time.perf_counter() - tic, extra)
        for name in baselines:
            tic = time.perf_counter()
            estimates[name] = (baseline(case, name), time.perf_counter() - tic, {})
        for method, (est, seconds, extra) in estimates.items():
            for region, mask in regions.items():
                row = {"volume": case.name, "method": method, "region": region, "seconds": seconds}
                row |= image_metrics(est, ref, mask, data_range)
                if "std" in extra:
                    row |= uncertainty_report(extra["std"], ref - est, mask)
                    if "halfwidth" in extra:  # the calibrated interval mean ± λ̂·u
                        row["coverage_calibrated"] = float(coverage(extra["halfwidth"], ref - est, 1.0, mask))
                if "relative_residual" in extra:
                    row["relative_residual"] = extra["relative_residual"]
                rows.append(row)
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std across volumes of every numeric column, per (method, region), in first-seen order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["region"]), []).append(row)
    table = []
    for (method, region), group in groups.items():
        entry: dict[str, Any] = {"method": method, "region": region, "volumes": len(group)}
        for key in group[0]:
            values = [r[key] for r in group if isinstance(r.get(key), int | float)]
            if key not in ("volume", "method", "region") and values:
                finite = np.asarray(values, dtype=np.float64)
                entry[key] = float(np.mean(finite))
                entry[f"{key}_std"] = float(np.std(finite))
        table.append(entry)
    return table


_COLUMNS = ("psnr", "ssim", "nrmse", "hfen", "spearman", "ause", "coverage_2sigma", "coverage_calibrated",
            "relative_residual", "seconds")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def markdown_table(table: Sequence[dict[str, Any]], columns: Sequence[str] = _COLUMNS) -> str:
    """The summary as a Markdown table: ``mean ± std`` per column (— where a method has no such figure)."""
    cols = [c for c in columns if any(c in t for t in table)]
    lines = ["| method | region | volumes | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 3)]
    for t in table:
        cells = [f"{_fmt(t[c])} ± {_fmt(t[c + '_std'])}" if c in t else "—" for c in cols]
        lines.append(f"| {t['method']} | {t['region']} | {t['volumes']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(output_dir: str | Path, rows: Sequence[dict[str, Any]], stem: str = "evaluation",
                meta: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.csv`` (one line per volume, method and region) and ``<stem>.json`` (rows,
    summary and ``meta``), each atomically."""
    table = summarize(rows)
    return write_table_files(output_dir, stem, markdown_table(table) + f"\n{LPIPS_NOTE}.\n", rows,
                             {"meta": meta or {}, "summary": table, "rows": list(rows), "note": LPIPS_NOTE})


def write_table_files(output_dir: str | Path, stem: str, markdown: str, rows: Sequence[dict[str, Any]],
                      payload: dict[str, Any], columns: Sequence[str] | None = None) -> dict[str, Path]:
    """Write a result three ways, each atomically: ``<stem>.md`` (``markdown``), ``<stem>.csv`` (``rows``, in
    ``columns``, by default every key) and ``<stem>.json`` (``payload``). Returns the paths by extension."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns or dict.fromkeys(k for r in rows for k in r)),
                            lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    paths = {ext: out / f"{stem}.{ext}" for ext in ("md", "csv", "json")}
    for ext, text in (("md", markdown), ("csv", buffer.getvalue())):
        atomic_write(paths[ext], lambda tmp, text=text: tmp.write_text(text))
    write_json(paths["json"], payload)
    return paths
