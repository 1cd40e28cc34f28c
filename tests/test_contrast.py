"""Contrast randomisation (gen_sr.contrast): synthesised contrasts follow the tissue maps; remaps keep the
background, and monotone ones keep the order of intensities."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from gen_sr.contrast import ContrastRanges, draw_tissue_means, random_remap, randomize_appearance, synthesize_contrast
from gen_sr.data import DataConfig, SRPairDataset, load_training_volumes
from gen_sr.model_card import AcquisitionRanges
from gen_sr.sample_data import load_mni152


def test_synthesised_contrast_gives_each_pure_tissue_its_drawn_intensity() -> None:
    gm, wm = load_mni152("gm").data, load_mni152("wm").data
    tissues = {"GM": gm, "WM": wm}
    means = draw_tissue_means(list(tissues), np.random.default_rng(3))
    image = synthesize_contrast(tissues, means, background=0.02)
    for name, p in tissues.items():
        pure = p > 0.99  # the other class holds at most 1 % there
        assert pure.sum() > 1000
        assert float(image[pure].mean()) == pytest.approx(means[name], abs=0.01)
    nothing = (gm + wm) < 1e-6
    assert float(np.abs(image[nothing] - 0.02).max()) < 1e-6
    other = draw_tissue_means(list(tissues), np.random.default_rng(4))
    assert other != means  # each draw is another contrast
    with pytest.raises(ValueError, match="name different classes"):
        synthesize_contrast(tissues, {"GM": 0.5})


def test_remaps_keep_the_background_and_monotone_ones_keep_the_order() -> None:
    x = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    x[:5] = 0
    rng = np.random.default_rng(1)
    up = random_remap(x, rng, monotone=True)
    assert up.dtype == np.float32 and up.shape == x.shape and float(np.abs(up[:5]).max()) == 0.0
    assert spearmanr(x.ravel(), up.ravel())[0] > 0.999 and np.all(np.diff(up.ravel()[np.argsort(x.ravel())]) >= 0)
    swapped = [spearmanr(x.ravel(), random_remap(x, np.random.default_rng(s), monotone=False).ravel())[0]
               for s in range(10)]
    assert min(swapped) < 0.9  # non-monotone maps reorder tissues for some draws
    assert 0 <= float(up.min()) and float(up.max()) <= 1


def test_training_items_take_other_contrasts_when_asked_and_only_then() -> None:
    volumes = load_training_volumes(DataConfig())
    plain = DataConfig(crop_size=(16, 16), acquisition=AcquisitionRanges(snr=None))
    remapped = DataConfig(crop_size=(16, 16), acquisition=AcquisitionRanges(snr=None),
                          contrast=ContrastRanges(remap_probability=1.0))
    a, b = (SRPairDataset(volumes, c, length=8, seed=5) for c in (plain, remapped))
    again = SRPairDataset(volumes, remapped, length=8, seed=5)
    assert all(np.array_equal(b[i]["hr"], again[i]["hr"]) for i in range(8))  # still a function of the index
    assert not any(np.allclose(a[i]["hr"], b[i]["hr"]) for i in range(8))
    with pytest.raises(ValueError, match="must lie in"):
        ContrastRanges(remap_probability=1.5)


def test_items_from_the_template_take_contrasts_made_from_its_tissue_maps() -> None:
    cfg = DataConfig(crop_size=(32, 32), acquisition=AcquisitionRanges(snr=None),
                     contrast=ContrastRanges(synthesis_probability=1.0))
    [volume] = load_training_volumes(cfg)
    assert volume.tissues is not None and volume.tissues.shape == (3, *volume.data.shape)
    plain = SRPairDataset(load_training_volumes(DataConfig(crop_size=(32, 32), acquisition=AcquisitionRanges(
        snr=None))), DataConfig(crop_size=(32, 32), acquisition=AcquisitionRanges(snr=None)), length=6, seed=2)
    synth = SRPairDataset([volume], cfg, length=6, seed=2)
    for i in range(6):
        hr = synth[i]["hr"][0].numpy()
        assert hr.shape == (32, 32) and 0 <= float(hr.min()) and float(hr.max()) <= 1.0
        assert not np.allclose(hr, plain[i]["hr"][0].numpy(), atol=0.05)  # another contrast than the T1's
    # a volume without tissue maps keeps its own contrast whatever the probability
    assert np.array_equal(SRPairDataset([(volume.data, volume.spacing)], cfg, length=6, seed=2)[3]["hr"],
                          plain[3]["hr"])


def test_appearance_is_a_smooth_bias_field_and_a_blur_drawn_from_the_item() -> None:
    image = synthesize_contrast({"WM": np.pad(np.ones((40, 40)), 12)}, {"WM": 0.6})
    off = randomize_appearance(image, np.random.default_rng(0), ContrastRanges())
    assert np.array_equal(off, image)  # nothing asked, nothing done
    biased = ContrastRanges(bias_coefficient=0.3)
    a = randomize_appearance(image, np.random.default_rng(1), biased)
    assert np.array_equal(a, randomize_appearance(image, np.random.default_rng(1), biased))
    assert not np.allclose(a, randomize_appearance(image, np.random.default_rng(2), biased))
    inside = image > 0
    field = a[inside] / image[inside]  # multiplicative: the field itself, where there is signal
    assert field.std() > 0.01 and 0.2 < field.min() and field.max() < 5
    assert float(np.abs(np.diff(a[inside].reshape(40, 40), axis=1)).max()) < 0.05  # smooth across the tissue
    assert float(np.abs(a[~inside]).max()) == 0.0  # the background stays dark
    blurred = randomize_appearance(image, np.random.default_rng(1), ContrastRanges(blur_sigma=(1.0, 2.0)))
    assert np.abs(np.diff(blurred, axis=0)).max() < 0.5 * np.abs(np.diff(image, axis=0)).max()
    assert float(blurred.sum()) == pytest.approx(float(image.sum()), rel=1e-3)  # a blur moves intensity, no more
    with pytest.raises(ValueError, match="blur_sigma"):
        ContrastRanges(blur_sigma=(2.0, 1.0))
