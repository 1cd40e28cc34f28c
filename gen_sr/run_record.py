"""What a super-resolution run will do and what it did, as typed records.

:class:`RunPlan` is what :meth:`~gen_sr.pipelines.LatentDiffusionSRPipeline.plan` finds before any sampling (and what
the call itself prepares from): the acquisition, the output grid, the noise std, the calibration its risk map uses.
:class:`RunRecord` is what a call did: ``SRPipelineOutput.record``, written as JSON beside the outputs
(``SRPipelineOutput.metadata`` is its :meth:`RunRecord.to_dict`) and read back by ``audit --reuse``, cohorts,
benchmarks and evaluations through :meth:`RunRecord.from_dict`, the one place where a record written by an older
version gets its defaults. Its ``risk`` is a :class:`RiskRecord` (:func:`describe_risk`); a cohort adds its own keys
beside a scan's run record, read through :class:`CohortRecord`. :class:`TimeEstimate` is what
:meth:`~gen_sr.pipelines.LatentDiffusionSRPipeline.time_estimate` measures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

from gen_sr.config import known_fields, record_from_dict
from gen_sr.physics import AcquisitionOperator
from gen_sr.risk import (
    Calibration,
    IntervalShape,
    Mismatch,
    SamplingSettings,
    interval_noise_std,
    mismatch_text,
)
from gen_sr.volume import IntensityNormalization, Volume

__all__ = ["CoarsenedInput", "CohortRecord", "RiskRecord", "RunPlan", "RunRecord", "TimeEstimate", "describe_risk",
           "run_calibration"]


@dataclass(frozen=True)
class CoarsenedInput:
    """How a run resampled its input in-plane first (:meth:`~gen_sr.pipelines.LatentDiffusionSRPipeline.coarsened`).

    Attributes:
        from_spacing: the input's spacing in mm, RAS+.
        to_spacing: the spacing it was resampled to (the run's LR grid), RAS+.
        noise_std_factor: the factor by which the resampling scaled the input's noise std.
    """

    from_spacing: tuple[float, ...]
    to_spacing: tuple[float, ...]
    noise_std_factor: float

    def to_dict(self) -> dict[str, Any]:
        return {"from_spacing": list(self.from_spacing), "to_spacing": list(self.to_spacing),
                "noise_std_factor": self.noise_std_factor}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CoarsenedInput:
        return cls(tuple(map(float, d["from_spacing"])), tuple(map(float, d["to_spacing"])),
                   float(d["noise_std_factor"]))


@dataclass(frozen=True, kw_only=True)
class RiskRecord:
    """What a run's risk map is (:func:`describe_risk`): a run record's ``risk`` and the audit card's. Its JSON
    (:meth:`to_dict`) holds ``calibrated``, ``definition`` and ``calibration_region`` for a run without a calibration,
    and every field, in this order, for a calibrated one. Each default is what a record written before that field
    existed means (:meth:`from_dict`); the calibration's fields are ``None`` for a run without one.

    Attributes:
        calibrated: whether the map is a calibrated interval's half-width (else the samples' std), over the input's
            robust intensity range.
        holds: whether the calibration was made for the run (its sampler settings, grid and scan); ``None``: not
            recorded.
        mismatch: where it was not, why (:data:`~gen_sr.risk.Mismatch`); ``None`` where it was, or not recorded.
        per_scan: calibrated on the held-out in-plane slices of the scan the model was adapted on.
        scale, outside_scale, alpha, delta, method, shape, grid_spacing, scale_per_mm: the calibration's, at the
            run's grid (:class:`~gen_sr.risk.Calibration`; ``shape`` ``None``: not recorded, the plain std).
        made_with: the sampler settings the calibration was made with (``None``: not recorded).
        definition: the map in one sentence.
        calibration_region: whether the run was given the region of a calibration fitted per region.
    """

    calibrated: bool
    holds: bool | None = None
    mismatch: Mismatch | None = None
    per_scan: bool = False
    scale: float | None = None
    outside_scale: float | None = None
    alpha: float | None = None
    delta: float | None = None
    method: str | None = None
    shape: IntervalShape | None = None
    made_with: SamplingSettings | None = None
    grid_spacing: float | None = None
    scale_per_mm: float | None = None
    definition: str
    calibration_region: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready values, the keys in field order (only :data:`_UNCALIBRATED_KEYS` for a run
        without a calibration), as :func:`describe_risk` has written them."""
        values = {f.name: _plain(getattr(self, f.name)) for f in fields(self)}
        return values if self.calibrated else {k: values[k] for k in _UNCALIBRATED_KEYS}

    @classmethod
    def from_dict(cls, d: Any) -> RiskRecord:
        """Read a record back (:meth:`to_dict`'s, or another version's: a field it lacks takes its default; keys
        that are not fields, here or in ``shape`` and ``made_with``, are left out: :func:`~gen_sr.config.
        record_from_dict`). ``ValueError`` (only) for a value that is no risk record: not a mapping, without
        ``calibrated`` and ``definition``, or with a ``shape`` or ``made_with`` that is not a mapping."""
        return record_from_dict(cls, d)


_UNCALIBRATED_KEYS = ("calibrated", "definition", "calibration_region")
"""The fields a :class:`RiskRecord` of a run without a calibration writes."""


def describe_risk(calibration: Calibration | None, mismatch: Mismatch | None, *,
                  calibration_region: bool) -> RiskRecord:
    """What a run's risk map means, for its run record and the audit's card (both from here, so that they agree);
    ``mismatch``: why the calibration was not made for the run, ``None`` where it was
    (:meth:`~gen_sr.pipelines.LatentDiffusionSRPipeline.calibration_mismatch`): a calibrated record says both,
    ``holds`` (whether it was) and ``mismatch``; ``calibration_region``: whether the run was given the region of a
    calibration fitted per region."""
    if calibration is None:
        return RiskRecord(calibrated=False, definition="std / robust intensity range (uncalibrated)",
                          calibration_region=calibration_region)
    cal = calibration
    where = "; calibrated on the held-out in-plane slices of the scan the model was adapted on" if cal.per_scan else ""
    if mismatch is not None:
        where += f"; {mismatch_text(mismatch)}"
    return RiskRecord(calibrated=True, holds=mismatch is None, mismatch=mismatch, per_scan=cal.per_scan,
                      scale=cal.scale, outside_scale=cal.outside_scale, alpha=cal.alpha, delta=cal.delta,
                      method=cal.method, shape=cal.shape, made_with=cal.sampling, grid_spacing=cal.grid_spacing,
                      scale_per_mm=cal.scale_per_mm,
                      definition=f"the half-width of the interval {cal.describe()} over the robust intensity range: "
                                 f"the interval misses at most {cal.alpha:g} of voxels ({cal.method}){where}",
                      calibration_region=calibration_region)


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """What one super-resolution run did. Its JSON (:meth:`to_dict`, the ``.json`` written beside the outputs) holds
    these fields in this order, by name; each default is what a record written before that field existed means
    (:meth:`from_dict`). Sequences are tuples here and lists in the JSON.

    Attributes:
        operator: the acquisition on the canonical (RAS+) HR grid (:meth:`AcquisitionOperator.to_dict`; read it with
            :meth:`acquisition`); the only field every record has.
        input_digest: the scan as given, in RAS+ (:meth:`~gen_sr.volume.Volume.digest`), which ``audit --reuse``
            checks the input against; ``None``: not recorded (the input is then checked by its grid only).
        seeds: each sample's generator seed.
        scheduler, num_inference_steps, num_samples: the sampler (``pipe.sampler_name``), its steps and the
            samples; ``None``: not recorded, and then :attr:`sampling` is ``None``.
        eta: DDIM's eta (0 for the multistep solvers, which have none).
        strength: where the reverse process started (1: pure noise).
        denoising_steps: the steps run (fewer than ``num_inference_steps`` below strength 1).
        share_first_call: whether the samples shared their first network call (the pipeline's option as the run
            resolved it, :meth:`~gen_sr.pipelines.LatentDiffusionSRPipeline.sampling_settings`): the key a calibration
            is looked up by. With two coarse axes it says what the first stage did; :attr:`shared_first_call` says
            what each did.
        shared_first_call: per sampling stage (one per super-resolved axis), whether its samples shared the first
            network call: a second stage's samples each have their own condition (the first stage's sample), so
            they share it only where the run draws one sample. Empty: not recorded.
        guidance, guidance_scale, guided_timesteps, guidance_calls: the data consistency during sampling, its
            timesteps and the hook's calls.
        sr_axes: the RAS+ axes super-resolved, the coarser first.
        slice_normals: 2D models: the RAS+ axes slices were taken across (a list per stage with two axes); ``None``
            for 3D models.
        patch_size, skip_background, skipped_tiles: the tiling (``patch_size`` ``None``: the default one).
        processes: the processes the samples were split over.
        noise_std: the noise std the projections used, in input units (0: none, the data taken as noise-free);
            ``None`` where it was not known (asked to be read from air the scan does not have: the projections were
            exact, as for noise-free data, and :attr:`noise_known` is ``False``).
        noise_std_estimated: whether it was asked to be read from the scan's air (``noise_std="auto"``), whether or
            not the scan had air to read it from.
        noise_known: ``False`` where it was asked to be read from air the scan does not have
            (:attr:`SamplingSettings.noise_known`; :attr:`noise_std` is then ``None``).
        noise_std_in_plane: for such a run, the noise std read in-plane (:func:`~gen_sr.physics.estimate_noise_std`),
            which its interval counts where its calibration was made for such runs; else ``None``.
        coarsened_input: how the input was resampled in-plane first, or ``None``.
        refit_disagreement: whether the data were fitted where the mean departed from them.
        slice_profile_estimated: ``slice_profile="auto"``.
        slice_profile_from, slice_thickness_from: where the slices' profile and thickness came from
            (:meth:`~gen_sr.pipelines.LatentDiffusionSRPipeline.resolved_slices`).
        relative_residual: ``‖A x − y‖/‖y‖`` of each sample.
        capped_fraction: the share of the slices' components fitted only up to the inverse's gain cap; ``None``:
            not recorded (:meth:`AcquisitionOperator.capped_fraction` of :attr:`operator` says it).
        normalization: the intensity normalisation (:meth:`~gen_sr.volume.IntensityNormalization.to_dict`).
        risk: what the risk map is (:func:`describe_risk`); ``None``: not recorded.
        data_disagreement: what the data-disagreement map is, or ``None`` for a run without a noise std.
        outside_training: where the input lies outside the trained regime, one sentence each; ``None``: not
            recorded (checked again by a reader that needs it).
        timings: seconds per phase.
        adaptation: the adaptation that made the model, where a command adapted it first; ``None`` (and absent from
            the JSON) otherwise.
        output_digests: each map's digest as written (:func:`~gen_sr.volume.save_maps`), which ``audit --reuse``
            checks the maps given to it against; ``None`` (and absent from the JSON) until a command writes them.
    """

    input_digest: str | None = None
    seeds: tuple[int, ...] = ()
    scheduler: str | None = None
    num_inference_steps: int | None = None
    eta: float = 0.0
    strength: float = 1.0
    denoising_steps: int | None = None
    num_samples: int | None = None
    share_first_call: bool = False
    shared_first_call: tuple[bool, ...] = ()
    guidance: str | None = None
    guidance_scale: float = 1.0
    guided_timesteps: tuple[int, ...] = ()
    guidance_calls: int = 0
    sr_axes: tuple[int, ...] = ()
    slice_normals: list[int] | list[list[int] | None] | None = None
    patch_size: tuple[int, ...] | None = None
    skip_background: float | None = None
    skipped_tiles: int = 0
    processes: int = 1
    noise_std: float | None = 0.0
    noise_std_estimated: bool = False
    noise_known: bool = True
    noise_std_in_plane: float | None = None
    coarsened_input: CoarsenedInput | None = None
    refit_disagreement: bool = False
    slice_profile_estimated: bool = False
    slice_profile_from: str = "default"
    slice_thickness_from: str = "default"
    operator: dict[str, Any]
    relative_residual: tuple[float, ...] = ()
    capped_fraction: float | None = None
    normalization: dict[str, float] | None = None
    risk: RiskRecord | None = None
    data_disagreement: str | None = None
    outside_training: tuple[str, ...] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    adaptation: dict[str, Any] | None = None
    output_digests: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready values, the keys in field order (``adaptation`` and ``output_digests`` only where
        set), as written beside the outputs."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)
                if not (f.name in _ADDED_BY_COMMANDS and getattr(self, f.name) is None)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunRecord:
        """Read a record back (:meth:`to_dict`'s, or an older version's: a field it lacks takes its default). A
        ``noise_std`` is ``None`` where ``noise_known`` is false (older records wrote 0 there), else a number (a
        ``null`` one, as records from before ``noise_known`` wrote for noise-free data, is 0). Keys that are not
        fields (what a cohort adds to its scans' records) are left out. ``ValueError`` for a mapping without an
        ``operator`` (not a run record)."""
        if not isinstance(d.get("operator"), Mapping):
            raise ValueError("no operator: not a run record")
        values = {k: _READ.get(k, _same)(v) for k, v in known_fields(cls, d).items()}
        if values.get("noise_known", True) is False:
            values["noise_std"] = None
        return cls(**values)

    @property
    def sampling(self) -> SamplingSettings | None:
        """The sampler settings a calibration is looked up by (:meth:`~gen_sr.risk.Calibrations.find`); ``None`` for
        a record without its sampler, steps or samples."""
        if self.scheduler is None or self.num_inference_steps is None or self.num_samples is None:
            return None
        return SamplingSettings(str(self.scheduler), int(self.num_inference_steps), int(self.num_samples),
                                float(self.strength), bool(self.share_first_call), bool(self.refit_disagreement),
                                bool(self.noise_known))

    @property
    def grid_spacing(self) -> float | None:
        """The output voxel size in mm (the finest spacing of the HR grid): the grid a per-grid calibration is matched
        against (:meth:`~gen_sr.risk.Calibrations.find`); ``None`` where the operator does not record it."""
        spacing = self.operator.get("hr_spacing")
        return float(min(spacing)) if spacing else None

    @property
    def max_relative_residual(self) -> float | None:
        """The largest relative residual of the samples (``None``: none recorded)."""
        return max(self.relative_residual) if self.relative_residual else None

    def acquisition(self) -> AcquisitionOperator:
        """The run's acquisition operator."""
        return AcquisitionOperator.from_dict(self.operator)


_ADDED_BY_COMMANDS = ("adaptation", "output_digests")
"""Fields that a command sets after the run (:class:`RunRecord`): absent from the JSON where not set."""


def _same(value: Any) -> Any:
    return value


def _tuple(value: Any) -> tuple | None:
    return None if value is None else tuple(value)


def _risk_record(value: Any) -> RiskRecord | None:
    """A run record's ``risk`` as read: ``None`` for a value that is no risk record (as for none at all)."""
    try:
        return RiskRecord.from_dict(value)
    except ValueError:
        return None


_READ = {
    "seeds": _tuple, "shared_first_call": _tuple, "guided_timesteps": _tuple, "sr_axes": _tuple, "patch_size": _tuple,
    "relative_residual": _tuple, "outside_training": _tuple,
    "noise_std": lambda v: float(v or 0.0),
    "coarsened_input": lambda v: CoarsenedInput.from_dict(v) if v else None,
    "risk": _risk_record,
    "timings": lambda v: dict(v or {}),
}
"""How :meth:`RunRecord.from_dict` reads a JSON value into a field, where it is not taken as it is."""


def _plain(value: Any) -> Any:
    """A field's JSON form: tuples as lists, a record with a ``to_dict`` (:class:`CoarsenedInput`,
    :class:`RiskRecord`) as that, another dataclass as its ``asdict``."""
    if isinstance(value, CoarsenedInput | RiskRecord):
        return value.to_dict()
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class RunPlan:
    """What a call on one input with given arguments will do, found without any sampling
    (:meth:`~gen_sr.pipelines.LatentDiffusionSRPipeline.plan`; the call prepares from the same). Volumes and the
    operator are in RAS+.

    Attributes:
        given: the input as given, in RAS+.
        canon: the input as the run measures it (:meth:`~gen_sr.pipelines.LatentDiffusionSRPipeline.coarsened`:
            ``given`` itself where it is not resampled).
        operator: the acquisition on the HR grid.
        axes: the RAS+ axes super-resolved, the coarser first.
        noise_gain: the factor by which the resampling scales the noise std (1 without one).
        slice_profile_from, slice_thickness_from: where the slices' profile and thickness came from
            (:meth:`~gen_sr.pipelines.LatentDiffusionSRPipeline.resolved_slices`).
        normalization: the input's intensity normalisation.
        noise_std: the noise std in input units on the measured grid: given, or read from the scan's air; ``None``
            where it has none (not known).
        noise_std_estimated: whether it was asked to be read from the air (``noise_std="auto"``).
        noise_std_in_plane: where the noise std is not known, the one read in-plane (what an interval for such runs
            counts); else ``None``.
        settings: the sampler settings of the run.
        calibration: the calibration its risk map uses (``calibration_for`` its settings and output grid), or
            ``None``.
        calibration_mismatch: why that calibration was not made for the run (``None`` where it was).
        capped_fraction: the share of the slices' components that a fit without a noise std fits only partially
            (:meth:`AcquisitionOperator.capped_fraction`).
        outside_training: where the input lies outside the trained regime, one sentence each.
        memory_bytes: the memory the run needs, about (:meth:`~gen_sr.pipelines.LatentDiffusionSRPipeline.
            memory_estimate`).
        memory_available_bytes: the memory free now (``None``: not known).
    """

    given: Volume
    canon: Volume
    operator: AcquisitionOperator
    axes: tuple[int, ...]
    noise_gain: float
    slice_profile_from: str
    slice_thickness_from: str
    normalization: IntensityNormalization
    noise_std: float | None
    noise_std_estimated: bool
    noise_std_in_plane: float | None
    settings: SamplingSettings
    calibration: Calibration | None
    calibration_mismatch: Mismatch | None
    capped_fraction: float
    outside_training: tuple[str, ...]
    memory_bytes: int
    memory_available_bytes: int | None

    @property
    def noise_known(self) -> bool:
        return self.noise_std is not None

    @property
    def interval_noise_std(self) -> float:
        """The noise std (input units) that the calibrated interval counts (:func:`~gen_sr.risk.interval_noise_std`):
        the run's, or for a calibration made for runs whose noise std is not known, the one read in-plane."""
        return interval_noise_std(self.calibration, self.noise_std or 0.0, self.noise_std_in_plane)

    @property
    def acquisition(self) -> str:
        """The acquisition in words (:meth:`AcquisitionOperator.describe`)."""
        return self.operator.describe()

    @property
    def coarsened_input(self) -> CoarsenedInput | None:
        """How the input is resampled in-plane first, or ``None``."""
        if self.canon is self.given:
            return None
        return CoarsenedInput(tuple(self.given.spacing), tuple(self.canon.spacing), self.noise_gain)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.operator.hr_shape)

    @property
    def output_spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in self.operator.hr_spacing)

    @property
    def grid_spacing(self) -> float:
        """The output voxel size in mm (the finest output spacing), as a calibration is matched against it."""
        return min(self.output_spacing)

    @property
    def num_samples(self) -> int:
        return self.settings.num_samples


def run_calibration(model: Any, record: RunRecord, *, warn: bool = False) -> Calibration | None:
    """The calibration that holds for a run of ``model`` (a pipeline) with this ``record``: its ``calibration_for``
    the run's sampler settings and output grid, so that a benchmark, report or reused run measures the interval the
    run's risk map was made with (``warn``: a warning where none was made for them). For a record without its
    sampler settings, the model's default calibration at the run's grid."""
    settings = record.sampling
    if settings is None:
        default = model.calibration
        return None if default is None else default.at_grid(record.grid_spacing)
    return model.calibration_for(settings, warn=warn, grid_spacing=record.grid_spacing)


@dataclass(frozen=True, kw_only=True)
class CohortRecord:
    """What a cohort (:mod:`gen_sr.cohort`) keeps beside a scan's run record in its JSON sidecar, and what a
    single-scan run keeps there so that a cohort can take its outputs (:func:`~gen_sr.cohort.single_scan_record`):
    these keys after the run's (:class:`RunRecord`), in this order, each only where it is not ``None``
    (:meth:`to_dict`); a key a record lacks reads as ``None`` (:meth:`from_dict`), values as they are.

    Attributes:
        input: the scan a cohort's run made it from (its path); ``None``: a single-scan run's record.
        finished: ``False`` while a cohort's run of the scan is under way (it writes its record first, without the
            run's, and again when done), ``True`` once it finished; ``None``: not said (a single-scan run's
            record), which counts as finished (:attr:`under_way`).
        flagged_fraction: the fraction of the imaged object whose risk exceeds ``risk_threshold``
            (:func:`~gen_sr.cohort.flagged_fraction`); ``None``: not recorded (a single-scan run's record).
        risk_threshold: the risk above which a voxel counted as flagged.
        seconds: the run's wall time; ``None``: not recorded (a single-scan run's record).
        cohort_settings: the settings the outputs were made with, as asked (:func:`~gen_sr.cohort.run_settings`):
            the same for every scan of a cohort, which a rerun compares with its own to decide whether a finished
            scan's outputs are still its (so not what each scan's run resolved from its own data: its
            ``sampling_as_asked`` holds no ``noise_known``, and its ``refit_disagreement`` is the one asked, which a
            run without a noise std does not do; the run's own fields, :class:`RunRecord`, say what the run did);
            ``None``: from before they were recorded, or a run of an adapted model.
        input_stamp: the scan and its JSON sidecar as the run found them (:func:`~gen_sr.cohort.input_stamp`);
            ``None``: not kept, and then the scan is taken as unchanged.
    """

    input: str | None = None
    finished: bool | None = None
    flagged_fraction: float | None = None
    risk_threshold: float | None = None
    seconds: float | None = None
    cohort_settings: dict[str, Any] | None = None
    input_stamp: dict[str, list[Any] | None] | None = None

    @property
    def under_way(self) -> bool:
        """Whether a cohort's run of the scan wrote this record before it finished (and did not finish)."""
        return self.finished is False

    def to_dict(self) -> dict[str, Any]:
        """The keys a scan's sidecar holds beside its run record, in field order, each only where it is set."""
        return {f.name: value for f in fields(self) if (value := getattr(self, f.name)) is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CohortRecord:
        """Read these keys of a scan's sidecar (a run record's, or the record a cohort writes before its run);
        the others are the run's (:meth:`RunRecord.from_dict`)."""
        return record_from_dict(cls, d)


@dataclass(frozen=True)
class TimeEstimate:
    """How long a call would take on this machine
    (:meth:`~gen_sr.pipelines.LatentDiffusionSRPipeline.time_estimate`): a call on a slab of the input, timed and
    scaled by the output voxels.

    Attributes:
        probe_seconds: the slab's call, in seconds.
        probe_fraction: the slab's share of the output voxels.
    """

    probe_seconds: float
    probe_fraction: float

    @property
    def seconds(self) -> float:
        """The estimate: the slab's time scaled to the whole output."""
        return self.probe_seconds / self.probe_fraction
