"""Training data: LR/HR pairs made on the fly with the acquisition operators.

Each item is one HR crop (a 2D slice across the super-resolved axis, or a 3D patch) with its simulated LR
acquisition brought back onto the HR grid by the operator's pseudo-inverse, ``A⁺ y``: the same condition the pipeline
computes from a real LR scan. Acquisition parameters (slice thickness, gap or overlap, profile, SNR) are drawn per
item from configured ranges, so a model does not learn one acquisition only.

Reproducibility: item ``i`` of a split is a pure function of ``(seed, split, i)``; no sampler state exists. A
sequential loader therefore replays exactly the same data order after ``--resume``, on any number of processes.

Held-out data: each volume is cut into slabs along ``holdout_axis``: the training slab, optionally a calibration slab
(``calibration_fraction``), and the held-out slab at the far end. Training items come only from the first slab,
validation items only from the last, so training never sees a single held-out or calibration voxel (2D slices are
taken inside a slab, never across it). The calibration slab is for ``gen-sr calibrate``: conformal calibration needs
errors that are exchangeable with those on new data, and errors on data the model was trained on are not.

All volumes are processed in RAS+ orientation and normalised with their robust percentiles
(:class:`~gen_sr.volume.IntensityNormalization`) before the acquisition is simulated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from monai.transforms import SpatialPad
from scipy import ndimage

from gen_sr.contrast import ContrastRanges, draw_tissue_means, random_remap, randomize_appearance, synthesize_contrast
from gen_sr.errors import InputError
from gen_sr.model_card import AcquisitionRanges
from gen_sr.physics import AcquisitionOperator, SliceAcquisition, add_noise, kept_noise_fraction
from gen_sr.sample_data import SOURCE_NAMES, load_sample, mni152_tissues
from gen_sr.volume import IntensityNormalization, Volume, load_volume

__all__ = [
    "MIN_RECORRUPTION",
    "AcquisitionRanges",
    "DataConfig",
    "SRPairDataset",
    "TrainingVolume",
    "check_crops_hold_a_slice",
    "find_volumes",
    "load_training_volumes",
    "read_volumes",
    "recorrupt",
    "recorrupted_reference_variance",
    "recorruption_alpha",
    "slab",
    "slab_bounds",
    "top_up_noise",
    "training_ranges",
]

_SPLITS = {"train": 0, "val": 1}


@dataclass
class DataConfig:
    """Where training volumes come from and how items are cut from them.

    Attributes:
        paths: HR NIfTI files or folders of them, or sample names (``mni152``, ``colin27``, ``robex``; see
            :func:`read_volumes`); empty for the embedded MNI152 T1 template.
        crop_size: item size in voxels, ``(H, W)`` for 2D (the second entry runs along the super-resolved axis) or
            ``(D, H, W)`` for 3D patches. Smaller volumes are zero-padded.
        slice_normals: for 2D items, the RAS+ axes that slices are taken across (each must differ from the
            acquisition axis): 0 gives sagittal slices, 1 coronal ones.
        holdout_axis: RAS+ axis along which the held-out slab is cut.
        holdout_fraction: size of the held-out slab (the far end of ``holdout_axis``), as a fraction.
        calibration_fraction: size of the calibration slab, next to the held-out slab, as a fraction; 0 for none.
            Training never sees it either; ``gen-sr calibrate`` uses it (see :func:`slab_bounds`).
        normalize_percentiles: robust intensity range mapped to [0, 1].
        condition: how the LR acquisition is brought onto the HR grid as the network condition: ``"cubic"`` or
            ``"linear"`` interpolation between slice centres, or ``"pinv"`` (the operator's pseudo-inverse, its noise
            gain capped: :meth:`~gen_sr.physics.AcquisitionOperator.upsample`; it follows the slice profile but
            shows profile ripples and amplifies noise).
        min_foreground: a crop must have at least this fraction of voxels above 0.1 (normalised); up to 20 draws
            are tried, so background-only crops are rare but possible.
        acquisition: the simulated acquisitions.
        in_plane_spacing: 2D items only: a range of pixel spacings in mm; each slice is resampled to one drawn
            uniformly from it (both axes) before cropping, so that the model sees the in-plane resolutions of
            clinical scans; ``None`` keeps the volumes' own spacing.
        contrast: how often items are given another contrast by a random intensity map
            (:mod:`gen_sr.contrast`), so that the prior is not tied to the training volumes' T1 contrast.
        item_noise_std: the noise std, in normalised units, that the volumes themselves carry per voxel (per-scan
            adaptation: the scan's in-plane slices hold its noise). The simulated acquisition averages it down; each
            LR sample then gets Gaussian noise with the rest of it, so that its noise totals this std, as a real
            acquisition's samples do. 0: none (and ``acquisition.snr`` applies as usual).
        recorrupt: with ``item_noise_std``, pose each pair by :func:`recorrupt` instead (LR noise of the same std,
            independent of the HR target's), so that the target's noise cannot be predicted from the LR: a model then
            learns the clean item's expectation, not one that keeps the measured noise. Where the acquisition averages
            too little for it, the item is topped up as without it.
    """

    paths: list[str] = field(default_factory=list)
    crop_size: tuple[int, ...] = (64, 64)
    slice_normals: list[int] = field(default_factory=lambda: [0, 1])
    holdout_axis: int = 1
    holdout_fraction: float = 0.2
    calibration_fraction: float = 0.0
    normalize_percentiles: tuple[float, float] = (0.5, 99.5)
    condition: Literal["cubic", "linear", "pinv"] = "cubic"
    min_foreground: float = 0.2
    acquisition: AcquisitionRanges = field(default_factory=AcquisitionRanges)
    contrast: ContrastRanges = field(default_factory=ContrastRanges)
    in_plane_spacing: tuple[float, float] | None = None
    item_noise_std: float = 0.0
    recorrupt: bool = False

    def __post_init__(self) -> None:
        if not self.item_noise_std >= 0:
            raise ValueError(f"item_noise_std must be >= 0, got {self.item_noise_std}")
        if len(self.crop_size) not in (2, 3) or min(self.crop_size) < 4:
            raise ValueError(f"crop_size needs 2 or 3 sizes of at least 4, got {self.crop_size}")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if not 0 <= self.calibration_fraction < 1 - self.holdout_fraction:
            raise ValueError(
                f"calibration_fraction must be in [0, 1 - holdout_fraction), got {self.calibration_fraction}")
        if not 0 <= self.holdout_axis <= 2:
            raise ValueError(f"holdout_axis must be 0, 1 or 2, got {self.holdout_axis}")
        fixed_axis_in_plane = self.acquisition.axis in self.slice_normals and not self.acquisition.any_axis
        if fixed_axis_in_plane or not set(self.slice_normals) <= {0, 1, 2}:
            raise ValueError(
                f"slice_normals {self.slice_normals} must be RAS+ axes other than the acquisition axis "
                f"{self.acquisition.axis}"
            )
        spacings = self.in_plane_spacing
        if spacings is not None and (len(self.crop_size) != 2 or not 0 < spacings[0] <= spacings[1]):
            raise ValueError(f"in_plane_spacing must be an increasing pair of positive numbers, for 2D items only; "
                             f"got {self.in_plane_spacing} with crop_size {self.crop_size}")

    @property
    def spatial_dims(self) -> int:
        return len(self.crop_size)


def slab_bounds(shape: Sequence[int], axis: int, fraction: float, split: str = "val",
                calibration_fraction: float = 0.0) -> tuple[list[int], list[int]]:
    """Voxel box ``(start, stop)`` of one slab along ``axis``: from the far end backwards, the held-out slab
    (``"val"``, ``fraction`` of the axis), the calibration slab (``"calibration"``, ``calibration_fraction``; empty when
    0) and the training slab (``"train"``, the rest)."""
    if split not in ("train", "calibration", "val"):
        raise ValueError(f"split must be 'train', 'calibration' or 'val', got {split!r}")
    n = shape[axis]
    held = n - max(1, round(n * fraction))
    cal = held - (round(n * calibration_fraction) if calibration_fraction > 0 else 0)
    lo, hi = {"train": (0, cal), "calibration": (cal, held), "val": (held, n)}[split]
    start, stop = [0, 0, 0], list(shape)
    start[axis], stop[axis] = lo, hi
    return start, stop


def slab(volume: Volume, split: str = "val", axis: int = 1, fraction: float = 0.2,
         calibration_fraction: float = 0.0) -> Volume:
    """One slab of a volume (see :func:`slab_bounds`): the held-out slab (``split="val"``: the part training never
    sees), the calibration slab or the training slab, in RAS+ orientation with its exact geometry.

    Args:
        volume: any orientation; it is brought to RAS+ first, where ``axis`` is counted (1: posterior-anterior).
        split: ``"val"``, ``"calibration"`` or ``"train"``.
        axis, fraction, calibration_fraction: as in :class:`DataConfig` (``holdout_axis``, ``holdout_fraction``,
            ``calibration_fraction``), or as a model folder records them (``ModelCard.holdout``).
    """
    canon = volume.canonical()
    return canon.crop(*slab_bounds(canon.shape, axis, fraction, split, calibration_fraction))


def read_volumes(entries: Sequence[str]) -> list[tuple[str, Volume]]:
    """``(name, Volume)`` for every entry: a sample name (``mni152``, ``colin27``, ``robex``: see
    :mod:`gen_sr.sample_data`), a NIfTI file, or a folder of them (named by file name without the suffix)."""
    out: list[tuple[str, Volume]] = []
    for entry in entries:
        if entry in SOURCE_NAMES:
            out.append((entry, load_sample(entry)))
        else:
            out += [(f.name.removesuffix(".gz").removesuffix(".nii"), load_volume(f)) for f in find_volumes([entry])]
    return out


def find_volumes(paths: Sequence[str]) -> list[Path]:
    """Expand files and folders into a sorted list of NIfTI files; a missing path or an empty folder is an error."""
    found: list[Path] = []
    for entry in paths:
        p = Path(entry)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.name.lower().endswith((".nii", ".nii.gz")))
            if not files:
                raise InputError("folder holds no .nii or .nii.gz files", p)
            found.extend(files)
        elif p.is_file():
            found.append(p)
        else:
            raise InputError("no such data file or folder", p, "check the path (--data, or data.paths in a config)")
    return found


@dataclass
class TrainingVolume:
    """One training volume: ``data`` ``(X, Y, Z)`` float32 in RAS+ voxel order, normalised; its voxel ``spacing``
    in mm; and, where the source has them, tissue probability maps on the same grid (``tissues``,
    ``(K, X, Y, Z)``), from which items can take a synthesised contrast (``data.contrast.synthesis_probability``);
    ``intensity_range`` is the robust range its normalisation mapped to [0, 1], in the volume's own units."""

    data: np.ndarray
    spacing: tuple[float, ...]
    tissues: np.ndarray | None = None
    intensity_range: float = 1.0

    def stack(self) -> np.ndarray:
        """``(1 + K, X, Y, Z)``: the image and its tissue maps, cropped together."""
        return self.data[None] if self.tissues is None else np.concatenate([self.data[None], self.tissues])


def load_training_volumes(cfg: DataConfig) -> list[TrainingVolume]:
    """Load, reorient to RAS+ and normalise every training volume, with the MNI152 template's GM, WM and CSF
    maps where the entry is ``mni152`` (:func:`gen_sr.sample_data.mni152_tissues`) and synthesised contrasts are
    asked for."""
    entries = list(cfg.paths) or ["mni152"]
    out = []
    for name, volume in read_volumes(entries):
        canon = volume.canonical()
        norm = IntensityNormalization.fit(canon.data, *cfg.normalize_percentiles)
        tissues = None
        if name == "mni152" and cfg.contrast.synthesis_probability > 0:
            tissues = np.stack([t.canonical().data for t in mni152_tissues().values()]).astype(np.float32)
        out.append(TrainingVolume(norm(canon.data).astype(np.float32), canon.spacing, tissues, norm.scale))
    check_crops_hold_a_slice(cfg, [v.spacing for v in out])  # before a training run writes anything
    return out


def check_crops_hold_a_slice(cfg: DataConfig, spacings: Sequence[Sequence[float]]) -> None:
    """Refuse crops that may hold no slice along their super-resolved axis, where an item's operator cannot be built.

    The worst case is checked: the largest slice spacing the acquisition ranges draw (the thickest slices with the
    largest gap) across the fewest mm a crop spans along that axis (``crop_size`` voxels of the finest spacing an item
    has there: the finest ``in_plane_spacing``, else the volumes' own ``spacings``, ``(3,)`` each, along every axis an
    item may super-resolve).

    Raises:
        InputError: naming the crop, the voxels and the slice spacing.
    """
    acq = cfg.acquisition
    spacing = acq.thickness[1] * (1.0 + acq.gap[1])
    slices = SliceAcquisition(0, acq.thickness[1], spacing)
    if cfg.spatial_dims == 2 and cfg.in_plane_spacing is not None:
        along = [(cfg.crop_size[1], float(cfg.in_plane_spacing[0]))]
    else:
        if not acq.any_axis:
            axes = [acq.axis]
        elif cfg.spatial_dims == 3:
            axes = [0, 1, 2]
        else:  # either in-plane axis of the slices taken across each normal
            axes = sorted({a for normal in cfg.slice_normals for a in range(3) if a != normal})
        along = [(cfg.crop_size[a] if cfg.spatial_dims == 3 else cfg.crop_size[1], float(s[a]))
                 for s in spacings for a in axes]
    for n, h in along:
        if slices.out_size(n, h) < 1:
            raise InputError(
                f"crop_size {tuple(cfg.crop_size)} holds no slice: {n} voxels of {h:g} mm along the super-resolved "
                f"axis are shorter than the largest slice spacing drawn, {spacing:g} mm (acquisition thickness up to "
                f"{acq.thickness[1]:g} mm, gap up to {acq.gap[1]:g}); use larger crops or thinner slices")


def training_ranges(volumes: Sequence[TrainingVolume], axis: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """What the training volumes span, for the model card: ``(min, max)`` of their in-plane voxel spacing in mm
    (the RAS+ axes other than the super-resolved ``axis``) and of their robust intensity range, in their own units."""
    spacings = [s for v in volumes for a, s in enumerate(v.spacing) if a != axis]
    ranges = [v.intensity_range for v in volumes]
    return (min(spacings), max(spacings)), (min(ranges), max(ranges))


def _resampled_crop(block: np.ndarray, spacing: Sequence[float], target: float, size: Sequence[int],
                    rng: np.random.Generator) -> np.ndarray:
    """A random crop of a 2D block ``(C, a, b)`` sampled at ``target`` mm pixels (cubic B-splines), ``(C, *size)``;
    where it reaches past the block it is 0, as the zero padding of other crops is. Only a window around the crop
    is interpolated, so the cost does not grow with the slice."""
    extent = [c * target / float(s) for c, s in zip(size, spacing, strict=True)]  # source pixels the crop covers
    starts = [float(rng.uniform(0, max(n - e, 0))) for n, e in zip(block.shape[1:], extent, strict=True)]
    margin = 8  # the spline prefilter's reach from the window's cut edges decays below 1e-4 within it
    lo = [max(int(st) - margin, 0) for st in starts]
    hi = [min(int(st + e) + margin + 2, n) for st, e, n in zip(starts, extent, block.shape[1:], strict=True)]
    window = block[:, lo[0]:hi[0], lo[1]:hi[1]]
    axes = [st - a + (np.arange(c) + 0.5) * target / float(s) - 0.5
            for st, a, c, s in zip(starts, lo, size, spacing, strict=True)]
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([ndimage.map_coordinates(channel, grid, order=3, mode="constant", cval=0.0)
                     for channel in window]).astype(np.float32)


MIN_RECORRUPTION = 0.5
"""The least ``α`` :func:`recorrupt` poses a pair with: below it the reference would hold more than twice the
noise std of the item (``sqrt(1 + 1/α²)``)."""


def recorruption_alpha(op: AcquisitionOperator) -> float | None:
    """:func:`recorrupt`'s ``α = sqrt(1/‖a‖² − 1)`` for ``op``, or ``None`` where it is below
    :data:`MIN_RECORRUPTION` (``A`` averages too little to recorrupt with it)."""
    alpha = math.sqrt(max(0.0, 1.0 / kept_noise_fraction(op) - 1.0))
    return alpha if alpha >= MIN_RECORRUPTION else None


def recorrupted_reference_variance(op: AcquisitionOperator) -> float | None:
    """The noise variance of :func:`recorrupt`'s reference, in units of the item's (``1 + 1/α²``), or ``None`` where
    ``op`` cannot be recorrupted with."""
    alpha = recorruption_alpha(op)
    return None if alpha is None else 1.0 + 1.0 / alpha**2


def recorrupt(x: torch.Tensor, op: AcquisitionOperator, sigma: float,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A pair from an item ``x`` ``(1, 1, *S)`` whose voxels carry white Gaussian noise ``n`` of std ``sigma``, whose
    two noises are independent (Recorrupted-to-Recorrupted, Pang et al., CVPR 2021): with ``z ~ N(0, sigma²)`` per
    voxel (seeded from ``rng``), the measurement ``y = A(x + αz)`` and the reference ``x − z/α``. Their noises,
    ``A(n + αz)`` and ``n − z/α``, are uncorrelated (``sigma² − sigma²``) and Gaussian, so independent: what can be
    predicted of the reference from ``y`` is the clean item's. ``α² = 1/‖a‖² − 1`` (:func:`kept_noise_fraction`)
    brings each sample of ``y`` to ``sigma`` exactly, as a real acquisition's; the reference holds
    ``sigma · sqrt(1 + 1/α²)``. Returns ``(y, reference)``, or ``None`` where ``A`` averages too little for it
    (``α`` < :data:`MIN_RECORRUPTION`)."""
    alpha = recorruption_alpha(op)
    if alpha is None:
        return None
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype) * sigma
    return op(x + alpha * z), x - z / alpha


def top_up_noise(y: torch.Tensor, op: AcquisitionOperator, sigma: float,
                  rng: np.random.Generator) -> tuple[torch.Tensor, float]:
    """``y = A x`` of an item ``x`` whose voxels carry white noise of std ``sigma``: ``A`` averaged it to
    ``sigma · ‖a‖`` per sample (``a``: a row of ``A``; the mean over rows is used); add Gaussian noise with the rest,
    ``sigma · sqrt(1 − ‖a‖²)``, so that each sample's noise totals ``sigma``. Returns ``y`` and ``sigma``."""
    extra = sigma * math.sqrt(max(0.0, 1.0 - kept_noise_fraction(op)))
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return y + torch.randn(y.shape, generator=generator, dtype=y.dtype) * extra, sigma


class SRPairDataset(torch.utils.data.Dataset):
    """LR/HR training pairs, simulated on the fly and deterministic per index.

    Args:
        volumes: from :func:`load_training_volumes` (or plain ``(data, spacing)`` pairs).
        cfg: the data config.
        split: ``"train"`` or ``"val"`` (the held-out slab).
        length: number of items (items are generated, so any length works).
        seed: base seed; item ``i`` depends only on ``(seed, split, i)``.

    Items are dicts with:
        ``hr``: ``(1, *crop_size)`` float32, the HR crop.
        ``lr``: ``(1, *crop_size)`` float32, the noisy acquisition ``y`` brought onto the HR grid as
        ``cfg.condition`` says.
        ``thickness``, ``spacing``, ``noise_std``: float tensors, the acquisition drawn for this item.
        ``pixel_spacing``: the HR crop's voxel spacing in mm, one per axis.
    """

    def __init__(
        self,
        volumes: Sequence[TrainingVolume | tuple[np.ndarray, Sequence[float]]],
        cfg: DataConfig,
        split: Literal["train", "val"] = "train",
        length: int = 1000,
        seed: int = 0,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.cfg, self.split, self.length, self.seed = cfg, split, int(length), int(seed)
        records = [v if isinstance(v, TrainingVolume) else TrainingVolume(v[0], tuple(v[1])) for v in volumes]
        check_crops_hold_a_slice(cfg, [v.spacing for v in records])
        self.regions = [(self._region(v.stack()), tuple(v.spacing)) for v in records]
        self.pad = SpatialPad(spatial_size=cfg.crop_size if cfg.spatial_dims == 3 else (*cfg.crop_size,))

    def _region(self, data: np.ndarray) -> np.ndarray:
        """The training slab or the held-out slab of one volume (a view)."""
        cfg = self.cfg
        start, stop = slab_bounds(data.shape[-3:], cfg.holdout_axis, cfg.holdout_fraction, self.split,
                                  cfg.calibration_fraction)
        return data[(..., *(slice(a, b) for a, b in zip(start, stop, strict=True)))]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], i])
        region, spacing = self.regions[int(rng.integers(len(self.regions)))]
        stack, crop_spacing, axis = self._crop(region, spacing, rng)
        crop, contrast = stack[0], self.cfg.contrast
        if len(stack) > 1 and rng.random() < contrast.synthesis_probability:  # a contrast made from the tissue maps
            tissues = dict(enumerate(stack[1:]))
            crop = randomize_appearance(synthesize_contrast(tissues, draw_tissue_means(list(tissues), rng)), rng,
                                        contrast)
        if contrast.remap_probability > 0 and rng.random() < contrast.remap_probability:  # another contrast
            crop = random_remap(crop, rng, monotone=bool(rng.random() >= contrast.nonmonotone_fraction),
                                knots=contrast.knots)
        acq = self.cfg.acquisition
        thickness = float(rng.uniform(*acq.thickness))
        slice_spacing = thickness * (1.0 + float(rng.uniform(*acq.gap)))
        profile = acq.profiles[int(rng.integers(len(acq.profiles)))]
        op = AcquisitionOperator(
            [SliceAcquisition(axis, thickness, slice_spacing, profile)], crop.shape, crop_spacing
        )
        hr = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float64))[None, None]
        sigma = self.cfg.item_noise_std
        pair = recorrupt(hr, op, sigma, rng) if sigma > 0 and self.cfg.recorrupt else None  # noises independent
        if pair is not None:
            (y, hr), noise_std = pair, sigma
        elif sigma > 0:  # the rest of the noise the items carry, as the real acquisition holds it
            y, noise_std = top_up_noise(op(hr), op, sigma, rng)
        else:
            y, noise_std = op(hr), 0.0
            if acq.snr is not None and rng.random() >= acq.noise_free_fraction:
                snr = math.exp(rng.uniform(math.log(acq.snr[0]), math.log(acq.snr[1])))
                generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
                y, noise_std = add_noise(y, snr=snr, kind=acq.noise, generator=generator)
        lr = op.upsample(y, self.cfg.condition)
        return {
            "hr": hr[0].float(),
            "lr": lr[0].float(),
            "thickness": torch.tensor(thickness),
            "spacing": torch.tensor(slice_spacing),
            "pixel_spacing": torch.tensor(crop_spacing, dtype=torch.float64),
            "noise_std": torch.tensor(noise_std),
        }

    def _crop(
        self, region: np.ndarray, spacing: tuple[float, ...], rng: np.random.Generator
    ) -> tuple[np.ndarray, tuple[float, ...], int]:
        """A random crop ``(1 + K, *crop_size)`` of the image and its tissue maps (zero-padded) with enough
        foreground in the image, its spacing, and the acquisition axis within it."""
        for _ in range(20):
            crop, crop_spacing, crop_axis = self._draw_crop(region, spacing, rng)
            if np.mean(crop[0] > 0.1) >= self.cfg.min_foreground:
                break
        return crop, crop_spacing, crop_axis

    def _draw_crop(
        self, region: np.ndarray, spacing: tuple[float, ...], rng: np.random.Generator
    ) -> tuple[np.ndarray, tuple[float, ...], int]:
        cfg, axis = self.cfg, self.cfg.acquisition.axis
        if cfg.spatial_dims == 3:
            if cfg.acquisition.any_axis:
                axis = int(rng.integers(3))
            block, block_spacing, crop_axis = region, spacing, axis
        else:
            normal = cfg.slice_normals[int(rng.integers(len(cfg.slice_normals)))]
            index = [slice(None)] * 4
            index[1 + normal] = int(rng.integers(region.shape[1 + normal]))
            block = region[tuple(index)]  # (C, a, b)
            kept = [a for a in range(3) if a != normal]
            if cfg.acquisition.any_axis:  # the super-resolved direction along either in-plane axis of the slice
                axis = kept[int(rng.integers(2))]
            block_spacing = tuple(spacing[a] for a in kept)
            if kept[1] != axis:  # the acquisition axis runs along the second (W) axis of a 2D item
                block = block.transpose(0, 2, 1)
                block_spacing = block_spacing[::-1]
            if cfg.in_plane_spacing is not None:  # another scanner's in-plane resolution
                target = float(rng.uniform(*cfg.in_plane_spacing))
                return _resampled_crop(block, block_spacing, target, cfg.crop_size, rng), (target, target), 1
            crop_axis = 1
        starts = [int(rng.integers(max(n - c, 0) + 1)) for n, c in zip(block.shape[1:], cfg.crop_size, strict=True)]
        crop = block[(slice(None), *(slice(s, s + c) for s, c in zip(starts, cfg.crop_size, strict=True)))]
        return np.asarray(self.pad(crop)), block_spacing, crop_axis
