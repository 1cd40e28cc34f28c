"""Cutting whole volumes into the tiles a model runs on, and putting them back.

* :class:`SliceTiler` for 2D models: every slice across one axis is a tile ``(a, b)``, whose second axis is the
  super-resolved one (as in training, see :mod:`gen_sr.data`). Tiles do not overlap; merging stacks them.
* :class:`PatchTiler` for 3D models: overlapping patches, merged with a Gaussian importance map (MONAI's
  ``dense_patch_slices`` and ``compute_importance_map``), so no seams show between patches. It works on 2D images
  too.
* :class:`SlicePatchTiler` for 2D models on wide slices: each slice cut into overlapping 2D patches (a
  :class:`SliceTiler`, then a 2D :class:`PatchTiler` on every slice), so that the network sees tiles of about its
  training size and attention stays cheap.
* :class:`ForegroundTiles` wraps any of them and leaves out the tiles with no foreground: sampling runs on the
  others only, and the left-out tiles are filled with a fixed image (the condition) when merging.

:func:`merge_adjoint` is the transpose of any of their merges, for gradients taken through a merge: for the weighted
merges it is not ``split``.

Both pad tiles to a multiple of the autoencoder's (and UNet's) downsampling factor with zeros, as training did, and
crop the padding away when merging. Volumes are ``(N, C, X, Y, Z)`` (``N`` samples); tiles are
``(N * T, C, *tile)`` with the ``T`` tiles of sample ``n`` at ``n * T … n * T + T − 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from monai.data.utils import dense_patch_slices
from monai.inferers.utils import compute_importance_map

__all__ = ["ForegroundTiles", "PatchTiler", "SlicePatchTiler", "SliceTiler", "Tiler", "merge_adjoint"]


class Tiler(Protocol):
    """What a tiler offers: ``num_tiles`` tiles of ``tile_shape`` per sample, :meth:`split` and :meth:`merge`."""

    num_tiles: int
    tile_shape: tuple[int, ...]

    def split(self, volume: torch.Tensor) -> torch.Tensor: ...
    def merge(self, tiles: torch.Tensor) -> torch.Tensor: ...


def _round_up(n: int, multiple: int) -> int:
    return multiple * math.ceil(n / multiple)


class SliceTiler:
    """2D tiles: the slices of a volume across ``normal``, each ``(other, sr_axis)``.

    Args:
        volume_shape: spatial shape ``(X, Y, Z)``.
        normal: the axis slices are taken across.
        sr_axis: the super-resolved axis; it becomes the tiles' second axis.
        multiple: tile sizes are padded up to a multiple of this.
    """

    def __init__(self, volume_shape: Sequence[int], normal: int, sr_axis: int, multiple: int) -> None:
        if normal == sr_axis or not {normal, sr_axis} <= {0, 1, 2}:
            raise ValueError(f"slices across axis {normal} cannot contain the super-resolved axis {sr_axis}")
        self.volume_shape = tuple(volume_shape)
        self.normal = normal
        other = ({0, 1, 2} - {normal, sr_axis}).pop()
        self.order = (normal, other, sr_axis)  # spatial axes of the volume in tile order
        self.inverse = tuple(self.order.index(a) for a in range(3))
        self.size = (self.volume_shape[other], self.volume_shape[sr_axis])
        self.tile_shape = tuple(_round_up(n, multiple) for n in self.size)
        self.num_tiles = self.volume_shape[normal]

    def split(self, volume: torch.Tensor) -> torch.Tensor:
        """``(N, C, X, Y, Z)`` → ``(N * T, C, *tile_shape)``."""
        n, c = volume.shape[:2]
        v = volume.permute(0, 2 + self.order[0], 1, 2 + self.order[1], 2 + self.order[2])  # (N, T, C, a, b)
        v = v.reshape(n * self.num_tiles, c, *self.size)
        pad = [0, self.tile_shape[1] - self.size[1], 0, self.tile_shape[0] - self.size[0]]
        return F.pad(v, pad)

    def merge(self, tiles: torch.Tensor) -> torch.Tensor:
        """``(N * T, C, *tile_shape)`` → ``(N, C, X, Y, Z)``."""
        c = tiles.shape[1]
        v = tiles[..., : self.size[0], : self.size[1]].reshape(-1, self.num_tiles, c, *self.size)
        v = v.permute(0, 2, 1, 3, 4)  # (N, C, normal, other, sr)
        return v.permute(0, 1, *(2 + a for a in self.inverse))


class PatchTiler:
    """Overlapping patches blended with a Gaussian importance map, in 3D (or 2D: every shape below 2D).

    Args:
        volume_shape: spatial shape ``(X, Y, Z)`` (or ``(H, W)``).
        patch_size: patch size (a multiple of ``multiple``; smaller volumes are padded).
        overlap: fraction of overlap between neighbouring patches.
        multiple: the volume is padded to at least the patch size and a multiple of this.
    """

    def __init__(self, volume_shape: Sequence[int], patch_size: Sequence[int], overlap: float, multiple: int) -> None:
        if any(p % multiple for p in patch_size):
            raise ValueError(f"patch_size {tuple(patch_size)} must be a multiple of {multiple}")
        self.volume_shape = tuple(volume_shape)
        self.padded = tuple(max(_round_up(n, multiple), p) for n, p in zip(volume_shape, patch_size, strict=True))
        self.tile_shape = tuple(patch_size)
        interval = tuple(max(1, int(p * (1 - overlap))) for p in patch_size)
        self.slices = dense_patch_slices(self.padded, self.tile_shape, interval)
        self.num_tiles = len(self.slices)
        self.weight = compute_importance_map(self.tile_shape, mode="gaussian", sigma_scale=0.125, device="cpu")

    def split(self, volume: torch.Tensor) -> torch.Tensor:
        """``(N, C, X, Y, Z)`` → ``(N * T, C, *patch_size)``."""
        pad = []
        for n, p in zip(reversed(self.volume_shape), reversed(self.padded), strict=True):
            pad += [0, p - n]
        v = F.pad(volume, pad)
        tiles = torch.stack([v[(slice(None), slice(None), *s)] for s in self.slices], dim=1)
        return tiles.reshape(-1, *tiles.shape[2:])

    def merge(self, tiles: torch.Tensor) -> torch.Tensor:
        """``(N * T, C, *patch_size)`` → ``(N, C, X, Y, Z)``, a weighted average where patches overlap."""
        c = tiles.shape[1]
        tiles = tiles.reshape(-1, self.num_tiles, c, *self.tile_shape)
        weight = self.weight.to(tiles)
        out = tiles.new_zeros(tiles.shape[0], c, *self.padded)
        norm = tiles.new_zeros(*self.padded)
        for i, s in enumerate(self.slices):
            out[(slice(None), slice(None), *s)] += tiles[:, i] * weight
            norm[s] += weight
        out = out / norm
        return out[(slice(None), slice(None), *(slice(0, n) for n in self.volume_shape))]


class SlicePatchTiler:
    """2D tiles cut from the slices of a volume: each slice across ``normal`` (as :class:`SliceTiler` cuts it,
    ``(other, sr_axis)``) into overlapping ``patch_size`` patches blended with a Gaussian importance map (a 2D
    :class:`PatchTiler`). A slice smaller than the patch along an axis is one patch wide there.

    Args:
        volume_shape: spatial shape ``(X, Y, Z)``.
        normal, sr_axis: as for :class:`SliceTiler`.
        patch_size: ``(h, w)``, multiples of ``multiple``.
        overlap: fraction of overlap between neighbouring patches.
        multiple: tile sizes are padded up to a multiple of this.
    """

    def __init__(self, volume_shape: Sequence[int], normal: int, sr_axis: int, patch_size: Sequence[int],
                 overlap: float, multiple: int) -> None:
        self.slices = SliceTiler(volume_shape, normal, sr_axis, multiple)
        self.normal = normal
        patch = tuple(min(int(p), n) for p, n in zip(patch_size, self.slices.tile_shape, strict=True))
        self.patches = PatchTiler(self.slices.tile_shape, patch, overlap, multiple)
        self.tile_shape = self.patches.tile_shape
        self.num_tiles = self.slices.num_tiles * self.patches.num_tiles

    def split(self, volume: torch.Tensor) -> torch.Tensor:
        """``(N, C, X, Y, Z)`` → ``(N * T, C, *patch_size)``, ``T`` = slices × patches per slice."""
        return self.patches.split(self.slices.split(volume))

    def merge(self, tiles: torch.Tensor) -> torch.Tensor:
        """``(N * T, C, *patch_size)`` → ``(N, C, X, Y, Z)``."""
        return self.slices.merge(self.patches.merge(tiles))


class ForegroundTiles:
    """Only the tiles of ``tiler`` where ``image`` has foreground; the others are filled with ``image`` itself.

    A tile is kept when ``image`` exceeds ``threshold`` anywhere in it (in any sample): a test on the condition
    image, made once, before sampling. :meth:`split` returns the kept tiles only, :meth:`merge` puts them back among
    the fixed ones. With no tile above the threshold, the first is kept, so that there is something to run.

    Args:
        tiler: a :class:`SliceTiler`, :class:`SlicePatchTiler` or :class:`PatchTiler`.
        image: ``(M, C, X, Y, Z)``, one image for every sample (``M = 1``) or one per sample.
        threshold: the foreground level, in ``image``'s units.
    """

    def __init__(self, tiler: SliceTiler | SlicePatchTiler | PatchTiler, image: torch.Tensor, threshold: float) -> None:
        self.tiler, self.tile_shape = tiler, tiler.tile_shape
        full = tiler.split(image)
        self.fill = full.reshape(image.shape[0], tiler.num_tiles, *full.shape[1:])  # (M, T, C, *tile)
        keep = self.fill.flatten(3).amax(dim=(0, 2, 3)) > threshold
        if not keep.any():
            keep[0] = True
        self.keep = keep
        self.num_tiles = int(keep.sum())
        self.skipped = tiler.num_tiles - self.num_tiles

    def split(self, volume: torch.Tensor) -> torch.Tensor:
        """``(N, C, X, Y, Z)`` → ``(N * K, C, *tile)``, the ``K`` kept tiles of each sample."""
        tiles = self.tiler.split(volume)
        tiles = tiles.reshape(volume.shape[0], self.tiler.num_tiles, *tiles.shape[1:])[:, self.keep.to(tiles.device)]
        return tiles.reshape(-1, *tiles.shape[2:])

    def merge(self, tiles: torch.Tensor) -> torch.Tensor:
        """``(N * K, C, *tile)`` → ``(N, C, X, Y, Z)``, the left-out tiles taken from the fixed image."""
        n = tiles.shape[0] // self.num_tiles
        fill = self.fill.to(tiles)
        full = (fill.expand(n, *fill.shape[1:]) if fill.shape[0] == 1 else fill).clone()
        full[:, self.keep.to(tiles.device)] = tiles.reshape(n, self.num_tiles, *tiles.shape[1:])
        return self.tiler.merge(full.reshape(-1, *full.shape[2:]))


def merge_adjoint(tiler: Tiler, volumes: torch.Tensor) -> torch.Tensor:
    """The transpose of ``tiler.merge``'s linear part applied to ``volumes``, by back-propagating through the merge
    (torch autograd): ``⟨merge(a) − merge(0), b⟩ = ⟨a, merge_adjoint(tiler, b)⟩`` for every ``a`` and ``b``. It is
    ``split`` for a :class:`SliceTiler` only: the weighted average of overlapping patches is not an orthogonal map.

    Args:
        tiler: any of this module's tilers.
        volumes: ``(N, C, X, Y, Z)``, e.g. a gradient with respect to the merged volumes.

    Returns:
        ``(N * T, C, *tile_shape)``, in ``volumes``' dtype and device (e.g. that gradient with respect to the tiles).
    """
    n, c = volumes.shape[:2]
    tiles = volumes.new_zeros(n * tiler.num_tiles, c, *tiler.tile_shape, requires_grad=True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(tiler.merge(tiles), tiles, grad_outputs=volumes)
    return grad
