"""Training pairs: deterministic per index, held-out slab never seen in training, acquisitions as configured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_nifti

from gen_sr.data import AcquisitionRanges, DataConfig, SRPairDataset, find_volumes, load_training_volumes
from gen_sr.errors import InputError


def _y_ramp(shape=(24, 40, 32)) -> np.ndarray:
    """Intensity = 1 + the voxel's index along axis 1 (the default held-out axis)."""
    return np.broadcast_to(1.0 + np.arange(shape[1], dtype=np.float32)[None, :, None], shape).copy()


def _dataset(cfg: DataConfig, split: str = "train", length: int = 20, volume: np.ndarray | None = None):
    data = _y_ramp() if volume is None else volume
    return SRPairDataset([(data, (1.0, 1.0, 1.0))], cfg, split=split, length=length, seed=3)


@pytest.mark.parametrize("crop", [(16, 16), (8, 8, 8)])
def test_items_are_deterministic_and_shaped(crop) -> None:
    cfg = DataConfig(crop_size=crop, min_foreground=0.0)
    a, b = _dataset(cfg), _dataset(cfg)
    for i in (0, 7):
        x, y = a[i], b[i]
        assert x["hr"].shape == x["lr"].shape == (1, *crop)
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a[0]["lr"], a[1]["lr"])
    with pytest.raises(IndexError):
        a[20]


@pytest.mark.parametrize(
    "crop,spacing,acquisition,in_plane,fits",
    [
        ((8, 8), (1.0, 1.0, 1.0), {"thickness": (2.0, 8.0), "gap": (0.0, 0.25)}, None, False),  # 8 mm, 10 mm slices
        ((8, 8), (1.0, 1.0, 1.0), {"thickness": (8.0, 8.0)}, None, True),  # one 8 mm slice: the operator's own rule
        ((7, 7), (1.0, 1.0, 1.0), {"thickness": (8.0, 8.0)}, None, False),
        ((8, 8), (1.0, 1.0, 1.0), {"thickness": (6.0, 6.0)}, (0.7, 1.5), False),  # resampled to 0.7 mm: 5.6 mm
        ((8, 8, 8), (1.0, 1.0, 0.5), {"thickness": (6.0, 6.0), "axis": 0}, None, True),
        ((8, 8, 8), (1.0, 1.0, 0.5), {"thickness": (6.0, 6.0), "any_axis": True}, None, False),  # 4 mm along z
    ],
)
def test_a_crop_that_holds_no_slice_is_refused_when_the_dataset_is_built(crop, spacing, acquisition, in_plane,
                                                                          fits) -> None:
    """The largest slice spacing drawn must fit in a crop along every axis an item may super-resolve, at the finest
    spacing an item has there; otherwise building the dataset says so, not an item's operator deep in training."""
    cfg = DataConfig(crop_size=crop, min_foreground=0.0, in_plane_spacing=in_plane,
                     slice_normals=[1] if len(crop) == 2 else [1, 2],
                     acquisition=AcquisitionRanges(snr=None, **acquisition))
    volume = np.random.default_rng(0).random((20, 20, 20), dtype=np.float32)
    if not fits:
        with pytest.raises(ValueError, match=rf"crop_size \({', '.join(map(str, crop))}\) holds no slice"):
            SRPairDataset([(volume, spacing)], cfg, length=8)
        return
    items = SRPairDataset([(volume, spacing)], cfg, length=8)
    assert all(items[i]["hr"].shape == (1, *crop) for i in range(len(items)))


def test_training_never_sees_the_held_out_slab() -> None:
    cfg = DataConfig(crop_size=(16, 16), holdout_fraction=0.25, min_foreground=0.0,
                     acquisition=AcquisitionRanges(snr=None))
    held_out_from = 1 + 40 - 10  # intensities of the last 10 indices along axis 1
    train, val = _dataset(cfg, "train", 200), _dataset(cfg, "val", 50)
    train_max = max(float(train[i]["hr"].max()) for i in range(len(train)))
    val_values = torch.cat([val[i]["hr"].flatten() for i in range(len(val))])
    assert train_max < held_out_from
    assert float(val_values[val_values > 0].min()) >= held_out_from  # zeros are padding


def test_training_never_sees_the_calibration_slab_either() -> None:
    cfg = DataConfig(crop_size=(16, 16), holdout_fraction=0.25, calibration_fraction=0.25, min_foreground=0.0,
                     acquisition=AcquisitionRanges(snr=None))
    calibration_from = 1 + 40 - 20  # along axis 1: training 0..19, calibration 20..29, held out 30..39
    train, val = _dataset(cfg, "train", 200), _dataset(cfg, "val", 50)
    assert max(float(train[i]["hr"].max()) for i in range(len(train))) < calibration_from
    val_values = torch.cat([val[i]["hr"].flatten() for i in range(len(val))])
    assert float(val_values[val_values > 0].min()) >= 1 + 30  # validation stays on the held-out slab


def test_the_three_slabs_tile_the_axis_in_order() -> None:
    from gen_sr.data import slab_bounds

    shape = (5, 233, 7)
    boxes = {s: slab_bounds(shape, 1, 0.2, s, 0.2) for s in ("train", "calibration", "val")}
    assert [(b[0][1], b[1][1]) for b in boxes.values()] == [(0, 139), (139, 186), (186, 233)]
    assert all(b[0][0] == b[0][2] == 0 and b[1][0] == 5 and b[1][2] == 7 for b in boxes.values())
    assert slab_bounds(shape, 1, 0.2, "calibration")[0][1] == slab_bounds(shape, 1, 0.2, "calibration")[1][1] == 186
    assert slab_bounds(shape, 1, 0.2, "train") == slab_bounds(shape, 1, 0.2, "train", 0.0)
    with pytest.raises(ValueError, match="split"):
        slab_bounds(shape, 1, 0.2, "test")


def test_the_acquisition_blurs_only_along_the_super_resolved_axis() -> None:
    rng = np.random.default_rng(0)
    # constant along the acquisition axis (2): the slice operator leaves it unchanged; varying along it: it doesn't
    flat = np.broadcast_to(rng.random((24, 40, 1), dtype=np.float32) + 0.5, (24, 40, 32)).copy()
    layered = np.broadcast_to(rng.random((1, 1, 32), dtype=np.float32) + 0.5, (24, 40, 32)).copy()
    cfg = DataConfig(crop_size=(16, 16), acquisition=AcquisitionRanges(snr=None, thickness=(3.0, 5.0)))
    for i in range(5):
        item = _dataset(cfg, volume=flat)[i]
        assert torch.allclose(item["lr"], item["hr"], atol=1e-5)
        item = _dataset(cfg, volume=layered)[i]
        assert float((item["lr"] - item["hr"]).abs().max()) > 1e-2
        assert 3.0 <= float(item["thickness"]) <= 5.0 and float(item["noise_std"]) == 0.0


def test_noise_and_profiles_follow_the_ranges() -> None:
    acq = AcquisitionRanges(snr=(10.0, 20.0), noise_free_fraction=0.0, gap=(0.5, 0.5), profiles=["rect"])
    cfg = DataConfig(crop_size=(16, 16), min_foreground=0.0, acquisition=acq)
    items = [_dataset(cfg)[i] for i in range(10)]
    assert all(float(it["noise_std"]) > 0 for it in items)
    assert all(float(it["spacing"]) == pytest.approx(1.5 * float(it["thickness"])) for it in items)


def test_foreground_crops_are_preferred() -> None:
    volume = np.zeros((24, 40, 32), np.float32)
    volume[:14, :20, :18] = 1.0  # an object in one corner of an empty field

    def fractions(min_foreground: float) -> list[float]:
        cfg = DataConfig(crop_size=(8, 8), min_foreground=min_foreground, acquisition=AcquisitionRanges(snr=None))
        return [float((_dataset(cfg, volume=volume)[i]["hr"] > 0.1).float().mean()) for i in range(12)]

    assert min(fractions(0.5)) >= 0.5
    assert min(fractions(0.0)) < 0.5  # without the preference, background crops do come up


def test_volume_loading_and_errors(tmp_path: Path) -> None:
    write_nifti(tmp_path / "a.nii.gz", _y_ramp())
    write_nifti(tmp_path / "b.nii", _y_ramp() * 2)
    (tmp_path / "notes.txt").write_text("ignored")
    assert [p.name for p in find_volumes([str(tmp_path)])] == ["a.nii.gz", "b.nii"]
    volumes = load_training_volumes(DataConfig(paths=[str(tmp_path)]))
    assert len(volumes) == 2 and volumes[0].data.max() == pytest.approx(volumes[1].data.max(), rel=1e-3)  # normalised
    assert volumes[0].tissues is None
    with pytest.raises(InputError, match="no such data"):
        find_volumes([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no \.nii"):
        find_volumes([str(tmp_path / "empty")])


@pytest.mark.parametrize(
    "kwargs,match",
    [({"crop_size": (16,)}, "crop_size"), ({"slice_normals": [2]}, "slice_normals"),
     ({"holdout_fraction": 1.5}, "holdout_fraction"),
     ({"holdout_fraction": 0.5, "calibration_fraction": 0.5}, "calibration_fraction"),
     ({"calibration_fraction": -0.1}, "calibration_fraction")],
)
def test_invalid_data_configs(kwargs, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_heldout_slab_is_the_far_end_in_place() -> None:
    from helpers import oblique_affine

    from gen_sr.data import slab, slab_bounds
    from gen_sr.volume import Volume

    vol = Volume(np.arange(10 * 20 * 6, dtype=np.float32).reshape(10, 20, 6), oblique_affine())
    held = slab(vol, axis=1, fraction=0.2)
    train = slab(vol, "train", axis=1, fraction=0.2)
    canon = vol.canonical()
    k = round(0.2 * canon.shape[1])
    assert held.shape == (canon.shape[0], k, canon.shape[2]) and k >= 2
    assert np.array_equal(held.data, canon.data[:, -k:]) and np.array_equal(train.data, canon.data[:, :-k])
    np.testing.assert_allclose(held.world_coordinates(), canon.world_coordinates()[:, -k:], atol=1e-9)
    train, val = (slab_bounds(canon.shape, 1, 0.2, s) for s in ("train", "val"))
    assert train[1][1] == val[0][1] == canon.shape[1] - k  # the two slabs meet without overlap


def test_read_volumes_takes_sample_names_files_and_folders(tmp_path: Path) -> None:
    from gen_sr.data import read_volumes

    (tmp_path / "sub").mkdir()
    write_nifti(tmp_path / "sub" / "a.nii.gz", np.random.default_rng(0).random((6, 7, 8)).astype(np.float32))
    named = read_volumes(["mni152", str(tmp_path / "sub"), str(tmp_path / "sub" / "a.nii.gz")])
    assert [n for n, _ in named] == ["mni152", "a", "a"]
    assert named[0][1].shape == (197, 233, 189) and named[1][1].shape == (6, 7, 8)


def test_any_axis_items_super_resolve_either_in_plane_axis_of_slices_in_every_orientation() -> None:
    """With ``acquisition.any_axis``, each item's super-resolved direction (always the item's W axis) comes from
    any of the three volume axes: a volume constant along one axis only is left unchanged for about a third of
    the items (those that chose that axis), and blurred for the rest."""
    rng = np.random.default_rng(0)
    acq = AcquisitionRanges(snr=None, thickness=(3.0, 5.0), any_axis=True)
    with pytest.raises(ValueError, match="slice_normals"):
        DataConfig(slice_normals=[0, 2], acquisition=AcquisitionRanges())  # fixed axis 2 cannot lie across slices
    cfg = DataConfig(crop_size=(16, 16), slice_normals=[0, 1, 2], acquisition=acq)
    for along in range(3):  # constant along `along`, varying along the other two
        shape = [24, 24, 24]
        shape[along] = 1
        volume = np.broadcast_to(rng.random(shape, dtype=np.float32) + 0.5, (24, 24, 24)).copy()
        data = _dataset(cfg, volume=volume, length=60)
        unchanged = [bool(torch.allclose(data[i]["lr"], data[i]["hr"], atol=1e-5)) for i in range(60)]
        assert 0.15 < np.mean(unchanged) < 0.55, (along, np.mean(unchanged))


def test_in_plane_spacing_resamples_each_slice_to_a_drawn_pixel_size() -> None:
    """A volume whose intensity is the position in mm along axis 0: after resampling to ``s`` mm pixels, the
    crop's intensity steps by ``s`` per pixel along that axis (the H axis of coronal slices), and the item
    reports that spacing."""
    mm = np.broadcast_to(np.arange(60, dtype=np.float32)[:, None, None], (60, 40, 48)).copy() + 1
    cfg = DataConfig(crop_size=(16, 16), slice_normals=[1], in_plane_spacing=(0.7, 1.5),
                     acquisition=AcquisitionRanges(snr=None), min_foreground=0.0)
    drawn = []
    for i in range(6):
        item = SRPairDataset([(mm, (1.0, 1.0, 1.0))], cfg, length=6, seed=1)[i]
        s = float(item["pixel_spacing"][0])
        drawn.append(s)
        assert float(item["pixel_spacing"][1]) == s and 0.7 <= s <= 1.5
        steps = np.diff(item["hr"][0].numpy(), axis=0)  # along x (H), where the intensity is the position in mm
        assert float(np.median(steps)) == pytest.approx(s, abs=0.005)
    assert np.ptp(drawn) > 0.2  # the pixel size changes from item to item
    with pytest.raises(ValueError, match="in_plane_spacing"):
        DataConfig(crop_size=(8, 8, 8), in_plane_spacing=(0.7, 1.5))


def test_noise_is_topped_up_so_that_each_simulated_sample_carries_the_items_noise() -> None:
    """Items that hold white noise of std sigma (a scan's in-plane slices): the thick slices average it down, and
    the top-up brings every sample back to sigma, as a real thick slice's noise."""
    import torch

    from gen_sr.data import top_up_noise
    from gen_sr.physics import AcquisitionOperator, SliceAcquisition

    sigma = 0.05
    x = torch.randn(1, 1, 256, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma
    op = AcquisitionOperator([SliceAcquisition(1, 4.0, None, "gaussian")], (256, 512), (1.0, 1.0))
    y = op(x)
    assert float(y.std()) < 0.6 * sigma  # averaged down
    topped, reported = top_up_noise(y, op, sigma, np.random.default_rng(0))
    assert reported == sigma and abs(float(topped.std()) / sigma - 1) < 0.03


def test_a_dataset_with_item_noise_draws_no_snr_noise() -> None:
    volume = np.random.default_rng(0).random((24, 24, 24)).astype(np.float32)
    cfg = DataConfig(crop_size=(16, 16), item_noise_std=0.02)
    item = SRPairDataset([(volume, (1.0, 1.0, 1.0))], cfg, "train", length=1)[0]
    assert float(item["noise_std"]) == pytest.approx(0.02)
