"""Acquisition physics: the MRI forward operator ``A`` with its exact adjoint, pseudo-inverse and projections.

Every acquisition modelled here is *separable*: it acts on each spatial axis independently. Along one axis it is a
small real matrix ``M`` of shape ``(n_out, n_in)``, and the whole operator is the Kronecker product of those matrices,
``A = M_0 ⊗ M_1 (⊗ M_2)``. Everything else follows exactly from the per-axis matrices:

* adjoint: ``Mᵀ`` on every axis;
* singular values: with ``M_a = U_a diag(s_a) V_aᵀ``, the singular values of ``A`` are all products of per-axis singular
  values, so any spectral filter of ``A`` (pseudo-inverse, Tikhonov-regularised inverse) is ``(⊗V) f(S) (⊗U)ᵀ``;
* projection onto ``{x : A x = y}``: ``x + A⁺ (y − A x)``;
* noise-aware soft projection: ``x + Aᵀ (A Aᵀ + λ I)⁻¹ (y − A x)`` with ``λ = (σ_noise / σ_prior)²``.

Two acquisitions are provided, and chains of them compose on each axis by matrix products:

* :class:`SliceAcquisition`, through-plane: slices of a given thickness and centre-to-centre spacing (gaps,
  overlaps and non-integer factors allowed) with a Gaussian (FWHM = thickness), rectangular or user-given profile.
* :class:`KSpaceTruncation`: keep the central frequencies of the centred DFT, optionally windowed (Tukey or
  Hamming). As a real matrix this is a band-limited (sinc) resampler.

Signal model and geometry (tested to 1e-4 mm):

* Positions along an axis are in mm, relative to the centre of the input's first voxel. Voxel *centres* are the
  reference throughout.
* A slice integrates the HR signal, taken as the linear interpolant of the HR voxel values, against its profile.
  That model reproduces linear intensity ramps exactly, so the profile-weighted mean position of the HR voxels a
  slice integrates is exactly that slice's centre, for every slice whose profile lies within the grid. An end slice
  whose profile reaches past the outermost HR voxel centre keeps its whole profile and sees the object continued
  there by the end voxel (``A`` on a crop is ``A`` on the crop edge-padded): nearer to the slice of a head that goes
  on than a truncated profile (``benchmarks/END_SLICES.md``), at the cost of a mean position up to a fraction of a
  millimetre inwards (0.29 mm for 4 mm Gaussian slices every 3 mm on 1 mm voxels).
* A slice's voxel is one slice spacing wide, centred on the slice whatever its thickness (a gap or an overlap lies
  evenly on either side), so ``n`` slices span ``n`` slice spacings: the field of view their NIfTI affine gives.
  The first slice's voxel starts where the input's field of view starts: decimating 1 mm voxels into 4 mm slices
  puts the first slice centre 1.5 mm from the first HR centre, whatever the slice thickness. k-space truncation
  keeps the field of view.
* Going back from an LR grid to an HR one (:func:`operator_from_spacings` with ``lr_shape``), the HR grid covers the
  LR field of view exactly, voxel edge to voxel edge, whenever the HR spacing divides it, up to a tolerance of
  ``1e-4`` HR voxel plus float32 round-off (see :func:`_grid_tol`). Otherwise the HR field of view ends at the
  nearest whole voxel and a :class:`GeometryWarning` states the difference in mm.

Tensors are ``(B, C, H, W)`` for ``spatial_dims=2`` and ``(B, C, D, H, W)`` for ``spatial_dims=3``. The operator is
differentiable, and works on any device and floating dtype; the small matrices are built once in float64 and cast
on first use.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from gen_sr.volume import Volume

__all__ = [
    "CUBIC_MIN_SAMPLES",
    "AcquisitionOperator",
    "AxisTransform",
    "GeometryWarning",
    "KSpaceTruncation",
    "SliceAcquisition",
    "SliceProfile",
    "StructureVisibility",
    "add_noise",
    "coarse_along",
    "coarsen",
    "coarsening",
    "coarser_axes",
    "describe_profile",
    "interpolation_method",
    "kept_noise_fraction",
    "noise_std_for_snr",
    "operator_from_spacings",
    "read_slice_profile",
    "rician_error_moment",
    "simulate_acquisition",
    "structure_visibility",
]

_GAUSS_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
_QUADRATURE_POINTS_PER_VOXEL = 64
_SPACING_RTOL = 1e-6
# Grid-fit tolerance, in HR voxels. A NIfTI sform is float32: each entry carries a relative round-off of up to
# 2^-24 (6e-8), so a spacing read from it (a column norm), and the ratio of two such spacings, are off by up to about
# 1.2e-7 relative; over an axis of n HR voxels that is up to ~1.2e-7 n voxels (6e-5 for n = 512). A field of view
# that fits a whole number of HR voxels to within 1e-4 voxel (plus 2^-21 ≈ 4.8e-7 per voxel, for longer axes) is
# taken as fitting exactly; a real mismatch (a 4.9995 mm header spacing, a non-dividing target) is far larger.
_GRID_TOL = 1e-4
_GRID_TOL_PER_VOXEL = 2.0**-21

NOISE_GAIN_FLOOR = 0.45
"""The ``floor`` of :meth:`AcquisitionOperator.pinv` for fits to measured (noisy) data: the pipeline's projections
without a noise std and its refit. Just below the weakest singular value of slices at spacing = thickness with at
least 1.9 grid voxels per slice (Gaussian 2 mm on 1 mm: 0.47; rect from 1.2 voxels), so those, and slices with gaps,
are fitted exactly; overlapping slices (Gaussian 4 mm at 2 mm spacing: 0.034, a noise gain of 30) are fitted less
closely in the components they measure poorly (``benchmarks/DATA_DISAGREEMENT.md``)."""


def _grid_tol(n_voxels: float) -> float:
    """Tolerance, in HR voxels, on where an axis of ``n_voxels`` HR voxels ends (see ``_GRID_TOL``)."""
    return _GRID_TOL + _GRID_TOL_PER_VOXEL * abs(n_voxels)


class GeometryWarning(UserWarning):
    """The HR grid cannot cover the LR field of view exactly: the target spacing does not divide it."""


@dataclass(frozen=True)
class AxisFactor:
    """One axis of a separable operator: a matrix and the output grid it produces.

    Attributes:
        matrix: ``(n_out, n_in)`` float64 matrix.
        spacing: output voxel spacing in mm.
        first_center: position of the first output voxel centre, in mm from the first input voxel centre.
    """

    matrix: np.ndarray
    spacing: float
    first_center: float

    def then(self, other: AxisFactor) -> AxisFactor:
        """Compose: ``other`` applied after ``self`` (positions add up: both are in mm)."""
        return AxisFactor(
            matrix=other.matrix @ self.matrix,
            spacing=other.spacing,
            first_center=self.first_center + other.first_center,
        )


class AxisTransform:
    """Base class of the per-axis acquisitions. Subclasses are frozen dataclasses with an ``axis`` field."""

    kind: ClassVar[str]
    registry: ClassVar[dict[str, type[AxisTransform]]] = {}
    axis: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        AxisTransform.registry[cls.kind] = cls

    def build(self, n_in: int, spacing_in: float) -> AxisFactor:
        """The matrix and output grid of this acquisition on an input axis of ``n_in`` voxels."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description; :meth:`from_dict` reads it back."""
        d = {"type": self.kind, **asdict(self)}  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> AxisTransform:
        """Build a transform from :meth:`to_dict` output. Unknown types or keys are errors."""
        d = dict(d)
        kind = d.pop("type", None)
        if kind not in AxisTransform.registry:
            raise ValueError(f"unknown acquisition type {kind!r}; known: {sorted(AxisTransform.registry)}")
        cls = AxisTransform.registry[kind]
        known = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)} for acquisition type {kind!r}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


SliceProfile = str | tuple[float, ...]
"""A slice profile: ``"gaussian"``, ``"rect"``, or samples on a uniform grid across the slice (see
:class:`SliceAcquisition`)."""


def describe_profile(profile: SliceProfile) -> str:
    """``"gaussian"``, ``"rect"`` or ``"custom (N samples)"``, for one-line messages."""
    return profile if isinstance(profile, str) else f"custom ({len(profile)} samples)"


def read_slice_profile(path: str | os.PathLike[str]) -> tuple[float, ...]:
    """A user-given slice profile from a text file: numbers separated by spaces, commas or new lines (``#`` starts a
    comment), the profile sampled on a uniform grid from one edge of the slice to the other (e.g. measured on a
    phantom); its extent is the slice thickness. Raises ``ValueError`` (one line) for anything else."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the slice profile {path}: {e}") from None
    tokens = " ".join(line.split("#", 1)[0] for line in text.splitlines()).replace(",", " ").split()
    try:
        values = tuple(float(v) for v in tokens)
    except ValueError:
        raise ValueError(f"{path}: a slice profile file holds numbers only (one profile, uniformly sampled)") from None
    SliceAcquisition(axis=0, thickness=1.0, profile=values)  # checks the samples
    return values


@dataclass(frozen=True)
class SliceAcquisition(AxisTransform):
    """Through-plane slice acquisition along one axis.

    Args:
        axis: spatial axis (0-based, of the spatial dims) the slices are stacked along.
        thickness: slice thickness in mm: the FWHM of a Gaussian profile, the width of a rectangular one, or the
            full extent of a user-given profile.
        spacing: centre-to-centre slice distance in mm; defaults to ``thickness``. Larger values leave gaps,
            smaller ones overlap. Any positive value works, including non-integer multiples of the HR spacing.
        profile: ``"gaussian"``, ``"rect"``, or a sequence of profile samples on a uniform grid spanning
            ``[-thickness/2, thickness/2]`` (linearly interpolated, zero outside).
        first_center: position of the first slice centre in mm from the first HR voxel centre. By default the first
            slice's voxel (``spacing`` wide, centred on the slice) starts at the start of the field of view
            (``spacing/2 − h/2``), so that ``n`` slices span ``n × spacing`` mm, gap or overlap included.

    Each row of the matrix is the whole profile, linearly interpolated between HR voxel centres; a slice whose profile
    reaches past the outermost HR voxel centre (a Gaussian's tails, an overlapping slice's edge) sees the object
    continued there by the end voxel's value: ``A`` on a crop is ``A`` on the crop edge-padded. Rows within the grid
    have their first moment at the slice centre; an end row's lies inwards (0.29 mm for 4 mm Gaussian slices every
    3 mm on 1 mm voxels).
    """

    kind: ClassVar[str] = "slice"
    axis: int
    thickness: float
    spacing: float | None = None
    profile: SliceProfile = "gaussian"
    first_center: float | None = None

    def __post_init__(self) -> None:
        _check_positive("slice thickness", self.thickness)
        if self.spacing is not None:
            _check_positive("slice spacing", self.spacing)
        if isinstance(self.profile, str):
            if self.profile not in ("gaussian", "rect"):
                raise ValueError(
                    f"slice profile must be 'gaussian', 'rect' or a sequence of samples, not {self.profile!r}"
                )
        else:
            values = np.asarray(self.profile, dtype=np.float64)
            valid = values.ndim == 1 and values.size >= 2 and np.all(np.isfinite(values)) and values.min() >= 0
            if not (valid and values.sum() > 0):
                raise ValueError("a user-given slice profile must be >= 2 finite, non-negative samples, not all zero")
            object.__setattr__(self, "profile", tuple(float(v) for v in values))

    @property
    def slice_spacing(self) -> float:
        return self.thickness if self.spacing is None else self.spacing

    def _half_support(self) -> float:
        if self.profile == "gaussian":
            return 4.0 * self.thickness * _GAUSS_FWHM_TO_SIGMA
        return 0.5 * self.thickness

    def _profile(self, u: np.ndarray) -> np.ndarray:
        """Profile value at offsets ``u`` (mm) from the slice centre (unnormalised)."""
        if self.profile == "gaussian":
            sigma = self.thickness * _GAUSS_FWHM_TO_SIGMA
            return np.exp(-0.5 * (u / sigma) ** 2)
        if self.profile == "rect":
            return (np.abs(u) <= 0.5 * self.thickness).astype(np.float64)
        values = np.asarray(self.profile)
        grid = np.linspace(-0.5 * self.thickness, 0.5 * self.thickness, values.size)
        return np.interp(u, grid, values, left=0.0, right=0.0)

    def _first(self, spacing_in: float) -> float:
        if self.first_center is not None:
            return float(self.first_center)
        return max(0.5 * (self.slice_spacing - spacing_in), 0.0)

    def _last_end(self, n_out: int, spacing_in: float) -> float:
        """Where the voxel of the last of ``n_out`` slices ends, in mm from the first HR voxel centre."""
        return self._first(spacing_in) + (n_out - 0.5) * self.slice_spacing

    def out_size(self, n_in: int, spacing_in: float) -> int:
        """Number of slices that ``n_in`` voxels hold: the most slices whose :meth:`hr_size_for` is ``<= n_in``.

        A slice is held when its centre lies within the outermost HR voxel centres and its voxel (one slice spacing
        wide, whatever the thickness) ends less than half an HR voxel past the field of view (so the HR grid that
        holds them is the nearest whole number of voxels; see :meth:`hr_size_for`).
        """
        first, s = self._first(spacing_in), self.slice_spacing
        n = max(0, math.floor((n_in * spacing_in - first - 0.5 * s) / s) + 1)  # within a slice or two
        while n >= 1 and self.hr_size_for(n, spacing_in) > n_in:
            n -= 1
        while self.hr_size_for(n + 1, spacing_in) <= n_in:
            n += 1
        return n

    def hr_size_for(self, n_out: int, spacing_in: float) -> int:
        """The HR axis length that holds ``n_out`` slices (the inverse of :meth:`out_size`).

        The HR field of view ends at the whole voxel nearest to the end of the last slice's voxel (one slice spacing
        wide, whatever the thickness: the field of view is ``n_out`` slice spacings; ties round up), and no earlier
        than the last slice centre. When the HR spacing divides the slices' field of view (to within
        :func:`_grid_tol`, which absorbs float32 affine round-off) the HR grid covers it exactly, edge to edge.
        """
        last = self._first(spacing_in) + (n_out - 1) * self.slice_spacing
        end = self._last_end(n_out, spacing_in) / spacing_in  # in HR voxels from the first HR voxel centre
        tol = _grid_tol(end)
        by_end = math.floor(end + tol) + 1  # the HR field of view ends at n - 0.5: within half a voxel of `end`
        by_center = math.ceil(last / spacing_in + 1 - tol)
        return max(by_end, by_center)

    def hr_fov_mismatch(self, n_out: int, n_in: int, spacing_in: float) -> float:
        """How far (mm) the field of view of ``n_in`` HR voxels ends past that of ``n_out`` slices (the last slice's
        voxel end); negative when it ends before. With the default first slice, both start at the same place."""
        return (n_in - 0.5) * spacing_in - self._last_end(n_out, spacing_in)

    def build(self, n_in: int, spacing_in: float) -> AxisFactor:
        if n_in < 2:
            raise ValueError(f"slice acquisition needs at least 2 voxels along axis {self.axis}, got {n_in}")
        first = self._first(spacing_in)
        n_out = self.out_size(n_in, spacing_in)
        if first < 0 or n_out < 1:
            raise ValueError(
                f"a {self.thickness:g} mm slice every {self.slice_spacing:g} mm does not fit in {n_in} voxels of "
                f"{spacing_in:g} mm along axis {self.axis}"
            )
        centers = first + self.slice_spacing * np.arange(n_out)
        half = self._half_support()
        n_q = max(8, math.ceil(2 * half / spacing_in * _QUADRATURE_POINTS_PER_VOXEL))
        t = (np.arange(n_q) + 0.5) / n_q * 2.0 - 1.0  # midpoint rule on [-1, 1], symmetric about 0
        offsets = np.broadcast_to(half * t, (n_out, n_q))  # (n_out, n_q) mm: every row the whole profile
        weights = self._profile(offsets)
        degenerate = weights.sum(axis=1) <= 0  # a user-given profile too narrow for the quadrature points
        weights[degenerate] = 1.0
        # Distribute each quadrature point to its two neighbouring HR voxels (linear interpolation). A point past the
        # outermost HR voxel centre goes to that voxel: an end slice whose profile reaches beyond the grid sees the
        # object continued by its end voxels (edge replication). Of the ways to treat the unknown object beyond, this
        # came nearest to the slices taken of a head that goes on: 1.4-4.6x less error in the end slices than the
        # profile truncated symmetrically at the outer voxel centres (benchmarks/END_SLICES.md).
        u = np.clip((centers[:, None] + offsets) / spacing_in, 0.0, n_in - 1)
        lo = np.minimum(np.floor(u).astype(np.int64), n_in - 2)
        frac = u - lo
        rows = np.broadcast_to(np.arange(n_out)[:, None], u.shape)
        matrix = np.zeros((n_out, n_in))
        np.add.at(matrix, (rows, lo), weights * (1.0 - frac))
        np.add.at(matrix, (rows, lo + 1), weights * frac)
        matrix /= matrix.sum(axis=1, keepdims=True)
        return AxisFactor(matrix=matrix, spacing=self.slice_spacing, first_center=float(first))


@dataclass(frozen=True)
class KSpaceTruncation(AxisTransform):
    """k-space truncation along one axis: keep the central ``round(n / factor)`` frequencies of the centred DFT.

    The field of view is kept, so the output spacing is ``h · n_in / n_out``. The matrix evaluates the (windowed)
    band-limited interpolant of the input at the output voxel centres; constant images stay constant.

    Args:
        axis: spatial axis (0-based).
        factor: resolution reduction factor (> 1 for a lower resolution; need not be an integer).
        window: ``None`` (sharp cut, i.e. sinc), ``"tukey"`` or ``"hamming"``. Windows stay positive on the kept
            band, so the operator keeps full row rank.
        tukey_alpha: taper fraction of the Tukey window.
    """

    kind: ClassVar[str] = "kspace"
    axis: int
    factor: float
    window: str | None = None
    tukey_alpha: float = 0.5

    def __post_init__(self) -> None:
        _check_positive("k-space truncation factor", self.factor)
        if self.window not in (None, "tukey", "hamming"):
            raise ValueError(f"k-space window must be None, 'tukey' or 'hamming', not {self.window!r}")
        if not 0.0 < self.tukey_alpha <= 1.0:
            raise ValueError(f"tukey_alpha must be in (0, 1], got {self.tukey_alpha}")

    def out_size(self, n_in: int, spacing_in: float) -> int:
        del spacing_in
        return max(1, round(n_in / self.factor))

    def _window(self, freqs: np.ndarray, n_out: int) -> np.ndarray:
        u = np.abs(2.0 * freqs / (n_out + 1))  # < 1 on the kept band
        if self.window == "hamming":
            return 0.54 + 0.46 * np.cos(np.pi * u)
        if self.window == "tukey":
            flat = 1.0 - self.tukey_alpha
            taper = 0.5 * (1.0 + np.cos(np.pi * (u - flat) / self.tukey_alpha))
            return np.where(u <= flat, 1.0, taper)
        return np.ones_like(u)

    def build(self, n_in: int, spacing_in: float) -> AxisFactor:
        n_out = self.out_size(n_in, spacing_in)
        fov = n_in * spacing_in
        out_spacing = fov / n_out
        first = 0.5 * (out_spacing - spacing_in)
        freqs = np.arange(n_out) - n_out // 2  # the centred DFT's central band
        angle_in = 2.0 * np.pi * np.outer(spacing_in * np.arange(n_in), freqs) / fov  # (n_in, n_freq)
        angle_out = 2.0 * np.pi * np.outer(first + out_spacing * np.arange(n_out), freqs) / fov
        window = self._window(freqs, n_out)
        # Real part of the complex resampler, cos(a - b) = cos a cos b + sin a sin b: exact for odd n_out, and it
        # halves the unpaired Nyquist bin for even n_out.
        matrix = (np.cos(angle_out) * window) @ np.cos(angle_in).T + (np.sin(angle_out) * window) @ np.sin(angle_in).T
        matrix /= n_in
        return AxisFactor(matrix=matrix, spacing=out_spacing, first_center=first)


def _apply_along(x: torch.Tensor, matrix: torch.Tensor, dim: int) -> torch.Tensor:
    """Multiply ``matrix`` (m, n) into dimension ``dim`` (size n) of ``x``; that dimension becomes size m."""
    return torch.movedim(torch.movedim(x, dim, -1) @ matrix.T, -1, dim)


@dataclass
class _Spectral:
    """Per-axis SVD ``M = U diag(s) Vᵀ`` as torch tensors on one device and dtype."""

    matrix: torch.Tensor
    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor

    def gain_cap(self, floor: float) -> float:
        """The singular value ``ŝ = floor · √(m / n)`` below which :meth:`AcquisitionOperator.pinv` caps the gain
        (``m`` LR and ``n`` HR voxels: ``√(m / n)`` is a plain average's singular value)."""
        return floor * math.sqrt(self.matrix.shape[0] / self.matrix.shape[1])


@dataclass
class AcquisitionOperator:
    """A separable linear acquisition operator ``A`` from an HR grid to an LR grid.

    Args:
        transforms: per-axis acquisitions, applied in order (several may act on the same axis).
        hr_shape: spatial shape of the HR grid, ``(H, W)`` or ``(D, H, W)``.
        hr_spacing: HR voxel spacing in mm, one per spatial axis.
        rcond: relative cutoff on singular values for the pseudo-inverse.

    Example:
        >>> A = AcquisitionOperator([SliceAcquisition(axis=2, thickness=4.0)], (32, 32, 32), (1.0, 1.0, 1.0))
        >>> x = torch.rand(1, 1, 32, 32, 32, dtype=torch.float64)
        >>> y = A(x)                      # (1, 1, 32, 32, 8)
        >>> x_dc = A.project(torch.zeros_like(x), y)
        >>> bool(torch.allclose(A(x_dc), y))
        True
    """

    transforms: Sequence[AxisTransform]
    hr_shape: Sequence[int]
    hr_spacing: Sequence[float]
    rcond: float = 1e-10
    _factors: dict[int, AxisFactor] = field(init=False, repr=False)
    _cache: dict[tuple, dict[int, Any]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.transforms = tuple(self.transforms)
        self.hr_shape = tuple(int(n) for n in self.hr_shape)
        self.hr_spacing = tuple(float(h) for h in self.hr_spacing)
        if len(self.hr_shape) not in (2, 3) or len(self.hr_spacing) != len(self.hr_shape):
            raise ValueError(
                f"hr_shape and hr_spacing need 2 or 3 matching entries, got {self.hr_shape} and {self.hr_spacing}"
            )
        for h in self.hr_spacing:
            _check_positive("HR voxel spacing", h)
        factors: dict[int, AxisFactor] = {}
        sizes, spacings = list(self.hr_shape), list(self.hr_spacing)
        for t in self.transforms:
            if not 0 <= t.axis < self.spatial_dims:
                raise ValueError(f"axis {t.axis} is out of range for {self.spatial_dims} spatial dims")
            step = t.build(sizes[t.axis], spacings[t.axis])
            factors[t.axis] = factors[t.axis].then(step) if t.axis in factors else step
            sizes[t.axis], spacings[t.axis] = step.matrix.shape[0], step.spacing
        self._factors = factors
        self._cache = {}

    # ----------------------------------------------------------------------------------------- grids and geometry
    @property
    def spatial_dims(self) -> int:
        return len(self.hr_shape)

    @property
    def lr_shape(self) -> tuple[int, ...]:
        return tuple(self._factors[a].matrix.shape[0] if a in self._factors else n for a, n in enumerate(self.hr_shape))

    @property
    def lr_spacing(self) -> tuple[float, ...]:
        return tuple(self._factors[a].spacing if a in self._factors else h for a, h in enumerate(self.hr_spacing))

    @property
    def axes(self) -> tuple[int, ...]:
        """The spatial axes this operator changes."""
        return tuple(sorted(self._factors))

    def axis_matrix(self, axis: int) -> np.ndarray:
        """The float64 ``(n_lr, n_hr)`` matrix of one spatial axis (identity for untouched axes)."""
        if axis in self._factors:
            return self._factors[axis].matrix.copy()
        return np.eye(self.hr_shape[axis])

    def lr_index_to_hr_index(self) -> np.ndarray:
        """``(4, 4)`` (or ``(3, 3)``) homogeneous map from LR voxel indices to continuous HR voxel indices."""
        d = self.spatial_dims
        t = np.eye(d + 1)
        for a, f in self._factors.items():
            t[a, a] = f.spacing / self.hr_spacing[a]
            t[a, d] = f.first_center / self.hr_spacing[a]
        return t

    def lr_affine(self, hr_affine: np.ndarray) -> np.ndarray:
        """The voxel-to-world affine of the LR grid, given that of the HR grid (3D operators)."""
        return np.asarray(hr_affine, dtype=np.float64) @ self._index_map_4x4()

    def hr_affine(self, lr_affine: np.ndarray) -> np.ndarray:
        """The voxel-to-world affine of the HR grid, given that of the LR grid (3D operators)."""
        return np.asarray(lr_affine, dtype=np.float64) @ np.linalg.inv(self._index_map_4x4())

    def _index_map_4x4(self) -> np.ndarray:
        if self.spatial_dims != 3:
            raise ValueError("affines are defined for 3D operators only")
        return self.lr_index_to_hr_index()

    # ----------------------------------------------------------------------------------------- linear algebra
    def _spectral(self, like: torch.Tensor) -> dict[int, _Spectral]:
        if not like.is_floating_point():
            raise TypeError(f"the operator needs a floating-point tensor, got {like.dtype}")
        key = (like.device, like.dtype)
        if key not in self._cache:
            entries = {}
            for a, f in self._factors.items():
                u, s, vt = np.linalg.svd(f.matrix, full_matrices=False)
                entries[a] = _Spectral(
                    *(torch.as_tensor(m, dtype=like.dtype, device=like.device) for m in (f.matrix, u, s, vt.T))
                )
            self._cache[key] = entries
        return self._cache[key]

    def _check(self, x: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
        if x.ndim != self.spatial_dims + 2 or tuple(x.shape[2:]) != shape:
            raise ValueError(
                f"{name} must have shape (B, C, {', '.join(map(str, shape))}), got {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A x``: HR ``(B, C, *hr_shape)`` → LR ``(B, C, *lr_shape)``."""
        self._check(x, self.hr_shape, "x")
        for a, sp in self._spectral(x).items():
            x = _apply_along(x, sp.matrix, a + 2)
        return x

    __call__ = forward

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``Aᵀ y``: LR ``(B, C, *lr_shape)`` → HR ``(B, C, *hr_shape)``."""
        self._check(y, self.lr_shape, "y")
        for a, sp in self._spectral(y).items():
            y = _apply_along(y, sp.matrix.T, a + 2)
        return y

    def _coefficients(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(⊗U)ᵀ y`` and the singular values ``S`` of ``A`` (all per-axis products, broadcastable to it)."""
        sv = torch.ones((1,) * self.spatial_dims, dtype=y.dtype, device=y.device)
        for a, sp in self._spectral(y).items():
            y = _apply_along(y, sp.u.T, a + 2)
            shape = [1] * self.spatial_dims
            shape[a] = -1
            sv = sv * sp.s.reshape(shape)
        return y, sv

    def _synthesize(self, c: torch.Tensor) -> torch.Tensor:
        """``(⊗V) c``: spectral coefficients back to the HR grid."""
        for a, sp in self._spectral(c).items():
            c = _apply_along(c, sp.v, a + 2)
        return c

    def pinv(self, y: torch.Tensor, *, floor: float = 0.0) -> torch.Tensor:
        """``A⁺ y``, the minimum-norm least-squares solution; LR → HR.

        With ``floor > 0`` the gain of each axis's inverse is capped: a singular value ``s`` of an axis's matrix
        below ``ŝ = floor · √(m / n)`` (``m`` LR and ``n`` HR voxels along that axis; ``√(m / n)`` is the singular
        value of a plain average onto the LR grid, so ``floor`` does not depend on how the operator is normalised)
        is inverted as ``s / ŝ²`` instead of ``1 / s`` (continuous at ``ŝ``, at most ``1 / ŝ``); the others exactly.
        For fits to noisy data where an axis is ill-conditioned (slices that overlap much).
        """
        self._check(y, self.lr_shape, "y")
        c, s = self._coefficients(y)
        gain = torch.ones_like(s)
        for a, sp in self._spectral(y).items():
            axis_gain = 1.0 / sp.s.clamp_min(torch.finfo(sp.s.dtype).tiny)
            if floor > 0:
                s_hat = sp.gain_cap(floor)
                axis_gain = torch.where(sp.s < s_hat, sp.s / s_hat**2, axis_gain)
            shape = [1] * self.spatial_dims
            shape[a] = -1
            gain = gain * axis_gain.reshape(shape)
        return self._synthesize(c * torch.where(s > self.rcond * s.max(), gain, 0.0))

    def capped_fraction(self, floor: float = NOISE_GAIN_FLOOR) -> float:
        """The fraction of ``A``'s singular components that :meth:`pinv` with ``floor`` inverts only partially
        (0: it is the exact pseudo-inverse): those some axis measures with a singular value below its cap."""
        exact = 1.0
        for sp in self._spectral(torch.zeros((), dtype=torch.float64)).values():
            exact *= float((sp.s >= sp.gain_cap(floor)).double().mean())
        return 1.0 - exact

    def project(self, x: torch.Tensor, y: torch.Tensor, *, floor: float = 0.0) -> torch.Tensor:
        """``x + A⁺(y − A x)``, with ``A⁺`` :meth:`pinv` at ``floor``.

        Without ``floor`` (or where nothing is capped: :meth:`capped_fraction` is 0) this is the projection onto
        ``{x' : A x' = y}``: the closest such ``x'`` to ``x`` (Euclidean); projecting again changes nothing.

        With ``floor > 0`` it is not a projection but one damped step towards the data: in every singular component
        of ``A`` that :meth:`pinv` caps, the residual ``y − A x`` is removed only in the fraction ``(s / ŝ)²`` (``s``
        the axis's singular value, ``ŝ`` its cap; the product over the capped axes), in the others wholly, and the
        part of ``x`` that ``A`` does not see is kept. ``A x' = y`` then holds in the uncapped components only, and
        applying it again moves the result further towards the data.

        Shapes: ``x`` ``(B, C, *hr_shape)``, ``y`` ``(B, C, *lr_shape)``; the result as ``x``.
        """
        return x + self.pinv(y - self.forward(x), floor=floor)

    def soft_project(self, x: torch.Tensor, y: torch.Tensor, noise_std: float | torch.Tensor, *,
                     noise: Literal["gaussian", "rician"] = "gaussian") -> torch.Tensor:
        """Noise-aware projection ``x + Aᵀ(A Aᵀ + λ I)⁻¹(y − A x)``.

        ``λ`` follows Morozov's discrepancy principle, chosen per batch entry so that ``‖A x' − y‖²`` equals what the
        truth's residual would be expected to be: ``m · noise_std²`` for Gaussian noise (``m`` LR voxels per entry),
        and for a magnitude image (``noise="rician"``, ``y`` the magnitude itself) ``Σ σ² ρ(ν/σ)`` over the LR
        voxels, with ``ν = max(A x, 0)`` and ``ρ`` :func:`rician_error_moment` (2 in pure noise, where Gaussian's
        target is half what the air gives). ``x'`` fits the data down to the noise level and no further. Entries
        whose residual is already at or below that level are left unchanged. With ``noise_std = 0`` this equals
        :meth:`project`.

        Args:
            x: HR estimate ``(B, C, *hr_shape)``.
            y: measurement ``(B, C, *lr_shape)``.
            noise_std: noise standard deviation of ``y`` (scalar or per batch entry ``(B,)``; per real channel for
                Rician noise).
            noise: the noise model the target is taken from.
        """
        sigma = torch.as_tensor(noise_std, dtype=x.dtype, device=x.device).reshape(-1)
        if not torch.any(sigma > 0):
            return self.project(x, y)
        if noise not in ("gaussian", "rician"):
            raise ValueError(f"noise must be 'gaussian' or 'rician', not {noise!r}")
        ax = self.forward(x)
        r = y - ax
        c, s = self._coefficients(r)
        if noise == "gaussian":
            target_sq = (sigma**2 * r[0].numel()).expand(r.shape[0])
        else:
            per_entry = sigma.reshape((-1,) + (1,) * (ax.ndim - 1))
            theta = ax.clamp_min(0).double() / per_entry.double().clamp_min(torch.finfo(torch.float64).tiny)
            target_sq = (sigma**2 * rician_error_moment(theta).flatten(1).sum(1).to(x.dtype)).expand(r.shape[0])
        lam = _discrepancy_lambda(c, s, r, target_sq).reshape((-1,) + (1,) * (c.ndim - 1))
        return x + self._synthesize(c * s / (s * s + lam))

    def upsample(self, y: torch.Tensor, how: str = "cubic") -> torch.Tensor:
        """``y`` brought onto the HR grid as a network's condition: ``"pinv"``, ``A⁺ y`` with the noise gain capped
        at :data:`NOISE_GAIN_FLOOR` (exact for slices at their thickness or with gaps, bounded where they overlap
        much), or any :meth:`interpolate` method. Training pairs and the pipeline both build it here."""
        return self.pinv(y, floor=NOISE_GAIN_FLOOR) if how == "pinv" else self.interpolate(y, how)

    def interpolate(self, y: torch.Tensor, method: str = "cubic") -> torch.Tensor:
        """Bring LR data onto the HR grid by interpolating between LR voxel centres, axis by axis.

        Unlike :meth:`pinv`, this ignores the slice profile: it places each LR value at its voxel centre (exact
        geometry) and interpolates, holding the end values constant beyond the outermost centres. It is the classic
        baseline and a smooth, noise-stable network condition.

        Args:
            y: ``(B, C, *lr_shape)``.
            method: ``"linear"``, ``"cubic"`` (interpolating cubic spline, not-a-knot ends) or ``"sinc"``
                (band-limited interpolation, as zero-filling the centred k-space of the LR along the axis: the
                field of view is taken as periodic, so nothing is clamped at the ends).

        Returns:
            ``(B, C, *hr_shape)``.
        """
        self._check(y, self.lr_shape, "y")
        if method not in ("linear", "cubic", "sinc"):
            raise ValueError(f"interpolation method must be 'linear', 'cubic' or 'sinc', not {method!r}")
        key = (method, y.device, y.dtype)
        if key not in self._cache:
            self._cache[key] = {
                a: torch.as_tensor(_interpolation_matrix(f, self.hr_shape[a], self.hr_spacing[a], method),
                                   dtype=y.dtype, device=y.device)
                for a, f in self._factors.items()
            }
        for a, m in self._cache[key].items():
            y = _apply_along(y, m, a + 2)
        return y

    def residual_map(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``|A x − y|`` brought back onto the HR grid by linear interpolation between LR voxel centres: where on
        the HR grid ``x`` disagrees with the measurement. ``x`` ``(B, C, *hr_shape)``, ``y`` ``(B, C, *lr_shape)``."""
        return self.interpolate((self.forward(x) - y).abs(), "linear")

    def residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Relative data-consistency residual ``‖A x − y‖ / ‖y‖`` per batch entry, shape ``(B,)``."""
        r = (self.forward(x) - y).flatten(1).norm(dim=1)
        return r / y.flatten(1).norm(dim=1).clamp_min(torch.finfo(y.dtype).tiny)

    # ----------------------------------------------------------------------------------------- composition, I/O
    def then(self, other: AcquisitionOperator) -> AcquisitionOperator:
        """The composition ``other ∘ self``: apply ``self``, then ``other`` (whose HR grid is this LR grid)."""
        if tuple(other.hr_shape) != self.lr_shape or not np.allclose(
            other.hr_spacing, self.lr_spacing, rtol=_SPACING_RTOL
        ):
            raise ValueError(
                f"cannot compose: this operator outputs {self.lr_shape} at {self.lr_spacing} mm, "
                f"the next one expects {tuple(other.hr_shape)} at {tuple(other.hr_spacing)} mm"
            )
        return AcquisitionOperator(
            (*self.transforms, *other.transforms), self.hr_shape, self.hr_spacing, rcond=min(self.rcond, other.rcond)
        )

    def factor(self, axes: Sequence[int]) -> tuple[AcquisitionOperator, AcquisitionOperator]:
        """``(inner, outer)`` with ``A = outer ∘ inner`` (``inner.then(outer)``): ``inner`` applies this operator's
        transforms on ``axes`` to the HR grid, ``outer`` the others to ``inner``'s LR grid. Transforms on different
        axes commute (the operator is separable), so the split is exact; e.g. a scan with two coarse axes is
        super-resolved along one of them on the grid in between, then along the other."""
        axes = {int(a) for a in axes}
        inner = AcquisitionOperator([t for t in self.transforms if t.axis in axes], self.hr_shape, self.hr_spacing,
                                    rcond=self.rcond)
        outer = AcquisitionOperator([t for t in self.transforms if t.axis not in axes], inner.lr_shape,
                                    inner.lr_spacing, rcond=self.rcond)
        return inner, outer

    def __matmul__(self, other: AcquisitionOperator) -> AcquisitionOperator:
        """``A2 @ A1`` is ``A2 ∘ A1``, as for matrices."""
        return other.then(self)

    def with_shape(self, hr_shape: Sequence[int], hr_spacing: Sequence[float] | None = None) -> AcquisitionOperator:
        """The same acquisition on another HR grid."""
        return AcquisitionOperator(self.transforms, hr_shape, self.hr_spacing if hr_spacing is None else hr_spacing,
                                   rcond=self.rcond)

    def to_dict(self) -> dict[str, Any]:
        return {
            "hr_shape": list(self.hr_shape),
            "hr_spacing": list(self.hr_spacing),
            "rcond": self.rcond,
            "transforms": [t.to_dict() for t in self.transforms],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], hr_shape: Sequence[int] | None = None) -> AcquisitionOperator:
        """Read :meth:`to_dict` output back; ``hr_shape`` re-targets the acquisition to another grid."""
        unknown = set(d) - {"hr_shape", "hr_spacing", "rcond", "transforms"}
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)} in an acquisition operator description")
        return cls(
            [AxisTransform.from_dict(t) for t in d["transforms"]],
            d["hr_shape"] if hr_shape is None else hr_shape,
            d["hr_spacing"],
            rcond=d.get("rcond", 1e-10),
        )

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> AcquisitionOperator:
        return cls.from_dict(json.loads(text))

    def describe(self) -> str:
        """One human-readable line per transform."""
        lines = []
        for t in self.transforms:
            if isinstance(t, SliceAcquisition):
                lines.append(f"axis {t.axis}: {t.thickness:g} mm slices every {t.slice_spacing:g} mm, "
                             f"{describe_profile(t.profile)} profile")
            elif isinstance(t, KSpaceTruncation):
                lines.append(f"axis {t.axis}: k-space truncation by {t.factor:g}, window {t.window or 'none'}")
        return "\n".join(lines) or "identity"


STRUCTURE_SIZES_MM = (1.0, 2.0, 3.0, 5.0, 8.0)
"""The structure thicknesses :func:`structure_visibility` reports by default (mm)."""


@dataclass(frozen=True)
class StructureVisibility:
    """How much of a thin structure's contrast reaches the slices, along one sliced axis.

    A layer ``size_mm`` thick along ``axis`` (parallel to the slices, unbounded in the other directions) and of unit
    contrast is averaged with its surroundings by each slice: ``best`` is the largest fraction of its contrast that
    any slice keeps, with the layer placed where it is seen best (on a slice centre), ``worst`` the same with the
    layer placed where it is seen worst (between slices, or in a gap). 1: the slices show it at full contrast; 0.4:
    at most 40 % of it reaches any slice, and what is lost only the prior can fill in. A compact structure of the
    same thickness (a small lesion) generally keeps less, since it is partial-volumed in-plane too.

    Attributes:
        axis: the spatial axis (of the operator's HR grid).
        size_mm: the layer's thickness along ``axis``.
        worst, best: the fraction kept, over the layer's placement.
    """

    axis: int
    size_mm: float
    worst: float
    best: float


def structure_visibility(operator: AcquisitionOperator, sizes_mm: Sequence[float] = STRUCTURE_SIZES_MM, *,
                         positions_per_voxel: int = 4) -> list[StructureVisibility]:
    """The fraction of a thin layer's contrast the slices keep, per sliced axis and thickness (see
    :class:`StructureVisibility`).

    The layer is a box ``size_mm`` wide on the HR grid, its edge voxels weighted by the fraction they cover (so its
    integral is exact); each slice sees a row of the axis's matrix applied to it (rows are non-negative and sum to
    one, so the fraction is at most 1). It is placed ``positions_per_voxel`` times per HR voxel over one slice
    period about each slice centre (the centre itself included), for every slice whose profile the field of view
    does not truncate (its row is zero at both ends of the axis) and around which every placement fits in the axis;
    a thickness with no such slice is left out. Only axes with a :class:`SliceAcquisition` count: k-space
    truncation alone is an in-plane band limit, whose sinc rows ring above 1 and below 0.

    Args:
        operator: the acquisition.
        sizes_mm: layer thicknesses (mm), positive.
        positions_per_voxel: placements per HR voxel, at least 1.

    Returns:
        One record per sliced axis (ascending) and thickness (in the order given).

    Raises:
        ValueError: for a thickness or ``positions_per_voxel`` that is not positive.
    """
    _check_positive("positions_per_voxel", positions_per_voxel)
    for size in sizes_mm:
        _check_positive("structure thickness", size)
    out: list[StructureVisibility] = []
    index_map, d = operator.lr_index_to_hr_index(), operator.spatial_dims
    for axis in sorted({t.axis for t in operator.transforms if t.kind == SliceAcquisition.kind}):
        matrix, h = operator.axis_matrix(axis), operator.hr_spacing[axis]
        n_hr = matrix.shape[1]
        period, first = index_map[axis, axis] * h, index_map[axis, d] * h  # slice spacing, first centre (mm)
        step = h / positions_per_voxel
        offsets = step * np.arange(-math.floor(period / 2 / step), math.floor(period / 2 / step) + 1)
        whole = (matrix[:, 0] == 0) & (matrix[:, -1] == 0)  # rows the field of view does not truncate
        slices = first + period * np.flatnonzero(whole)
        edges = (np.arange(n_hr + 1) - 0.5) * h  # HR voxel edges (mm from the first voxel centre)
        for size in sizes_mm:
            reach = offsets[-1] + size / 2
            inside = slices[(slices - reach >= edges[0]) & (slices + reach <= edges[-1])]
            centres = (inside[:, None] + offsets[None, :]).ravel()
            if not centres.size:
                continue
            boxes = np.clip(np.minimum(edges[1:], centres[:, None] + size / 2)
                            - np.maximum(edges[:-1], centres[:, None] - size / 2), 0, None) / h  # (n, n_hr)
            kept = (boxes @ matrix.T).max(axis=1)
            out.append(StructureVisibility(axis, float(size), float(kept.min()), float(kept.max())))
    return out


CUBIC_MIN_SAMPLES = 4
"""The fewest LR samples along an axis that :meth:`AcquisitionOperator.interpolate` fits a cubic spline through
(scipy's ``make_interp_spline`` with ``k=3``, not-a-knot ends): along an axis with fewer, its ``"cubic"`` is linear
(:func:`interpolation_method`)."""


def interpolation_method(method: str, n_lr: int) -> str:
    """The method :meth:`AcquisitionOperator.interpolate` uses when asked for ``method`` along an axis of ``n_lr``
    LR samples: ``"linear"`` for ``"cubic"`` with fewer than :data:`CUBIC_MIN_SAMPLES`, else ``method``."""
    return "linear" if method == "cubic" and n_lr < CUBIC_MIN_SAMPLES else method


def _interpolation_matrix(factor: AxisFactor, n_hr: int, spacing_hr: float, method: str) -> np.ndarray:
    """``(n_hr, n_lr)`` matrix interpolating LR samples at their centres onto the HR voxel centres."""
    n_lr = factor.matrix.shape[0]
    centers = factor.first_center + factor.spacing * np.arange(n_lr)
    positions = np.clip(spacing_hr * np.arange(n_hr), centers[0], centers[-1])
    if n_lr == 1:
        return np.ones((n_hr, 1))
    if method == "sinc":  # k-space zero-filling: the periodic band-limited (Dirichlet) kernel, no end clamping
        v = (spacing_hr * np.arange(n_hr) - centers[0])[:, None] / factor.spacing - np.arange(n_lr)[None, :]
        den = n_lr * (np.tan if n_lr % 2 == 0 else np.sin)(np.pi * v / n_lr)  # even n: the Nyquist bin split
        near = np.abs(np.sin(np.pi * v / n_lr)) < 1e-12  # v ≡ 0 (mod n): the kernel's limit there is 1
        return np.where(near, 1.0, np.sin(np.pi * v) / np.where(near, 1.0, den))
    if interpolation_method(method, n_lr) == "cubic":
        from scipy.interpolate import make_interp_spline

        return make_interp_spline(centers, np.eye(n_lr), k=3, axis=0)(positions)
    u = np.clip((positions - centers[0]) / factor.spacing, 0, n_lr - 1)
    lo = np.minimum(np.floor(u).astype(np.int64), n_lr - 2)
    frac = u - lo
    matrix = np.zeros((n_hr, n_lr))
    matrix[np.arange(n_hr), lo] = 1.0 - frac
    matrix[np.arange(n_hr), lo + 1] += frac
    return matrix


def _discrepancy_lambda(
    c: torch.Tensor, s: torch.Tensor, r: torch.Tensor, target_sq: torch.Tensor, iterations: int = 60
) -> torch.Tensor:
    """Per batch entry, the ``λ`` at which ``‖λ/(S²+λ) · c‖² + ‖r_⊥‖² = target_sq`` (bisection in log λ).

    ``r_⊥`` is the part of the residual outside the range of ``A`` (zero when ``A`` has full row rank); the residual
    norm grows monotonically with ``λ``, so bisection finds the root. Entries already below the target get ``λ = ∞``
    (no correction); entries whose target cannot be reached get the smallest ``λ`` tried.
    """
    batch = c.shape[0]
    c2, s2 = (c * c).flatten(1), (s * s).expand_as(c).flatten(1)
    outside = (r * r).flatten(1).sum(1) - c2.sum(1)
    scale = s2.max()

    def residual_sq(lam: torch.Tensor) -> torch.Tensor:
        ratio = lam[:, None] / (s2 + lam[:, None])
        return (c2 * ratio * ratio).sum(1) + outside.clamp_min(0)

    lo = torch.full((batch,), -30.0, dtype=c.dtype, device=c.device)  # log10 of λ / max S²
    hi = torch.full((batch,), 10.0, dtype=c.dtype, device=c.device)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        too_big = residual_sq(scale * 10.0**mid) > target_sq
        hi, lo = torch.where(too_big, mid, hi), torch.where(too_big, lo, mid)
    lam = scale * 10.0 ** (0.5 * (lo + hi))
    return torch.where(c2.sum(1) + outside.clamp_min(0) <= target_sq, torch.full_like(lam, torch.inf), lam)


def operator_from_spacings(
    hr_spacing: Sequence[float],
    lr_spacing: Sequence[float],
    *,
    hr_shape: Sequence[int] | None = None,
    lr_shape: Sequence[int] | None = None,
    slice_axes: Sequence[int] | None = None,
    profile: SliceProfile | Sequence[float] = "gaussian",
    slice_thickness: float | None = None,
) -> AcquisitionOperator:
    """Build the acquisition that turns an HR grid into an LR grid from their voxel spacings.

    Axes whose LR spacing exceeds the HR spacing are acquired: ``slice_axes`` (default: the axis with the largest
    spacing ratio) by :class:`SliceAcquisition` with slice spacing = LR spacing, the others by
    :class:`KSpaceTruncation`. Give either ``hr_shape`` or ``lr_shape``; the other follows.

    From ``lr_shape``, the HR grid covers the LR field of view exactly, voxel edge to voxel edge, when the HR spacing
    divides it (to within float32 affine round-off: :func:`_grid_tol`). When it does not, the HR grid ends at the
    nearest whole voxel and a :class:`GeometryWarning` says by how many mm its extent differs.

    Args:
        hr_spacing: HR voxel spacing in mm (e.g. from the target grid).
        lr_spacing: LR voxel spacing in mm (e.g. from the LR NIfTI header).
        hr_shape: spatial shape of the HR grid.
        lr_shape: spatial shape of the LR grid; the HR grid is then the one that covers its field of view.
        slice_axes: axes acquired as slices.
        profile: slice profile (see :class:`SliceAcquisition`).
        slice_thickness: slice thickness in mm; defaults to the LR spacing (contiguous slices).

    Returns:
        The operator, on the HR grid.
    """
    hr_spacing, lr_spacing = tuple(map(float, hr_spacing)), tuple(map(float, lr_spacing))
    if len(hr_spacing) != len(lr_spacing):
        raise ValueError(f"spacings differ in length: {hr_spacing} vs {lr_spacing}")
    if (hr_shape is None) == (lr_shape is None):
        raise ValueError("give exactly one of hr_shape and lr_shape")
    ratio = np.asarray(lr_spacing) / np.asarray(hr_spacing)
    if np.any(ratio < 1 - _SPACING_RTOL):
        mm = lambda spacing: " x ".join(f"{s:.4g}" for s in spacing)  # noqa: E731
        raise ValueError(f"the HR spacing {mm(hr_spacing)} mm is coarser than the LR spacing {mm(lr_spacing)} mm along "
                         f"axis {int(np.argmin(ratio))}: the HR grid may only refine the LR one")
    coarse = [a for a, r in enumerate(ratio) if r > 1 + _SPACING_RTOL]
    if slice_axes is None:
        slice_axes = [int(np.argmax(ratio))] if coarse else []
    transforms: list[AxisTransform] = []
    for a in coarse:
        if a in slice_axes:
            thickness = slice_thickness or lr_spacing[a]
            transforms.append(SliceAcquisition(a, thickness, lr_spacing[a], _as_profile(profile)))
        else:
            transforms.append(KSpaceTruncation(a, float(ratio[a])))
    if hr_shape is None:
        assert lr_shape is not None
        hr_shape = list(lr_shape)
        for t in transforms:
            n_lr, h, s = int(lr_shape[t.axis]), hr_spacing[t.axis], lr_spacing[t.axis]
            if isinstance(t, SliceAcquisition):
                n = t.hr_size_for(n_lr, h)
                fov = n_lr * t.slice_spacing  # the slices' voxels, whatever their thickness
                mismatch = t.hr_fov_mismatch(n_lr, n, h)
            else:
                n = max(1, round(n_lr * ratio[t.axis]))
                fov = n_lr * s
                mismatch = n * h - fov
            hr_shape[t.axis] = n
            if abs(mismatch) > _grid_tol(n) * h:
                warnings.warn(
                    f"the {h:g} mm target spacing does not divide the LR field of view along axis {t.axis} "
                    f"({n_lr} voxels of {s:g} mm, {fov:g} mm): the HR grid ({n} voxels, {n * h:g} mm) is "
                    f"{abs(mismatch):.3g} mm {'longer' if mismatch > 0 else 'shorter'}", GeometryWarning, stacklevel=2)
    return AcquisitionOperator(transforms, hr_shape, hr_spacing)


def _as_profile(profile: str | Sequence[float]) -> str | tuple[float, ...]:
    return profile if isinstance(profile, str) else tuple(profile)


# --------------------------------------------------------------------------------------------------------- noise
def noise_std_for_snr(y: torch.Tensor, snr: float) -> float:
    """Noise standard deviation for a given SNR.

    SNR is the mean foreground intensity over the noise std, the foreground being voxels above 10% of the 99th
    intensity percentile (so background air does not dilute it).
    """
    _check_positive("SNR", snr)
    flat = y.detach().flatten().double()
    if flat.numel() > 2_000_000:  # quantile() has a size limit; a strided subsample is plenty for a percentile
        flat = flat[:: flat.numel() // 1_000_000 + 1]
    ref = torch.quantile(flat, 0.99)
    fg = flat[flat > 0.1 * ref]
    level = float(fg.mean()) if fg.numel() else float(flat.abs().mean())
    return level / snr


def estimate_noise_std(data: np.ndarray, axis: int, foreground: float = 0.1) -> float:
    """The white-noise std per voxel of a thick-slice volume, estimated in-plane (Donoho's wavelet MAD): on each
    slice across ``axis``, the finest diagonal Haar detail coefficients (noise passes into them with its std,
    smooth anatomy hardly at all); their median absolute value over 0.6745, inside the foreground (voxels above
    ``foreground`` times the 99th percentile), where magnitude noise is close to Gaussian. Structure finer than two
    voxels counts as noise, so this is an upper estimate on detailed images."""
    x = np.moveaxis(np.asarray(data, dtype=np.float64), axis, 0)
    x = x[:, : x.shape[1] // 2 * 2, : x.shape[2] // 2 * 2]
    hh = (x[:, 0::2, 0::2] - x[:, 0::2, 1::2] - x[:, 1::2, 0::2] + x[:, 1::2, 1::2]) / 2
    block = (x[:, 0::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 0::2] + x[:, 1::2, 1::2]) / 4
    inside = block > foreground * np.percentile(x, 99)
    if not inside.any():
        return 0.0
    return float(np.median(np.abs(hh[inside])) / 0.6745)


RAYLEIGH_MEAN_OVER_STD = math.sqrt(math.pi / (4 - math.pi))
"""The mean of a Rayleigh distribution (the magnitude of pure complex noise) over its std: 1.913."""


def _rician_xi(theta: np.ndarray) -> np.ndarray:
    """The variance of a Rician magnitude over σ², at SNR ``theta`` = ν/σ (Koay & Basser 2006, eq. 9)."""
    from scipy import special

    z = theta * theta / 4  # the scaled Bessel functions keep exp(-θ²/2)·I(θ²/4)² finite at any θ
    bracket = (2 + theta * theta) * special.i0e(z) + theta * theta * special.i1e(z)
    return 2 + theta * theta - math.pi / 8 * bracket * bracket


def rician_error_moment(theta: torch.Tensor) -> torch.Tensor:
    """``E[(M − ν)²] / σ²`` for the Rician magnitude ``M`` of a signal ``ν = θσ`` in complex Gaussian noise of std
    ``σ`` per channel: 2 in pure noise (``θ = 0``, Rayleigh), about 0.90 at ``θ`` 1-2, tending to 1 at high SNR.
    From ``E[M] = σ √(π/2) L½(−θ²/2)`` (Koay & Basser 2006), ``E[(M − ν)²] = 2ν² + 2σ² − 2ν E[M]``. Take ``theta``
    in float64: the difference cancels at high SNR."""
    z = theta * theta / 4  # the scaled Bessel functions keep exp(-θ²/4)·I(θ²/4) finite at any θ
    mean = math.sqrt(math.pi / 2) * ((1 + 2 * z) * torch.special.i0e(z) + 2 * z * torch.special.i1e(z))
    return 2 * theta * theta + 2 - 2 * theta * mean


def rician_snr(mean_over_std: float, iterations: int = 100, *, pure_noise_tolerance: float = 0.0) -> float:
    """The underlying SNR ν/σ of a Rician magnitude from its mean over its std (Koay & Basser's fixed point); 0 up
    to the Rayleigh ratio :data:`RAYLEIGH_MEAN_OVER_STD` times ``1 + pure_noise_tolerance``: there the magnitude is
    taken as pure noise (the ratio hardly moves with a small ν, so a sampled ratio a little high would read a large
    one)."""
    r2 = mean_over_std * mean_over_std
    if r2 <= (RAYLEIGH_MEAN_OVER_STD * (1 + pure_noise_tolerance)) ** 2:
        return 0.0
    theta = math.sqrt(r2 - RAYLEIGH_MEAN_OVER_STD**2)
    for _ in range(iterations):
        theta = math.sqrt(max(float(_rician_xi(np.asarray(theta))) * (1 + r2) - 2, 0.0))
    return theta


def background_noise_std(data: np.ndarray, axis: int, *, window: int = 7, margin: int = 3,
                         min_voxels: int = 500) -> float | None:
    """The noise std per voxel (and per real channel) of a scan, read from its background air; ``None`` where it
    has too little air (``min_voxels``) or a background mostly of zeros: a masked (skull-stripped) input, or one
    cropped to the head.

    The air is what lies outside the head: the voxels below a tenth of the 99th percentile once each slice across
    ``axis`` is smoothed in-plane (σ 2 voxels), holes filled, grown by ``margin`` voxels in-plane, zeros (padding,
    to round-off) left out. In ``window`` × ``window`` in-plane windows wholly in the air, the local mean ``m``,
    variance ``v`` and second moment ``s2`` of the magnitude are taken. The air's SNR ``θ = ν/σ`` follows from the
    median of ``m / √v`` (Koay & Basser's correction; 0 for pure noise, whose magnitude is Rayleigh, and within
    5 % of the Rayleigh ratio, which a few hundred windows of pure noise can read), and ``σ² = median(s2) / (2 +
    θ²)``. Real-valued data (air with negative values) are Gaussian instead: ``σ² = median(v)``. On synthetic air it
    read σ within 1 % for pure noise, −2 % to +6 % for ν up to 5σ, but up to +22 % where ν ≈ σ (taken as pure
    noise). No anatomy enters, so unlike :func:`estimate_noise_std` it does not read fine structure as
    noise; it assumes the noise in the air is the noise in the head (one coil's, or a parallel reconstruction's
    average).

    Data stored as integers (times a scale, NIfTI's ``scl_slope``: :func:`_quantization_step` ``q``) whose air
    noise is only a few steps round many air voxels down to 0: those are air, and only zeros that fill a 3 × 3
    in-plane square are taken as padding or masking; the rounding's own variance ``q²/12`` (Sheppard) is taken off
    ``v`` and ``s2``. Without this, rounded Rayleigh air of σ = 1-2 steps read 20-35 % low, and under 0.7 steps not
    at all; with it within 1 % from 0.7 steps (+5 % at 0.5).
    """
    stats = _air_windows(data, axis, window=window, margin=margin, min_voxels=min_voxels)
    if stats is None:
        return None
    mean, second, var, real_valued = stats
    if real_valued:
        return float(np.sqrt(np.median(var)))
    positive = var > 0
    if not positive.any():
        return 0.0
    ratio = float(np.median(mean[positive] / np.sqrt(var[positive])))  # 0.4 % high on pure noise, ±3 % in 1000 windows
    theta = rician_snr(ratio, pure_noise_tolerance=0.05)
    return float(np.sqrt(np.median(second) / (2 + theta * theta)))


def _air_windows(data: np.ndarray, axis: int, *, window: int = 7, margin: int = 3, min_voxels: int = 500
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool] | None:
    """The local mean, second moment and variance of ``data`` in ``window`` × ``window`` windows (in the planes
    across ``axis``) wholly in its background air (:func:`_air`; the rounding's own variance taken off), and whether
    the air holds negative values (real-valued data); ``None`` where it has too little air."""
    from scipy import ndimage

    found = _air(data, axis, margin=margin, min_voxels=min_voxels)
    if found is None:
        return None
    x, air, step = found
    size = (1, window, window)
    n = window * window
    centres = ndimage.binary_erosion(air, np.ones(size, bool), border_value=0)  # wholly inside the array
    if not centres.any():
        return None
    mean = ndimage.uniform_filter(x, size, mode="reflect")[centres]
    second = ndimage.uniform_filter(x * x, size, mode="reflect")[centres] - step * step / 12
    var = np.maximum(second - mean * mean, 0) * n / (n - 1)
    return mean, second, var, bool((x[air] < 0).mean() > 0.01)


def _air(data: np.ndarray, axis: int, *, margin: int = 3, min_voxels: int = 500
         ) -> tuple[np.ndarray, np.ndarray, float] | None:
    """``data`` with ``axis`` first (float64), its background air as :func:`background_noise_std` finds it, and its
    quantisation step (:func:`_quantization_step`); ``None`` where it has too little air, or a background mostly of
    zeros (masked, or cropped to the head)."""
    from scipy import ndimage

    x = np.moveaxis(np.asarray(data, dtype=np.float64), axis, 0)
    smooth = ndimage.gaussian_filter(x, (0, 2, 2))
    head = smooth > 0.1 * np.percentile(smooth, 99)
    head = np.stack([ndimage.binary_fill_holes(s) for s in head])
    head = ndimage.binary_dilation(head, np.ones((1, 2 * margin + 1, 2 * margin + 1), bool))
    zero = np.abs(x) <= 1e-6 * np.percentile(np.abs(x), 99)  # masking or padding, to round-off
    step = _quantization_step(x[~head])
    if step > 0:  # air rounded down to 0 is air: padding and masks are regions
        zero = ndimage.binary_opening(zero, np.ones((1, 3, 3), bool))
    if (~head).sum() < min_voxels or zero[~head].mean() > 0.5:
        return None
    return x, ~head & ~zero, step


def _quantization_step(values: np.ndarray) -> float:
    """The step ``q`` of values stored as integers times a scale (every value a whole multiple of the smallest
    positive one, to 1e-3 of it), or 0 for continuous data."""
    positive = values[values > 0]
    if positive.size == 0:
        return 0.0
    q = float(positive.min())
    multiples = values / q
    return q if np.allclose(multiples, np.round(multiples), rtol=0, atol=1e-3) else 0.0


def scan_noise_std(volume: Volume, *, window: int = 7) -> float | None:
    """:func:`background_noise_std` of a thick-slice scan, in ``window`` × ``window`` windows on its slices across
    its coarsest voxel axis (in its own array order), in its units; ``None`` where it has no air to read it from.

    A slab too thin for a window in its slices' plane (fewer than ``window`` voxels across, such as the demo's 4 mm
    coronal slab of 4 mm axial slices) is read in the plane of its two longest axes instead: the noise is white on the
    scan's own grid, so a window across slices reads it as well as one within a slice.
    """
    return background_noise_std(volume.data, _noise_axis(volume, window), window=window)


def _noise_axis(volume: Volume, window: int) -> int:
    """The axis across which :func:`scan_noise_std` reads a scan's air: its coarsest, or for a slab too thin for a
    window in that plane, its shortest."""
    axis = int(np.argmax(volume.spacing))
    if min(n for a, n in enumerate(volume.shape) if a != axis) < window:
        axis = int(np.argmin(volume.shape))
    return axis


def air_noise_gain(given: Volume, resampled: Volume, *, patch: int = 16, min_patches: int = 20) -> float | None:
    """By how much a resampling (:func:`coarsen`, along some voxel axes of ``given``) scaled a scan's noise std, read
    from its background air, for noise whose spectrum is flat within a band ``b`` of each resampled axis's Nyquist
    frequency: ``b = 1`` for noise white on the given grid (the factor is then :func:`coarsen`'s own, the square root
    of the kept share ``k`` of k-space), ``b = 1/2`` for a scanner's 2x zero-filled interpolation (whose noise a
    truncation to the native grid keeps whole: factor 1, where the white-noise factor would halve it).

    ``b`` is read from the spectrum of the air's fluctuation on the given grid (``patch`` × ``patch`` squares wholly
    in the air, in the planes :func:`scan_noise_std` reads, each less its mean; at least ``min_patches``): the share
    of its power within the kept band. The air is a magnitude, whose fluctuations have the complex noise's
    correlation squared (Rayleigh envelopes: within a few % of it), so their spectrum is the band's autoconvolution, a
    triangle out to ``2b`` wrapped at the Nyquist frequency: flat for white noise, and for a 2x zero-filled
    interpolation one that a truncation to the native grid keeps 3/4 of per axis though it keeps all of the noise.
    ``None`` where the given volume has too little air, or where the spectrum is flat within twice its standard error
    (white noise): use :func:`coarsen`'s factor. Measured on synthetic heads (Rician noise, 0.5 mm resampled to 1 and
    1.25 mm; `tests/test_physics.py`): white noise read as white, or within +11 %; a 2x zero-filled interpolation 6-7 %
    low (0.93-0.94 for 1, 0.74-0.75 for 0.8)."""
    axis = _noise_axis(given, 7)
    found = _air(given.data, axis, margin=patch // 2)  # away from the head, whose edge would add low frequencies
    if found is None:
        return None
    x, air, _ = found
    plane = [a for a in range(3) if a != axis]
    shares = [resampled.shape[a] / given.shape[a] for a in plane]
    if all(k >= 1 for k in shares):  # not resampled in the plane read: nothing to say
        return None
    squares = [x[z, i:i + patch, j:j + patch] for z in range(x.shape[0])
               for i in range(0, x.shape[1] - patch + 1, patch) for j in range(0, x.shape[2] - patch + 1, patch)
               if air[z, i:i + patch, j:j + patch].all()]
    if len(squares) < min_patches:
        return None
    squares = np.stack(squares)
    powers = np.abs(np.fft.fft2(squares - squares.mean(axis=(1, 2), keepdims=True))) ** 2  # each square's mean off
    freq = np.abs(np.fft.fftfreq(patch)) * 2  # in units of the Nyquist frequency
    inside = np.logical_and.outer(freq <= shares[0] + 1e-9, freq <= shares[1] + 1e-9)
    each = powers[:, inside].sum(axis=1) / np.maximum(powers.sum(axis=(1, 2)), 1e-30)
    power = powers.mean(axis=0)

    def share(band: float) -> float:  # the model's share in the same bins
        model = np.outer(*(_triangle(freq, band if k < 1 else 1.0) for k in shares))
        model[0, 0] = 0.0
        return float(model[inside].sum() / model.sum())

    measured = float(power[inside].sum() / power.sum())
    low, high = 0.5 * min(k for k in shares if k < 1), 1.0  # share falls as the band widens
    if measured <= share(1.0) + 2 * float(np.std(each)) / math.sqrt(len(each)):  # white, within the squares' scatter
        return None
    if measured >= share(low):
        band = low
    else:
        for _ in range(40):
            band = 0.5 * (low + high)
            low, high = (band, high) if share(band) > measured else (low, band)
    return float(np.sqrt(math.prod(min(k, band) / band for k in shares if k < 1)))


def _triangle(f: np.ndarray, band: float) -> np.ndarray:
    """The spectrum ``2 band − |f|`` (``f`` in units of the Nyquist frequency) wrapped at ±1: that of the magnitude of
    noise flat within ``[-band, band]``; flat for ``band`` 1."""
    f = np.abs(f)
    return np.maximum(0.0, 2 * band - f) + np.maximum(0.0, 2 * band - (2 - f))


def add_noise(
    y: torch.Tensor,
    *,
    snr: float | None = None,
    noise_std: float | None = None,
    kind: str = "gaussian",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, float]:
    """Add measurement noise to an acquisition.

    Args:
        y: noise-free measurement, any shape.
        snr: signal-to-noise ratio (see :func:`noise_std_for_snr`); or give ``noise_std`` directly.
        noise_std: noise standard deviation per real channel.
        kind: ``"gaussian"`` (real, the k-space view) or ``"rician"`` (magnitude of complex Gaussian noise).
        generator: torch generator for reproducible noise.

    Returns:
        The noisy measurement and the noise std used.
    """
    if (snr is None) == (noise_std is None):
        raise ValueError("give exactly one of snr and noise_std")
    sigma = noise_std_for_snr(y, snr) if snr is not None else float(noise_std)  # type: ignore[arg-type]
    if kind not in ("gaussian", "rician"):
        raise ValueError(f"noise kind must be 'gaussian' or 'rician', not {kind!r}")

    def draw() -> torch.Tensor:
        return torch.randn(y.shape, generator=generator, dtype=y.dtype, device="cpu").to(y.device) * sigma

    if kind == "gaussian":
        return y + draw(), sigma
    real, imag = y + draw(), draw()
    return torch.sqrt(real * real + imag * imag), sigma


# --------------------------------------------------------------------------------------------------------- volumes
def kept_noise_fraction(op: AcquisitionOperator) -> float:
    """``‖a‖²``: the fraction of the variance of white noise on the HR grid that ``A`` keeps in each of its samples
    (``a``: a row of ``A``, the mean over rows; the product over the operator's axes). 1/4 for 4 mm box slices of
    1 mm voxels."""
    return math.prod(float(np.mean(np.sum(op.axis_matrix(a) ** 2, axis=1))) for a in op.axes)


COARSE_RATIO = 1.5
"""A volume whose spacing along an axis is at least this many times its finest spacing along the others is coarse
there already (a thick-slice scan): slices simulated from it blur its own a second time."""


def coarse_along(volume: Volume, axis: int) -> str | None:
    """How ``volume`` is coarse already along voxel ``axis`` (``"4 mm against 1 mm in-plane"``) where its spacing
    there is at least :data:`COARSE_RATIO` times its finest along the other axes, else ``None``: whether it can
    stand for the high-resolution truth that slices along ``axis`` are simulated from."""
    spacing = volume.spacing
    finest = min(s for a, s in enumerate(spacing) if a != axis)
    return f"{spacing[axis]:g} mm against {finest:g} mm in-plane" if spacing[axis] >= COARSE_RATIO * finest else None


def coarser_axes(spacing: Sequence[float], wanted: Sequence[float]) -> list[int]:
    """The axes along which ``wanted`` is coarser than ``spacing`` (beyond a header's round-off): those
    :func:`coarsen` resamples."""
    return [a for a, (h, s) in enumerate(zip(spacing, wanted, strict=True)) if float(s) > h * (1 + _SPACING_RTOL)]


def coarsening(volume: Volume, spacing: Sequence[float]) -> tuple[KSpaceTruncation, ...]:
    """The k-space truncations by which :func:`coarsen` resamples ``volume`` for ``spacing`` (in mm per voxel axis of
    ``volume``), none where it is nowhere coarser: all that decides its result besides the volume."""
    if len(spacing) != 3:
        raise ValueError(f"a spacing needs 3 values, got {list(spacing)}")
    return tuple(KSpaceTruncation(a, volume.shape[a] / max(1, round(volume.shape[a] * volume.spacing[a] / spacing[a])))
                 for a in coarser_axes(volume.spacing, spacing))


def coarsen(volume: Volume, spacing: Sequence[float]) -> tuple[Volume, float]:
    """``volume`` resampled, along each voxel axis where ``spacing`` is coarser than its own, onto about that
    spacing by k-space truncation (:class:`KSpaceTruncation`, sharp cut: what a coarser matrix over the same field of
    view would have measured), and the factor by which that scales a white noise's std.

    The field of view is kept, so an axis of ``n`` voxels of ``h`` mm becomes ``m = round(n h / s)`` voxels of
    ``n h / m`` mm, within half a voxel of ``s``; the affine is exact (voxel centres as :meth:`AcquisitionOperator.
    lr_affine` places them). Axes where ``spacing`` is not coarser are kept; with none, ``volume`` itself and 1.

    Args:
        volume: a volume, in its own voxel order.
        spacing: the wanted spacing in mm per voxel axis of ``volume``.
    """
    transforms = coarsening(volume, spacing)
    if not transforms:
        return volume, 1.0
    op = AcquisitionOperator(transforms, volume.shape, volume.spacing)
    y = op(torch.from_numpy(volume.data.astype(np.float64))[None, None])[0, 0].numpy()
    return volume.with_data(y.astype(np.float32), op.lr_affine(volume.affine)), math.sqrt(kept_noise_fraction(op))


def simulate_acquisition(
    volume: Volume,
    transforms: Sequence[AxisTransform],
    *,
    snr: float | None = None,
    noise: str = "rician",
    seed: int = 0,
) -> tuple[Volume, AcquisitionOperator, float]:
    """Simulate an LR acquisition of an HR volume, with exact LR geometry.

    The work happens in the canonical (RAS+) orientation and the result comes back in the input's orientation.

    Args:
        volume: the HR volume.
        transforms: the acquisition; each transform's ``axis`` is a voxel axis *of the input file*.
        snr: add noise at this SNR (see :func:`noise_std_for_snr`); ``None`` for a noise-free acquisition.
        noise: ``"rician"`` or ``"gaussian"``.
        seed: noise seed.

    Returns:
        The LR volume (input orientation, float64 internally, the input's float dtype on return; its ``source``
        says it was simulated from the volume's, so that no run reads the HR file's JSON sidecar for these slices),
        the operator on the canonical HR grid, and the noise std used (0 when noise-free).
    """
    canon = volume.canonical()
    transforms = [replace(t, axis=volume.axis_to_canonical(t.axis)) for t in transforms]
    op = AcquisitionOperator(transforms, canon.shape, canon.spacing)
    y = op(torch.from_numpy(canon.data.astype(np.float64))[None, None])
    sigma = 0.0
    if snr is not None:
        y, sigma = add_noise(y, snr=snr, kind=noise, generator=torch.Generator().manual_seed(seed))
    lr = canon.with_data(y[0, 0].numpy().astype(volume.data.dtype), op.lr_affine(canon.affine))
    lr = replace(lr, source=f"{volume.source} (simulated slices)" if volume.source else None)
    return lr.reorient(volume.orientation), op, sigma
