"""Adapt a model to one scan, calibrate it there, and keep the fine-tuning only where the scan says it helped.

:func:`fit_to_scan` runs :func:`gen_sr.training.adaptation.adapt` (the fine-tuning on the scan's in-plane slices) and
:func:`gen_sr.eval.scan_calibration.calibrate_on_scan` (the conformal interval on the slices it held out). With
``keep_better``, the pretrained UNet is calibrated on the same held-out slices too, and the one whose mean has the
smaller error there is kept: the held-out slices are truth the fine-tuning never saw, so the scan itself decides
whether fine-tuning helped.

The held-out problems must pose the real one: the scan is adapted on and calibrated as the runs will measure it
(:func:`measure_scan`: resampled in-plane where they resample it, its noise std resolved as theirs is), and with its
noise std known (``scan_noise_std``: by default read from its background air, as a run at the defaults reads it), their
simulated thick slices are topped up to it and projected noise-aware, as the real thick slices are
(:func:`gen_sr.eval.scan_calibration.scan_cases`). Without it, at SNR 30 they held half the real noise, and on a
validation subject they ranked first a fine-tuned UNet that lost 0.91 dB through-plane (``benchmarks/ADAPTATION.md``).
The truth of the held-out slices is itself noisy, and the problems' thick slices are made from it, so a model that
keeps the measured noise is rewarded for it there. ``reference="recorrupted"`` poses the comparison's problems with
noise independent of their references' (:func:`gen_sr.eval.scan_calibration.recorrupted_case`), at one more pass.

    fit = fit_to_scan(pipe, "lr.nii.gz", work_dir="runs/adapt_lr")  # for runs at the defaults: noise_std="auto"
    save_model(fit.pipe, "models/heads2d_lr")
    out = fit.pipe("lr.nii.gz")  # at the defaults too: its per-scan calibration holds
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from gen_sr.distributed import process_state
from gen_sr.errors import InputError
from gen_sr.eval.calibration import CalibrationResult
from gen_sr.eval.scan_calibration import REFERENCE_NOISE, ReferenceNoise, calibrate_on_scan, check_noise_to_recorrupt
from gen_sr.io import atomic_dir
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.pipelines.pipeline_latent_sr import LRInput, resolve_noise_std
from gen_sr.run_record import CoarsenedInput
from gen_sr.training.adaptation import adapt, with_unet
from gen_sr.training.adaptation_defaults import KEEP_BETTER, RECORRUPT_PAIRS, REFERENCE, HeldOutReference
from gen_sr.volume import Volume

__all__ = ["KEEP_BETTER", "RECORRUPT_PAIRS", "REFERENCE", "HeldOutReference", "MeasuredScan", "ScanFit",
           "fit_to_scan", "measure_scan", "pretrained_on_scan", "save_model"]


@dataclass
class ScanFit:
    """What :func:`fit_to_scan` did.

    Attributes:
        pipe: the adapted, calibrated pipeline (with the pretrained UNet where ``keep_better`` kept it).
        calibration: its per-scan calibration result (``None`` when not calibrated).
        timings: the wall time of each phase in seconds (``adapt_s``, ``calibrate_s``, and with ``keep_better``
            ``compare_s``: the passes the comparison adds: the pretrained UNet's calibration, or with recorrupted
            references both candidates' passes on them).
        rejected: with ``keep_better``, the pipeline that was not kept (for comparisons; calibrated unless the
            comparison was on recorrupted problems), else ``None``.
    """

    pipe: LatentDiffusionSRPipeline
    calibration: CalibrationResult | None
    timings: dict[str, float]
    rejected: LatentDiffusionSRPipeline | None = None


@dataclass(frozen=True)
class MeasuredScan:
    """A scan as the runs on it with one output grid and noise setting measure it (:func:`measure_scan`).

    Attributes:
        given: the scan as given, in its own orientation.
        scan: as the runs measure it, in the same orientation: ``given`` itself, or resampled in-plane where their
            output grid is coarser there (:meth:`~gen_sr.pipelines.LatentDiffusionSRPipeline.measured_scan`).
        noise_gain: the factor by which that resampling scaled its noise std (1 where it was not resampled).
        noise_std: its noise std on ``scan``'s grid, in its units, as those runs resolve it
            (:func:`~gen_sr.pipelines.pipeline_latent_sr.resolve_noise_std`): the one given, or read from the air
            of ``given`` times ``noise_gain``; ``None`` where not known (asked to read it from air the scan has none
            of).
        calibration_region: the calibration region given, on ``scan``'s grid (``None`` where none was given).
    """

    given: Volume
    scan: Volume
    noise_gain: float
    noise_std: float | None
    calibration_region: LRInput | None = None

    @property
    def coarsened(self) -> CoarsenedInput | None:
        """How the scan was resampled (RAS+), as a run's record says it; ``None`` where it was not."""
        if self.scan is self.given:
            return None
        return CoarsenedInput(self.given.canonical().spacing, self.scan.canonical().spacing, self.noise_gain)


def measure_scan(pipe: LatentDiffusionSRPipeline, lr: LRInput, *, target_spacing: Sequence[float] | None = None,
                 noise_std: float | Literal["auto"] | None = "auto", calibration_region: LRInput | None = None,
                 volume_index: int | None = None) -> MeasuredScan:
    """The scan ``lr`` as runs of ``pipe`` on it with ``target_spacing`` and ``noise_std`` (``__call__``'s
    arguments, with its defaults; ``None``: not known) measure it: resampled in-plane where they resample it, with the
    noise std they resolve (read on the scan as given, not on its resampling) and ``calibration_region`` (a mask on
    the scan's own grid) on the grid they measure: what an adaptation to those runs learns from and is calibrated
    on (:func:`fit_to_scan`; ``gen-sr fit`` and ``--adapt``)."""
    given = pipe.as_volume(lr, volume_index=volume_index)
    scan, gain, region = pipe.measured_scan(given, target_spacing, calibration_region)
    return MeasuredScan(given, scan, gain, resolve_noise_std(given.canonical(), noise_std, gain), region)


def pretrained_on_scan(pipe: LatentDiffusionSRPipeline,
                       adapted: LatentDiffusionSRPipeline) -> LatentDiffusionSRPipeline:
    """``pipe``'s UNet (a copy) with ``adapted``'s autoencoder, scheduler and model card (whose ``adapted`` record
    names the scan's held-out slices), uncalibrated: the pretrained model as a candidate on the same scan."""
    return with_unet(adapted, copy.deepcopy(pipe.unet).eval().requires_grad_(False), adapted.model_card)


def fit_to_scan(pipe: LatentDiffusionSRPipeline, lr: LRInput, *, calibrate: bool = True,
                keep_better: bool = KEEP_BETTER, alpha: float = 0.1, method: str = "crc", blocks: int = 4,
                progress: bool = True, scan_noise_std: float | Literal["auto"] | None = "auto",
                target_spacing: Sequence[float] | None = None, reference: HeldOutReference = REFERENCE,
                sampling: dict[str, Any] | None = None, volume_index: int | None = None,
                calibration_region: LRInput | None = None, reference_noise: ReferenceNoise = REFERENCE_NOISE,
                **adapt_kwargs: Any) -> ScanFit:
    """Adapt ``pipe`` to the scan ``lr`` (:func:`~gen_sr.training.adaptation.adapt`, with ``adapt_kwargs``:
    ``work_dir``, ``config``, ``slice_profile``, ...) and calibrate it on the scan's held-out in-plane slices
    (:func:`gen_sr.eval.scan_calibration.calibrate_on_scan`, with ``alpha``, ``method``, ``blocks`` and the pipeline
    settings ``sampling``: ``num_samples``, ``generator``, ...); ``calibrate=False`` skips the calibration.

    Both are made for the runs of the result on ``lr`` (the scan as they are given it) with ``target_spacing`` and
    ``noise_std=scan_noise_std`` (the defaults are a run's), on the scan as those runs measure it
    (:func:`measure_scan`): resampled in-plane where they resample it (a scan finer in-plane than the model was
    trained for, at the default grid), with the noise std they resolve. ``scan_noise_std``: the scan's noise std per
    voxel in its units, as the pipeline is given it (``noise_std``) for the real run; ``"auto"`` (the default, as
    the run's): read from the scan's background air, or where it has none, not known (``None``), as the run resolves
    it (:func:`~gen_sr.pipelines.pipeline_latent_sr.resolve_noise_std`). Known, the calibration's problems are brought
    up to it (:func:`gen_sr.eval.scan_calibration.scan_cases`), and unless ``adapt_kwargs`` holds a ``noise_std`` of
    its own, the fine-tuning pairs are recorrupted with it (:data:`RECORRUPT_PAIRS`; :func:`gen_sr.data.recorrupt`);
    0: noise-free problems and plain pairs. Not known, the scan is calibrated for runs whose noise std is not known
    (``calibrate_on_scan(noise_std=None)``: blind projections, the interval counting the noise read in-plane) and the
    pairs are not recorrupted. Either way the per-scan calibration holds for those runs.

    ``keep_better``: also calibrate the pretrained UNet on the held-out slices, drawing the same noise (the
    generators in ``sampling`` are reset to their state before the first calibration), and keep whichever of the two
    has the smaller RMSE there (ties keep the pretrained one); the card's ``adapted`` record says which (``kept``) and
    why (``heldout_rmse``). It costs one more calibration pass; without the calibration (``calibrate=False``) there is
    nothing to compare on, and the fine-tuned UNet is returned. Save the result with :func:`save_model`.

    ``reference``: what the two are compared against where the scan is noisy (its noise std known and > 0).
    ``"noisy"``: the calibration's own problems. With ``reference_noise="keep"`` (the default) their reference (the
    held-out slice) shares its noise with the problem, so a model that keeps the measured noise is rewarded for it;
    with ``"extrapolate"`` they are recorrupted (:func:`gen_sr.eval.scan_calibration.recorrupted_case`: noise
    independent of their references'), which rank the two as their error against the clean slices would.
    ``"recorrupted"``: compared on recorrupted problems in any case; with ``"keep"`` that costs a third pass, as the
    kept UNet is then calibrated on the calibration's own problems (``rejected`` is not calibrated). Noise-free, all
    are the same; with the noise std not known there is none to recorrupt with: ``"recorrupted"`` (as
    ``reference_noise="extrapolate"``) is then a ``ValueError``, before any adaptation.

    ``calibration_region`` (a mask on the scan's own grid, e.g. its brain) and ``reference_noise``: how the interval
    is fitted (:func:`gen_sr.eval.scan_calibration.calibrate_on_scan`'s ``region`` and ``reference_noise``); the
    comparison's errors count the whole foreground either way. Runs of the result then take the same mask
    (``calibration_region``).
    """
    timings: dict[str, float] = {}
    tic = time.perf_counter()
    measured = measure_scan(pipe, lr, target_spacing=target_spacing, noise_std=scan_noise_std,
                            calibration_region=calibration_region, volume_index=volume_index)
    volume, noise = measured.scan, measured.noise_std  # as the runs resolve it
    check_noise_to_recorrupt(noise, [("reference='recorrupted'", reference == "recorrupted"),
                                     ("reference_noise='extrapolate'", reference_noise == "extrapolate")])
    region = None if calibration_region is None else pipe.calibration_region_mask(volume, measured.calibration_region)
    if noise and RECORRUPT_PAIRS and "noise_std" not in adapt_kwargs:
        adapt_kwargs = {"noise_std": noise, "recorrupt": True, **adapt_kwargs}
    adapted = adapt(pipe, volume, **adapt_kwargs)
    timings["adapt_s"] = time.perf_counter() - tic
    if not calibrate:
        return ScanFit(adapted, None, timings)
    seeds = _generator_states(sampling)  # every candidate draws the same noise

    def on_scan(candidate: LatentDiffusionSRPipeline, phase: str, recorrupt: bool = False) -> CalibrationResult:
        for generator, state in seeds:
            generator.set_state(state)
        tic = time.perf_counter()
        result = _calibrate(candidate, volume, alpha=alpha, method=method, blocks=blocks, progress=progress,
                            sampling=sampling, noise_std=noise, recorrupt=recorrupt,
                            region=None if recorrupt else region, reference_noise=reference_noise)
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - tic
        if not recorrupt:
            candidate.calibration = result.calibration
        return result

    if not keep_better or adapted.model_card.adapted.steps == 0:  # nothing was fine-tuned: nothing to compare
        return ScanFit(adapted, on_scan(adapted, "calibrate_s"), timings)
    pretrained = pretrained_on_scan(pipe, adapted)
    recorrupted_calibration = reference_noise == "extrapolate" and bool(noise)  # its problems recorrupted
    if reference == "recorrupted" and noise and not recorrupted_calibration:  # a third pass
        rmse = (float(on_scan(pretrained, "compare_s", True).rmse),  # type: ignore[arg-type]
                float(on_scan(adapted, "compare_s", True).rmse))  # type: ignore[arg-type]
        results = None
    else:  # the calibrations' own problems rank them
        results = on_scan(pretrained, "compare_s"), on_scan(adapted, "calibrate_s")
        rmse = (float(results[0].rmse), float(results[1].rmse))  # type: ignore[arg-type]
    kept = "pretrained" if rmse[0] <= rmse[1] else "fine-tuned"
    recorrupted = results is None or bool(results[1].calibration.details.get("recorrupted"))
    record = dataclasses.replace(adapted.model_card.adapted, kept=kept, heldout_rmse=rmse, heldout_reference=(
        "recorrupted" if recorrupted else "clean" if noise == 0 else "noisy"))  # not known: read in-plane
    for candidate in (pretrained, adapted):
        candidate.model_card = dataclasses.replace(candidate.model_card, adapted=record)
    winner, loser = (pretrained, adapted) if kept == "pretrained" else (adapted, pretrained)
    if results is None:
        result = on_scan(winner, "calibrate_s")
    else:
        result = results[0] if kept == "pretrained" else results[1]
    return ScanFit(winner, result, timings, rejected=loser)


def _generator_states(sampling: dict[str, Any] | None) -> list[tuple[torch.Generator, torch.Tensor]]:
    """The state of every generator in the pipeline settings ``sampling`` (one or a list), to draw again from."""
    generators = (sampling or {}).get("generator")
    if generators is None:
        return []
    return [(g, g.get_state()) for g in (generators if isinstance(generators, (list, tuple)) else [generators])]


def _calibrate(pipe: LatentDiffusionSRPipeline, volume: Volume, *, progress: bool, sampling: dict[str, Any] | None,
               **rule: Any) -> CalibrationResult:
    """:func:`calibrate_on_scan` under one progress bar over the calibration cases (the pipeline's own bars off)."""
    bars = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        return calibrate_on_scan(pipe, volume, progress=progress and process_state().is_local_main_process,
                                 **rule, **(sampling or {}))
    finally:
        pipe.set_progress_bar_config(**bars)


def save_model(pipe: LatentDiffusionSRPipeline, folder: str | Path, overwrite: bool = False) -> Path:
    """Write a model folder whole or not at all: into a hidden temporary folder beside it, then renamed (main
    process only; an existing folder is replaced only with ``overwrite``)."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise InputError("exists already", folder, "pass --overwrite to replace it, or choose another folder")
    if process_state().is_main_process:
        atomic_dir(folder, pipe.save_pretrained)
    return folder
