"""Image-quality metrics against values computed by hand on small arrays, with and without masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gen_sr.eval.metrics import foreground, hfen, image_metrics, nrmse, psnr, region_masks, ssim, ssim_volume

REF = np.array([0.0, 1.0, 2.0, 3.0])
EST = REF + np.array([1.0, 0.0, 0.0, 0.0])
LEFT = np.array([True, True, False, False])


def test_psnr_by_hand() -> None:
    assert psnr(EST, REF) == pytest.approx(10 * np.log10(9 / 0.25))  # range 3, MSE 1/4
    assert psnr(EST, REF, mask=LEFT) == pytest.approx(10 * np.log10(1 / 0.5))  # range 1 inside, MSE 1/2
    assert psnr(EST, REF, data_range=1.0) == pytest.approx(10 * np.log10(1 / 0.25))
    assert psnr(REF, REF) == float("inf")


def test_nrmse_by_hand() -> None:
    assert nrmse(np.array([0.0, 4.0]), np.array([3.0, 4.0])) == pytest.approx(3 / 5)
    assert nrmse(EST, REF, mask=LEFT) == pytest.approx(1 / 1)  # ‖(1, 0)‖ / ‖(0, 1)‖


def test_hfen_sees_edges_not_offsets() -> None:
    ref = np.random.default_rng(0).random((10, 12, 8))
    assert hfen(ref + 5.0, ref) == pytest.approx(0.0, abs=1e-12)  # a constant has no Laplacian
    assert hfen(2 * ref, ref) == pytest.approx(1.0)  # the filter is linear: ‖LoG r‖ / ‖LoG r‖
    assert hfen(2 * ref, ref, mask=ref > 0.5) == pytest.approx(1.0)


def test_ssim_of_constant_images_by_hand_and_inside_a_mask() -> None:
    c1 = (0.01 * 1.0) ** 2
    ref = np.full((32, 32), 0.5)
    est = np.full((32, 32), 0.25)
    expected = (2 * 0.5 * 0.25 + c1) / (0.5**2 + 0.25**2 + c1)  # the structure terms are C2 / C2 = 1
    assert ssim_volume(est, ref, data_range=1.0) == pytest.approx(expected, rel=1e-6)
    half = ref.copy()
    half[:, 16:] = 0.25
    mask = np.zeros_like(ref, dtype=bool)
    mask[:, :8] = True  # windows centred here (11 wide) never reach column 16
    assert ssim_volume(half, ref, mask=mask, data_range=1.0) == pytest.approx(1.0)
    assert ssim_volume(half, ref, data_range=1.0) < 0.95
    batch = torch.from_numpy(np.stack([ref, half]))[:, None]
    assert ssim(batch, torch.from_numpy(np.stack([ref, ref]))[:, None], data_range=1.0).tolist() == pytest.approx(
        [1.0, ssim_volume(half, ref, data_range=1.0)], rel=1e-5)


def test_image_metrics_and_errors() -> None:
    ref = np.random.default_rng(1).random((12, 12, 12))
    m = image_metrics(ref, ref)
    assert m["psnr"] == float("inf") and m["ssim"] == pytest.approx(1.0) and m["nrmse"] == 0 and m["hfen"] == 0
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(ref, ref[:-1])
    with pytest.raises(ValueError, match="empty"):
        psnr(ref, ref, mask=np.zeros(ref.shape, dtype=bool))


def test_region_masks_from_tissues_labels_and_foreground() -> None:
    gm = np.array([[0.9, 0.3, 0.1], [0.6, 0.2, 0.0]])
    wm = np.array([[0.1, 0.7, 0.2], [0.3, 0.4, 0.0]])
    labels = np.array([[0, 2, 2], [1, 0, 0]])
    masks = region_masks(brain=gm + wm > 0.5, tissues={"GM": gm, "WM": wm}, labels=labels, label_names={2: "lesion"})
    assert masks["GM"].tolist() == [[True, False, False], [True, False, False]]
    assert masks["WM"].tolist() == [[False, True, False], [False, False, False]]
    assert masks["lesion"].sum() == 2 and masks["label 1"].sum() == 1
    assert masks["brain"].tolist() == [[True, True, False], [True, True, False]]
    ref = np.zeros((8, 8, 8))
    ref[2:6, 2:6, 2:6] = 1.0
    ref[3:5, 3:5, 3:5] = 0.0  # a hole inside: still brain
    assert region_masks(ref)["foreground"].sum() == 64
    assert foreground(ref, fill_holes=False).sum() == 64 - 8 and foreground(ref + 5.0).sum() == 64  # offset-free
    ref[2:6, 2:6, 2] = 0.05  # a face below 10 % of the range: outside, and the hole opens through it
    assert foreground(ref).sum() == 64 - 16 - 8 and foreground(ref, 0.02).sum() == 64
    assert foreground(ref, smooth=1.0).sum() > foreground(ref, smooth=1.0, fraction=0.5).sum()


def test_slice_jitter_by_hand() -> None:
    from gen_sr.eval.metrics import slice_jitter

    ref = np.zeros((4, 3))
    ref[:, 1] = [0.0, 1.0, 2.0, 3.0]  # differences along axis 0: 1 in column 1, 0 elsewhere
    est = ref.copy()
    est[:, 2] = [0.0, 1.0, 0.0, 1.0]  # alternating slices: Δ² = 1 three times more
    assert slice_jitter(ref, ref, axis=0) == pytest.approx(1.0)
    assert slice_jitter(est, ref, axis=0) == pytest.approx(2.0)  # (3 + 3) / 3
    assert slice_jitter(est, ref, axis=0, mask=np.array([[True, True, False]] * 4)) == pytest.approx(1.0)
    assert slice_jitter(np.zeros_like(ref), ref, axis=0) == 0.0  # blurred flat across slices
