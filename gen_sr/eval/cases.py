"""Evaluation cases: HR volumes with a simulated acquisition, the regions a model folder records, and running a
model on them.

One :class:`Case` per HR volume holds the truth, the simulated LR and the exact acquisition operator, so that SR and
baselines land on the HR grid voxel for voxel. The regions (:func:`model_slab`, :func:`heldout_slab`,
:func:`calibration_slabs`, :func:`training_slabs`) are the slabs the model card records; :func:`load_hr_volumes`
reads ``--data`` and cuts it to a ``--region`` as every command and benchmark does. :class:`SRModel` is what
evaluation needs of a pipeline, so that ``eval/`` never imports ``pipelines/``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from gen_sr.data import read_volumes, slab, slab_bounds
from gen_sr.errors import InputError
from gen_sr.eval.metrics import foreground
from gen_sr.model_card import Holdout, ModelCard
from gen_sr.physics import (
    AcquisitionOperator,
    AxisTransform,
    SliceAcquisition,
    SliceProfile,
    coarse_along,
    simulate_acquisition,
)
from gen_sr.risk import Calibration, SamplingSettings
from gen_sr.run_record import RunRecord
from gen_sr.sample_data import load_sample
from gen_sr.volume import IntensityNormalization, Volume

__all__ = ["HELD_OUT_HEAD", "REGIONS", "Case", "SRModel", "SROutput", "balanced_cuts", "calibration_slabs",
           "cases_noise_std", "central_slab", "crop_to_foreground", "has_calibration_slab", "held_out_head",
           "heldout_case", "heldout_slab", "load_hr_volumes", "model_slab", "read_operator_transforms", "simulate_case",
           "simulate_cases", "simulate_cases_at", "super_resolve", "training_slabs"]

Region = Literal["all", "train", "calibration", "heldout"]
REGIONS: tuple[str, ...] = ("all", "train", "calibration", "heldout")


class SROutput(Protocol):
    """What a super-resolution run returns (:class:`gen_sr.pipelines.SRPipelineOutput` is one): volumes on the HR
    grid, ``(X, Y, Z)``, and the run record (as JSON, and typed)."""

    mean: Any
    std: Any
    risk: Any
    dc_residual: Any
    affine: np.ndarray
    metadata: dict[str, Any]

    @property
    def record(self) -> RunRecord: ...


class SRModel(Protocol):
    """What evaluation needs of a super-resolution model (:class:`gen_sr.pipelines.LatentDiffusionSRPipeline` is
    one): its card, its calibrations, and a call on an LR volume."""

    model_card: ModelCard
    calibration: Calibration | None

    @property
    def sr_axis(self) -> int: ...

    def sampling_settings(self, **kwargs: Any) -> SamplingSettings: ...

    def calibration_for(self, settings: SamplingSettings, *, warn: bool = False,
                        grid_spacing: float | None = None) -> Calibration | None: ...

    def __call__(self, lr: Volume, **kwargs: Any) -> SROutput: ...


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


def cases_noise_std(cases: Sequence[Case]) -> float:
    """The largest noise std of ``cases`` (0 for none or noise-free ones): whether runs on them refit the data
    (:meth:`~gen_sr.pipelines.LatentDiffusionSRPipeline.sampling_settings`)."""
    return max((float(c.noise_std) for c in cases), default=0.0)


def simulate_case(hr: Volume, name: str, *, axis: int = 2, thickness: float = 4.0, spacing: float | None = None,
                  profile: SliceProfile = "gaussian", snr: float | None = None, seed: int = 0,
                  transforms: Sequence[AxisTransform] | None = None, check_truth: bool = True) -> Case:
    """Degrade an HR volume with through-plane slices along RAS+ ``axis`` (2: inferior-superior).

    Args:
        hr: any orientation; it is brought to RAS+ first.
        name: the case's label.
        thickness, spacing, profile: the slices (spacing defaults to the thickness).
        snr: Rician noise at this SNR, or ``None`` for noise-free.
        seed: noise seed.
        transforms: any acquisition instead of the slices (axes are RAS+ axes), e.g. the ``transforms`` of an
            operator JSON that ``gen-sr degrade --save-operator`` wrote.

    A volume coarse already along an axis the acquisition slices (a thick-slice scan) is warned about, unless
    ``check_truth`` is off (a scan's own in-plane slice, whose pixels may be anisotropic: the per-scan problems).
    """
    canon = hr.canonical()
    transforms = list(transforms) if transforms is not None else [SliceAcquisition(axis, thickness, spacing, profile)]
    if check_truth:
        _warn_if_coarse(canon, name, transforms)
    lr, operator, sigma = simulate_acquisition(canon, transforms, snr=snr, seed=seed)
    return Case(name, canon, lr, operator, sigma)


def _warn_if_coarse(hr: Volume, name: str, transforms: Sequence[AxisTransform]) -> None:
    """Warn where ``hr`` (RAS+) is coarse already along an axis the acquisition slices
    (:func:`~gen_sr.physics.coarse_along`): a thick-slice scan is no truth to simulate slices from."""
    for axis in sorted({t.axis for t in transforms if isinstance(t, SliceAcquisition)}):
        if coarse := coarse_along(hr, axis):
            warnings.warn(f"{hr.source or name} is already coarse along RAS+ axis {axis} ({coarse}): the slices "
                          "simulated from it blur its own a second time, so figures against it as the truth mean "
                          "little; give high-resolution (near-isotropic) volumes", stacklevel=3)


def heldout_case(pipe: SRModel, hr: Volume, name: str = "held-out slab", *, margin: int = 4, **simulate: Any) -> Case:
    """The slab of ``hr`` that the model folder records as never seen in training, cropped to the foreground's
    bounding box (plus ``margin`` voxels), degraded along the model's axis (``simulate``: see
    :func:`simulate_case`)."""
    return simulate_case(heldout_slab(pipe, hr, margin=margin), name, axis=pipe.sr_axis, **simulate)


def heldout_slab(pipe: SRModel, hr: Volume, *, margin: int = 4) -> Volume:
    """The slab of ``hr`` that the model folder records as never seen in training, in RAS+, cropped to the
    foreground's bounding box plus ``margin`` voxels."""
    return crop_to_foreground(model_slab(pipe, hr, "val"), margin)


def calibration_slabs(pipe: SRModel, hr: Volume, *, pieces: int = 1, margin: int = 4) -> list[tuple[str, Volume]]:
    """The calibration slab that the model folder records (training never saw it; ``data.calibration_fraction``),
    cropped to the foreground, and cut along RAS+ axis 0 (across sagittal slices, which stay whole) into ``pieces``
    parts of equal brain volume, each cropped to its foreground plus ``margin`` voxels. Several pieces let
    ``gen-sr calibrate --interval auto`` check how a calibration transfers between regions (lateral and medial).

    Returns:
        ``(name, volume)`` pairs in RAS+, named by their voxel ranges (``"y139-185 x0-71"``).
    """
    if not has_calibration_slab(pipe):
        raise ValueError("the model folder records no calibration slab (train with data.calibration_fraction > 0)")
    canon, axis = hr.canonical(), _holdout(pipe).axis
    start, stop = _bounds(pipe, canon, "calibration")
    name = f"{'xyz'[axis]}{start[axis]}-{stop[axis] - 1}"
    whole = canon.crop(start, stop)
    start, stop = _foreground_box(whole, margin)
    x = [start[0], *(start[0] + balanced_cuts(foreground(whole.crop(start, stop).data), pieces)), stop[0]]
    out = []
    for a, b in itertools.pairwise(x):
        piece = whole.crop([a, *start[1:]], [b, *stop[1:]])
        out.append((name, piece) if pieces == 1 else (f"{name} x{a}-{b - 1}", crop_to_foreground(piece, margin)))
    return out


def has_calibration_slab(pipe: SRModel) -> bool:
    """Whether the model folder records a calibration slab that training never saw (``data.calibration_fraction``)."""
    holdout = pipe.model_card.holdout
    return holdout is not None and holdout.calibration_fraction > 0


def training_slabs(pipe: SRModel, hr: Volume, *, margin: int = 4) -> list[tuple[str, Volume]]:
    """The training region of ``hr`` (all the model folder records as seen in training) cut into slabs as thick as
    the held-out slab, from its far end backwards, each cropped to the foreground like :func:`heldout_case`; a last
    slab thinner than half that is dropped. Errors there are in-sample: for studying how a calibration transfers
    between regions, not for calibrating (:func:`calibration_slabs`).

    Returns:
        ``(name, volume)`` pairs in RAS+, named by their voxel range along the held-out axis (``"y139-185"``).
    """
    canon, axis = hr.canonical(), _holdout(pipe).axis
    width = canon.shape[axis] - _bounds(pipe, canon, "val")[0][axis]
    slabs, hi = [], _bounds(pipe, canon, "train")[1][axis]
    while hi - width // 2 > 0:
        lo_box, hi_box = [0, 0, 0], list(canon.shape)
        lo_box[axis], hi_box[axis] = max(hi - width, 0), hi
        name = f"{'xyz'[axis]}{lo_box[axis]}-{hi - 1}"
        slabs.append((name, crop_to_foreground(canon.crop(lo_box, hi_box), margin)))
        hi -= width
    return slabs


def model_slab(pipe: SRModel, hr: Volume, split: str) -> Volume:
    """The ``"train"``, ``"calibration"`` or ``"val"`` (held-out) slab of ``hr`` as the model folder records them
    (:func:`gen_sr.data.slab`), in RAS+."""
    holdout = _holdout(pipe)
    return slab(hr, split, holdout.axis, holdout.fraction, holdout.calibration_fraction)


def _bounds(pipe: SRModel, canon: Volume, split: str) -> tuple[list[int], list[int]]:
    holdout = _holdout(pipe)
    return slab_bounds(canon.shape, holdout.axis, holdout.fraction, split, holdout.calibration_fraction)


def _holdout(pipe: SRModel) -> Holdout:
    """The held-out (and calibration) slabs the model folder records."""
    if pipe.model_card.holdout is None:
        raise ValueError("the model folder records no held-out slab")
    return pipe.model_card.holdout


def crop_to_foreground(volume: Volume, margin: int = 4) -> Volume:
    """The bounding box of the foreground (:func:`~gen_sr.eval.metrics.foreground`), plus ``margin`` voxels."""
    return volume.crop(*_foreground_box(volume, margin))


def _foreground_box(volume: Volume, margin: int) -> tuple[np.ndarray, np.ndarray]:
    box = np.argwhere(foreground(volume.data))
    return np.maximum(box.min(0) - margin, 0), np.minimum(box.max(0) + 1 + margin, volume.shape)


HELD_OUT_HEAD = "colin27"
"""The real head that no training, calibration or design choice of the shipped models sees: Colin27, one person
(27 averaged scans, 1 mm, with skull; Debian's mricron-data). The training heads are templates or a reference
head; a single real person, skull included, is the hardest and most honest test of the ones we can ship."""


def held_out_head(name: str = HELD_OUT_HEAD, *, contrast: Literal["t1", "t2like"] = "t1", slab_mm: float = 0.0,
                  slab_axis: int = 1, margin: int | None = None) -> tuple[Volume, np.ndarray]:
    """A real head in RAS+ and its brain mask (its own brain-extracted image, ``<name>_brain``), for measuring.

    Args:
        name: a head of :mod:`gen_sr.sample_data` that has a ``_brain`` version (``colin27``, ``robex``).
        contrast: ``"t1"`` as scanned, or ``"t2like"``: the brain's intensities inverted (CSF bright, white matter
            dark; the skull removed), a crude T2-like contrast.
        slab_mm: cut to a slab this wide through the centre (0: the whole head), to bound the cost.
        slab_axis: the RAS+ axis across the slab (1: coronal, the default; 2 for a coronal-stack acquisition, which
            needs its slices along axis 1).
        margin: crop to the head's bounding box plus this many voxels (``None``: no crop).

    Returns:
        ``(head, brain)``: the volume and a boolean mask on its grid.
    """
    head, brain = load_sample(name).canonical(), load_sample(f"{name}_brain").canonical().data > 0
    if contrast == "t2like":
        norm = IntensityNormalization.fit(head.data[brain])
        head = head.with_data(np.where(brain, np.clip(1.1 - norm(head.data), 0.05, None), 0).astype(np.float32))
    start, stop = _central_slab(head, slab_mm, slab_axis)
    if margin is not None:
        lo, hi = _foreground_box(head.crop(start, stop), margin)
        start, stop = start + lo, start + hi
    box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    return head.crop(start, stop), brain[box]


def central_slab(volume: Volume, slab_mm: float, axis: int = 1) -> Volume:
    """A volume in RAS+ cut to a slab ``slab_mm`` wide across RAS+ ``axis`` (1: coronal) through its centre (0:
    the whole volume), to bound the cost of super-resolving it."""
    canon = volume.canonical()
    return canon.crop(*_central_slab(canon, slab_mm, axis))


def _central_slab(canon: Volume, slab_mm: float, axis: int) -> tuple[np.ndarray, np.ndarray]:
    start, stop = np.zeros(3, int), np.asarray(canon.shape)
    if slab_mm > 0:
        width = min(canon.shape[axis], max(1, round(slab_mm / canon.spacing[axis])))
        start[axis] = canon.shape[axis] // 2 - width // 2
        stop[axis] = start[axis] + width
    return start, stop


def super_resolve(pipe: SRModel, case: Case, **kwargs: Any) -> SROutput:
    """Run the pipeline on a case with its exact operator and noise level; outputs are on the HR grid."""
    return pipe(case.lr, operator=case.operator, noise_std=case.noise_std, **kwargs)


def balanced_cuts(mask: np.ndarray, parts: int, axis: int = 0) -> np.ndarray:
    """Indices along ``axis`` that cut ``mask`` into ``parts`` slabs holding equal numbers of mask voxels, as nearly
    as whole slices allow (for ``np.split``; duplicates dropped, so a small mask may give fewer slabs)."""
    counts = np.cumsum(np.moveaxis(mask, axis, 0).reshape(mask.shape[axis], -1).sum(1))
    return np.unique(np.searchsorted(counts, counts[-1] * np.arange(1, parts) / parts, side="right"))


def load_hr_volumes(data: Sequence[str], pipe: SRModel | None = None, region: Region = "all",
                    model: str | Path | None = None, slab_mm: float = 0.0) -> list[tuple[str, Volume]]:
    """``(name, Volume)`` of every HR volume of ``data`` (NIfTI files, folders of them, or sample names such as
    ``"mni152"``: :func:`gen_sr.data.read_volumes`), cut to ``region``: ``"all"``, or the ``"train"``,
    ``"calibration"`` or ``"heldout"`` slab that ``pipe``'s model card records, cropped to the foreground as the
    benchmarks crop it (:func:`model_slab`, :func:`crop_to_foreground`), then to a coronal slab ``slab_mm`` wide
    through the centre (:func:`central_slab`; 0: no cut). ``model`` names the model folder in errors."""
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
    if region != "all":
        holdout = None if pipe is None else pipe.model_card.holdout
        if holdout is None or (region == "calibration" and holdout.calibration_fraction <= 0):
            what = {"heldout": "held-out"}.get(region, region)
            raise InputError(f"the model folder records no {what} slab", model, "use --region all")
    named = read_volumes(data)
    if region != "all":
        split = {"heldout": "val"}.get(region, region)
        named = [(n, crop_to_foreground(model_slab(pipe, v, split))) for n, v in named]  # type: ignore[arg-type]
    if slab_mm > 0:
        named = [(n, central_slab(v, slab_mm)) for n, v in named]
    return named


def read_operator_transforms(path: str | Path, sr_axis: int | None) -> list[AxisTransform]:
    """The acquisition of an operator JSON (``gen-sr degrade --save-operator``'s file, or ``A.to_json()``), checked
    to slice along ``sr_axis`` (RAS+) only, or along any one axis when ``sr_axis`` is ``None`` (a model trained
    for every slice axis)."""
    try:
        d = json.loads(Path(path).read_text())
        d = d.get("operator", d)
        transforms = [AxisTransform.from_dict(t) for t in d["transforms"]]
    except FileNotFoundError:
        raise InputError("does not exist", path) from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"is not an acquisition operator JSON ({e})", path) from None
    sliced = {t.axis for t in transforms if isinstance(t, SliceAcquisition)}
    if len(sliced) != 1 or (sr_axis is not None and sliced != {sr_axis}):
        wanted = "one axis" if sr_axis is None else f"axis {sr_axis}"
        raise InputError(f"slices along RAS+ axes {sorted(sliced)}, but the model super-resolves {wanted}", path)
    return transforms


def simulate_cases(named: Sequence[tuple[str, Volume]], *, axis: int, thickness: float = 4.0,
                   spacing: float | None = None, profile: SliceProfile = "gaussian", snr: float | None = None,
                   seed: int = 0,
                   transforms: Sequence[AxisTransform] | None = None) -> list[Case]:
    """:func:`simulate_case` on every ``(name, volume)``, volume ``i`` with noise seed ``seed + i``; an acquisition
    that does not fit a volume is an :class:`InputError`."""
    try:
        return [simulate_case(v, n, axis=axis, thickness=thickness, spacing=spacing, profile=profile, snr=snr,
                              seed=seed + i, transforms=transforms) for i, (n, v) in enumerate(named)]
    except ValueError as e:  # e.g. slices thicker than a volume
        raise InputError(f"cannot simulate the acquisition: {e}") from e


def simulate_cases_at(named: Sequence[tuple[str, Volume]], snrs: Sequence[float], **kwargs: Any) -> list[Case]:
    """:func:`simulate_cases` at each SNR of ``snrs`` (0: noise-free), the same noise seeds each time; each case
    named ``"<name> (SNR <snr>)"`` or ``"<name> (noise-free)"``. ``kwargs``: as :func:`simulate_cases`' but ``snr``."""
    return [dataclasses.replace(c, name=f"{c.name} ({f'SNR {snr:g}' if snr else 'noise-free'})")
            for snr in snrs for c in simulate_cases(named, snr=snr or None, **kwargs)]
