"""Tilings of whole volumes: every tiling puts a volume back exactly, keeps each sample's tiles together, the
in-slice patches of a 2D model are of the asked size, and :func:`merge_adjoint` is the transpose of every merge."""

from __future__ import annotations

import pytest
import torch

from gen_sr.pipelines.tiling import ForegroundTiles, PatchTiler, SlicePatchTiler, SliceTiler, merge_adjoint


def _volume(n: int = 2, shape=(9, 30, 21)) -> torch.Tensor:
    return torch.randn(n, 1, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("make", [
    lambda s: SliceTiler(s, 1, 2, 4),
    lambda s: PatchTiler(s, (8, 16, 12), 0.25, 4),
    lambda s: SlicePatchTiler(s, 0, 2, (16, 12), 0.25, 4),
    lambda s: SlicePatchTiler(s, 1, 0, (64, 64), 0.25, 4),  # patches larger than the slice: one per slice
])
def test_split_then_merge_gives_the_volume_back(make) -> None:
    volume = _volume()
    tiler = make(volume.shape[2:])
    tiles = tiler.split(volume)
    assert tiles.shape == (2 * tiler.num_tiles, 1, *tiler.tile_shape)
    torch.testing.assert_close(tiler.merge(tiles), volume, rtol=0, atol=1e-12)
    first = tiler.merge(torch.cat([tiles[: tiler.num_tiles], tiles[: tiler.num_tiles]]))  # sample 0's tiles only
    torch.testing.assert_close(first[1], volume[0], rtol=0, atol=1e-12)


def test_in_slice_patches_have_the_asked_size_and_cover_each_slice() -> None:
    tiler = SlicePatchTiler((9, 30, 21), 0, 2, (16, 12), 0.25, 4)
    assert tiler.tile_shape == (16, 12) and tiler.slices.tile_shape == (32, 24)
    assert tiler.num_tiles == 9 * tiler.patches.num_tiles and tiler.patches.num_tiles > 1


def test_foreground_tiles_run_only_where_the_image_has_foreground_and_fill_the_rest() -> None:
    image = torch.zeros(1, 1, 9, 30, 21, dtype=torch.float64)
    image[:, :, 2:5, 3:9, 4:10] = 1.0  # an object in a corner of the field of view
    base = SlicePatchTiler(image.shape[2:], 0, 2, (8, 8), 0.25, 4)
    tiles = ForegroundTiles(base, image, threshold=0.05)
    assert 0 < tiles.num_tiles < base.num_tiles and tiles.skipped == base.num_tiles - tiles.num_tiles
    volume = _volume(n=2, shape=(9, 30, 21))
    merged = tiles.merge(tiles.split(volume))
    kept_only = base.merge(base.split(image.expand(2, -1, -1, -1, -1)).clone())
    assert merged.shape == volume.shape
    obj = (slice(None), slice(None), slice(2, 5), slice(3, 9), slice(4, 10))  # every patch here is kept
    torch.testing.assert_close(merged[obj], volume[obj], rtol=0, atol=1e-12)
    far = (slice(None), slice(None), slice(6, 9), slice(24, 30), slice(15, 21))  # no kept patch reaches here
    torch.testing.assert_close(merged[far], kept_only[far])


def _foreground_tiles(shape) -> ForegroundTiles:
    image = torch.zeros(1, 1, *shape, dtype=torch.float64)
    image[:, :, 2:5, 3:9, 4:10] = 1.0
    return ForegroundTiles(SlicePatchTiler(shape, 0, 2, (8, 8), 0.25, 4), image, threshold=0.05)


@pytest.mark.parametrize("make", [
    lambda s: SliceTiler(s, 1, 2, 4),
    lambda s: PatchTiler(s, (8, 16, 12), 0.25, 4),
    lambda s: SlicePatchTiler(s, 0, 2, (16, 12), 0.25, 4),
    _foreground_tiles,  # an affine merge (the left-out tiles are fixed): its linear part's transpose
])
def test_merge_adjoint_is_the_transpose_of_the_merge(make) -> None:
    tiler = make((9, 30, 21))
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2 * tiler.num_tiles, 1, *tiler.tile_shape, generator=g, dtype=torch.float64)
    b = torch.randn(2, 1, 9, 30, 21, generator=g, dtype=torch.float64)
    merged = tiler.merge(a) - tiler.merge(torch.zeros_like(a))
    adjoint = merge_adjoint(tiler, b)
    assert adjoint.shape == a.shape and adjoint.dtype == b.dtype
    torch.testing.assert_close((a * adjoint).sum(), (merged * b).sum(), rtol=1e-12, atol=0)
    if isinstance(tiler, SliceTiler):  # non-overlapping tiles: the transpose is the split (the padding dropped)
        torch.testing.assert_close(adjoint, tiler.split(b), rtol=0, atol=0)
