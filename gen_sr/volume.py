"""NIfTI volumes with exact geometry: loading with clear errors, orientation, normalisation, atomic writing.

A :class:`Volume` is a 3D array with its voxel-to-world affine (voxel *centres*, in mm) and the source header. Work
happens in one canonical orientation (RAS+, :meth:`Volume.canonical`); results go back to the input's orientation
with :meth:`Volume.reorient`. The affine is carried exactly through both, and through every resampling (see
:meth:`gen_sr.physics.AcquisitionOperator.lr_affine`). So are both of the source's transforms, each with its own
code (:meth:`Volume.from_image`, :meth:`Volume.to_nifti`): a reader that prefers the qform places an output where it
places the input, as does one that prefers the sform.

Outputs are written atomically (:func:`save_volume`, through :mod:`gen_sr.io`), so an interrupted run never leaves
a half-written file.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt
from nibabel.affines import apply_affine, voxel_sizes

from gen_sr.errors import InputError
from gen_sr.io import atomic_write, check_output_path

__all__ = [
    "CHECKED_MAPS",
    "IntensityNormalization",
    "Volume",
    "VolumeMemo",
    "covers",
    "load_volume",
    "read_nifti",
    "resample_to",
    "save_maps",
    "save_volume",
    "stored_pixdim",
]

CANONICAL = ("R", "A", "S")


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image with its geometry.

    Attributes:
        data: ``(X, Y, Z)`` array, in voxel order of ``affine``.
        affine: ``(4, 4)`` voxel-index-to-world (mm) matrix; index ``(0, 0, 0)`` is the centre of the first voxel.
        header: the source NIfTI header (units, description, codes), or ``None``.
        source: where the volume came from, for messages.
        sform_to_qform: ``(4, 4)`` world-to-world map from the source's sform to its qform (``qform = sform_to_qform
            @ sform``) where its qform places the image elsewhere (both with nonzero codes); ``None`` where they
            agree or the source has only one. A map between worlds, it holds for every voxel grid: the qform of this
            volume's grid is ``sform_to_qform @ affine``, whatever crop, reorientation or resampling made it.
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None
    source: str | None = None
    sform_to_qform: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise ValueError(f"a Volume holds a 3D array, got shape {self.data.shape}")
        object.__setattr__(self, "affine", np.asarray(self.affine, dtype=np.float64))

    @classmethod
    def from_image(cls, img: nib.spatialimages.SpatialImage, data: np.ndarray, source: str | None = None) -> Volume:
        """A volume of ``data`` (``(X, Y, Z)``, the voxels of ``img``) with ``img``'s affine (nibabel's choice: the
        sform if coded, else the qform) and, for a NIfTI image, its header and, where its qform differs from its
        sform, the map between them (:attr:`sform_to_qform`)."""
        if not isinstance(img.header, nib.Nifti1Header):  # another format's image (NIfTI-2's header is NIfTI-1's)
            return cls(data=data, affine=img.affine, source=source)
        return cls(data=data, affine=img.affine, header=img.header, source=source,
                   sform_to_qform=_sform_to_qform(img.header, img.affine, data.shape[:3]))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing in mm along each voxel axis (exact for oblique affines)."""
        return tuple(float(v) for v in voxel_sizes(self.affine))  # type: ignore[return-value]

    @property
    def orientation(self) -> tuple[str, str, str]:
        """Closest anatomical axis codes, e.g. ``('R', 'A', 'S')``."""
        return nib.aff2axcodes(self.affine)  # type: ignore[return-value]

    def with_data(self, data: np.ndarray, affine: np.ndarray | None = None) -> Volume:
        """A volume with new voxels (and optionally a new affine), keeping header and source."""
        return replace(self, data=data, affine=self.affine if affine is None else affine)

    def crop(self, start: Sequence[int], stop: Sequence[int]) -> Volume:
        """The box ``start <= index < stop`` (voxel indices per axis), with the affine that keeps it in place."""
        start = [int(a) for a in start]
        data = self.data[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))]
        affine = self.affine.copy()
        affine[:3, 3] = apply_affine(self.affine, np.asarray(start, dtype=float))
        return self.with_data(np.ascontiguousarray(data), affine)

    def world_coordinates(self) -> np.ndarray:
        """``(X, Y, Z, 3)`` world position (mm) of every voxel centre."""
        idx = np.stack(np.meshgrid(*[np.arange(n) for n in self.shape], indexing="ij"), axis=-1)
        return apply_affine(self.affine, idx)

    def reorient(self, axcodes: Sequence[str]) -> Volume:
        """The same image with voxel axes permuted/flipped to the given axis codes. World geometry is unchanged."""
        transform = ornt.ornt_transform(ornt.io_orientation(self.affine), ornt.axcodes2ornt(tuple(axcodes)))
        data = np.ascontiguousarray(ornt.apply_orientation(self.data, transform))
        affine = self.affine @ ornt.inv_ornt_aff(transform, self.shape)
        return self.with_data(data, affine)

    def canonical(self) -> Volume:
        """This volume in RAS+ voxel order, the orientation all processing uses."""
        return self.reorient(CANONICAL)

    def digest(self) -> str:
        """The SHA-256 of this volume's voxels (as float32) and geometry (its affine to 1e-6 mm): whether two volumes
        are the same scan, whatever their file names (e.g. the scan an adapted model was calibrated on)."""
        digest = hashlib.sha256(np.asarray(self.shape, dtype=np.int64).tobytes())
        digest.update((np.round(np.asarray(self.affine, dtype=np.float64), 6) + 0.0).tobytes())  # -0.0 as 0.0
        digest.update(np.ascontiguousarray(self.data, dtype=np.float32).tobytes())
        return digest.hexdigest()

    def axis_to_canonical(self, axis: int) -> int:
        """The canonical (RAS+) voxel axis that this volume's voxel ``axis`` becomes."""
        io = ornt.io_orientation(self.affine)
        return int(ornt.ornt_transform(io, ornt.axcodes2ornt(CANONICAL))[axis, 0])

    def to_nifti(self, dtype: np.dtype | type | None = None) -> nib.Nifti1Image:
        """A NIfTI-1 image with this geometry and the source's transform codes, so that every reader, whichever
        transform it prefers, places it where it places the source.

        The source's sform (or its qform, if it had no sform) is ``affine``; its other transform, carried through
        every change of voxel grid (:attr:`sform_to_qform`), keeps its code, and so does a transform the source did
        not have (code 0, holding ``affine``). A source with neither (or no header) gets ``affine`` as its sform
        (code 2, aligned) and qform (code 1, scanner). The qform can hold no shear: one that would need it (a
        sheared ``affine``, e.g. a registration's output, with no qform of its own) is written with code 0, so that
        readers (nibabel, ITK-SNAP, FSLeyes) take the sform, not the qform's nearest shear-free approximation.
        pixdim is the qform's voxel sizes (``affine``'s where the qform has code 0)."""
        dtype = np.dtype(dtype or (np.float64 if self.data.dtype == np.float64 else np.float32))
        header = self.header.copy() if self.header is not None else nib.Nifti1Header()
        header.set_data_dtype(dtype)
        header.set_slope_inter(None, None)
        header["cal_min"], header["cal_max"] = 0, 0
        if header.get_xyzt_units()[0] == "unknown":
            header.set_xyzt_units(xyz="mm")  # affines here are in mm
        img = nib.Nifti1Image(self.data.astype(dtype, copy=False), self.affine, header=header)
        sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])  # the source's codes
        if not sform_code and not qform_code:  # a source that placed nothing: 'aligned' and 'scanner'
            sform_code, qform_code = 2, 1
        qform = self.affine if self.sform_to_qform is None else self.sform_to_qform @ self.affine
        img.set_sform(self.affine, code=sform_code)
        try:
            img.set_qform(qform, code=qform_code, strip_shears=False)
        except nib.spatialimages.HeaderDataError:  # shears: the qform can only hold their stripped version
            img.set_qform(self.affine, code=0)
            if not sform_code:  # the qform was the only placement: the sform holds it now
                img.set_sform(self.affine, code=qform_code)
        return img


T = TypeVar("T")


class VolumeMemo:
    """Results computed from volumes, kept for the last ``volumes`` volumes asked about, so that several calls on one
    scan (a command's plan, adaptation, run and audit) compute each once. A result is kept under the volume's exact
    voxels (their bytes, shape and dtype) and affine, and a name for what was computed: a volume whose voxels differ
    in any bit, even an array changed in place since, is another volume. Its header and source are not looked at: a
    result must not depend on them. Results are handed out as kept, so keep only ones no caller changes (hand out
    copies of arrays). Looking a volume up costs a SHA-256 of its voxels (0.03 s for 7 million float32 voxels)."""

    def __init__(self, volumes: int = 2) -> None:
        self.volumes = volumes
        self._kept: OrderedDict[str, dict[Hashable, Any]] = OrderedDict()

    def get(self, volume: Volume, what: Hashable, compute: Callable[[], T]) -> T:
        """``compute()``, or its result kept from an earlier call on the same voxels and affine with the same
        ``what``, which names the computation and everything besides ``volume`` that it reads."""
        data = np.ascontiguousarray(volume.data)
        digest = hashlib.sha256(f"{data.dtype.str} {data.shape}".encode())
        digest.update(np.ascontiguousarray(volume.affine, dtype=np.float64))
        digest.update(data)
        key = digest.hexdigest()
        results = self._kept.pop(key, {})
        self._kept[key] = results  # the latest last
        while len(self._kept) > self.volumes:
            self._kept.popitem(last=False)
        if what not in results:
            results[what] = compute()
        return results[what]


# ----------------------------------------------------------------------------------------------------- loading
def resample_to(volume: Volume, target: Volume, order: int = 1) -> Volume:
    """``volume`` on ``target``'s grid (nibabel's ``resample_from_to``; values beyond the source's outermost voxel
    centres repeat the edge). Returned as it is when the grids already match.

    Args:
        volume: the image to resample.
        target: the grid (shape and affine) to resample onto.
        order: spline order (0 nearest, 1 linear).
    """
    if volume.shape == target.shape and np.allclose(volume.affine, target.affine, atol=1e-4):
        return volume
    from nibabel.processing import resample_from_to

    img = resample_from_to(volume.to_nifti(np.float32), (target.shape, target.affine), order=order, mode="nearest")
    return volume.with_data(np.asarray(img.dataobj, dtype=np.float32), target.affine)


def covers(volume: Volume, target: Volume, tolerance: float = 0.5) -> bool:
    """Whether every voxel centre of ``target`` lies inside ``volume``'s field of view (within ``tolerance`` voxels
    of its outermost centres)."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in target.shape], indexing="ij")).reshape(3, -1).T
    index = apply_affine(np.linalg.inv(volume.affine), apply_affine(target.affine, corners))
    return bool(np.all(index >= -tolerance) and np.all(index <= np.asarray(volume.shape) - 1 + tolerance))



def read_nifti(path: str | os.PathLike[str]) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Open a NIfTI file and read its voxels, turning every way it can fail into one :class:`InputError`.

    Returns:
        The image and its voxel array (scaled to real values, any number of dimensions).
    """
    p = Path(path)
    if not p.exists():
        raise InputError("no such file", p)
    if p.is_dir():
        raise InputError("is a directory, not a NIfTI file", p)
    try:
        with nib.imageglobals.LoggingOutputSuppressor():  # nibabel logs (and silently repairs) header problems
            img = nib.load(p)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, ValueError) as e:
        raise InputError("is not a readable NIfTI image", p, "expected a .nii or .nii.gz file") from e
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(f"is a {type(img).__name__}, not NIfTI", p, "convert it to .nii.gz first")
    try:
        data = np.asarray(img.dataobj)
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise InputError("is truncated or corrupt: its voxel data cannot be read", p) from e
    if np.iscomplexobj(data) or data.dtype.fields is not None:
        raise InputError(f"has voxel type {data.dtype}; a real-valued (magnitude) image is needed", p)
    return img, data


def stored_pixdim(path: str | os.PathLike[str], img: nib.Nifti1Image) -> np.ndarray:
    """The voxel sizes ``pixdim[1:4]`` exactly as stored in the header of ``img``, loaded from ``path``
    (nibabel repairs bad ones on load)."""
    with nib.openers.ImageOpener(path) as f:
        header = type(img.header).from_fileobj(f, check=False)
    return np.asarray(header["pixdim"][1:4], dtype=np.float64)


def load_volume(path: str | os.PathLike[str], volume_index: int | None = None) -> Volume:
    """Load a NIfTI file as a :class:`Volume`, checking that it can be processed.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        volume_index: which volume of a 4D series to take. A 4D series with several volumes and no index is refused.

    Raises:
        InputError: not NIfTI or truncated; 2D; 4D without ``volume_index``; zero or negative voxel size;
            NaN/Inf voxels; a constant image.
    """
    img, data = read_nifti(path)
    zooms = stored_pixdim(path, img)
    if np.any(zooms <= 0) or not np.all(np.isfinite(zooms)):
        raise InputError(f"has zero or negative voxel size (pixdim {zooms.tolist()})", path, "fix the header's pixdim")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        n = data.shape[3]
        if volume_index is None:
            raise InputError(f"is a 4D series of {n} volumes", path, f"pick one with --volume N, N in 0..{n - 1}")
        if not 0 <= volume_index < n:
            raise InputError(f"has {n} volumes; --volume {volume_index} is out of range", path, f"use 0..{n - 1}")
        data = data[..., volume_index]
    elif volume_index not in (None, 0):
        raise InputError(f"is not a 4D series; --volume {volume_index} does not apply", path)
    if data.ndim != 3 or min(data.shape) < 2:
        raise InputError(
            f"is not a 3D volume (shape {data.shape})", path, "a volume with at least 2 voxels per axis is needed"
        )
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError("has a degenerate voxel-to-world affine", path, "fix the header's qform/sform")
    data = data.astype(np.float64 if data.dtype == np.float64 else np.float32, copy=False)
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise InputError(f"has {bad} NaN or Inf voxels", path, "replace them, e.g. with 0, before processing")
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        raise InputError(f"is constant (every voxel is {lo:g}); there is nothing to process", path)
    return Volume.from_image(img, data, source=str(path))


def _sform_to_qform(header: nib.Nifti1Header, affine: np.ndarray, shape: Sequence[int],
                    tolerance: float = 1e-3) -> np.ndarray | None:
    """``(4, 4)`` world map from ``header``'s sform to its qform, where both are coded, ``affine`` is the sform, and
    the qform places some corner of the voxel grid of ``shape`` (``(X, Y, Z)``) more than ``tolerance`` mm away
    from where the sform does; else ``None`` (the two agree to float32 rounding, or one is missing)."""
    sform, sform_code = header.get_sform(coded=True)
    qform, qform_code = header.get_qform(coded=True)
    if not (sform_code and qform_code) or not np.allclose(affine, sform, rtol=0, atol=1e-4):
        return None
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1).T
    if np.max(np.linalg.norm(apply_affine(qform, corners) - apply_affine(sform, corners), axis=1)) <= tolerance:
        return None
    return qform @ np.linalg.inv(sform)


# ----------------------------------------------------------------------------------------------------- writing
def save_volume(
    volume: Volume, path: str | os.PathLike[str], *, overwrite: bool = False, dtype: np.dtype | type | None = None
) -> Path:
    """Write a volume as NIfTI, atomically. Float32 unless the data are float64 or ``dtype`` says otherwise."""
    p = check_output_path(path, overwrite)
    img = volume.to_nifti(dtype)
    atomic_write(p, lambda tmp: nib.save(img, tmp))
    return p


CHECKED_MAPS = ("mean", "std")
"""The maps whose digests a run record keeps (:func:`save_maps`): those ``audit --reuse`` is given back and checks."""


def save_maps(like: Volume, maps: Mapping[str, tuple[np.ndarray, np.ndarray, str | os.PathLike[str]]], *,
              overwrite: bool = False) -> dict[str, str]:
    """Write an output's maps on ``like``'s header, each ``{key: (data, affine, path)}`` in the order given (a run
    writes its mean last, so that a mean on disk means its maps are there), and return the :meth:`Volume.digest` of
    each of :data:`CHECKED_MAPS` among them as a reader gets it back (float32 rounding included): what ``audit
    --reuse`` checks a map given to it against. A map is read back as written, not checked as an input is (a
    one-sample run's std is constant 0, and is an output all the same)."""
    digests = {}
    for key, (data, affine, path) in maps.items():
        written = save_volume(like.with_data(data, affine), path, overwrite=overwrite)
        if key in CHECKED_MAPS:
            digests[key] = Volume.from_image(*read_nifti(written)).digest()
    return digests


# ----------------------------------------------------------------------------------------------------- intensity
@dataclass(frozen=True)
class IntensityNormalization:
    """Robust linear intensity normalisation with its exact inverse.

    Maps the ``lower`` percentile to 0 and the ``upper`` percentile to 1, without clipping, so
    ``inverse(normalize(x)) == x``. Record it beside an output to bring results back to the input's units.

    Attributes:
        low: intensity mapped to 0.
        high: intensity mapped to 1.
    """

    low: float
    high: float

    @classmethod
    def fit(
        cls, data: np.ndarray, lower: float = 0.5, upper: float = 99.5, mask: np.ndarray | None = None
    ) -> IntensityNormalization:
        """Fit the percentiles on ``data`` (optionally inside a boolean ``mask``)."""
        values = np.asarray(data)[mask] if mask is not None else np.asarray(data)
        low, high = np.percentile(values, [lower, upper])
        if not high > low:
            low, high = float(values.min()), float(values.max())
        if not high > low:
            raise ValueError("cannot normalise a constant image")
        return cls(float(low), float(high))

    @property
    def scale(self) -> float:
        return self.high - self.low

    def __call__(self, x: Any) -> Any:
        """Normalise an array or tensor."""
        return (x - self.low) / self.scale

    def inverse(self, x: Any) -> Any:
        """Back to the original units."""
        return x * self.scale + self.low

    def inverse_scale(self, x: Any) -> Any:
        """Back to original units for differences, standard deviations and residuals (no offset)."""
        return x * self.scale

    def to_dict(self) -> dict[str, float]:
        return {"low": self.low, "high": self.high}
