"""Estimate a scan's slice profile from the scan itself (``--slice-profile auto``), by comparing its spectra.

The idea of ECLARE's ESPRESO, without a network: in-plane, the scan is sharp; through-plane, each sample is the
slice profile's average. If the anatomy's statistics are alike along every axis (the assumption of SMORE, ECLARE
and the per-scan calibration), the right profile makes two sets of lines alike: the in-plane lines acquired with it
(blurred and sampled at the slice spacing, by the project's :class:`~gen_sr.physics.SliceAcquisition`), and the
through-plane lines of the scan blurred in-plane with it, so that both carry the true profile along one axis and
the candidate along the other (the comparison is symmetric: the blur across the line and the noise floor cancel).
For each candidate (a Gaussian of FWHM ``w`` or a rectangle of width ``w``, ``w`` on a grid of fractions of the
slice spacing) the two log power spectra are compared up to a constant (the overall contrast); the candidate that
differs least is the estimate. The lowest frequencies (the head's outline) and the top fifth of the band (aliasing)
are left out.

Only the band below the slices' Nyquist frequency is seen, so thin profiles (a width well under the spacing, i.e.
gaps) and thick ones are told apart by how fast the spectrum falls there; ``benchmarks/slice_profile_estimate.py``
measures the error on real heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gen_sr.physics import SliceAcquisition
from gen_sr.volume import Volume

__all__ = ["ProfileEstimate", "estimate_slice_profile", "line_spectrum"]

DEFAULT_WIDTHS = tuple(np.round(np.arange(0.5, 2.0001, 0.05), 2))  # candidate widths, in slice spacings


@dataclass(frozen=True)
class ProfileEstimate:
    """What :func:`estimate_slice_profile` found.

    Attributes:
        profile: ``"gaussian"`` or ``"rect"``.
        thickness: the FWHM (Gaussian) or width (rect) in mm, as ``--slice-thickness`` takes it.
        axis: the RAS+ axis of the slices.
        misfit: the RMS difference (natural log of power) between the through-plane spectrum and the candidate's.
        runner_up: the best candidate of the other shape, as ``(profile, thickness, misfit)``.
    """

    profile: str
    thickness: float
    axis: int
    misfit: float
    runner_up: tuple[str, float, float] | None = None

    def describe(self) -> str:
        other = "" if self.runner_up is None else (f"; best {self.runner_up[0]}: {self.runner_up[1]:.2f} mm, misfit "
                                                   f"{self.runner_up[2]:.3f}")
        return (f"{self.profile}, {self.thickness:.2f} mm across RAS+ axis {self.axis} (estimated from the scan's "
                f"spectra, misfit {self.misfit:.3f}{other})")


def line_spectrum(data: np.ndarray, axis: int) -> np.ndarray:
    """The mean power spectrum of the lines of ``data`` along ``axis``: each line's mean removed, Hann-windowed;
    bins ``0 .. n // 2`` (``numpy.fft.rfftfreq`` of the axis length)."""
    x = np.moveaxis(np.asarray(data, dtype=np.float64), axis, -1)
    x = x - x.mean(axis=-1, keepdims=True)
    power = np.abs(np.fft.rfft(x * np.hanning(x.shape[-1]), axis=-1)) ** 2
    return power.reshape(-1, power.shape[-1]).mean(axis=0)


def _band(n: int, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies (1/mm) of the through-plane bins used, and their indices: above the third bin, below 80 % of
    the Nyquist frequency."""
    f = np.fft.rfftfreq(n, spacing)
    keep = np.flatnonzero((np.arange(f.size) >= 3) & (f <= 0.8 * f[-1]))
    return f[keep], keep


def _acquire(data: np.ndarray, axis: int, spacing: float, slices: SliceAcquisition) -> np.ndarray:
    """``data`` (voxel ``spacing`` along ``axis``) acquired along ``axis`` by ``slices``."""
    matrix = slices.build(data.shape[axis], spacing).matrix
    return np.moveaxis(np.tensordot(matrix, np.moveaxis(data, axis, 0), axes=(1, 0)), 0, axis)


def estimate_slice_profile(lr: Volume, *, axis: int | None = None, shapes: Sequence[str] = ("gaussian", "rect"),
                           widths: Sequence[float] = DEFAULT_WIDTHS) -> ProfileEstimate:
    """Estimate the slice profile of a thick-slice scan (see the module docstring).

    Args:
        lr: the scan, any orientation.
        axis: the RAS+ axis of its slices (default: the coarsest).
        shapes: candidate profile shapes.
        widths: candidate FWHM / widths, in units of the slice spacing.

    Returns:
        The best candidate, with the best of the other shape.

    Raises:
        ValueError: when the scan has too few slices, or no in-plane axis finer than 0.8 of the slice spacing.
    """
    canon = lr.canonical()
    spacing = np.asarray(canon.spacing, dtype=np.float64)
    axis = int(np.argmax(spacing)) if axis is None else int(axis)
    data = canon.data.astype(np.float64)
    step = float(spacing[axis])
    in_plane = [b for b in range(3) if b != axis and spacing[b] <= 0.8 * step]
    if not in_plane:
        raise ValueError(f"no in-plane axis is finer than 0.8 of the slice spacing ({step:g} mm): nothing to "
                         "compare")
    f, keep = _band(data.shape[axis], step)
    if f.size < 4:
        raise ValueError(f"{data.shape[axis]} slices give too few frequencies to estimate a profile")
    best: dict[str, tuple[float, float]] = {}
    for shape in shapes:
        for w in widths:
            diff = []
            for b in in_plane:
                h = float(spacing[b])
                # the candidate along b twice: as a blur on the fine grid (the through-plane lines then carry it
                # across, as the in-plane lines carry the true profile across), and as the acquisition itself
                blurred = _acquire(data, b, h, SliceAcquisition(b, float(w) * step, h, shape))
                acquired = _acquire(data, b, h, SliceAcquisition(b, float(w) * step, step, shape))
                target = np.log(line_spectrum(blurred, axis)[keep] + 1e-30)
                fs = np.fft.rfftfreq(acquired.shape[b], step)
                diff.append(target - np.log(np.interp(f, fs, line_spectrum(acquired, b)) + 1e-30))
            misfit = float(np.mean([d.std() for d in diff]))
            if shape not in best or misfit < best[shape][1]:
                best[shape] = (float(w) * step, misfit)
    ranked = sorted(best.items(), key=lambda kv: kv[1][1])
    (shape, (thickness, misfit)), others = ranked[0], ranked[1:]
    runner = None if not others else (others[0][0], others[0][1][0], others[0][1][1])
    return ProfileEstimate(shape, thickness, axis, misfit, runner)
