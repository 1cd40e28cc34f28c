"""``LatentDiffusionSRPipeline``: latent diffusion sampling conditioned on an LR volume, with data consistency, N
samples and per-voxel uncertainty, on whole volumes with exact geometry. The sampler is the model folder's scheduler
(``models/heads2d``: DPM-Solver++, 3 steps; DDIM and UniPC take the same data-consistency hook).

    pipe = LatentDiffusionSRPipeline.from_pretrained("models/heads2d")
    out = pipe("lr.nii.gz", num_samples=8, guidance="projection")
    out.mean, out.std, out.risk, out.dc_residual   # numpy volumes in the input's orientation, on the HR grid
    out.record                                     # what the run did (gen_sr.run_record.RunRecord)

The generic ``DiffusionPipeline.from_pretrained`` does not know this class; call it on the class, as above.
"""

from __future__ import annotations

import inspect
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
from accelerate.utils import gather_object
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput, logging

from gen_sr.distributed import process_state
from gen_sr.errors import InputError
from gen_sr.io import sidecar_profile_error, sidecar_slice_profile, sidecar_slice_thickness
from gen_sr.model_card import IN_PLANE_MARGIN, ModelCard
from gen_sr.models import Autoencoder, ConditionalUNetModel, latent_condition, set_sdpa_attention
from gen_sr.physics import (
    AcquisitionOperator,
    SliceAcquisition,
    SliceProfile,
    air_noise_gain,
    coarsen,
    coarsening,
    coarser_axes,
    estimate_noise_std,
    operator_from_spacings,
    scan_noise_std,
)
from gen_sr.pipelines.guidance import (
    GradientGuidance,
    ProjectionGuidance,
    final_projection,
    fit_where_data_disagree,
)
from gen_sr.pipelines.tiling import ForegroundTiles, PatchTiler, SlicePatchTiler, SliceTiler
from gen_sr.risk import (
    MISMATCH_WORDING,
    Calibration,
    CalibrationMismatchWarning,
    Calibrations,
    DataDisagreement,
    Mismatch,
    SamplingSettings,
    grid_text,
    mismatch_text,
    risk_map,
)
from gen_sr.run_record import RunPlan, RunRecord, TimeEstimate, describe_risk
from gen_sr.schedulers import DDIMDataConsistencyScheduler  # imported here so that from_pretrained can load it
from gen_sr.slice_profile import estimate_slice_profile
from gen_sr.volume import IntensityNormalization, Volume, VolumeMemo, load_volume, resample_to

logger = logging.get_logger(__name__)

__all__ = ["DEFAULT_NUM_SAMPLES", "CalibrationMismatchWarning", "LatentDiffusionSRPipeline", "NoiseUnknownWarning",
           "OutsideTrainingWarning", "SRPipelineOutput", "resolve_noise_std"]

DEFAULT_NUM_SAMPLES = 8
"""Posterior samples per run unless a call says otherwise."""

LRInput = str | Path | nib.Nifti1Image | Volume | np.ndarray | torch.Tensor
BYTES_PER_VOXEL_AND_SAMPLE = 96
"""Peak memory per HR voxel and sample, with headroom: on this project's 2-core CPU, the demo model's peak resident
memory grew by 76 B per voxel and sample from a 64 x 64 x 96 to a 128 x 128 x 96 grid at 8 samples
(``benchmarks/pipeline_memory.py``). :meth:`LatentDiffusionSRPipeline.check_memory` uses it to
refuse, before any sampling, a grid that cannot fit; it is an estimate for that, not a prediction."""

_INPUTS = VolumeMemo()
"""What a call computes from its input and another call on the same input would compute again, for the last two
inputs: the input resampled (:meth:`LatentDiffusionSRPipeline.coarsened`,
:meth:`~LatentDiffusionSRPipeline.measured_input`), how that scaled its noise, its noise std read from its air
(:func:`resolve_noise_std`) and its slice thickness estimated (``slice_profile="auto"``): seconds for a 0.5 mm head
on the 2-core CPU (an output grid 1.2-4 s, a plan 2.4-6.5 s, as its load varied; ``benchmarks/RESULTS.md``). A
command looks at its scan several times: ``gen-sr audit`` for the output grid, the run and the audit of what the run
measured, ``super-resolve --adapt`` for the adaptation and the run, ``info --time`` for the plan and the timed run;
and so does a Python session, ``pipe.plan(lr)`` then ``pipe(lr)``."""


class OutsideTrainingWarning(UserWarning):
    """An input lies outside what the model was trained for (its model card); the output may be worse than the
    model card's figures."""


class NoiseUnknownWarning(UserWarning):
    """A run asked to read its noise std from the scan's background air (``noise_std="auto"``), which the scan does
    not have (masked, skull-stripped or cropped to the head): its noise std is not known. A command that said so
    before the run (``--adapt``, whose fit prints it first) leaves this one out."""


@dataclass
class SRPipelineOutput(BaseOutput):
    """What a super-resolution run returns; volumes are on the HR grid, in the input's orientation and units.

    Attributes:
        mean: the estimate, the mean of the samples ``(X, Y, Z)``.
        samples: all samples ``(N, X, Y, Z)``, or ``None`` with ``keep_samples=False``.
        std: per-voxel standard deviation across samples.
        risk: the hallucination-risk map, as a fraction of the input's robust intensity range (its 0.5-99.5
            percentile span): ``std`` until the model folder carries a ``calibration.json``, then the half-width
            ``λ̂ u`` of the interval calibrated for the run's sampler settings (:meth:`calibration_for`; ``u`` is
            the std, or the spread the calibration chose;
            ``mean ± risk · range`` misses at most a fraction ``α`` of voxels; see :mod:`gen_sr.eval.calibration`).
        dc_residual: ``|A x − y|`` of the mean, brought back onto the HR grid by linear interpolation.
        data_disagreement: where the mean departs from the measurement by more than its noise explains
            (:class:`~gen_sr.risk.DataDisagreement`: the local mean of ``((A x − y)/σ)²`` over its median, unitless;
            flagged above the class's threshold), or ``None`` for a run given no noise std (with noise-free data
            the projection leaves no residual to judge). With ``refit_disagreement`` it is the samples' mean before
            the refit: where the prior departed from the data (the output was then fitted to them there).
        affine: the HR voxel-to-world affine of the outputs.
        metadata: the run record as JSON (:meth:`~gen_sr.run_record.RunRecord.to_dict`, what ``super-resolve``
            writes beside its outputs): seeds, steps, operator, guidance, final relative residuals ``‖A x − y‖/‖y‖``
            (0 up to round-off without a noise std, unless ``capped_fraction``, the share of the slices' components
            fitted only up to the inverse's gain cap (:meth:`~gen_sr.physics.AcquisitionOperator.capped_fraction`),
            is above 0) and timings; :attr:`record` reads it typed.

    With ``output_type="nifti"`` the volumes are NIfTI images on the input's header (its units, codes and
    description; samples along the 4th axis): ``nib.save(out.mean, "sr.nii.gz")`` writes one as the input's
    geometry says.
    """

    mean: Any
    samples: Any
    std: Any
    risk: Any
    dc_residual: Any
    data_disagreement: Any
    affine: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def record(self) -> RunRecord:
        """What the run did, typed (:class:`~gen_sr.run_record.RunRecord`, read from :attr:`metadata`)."""
        return RunRecord.from_dict(self.metadata)


def _add_time(timings: dict[str, float], key: str, tic: float) -> None:
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - tic


class LatentDiffusionSRPipeline(DiffusionPipeline):
    """Latent diffusion super-resolution with data consistency and uncertainty.

    Args:
        vae: the autoencoder.
        unet: the conditional denoiser.
        scheduler: a diffusers scheduler; data consistency needs one whose ``step`` takes ``x0_hook``
            (:class:`~gen_sr.schedulers.DDIMDataConsistencyScheduler`, or the multistep
            :class:`~gen_sr.schedulers.DPMSolverDataConsistencyScheduler` that ``models/heads2d`` uses and
            :class:`~gen_sr.schedulers.UniPCDataConsistencyScheduler`). Others run with ``guidance="none"``.
        model_card: what the model was trained for (:class:`~gen_sr.model_card.ModelCard`, or its JSON form as
            ``model_index.json`` holds it); read it back as ``pipe.model_card``.
    """

    model_cpu_offload_seq = "unet->vae"

    def __init__(
        self,
        vae: Autoencoder,
        unet: ConditionalUNetModel,
        scheduler: Any,
        model_card: ModelCard | dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler)
        self.model_card = model_card if isinstance(model_card, ModelCard) else ModelCard.from_dict(
            model_card, "model_index.json: model_card")
        for model in (vae, unet):  # torch SDPA by default, whatever the training config said
            set_sdpa_attention(model, True)
        if unet.config.spatial_dims == 2:  # faster convolutions on the 2-core CPU (benchmarks/RESULTS.md, "Speed")
            unet.to(memory_format=torch.channels_last)
        self.calibrations = Calibrations()  # from the model folder's calibration.json: one per sampler setting

    def enable_xformers_memory_efficient_attention(self, attention_op: Callable | None = None) -> None:
        """Always raises (diffusers pipelines offer it, so it is here to say why): the MONAI attention blocks these
        models are built from have no xformers path. Their memory-efficient option is torch's
        ``scaled_dot_product_attention`` (MONAI's ``use_flash_attention``), which never builds the attention matrix
        and which the pipeline switches on for both models when it is made (:func:`~gen_sr.models.set_sdpa_attention`).
        ``ImportError`` where xformers is not installed, else ``NotImplementedError``."""
        import importlib.util

        if importlib.util.find_spec("xformers") is None:
            raise ImportError("xformers is not installed (pip install 'gen_sr[xformers]'); the pipeline keeps using "
                              "torch scaled_dot_product_attention, its default")
        raise NotImplementedError("MONAI's attention blocks have no xformers path; the pipeline keeps using torch "
                                  "scaled_dot_product_attention, which has memory-efficient kernels of its own")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, allow_pickle: bool = False, **kwargs: Any):
        """Load a model folder. Weights must be safetensors unless ``allow_pickle=True`` (pickles can run code).

        Components load in float32 unless ``dtype`` says otherwise, whatever precision the weights are stored in (the
        committed demo model stores float16 to halve its size).
        """
        if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
            kwargs["dtype"] = torch.float32
        if not allow_pickle:
            if kwargs.get("use_safetensors") is False:
                raise ValueError("use_safetensors=False loads pickled weights: pass allow_pickle=True to do that")
            kwargs["use_safetensors"] = True
            _refuse_pickled_weights(Path(pretrained_model_name_or_path))
        else:
            warnings.warn(f"loading pickled weights from {pretrained_model_name_or_path} is allowed: a pickle can run "
                          "any code when loaded; do this only for a model folder you trust", stacklevel=2)
        if "model_card" not in kwargs and (Path(pretrained_model_name_or_path) / "model_index.json").is_file():
            kwargs["model_card"] = ModelCard.from_folder(pretrained_model_name_or_path)  # also under its old key
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipe.calibrations = Calibrations.load(pretrained_model_name_or_path)
        return pipe

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Save the components (safetensors) and the calibrations, if any."""
        super().save_pretrained(save_directory, **kwargs)
        self.calibrations.save(save_directory)

    # ------------------------------------------------------------------------------------------------- calibration
    @property
    def calibration(self) -> Calibration | None:
        """The record made with the settings of a default run (:meth:`sampling_settings` with no arguments), else the
        first of :attr:`calibrations`, or ``None``; as stored, for no grid in particular. A record whose scale is per
        mm of the output voxel size (``models/heads2d``'s) holds at a grid only: its
        :meth:`~gen_sr.risk.Calibration.halfwidth` raises until it is given one; the record a run on a grid uses is
        :meth:`calibration_for` its settings and ``grid_spacing`` (or ``pipe.calibration.at_grid(voxel_mm)``).
        Setting it replaces all of them (``None``: uncalibrated); add one for other settings with
        ``pipe.calibrations = pipe.calibrations.with_record(cal)``."""
        return self.calibrations.find(self.sampling_settings()) or next(iter(self.calibrations), None)

    @calibration.setter
    def calibration(self, calibration: Calibration | None) -> None:
        self.calibrations = Calibrations([] if calibration is None else [calibration])

    def calibration_for(self, settings: SamplingSettings, *, warn: bool = False,
                        grid_spacing: float | None = None) -> Calibration | None:
        """The calibration a run with these sampler ``settings`` on an output grid of ``grid_spacing`` mm uses: the
        one made with them (for that grid where one was made per grid: :meth:`~gen_sr.risk.Calibrations.find`); where
        they were calibrated per grid only, for other grids, the nearest grid's; else that of a default run on this
        grid (:attr:`calibration`'s settings, :meth:`~gen_sr.risk.Calibrations.nearest`), which does not hold for
        them (``warn``: a :class:`CalibrationMismatchWarning` says so, and which settings or grid have one, as it
        does for a record made with these settings on grids away from this one:
        :meth:`~gen_sr.risk.Calibration.mismatch`; where that record differs only in the noise, known or not, the
        warning says the noise is why, in the words of its :data:`~gen_sr.risk.Mismatch`)."""
        asked, exact = settings, self.calibrations.find(settings, grid_spacing)
        if exact is None and not settings.noise_known:  # a model without records for such runs: as a noise-free one
            settings = replace(settings, noise_known=True)
            exact = self.calibrations.find(settings, grid_spacing)
        if exact is not None:
            if warn and exact.mismatch(settings, grid_spacing) == "grid":
                warnings.warn(f"the model's calibration for these settings was {grid_text(exact)}, and this run's "
                              f"output grid is {grid_spacing:g} mm: its coverage does not hold here (the scale the "
                              f"std needs grows with the voxel size); {MISMATCH_WORDING['grid'].advice}",
                              CalibrationMismatchWarning, stacklevel=5)
            return exact
        nearest = None if grid_spacing is None else self.calibrations.nearest(settings, grid_spacing)
        if nearest is not None:  # made per grid only, none for this one
            if warn:
                warnings.warn(f"no calibration of the model was made for {grid_spacing:g} mm output grids with these "
                              f"settings: the risk map uses the one for {nearest.grid_spacing:g} mm grids, whose "
                              "coverage does not hold here (the scale the std needs grows with the voxel size); "
                              f"{MISMATCH_WORDING['grid'].advice}", CalibrationMismatchWarning, stacklevel=5)
            return nearest
        default = self.calibration
        why = None if default is None else default.mismatch(asked)
        if warn and why in ("noise_known", "noise_unknown"):  # only the noise differs (and the refit that follows it)
            warnings.warn(f"this run's risk map uses the model's calibration, but {mismatch_text(why)}",
                          CalibrationMismatchWarning, stacklevel=5)
        elif default is not None and warn:
            made = "settings it did not record" if default.sampling is None else default.sampling.describe()
            warnings.warn(f"this run uses {settings.describe()}, which no calibration of the model was made with: its "
                          f"risk map uses the calibration made with {made}, whose coverage does not hold for these "
                          f"settings; {MISMATCH_WORDING['settings'].advice}", CalibrationMismatchWarning, stacklevel=5)
        if default is None or grid_spacing is None or default.sampling is None:
            return None if default is None else default.at_grid(grid_spacing)
        return self.calibrations.nearest(default.sampling, grid_spacing)  # the default settings' record for this grid

    # ------------------------------------------------------------------------------------------------- settings
    @property
    def model_card(self) -> ModelCard:
        """What the model was trained for; setting it also updates the config that ``save_pretrained`` writes."""
        return self._model_card

    @model_card.setter
    def model_card(self, card: ModelCard) -> None:
        self._model_card = card
        self.register_to_config(model_card=card.to_dict())

    @property
    def sr_axis(self) -> int:
        """The RAS+ axis the model super-resolves."""
        return self.model_card.sr_axis

    @property
    def spatial_dims(self) -> int:
        return int(self.unet.config.spatial_dims)

    @property
    def sampler_name(self) -> str:
        """The sampler in run records and calibrations: the scheduler's class name, with its variant where it names
        one (``sampler_name``, e.g. the SDE form of DPM-Solver++)."""
        return getattr(self.scheduler, "sampler_name", type(self.scheduler).__name__)

    @property
    def tile_multiple(self) -> int:
        return self.vae.downsample_factor * self.unet.downsample_factor

    def check_patch_size(self, patch_size: Sequence[int] | None) -> None:
        """Refuse a ``patch_size`` this model cannot tile with (:class:`~gen_sr.errors.InputError`): one size per
        tile axis (``(h, w)`` for 2D models, ``(d, h, w)`` for 3D), each a positive multiple of
        :attr:`tile_multiple`; ``None`` (the default tiling) passes."""
        if patch_size is None:
            return
        n, f = self.spatial_dims, self.tile_multiple
        if len(patch_size) != n or any(int(p) < 1 or int(p) % f for p in patch_size):
            raise InputError(f"patch size {','.join(map(str, patch_size))} does not fit this {n}D model",
                             hint=f"give {n} sizes ({'H,W' if n == 2 else 'D,H,W'}), each a multiple of {f}")

    # ------------------------------------------------------------------------------------------------- the call
    @torch.no_grad()
    def __call__(
        self,
        lr: LRInput,
        *,
        affine: np.ndarray | None = None,
        lr_spacing: Sequence[float] | None = None,
        target_spacing: Sequence[float] | None = None,
        operator: AcquisitionOperator | None = None,
        slice_profile: SliceProfile | None = None,
        slice_thickness: float | None = None,
        noise_std: float | Literal["auto"] = "auto",
        refit_disagreement: bool | None = None,
        calibration_region: LRInput | None = None,
        num_inference_steps: int | None = None,
        eta: float = 0.0,
        strength: float = 1.0,
        num_samples: int = DEFAULT_NUM_SAMPLES,
        share_first_call: bool | None = None,
        guidance: Literal["projection", "gradient", "none"] = "projection",
        guidance_scale: float = 1.0,
        guidance_interval: int = 5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        batch_size: int = 8,
        slice_normal: int | Sequence[int] | None = None,
        patch_size: Sequence[int] | None = None,
        patch_overlap: float = 0.25,
        skip_background: float | None = None,
        keep_samples: bool = True,
        split_samples: bool = True,
        volume_index: int | None = None,
        output_type: Literal["np", "pt", "nifti"] = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | None = None,
    ) -> SRPipelineOutput | tuple:
        """Super-resolve one LR volume.

        Args:
            lr: a NIfTI path, a nibabel image, a :class:`~gen_sr.volume.Volume`, or a 3D array/tensor (then give
                ``affine`` or ``lr_spacing``).
            affine, lr_spacing: geometry of an array input.
            target_spacing: HR voxel spacing in mm; default: the LR spacing with each super-resolved axis set to
                the finest spacing of the others.
            operator: the acquisition on the canonical (RAS+) HR grid, instead of one built from the spacings.
            slice_profile, slice_thickness: the acquisition's slice profile and thickness; a given thickness
                applies to every sliced axis. Not given, a scan with one coarse axis takes them from its JSON
                sidecar (``SliceThickness``, as dcm2niix and ``gen-sr degrade`` write it; gen_sr's own
                ``SliceProfile``, which ``gen-sr degrade`` writes: :func:`~gen_sr.io.sidecar_slice_profile`), and
                otherwise the profile is ``"gaussian"`` and the thickness the LR spacing. ``slice_profile="auto"``
                estimates the thickness from the scan (:mod:`gen_sr.slice_profile`; one coarse axis, no thickness
                given) as the FWHM of a Gaussian profile. The operator in ``metadata`` records what was used, and
                ``slice_profile_from`` and ``slice_thickness_from`` where each came from (:meth:`resolved_slices`).
            noise_std: measurement noise std in input units. ``"auto"`` (the default, as in the commands): read from
                the scan's background air (:func:`~gen_sr.physics.scan_noise_std`), recorded in ``metadata``; where
                it has none (masked or cropped to the head), the noise std is not known: the projections fit the
                data exactly, with a warning, and the risk map uses the model's calibration for such runs, whose
                interval counts the noise read in-plane (:data:`~gen_sr.risk.NOISE_UNKNOWN_SHAPE`). ``0``: known
                noise-free (simulated data): the projections fit the data exactly, up to a cap on the inverse's
                noise gain that only much-overlapping slices reach (:data:`~gen_sr.physics.NOISE_GAIN_FLOOR`), and
                the risk map uses the noise-free calibration; on a noisy scan its interval under-covers. ``> 0``:
                the projections are noise-aware.
            refit_disagreement: with a noise std, after the noise-aware projection, fit the measurements (exactly,
                up to that cap) where the samples' mean departs from them by more than the noise explains
                (:func:`~gen_sr.pipelines.guidance.fit_where_data_disagree`); no effect without a noise std, where
                every sample fits the data already. Default: the model card's ``refit_disagreement``.
            calibration_region: for a per-scan calibration fitted per region (``Calibration.outside_scale``; ``gen-sr
                fit --calibration-region``): the same mask on the input's own grid (anything ``lr`` may be; nonzero
                inside), so that each scale holds where it was fitted; without it the larger holds everywhere.
            num_inference_steps: the scheduler's steps; default: the model folder's (``model_card.
                num_inference_steps``: 3 DPM-Solver++ steps for ``models/heads2d``, 1 for a regression model).
            eta: DDIM's stochasticity (0: deterministic given the seed); the multistep solvers have none, and a
                scheduler without ``eta`` ignores it with a warning.
            strength: where the reverse process starts, in (0, 1]: 1 starts from pure noise; below 1 it starts from
                the encoded condition (the LR interpolated onto the HR grid) noised to the timestep ``strength`` of
                the way up, and runs only the last ``round(strength * num_inference_steps)`` of the steps (diffusers'
                img2img convention), since the LR already fixes the coarse image.
            num_samples: posterior samples ``N``; they are batch entries with one generator each.
            share_first_call: make the first network call once for all samples instead of once per sample (default:
                the model card's ``share_first_call``). From pure noise at the first timestep (t = 999 with trailing
                spacing) the noisy latent holds almost no signal, so the network's clean-sample prediction there is
                its estimate from the condition alone and nearly the same for every draw: it is computed from sample
                0's starting noise and stands in for every sample's through the x0 hook, while each sample keeps its
                own starting noise, which the solver carries on. ``N`` samples of ``S`` steps then cost
                ``1 + N (S - 1)`` calls per tile instead of ``N S`` (``benchmarks/SAMPLING.md``). It applies where
                all samples share one condition and at least two steps are run (with one, it is off); a sample
                then depends on sample 0's seed, so sample ``k`` of a run differs slightly from the same seed run
                alone (sample 0 does not). With two coarse axes only the first stage shares it (the second's samples
                each have their own condition, the first stage's sample); ``metadata["shared_first_call"]`` records
                each stage's.
            guidance: data consistency during sampling; ``guidance_scale`` is the gradient step size;
                ``guidance_interval`` applies it every k-th step, counted back from the last one.
            generator: one generator, or one per sample: sample ``k`` then draws from generator ``k`` only, and
                equals sample ``k`` run alone where the first call is not shared (``share_first_call``, which the
                model card may enable, as ``models/heads2d``'s does: then only sample 0 does).
            batch_size: tiles per network call: the memory knob; it changes the output only by float32 rounding.
                The default 8 is the fastest measured on the 2-core CPU (one call on whole sagittal slices: 0.92x the
                time of 16, 0.82x with the UNet channels-last; a whole brain 0.86x; ``benchmarks/RESULTS.md``); a GPU
                takes more.
            slice_normal: 2D models: the RAS+ axis that slices are taken across. Default: of the two axes that are
                not super-resolved, the one along which the volume is shortest, so that each slice is as wide as
                possible and the network sees the most context (on 8 mm slabs of the training heads' held-out
                region, coronal slices gained +1.75 dB over interpolation where sagittal strips 8 voxels wide
                gained +0.78; ``benchmarks/SAMPLING.md``). Two axes, e.g. ``(0, 1)``, fuse orientations: each
                sample is then drawn once per slicing plane (from its own generator) and the volumes are averaged
                before the final projection, at twice the cost; for the first demo model it did not reduce
                slice-to-slice jitter measurably (``benchmarks/slice_consistency.py``), so one plane is the default.
                With two coarse axes (a model trained for every slice axis, an input such as 1 x 3 x 5 mm) the
                coarser is super-resolved first, on slices across the other, and then each sample along the other,
                on slices across ``slice_normal``; ``metadata["slice_normals"]`` then lists both stages'.
            patch_size, patch_overlap: 3D models: patch size (default: the largest multiple of the downsampling
                factor up to 64 per axis) and overlap fraction. 2D models: with ``patch_size`` ``(h, w)``, each
                slice is cut into overlapping patches of that size (the second axis along the super-resolved one),
                blended with a Gaussian window; default: whole slices.
            skip_background: leave out the tiles whose condition (the LR interpolated, normalised to the robust
                range [0, 1]) stays at or below this level everywhere, e.g. 0.02 for air: they are not sampled, and
                every sample there is the condition itself (std and risk 0); ``metadata["skipped_tiles"]`` counts
                them. Default ``None``: every tile is sampled. It pays with in-slice patches or 3D patches, where
                many tiles are air.
            keep_samples: keep all samples in the output (costs ``N`` volumes of memory).
            split_samples: under ``accelerate launch``, split the samples over the processes (the default); ``False``
                draws them all in this process, for runs where each process takes scans of its own
                (:mod:`gen_sr.cohort`).
            volume_index: which volume of a 4D series.
            output_type: ``"np"`` arrays, ``"pt"`` tensors, or ``"nifti"`` images with the HR geometry.
            return_dict: return an :class:`SRPipelineOutput` (else a tuple in its field order).
            callback_on_step_end: ``fn(pipe, step_index, timestep, {"latents": z})`` returning a dict that may
                replace ``latents``.
        """
        timings: dict[str, float] = {}
        tic = time.perf_counter()
        # 1. check inputs
        _check_settings(eta=eta, noise_std=0.0 if noise_std == "auto" else noise_std, num_samples=num_samples,
                        batch_size=batch_size, guidance=guidance, guidance_interval=guidance_interval,
                        guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, strength=strength)
        self.check_patch_size(patch_size)
        if num_samples == 1:
            warnings.warn("one sample has no spread: the std and risk maps are 0 everywhere, so nothing can be "
                          "flagged; sample 2 or more for an uncertainty map", stacklevel=2)
        volume = self.as_volume(lr, affine, lr_spacing, volume_index)
        generators = self._generators(generator, num_samples)
        # under `accelerate launch`, each process draws every world_size-th sample (unless it runs scans of its own)
        rank, processes = (process_state().process_index, process_state().num_processes) if split_samples else (0, 1)
        if num_samples < processes:
            raise ValueError(f"{num_samples} samples cannot be split over {processes} processes")
        local = generators[rank::processes]
        device, dtype = self._execution_device, self.unet.dtype

        # 2. plan: the acquisition on the canonical HR grid, the noise std, the sampler settings and their
        #    calibration (warning where any does not hold), and the measurement
        plan = self._prepare_run(volume, target_spacing=target_spacing, operator=operator,
                                 slice_profile=slice_profile, slice_thickness=slice_thickness, noise_std=noise_std,
                                 num_samples=num_samples, num_inference_steps=num_inference_steps, strength=strength,
                                 share_first_call=share_first_call, refit_disagreement=refit_disagreement,
                                 keep_samples=keep_samples, for_call=True)
        self._warn_run(plan, calibration_region=calibration_region is not None)
        canon, operator, axes, norm = plan.canon, plan.operator, plan.axes, plan.normalization
        hr_affine = operator.hr_affine(canon.affine)
        work = torch.promote_types(dtype, torch.float32)  # physics, stitching and statistics in >= float32
        y = torch.from_numpy(norm(canon.data.astype(np.float32)))[None, None].to(device, work)
        sigma = (plan.noise_std or 0.0) / norm.scale
        interval_sigma = plan.interval_noise_std / norm.scale  # what the calibrated interval counts
        region = None
        if calibration_region is not None:
            grid = Volume(np.broadcast_to(np.float32(0), tuple(operator.hr_shape)), hr_affine)
            region = torch.from_numpy(self.calibration_region_mask(volume, calibration_region, grid)).to(device)

        # 3. timesteps
        num_inference_steps = num_inference_steps or self.model_card.num_inference_steps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps[num_inference_steps - max(1, round(strength * num_inference_steps)):]
        guided = timesteps.flip(0)[::guidance_interval].tolist() if guidance != "none" else []
        share = plan.settings.share_first_call
        mode = self.model_card.unet_condition
        timings["prepare_s"] = time.perf_counter() - tic

        # 4-6. per stage (one per coarse axis; with two, the first stage works on the grid in between, still coarse
        #      along the second axis, and each of its samples is the measurement of that sample in the second)
        measured, measured_sigma, guidance_calls, normals, shared_stages, skipped = y, sigma, 0, [], [], 0
        for stage_operator, stage_axis, stage_normal in self._stages(operator, axes, slice_normal):
            condition_image = stage_operator.upsample(measured, self.model_card.condition).to(dtype)
            tilers = self._tilers(stage_operator.hr_shape, stage_axis, stage_normal, patch_size, patch_overlap)
            hook_args = (stage_operator, measured, guided, batch_size, measured_sigma, guidance_scale)
            volumes = []
            for tiler in tilers:  # one pass, or one per slicing plane when a 2D model fuses orientations
                # 4. latents: one generator per sample, tiles of all samples as one batch; every pass is a sampling
                #    of its own, so a multistep solver's state (step index, earlier outputs) starts afresh
                tic = time.perf_counter()
                self.scheduler.set_timesteps(num_inference_steps, device=device)
                if skip_background is not None:  # tiles with no foreground in the condition are not sampled
                    tiler = ForegroundTiles(tiler, condition_image, skip_background)
                    skipped += tiler.skipped
                latent_shape = tuple(s // self.vae.downsample_factor for s in tiler.tile_shape)
                condition_tiles = tiler.split(condition_image).split(batch_size)
                per_sample = len(local) // len(condition_image)  # one measurement for all samples, or one each

                def for_samples(x: torch.Tensor, n: int = per_sample) -> torch.Tensor:
                    return x.repeat(n, *[1] * (x.ndim - 1))

                cond = for_samples(torch.cat([latent_condition(c, latent_shape, self.vae, mode)
                                              for c in condition_tiles]))
                shape = (tiler.num_tiles, self.vae.config.latent_channels, *latent_shape)

                def noise(shape=shape) -> torch.Tensor:  # one draw per sample, from that sample's own generator
                    return torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in local]).to(
                        device, work)

                # below strength 1: the encoded condition, noised to the first timestep (diffusers' img2img)
                encoded = (torch.cat([self.vae.encode_latent(c) for c in condition_tiles]).to(work)
                           if strength < 1 else None)

                def start(draw: torch.Tensor, n: int = per_sample, encoded=encoded) -> torch.Tensor:
                    """The first latents of ``n`` samples per condition, from their noise ``draw``."""
                    if encoded is None:
                        return draw * self.scheduler.init_noise_sigma
                    return self.scheduler.add_noise(for_samples(encoded, n), draw, timesteps[:1])

                latents = start(noise())
                # the first call's input when the samples share it: sample 0's start, the same in every process
                shared = share and per_sample == len(local)
                first = start(torch.randn(shape, generator=torch.Generator().manual_seed(generators[0].initial_seed()),
                                          dtype=torch.float32).to(device, work), 1) if shared else None
                hook = self._hook(guidance, tiler, *hook_args)
                step_kwargs = self._step_kwargs(eta, hook)
                _add_time(timings, "prepare_s", tic)

                # 5. denoising loop with data consistency (the latents and the scheduler's maths stay in >= float32;
                #    only the networks run in their own dtype)
                tic = time.perf_counter()
                for i, t in enumerate(self.progress_bar(timesteps)):
                    kwargs = step_kwargs
                    if i == 0 and first is not None:  # one call for all samples: its x0 stands in for each one's
                        out = self._denoise(self.scheduler.scale_model_input(first, t), t, cond[:len(first)],
                                            batch_size).to(work)
                        kwargs = {**step_kwargs, "x0_hook": SharedPrediction(
                            for_samples(self.scheduler.predict_original_sample(out, t, first)), hook)}
                        model_output = for_samples(out)
                    else:
                        model_input = self.scheduler.scale_model_input(latents, t)
                        model_output = self._denoise(model_input, t, cond, batch_size).to(work)
                    if "variance_noise" in kwargs:
                        kwargs["variance_noise"] = noise()
                    latents = self.scheduler.step(model_output, t, latents, **kwargs).prev_sample
                    if callback_on_step_end is not None:
                        latents = callback_on_step_end(self, i, int(t), {"latents": latents}).get("latents", latents)
                _add_time(timings, "denoise_s", tic)
                guidance_calls += hook.calls if hook is not None else 0

                # 6. decode
                tic = time.perf_counter()
                tiles = torch.cat([self.vae.decode_latent(z.to(self.vae.dtype)) for z in latents.split(batch_size)])
                volumes.append(tiler.merge(tiles.to(work)))
                _add_time(timings, "decode_s", tic)
            normals.append([t.normal for t in tilers] if self.spatial_dims == 2 else None)
            shared_stages.append(bool(shared))
            measured, measured_sigma = torch.stack(volumes).mean(dim=0), 0.0  # the next stage's measurement

        # 7. project every sample onto the data
        tic = time.perf_counter()
        x = final_projection(measured, operator, y, sigma)
        if processes > 1:  # gather the samples, back in their original order
            parts = gather_object([x.cpu()])
            x = torch.stack([parts[k % processes][k // processes] for k in range(num_samples)])
            x = x.to(device)
        # where the samples' mean departs from the data beyond the noise (before a refit: where the prior did)
        flag, measured, disagreement = DataDisagreement(), None, None
        if sigma > 0:
            measured = flag.measured_statistic(operator, x.mean(dim=0, keepdim=True), y, sigma)
            disagreement = flag.on_hr_grid(operator, measured)
        refit = plan.settings.refit_disagreement
        if refit:
            x = fit_where_data_disagree(x, operator, y, sigma, flag, measured)
        residuals = operator.residual(x, y.expand(x.shape[0], *y.shape[1:])).tolist()

        # 8. uncertainty: risk is the std (or the calibrated interval half-width) over the robust intensity range
        mean = x.mean(dim=0, keepdim=True)
        std = x.std(dim=0, unbiased=False, keepdim=True)
        risk = risk_map(std, mean, plan.calibration, interval_sigma, region=region)
        dc = operator.residual_map(mean, y)
        timings["stitch_uncertainty_s"] = time.perf_counter() - tic

        # 9. output: back to input units and orientation, and the run record
        record = RunRecord(
            input_digest=plan.given.digest(),  # the scan as given, in RAS+: what an audit of this run checks it against
            seeds=tuple(g.initial_seed() for g in generators),
            scheduler=self.sampler_name,
            num_inference_steps=num_inference_steps,
            eta=eta,
            strength=strength,
            denoising_steps=len(timesteps),
            num_samples=num_samples,
            share_first_call=share,
            shared_first_call=tuple(shared_stages),
            guidance=guidance,
            guidance_scale=guidance_scale,
            guided_timesteps=tuple(guided),
            guidance_calls=guidance_calls,
            sr_axes=tuple(axes),
            slice_normals=normals[0] if len(normals) == 1 else normals,
            patch_size=None if patch_size is None else tuple(int(p) for p in patch_size),
            skip_background=skip_background,
            skipped_tiles=skipped,
            processes=processes,
            noise_std=plan.noise_std,
            noise_std_estimated=plan.noise_std_estimated,
            noise_known=plan.noise_known,
            noise_std_in_plane=plan.noise_std_in_plane,
            coarsened_input=plan.coarsened_input,
            refit_disagreement=refit,
            slice_profile_estimated=slice_profile == "auto",
            slice_profile_from=plan.slice_profile_from,
            slice_thickness_from=plan.slice_thickness_from,
            operator=operator.to_dict(),
            relative_residual=tuple(residuals),
            capped_fraction=plan.capped_fraction,
            normalization=norm.to_dict(),
            risk=describe_risk(plan.calibration, plan.calibration_mismatch, calibration_region=region is not None),
            data_disagreement=None if disagreement is None else flag.describe(before_refit=refit),
            outside_training=plan.outside_training,
            timings=timings,
        )
        fields = self._outputs(canon, volume, hr_affine, norm, mean, x if keep_samples else None, std, risk, dc,
                               disagreement, output_type)
        out = SRPipelineOutput(*fields, metadata=record.to_dict())
        return out if return_dict else out.to_tuple()

    # ------------------------------------------------------------------------------------------------- helpers
    def sampling_settings(self, *, num_samples: int = DEFAULT_NUM_SAMPLES, num_inference_steps: int | None = None,
                          strength: float = 1.0, share_first_call: bool | None = None,
                          refit_disagreement: bool | None = None, noise_std: float | None = None,
                          noise_known: bool = True, **_: Any) -> SamplingSettings:
        """The sampler settings of a call with these arguments (the others, e.g. ``generator``, are ignored): what a
        calibration records and a run is checked against. ``share_first_call`` is what the run does: the model
        card's default where not given, and off where fewer than two steps are run or the scheduler cannot predict
        the clean sample from a shared call (``predict_original_sample``: a plain diffusers scheduler); likewise
        ``refit_disagreement`` (the card's default where not given) is off for a run given ``noise_std`` 0 (``None``:
        not known here, as for a calibration, which draws its own noise). ``noise_known``: ``False`` for a run asked
        to read its noise std from air that the scan does not have (:attr:`SamplingSettings.noise_known`)."""
        steps = int(num_inference_steps or self.model_card.num_inference_steps)
        share = self.model_card.share_first_call if share_first_call is None else share_first_call
        if refit_disagreement is None:
            refit_disagreement = self.model_card.refit_disagreement
        can_share = hasattr(self.scheduler, "predict_original_sample")  # a plain diffusers scheduler cannot
        return SamplingSettings(self.sampler_name, steps, int(num_samples), float(strength),
                                bool(share) and can_share and max(1, round(strength * steps)) >= 2,
                                bool(refit_disagreement) and (noise_std is None or noise_std > 0), noise_known)

    def _denoise(self, model_input: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The network's output on ``model_input`` ``(B, C, *latent)`` with its conditions ``cond``, in batches of
        ``batch_size``."""
        return torch.cat([self.unet(z.to(self.unet.dtype), t, c)
                          for z, c in zip(model_input.split(batch_size), cond.split(batch_size), strict=True)])

    def plan(self, lr: LRInput, *, target_spacing: Sequence[float] | None = None,
             slice_profile: SliceProfile | None = None, slice_thickness: float | None = None,
             noise_std: float | Literal["auto"] = "auto", num_samples: int = DEFAULT_NUM_SAMPLES,
             volume_index: int | None = None) -> RunPlan:
        """What a call with these arguments would do, found without any sampling (``gen-sr info FILE --model DIR``):
        a :class:`~gen_sr.run_record.RunPlan`, which the call itself prepares from: the acquisition it assumes
        (``acquisition`` in words, ``operator``), the input's resampling if any (:meth:`coarsened`), the output grid,
        the memory it needs (without the samples kept) against what is free, the noise std (given, or read from the
        scan's air with ``noise_std="auto"``; ``None`` where it has none, and then the one read in-plane that the
        interval counts; ``noise_std_estimated`` says which), the calibration its risk map would use
        (:meth:`calibration_for` its settings and output grid) and why it was not made for the run
        (``calibration_mismatch``: :meth:`calibration_mismatch`, ``None`` where it was), and where the input lies
        outside the trained regime. ``slice_profile_from`` and ``slice_thickness_from`` say where the acquisition's
        profile and thickness came from (:meth:`resolved_slices`). It warns of nothing: the call does."""
        return self._prepare_run(self.as_volume(lr, volume_index=volume_index), target_spacing=target_spacing,
                                 slice_profile=slice_profile, slice_thickness=slice_thickness, noise_std=noise_std,
                                 num_samples=num_samples)

    def _prepare_run(self, volume: Volume, *, target_spacing: Sequence[float] | None = None,
                     operator: AcquisitionOperator | None = None, slice_profile: SliceProfile | None = None,
                     slice_thickness: float | None = None, noise_std: float | Literal["auto"] = "auto",
                     num_samples: int = DEFAULT_NUM_SAMPLES, num_inference_steps: int | None = None,
                     strength: float = 1.0, share_first_call: bool | None = None,
                     refit_disagreement: bool | None = None, keep_samples: bool = False,
                     for_call: bool = False) -> RunPlan:
        """The :class:`~gen_sr.run_record.RunPlan` of a call on ``volume`` with these arguments (see
        :meth:`__call__`), shared by the call and :meth:`plan`: the setup (:meth:`_setup`), the normalisation, the
        noise std, the sampler settings, their calibration and why it does not hold, the noise read in-plane where
        the noise std is not known, and where the input lies outside the trained regime. ``for_call``: first refuse
        an output grid that cannot fit in memory (:meth:`check_memory`, before the noise std is read), and warn
        where the calibration was not made for these settings or grid (:meth:`calibration_for`; the call's other
        warnings are :meth:`_warn_run`'s)."""
        given, canon, operator, axes, gain, sources = self._setup(volume, target_spacing, operator, slice_profile,
                                                                  slice_thickness)
        norm = self.intensity_normalization(canon.data)
        if for_call:
            self.check_memory(operator.hr_shape, num_samples, keep_samples, volume.source)
        std = resolve_noise_std(given, noise_std, gain)  # once every setting is known to work
        settings = self.sampling_settings(num_samples=num_samples, num_inference_steps=num_inference_steps,
                                          strength=strength, share_first_call=share_first_call,
                                          refit_disagreement=refit_disagreement, noise_std=std or 0.0,
                                          noise_known=std is not None)
        grid = min(operator.hr_spacing)
        calibration = self.calibration_for(settings, warn=for_call, grid_spacing=grid)
        return RunPlan(
            given=given, canon=canon, operator=operator, axes=tuple(axes), noise_gain=gain,
            slice_profile_from=sources["slice_profile_from"], slice_thickness_from=sources["slice_thickness_from"],
            normalization=norm, noise_std=std, noise_std_estimated=noise_std == "auto",
            noise_std_in_plane=None if std is not None else estimate_noise_std(canon.data, axes[0]),
            settings=settings, calibration=calibration,
            calibration_mismatch=self.calibration_mismatch(calibration, settings, canon, grid),
            capped_fraction=operator.capped_fraction(),
            outside_training=tuple(self.outside_training(canon, operator, norm, axes)),
            memory_bytes=self.memory_estimate(operator.hr_shape, num_samples, keep_samples),
            memory_available_bytes=_available_memory(self.device))

    def _warn_run(self, plan: RunPlan, *, calibration_region: bool) -> None:
        """A call's warnings about its plan, in this order: a noise std that could not be read from air, a per-scan
        calibration used on another scan (the other reasons a calibration does not hold were warned of by
        :meth:`calibration_for`), a calibration fitted per region used without its region (``calibration_region``:
        whether one was given), an interval whose noise term counts no noise, slices fitted only partially for want
        of a noise std, and each way the input lies outside the trained regime."""
        calibration, noise_std = plan.calibration, plan.noise_std or 0.0
        if not plan.noise_known:
            _warn_noise_unknown(plan.given.source, calibration is not None and calibration.for_unknown_noise,
                                plan.noise_std_in_plane)
        if plan.calibration_mismatch == "scan":
            warnings.warn(f"the model was adapted and calibrated on {self.model_card.adapted.source}, not on this "
                          f"scan: its risk map's coverage does not hold here; {MISMATCH_WORDING['scan'].advice}",
                          CalibrationMismatchWarning, stacklevel=4)
        if not calibration_region and calibration is not None and calibration.outside_scale is not None:
            warnings.warn("the calibration has a scale per region (fitted with a calibration region) but no "
                          "calibration_region was given: the larger scale holds everywhere; pass the same mask "
                          "(--calibration-region)", stacklevel=4)
        if calibration is not None and calibration.shape.noise_floor > 0 and plan.interval_noise_std == 0:
            warnings.warn("the calibrated interval has a noise term but noise_std is 0: the risk map leaves the "
                          "measurement noise out; pass the input's noise std (--noise-std)", stacklevel=4)
        if noise_std == 0 and plan.capped_fraction > 0:
            warnings.warn(f"the slices measure {plan.capped_fraction:.0%} of their components so weakly (they "
                          "overlap, or are under two output voxels thick) that an exact fit would multiply the noise "
                          "there: those are fitted only partially; pass the input's noise std (--noise-std) for a "
                          "noise-aware fit", stacklevel=4)
        for message in plan.outside_training:
            warnings.warn(f"outside the trained regime: {message}", OutsideTrainingWarning, stacklevel=4)

    def time_estimate(self, lr: LRInput, *, target_spacing: Sequence[float] | None = None,
                      slice_profile: SliceProfile | None = None, slice_thickness: float | None = None,
                      num_samples: int = DEFAULT_NUM_SAMPLES, noise_std: float | Literal["auto"] = "auto",
                      volume_index: int | None = None, probe_thickness: int = 8) -> TimeEstimate:
        """How long a call with these arguments would take on this machine (``gen-sr info FILE --model DIR --time``):
        a call on the input's central slab ``probe_thickness`` voxels thick across an axis the run does not
        super-resolve (the longest), timed, and scaled by the output voxels. Its samples, steps and settings are
        the call's, so the shared first call and the data consistency are counted as they will be. On the MNI152
        head from 4 mm slices (1 sample, two other jobs on the cores) it gave 338-369 s for a run of 397 s: the
        machine's load moves both. Returns the slab's time and its share of the output voxels, and the estimate
        (:attr:`~gen_sr.run_record.TimeEstimate.seconds`)."""
        given, canon, operator, axes, gain, _ = self._setup(self.as_volume(lr, volume_index=volume_index),
                                                            target_spacing, None, slice_profile, slice_thickness)
        noise_std = resolve_noise_std(given, noise_std, gain) or 0.0  # read on the whole scan, as the call reads it
        across = max((a for a in range(3) if a not in axes), key=lambda a: canon.shape[a])
        start = np.zeros(3, dtype=int)
        start[across] = max(0, (canon.shape[across] - probe_thickness) // 2)
        stop = np.asarray(canon.shape)
        stop[across] = min(stop[across], start[across] + probe_thickness)
        slab = canon.crop(start, stop)
        grid = {"target_spacing": operator.hr_spacing, "slice_profile": slice_profile,
                "slice_thickness": slice_thickness}
        fraction = math.prod(self.output_grid(slab, **grid).shape) / math.prod(operator.hr_shape)
        tic = time.perf_counter()
        self(slab, num_samples=num_samples, noise_std=noise_std, output_type="np", **grid)
        probe = time.perf_counter() - tic
        return TimeEstimate(probe_seconds=probe, probe_fraction=fraction)

    def output_grid(self, lr: LRInput, *, affine: np.ndarray | None = None, lr_spacing: Sequence[float] | None = None,
                    target_spacing: Sequence[float] | None = None, operator: AcquisitionOperator | None = None,
                    slice_profile: SliceProfile | None = None, slice_thickness: float | None = None,
                    volume_index: int | None = None) -> Volume:
        """The HR grid a call with these arguments returns, found without any sampling (e.g. to check a reference
        volume first): a :class:`~gen_sr.volume.Volume` in RAS+ voxel order whose data is a zero-cost placeholder;
        use its ``shape`` and ``affine``."""
        _, canon, operator, _, _, _ = self._setup(self.as_volume(lr, affine, lr_spacing, volume_index),
                                                  target_spacing, operator, slice_profile, slice_thickness)
        placeholder = np.broadcast_to(np.float32(0), tuple(operator.hr_shape))
        return Volume(placeholder, operator.hr_affine(canon.affine), source=canon.source)

    def calibration_mismatch(self, calibration: Calibration | None, settings: SamplingSettings | None, canon: Volume,
                             grid_spacing: float | None) -> Mismatch | None:
        """Why ``calibration`` was not made for a run with these sampler ``settings`` on an input ``canon`` (in RAS+,
        as the run measures it) with an output grid of ``grid_spacing`` mm, or ``None`` where it was (and without a
        calibration): for a per-scan calibration, its scan (:meth:`adapted_on`: ``"scan"``), then its settings and
        grid (:meth:`~gen_sr.risk.Calibration.mismatch`; ``settings`` ``None``: not known, as in a run record written
        before they were, so only the scan is checked). :data:`~gen_sr.risk.MISMATCH_WORDING` says what each
        means."""
        if calibration is None:
            return None
        if not self.adapted_on(canon, calibration):
            return "scan"
        return None if settings is None else calibration.mismatch(settings, grid_spacing)

    def adapted_on(self, canon: Volume, calibration: Calibration | None = None) -> bool:
        """Whether an input (in RAS+, as a run measures it: :meth:`_setup`'s) is the scan the model was adapted and
        calibrated on (:attr:`~gen_sr.model_card.ModelCard.adapted`): the same voxels and geometry
        (:meth:`~gen_sr.volume.Volume.digest`, whatever the file's name; for a card from before the digest was
        recorded, the same shape, and file name where both are known). ``True`` for a model that was not adapted, or
        for a ``calibration`` that is not per-scan (only a per-scan calibration is bound to its scan)."""
        adapted = self.model_card.adapted
        if adapted is None or (calibration is not None and not calibration.per_scan):
            return True
        if adapted.lr_digest is not None:
            return tuple(adapted.lr_shape) == tuple(canon.shape) and adapted.lr_digest == canon.digest()
        named = adapted.source not in ("", "<array>") and canon.source is not None
        return tuple(adapted.lr_shape) == tuple(canon.shape) and (
            not named or Path(adapted.source).name == Path(canon.source).name)

    def _setup(self, volume: Volume, target_spacing: Sequence[float] | None, operator: AcquisitionOperator | None,
               slice_profile: SliceProfile | None, slice_thickness: float | None
               ) -> tuple[Volume, Volume, AcquisitionOperator, tuple[int, ...], float, dict[str, str]]:
        """What a call on ``volume`` with these arguments measures, shared by :meth:`__call__`, :meth:`plan`,
        :meth:`time_estimate` and :meth:`output_grid`: the input in RAS+ as given; as the run measures it
        (:meth:`coarsened`: the same object where it is not resampled); the acquisition on its HR grid
        (:meth:`operator_for`); the RAS+ axes it super-resolves (:meth:`input_axes`, from the ``operator`` given, if
        any); the factor by which the resampling scales its noise std; and where the slices' profile and
        thickness came from (:meth:`resolved_slices`)."""
        given = volume.canonical()
        canon, target, gain = self.coarsened(given, target_spacing, operator)
        axes = self.input_axes(canon, operator)
        operator, sources = self._acquisition(canon, operator, target, slice_profile, slice_thickness)
        return given, canon, operator, axes, gain, sources

    def coarsened(self, canon: Volume, target_spacing: Sequence[float] | None,
                  operator: AcquisitionOperator | None = None) -> tuple[Volume, Sequence[float] | None, float]:
        """An LR input in RAS+ as a run with ``target_spacing`` (in RAS+) measures it. Where the target is coarser than
        the input along an axis the run does not super-resolve (1 mm voxels asked of a 0.45 mm in-plane scan), the
        input is first resampled there by k-space truncation (:func:`~gen_sr.physics.coarsen`: what a coarser matrix
        over the same field of view would have measured), so the model sees the in-plane resolution it was trained
        for and the output grid stays within memory. Returns the input, the target spacing with those axes at the
        resampled grid's (the same field of view, within half a voxel of the one asked) and the factor by which the
        resampling scales the input's noise std (read from its air's spectrum, :func:`~gen_sr.physics.air_noise_gain`:
        a scanner's zero-filled interpolation keeps its noise; white noise, or a scan without air, the kept share
        of k-space); without a coarser target, or with an ``operator``, the input and target as given and 1. Without
        a target, the default one (:meth:`default_target_spacing`) decides. The resampling and the factor are
        computed once for each input and grid, however often it is asked (:data:`_INPUTS`)."""
        wanted = None if operator is not None else self.coarser_grid(canon, target_spacing)
        if wanted is None:
            return canon, target_spacing, 1.0
        out, white = _coarsened_input(canon, wanted)
        read = _INPUTS.get(canon, ("air_noise_gain", coarsening(canon, wanted)), lambda: air_noise_gain(canon, out))
        gain = read or white  # a zero-filled interpolation keeps its noise
        asked = self.default_target_spacing(canon, self.input_axes(canon)) if target_spacing is None else target_spacing
        resampled = zip(asked, wanted, canon.spacing, out.spacing, strict=True)
        target = [r if w > s else float(t) for t, w, s, r in resampled]
        return out, target, gain

    def coarser_grid(self, canon: Volume, target_spacing: Sequence[float] | None = None) -> list[float] | None:
        """The spacing :meth:`coarsened` resamples an LR input in RAS+ onto for ``target_spacing`` (its own along the
        axes the run super-resolves, the target's along the others), or ``None`` where the target is nowhere coarser
        than the input and the input is used as it is: the check alone, without resampling."""
        if target_spacing is not None and len(target_spacing) != 3:
            raise InputError(f"target spacing needs 3 values, got {list(target_spacing)}", canon.source)
        axes = self.input_axes(canon)
        asked = self.default_target_spacing(canon, axes) if target_spacing is None else target_spacing
        wanted = [s if a in axes else float(t) for a, (t, s) in enumerate(zip(asked, canon.spacing, strict=True))]
        return wanted if coarser_axes(canon.spacing, wanted) else None

    def default_target_spacing(self, canon: Volume, axes: Sequence[int]) -> list[float]:
        """The HR spacing of a run given none, for an LR input in RAS+ super-resolved along ``axes``: each other axis
        at the input's spacing, but no finer than the finest in-plane spacing the model was trained for (its card's
        ``in_plane_spacing``, where a finer one lies outside it: :meth:`coarsened` then resamples the input), and
        each super-resolved axis at the finest of those (isotropic voxels)."""
        target = np.asarray(canon.spacing, dtype=np.float64)
        others = [a for a in range(3) if a not in axes]
        trained = self.model_card.in_plane_spacing
        if trained is not None:
            finest = trained[0]
            target[others] = [s if s >= finest * (1 - IN_PLANE_MARGIN) else finest for s in target[others]]
        target[list(axes)] = target[others].min()
        return target.tolist()

    @staticmethod
    def measured_input(lr: Volume, record: RunRecord) -> Volume:
        """The LR input as the run that ``record`` records measured it (in ``lr``'s orientation): ``lr`` itself, or
        where the run coarsened it (:meth:`coarsened`), the same resampling again, so that its operator's LR grid is
        this volume's."""
        if record.coarsened_input is None:
            return lr
        return _coarsened_input(lr.canonical(), record.coarsened_input.to_spacing)[0].reorient(lr.orientation)

    def measured_scan(self, lr: Volume, target_spacing: Sequence[float] | None = None,
                      calibration_region: LRInput | None = None) -> tuple[Volume, float, LRInput | None]:
        """A scan as a run with ``target_spacing`` measures it, in its own orientation: resampled in-plane where the
        target is coarser there (:meth:`coarsened`), so that an adaptation learns from what the run will see (``lr``
        itself otherwise); the factor by which that scales its noise std; and ``calibration_region`` (a mask on the
        scan's grid, :meth:`calibration_region_mask`) on the grid returned."""
        canon = lr.canonical()
        coarse, _, gain = self.coarsened(canon, target_spacing)
        if coarse is canon:
            return lr, 1.0, calibration_region
        if calibration_region is not None:
            inside = self.calibration_region_mask(lr, calibration_region, grid=coarse)
            calibration_region = coarse.with_data(inside.astype(np.float32)).reorient(lr.orientation)
        return coarse.reorient(lr.orientation), gain, calibration_region

    def input_axes(self, canon: Volume, operator: AcquisitionOperator | None = None) -> tuple[int, ...]:
        """The RAS+ axes to super-resolve in an input (in RAS+), the coarser first: the slice axes of ``operator``
        when given, else the input's coarse axes (:meth:`~gen_sr.model_card.ModelCard.axes_for`: the model card's
        axis, or for a model trained on every slice axis the coarse one and a second where it is coarse too)."""
        if operator is None:
            return self.model_card.axes_for(canon.spacing, canon.source)
        sliced = sorted({t.axis for t in operator.transforms if isinstance(t, SliceAcquisition)},
                        key=lambda a: -operator.lr_spacing[a])
        any_axis = self.model_card.trained_for.any_axis
        if len(sliced) > (2 if any_axis else 1):
            raise InputError(f"the operator slices along RAS+ axes {sorted(sliced)}; this model super-resolves "
                             f"{'two axes' if any_axis else 'one axis'} at most", canon.source)
        axes = tuple(sliced) or (self.sr_axis,)
        if not any_axis and axes[0] != self.sr_axis:
            raise InputError(f"the operator slices along RAS+ axis {axes[0]}, but the model super-resolves axis "
                             f"{self.sr_axis}", canon.source)
        return axes

    def operator_for(self, canon: Volume, *, operator: AcquisitionOperator | None = None,
                     target_spacing: Sequence[float] | None = None, slice_profile: SliceProfile | None = None,
                     slice_thickness: float | None = None) -> AcquisitionOperator:
        """The acquisition a call assumes for an LR input in RAS+ (``Volume.canonical()``), on its HR grid: the given
        ``operator``, checked against the input's grid, or the one built from the spacings along the axes
        :meth:`input_axes` chooses (see :meth:`__call__` for the arguments)."""
        return self._acquisition(canon, operator, target_spacing, slice_profile, slice_thickness)[0]

    def _acquisition(self, canon: Volume, operator: AcquisitionOperator | None, target: Sequence[float] | None,
                     profile: SliceProfile | None, thickness: float | None
                     ) -> tuple[AcquisitionOperator, dict[str, str]]:
        """:meth:`operator_for`, and where its slices' profile and thickness came from (:meth:`resolved_slices`;
        ``"operator"`` for both where an ``operator`` is given)."""
        axes = self.input_axes(canon, operator)
        if operator is None:
            profile, thickness, sources = self.resolved_slices(canon, axes, profile, thickness)
            operator = self._operator(canon, axes, target, profile, thickness)
        else:
            sources = {"slice_profile_from": "operator", "slice_thickness_from": "operator"}
        if tuple(operator.lr_shape) != canon.shape:
            raise InputError(f"the operator expects an LR grid {operator.lr_shape}, the input is {canon.shape}",
                             canon.source)
        return operator, sources

    def resolved_slices(self, canon: Volume, axes: Sequence[int], slice_profile: SliceProfile | None = None,
                        slice_thickness: float | None = None
                        ) -> tuple[SliceProfile, float | None, dict[str, str]]:
        """The slice profile and thickness that a run with these arguments assumes for an LR input in RAS+,
        super-resolved along RAS+ ``axes``, and where each came from, as ``{"slice_profile_from": ...,
        "slice_thickness_from": ...}`` (what the run's ``metadata`` and :meth:`plan` record): ``"given"``;
        ``"sidecar"``, the scan's JSON sidecar, for a scan with one stack of slices (``SliceThickness``,
        :func:`~gen_sr.io.sidecar_slice_thickness`; ``SliceProfile``, :func:`~gen_sr.io.sidecar_slice_profile`,
        which raises :class:`~gen_sr.errors.InputError` for a value that is not a profile, and is not read where a
        profile is given); ``"estimated"`` for ``slice_profile="auto"`` (a Gaussian, its thickness estimated from
        the scan); else ``"default"``: a Gaussian profile, and a thickness of ``None`` (the slice spacing)."""
        if slice_profile == "auto":
            return ("gaussian", self._estimated_thickness(canon, axes, slice_thickness),
                    {"slice_profile_from": "estimated", "slice_thickness_from": "estimated"})
        one_stack = len(axes) == 1  # a sidecar describes one stack of slices
        profile_from = thickness_from = "given"
        if slice_profile is None:
            slice_profile = sidecar_slice_profile(canon.source) if one_stack else None
            profile_from = "default" if slice_profile is None else "sidecar"
            if isinstance(slice_profile, tuple):  # samples: do they make a profile?
                try:
                    slice_profile = SliceAcquisition(axis=0, thickness=1.0, profile=slice_profile).profile
                except ValueError as e:
                    raise sidecar_profile_error(canon.source, slice_profile, str(e)) from e
        if slice_thickness is None:
            slice_thickness = sidecar_slice_thickness(canon.source) if one_stack else None
            thickness_from = "default" if slice_thickness is None else "sidecar"
        return (slice_profile or "gaussian", slice_thickness,
                {"slice_profile_from": profile_from, "slice_thickness_from": thickness_from})

    def outside_training(self, canon: Volume, operator: AcquisitionOperator, norm: IntensityNormalization,
                         axes: Sequence[int] | None = None) -> list[str]:
        """Where an LR input (in RAS+), super-resolved along RAS+ ``axes`` (default: :attr:`sr_axis`), lies outside
        what the model card records, one sentence each. With two axes each stage is checked as the model sees
        it: the other super-resolved axis at its HR spacing."""
        axes = (self.sr_axis,) if axes is None else tuple(axes)
        out: list[str] = []
        for axis in axes:
            slices = [t for t in operator.transforms if isinstance(t, SliceAcquisition) and t.axis == axis]
            thickness = slices[0].thickness if slices else float(canon.spacing[axis])
            spacing = [operator.hr_spacing[a] if a in axes and a != axis else s for a, s in enumerate(canon.spacing)]
            out += [m for m in self.model_card.outside_training(spacing, thickness, norm.scale, axis) if m not in out]
        return out

    def memory_estimate(self, hr_shape: Sequence[int], num_samples: int, keep_samples: bool = True) -> int:
        """Bytes of memory a run on an HR grid of ``hr_shape`` needs at its peak, approximately (see
        ``BYTES_PER_VOXEL_AND_SAMPLE``)."""
        voxels = math.prod(int(n) for n in hr_shape)
        return voxels * (BYTES_PER_VOXEL_AND_SAMPLE * num_samples + (4 * num_samples if keep_samples else 0) + 64)

    def check_memory(self, hr_shape: Sequence[int], num_samples: int, keep_samples: bool = True,
                     source: str | None = None) -> None:
        """Refuse, before any work, a run whose output grid cannot fit in the memory available (raises
        :class:`~gen_sr.errors.InputError`)."""
        need, have = self.memory_estimate(hr_shape, num_samples, keep_samples), _available_memory(self.device)
        if have is not None and need > have:
            trained = self.model_card.in_plane_spacing
            raise InputError(
                f"the output grid would be {' x '.join(map(str, hr_shape))} voxels, and {num_samples} samples on it "
                f"need about {format_bytes(need)} of memory; {format_bytes(have)} is available", source,
                "use a coarser --target-spacing" + ("" if trained is None else
                                                    f" (the model was trained for {trained[0]:g}-{trained[1]:g} mm "
                                                    "in-plane; a coarser in-plane target resamples the input there)")
                + ", fewer --samples, or crop the input")

    def intensity_normalization(self, lr_data: np.ndarray) -> IntensityNormalization:
        """The normalisation of an LR input: its robust percentiles, those the model was trained with."""
        return IntensityNormalization.fit(lr_data, *self.model_card.normalize_percentiles)

    def as_volume(self, lr: LRInput, affine: np.ndarray | None = None, spacing: Sequence[float] | None = None,
                  volume_index: int | None = None) -> Volume:
        """An input as a :class:`~gen_sr.volume.Volume`, as :meth:`__call__` reads it (see its ``lr``, ``affine``,
        ``lr_spacing`` and ``volume_index``)."""
        if isinstance(lr, Volume):
            return lr
        if isinstance(lr, str | Path):
            return load_volume(lr, volume_index=volume_index)
        if isinstance(lr, nib.spatialimages.SpatialImage):
            return Volume.from_image(lr, np.asarray(lr.get_fdata(dtype=np.float32)), source="<nibabel image>")
        data = lr.detach().cpu().numpy() if isinstance(lr, torch.Tensor) else np.asarray(lr)
        if data.ndim != 3:
            raise InputError(f"an array input must be 3D, got shape {data.shape}")
        if affine is None and spacing is None:
            raise InputError("an array input needs its geometry: pass affine= or lr_spacing=")
        affine = np.diag([*map(float, spacing), 1.0]) if affine is None else affine  # type: ignore[arg-type]
        return Volume(data.astype(np.float32), affine, source="<array>")

    def calibration_region_mask(self, lr: Volume, region: LRInput, grid: Volume | None = None) -> np.ndarray:
        """A calibration region (a mask on the grid of the input ``lr``, in any form :meth:`as_volume` reads; an
        array in ``lr``'s voxel order; nonzero inside) as a boolean array on ``lr``'s RAS+ grid, or with ``grid``
        on that grid (nearest neighbour; e.g. the output's)."""
        mask = self.as_volume(region, affine=lr.affine)
        if mask.shape != lr.shape or not np.allclose(mask.affine, lr.affine, atol=1e-3):
            raise InputError(f"is {' x '.join(map(str, mask.shape))} voxels, the input {' x '.join(map(str, lr.shape))}"
                             " (or their affines differ): a calibration region is a mask on the input's own grid",
                             mask.source, "give a mask of the thick-slice scan itself, e.g. its brain mask")
        inside = mask.with_data((np.asarray(mask.data) > 0).astype(np.float32)).canonical()
        if grid is not None:
            inside = resample_to(inside, grid, order=0)
        return np.asarray(inside.data) > 0.5

    @staticmethod
    def _generators(generator: torch.Generator | list[torch.Generator] | None, n: int) -> list[torch.Generator]:
        if isinstance(generator, list):
            if len(generator) != n:
                raise ValueError(f"got {len(generator)} generators for {n} samples")
            return generator
        base = generator if generator is not None else torch.Generator().manual_seed(torch.seed() % 2**31)
        seeds = torch.randint(0, 2**31 - 1, (n,), generator=base).tolist()
        return [torch.Generator().manual_seed(s) for s in seeds]

    def _hook(self, guidance: str, tiler: Any, operator: AcquisitionOperator, y: torch.Tensor, guided: list[int],
              batch_size: int, sigma: float, scale: float) -> ProjectionGuidance | GradientGuidance | None:
        if guidance == "projection":
            return ProjectionGuidance(self.vae, tiler, operator, y, guided, batch_size, noise_std=sigma)
        if guidance == "gradient":
            return GradientGuidance(self.vae, tiler, operator, y, guided, batch_size, noise_std=sigma, scale=scale)
        return None

    def _step_kwargs(self, eta: float, hook: Callable | None) -> dict[str, Any]:
        """The optional ``step`` arguments, as far as this scheduler accepts them (the diffusers pattern)."""
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        if hook is not None and "x0_hook" not in accepted:
            raise ValueError(f"{type(self.scheduler).__name__} has no data-consistency hook: use guidance='none', "
                             f"or {DDIMDataConsistencyScheduler.__module__}.{DDIMDataConsistencyScheduler.__name__}")
        kwargs: dict[str, Any] = {"x0_hook": hook} if hook is not None else {}
        if "eta" in accepted:
            kwargs["eta"] = eta
        elif eta > 0:
            warnings.warn(f"{type(self.scheduler).__name__} has no eta: eta={eta:g} is ignored", stacklevel=3)
        if (eta > 0 or getattr(self.scheduler, "stochastic", False)) and "variance_noise" in accepted:
            kwargs["variance_noise"] = None  # drawn per step from the per-sample generators
        return kwargs

    def _operator(self, canon: Volume, axes: Sequence[int], target: Sequence[float] | None, profile: SliceProfile,
                  thickness: float | None) -> AcquisitionOperator:
        """The acquisition along ``axes`` with these slices (:meth:`resolved_slices`) on the HR grid of ``target``."""
        spacing = np.asarray(canon.spacing)
        if target is None:  # each super-resolved axis at the finest spacing of the others (as coarsened() left them)
            target = spacing.copy()
            target[list(axes)] = np.delete(spacing, list(axes)).min()
        if len(target) != 3:
            raise InputError(f"target spacing needs 3 values, got {list(target)}")
        try:
            return operator_from_spacings(target, spacing, lr_shape=canon.shape, slice_axes=list(axes),
                                          profile=profile, slice_thickness=thickness)
        except ValueError as e:
            raise InputError(str(e), canon.source) from e

    def _estimated_thickness(self, canon: Volume, axes: Sequence[int], given: float | None) -> float:
        """``slice_profile="auto"``: the FWHM of a Gaussian profile estimated from the scan's spectra
        (:func:`~gen_sr.slice_profile.estimate_slice_profile`; its shape is not identifiable below the slices'
        Nyquist frequency, so the Gaussian of the same in-band blur stands for any). Remembered per input."""
        if given is not None or len(axes) != 1:
            raise InputError("slice_profile 'auto' estimates the thickness of one coarse axis's slices"
                             + (", so it takes no slice thickness" if given is not None else
                                f"; this input has {len(axes)}"), canon.source,
                             "leave out --slice-thickness, or give the profile" if given is not None else
                             "give the profile and thickness")
        def estimate() -> float:
            try:
                found = estimate_slice_profile(canon, axis=axes[0], shapes=("gaussian",))
            except ValueError as e:
                raise InputError(f"cannot estimate the slice profile: {e}", canon.source,
                                 "give --slice-profile and --slice-thickness") from e
            logger.info("estimated slice profile: %s", found.describe())
            return found.thickness

        return _INPUTS.get(canon, ("slice_thickness", axes[0]), estimate)  # once per scan, as its resampling

    def _stages(self, operator: AcquisitionOperator, axes: Sequence[int],
                slice_normal: int | Sequence[int] | None) -> list[tuple[AcquisitionOperator, int, Any]]:
        """``(operator, axis, slice_normal)`` of each sampling stage: one for one coarse axis; for two, first the
        acquisition along ``axes[0]`` on the grid in between (2D slices across ``axes[1]``, the only planes there
        whose other axis is fine), then the one along ``axes[1]`` on the HR grid, whose composition is
        ``operator`` (:meth:`~gen_sr.physics.AcquisitionOperator.factor`)."""
        if len(axes) == 1:
            return [(operator, axes[0], slice_normal)]
        inner, outer = operator.factor([axes[1]])
        return [(outer, axes[0], axes[1] if self.spatial_dims == 2 else None), (inner, axes[1], slice_normal)]

    @staticmethod
    def default_slice_normal(hr_shape: Sequence[int], axis: int) -> int:
        """The RAS+ axis a 2D model slices across by default when super-resolving RAS+ ``axis`` of a volume of
        ``hr_shape``: the shorter of the other two (the first on a tie), so that slices are as wide as possible."""
        return min((a for a in range(3) if a != axis), key=lambda a: hr_shape[a])

    def _tilers(self, hr_shape: Sequence[int], axis: int, normals: int | Sequence[int] | None,
                patch_size: Sequence[int] | None,
                overlap: float) -> list[SliceTiler] | list[SlicePatchTiler] | list[PatchTiler]:
        """The tilings to sample on: one per slicing plane for 2D models (slices that contain the super-resolved
        RAS+ ``axis``), one patch tiling for 3D models."""
        f = self.tile_multiple
        if self.spatial_dims == 2:
            if normals is None:
                normals = self.default_slice_normal(hr_shape, axis)
            normals = [normals] if isinstance(normals, int) else list(normals)
            bad = [n for n in normals if n == axis or n not in (0, 1, 2)]
            if bad or not normals or len(set(normals)) != len(normals):
                raise ValueError(f"slice_normal must be distinct RAS+ axes other than the super-resolved axis "
                                 f"{axis}, got {normals}")
            if patch_size is not None:
                return [SlicePatchTiler(hr_shape, n, axis, patch_size, overlap, f) for n in normals]
            return [SliceTiler(hr_shape, n, axis, f) for n in normals]
        if patch_size is None:
            patch_size = [min(f * -(-n // f), max(f, 64 // f * f)) for n in hr_shape]
        return [PatchTiler(hr_shape, patch_size, overlap, f)]

    @staticmethod
    def _outputs(canon: Volume, volume: Volume, hr_affine: np.ndarray, norm: IntensityNormalization,
                 mean: torch.Tensor, samples: torch.Tensor | None, std: torch.Tensor, risk: torch.Tensor,
                 dc: torch.Tensor, disagreement: torch.Tensor | None, output_type: str) -> tuple:
        """Denormalise, reorient to the input's axes, and convert to the requested type."""

        def to_input(arr: torch.Tensor) -> Volume:
            return canon.with_data(arr.cpu().numpy().astype(np.float32), hr_affine).reorient(volume.orientation)

        maps = [to_input(norm.inverse(mean[0, 0])), to_input(norm.inverse_scale(std[0, 0])), to_input(risk[0, 0]),
                to_input(norm.inverse_scale(dc[0, 0]))]
        maps += [] if disagreement is None else [to_input(disagreement[0, 0])]
        each = None if samples is None else [to_input(norm.inverse(s[0])) for s in samples]
        affine = maps[0].affine
        if output_type == "np":
            arrays = [m.data for m in maps]
            stacked = None if each is None else np.stack([v.data for v in each])
        elif output_type == "pt":
            arrays = [torch.from_numpy(m.data) for m in maps]
            stacked = None if each is None else torch.stack([torch.from_numpy(v.data) for v in each])
        elif output_type == "nifti":
            arrays = [m.to_nifti() for m in maps]
            stacked = None
            if each is not None:  # samples as the 4th dimension, with the same spatial header
                stacked = nib.Nifti1Image(np.stack([v.data for v in each], axis=-1), affine, header=arrays[0].header)
        else:
            raise ValueError(f"output_type must be 'np', 'pt' or 'nifti', not {output_type!r}")
        mean_out, std_out, risk_out, dc_out, *disagreement_out = arrays
        return mean_out, stacked, std_out, risk_out, dc_out, next(iter(disagreement_out), None), affine


@dataclass
class SharedPrediction:
    """An x0 hook that replaces each sample's clean-sample prediction by one made for all of them, ``x0``
    ``(B, C, *latent)``, and then applies the data-consistency hook ``then`` (if any) to it."""

    x0: torch.Tensor
    then: Callable[[torch.Tensor, Any], torch.Tensor] | None = None

    def __call__(self, x0_hat: torch.Tensor, timestep: Any) -> torch.Tensor:
        return self.x0 if self.then is None else self.then(self.x0, timestep)


def resolve_noise_std(scan: Volume, noise_std: float | Literal["auto"] | None, gain: float = 1.0) -> float | None:
    """The noise std of a call on ``scan`` (the input as given, before any resampling), in input units, on the grid
    the call measures: the one given (``None``: not known), or with ``"auto"`` the one read from the scan's
    background air (:func:`~gen_sr.physics.scan_noise_std`; ``None`` where it has none: not known), times ``gain`` (a
    coarsened grid holds less of it, :meth:`LatentDiffusionSRPipeline.coarsened`). The air is read on the scan as
    given: a resampled air is no longer a magnitude's (Rayleigh), and read 31 % low on a head resampled from 1 to
    1.25 mm. It is read once for each scan, however often it is asked (:data:`_INPUTS`)."""
    std = _INPUTS.get(scan, "scan_noise_std", lambda: scan_noise_std(scan)) if noise_std == "auto" else noise_std
    return None if std is None else std * gain


def _coarsened_input(canon: Volume, spacing: Sequence[float]) -> tuple[Volume, float]:
    """:func:`~gen_sr.physics.coarsen`, computed once for each input and grid (:data:`_INPUTS`): the volume returned
    is the caller's own (its header and source ``canon``'s)."""
    grid = coarsening(canon, spacing)
    if not grid:  # coarsen's answer is the input itself
        return canon, 1.0

    def resample() -> tuple[np.ndarray, np.ndarray, float]:
        out, white = coarsen(canon, spacing)
        return out.data, out.affine, white

    data, affine, white = _INPUTS.get(canon, ("coarsen", grid), resample)
    return canon.with_data(data.copy(), affine.copy()), white


def _warn_noise_unknown(source: str | None, counted: bool, in_plane: float) -> None:
    """The warning of a run asked to read its noise std from air that the scan does not have; ``counted``: whether
    its interval counts ``in_plane``, the noise std read in-plane (``False``: the model has no calibration for such
    runs)."""
    interval = (f"its risk map's interval counts the noise read in-plane ({in_plane:.4g})" if counted
                else "the risk map's calibration for that (made on noise-free slices) under-covers a noisy scan")
    warnings.warn(f"{source or 'the input'} has no background air to read its noise std from (masked, skull-stripped "
                  f"or cropped to the head): its noise std is not known, so its slices are fitted exactly, without "
                  f"one, and {interval}; pass its noise std where known, for a noise-aware fit", NoiseUnknownWarning,
                  stacklevel=5)


def _check_settings(*, eta: float, noise_std: float | str, num_samples: int, batch_size: int, guidance: str,
                    guidance_interval: int, guidance_scale: float, num_inference_steps: int | None,
                    strength: float = 1.0) -> None:
    """Refuse settings that cannot work, before any work (raises ``ValueError``)."""
    for name, value in (("eta", eta), ("noise_std", noise_std), ("guidance_scale", guidance_scale)):
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            also = " (or 'auto')" if name == "noise_std" else ""
            raise ValueError(f"{name} must be a finite number >= 0{also}, got {value!r}")
    for name, count in (("num_samples", num_samples), ("batch_size", batch_size),
                        ("guidance_interval", guidance_interval), ("num_inference_steps", num_inference_steps or 1)):
        if count < 1:
            raise ValueError(f"{name} must be at least 1, got {count}")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if guidance not in ("projection", "gradient", "none"):
        raise ValueError(f"guidance must be 'projection', 'gradient' or 'none', not {guidance!r}")


def _available_memory(device: torch.device) -> int | None:
    """Free memory on ``device`` in bytes (CUDA: free device memory; CPU: ``MemAvailable``), ``None`` if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    """A byte count in binary units, e.g. ``20.4 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PiB"


def _refuse_pickled_weights(folder: Path) -> None:
    """A component stored only as pickled weights (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) is refused for safety,
    with one clear line naming it and the opt-in."""
    if not folder.is_dir():
        return
    for component in ("vae", "unet"):
        sub = folder / component
        if not sub.is_dir() or any(sub.glob("*.safetensors")):
            continue
        pickles = sorted(p.name for ext in ("bin", "pt", "pth", "ckpt") for p in sub.glob(f"*.{ext}"))
        if pickles:
            raise InputError(f"holds pickled weights ({component}/{pickles[0]}) and no safetensors; they were refused "
                             "for safety, as a pickle can run any code when loaded", folder,
                             "convert them to safetensors, or pass --allow-pickle (allow_pickle=True) only for a "
                             "model folder you trust")
