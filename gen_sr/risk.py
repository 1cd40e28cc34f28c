"""The hallucination-risk map: the calibrated interval's shape, the calibration record, and the one risk formula.

A model folder may carry a ``calibration.json`` (:class:`Calibration`, fitted by :mod:`gen_sr.eval.calibration`):
one record, or a list of them, one per sampler setting (:class:`Calibrations`), since the samples' spread, and so the
interval's scale, depends on the sampler, its steps and the number of samples.
Its interval around the SR mean is ``mean ± λ̂ u``, where ``u`` is the spread an :class:`IntervalShape` makes of
the sample std (plain, or smoothed, with a noise floor and an edge term). :func:`risk_map` is the only place that
turns a std (and a mean) into risk; the pipeline and the audit both call it:

    risk = λ̂ u / range     (calibrated)          risk = std / range     (uncalibrated)

with ``range`` the input's robust intensity range (its 0.5-99.5 percentile span), so risk is unitless: the truth
may differ from the shown intensity by more than ``risk · range`` in at most a fraction ``α`` of voxels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np
import torch
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d

from gen_sr.config import record_from_dict
from gen_sr.errors import InputError
from gen_sr.io import write_json
from gen_sr.physics import NOISE_GAIN_FLOOR
from gen_sr.schedulers import sampler_text

if TYPE_CHECKING:
    from gen_sr.physics import AcquisitionOperator

__all__ = [
    "CALIBRATION_FILE",
    "GRID_TOLERANCE",
    "MISMATCH_WORDING",
    "NOISE_UNKNOWN_SHAPE",
    "Calibration",
    "CalibrationMismatchWarning",
    "Calibrations",
    "DataDisagreement",
    "IntervalShape",
    "Mismatch",
    "MismatchWording",
    "SamplingSettings",
    "grid_text",
    "interval_noise_std",
    "mismatch_text",
    "risk_map",
    "within_grids",
]

CALIBRATION_FILE = "calibration.json"

Array = TypeVar("Array", torch.Tensor, np.ndarray)


@dataclass(frozen=True)
class IntervalShape:
    """Which per-voxel spread ``u`` the calibrated interval ``mean ± λ u`` scales; the default is the sample std.

    ``u = G_s * std + noise_floor · σ_noise + edge_weight · |∇(G_1 * mean)|``: the std, Gaussian-smoothed over
    ``smoothing`` voxels (eight samples estimate a std with about 25 % relative noise per voxel); a floor in units
    of the measurement noise std (noise the projection keeps in every sample, which their spread cannot show); and
    a term for edges, where the autoencoder's representation error concentrates and is the same in every sample.
    All three terms scale with the intensities, so ``λ`` does not depend on units.

    Attributes:
        smoothing: Gaussian sigma in voxels for the std (0: none).
        noise_floor: weight of the measurement noise std.
        edge_weight: weight of the gradient magnitude (per voxel) of the mean, smoothed over one voxel.
    """

    smoothing: float = 0.0
    noise_floor: float = 0.0
    edge_weight: float = 0.0

    def describe(self) -> str:
        """The spread in words, e.g. ``std smoothed over 1 voxel + 0.5 × noise std + 3.2 × |∇ mean|``."""
        s = self.smoothing
        terms = [f"std smoothed over {s:g} voxel{'' if s == 1 else 's'}" if s else "std"]
        terms += [f"{self.noise_floor:g} × noise std"] if self.noise_floor else []
        terms += [f"{self.edge_weight:g} × |∇ mean|"] if self.edge_weight else []
        return " + ".join(terms)

    def spread(self, std: torch.Tensor | np.ndarray, mean: torch.Tensor | np.ndarray,
               noise_std: float = 0.0) -> torch.Tensor | np.ndarray:
        """The spread ``u`` of volumes ``std`` and ``mean``, shaped ``(..., X, Y, Z)`` (the last three axes are
        spatial), returned as the type of ``std``; ``noise_std`` in the same units."""
        as_numpy = isinstance(std, np.ndarray)
        s = torch.from_numpy(np.array(std, dtype=np.float64)) if as_numpy else std
        u = _smooth(s, self.smoothing) if self.smoothing else s.clone()
        if self.noise_floor:
            u = u + self.noise_floor * float(noise_std)
        if self.edge_weight:
            m = torch.from_numpy(np.array(mean, dtype=np.float64)) if as_numpy else mean
            m = _smooth(m.to(u), 1.0)
            u = u + self.edge_weight * torch.stack(torch.gradient(m, dim=(-3, -2, -1))).square().sum(0).sqrt()
        return u.numpy() if as_numpy else u.to(std.dtype)


def _smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of the last three axes (the border voxels repeated outwards, which, unlike reflecting, also
    works on volumes thinner than the kernel, such as a 2 mm slab)."""
    kernel = gaussian_1d(torch.tensor(float(sigma)), normalize=True).to(x)
    flat = x.reshape(-1, 1, *x.shape[-3:])
    return separable_filtering(flat, [kernel] * 3, mode="replicate").reshape(x.shape)


@dataclass(frozen=True)
class SamplingSettings:
    """The sampler settings that shape the spread of the samples, and so the interval a calibration fits: it holds
    for runs with the same settings only.

    Attributes:
        scheduler: the sampler (``pipe.sampler_name``: the scheduler's class name, and its variant if any).
        num_inference_steps: its steps.
        num_samples: samples per run (the std of fewer samples is noisier).
        strength: where the reverse process starts (1: pure noise).
        share_first_call: whether the samples shared the first network call (the pipeline's option; with two
            coarse axes, what the first stage did: the second's samples each have their own condition).
        refit_disagreement: whether the data were fitted where the mean departed from them (the pipeline's
            option; it narrows the spread there).
        noise_known: ``False`` for a run whose noise std was not known (asked to read it from the scan's air, which
            it has none of): it fits its slices as noise-free, and every sample keeps their noise, so its interval
            needs a noise term (:data:`NOISE_UNKNOWN_SHAPE`) with the noise read in-plane.
    """

    scheduler: str
    num_inference_steps: int
    num_samples: int
    strength: float = 1.0
    share_first_call: bool = False
    refit_disagreement: bool = False
    noise_known: bool = True

    def describe(self) -> str:
        """The settings in words, e.g. ``8 samples, DPM-Solver++, 3 steps, trailing spacing, first call shared``."""
        start = "" if self.strength == 1 else f", strength {self.strength:g}"
        shared = ", first call shared" if self.share_first_call else ""
        refit = ", refitted where the data disagree" if self.refit_disagreement else ""
        unknown = "" if self.noise_known else ", noise std not known"
        samples = f"{self.num_samples} sample{'s' if self.num_samples != 1 else ''}"
        return f"{samples}, {sampler_text(self.scheduler, self.num_inference_steps)}{start}{shared}{refit}{unknown}"


NOISE_UNKNOWN_SHAPE = IntervalShape(noise_floor=0.5)
"""The interval of runs whose noise std is not known (:attr:`SamplingSettings.noise_known`): ``std + 0.5 σ̂``, with
``σ̂`` the slices' noise read in-plane (:func:`gen_sr.physics.estimate_noise_std`, an upper estimate: it reads the
finest anatomy too). The weight was chosen on calibration subjects (``benchmarks/NOISE_UNKNOWN.md``): with it one
scale covers such runs at every noise level."""


def interval_noise_std(calibration: Calibration | None, noise_std: float, in_plane: float | None) -> float:
    """The noise std (input units) that a run's interval counts (:meth:`IntervalShape.spread`) under its
    ``calibration``: ``noise_std``, the one it was given or read from air, or under a calibration for runs whose noise
    std was not known (:attr:`Calibration.for_unknown_noise`) ``in_plane``, the one read in-plane from its slices."""
    if calibration is not None and calibration.for_unknown_noise:
        return float(in_plane or 0.0)
    return float(noise_std)


class CalibrationMismatchWarning(UserWarning):
    """A run whose calibration was not made for it (a :data:`Mismatch`). Its risk map keeps the calibration's units
    without its coverage."""


Mismatch = Literal["settings", "grid", "scan", "noise_unknown", "noise_known"]
"""Why a calibration does not hold for a run (``None`` where it holds): it was made with other sampler settings
(``"settings"``), for another output grid (``"grid"``), per scan on another scan (``"scan"``: the scan the model was
adapted on), for runs given a noise std, used by a run whose noise std is not known (``"noise_unknown"``:
:meth:`~gen_sr.pipelines.LatentDiffusionSRPipeline.calibration_for` falls back to such records), or the converse,
for runs whose noise std is not known (a per-scan calibration of a scan without air), used by a run given one
(``"noise_known"``). Each is worded once, in :data:`MISMATCH_WORDING`."""


@dataclass(frozen=True)
class MismatchWording:
    """What a :data:`Mismatch` means and what to do about it, for every text that says so (run records, the terminal,
    the audit's verdict, note and card).

    Attributes:
        label: the verdict's label after "calibrated", e.g. ``"for other settings"``.
        made_for: what the calibration was made for, after "the calibration was".
        advice: what to do instead.
    """

    label: str
    made_for: str
    advice: str


MISMATCH_WORDING: dict[Mismatch, MismatchWording] = {
    "settings": MismatchWording(
        "for other settings",
        "made with other sampler settings (sampler, steps, samples, strength, shared first call or refit)",
        "sample with the settings it was made for (gen-sr info --model lists them), or calibrate with these "
        "(gen-sr calibrate)"),
    "grid": MismatchWording(
        "for another grid",
        "made for other output grids (the scale the std needs grows with the voxel size)",
        "run on a grid it was made for (--target-spacing), or calibrate again with volumes on this grid among the "
        "others (gen-sr calibrate --overwrite, as the record was made: gen-sr info --model shows it)"),
    "scan": MismatchWording(
        "on another scan",
        "made per scan, on the scan the model was adapted on, not on this one (or not as this run resamples it)",
        "adapt the model on this scan (--adapt, or gen-sr fit), or use the model it was adapted from"),
    "noise_unknown": MismatchWording(
        "for a known noise std",
        "made for runs given the noise std, and this run's is not known (no background air to read it from): its "
        "samples keep the slices' noise, which that interval leaves out",
        "give the scan's noise std (--noise-std), or calibrate for runs without one (gen-sr calibrate "
        "--noise-unknown)"),
    "noise_known": MismatchWording(
        "for an unknown noise std",
        "made for runs whose noise std is not known (a scan without background air: exact projections, an interval "
        "that counts the noise read in-plane), and this run was given one",
        "run without --noise-std, as the calibration was made, or to use the noise std, fit again with it (gen-sr "
        "fit --noise-std S) or calibrate for runs given it (gen-sr calibrate)"),
}
"""The one wording of each :data:`Mismatch` (:func:`mismatch_text`)."""


def mismatch_text(mismatch: Mismatch) -> str:
    """The clause that says a run's calibration does not hold, why and what to do, e.g. ``the calibration was made
    for another output grid (...), so its coverage does not hold for this run; run on the grid ...``."""
    wording = MISMATCH_WORDING[mismatch]
    return f"the calibration was {wording.made_for}, so its coverage does not hold for this run; {wording.advice}"


GRID_TOLERANCE = 0.1
"""How far a run's output voxel size ``g`` may lie from the grid ``f`` of a per-grid calibration for it to hold
(``|f / g − 1| ≤ 0.1``: 0.909-1.111 mm for a 1 mm record), or beyond the range of grids a record fitted on several
was fitted on, the same way (:func:`within_grids`)."""


def within_grids(grids: Sequence[float], grid_spacing: float) -> bool:
    """Whether an output grid of ``grid_spacing`` mm lies within :data:`GRID_TOLERANCE` of the range of ``grids``
    (mm): ``min / (1 + tol) ≤ g ≤ max / (1 − tol)``; for one grid ``f``, ``|f / g − 1| ≤ tol``."""
    return min(grids) / (1 + GRID_TOLERANCE) <= grid_spacing <= max(grids) / (1 - GRID_TOLERANCE)


@dataclass
class Calibration:
    """A fitted interval scale; saved as ``calibration.json`` in a model folder.

    Attributes:
        scale: ``λ̂``: intervals are ``mean ± scale · u``, with ``u`` the spread of ``shape`` (the std by default).
        alpha: target miss rate (coverage ``1 − alpha``).
        delta: allowed probability that the guarantee fails (``"rcps"``).
        method: ``"rcps"`` or ``"crc"``.
        bound: the upper confidence bound of ``"rcps"`` (``"hb"``: Hoeffding–Bentkus, or ``"hoeffding"``); ``""`` for
            ``"crc"``, which uses none (records made before this was fixed hold ``"hb"`` there, unused).
        num_volumes: the calibration units ``scale`` was fitted on, :attr:`num_units` (the name is older than the
            units: each calibration volume, cut into ``details["blocks_per_volume"]`` blocks, gives that many units;
            ``details["volumes"]`` names the volumes).
        risk_hat: mean miss rate on the calibration units at ``scale``.
        risk_upper: the rule's bound on the miss rate at ``scale``, from ``n`` = :attr:`num_units` units: for
            ``"rcps"``, the ``1 − δ`` upper confidence bound ``bound``; for ``"crc"``, the conformal miss rate
            ``(n · risk_hat + 1) / (n + 1)``, which the rule keeps at or below ``alpha`` (the expected miss rate's
            bound, without ``δ``). Records made before this was fixed hold the Hoeffding–Bentkus bound under
            ``"crc"`` too (with ``bound`` ``"hb"``).
        details: where the calibration data came from (free-form, recorded as given). Calibrations fitted on units
            (:func:`gen_sr.eval.calibration.fit_volumes`) add ``volumes``, ``blocks_per_volume``, ``units`` and
            ``interval``: ``"auto"`` where the spread was chosen among candidates, else the spread given
            (:meth:`IntervalShape.describe`, e.g. ``"std"``); :attr:`shape` is the spread applied either way (records
            made before this was fixed say ``"std"`` for :data:`NOISE_UNKNOWN_SHAPE`'s too).
        shape: the spread that ``scale`` multiplies (files without one mean the plain std).
        sampling: the sampler settings it was made with (``None`` in files written before it was recorded).
        outside_scale: a per-scan calibration fitted in a region of the scan (e.g. the brain) and, apart, in the rest
            of its foreground: the scale outside the region (``scale`` holds inside). ``None``: one scale everywhere.
            Where a run is not given the region, the larger of the two holds everywhere (:meth:`scale_map`).
        grid_spacing: the output voxel size in mm (the finest spacing of the HR grid) of the units it was fitted on,
            for a record made per grid (``gen-sr calibrate --per-grid``): it holds for runs on that grid
            (:meth:`Calibrations.find`). ``None``: fitted on grids together (:attr:`fitted_grids`).
        scale_per_mm: for a record whose scale grows with the output voxel size (``gen-sr calibrate --per-mm``:
            ``mean ± λ × voxel size × u``, fitted on the volumes of several grids together): ``λ`` per mm. Such a
            record is stored with ``scale`` equal to it and no ``grid_spacing``; a run on a grid of ``g`` mm uses it
            at its grid (:meth:`at_grid`: ``scale = scale_per_mm × g``, ``grid_spacing = g``). ``None``: a scale for
            any grid.
        fitted_grids: the output grids (mm) of the volumes a record not made per grid was fitted on: it holds within
            :data:`GRID_TOLERANCE` of their range (:meth:`mismatch`). Empty in files written before they were
            recorded: such a record is taken to hold on any grid.
    """

    scale: float
    alpha: float
    delta: float
    method: str
    bound: str
    num_volumes: int
    risk_hat: float
    risk_upper: float
    details: dict = field(default_factory=dict)
    shape: IntervalShape = field(default_factory=IntervalShape)
    sampling: SamplingSettings | None = None
    outside_scale: float | None = None
    grid_spacing: float | None = None
    scale_per_mm: float | None = None
    fitted_grids: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        self.fitted_grids = tuple(float(g) for g in self.fitted_grids)  # a list, as read back from JSON
        self.shape = record_from_dict(IntervalShape, self.shape)  # a mapping, as read back from JSON
        if self.sampling is not None:
            self.sampling = record_from_dict(SamplingSettings, self.sampling)
        if self.scale_per_mm is not None and self.outside_scale is not None:
            raise ValueError("a calibration per mm of the voxel size has one scale, not one per region")

    def at_grid(self, grid_spacing: float | None) -> Calibration:
        """This record as a run on an output grid of ``grid_spacing`` mm uses it: for a record per mm of the voxel
        size (:attr:`scale_per_mm`), ``λ`` at that grid; any other record, or an unknown grid (``None``), as it is."""
        if self.scale_per_mm is None or grid_spacing is None:
            return self
        return replace(self, scale=self.scale_per_mm * grid_spacing, grid_spacing=grid_spacing)

    @property
    def num_units(self) -> int:
        """The calibration units ``scale`` was fitted on (stored as :attr:`num_volumes`, its older name)."""
        return self.num_volumes

    @property
    def per_scan(self) -> bool:
        """Whether it was fitted on one scan (:func:`gen_sr.eval.scan_calibration.calibrate_on_scan`: on the held-out
        slices of the scan the model was adapted on), so that it holds for that scan only."""
        return bool(self.details.get("per_scan"))

    @property
    def for_unknown_noise(self) -> bool:
        """Whether it was made for runs whose noise std was not known (:attr:`SamplingSettings.noise_known`): their
        interval counts the noise read in-plane."""
        return self.sampling is not None and not self.sampling.noise_known

    def mismatch(self, settings: SamplingSettings, grid_spacing: float | None = None) -> Mismatch | None:
        """Why this record was not made for runs with these sampler ``settings`` on an output grid of
        ``grid_spacing`` mm, or ``None`` where it was: the same settings (or a record that does not record them) and
        a grid within :data:`GRID_TOLERANCE` of the one it was made for (a record made per grid) or of the range it
        was fitted on (any other: :attr:`fitted_grids`, :func:`within_grids`; any grid where it does not say). A
        record that differs only in being made for a known noise std, used by a run whose noise std is not known, is
        ``"noise_unknown"``, and the converse ``"noise_known"`` (the refit of the data, which only a run with a noise
        std does, follows the noise and is not compared then). A run whose record does not hold has a risk map in
        the calibration's units without its coverage. (Its scan, for a per-scan record, is the pipeline's to check:
        :meth:`~gen_sr.pipelines.LatentDiffusionSRPipeline.calibration_mismatch`.)"""
        if self.sampling is not None and self.sampling != settings:
            def noise_aside(s: SamplingSettings) -> SamplingSettings:  # the settings that do not follow the noise
                return replace(s, noise_known=True, refit_disagreement=False)

            if settings.noise_known == self.sampling.noise_known or noise_aside(self.sampling) != noise_aside(settings):
                return "settings"
            return "noise_known" if settings.noise_known else "noise_unknown"
        per_grid = self.grid_spacing is not None and self.scale_per_mm is None  # not a per-mm one at a run's grid
        grids = (self.grid_spacing,) if per_grid else self.fitted_grids
        if grid_spacing is None or not grids:
            return None
        return None if within_grids(grids, grid_spacing) else "grid"

    def scale_map(self, region: Array | None = None) -> Array | float:
        """``λ̂`` per voxel: ``scale`` inside ``region`` (a boolean mask on the output grid) and ``outside_scale``
        outside it, where the calibration has one; without a region, the larger of the two (a float). A record per mm
        of the voxel size holds at a grid only: ``ValueError`` until :meth:`at_grid` gives it one."""
        if self.scale_per_mm is not None and self.grid_spacing is None:
            raise ValueError(f"the calibration {self.describe()} holds at an output grid only (its scale is per mm of "
                             "the voxel size): take it at the run's grid, calibration.at_grid(voxel_mm), or use "
                             "pipe.calibration_for(settings, grid_spacing=voxel_mm)")
        if self.outside_scale is None:
            return self.scale
        if region is None:
            return max(self.scale, self.outside_scale)
        if isinstance(region, np.ndarray):
            return np.where(region, self.scale, self.outside_scale)
        return torch.where(region.bool(), self.scale, self.outside_scale)

    def halfwidth(self, std: Array, mean: Array, noise_std: float = 0.0, region: Array | None = None) -> Array:
        """Half-width ``λ̂ u`` of the calibrated interval around ``mean`` (see :meth:`IntervalShape.spread`);
        ``region``: see :meth:`scale_map`."""
        return self.scale_map(region) * self.shape.spread(std, mean, noise_std)

    def describe(self) -> str:
        """The interval in words, e.g. ``mean ± 0.4525 × (std smoothed over 1 voxel + 3.2 × |∇ mean|)``, for run
        records, the terminal and reports."""
        spread = f"({self.shape.describe()})"
        if self.scale_per_mm is not None and self.grid_spacing is None:
            return f"mean ± {self.scale_per_mm:.4g} × voxel size (mm) × {spread}"
        if self.scale_per_mm is not None:
            return (f"mean ± {self.scale:.4g} × {spread} ({self.scale_per_mm:.4g} per mm of the finest output "
                    f"spacing ({self.grid_spacing:.3g} mm))")
        if self.outside_scale is not None:
            return (f"mean ± {self.scale:.4g} × {spread} in the calibration region, ± {self.outside_scale:.4g} × "
                    f"{spread} outside it")
        return f"mean ± {self.scale:.4g} × {spread}"

    def save(self, folder: str | Path) -> Path:
        """Write this record as the folder's only calibration (:meth:`Calibrations.save` keeps several)."""
        return Calibrations([self]).save(folder)

    @classmethod
    def load(cls, folder: str | Path) -> Calibration | None:
        """The first calibration of a model folder (the one made at the model's default settings, where
        ``gen-sr calibrate`` made several), or ``None`` when it has none; :meth:`Calibrations.load` reads them all."""
        records = Calibrations.load(folder)
        return records[0] if records else None


def _nearest_grid(records: Sequence[Calibration], grid_spacing: float) -> Calibration | None:
    """The one of ``records`` (each made for one grid) whose grid spacing is nearest ``grid_spacing`` in ratio (the
    first of equals), or ``None`` where there are none."""
    return min(records, key=lambda r: abs(math.log(r.grid_spacing / grid_spacing)), default=None)


class Calibrations:
    """The calibrations of a model, at most one per sampler setting (:class:`SamplingSettings`) and output grid
    (``grid_spacing``), in order: the first is the one made at the model's default settings (``gen-sr calibrate`` puts
    it there), the others are for runs with other settings (e.g. ``--scheduler ddim --steps 25``) or, made per grid,
    for runs on one grid. A record made before settings were recorded (``sampling`` is ``None``) stands for any
    settings.

    ``calibration.json`` holds them: one record as a JSON object (the format of a single calibration), several as a
    list of objects.
    """

    def __init__(self, records: Iterable[Calibration] = ()) -> None:
        self._records = list(records)
        seen = [(r.sampling, r.grid_spacing) for r in self._records]
        if len(set(seen)) != len(seen):
            raise ValueError(f"two calibrations for the same sampler settings and grid: {seen}")
        if any(r.scale_per_mm is not None and r.grid_spacing is not None for r in self._records):
            raise ValueError("a calibration per mm of the voxel size is kept for its range of grids, not at one run's "
                             "grid (keep the record at_grid was called on)")
        per_mm = {r.sampling for r in self._records if r.scale_per_mm is not None}
        if mixed := [r.sampling for r in self._records if r.grid_spacing is not None and r.sampling in per_mm]:
            raise ValueError(f"a calibration per mm of the voxel size and per-grid ones for the same settings "
                             f"({mixed[0]}): a run's scale would jump between them with its grid")

    def __iter__(self) -> Iterator[Calibration]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Calibration:
        return self._records[index]

    def find(self, settings: SamplingSettings, grid_spacing: float | None = None) -> Calibration | None:
        """The record made with exactly these settings (or one that does not record its settings): the one made for
        the run's output grid ``grid_spacing`` (mm; within :data:`GRID_TOLERANCE`, the nearest), else the one fitted
        on grids together (a record per mm of the voxel size at the run's grid: :meth:`Calibration.at_grid`; whether
        it holds there is :meth:`Calibration.mismatch`'s to say); else ``None``."""
        made = [r for r in self._records if r.sampling == settings] or [r for r in self._records if r.sampling is None]
        if grid_spacing is not None:
            near = _nearest_grid([r for r in made if r.grid_spacing is not None
                                  and within_grids((r.grid_spacing,), grid_spacing)], grid_spacing)
            if near is not None:
                return near
        pooled = next((r for r in made if r.grid_spacing is None), None)
        return pooled.at_grid(grid_spacing) if pooled is not None else None

    def nearest(self, settings: SamplingSettings, grid_spacing: float) -> Calibration | None:
        """The record :meth:`find` gives; else, for settings calibrated per grid only, that of the grid nearest
        ``grid_spacing`` (which does not hold there: :meth:`Calibration.mismatch`); else ``None``."""
        if (found := self.find(settings, grid_spacing)) is not None:
            return found
        return _nearest_grid([r for r in self._records if r.sampling == settings and r.grid_spacing is not None],
                             grid_spacing)

    def with_record(self, calibration: Calibration, *, first: bool = False) -> Calibrations:
        """These records with ``calibration`` added: it replaces the one made with the same settings and grid (in its
        place), or goes last (``first``: first, as the default settings' record). A record per mm of the voxel size
        holds on a range of grids, so it also replaces the per-grid records of its settings, and a per-grid record the
        record per mm of its settings (the two are not mixed)."""
        key = (calibration.sampling, calibration.grid_spacing)
        per_mm, per_grid = calibration.scale_per_mm is not None, calibration.grid_spacing is not None
        others = [r for r in self._records if (r.sampling, r.grid_spacing) != key
                  and not (r.sampling == calibration.sampling and ((per_mm and r.grid_spacing is not None)
                                                                   or (per_grid and r.scale_per_mm is not None)))]
        if first:
            return Calibrations([calibration, *others])
        kept = {id(r) for r in others}
        place = next((k for k, r in enumerate(self._records) if id(r) not in kept), None)  # the first one replaced
        index = len(others) if place is None else sum(id(r) in kept for r in self._records[:place])
        return Calibrations([*others[:index], calibration, *others[index:]])

    def save(self, folder: str | Path) -> Path | None:
        """Write ``calibration.json`` into ``folder`` (nothing when there are no records); returns its path."""
        if not self._records:
            return None
        path = Path(folder) / CALIBRATION_FILE
        records = [asdict(r) for r in self._records]
        write_json(path, records[0] if len(records) == 1 else records)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Calibrations:
        """The calibrations of a model folder (none when it has no ``calibration.json``)."""
        path = Path(folder) / CALIBRATION_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
            return cls(Calibration(**d) for d in ([data] if isinstance(data, dict) else data))
        except (ValueError, TypeError) as e:
            raise InputError(f"is not a calibration record or a list of them ({e})", path,
                             "re-run gen-sr calibrate, or remove the file") from None

    def describe(self) -> list[str]:
        """One line per record: the interval, the rule and the settings it was made with."""
        return [f"{r.describe()}, {r.method}, coverage {1 - r.alpha:g} target, {r.num_volumes} units"
                + (f", made with {r.sampling.describe()}" if r.sampling else "")
                + (f", {grid}" if (grid := grid_text(r)) else "")
                for r in self._records]


def grid_text(calibration: Calibration) -> str:
    """Which output grids a record holds for, in words (:attr:`~Calibration.grid_spacing` for a record made per grid;
    else one fitted on grids together, per mm of the voxel size or not, near the :attr:`~Calibration.fitted_grids`
    it was fitted on: :meth:`Calibration.mismatch`); ``""`` for a record that says nothing of grids (written before
    they were recorded, or per scan)."""
    if calibration.grid_spacing is not None and calibration.scale_per_mm is None:
        return f"the record for {calibration.grid_spacing:g} mm grids"
    grids = calibration.fitted_grids
    per_mm = "one scale per mm of the output voxel size, " if calibration.scale_per_mm is not None else ""
    if not (grids or per_mm):
        return ""
    if len(set(grids)) == 1:
        return f"{per_mm}fitted on {grids[0]:g} mm grids"
    where = f"{min(grids):g}-{max(grids):g} mm grids" if grids else "every grid"
    return f"{per_mm}fitted on {where} together"


def risk_map(std: Array, mean: Array, calibration: Calibration | None, noise_std: float = 0.0,
             intensity_range: float = 1.0, region: Array | None = None) -> Array:
    """The hallucination-risk map of one output: the calibrated half-width ``λ̂ u`` (or the std, uncalibrated)
    over ``intensity_range``.

    Args:
        std, mean: the sample std and mean, ``(..., X, Y, Z)``, in the same units (normalised or the input's).
        calibration: the model's calibration, or ``None``.
        noise_std: the measurement noise std, in the units of ``std``.
        intensity_range: the robust intensity range in those units (1 for normalised volumes).
        region: for a calibration fitted per region (``Calibration.outside_scale``), the region's voxels on the same
            grid (a boolean mask broadcastable to ``std``); ``None``: the larger scale everywhere.

    Returns:
        Risk, shaped and typed like ``std``.
    """
    halfwidth = calibration.halfwidth(std, mean, noise_std, region) if calibration is not None else std
    return halfwidth / intensity_range


@dataclass(frozen=True)
class DataDisagreement:
    """Where the output disagrees with the measured slices by more than their noise explains: a second kind of risk,
    which the samples' spread cannot show (a lesion-free prior that takes contrast from a lesion does so in every
    sample alike, yet the slices still carry it).

    On the LR grid, the normalised residual ``r = (A x − y) / σ`` of the output ``x`` is squared and averaged
    locally, with Gaussian weights of FWHM ``size_mm`` along every axis (so the window is a lesion's size in mm,
    whatever the voxel sizes), over the measurement's foreground only (normalised convolution: the background's
    Rician noise is not Gaussian and stays out). The data consistency fixes only the global mean of ``r²`` (the
    discrepancy principle makes it 1), so the local mean is judged against its own distribution: it is divided by
    its median over the foreground. The statistic is brought onto the HR grid by linear interpolation;
    :meth:`flags` marks the foreground voxels where it exceeds ``threshold``.

    The defaults were chosen on validation subjects with inserted lesions at SNR 30
    (``benchmarks/DATA_DISAGREEMENT.md``: the threshold flags 2 % of their lesion-free brains, pooled; the window
    caught the most 6 mm lesions that the model thinned).

    Attributes:
        size_mm: the FWHM of the window, in mm.
        threshold: the flag level, in multiples of the foreground median of the local mean.
        foreground: the measurement's foreground: voxels above this fraction of its 99th percentile.
        refit_level: the level above which the pipeline's ``refit_disagreement`` fits the measurements
            (:func:`gen_sr.pipelines.guidance.fit_where_data_disagree`).
        refit_floor: the refit's cap on the noise gain of ``A⁺`` (:meth:`AcquisitionOperator.pinv`'s ``floor``;
            :data:`gen_sr.physics.NOISE_GAIN_FLOOR`): exact for slices at their thickness, partial in the components
            that overlapping slices measure poorly.
    """

    size_mm: float = 4.0
    threshold: float = 2.4
    foreground: float = 0.1
    refit_level: float = 2.0
    refit_floor: float = NOISE_GAIN_FLOOR

    def __post_init__(self) -> None:
        if not self.size_mm > 0 or not self.threshold > 0:
            raise ValueError(f"size_mm and threshold must be positive, not {self.size_mm} and {self.threshold}")

    def statistic(self, operator: AcquisitionOperator, x: torch.Tensor, y: torch.Tensor,
                  noise_std: float) -> torch.Tensor:
        """The local mean of ``((A x − y)/σ)²`` over its foreground median, on the HR grid, ``(B, C, *hr_shape)``
        (zero outside the measurement's foreground); ``x`` ``(B, C, *hr_shape)``, ``y`` ``(B, C, *lr_shape)``,
        ``noise_std`` ``σ`` in their units (positive: with noise-free data the projection leaves no residual)."""
        return self.on_hr_grid(operator, self.measured_statistic(operator, x, y, noise_std))

    @staticmethod
    def on_hr_grid(operator: AcquisitionOperator, measured: torch.Tensor) -> torch.Tensor:
        """A :meth:`measured_statistic` brought onto the HR grid (linear interpolation between LR voxel centres):
        :meth:`statistic` without computing it again."""
        return operator.interpolate(measured, "linear")

    def measured_statistic(self, operator: AcquisitionOperator, x: torch.Tensor, y: torch.Tensor,
                           noise_std: float) -> torch.Tensor:
        """:meth:`statistic` on the LR grid, ``(B, C, *lr_shape)``: one value per measurement."""
        if not noise_std > 0:
            raise ValueError("the data disagreement needs the measurement noise std (noise_std > 0)")
        q = ((operator.forward(x) - y) / noise_std).square()
        per_entry = (*y.shape[:2], *(1,) * (y.ndim - 2))
        values = y.flatten(2)
        if values.shape[-1] > 1_000_000:  # quantile() has a size limit; a seeded random subsample will do
            pick = torch.randperm(values.shape[-1], generator=torch.Generator().manual_seed(0))[:1_000_000]
            values = values[..., pick.to(values.device)]
        inside = (y > self.foreground * torch.quantile(values, 0.99, dim=-1).reshape(per_entry)).to(q)
        sigmas = [self.size_mm / (2 * math.sqrt(2 * math.log(2)) * s) for s in operator.lr_spacing]
        kernels = [gaussian_1d(torch.tensor(s), normalize=True).to(q) for s in sigmas]
        flat = lambda t: t.reshape(-1, 1, *t.shape[2:])  # noqa: E731
        local = separable_filtering(flat(q * inside), kernels, mode="replicate")
        weight = separable_filtering(flat(inside), kernels, mode="replicate")
        local = (local / weight.clamp_min(1e-6)).reshape(q.shape) * inside
        median = torch.stack([v[m > 0].median() if (m > 0).any() else v.new_ones(())
                              for v, m in zip(flat(local), flat(inside), strict=True)])
        return local / median.clamp_min(torch.finfo(q.dtype).tiny).reshape(per_entry)

    def flags(self, statistic: Array) -> Array:
        """The flagged voxels (boolean) of a :meth:`statistic` map."""
        return statistic > self.threshold

    def describe(self, before_refit: bool = False) -> str:
        """The statistic in words; ``before_refit``: of an output before the refit above ``refit_level``."""
        text = (f"local mean of ((A x - y) / noise std)^2 over {self.size_mm:g} mm (FWHM), over its median in the "
                f"measurement's foreground; flagged above {self.threshold:g}")
        return text + (f"; of the samples' mean before the data were refitted where it exceeded {self.refit_level:g}"
                       if before_refit else "")
