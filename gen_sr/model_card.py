"""What a model was trained for: one typed record with one set of defaults.

Training writes a :class:`ModelCard` into the model folder (``model_index.json``, key ``model_card``); the
pipeline, the CLI and the evaluation read it as typed fields, never as a dict. It says which RAS+ axis the model
super-resolves and over which acquisitions, how the LR is brought onto the HR grid, how intensities are normalised,
which slab of the training volumes was held out, and the in-plane spacings and intensity ranges the model saw, so
that an input outside them is named in one warning line (:meth:`ModelCard.outside_training`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gen_sr.config import config_from_dict, config_to_dict
from gen_sr.errors import InputError
from gen_sr.physics import describe_profile

__all__ = ["DEFAULT_INFERENCE_STEPS", "IN_PLANE_MARGIN", "SECOND_COARSE_RATIO", "AcquisitionRanges", "Adaptation",
           "Holdout", "ModelCard"]

DEFAULT_INFERENCE_STEPS = 50
"""Sampling steps of a diffusion model whose card says nothing else."""
SECOND_COARSE_RATIO = 1.5
"""An axis at least this many times coarser than an input's finest is super-resolved too, where the model takes any
slice axis (:meth:`ModelCard.axes_for`): a 1 x 1.2 x 5 mm scan has one coarse axis, a 1 x 3 x 5 mm scan two."""
IN_PLANE_MARGIN = 0.1
"""How far outside a model's trained in-plane spacings (a fraction of the range's ends) an input's may lie before it
counts as outside them (:meth:`ModelCard.outside_training`; the pipeline's default grid resamples a finer input)."""
_AXES = "RAS"


@dataclass
class AcquisitionRanges:
    """The acquisitions training pairs are simulated with; each item draws its own.

    Attributes:
        axis: the super-resolved (through-plane) axis, in RAS+ voxel order (2 = inferior-superior); with
            ``any_axis``, the axis evaluations simulate along by default.
        any_axis: a 2D model trained with the super-resolved direction along either in-plane axis of slices in
            every orientation (``data.slice_normals``): it super-resolves whichever RAS+ axis of an input is coarse
            (axial, coronal or sagittal stacks).
        thickness: slice thickness range in mm, drawn uniformly.
        gap: range of ``spacing / thickness - 1`` (0 = contiguous, > 0 gaps, < 0 overlaps), drawn uniformly.
        profiles: slice profiles to draw from (``"gaussian"``, ``"rect"`` or samples across the slice: see
            :class:`gen_sr.physics.SliceAcquisition`).
        snr: SNR range (log-uniform); ``None`` for noise-free only.
        noise_free_fraction: fraction of items left noise-free even when ``snr`` is set.
        noise: noise model.
    """

    axis: int = 2
    any_axis: bool = False
    thickness: tuple[float, float] = (2.0, 6.0)
    gap: tuple[float, float] = (0.0, 0.0)
    profiles: list[Literal["gaussian", "rect"] | tuple[float, ...]] = field(default_factory=lambda: ["gaussian"])
    snr: tuple[float, float] | None = (20.0, 200.0)
    noise_free_fraction: float = 0.25
    noise: Literal["rician", "gaussian"] = "rician"

    def __post_init__(self) -> None:
        if not 0 <= self.axis <= 2:
            raise ValueError(f"axis must be 0, 1 or 2, got {self.axis}")
        if not 0 < self.thickness[0] <= self.thickness[1]:
            raise ValueError(f"thickness must be an increasing pair of positive numbers, got {self.thickness}")
        if not -0.9 < self.gap[0] <= self.gap[1]:
            raise ValueError(f"gap must be an increasing pair above -0.9, got {self.gap}")
        if self.snr is not None and not 0 < self.snr[0] <= self.snr[1]:
            raise ValueError(f"snr must be an increasing pair of positive numbers, got {self.snr}")
        if not self.profiles:
            raise ValueError("profiles must not be empty")


@dataclass
class Holdout:
    """The slabs of each training volume along ``axis`` (RAS+) that training never saw (see
    :func:`gen_sr.data.slab_bounds`): the held-out slab (``fraction``, at the far end) and, next to it, the
    calibration slab (``calibration_fraction``; 0 for none)."""

    axis: int = 1
    fraction: float = 0.2
    calibration_fraction: float = 0.0


@dataclass
class Adaptation:
    """How a model was fine-tuned on one scan's own in-plane slices (:func:`gen_sr.training.adaptation.adapt`).

    Training pairs were the scan's in-plane slices (across RAS+ ``axis``, its coarse axis), degraded along one
    in-plane axis at a time with the scan's own slices (``slice_thickness``, ``slice_spacing``, ``profile``). The
    in-plane slices ``held_out_slices`` (indices along ``axis`` of the scan in RAS+) were kept out of the fine-tuning:
    they are the per-scan calibration set. The assumption, as in SMORE and ECLARE: the scan's statistics in-plane and
    through-plane are alike, so what holds for the simulated in-plane problem holds for the real one.

    Attributes:
        source: the scan's file (or ``<array>``).
        lr_shape: its shape in RAS+ voxel order.
        lr_digest: the SHA-256 of its voxels and geometry in RAS+ (:meth:`gen_sr.volume.Volume.digest`), which a run
            is checked against (``None`` in cards from before it was recorded: the file name and shape are then).
        axis, slice_thickness, slice_spacing, profile: its coarse axis and slices (``profile``: ``"gaussian"``,
            ``"rect"`` or the user-given samples across the slice).
        held_out_slices: in-plane slices kept out of the fine-tuning.
        steps, batch_size, learning_rate: the fine-tuning (``steps`` 0: none, the pretrained UNet calibrated on the
            scan's held-out slices).
        noise_std: the scan's noise std per voxel (its units) that the simulated slices were brought up to;
            ``noise_estimated``: whether it was estimated from the scan (:func:`gen_sr.physics.estimate_noise_std`);
            ``recorrupted``: whether the pairs were recorrupted with it instead (:func:`gen_sr.data.recorrupt`).
        target_noise_std: the noise std per voxel (its units) that the pairs' truth was taken to hold, as part of
            the diffusion noise (:func:`gen_sr.training.noisy_targets.noisy_target_pair`; 0: taken as clean);
            ``target_noise_estimated``: whether it was estimated from the scan; ``min_timestep``: the first
            timestep the fine-tuning trained at (the noise is at most half the diffusion noise from there on).
        weight_mix: the share of the fine-tuned weights in the UNet, the rest the pretrained ones
            (:func:`gen_sr.training.adaptation.interpolate_weights`); 1: the fine-tuned UNet itself.
        seconds: its wall time.
        train_loss: ``(first, last)`` logged training loss (of the fine-tuning, before any mix).
        heldout_loss: the held-out in-plane diffusion loss ``(before, after)`` the fine-tuning (fixed noise and
            timesteps; the fine-tuned UNet's, before any ``weight_mix``).
        kept: the UNet the model holds: ``"fine-tuned"``, or ``"pretrained"`` where the scan's held-out slices
            showed the pretrained one to be the better (:func:`gen_sr.training.scan_fit.fit_to_scan` with
            ``keep_better``).
        heldout_rmse: ``(pretrained, fine-tuned)``: the RMSE of each one's mean on the held-out slices' simulated
            problems, in the scan's units; ``None`` when they were not compared. ``heldout_reference``: what
            that error was measured against: ``"clean"`` (noise-free problems), ``"noisy"`` (the held-out slices
            with the scan's noise, which the problems share: the per-scan calibration's own problems) or
            ``"recorrupted"`` (:func:`gen_sr.eval.scan_calibration.recorrupted_case`: the noise of problem and
            reference independent).
    """

    source: str = "<array>"
    lr_shape: tuple[int, int, int] = (0, 0, 0)
    lr_digest: str | None = None
    axis: int = 2
    slice_thickness: float = 1.0
    slice_spacing: float = 1.0
    profile: Literal["gaussian", "rect"] | tuple[float, ...] = "gaussian"
    held_out_slices: list[int] = field(default_factory=list)
    steps: int = 0
    batch_size: int = 0
    learning_rate: float = 0.0
    noise_std: float = 0.0
    noise_estimated: bool = False
    recorrupted: bool = False
    target_noise_std: float = 0.0
    target_noise_estimated: bool = False
    min_timestep: int = 0
    weight_mix: float = 1.0
    seconds: float = 0.0
    train_loss: tuple[float, float] | None = None
    heldout_loss: tuple[float, float] | None = None
    kept: Literal["fine-tuned", "pretrained"] = "fine-tuned"
    heldout_rmse: tuple[float, float] | None = None
    heldout_reference: Literal["clean", "noisy", "recorrupted"] | None = None

    def describe(self) -> tuple[str, str]:
        """``(label, text)``: what was done on the scan, in one line (the model card's and the audit card's row)."""
        loss = "" if self.heldout_loss is None else (f"; held-out in-plane loss {self.heldout_loss[0]:.4f} -> "
                                                      f"{self.heldout_loss[1]:.4f}")
        compared = "" if self.heldout_rmse is None else (
            f"; held-out in-plane RMSE {self.heldout_rmse[0]:.4g} pretrained, {self.heldout_rmse[1]:.4g} fine-tuned"
            + (f" ({self.heldout_reference} references)" if self.heldout_reference else ""))
        if self.steps == 0:
            return "calibrated on", (f"{self.source} without fine-tuning ({len(self.held_out_slices)} of its in-plane "
                                     f"slices across RAS+ axis {self.axis})")
        if self.kept == "pretrained":
            return "calibrated on", (f"{self.source}, keeping the pretrained UNet: {self.steps} steps of fine-tuning "
                                     f"on its in-plane slices across RAS+ axis {self.axis} did worse on the slices "
                                     f"held out{compared}{loss}")
        noise = ("" if not self.target_noise_std else f"; its slices' noise (std {self.target_noise_std:.4g}"
                 f"{', estimated' if self.target_noise_estimated else ''}) taken as diffusion noise from timestep "
                 f"{self.min_timestep} on")
        noise += ("" if not self.recorrupted else f"; pairs recorrupted with noise std {self.noise_std:.4g}"
                  f"{', estimated' if self.noise_estimated else ''}")
        noise += ("" if self.weight_mix == 1 else f"; its weights {self.weight_mix:g} fine-tuned, "
                  f"{1 - self.weight_mix:g} pretrained")
        return "adapted on", (f"{self.source} ({self.steps} steps, {self.seconds:.0f} s, on its in-plane slices "
                              f"across RAS+ axis {self.axis}; {len(self.held_out_slices)} slices held out for its "
                              f"calibration{loss}{compared}{noise})")


@dataclass
class ModelCard:
    """What a model was trained for.

    Attributes:
        trained_for: the simulated acquisitions; ``trained_for.axis`` is the super-resolved RAS+ axis.
        in_plane_spacing: ``(min, max)`` voxel spacing in mm of the training volumes across the other two axes;
            ``None`` when not recorded.
        intensity_range: ``(min, max)`` over training volumes of their robust intensity range (the span between
            ``normalize_percentiles``), in the volumes' own units; ``None`` when not recorded.
        condition: how the LR is brought onto the HR grid as the network condition (``"cubic"``, ``"linear"`` or
            ``"pinv"``).
        unet_condition: what the UNet is given of it (see :func:`gen_sr.models.latent_condition`).
        normalize_percentiles: the robust intensity range mapped to [0, 1].
        holdout: the slabs training never saw, or ``None``.
        objective: ``"diffusion"``, or ``"regression"`` (the same UNet trained with L1, sampled in one step).
        num_inference_steps: the default number of sampling steps.
        share_first_call: the default of the pipeline's ``share_first_call``: the first network call is made once
            for all samples (its clean-sample prediction, from pure noise, stands in for every sample's).
        refit_disagreement: the default of the pipeline's ``refit_disagreement``: for runs given a noise std, the
            data are fitted (exactly, up to :data:`~gen_sr.physics.NOISE_GAIN_FLOOR`'s cap on the noise gain) where
            the samples' mean departs from them by more than the noise explains.
        trained_on: the training volumes as the experiment named them (sample names such as ``mni152``, or
            files); empty when not recorded. Quality is measured on heads not in this list.
        adapted: the fine-tuning on one scan (``gen-sr fit``), or ``None`` for a model that was not adapted.
    """

    trained_for: AcquisitionRanges = field(default_factory=AcquisitionRanges)
    in_plane_spacing: tuple[float, float] | None = None
    intensity_range: tuple[float, float] | None = None
    condition: Literal["cubic", "linear", "pinv"] = "cubic"
    unet_condition: Literal["resample", "latent", "both"] = "both"
    normalize_percentiles: tuple[float, float] = (0.5, 99.5)
    holdout: Holdout | None = None
    objective: Literal["diffusion", "regression"] = "diffusion"
    num_inference_steps: int = DEFAULT_INFERENCE_STEPS
    share_first_call: bool = False
    refit_disagreement: bool = False
    trained_on: list[str] = field(default_factory=list)
    adapted: Adaptation | None = None

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {self.num_inference_steps}")

    @property
    def sr_axis(self) -> int:
        """The super-resolved RAS+ axis (with ``trained_for.any_axis``: the default one)."""
        return self.trained_for.axis

    def axis_for(self, lr_spacing: Sequence[float], source: str | None = None) -> int:
        """The RAS+ axis to super-resolve in an input of this RAS+ spacing: its coarse axis, which must be the
        trained one unless the model takes any axis.

        Raises:
            InputError: no axis is coarser than the others, or the coarse axis is not one the model was trained for.
        """
        spacing = [float(s) for s in lr_spacing]
        coarse = max(range(3), key=spacing.__getitem__)
        shown = " x ".join(f"{s:.3g}" for s in spacing)
        if spacing[coarse] <= min(spacing) * (1 + 1e-6):
            raise InputError(f"has no coarse axis (spacing {shown} mm): there are no thick slices to super-resolve",
                             source, "give the thick-slice acquisition, or use it as it is")
        if not self.trained_for.any_axis and coarse != self.sr_axis:
            raise InputError(f"the model super-resolves RAS+ axis {self.sr_axis} ({_AXES[self.sr_axis]}), but the "
                             f"input's coarsest axis is {coarse} ({_AXES[coarse]}) with spacing {shown} mm", source)
        return coarse

    def axes_for(self, lr_spacing: Sequence[float], source: str | None = None) -> tuple[int, ...]:
        """The RAS+ axes to super-resolve in an input of this RAS+ spacing: the coarse axis (:meth:`axis_for`), and
        for a model trained for every slice axis also a second one at least ``SECOND_COARSE_RATIO`` times the finest
        spacing (e.g. 1 x 3 x 5 mm: both 3 and 5 mm are super-resolved, the coarser first).

        Raises:
            InputError: as :meth:`axis_for`.
        """
        coarse = self.axis_for(lr_spacing, source)
        if not self.trained_for.any_axis:
            return (coarse,)
        spacing = [float(s) for s in lr_spacing]
        finest = min(spacing)
        return (coarse, *(a for a in range(3) if a != coarse and spacing[a] >= SECOND_COARSE_RATIO * finest))

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, source: str | None = None) -> ModelCard:
        """The card from its JSON form, checked: an unknown key or a wrong type names itself and ``source``."""
        return config_from_dict(cls, dict(raw or {}), source)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples as lists)."""
        return config_to_dict(self)

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelCard:
        """The card of a model folder, read from its ``model_index.json`` without loading any weights (folders
        written before the card had its own key keep it under ``acquisition``)."""
        index = Path(folder) / "model_index.json"
        try:
            record = json.loads(index.read_text())
        except FileNotFoundError:
            raise InputError("is not a gen_sr model folder (no model_index.json)", folder) from None
        except ValueError as e:
            raise InputError(f"is not readable JSON ({e})", index) from None
        return cls.from_dict(record.get("model_card", record.get("acquisition")), f"{index}: model_card")

    def summary(self) -> list[tuple[str, str]]:
        """What the model was trained for, as labelled rows (``gen-sr info --model``)."""
        t = self.trained_for
        axes = "any RAS+ axis (slices of every orientation)" if t.any_axis else f"RAS+ axis {t.axis} ({_AXES[t.axis]})"
        rows = [("trained on", ", ".join(self.trained_on) or "not recorded"), ("super-resolves", axes),
                ("slice thickness", f"{t.thickness[0]:g}-{t.thickness[1]:g} mm, profiles "
                                    f"{', '.join(map(describe_profile, t.profiles))}"),
                ("slice gap", f"{t.gap[0]:g}-{t.gap[1]:g} x thickness"),
                ("noise", f"{t.noise}, SNR {t.snr[0]:g}-{t.snr[1]:g} ({t.noise_free_fraction:.0%} noise-free)"
                 if t.snr is not None else "none"),
                ("in-plane spacing", "not recorded" if self.in_plane_spacing is None
                 else f"{self.in_plane_spacing[0]:g}-{self.in_plane_spacing[1]:g} mm"),
                ("intensity range", "not recorded" if self.intensity_range is None
                 else f"{self.intensity_range[0]:.4g}-{self.intensity_range[1]:.4g} (robust range of the training "
                      "volumes)"),
                ("condition", f"{self.condition} interpolation of the LR" if self.condition != "pinv"
                 else "pseudo-inverse of the LR, its noise gain capped"),
                ("objective", f"{self.objective}, {self.num_inference_steps} sampling step(s) by default"
                              + (", the first network call shared by all samples" if self.share_first_call else "")
                              + (", refitted to the data where they disagree (with a noise std)"
                                 if self.refit_disagreement else "")),
                ("held out", "not recorded" if self.holdout is None else
                 f"the last {self.holdout.fraction:.0%} along RAS+ axis {self.holdout.axis}"
                 + (f", and {self.holdout.calibration_fraction:.0%} before it for calibration"
                    if self.holdout.calibration_fraction else ""))]
        if self.adapted is not None:
            rows.append(self.adapted.describe())
        return rows

    def outside_training(self, lr_spacing: Sequence[float], slice_thickness: float, intensity_range: float,
                         axis: int | None = None) -> list[str]:
        """Where an input lies outside what the model was trained for, one sentence each (empty when inside).

        Args:
            lr_spacing: the input's RAS+ voxel spacing in mm.
            slice_thickness: its slice thickness along the super-resolved axis, in mm.
            intensity_range: its robust intensity range (the span between ``normalize_percentiles``).
            axis: the RAS+ axis super-resolved (default: :attr:`sr_axis`).
        """
        axis = self.sr_axis if axis is None else axis
        out = []
        lo, hi = self.trained_for.thickness
        if not lo * (1 - 1e-3) <= slice_thickness <= hi * (1 + 1e-3):
            out.append(f"slice thickness {slice_thickness:.3g} mm along {_AXES[axis]} is outside the "
                       f"trained {lo:g}-{hi:g} mm")
        if self.in_plane_spacing is not None:
            lo, hi = self.in_plane_spacing
            plane = [float(s) for a, s in enumerate(lr_spacing) if a != axis]
            if any(not lo * (1 - IN_PLANE_MARGIN) <= s <= hi * (1 + IN_PLANE_MARGIN) for s in plane):
                trained = f"{lo:g} mm" if lo == hi else f"{lo:g}-{hi:g} mm"
                out.append(f"in-plane spacing {' x '.join(f'{s:.3g}' for s in plane)} mm is outside the trained "
                           f"{trained}")
        if self.intensity_range is not None:
            lo, hi = self.intensity_range
            if not lo / 10 <= intensity_range <= hi * 10:
                out.append(f"the intensity range {intensity_range:.4g} is more than 10x away from the trained "
                           f"{lo:.4g}-{hi:.4g} (normalisation removes the scale, but check the input is the magnitude "
                           f"image it should be)")
        return out
