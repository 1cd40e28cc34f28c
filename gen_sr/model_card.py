"""What a model was trained for: one typed record with one set of defaults.

Training writes a :class:`ModelCard` into the model folder (``model_index.json``, key ``model_card``); the
pipeline, the CLI and the evaluation read it as typed fields, never as a dict. It says which RAS+ axis the model
super-resolves and over which acquisitions, how the LR is brought onto the HR grid, how intensities are normalised,
which slab of the training volumes was held out, and the in-plane spacings and intensity ranges the model saw, so
that an input outside them is named in one warning line (:meth:`ModelCard.outside_training`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gen_sr.config import config_from_dict, config_to_dict

__all__ = ["DEFAULT_INFERENCE_STEPS", "AcquisitionRanges", "Holdout", "ModelCard"]

DEFAULT_INFERENCE_STEPS = 50
"""Sampling steps of a diffusion model whose card says nothing else."""
_AXES = "RAS"


@dataclass
class AcquisitionRanges:
    """The acquisitions training pairs are simulated with; each item draws its own.

    Attributes:
        axis: the super-resolved (through-plane) axis, in RAS+ voxel order (2 = inferior-superior).
        thickness: slice thickness range in mm, drawn uniformly.
        gap: range of ``spacing / thickness - 1`` (0 = contiguous, > 0 gaps, < 0 overlaps), drawn uniformly.
        profiles: slice profiles to draw from.
        snr: SNR range (log-uniform); ``None`` for noise-free only.
        noise_free_fraction: fraction of items left noise-free even when ``snr`` is set.
        noise: noise model.
    """

    axis: int = 2
    thickness: tuple[float, float] = (2.0, 6.0)
    gap: tuple[float, float] = (0.0, 0.0)
    profiles: list[Literal["gaussian", "rect"]] = field(default_factory=lambda: ["gaussian"])
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

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {self.num_inference_steps}")

    @property
    def sr_axis(self) -> int:
        """The super-resolved RAS+ axis."""
        return self.trained_for.axis

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, source: str | None = None) -> ModelCard:
        """The card from its JSON form, checked: an unknown key or a wrong type names itself and ``source``."""
        return config_from_dict(cls, dict(raw or {}), source)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples as lists)."""
        return config_to_dict(self)

    def outside_training(self, lr_spacing: Sequence[float], slice_thickness: float,
                         intensity_range: float) -> list[str]:
        """Where an input lies outside what the model was trained for, one sentence each (empty when inside).

        Args:
            lr_spacing: the input's RAS+ voxel spacing in mm.
            slice_thickness: its slice thickness along the super-resolved axis, in mm.
            intensity_range: its robust intensity range (the span between ``normalize_percentiles``).
        """
        out = []
        lo, hi = self.trained_for.thickness
        if not lo * (1 - 1e-3) <= slice_thickness <= hi * (1 + 1e-3):
            out.append(f"slice thickness {slice_thickness:.3g} mm along {_AXES[self.sr_axis]} is outside the "
                       f"trained {lo:g}-{hi:g} mm")
        if self.in_plane_spacing is not None:
            lo, hi = self.in_plane_spacing
            plane = [float(s) for a, s in enumerate(lr_spacing) if a != self.sr_axis]
            if any(not lo * 0.9 <= s <= hi * 1.1 for s in plane):
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
