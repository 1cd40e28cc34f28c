"""The evaluation harness: reconstruct simulated cases with our model and every baseline on the same grid, and
measure everything in the same masks.

:func:`evaluate` runs the model and the baselines over the cases (:mod:`gen_sr.eval.cases`) and returns one row
per (volume, method, region); :mod:`gen_sr.eval.tables` summarises and writes them. ``gen-sr evaluate``, the audit
report and the benchmarks all go through here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gen_sr.eval.baselines import BASELINES, baseline
from gen_sr.eval.cases import Case, SRModel, super_resolve
from gen_sr.eval.metrics import image_metrics, region_masks
from gen_sr.eval.uncertainty import coverage, uncertainty_report
from gen_sr.run_record import run_calibration

__all__ = ["RANGE_REGIONS", "estimate_metrics", "evaluate"]

RANGE_REGIONS = ("brain", "foreground")
"""The regions, in order of preference, whose reference range is every method's PSNR and SSIM data range."""


def evaluate(
    pipe: SRModel | None,
    cases: Sequence[Case],
    *,
    masks: Callable[[Case], dict[str, np.ndarray]] | None = None,
    baselines: Sequence[str] = tuple(BASELINES),
    regression: SRModel | None = None,
    method_name: str = "gen_sr",
    progress: bool = True,
    **pipe_kwargs: Any,
) -> list[dict[str, Any]]:
    """Reconstruct every case with the model (unless ``pipe`` is ``None``) and the baselines, and measure.

    Args:
        pipe: a :class:`~gen_sr.pipelines.LatentDiffusionSRPipeline`, or ``None`` for baselines only.
        cases: from :func:`simulate_case`.
        masks: per case, named boolean masks on the HR grid (default: the reference's foreground, named
            ``"foreground"``; name a brain mask ``"brain"``).
        baselines: baseline names.
        regression: a regression model's pipeline (``unet.objective=regression``), run once per case with one
            sample (seed 0) and its own default steps, as the method ``"regression (L1)"``.
        method_name: the model's name in the rows.
        progress: a progress bar over the cases.
        pipe_kwargs: passed to the pipeline (``num_samples``, ``num_inference_steps``, ``guidance``, ...).

    Returns:
        Rows ``{"volume", "method", "region", "seconds", "psnr", "ssim", "nrmse", "hfen", ...}``; the model's rows
        also hold the uncertainty figures (Spearman, AUSE, UCE, ENCE, coverage, and ``coverage_calibrated`` of
        ``mean ± λ̂·std`` when the model is calibrated) and the relative residual. PSNR and SSIM use one data range
        per case for every method and region: the reference's inside the ``"brain"`` region, else inside the
        ``"foreground"`` one, else in the whole volume (:data:`RANGE_REGIONS`).
    """
    rows: list[dict[str, Any]] = []
    for case in tqdm(cases, desc="evaluate", unit="volume", disable=not progress):
        regions = masks(case) if masks is not None else region_masks(case.hr.data)
        ref = case.hr.data.astype(np.float64)
        inside = next((regions[r] for r in RANGE_REGIONS if r in regions), None)
        data_range = float(np.ptp(ref if inside is None else ref[inside]))
        estimates: dict[str, tuple[np.ndarray, float, dict]] = {}
        seeded = {"num_samples": 1, "generator": torch.Generator().manual_seed(0)}  # its noise input: reproducible
        models = {method_name: (pipe, pipe_kwargs), "regression (L1)": (regression, seeded)}
        for name, (model, kwargs) in models.items():
            if model is None:
                continue
            tic = time.perf_counter()
            out = super_resolve(model, case, output_type="np", keep_samples=False, **kwargs)
            run = out.record
            extra = {"relative_residual": float(run.max_relative_residual)}
            if run.num_samples > 1:
                extra["std"] = out.std
                calibration = run_calibration(model, run)  # the run warned where it has none of its own
                if calibration is not None:
                    extra["halfwidth"] = calibration.halfwidth(out.std, out.mean, case.noise_std)
            estimates[name] = (out.mean, time.perf_counter() - tic, extra)
        for name in baselines:
            tic = time.perf_counter()
            estimates[name] = (baseline(case, name), time.perf_counter() - tic, {})
        for method, (est, seconds, extra) in estimates.items():
            for region, mask in regions.items():
                row = {"volume": case.name, "method": method, "region": region, "seconds": seconds}
                row |= estimate_metrics(est, ref, mask, data_range, std=extra.get("std"),
                                        halfwidth=extra.get("halfwidth"))
                if "relative_residual" in extra:
                    row["relative_residual"] = extra["relative_residual"]
                rows.append(row)
    return rows


def estimate_metrics(estimate: np.ndarray, truth: np.ndarray, mask: np.ndarray, data_range: float, *,
                     std: np.ndarray | None = None, halfwidth: np.ndarray | None = None) -> dict[str, float]:
    """The figures of one estimate against the truth inside ``mask`` (arrays on one grid, ``(X, Y, Z)``): the image
    metrics (:func:`~gen_sr.eval.metrics.image_metrics`, PSNR and SSIM over ``data_range``); with the samples'
    ``std``, the uncertainty figures (:func:`~gen_sr.eval.uncertainty.uncertainty_report`); and with the calibrated
    interval's ``halfwidth`` (``λ̂ u``), its coverage ``coverage_calibrated``. What ``evaluate`` reports per method
    and region, and the audit report against a reference."""
    figures = image_metrics(estimate, truth, mask, data_range)
    if std is not None:
        figures |= uncertainty_report(std, truth - estimate, mask)
        if halfwidth is not None:
            figures["coverage_calibrated"] = float(coverage(halfwidth, truth - estimate, 1.0, mask))
    return figures
