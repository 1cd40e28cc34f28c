"""The data-disagreement map (gen_sr.risk.DataDisagreement): noise alone is not flagged, a local misfit is, where it
is; the background's non-Gaussian noise stays out; units do not matter. The refit that fits the data where the
output departs from it changes those measurements only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gen_sr.physics import AcquisitionOperator, SliceAcquisition
from gen_sr.pipelines.guidance import fit_where_data_disagree
from gen_sr.risk import DataDisagreement

SHAPE = (40, 40, 40)
SIGMA = 0.02


def _case(seed: int = 0) -> tuple[AcquisitionOperator, torch.Tensor, torch.Tensor, np.ndarray]:
    """A smooth object inside an empty border, 4 mm Gaussian slices on 1 mm, Gaussian noise inside the object and
    its magnitude (Rician) outside; returns the operator, the truth, the measurement and the HR ball."""
    op = AcquisitionOperator((SliceAcquisition(2, 4.0),), SHAPE, (1.0, 1.0, 1.0))
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) - (n - 1) / 2 for n in SHAPE], indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    ball = radius < 16
    truth = torch.from_numpy(np.where(ball, 1.0 + 0.2 * np.cos(grid[0] / 3) * np.sin(grid[1] / 4), 0.0))[None, None]
    clean = op.forward(truth)
    noise = SIGMA * torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = torch.where(clean > 1e-3, clean + noise, noise.abs())  # the background: magnitude (Rician) noise
    return op, truth, y, ball


def test_noise_alone_sits_at_its_median_and_is_rarely_flagged() -> None:
    op, truth, y, ball = _case()
    flag = DataDisagreement()
    stat = flag.statistic(op, truth, y, SIGMA)[0, 0].numpy()
    inner = np.sqrt(((np.indices(SHAPE) - 19.5) ** 2).sum(0)) < 12  # away from the rim, where it blends with zero
    assert np.median(stat[inner]) == pytest.approx(1.0, abs=0.1)
    assert flag.flags(stat)[ball].mean() < 0.01


def test_a_local_misfit_is_flagged_where_it_is_and_nowhere_else() -> None:
    op, truth, y, _ = _case()
    blob = np.sqrt(((np.indices(SHAPE) - np.array([12, 20, 20])[:, None, None, None]) ** 2).sum(0)) <= 3
    x = truth - 0.15 * torch.from_numpy(blob.astype(np.float64))  # a 7 mm lesion shown 0.15 fainter
    flag = DataDisagreement()
    stat = flag.statistic(op, x, y, SIGMA)[0, 0].numpy()
    flagged = flag.flags(stat)
    assert flagged[blob].mean() > 0.9
    near = np.sqrt(((np.indices(SHAPE) - np.array([12, 20, 20])[:, None, None, None]) ** 2).sum(0)) <= 3 + 2 * 4
    assert flagged.sum() > 0 and not (flagged & ~near).any()


def test_the_background_stays_out_and_units_do_not_matter() -> None:
    op, truth, y, _ = _case(1)
    flag = DataDisagreement()
    stat = flag.statistic(op, truth, y, SIGMA)
    measured = (y > flag.foreground * torch.quantile(y.flatten(), 0.99)).double()
    outside = op.interpolate(measured, "linear")[0, 0].numpy() == 0  # nothing of the foreground reaches these
    assert outside.sum() > 1000 and float(stat[0, 0].numpy()[outside].max()) == 0.0
    scaled = flag.statistic(op, 250 * truth + 0, 250 * y, 250 * SIGMA)
    torch.testing.assert_close(scaled, stat)
    with pytest.raises(ValueError, match="noise std"):
        flag.statistic(op, truth, y, 0.0)
    with pytest.raises(ValueError, match="positive"):
        DataDisagreement(size_mm=0)


def test_the_refit_fits_the_measurements_above_the_level_and_leaves_the_others() -> None:
    op, truth, y, _ = _case(2)
    blob = torch.from_numpy((np.sqrt(((np.indices(SHAPE) - np.array([12, 20, 20])[:, None, None, None]) ** 2)
                                     .sum(0)) <= 3).astype(np.float64))
    noise = torch.randn((2, 1, *SHAPE), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = truth - 0.15 * blob + 0.01 * noise  # two samples that both show the lesion fainter than the data
    flag = DataDisagreement()
    above = flag.measured_statistic(op, x.mean(0, keepdim=True), y, SIGMA) > flag.refit_level
    assert 0 < int(above.sum()) < above.numel() // 10
    refitted = fit_where_data_disagree(x, op, y, SIGMA, flag)
    before, after = op.forward(x), op.forward(refitted)
    m = above.expand_as(after)
    torch.testing.assert_close(after[m], y.expand_as(after)[m])  # fitted where the mean departed from the data
    torch.testing.assert_close(after[~m], before[~m])  # the same measurements as before everywhere else
    change = (refitted - x).abs().mean(dim=(0, 1))
    assert float(change[blob > 0].mean()) > 5 * float(change.mean())  # and the change is at the lesion


def test_the_refit_holds_on_two_sliced_axes() -> None:
    """Slices along two axes (the operator is their composition): the masked measurements are fitted, the others
    keep their values."""
    op = AcquisitionOperator((SliceAcquisition(0, 3.0), SliceAcquisition(2, 4.0)), SHAPE, (1.0, 1.0, 1.0))
    grid = np.indices(SHAPE).astype(np.float64)
    truth = torch.from_numpy(1.0 + 0.3 * np.sin(grid[0] / 5) * np.cos(grid[1] / 6))[None, None]
    clean = op.forward(truth)
    y = clean + SIGMA * torch.randn(clean.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    blob = torch.from_numpy((np.sqrt(((grid - np.array([20, 20, 20])[:, None, None, None]) ** 2).sum(0)) <= 4)
                            .astype(np.float64))
    x = (truth - 0.2 * blob).expand(2, 1, *SHAPE)
    flag = DataDisagreement()
    above = flag.measured_statistic(op, x.mean(0, keepdim=True), y, SIGMA) > flag.refit_level
    assert 0 < int(above.sum()) < above.numel() // 10
    after = op.forward(fit_where_data_disagree(x, op, y, SIGMA, flag))
    m = above.expand_as(after)
    torch.testing.assert_close(after[m], y.expand_as(after)[m])
    torch.testing.assert_close(after[~m], op.forward(x)[~m])


def test_the_refit_of_half_overlapping_slices_restores_the_lesion_without_fitting_the_noise() -> None:
    """4 mm slices at 2 mm spacing: the exact inverse would amplify the noise in the refitted region many times; the
    refit's gain floor keeps it near the noise while it still gives back most of what the lesion lost."""
    op = AcquisitionOperator((SliceAcquisition(2, 4.0, spacing=2.0),), SHAPE, (1.0, 1.0, 1.0))
    _, truth, _, _ = _case()
    clean = op.forward(truth)
    y = clean + SIGMA * torch.randn(clean.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    blob = torch.from_numpy((np.sqrt(((np.indices(SHAPE) - np.array([12, 20, 20])[:, None, None, None]) ** 2)
                                     .sum(0)) <= 3).astype(np.float64))
    x = (truth - 0.15 * blob).expand(2, 1, *SHAPE)
    floored = fit_where_data_disagree(x, op, y, SIGMA)
    exact = fit_where_data_disagree(x, op, y, SIGMA, DataDisagreement(refit_floor=0.0))
    changed = ((floored - x).abs() > 1e-9)[0, 0] & (blob == 0)  # the region the refit moved, the lesion left out
    assert int(changed.sum()) > 100

    def noise(z: torch.Tensor) -> float:
        return float((z - truth)[0, 0][changed].std())

    assert noise(exact) > 3 * SIGMA and noise(floored) < 1.5 * SIGMA
    lost = float((truth - x)[0, 0][blob > 0].mean())
    assert float((truth - floored)[0, 0][blob > 0].mean()) < 0.5 * lost
