"""Contrast randomisation for training (the idea of SynthSeg and SynthSR): the prior should not be tied to T1.

Two ways to give a training item another contrast, on normalised intensities (about [0, 1], background 0):

* :func:`random_remap`: a random piecewise-linear intensity map through evenly spaced knots, monotone (the
  contrast changes, the order of tissues does not) or not (tissues can swap places, as between T1 and T2). The
  background stays 0, as it is dark in every magnitude contrast.
* :func:`synthesize_contrast`: an image made from tissue probability maps, ``Σ_k p_k μ_k`` with a drawn intensity
  ``μ_k`` per tissue (:func:`draw_tissue_means`), before any bias field, blur or noise; the mean intensity of a
  pure voxel of tissue ``k`` is then exactly ``μ_k``.
* :func:`randomize_appearance`: what a scanner adds to such an image, a smooth multiplicative bias field and a blur
  (MONAI's ``RandBiasField`` and ``GaussianSmooth``). Noise is not added here: every training item's acquisition
  draws its own (``data.acquisition.snr``), on the measured data where a scanner puts it.

:class:`ContrastRanges` is the ``data.contrast`` section of an experiment: how often items are remapped.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from monai.transforms import GaussianSmooth, RandBiasField

__all__ = ["ContrastRanges", "draw_tissue_means", "random_remap", "randomize_appearance", "synthesize_contrast"]


@dataclass
class ContrastRanges:
    """How training items are given other contrasts.

    Attributes:
        synthesis_probability: fraction of the items from volumes with tissue maps (the MNI152 template) whose
            image is replaced by :func:`synthesize_contrast` with newly drawn tissue intensities, before any remap.
        remap_probability: fraction of items whose intensities pass through a :func:`random_remap` (0: none, the
            items keep the volumes' own contrast).
        nonmonotone_fraction: of the remapped items, the fraction with a non-monotone map.
        knots: knots of the maps, evenly spaced on [0, 1] (the first one, at 0, maps to 0).
        bias_coefficient: the synthesised images' bias field is ``exp`` of a Legendre polynomial of degree 3 over
            the crop whose coefficients are drawn in ``[-bias_coefficient, bias_coefficient]`` (0: none).
        blur_sigma: the synthesised images are blurred by a Gaussian whose width in pixels is drawn in this range
            (``(0, 0)``: none).
    """

    synthesis_probability: float = 0.0
    remap_probability: float = 0.0
    nonmonotone_fraction: float = 0.5
    knots: int = 6
    bias_coefficient: float = 0.0
    blur_sigma: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        for name in ("synthesis_probability", "remap_probability", "nonmonotone_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.knots < 2:
            raise ValueError(f"knots must be at least 2, got {self.knots}")
        if self.bias_coefficient < 0:
            raise ValueError(f"bias_coefficient must be >= 0, got {self.bias_coefficient}")
        self.blur_sigma = (float(self.blur_sigma[0]), float(self.blur_sigma[1]))
        if not 0 <= self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must be a range (low, high) with 0 <= low <= high, got {self.blur_sigma}")


def random_remap(x: np.ndarray, rng: np.random.Generator, *, monotone: bool, knots: int = 6) -> np.ndarray:
    """``x`` (normalised intensities) through a random piecewise-linear map with ``knots`` knots evenly spaced on
    [0, 1]: 0 maps to 0, the other knots to values drawn uniformly in [0, 1] (sorted when ``monotone``, so the map
    never decreases). Values beyond 1 take the last knot's value. Returns float32 of ``x``'s shape."""
    at = np.linspace(0.0, 1.0, knots)
    values = rng.uniform(0.0, 1.0, knots - 1)
    values = np.concatenate([[0.0], np.sort(values) if monotone else values])
    return np.interp(np.asarray(x, dtype=np.float64), at, values).astype(np.float32)


def draw_tissue_means(names: Sequence[Hashable], rng: np.random.Generator, low: float = 0.05,
                      high: float = 1.0) -> dict[Hashable, float]:
    """A random intensity per tissue, drawn uniformly in ``[low, high]`` (any order: any contrast)."""
    return {name: float(rng.uniform(low, high)) for name in names}


def synthesize_contrast(tissues: Mapping[Hashable, np.ndarray], means: Mapping[Hashable, float],
                        background: float = 0.0) -> np.ndarray:
    """An image from tissue probability maps: ``Σ_k p_k μ_k + (1 − Σ_k p_k) · background``.

    Args:
        tissues: probability maps of one shape, e.g. ``{"GM": gm, "WM": wm, "CSF": csf}``; where they sum to more
            than 1 they are scaled down to sum to 1.
        means: the intensity of each tissue (:func:`draw_tissue_means`).
        background: the intensity where no tissue is.

    Returns:
        float32, the maps' shape.
    """
    names = list(tissues)
    if set(names) != set(means):
        raise ValueError(f"tissues {sorted(names)} and means {sorted(means)} name different classes")
    p = np.stack([np.clip(np.asarray(tissues[n], dtype=np.float64), 0.0, 1.0) for n in names])
    total = p.sum(axis=0)
    p = p / np.maximum(total, 1.0)
    mu = np.asarray([means[n] for n in names], dtype=np.float64).reshape(-1, *[1] * (p.ndim - 1))
    return ((p * mu).sum(axis=0) + (1.0 - np.minimum(total, 1.0)) * background).astype(np.float32)


def randomize_appearance(image: np.ndarray, rng: np.random.Generator, ranges: ContrastRanges) -> np.ndarray:
    """A synthesised image as a scanner would show it: times a random smooth bias field, then blurred, with the
    strengths that ``ranges`` allow (``bias_coefficient``, ``blur_sigma``); the background stays 0.

    Args:
        image: ``(H, W)`` or ``(D, H, W)``, normalised intensities.
        rng: the item's generator (the field and the width are functions of it).
        ranges: the ``data.contrast`` section.

    Returns:
        float32 of ``image``'s shape.
    """
    out = np.asarray(image, dtype=np.float32)[None]
    if ranges.bias_coefficient > 0:
        field = RandBiasField(degree=3, coeff_range=(-ranges.bias_coefficient, ranges.bias_coefficient), prob=1.0)
        field.set_random_state(seed=int(rng.integers(2**31)))
        out = np.asarray(field(out), dtype=np.float32)
    low, high = ranges.blur_sigma
    if high > 0:
        out = np.asarray(GaussianSmooth(sigma=float(rng.uniform(low, high)))(out), dtype=np.float32)
    return out[0]
