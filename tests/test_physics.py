"""The acquisition operator: exact adjoint, projections, geometry, composition, serialisation and noise."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch

from gen_sr.physics import (
    AcquisitionOperator,
    AxisTransform,
    KSpaceTruncation,
    SliceAcquisition,
    add_noise,
    noise_std_for_snr,
    operator_from_spacings,
    structure_visibility,
)

# (transforms, hr_shape, hr_spacing): 2D and 3D, odd sizes, non-integer factors, gaps, overlaps, compositions.
CASES = {
    "slice-gauss-3d": ([SliceAcquisition(2, 4.0)], (9, 10, 33), (1.0, 1.0, 1.0)),
    "slice-rect-gap-3d": ([SliceAcquisition(0, 3.0, spacing=4.5, profile="rect")], (31, 7, 6), (1.0, 1.2, 0.8)),
    "slice-overlap-noninteger-3d": ([SliceAcquisition(1, 3.3, spacing=2.1)], (5, 27, 8), (1.1, 0.7, 1.0)),
    "slice-custom-profile-3d": ([SliceAcquisition(1, 2.6, profile=(0.0, 1.0, 3.0, 1.0, 0.0))], (6, 19, 5), (1, 1, 1)),
    "slice-2d": ([SliceAcquisition(1, 2.5)], (11, 23), (1.0, 1.0)),
    "kspace-2d": ([KSpaceTruncation(0, 2.0)], (17, 9), (1.0, 1.0)),
    "kspace-tukey-noninteger-3d": ([KSpaceTruncation(1, 2.7, window="tukey")], (6, 25, 7), (1.0, 0.9, 1.0)),
    "kspace-hamming-two-axes-3d": (
        [KSpaceTruncation(0, 1.5, window="hamming"), KSpaceTruncation(2, 3.0)], (13, 5, 20), (1, 1, 1),
    ),
    "composed-same-axis-3d": (
        [KSpaceTruncation(2, 1.3), SliceAcquisition(2, 3.0, profile="rect")], (7, 6, 29), (1.0, 1.0, 0.9),
    ),
    "composed-all-axes-3d": (
        [KSpaceTruncation(0, 2.0), KSpaceTruncation(1, 1.7, window="tukey"), SliceAcquisition(2, 5.0, spacing=6.0)],
        (15, 16, 37),
        (0.8, 0.8, 1.0),
    ),
    "composed-2d": ([SliceAcquisition(0, 2.0), KSpaceTruncation(1, 2.0, window="hamming")], (14, 21), (1.0, 1.0)),
}


def _op(name: str) -> AcquisitionOperator:
    transforms, shape, spacing = CASES[name]
    return AcquisitionOperator(transforms, shape, spacing)


def _rand(shape, batch=2, channels=2, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(batch, channels, *shape, dtype=dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", sorted(CASES))
def test_adjoint_dot_product(name: str) -> None:
    op = _op(name)
    x, y = _rand(op.hr_shape), _rand(op.lr_shape)
    lhs, rhs = (op(x) * y).sum(), (x * op.adjoint(y)).sum()
    assert abs(float(lhs - rhs)) <= 1e-6 * abs(float(lhs))


@pytest.mark.parametrize("name", sorted(CASES))
def test_project_is_consistent_and_idempotent(name: str) -> None:
    op = _op(name)
    x, y = _rand(op.hr_shape), op(_rand(op.hr_shape))
    p = op.project(x, y)
    assert _rel(op(p), y) < 1e-6
    assert _rel(op.project(p, y), p) < 1e-6
    # closest point: the correction is orthogonal to the null space, so moving along it only grows the distance
    null = _rand(op.hr_shape)
    null = null - op.pinv(op(null))
    assert abs(float(((p - x) * null).sum())) < 1e-6 * float((p - x).norm() * null.norm())


@pytest.mark.parametrize("name", sorted(CASES))
def test_pinv_matches_dense_pseudo_inverse(name: str) -> None:
    op = _op(name)
    dense = np.ones((1, 1))
    for a in range(op.spatial_dims):
        dense = np.kron(dense, op.axis_matrix(a))
    y = _rand(op.lr_shape, batch=1, channels=1)
    expected = np.linalg.pinv(dense) @ y.flatten().numpy()
    assert np.allclose(op.pinv(y).flatten().numpy(), expected, rtol=1e-6, atol=1e-8)
    assert np.allclose(op(_rand(op.hr_shape, 1, 1)).shape[2:], op.lr_shape)


@pytest.mark.parametrize(("thickness", "spacing", "capped"), [(4.0, 4.0, False), (2.0, 2.0, False), (4.0, 2.0, True)])
def test_the_pinv_floor_caps_the_noise_gain_and_leaves_slices_at_their_thickness_exact(
    thickness: float, spacing: float, capped: bool
) -> None:
    """A floor of 0.45 caps every axis's gain at 1 / (0.45 √(m / n)); slices spaced at their thickness have no
    singular value below it, so their pinv is the exact one, also along two axes."""
    hr_shape = (64, 10, 12)
    op = AcquisitionOperator([SliceAcquisition(0, thickness, spacing)], hr_shape, (1.0, 1.0, 1.0))
    noise = _rand(op.lr_shape, batch=1, channels=1)
    bound = noise.norm() / (0.45 * np.sqrt(op.lr_shape[0] / hr_shape[0]))
    floored, exact = op.pinv(noise, floor=0.45), op.pinv(noise)
    condition = op.upsample(noise, "pinv")  # what a pinv-conditioned model sees, in training and in the pipeline
    assert float(floored.norm()) <= float(bound) and float(condition.norm()) <= float(bound)
    torch.testing.assert_close(op.upsample(noise, "cubic"), op.interpolate(noise, "cubic"))
    if not capped:
        torch.testing.assert_close(floored, exact)
        torch.testing.assert_close(condition, exact)
        return
    assert float(exact.norm()) > 3 * float(bound)  # half-overlapping slices: the exact inverse amplifies noise
    smooth = op(torch.from_numpy(np.cos(np.arange(hr_shape[0]) / 9.0))[:, None, None].expand(hr_shape)[None, None])
    assert _rel(op(op.pinv(smooth, floor=0.45)), smooth) < 0.01  # what the slices measure well is still fitted
    two_axes = AcquisitionOperator([SliceAcquisition(0, 4.0), SliceAcquisition(2, 3.0)], (32, 6, 24), (1, 1, 1))
    y = _rand(two_axes.lr_shape, batch=1, channels=1)
    torch.testing.assert_close(two_axes.pinv(y, floor=0.45), two_axes.pinv(y))


def test_project_with_a_floor_is_one_damped_step_towards_the_data_not_a_projection() -> None:
    """Half-overlapping slices, whose weak components the floor caps: each application removes the residual of a
    component measured with singular value s only in the fraction (s / ŝ)², so a second one moves the result; the
    part of x that A does not see is kept, as by the exact projection."""
    op = AcquisitionOperator([SliceAcquisition(0, 4.0, 2.0)], (32, 4, 5), (1.0, 1.0, 1.0))
    assert op.capped_fraction(0.45) > 0
    x, y = _rand(op.hr_shape), op(_rand(op.hr_shape))
    once = op.project(x, y, floor=0.45)
    twice = op.project(once, y, floor=0.45)
    assert _rel(twice, once) > 0.01 and op.residual(twice, y).max() < op.residual(once, y).min()
    matrix = op.axis_matrix(0)
    u, s, _ = (torch.from_numpy(a) for a in np.linalg.svd(matrix, full_matrices=False))
    cap = 0.45 * np.sqrt(matrix.shape[0] / matrix.shape[1])  # pinv's ŝ = floor · √(m / n)
    assert bool((s < cap).any() and (s > cap).any())
    kept = 1 - torch.where(s < cap, (s / cap) ** 2, 1.0)  # the fraction of each component's residual left
    r0 = torch.einsum("lm,bcl...->bcm...", u, y - op(x))  # the residual in A's singular components
    r1 = torch.einsum("lm,bcl...->bcm...", u, y - op(once))
    torch.testing.assert_close(r1, kept[:, None, None] * r0)
    null = _rand(op.hr_shape)
    null = null - op.pinv(op(null))
    assert abs(float(((once - x) * null).sum())) < 1e-6 * float((once - x).norm() * null.norm())


@pytest.mark.parametrize("name", sorted(CASES))
def test_serialisation_round_trip(name: str) -> None:
    op = _op(name)
    back = AcquisitionOperator.from_json(json.dumps(op.to_dict()))
    assert back.lr_shape == op.lr_shape and back.lr_spacing == pytest.approx(op.lr_spacing)
    x = _rand(op.hr_shape)
    assert torch.equal(back(x), op(x))


_SLICE_STACKS = (
    SliceAcquisition(0, 4.0),
    SliceAcquisition(0, 4.0, profile="rect"),
    SliceAcquisition(0, 2.5, spacing=3.7),
    SliceAcquisition(0, 6.0, spacing=2.0),
    SliceAcquisition(0, 4.0, spacing=3.0, profile="rect"),
    SliceAcquisition(0, 1.7, profile=(0.2, 1.0, 0.2)),
)


def _stack_id(t: SliceAcquisition) -> str:
    return f"{t.profile}-{t.thickness:g}mm-every-{t.slice_spacing:g}mm"


@pytest.mark.parametrize("t", _SLICE_STACKS, ids=_stack_id)
def test_slice_rows_sum_to_one_and_centre_on_the_slice_within_the_grid(t: SliceAcquisition) -> None:
    """Each row sums to 1; a slice whose profile lies within the HR grid has its profile-weighted mean HR position
    at its centre."""
    factor = t.build(41, 0.9)
    m = factor.matrix
    centres = factor.first_center + factor.spacing * np.arange(m.shape[0])
    assert np.allclose(m.sum(axis=1), 1.0, atol=1e-12) and m.min() >= 0
    inside = (centres >= t._half_support()) & (centres <= 40 * 0.9 - t._half_support())
    assert inside.sum() >= 3
    assert np.abs(m[inside] @ (0.9 * np.arange(41)) - centres[inside]).max() < 1e-9


@pytest.mark.parametrize("t", _SLICE_STACKS, ids=_stack_id)
def test_end_slices_see_the_object_continued_by_the_end_voxels(t: SliceAcquisition) -> None:
    """A slice whose profile reaches past the HR grid's outermost voxel centre keeps its whole profile and sees the
    object continued by the end voxels: ``A`` on a crop is ``A`` on that crop edge-padded (whose rows lie within
    the padded grid). The profile truncated where the grid ends made the end rows of 4 mm Gaussian slices half as
    wide as the others (benchmarks/END_SLICES.md)."""
    n, h = 41, 0.9
    pad = math.ceil(t._half_support() / h) + 2
    padded = dataclasses.replace(t, first_center=t._first(h) + pad * h).build(n + 2 * pad, h).matrix
    m = t.build(n, h).matrix
    x = np.random.default_rng(0).random((n, 5))
    assert np.allclose(m @ x, padded[: len(m)] @ np.pad(x, ((pad, pad), (0, 0)), mode="edge"), rtol=0, atol=1e-12)


def test_four_mm_decimation_geometry() -> None:
    op = AcquisitionOperator([SliceAcquisition(2, 4.0)], (10, 10, 189), (1.0, 1.0, 1.0))
    assert op.lr_shape == (10, 10, 47)
    assert op.lr_spacing == (1.0, 1.0, 4.0)
    hr_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    hr_affine[:3, 3] = (-98, -134, -72)
    lr_affine = op.lr_affine(hr_affine)
    assert lr_affine[2, 3] == pytest.approx(-72 + 1.5)  # first centre moves by 1.5 mm
    assert lr_affine[2, 2] == pytest.approx(4.0)
    assert np.allclose(op.hr_affine(lr_affine), hr_affine)


def test_operator_from_spacings() -> None:
    op = operator_from_spacings((1, 1, 1), (1, 1, 4), lr_shape=(20, 21, 12), profile="rect")
    assert op.hr_shape == (20, 21, 48) and op.lr_shape == (20, 21, 12)
    (t,) = op.transforms
    assert isinstance(t, SliceAcquisition) and t.axis == 2 and t.slice_spacing == 4
    # a non-integer through-plane factor and an in-plane k-space axis
    op = operator_from_spacings((1, 1, 1), (2, 1, 3.5), hr_shape=(24, 8, 50), slice_axes=[2])
    kinds = {t.axis: t.kind for t in op.transforms}
    assert kinds == {0: "kspace", 2: "slice"}
    assert op.lr_spacing == pytest.approx((2.0, 1.0, 3.5))
    # and back: the HR grid recovered from the LR one
    again = operator_from_spacings((1, 1, 1), (2, 1, 3.5), lr_shape=op.lr_shape, slice_axes=[2])
    assert again.lr_shape == op.lr_shape
    with pytest.raises(ValueError, match="coarser"):
        operator_from_spacings((2, 1, 1), (1, 1, 4), hr_shape=(8, 8, 8))


@pytest.mark.parametrize("thickness,spacing,h", [(4.0, None, 1.0), (2.5, 3.1, 0.7), (6.0, 2.0, 1.0), (0.5, 1.5, 1.0)])
def test_hr_size_for_inverts_out_size(thickness: float, spacing: float | None, h: float) -> None:
    t = SliceAcquisition(0, thickness, spacing)
    for n_out in range(1, 30):
        n_in = t.hr_size_for(n_out, h)
        assert t.out_size(n_in, h) == n_out
        assert n_in == 2 or t.out_size(n_in - 1, h) < n_out


def test_composition_equals_sequential_application() -> None:
    a1 = AcquisitionOperator([KSpaceTruncation(0, 2.0)], (16, 12, 20), (1, 1, 1))
    a2 = AcquisitionOperator([SliceAcquisition(2, 4.0)], a1.lr_shape, a1.lr_spacing)
    composed = a2 @ a1
    x = _rand(a1.hr_shape)
    assert torch.allclose(composed(x), a2(a1(x)))
    assert composed.lr_shape == a2.lr_shape
    with pytest.raises(ValueError, match="cannot compose"):
        a1 @ a2


def test_an_operator_factors_into_its_axes_exactly() -> None:
    """Two sliced axes and a k-space axis: acquiring one axis first and the rest on the grid in between is the
    same operator, so a scan with two coarse axes can be super-resolved one axis at a time."""
    op = AcquisitionOperator([SliceAcquisition(2, 5.0), KSpaceTruncation(0, 2.0), SliceAcquisition(1, 3.0, 3.5)],
                             (16, 21, 20), (1.0, 1.0, 1.0))
    inner, outer = op.factor([1])
    assert inner.axes == (1,) and outer.axes == (0, 2)
    assert inner.lr_shape == (16, op.lr_shape[1], 20) and outer.lr_shape == op.lr_shape
    assert np.allclose(outer.hr_spacing, (1.0, 3.5, 1.0))
    x = _rand(op.hr_shape, batch=2, channels=1)
    assert torch.allclose(outer(inner(x)), op(x))
    assert torch.allclose((outer @ inner)(x), op(x))
    nothing, everything = op.factor([])
    assert nothing.axes == () and torch.allclose(everything(x), op(x))


def test_soft_projection() -> None:
    op = _op("slice-gauss-3d")
    x_true = _rand(op.hr_shape, batch=3, channels=1)
    sigma = 0.05
    y, _ = add_noise(op(x_true), noise_std=sigma, kind="gaussian", generator=torch.Generator().manual_seed(1))
    x0 = torch.zeros_like(x_true)
    assert torch.allclose(op.soft_project(x0, y, noise_std=0.0), op.project(x0, y))
    # discrepancy principle: the residual lands at the noise level, per batch entry
    soft = op.soft_project(x0, y, noise_std=sigma)
    target = sigma * np.sqrt(np.prod(op.lr_shape))
    residual = (op(soft) - y).flatten(1).norm(dim=1)
    assert torch.allclose(residual, torch.full_like(residual, target), rtol=1e-4)
    # an estimate already within the noise is left alone
    assert torch.allclose(op.soft_project(op.project(x0, y), y, noise_std=sigma), op.project(x0, y))


def test_the_rician_error_moment_is_the_magnitudes_mean_squared_error() -> None:
    from gen_sr.physics import rician_error_moment

    rng = np.random.default_rng(0)
    for theta in (0.0, 0.5, 1.5, 4.0, 30.0):
        magnitude = np.hypot(theta + rng.standard_normal(400_000), rng.standard_normal(400_000))
        expected = float(rician_error_moment(torch.tensor(theta, dtype=torch.float64)))
        assert expected == pytest.approx(np.mean((magnitude - theta) ** 2), rel=0.01)
    assert float(rician_error_moment(torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(2.0)
    assert float(rician_error_moment(torch.tensor(1e3, dtype=torch.float64))) == pytest.approx(1.0, abs=1e-4)


def test_the_rician_soft_projection_keeps_the_truth_of_a_magnitude_image_with_air() -> None:
    """From the truth, a magnitude image's residual is about Σ σ² ρ(ν/σ): twice the Gaussian target in its air. The
    Gaussian target then fits the air's noise (and the head with it); the Rician one leaves the truth about alone."""
    op = _op("slice-gauss-3d")
    g = torch.Generator().manual_seed(3)
    x_true = torch.rand((4, 1, *op.hr_shape), generator=g, dtype=torch.float64) + 1.0
    x_true[..., : op.hr_shape[0] // 2, :, :] = 0.0  # half the field of view is air
    sigma = 0.05
    y, _ = add_noise(op(x_true), noise_std=sigma, kind="rician", generator=torch.Generator().manual_seed(1))

    def moved(noise: str) -> float:
        return float((op.soft_project(x_true, y, sigma, noise=noise) - x_true).pow(2).mean().sqrt()) / sigma

    assert moved("rician") < 0.25 * moved("gaussian")
    assert moved("gaussian") > 0.1
    with pytest.raises(ValueError, match="noise must be"):
        op.soft_project(x_true, y, sigma, noise="poisson")


def test_float32_autograd_and_batch_shapes() -> None:
    op = _op("composed-all-axes-3d")
    x = torch.randn(3, 1, *op.hr_shape, requires_grad=True)
    y = torch.randn(3, 1, *op.lr_shape)
    loss = ((op(x) - y) ** 2).sum()
    loss.backward()
    # d/dx ‖Ax − y‖² = 2 Aᵀ(Ax − y)
    assert torch.allclose(x.grad, 2 * op.adjoint(op(x.detach()) - y), rtol=1e-4, atol=1e-4)
    assert op.project(x.detach(), y).dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        op(torch.zeros(1, 1, 4, 4, 4))
    with pytest.raises(TypeError):
        op(torch.zeros(1, 1, *op.hr_shape, dtype=torch.int64))


def test_noise_models_are_seeded_and_at_the_requested_snr() -> None:
    y = torch.ones(1, 1, 40, 40, 40) * 2.0
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    a, sigma = add_noise(y, snr=20.0, kind="gaussian", generator=g())
    b, _ = add_noise(y, snr=20.0, kind="gaussian", generator=g())
    assert torch.equal(a, b)
    assert sigma == pytest.approx(0.1)
    assert float((a - y).std()) == pytest.approx(0.1, rel=0.02)
    rician, _ = add_noise(y, snr=20.0, kind="rician", generator=g())
    assert float(rician.min()) >= 0
    # Rician bias at high SNR: E|y + n| ≈ y + σ²/(2y)
    assert float(rician.mean()) == pytest.approx(2.0 + 0.01 / 4.0, abs=2e-3)
    assert noise_std_for_snr(torch.cat([y, torch.zeros_like(y)], dim=2), 10.0) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: SliceAcquisition(0, -1.0), "thickness"),
        (lambda: SliceAcquisition(0, 2.0, spacing=0.0), "spacing"),
        (lambda: SliceAcquisition(0, 2.0, profile="triangle"), "profile"),
        (lambda: SliceAcquisition(0, 2.0, profile=(1.0, -1.0)), "profile"),
        (lambda: KSpaceTruncation(0, 2.0, window="blackman"), "window"),
        (lambda: AxisTransform.from_dict({"type": "slice", "axis": 0, "thickness": 2, "colour": 1}), "colour"),
        (lambda: AcquisitionOperator([SliceAcquisition(3, 2.0)], (8, 8, 8), (1, 1, 1)), "axis"),
        (lambda: AcquisitionOperator([SliceAcquisition(0, 20.0)], (8, 8, 8), (1, 1, 1)), "does not fit"),
    ],
)
def test_invalid_acquisitions_are_refused(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("method", ["linear", "cubic"])
def test_interpolate_reproduces_ramps_between_slice_centres(method: str) -> None:
    op = AcquisitionOperator([SliceAcquisition(2, 4.0, spacing=3.3)], (3, 4, 41), (1.0, 1.0, 1.0))
    ramp = torch.arange(41, dtype=torch.float64).expand(1, 1, 3, 4, 41).clone()
    first = op.lr_index_to_hr_index()[2, 3]  # the first LR centre, in HR voxels
    last = first + (op.lr_shape[2] - 1) * 3.3
    y = torch.linspace(first, last, op.lr_shape[2], dtype=torch.float64).expand(1, 1, *op.lr_shape[:2], -1)
    x = op.interpolate(y, method)  # the ramp sampled at the slice centres
    assert x.shape == ramp.shape
    inside = (ramp >= first) & (ramp <= last)
    assert torch.allclose(x[inside], ramp[inside], atol=1e-9)
    assert torch.allclose(x[..., 0], torch.full_like(x[..., 0], first))  # held constant beyond the ends
    with pytest.raises(ValueError, match="method"):
        op.interpolate(y, "quintic")


@pytest.mark.parametrize("n_lr", [10, 11])
def test_sinc_interpolation_is_exact_for_band_limited_signals(n_lr: int) -> None:
    """k-space zero-filling: a periodic signal below the LR Nyquist frequency comes back exactly at any position,
    and the LR samples themselves are kept."""
    op = AcquisitionOperator([SliceAcquisition(2, 3.0)], (2, 2, 3 * n_lr), (1.0, 1.0, 1.0))
    assert op.lr_shape[2] == n_lr
    first = op.lr_index_to_hr_index()[2, 3]
    u = (torch.arange(3 * n_lr, dtype=torch.float64) - first) / 3.0  # HR positions in LR sample units
    wave = lambda p: torch.cos(2 * torch.pi * 3 * p / n_lr + 0.4) + 0.5 * torch.sin(2 * torch.pi * p / n_lr)  # noqa: E731
    y = wave(torch.arange(n_lr, dtype=torch.float64)).expand(1, 1, 2, 2, n_lr).clone()
    x = op.interpolate(y, "sinc")
    torch.testing.assert_close(x[0, 0, 0, 0], wave(u), atol=1e-10, rtol=0)
    centres = (first + 3.0 * torch.arange(n_lr)).round().long()  # integer here: thickness 3 on a 1 mm grid
    torch.testing.assert_close(x[0, 0, 0, 0, centres], y[0, 0, 0, 0], atol=1e-10, rtol=0)


def test_the_noise_estimate_finds_white_noise_on_a_smooth_volume() -> None:
    from scipy import ndimage

    from gen_sr.physics import estimate_noise_std

    rng = np.random.default_rng(0)
    smooth = ndimage.gaussian_filter(rng.standard_normal((64, 64, 16)), (8, 8, 1), mode="wrap")
    smooth = 100 + 20 * smooth / smooth.std()
    for sigma in (0.5, 2.0):
        noisy = smooth + rng.standard_normal(smooth.shape) * sigma
        assert estimate_noise_std(noisy, axis=2) == pytest.approx(sigma, rel=0.1)
    assert estimate_noise_std(smooth, axis=2) < 0.1


@pytest.mark.parametrize(("air_level", "complex_noise"), [(0.0, True), (4.0, True), (0.0, False)])
def test_the_noise_std_is_read_from_the_air_around_the_head(air_level: float, complex_noise: bool) -> None:
    """Pure Rayleigh air, air with a signal of its own (Rician, ν = 2σ) and real-valued Gaussian air all read σ;
    the head's texture does not enter."""
    from helpers import head_in_air

    from gen_sr.physics import background_noise_std

    data = head_in_air((64, 64, 8), sigma=2.0, air_level=air_level, radius=20, complex_noise=complex_noise)
    assert background_noise_std(data, axis=2) == pytest.approx(2.0, rel=0.06)
    assert background_noise_std(np.moveaxis(data, 2, 0), axis=0) == background_noise_std(data, axis=2)


@pytest.mark.parametrize("sigma", [0.7, 1.5])
@pytest.mark.parametrize("scale", [1.0, 0.37])  # stored as integers, or as integers times NIfTI's scl_slope
def test_air_stored_as_integers_a_few_steps_wide_is_read_as_well(sigma: float, scale: float) -> None:
    """Rounding leaves much of such air at 0 (14 % at 1 step): those zeros are air, not padding, and the rounding's
    variance is taken off (before: none read at 0.7 steps, 25 % low at 1.5); a zero-padded block is still padding."""
    from helpers import head_in_air

    from gen_sr.physics import background_noise_std

    stored = np.round(head_in_air((96, 96, 8), sigma=sigma, radius=30, seed=1)) * scale
    assert background_noise_std(stored, axis=2) == pytest.approx(sigma * scale, rel=0.06)
    stored[:20] = 0
    assert background_noise_std(stored, axis=2) == pytest.approx(sigma * scale, rel=0.06)


def _zero_filled_head(sigma: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A head on a 1 mm grid with complex noise of std ``sigma``, interpolated 2x in-plane by zero-filling its
    k-space (as scanners do), as a magnitude; and the same without noise."""
    from helpers import head_in_air

    clean = head_in_air((80, 80, 8), sigma=0.0, radius=25)
    rng = np.random.default_rng(seed)

    def zero_filled(image: np.ndarray) -> np.ndarray:
        k = np.fft.fftshift(np.fft.fft2(image, axes=(0, 1)), axes=(0, 1))
        padded = np.zeros((160, 160, 8), complex)
        padded[40:120, 40:120] = k
        return np.abs(np.fft.ifft2(np.fft.ifftshift(padded, axes=(0, 1)), axes=(0, 1))) * 4

    noise = sigma * (rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape))
    return zero_filled(clean + noise), zero_filled(clean.astype(complex))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_resampling_scales_the_noise_as_its_spectrum_says(seed: int) -> None:
    """0.5 mm heads resampled to 1 and 1.25 mm by k-space truncation: noise white on the fine grid keeps the kept
    share of k-space (``air_noise_gain`` finds its air's spectrum flat and leaves ``coarsen``'s factor, or reads
    within 12 % of it: seed 2 at 1.25 mm, +11 %), noise a 2x zero-filled interpolation made keeps all of it at 1 mm
    and 0.8 at 1.25 mm (read within 10 %, 6-7 % low). The truth: the head's noise against the resampled clean head."""
    from helpers import head_in_air

    from gen_sr.physics import air_noise_gain, coarsen
    from gen_sr.volume import Volume

    fine = np.diag([0.5, 0.5, 4.0, 1.0])
    white, white_clean = (head_in_air((160, 160, 8), sigma=s, radius=50, seed=seed + 1) for s in (3.0, 0.0))
    filled, filled_clean = _zero_filled_head(3.0, seed)
    for grid in (1.0, 1.25):
        for noisy, clean, expected in ((white, white_clean, None), (filled, filled_clean, min(1.0, 1 / grid))):
            given = Volume(noisy.astype(np.float32), fine)
            out, kept = coarsen(given, (grid, grid, 4.0))
            truth, _ = coarsen(Volume(clean.astype(np.float32), fine), (grid, grid, 4.0))
            head = truth.data > 50
            ratio = float(np.std((out.data - truth.data)[head])) / 3.0  # the noise std after over before
            gain = air_noise_gain(given, out)
            if expected is None:  # white: coarsen's factor holds
                assert ratio == pytest.approx(kept, rel=0.05)
                assert gain is None or gain == pytest.approx(kept, rel=0.12)
            else:
                assert gain == pytest.approx(expected, rel=0.1) and ratio == pytest.approx(expected, rel=0.05)
                assert kept < 0.6 * gain  # the white-noise factor would take off what the truncation keeps


def test_a_masked_head_or_one_cropped_to_the_head_has_no_air_to_read() -> None:
    from helpers import head_in_air

    from gen_sr.physics import background_noise_std

    data = head_in_air((64, 64, 8), sigma=2.0, radius=20)
    masked = np.where(head_in_air((64, 64, 8), sigma=0.0, radius=20) > 0, data, 0.0)
    assert background_noise_std(masked, axis=2) is None
    assert background_noise_std(data[16:48, 16:48], axis=2) is None  # inside the head


def test_a_slab_too_thin_for_a_window_in_its_slices_is_read_across_them() -> None:
    """The demo's case: a 4-voxel slab of thick slices has no 7 x 7 window in the slices' plane; the scan's reading
    then takes its two longest axes, and a scan with room in its slices reads as before."""
    from helpers import head_in_air

    from gen_sr.physics import background_noise_std, scan_noise_std
    from gen_sr.volume import Volume

    data = head_in_air((64, 64, 16), sigma=2.0, radius=20)  # slices along the last axis, 4 mm apart
    affine = np.diag([1.0, 1.0, 4.0, 1.0])
    assert scan_noise_std(Volume(data, affine)) == background_noise_std(data, axis=2)
    slab = np.ascontiguousarray(data[:, 30:34])
    assert background_noise_std(slab, axis=2) is None
    assert scan_noise_std(Volume(slab, affine)) == pytest.approx(2.0, rel=0.06)


def test_coarsening_keeps_the_field_of_view_the_band_it_can_hold_and_says_what_it_does_to_white_noise() -> None:
    """A 0.45 mm in-plane grid resampled to about 1 mm by k-space truncation: the same field of view (first and last
    voxel edges), a cosine within the new band kept to round-off, white noise scaled by the factor returned, the slice
    axis untouched; with nothing coarser, the volume itself."""
    from gen_sr.physics import coarsen
    from gen_sr.volume import Volume

    affine = np.diag([-0.45, 0.45, 5.0, 1.0])
    affine[:3, 3] = (80.0, -100.0, -50.0)
    i = np.arange(101)[:, None, None] * np.ones((101, 90, 4))
    wave = np.cos(2 * np.pi * 7 * (i + 0.5) / 101)  # 7 cycles over the field of view: well inside 1 mm's band
    noise = np.random.default_rng(0).standard_normal((101, 90, 4))
    volume = Volume((wave + noise).astype(np.float32), affine)
    out, gain = coarsen(volume, (1.0, 1.0, 5.0))
    assert out.shape == (45, 40, 4) and out.spacing[1] == pytest.approx(1.0125) and out.spacing[2] == 5.0
    def edges(v: Volume) -> np.ndarray:  # the outer corners of the first and the last voxel, in world coordinates
        return v.affine @ np.array([[-0.5, -0.5, -0.5, 1.0], [*(np.array(v.shape) - 0.5), 1.0]]).T

    assert np.allclose(edges(out), edges(volume))
    clean, _ = coarsen(volume.with_data(wave.astype(np.float32)), (1.0, 1.0, 5.0))
    j = np.arange(45)[:, None, None]
    assert np.allclose(clean.data, np.cos(2 * np.pi * 7 * (j + 0.5) / 45), atol=1e-4)
    assert gain == pytest.approx(np.sqrt(45 / 101 * 40 / 90), rel=1e-2)
    assert (out.data - clean.data).std() == pytest.approx(gain, rel=0.05)
    assert coarsen(volume, (0.45, 0.3, 5.0)) == (volume, 1.0)


@pytest.mark.parametrize("n", [45, 46])
def test_coarsening_undoes_a_scanners_zero_filled_interpolation(n: int) -> None:
    """A 1 mm scan interpolated to 0.5 mm by zero-filling k-space (as a scanner's "ZIP 512" does) comes back to the 1
    mm scan itself, voxel for voxel and on its own grid, for odd and even matrices."""
    from gen_sr.physics import KSpaceTruncation, coarsen
    from gen_sr.volume import Volume

    native = Volume(np.random.default_rng(0).standard_normal((n, n + 3, 4)).astype(np.float32),
                    np.diag([1.0, 1.0, 4.0, 1.0]))
    zip2 = AcquisitionOperator([KSpaceTruncation(0, 0.5), KSpaceTruncation(1, 0.5)], native.shape, native.spacing)
    fine = torch.from_numpy(native.data.astype(np.float64))[None, None]
    interpolated = Volume(zip2(fine)[0, 0].numpy().astype(np.float32), zip2.lr_affine(native.affine))
    back, _ = coarsen(interpolated, (1.0, 1.0, 4.0))
    assert back.shape == native.shape and np.allclose(back.affine, native.affine)
    np.testing.assert_allclose(back.data, native.data, atol=1e-5)


def test_the_rician_snr_inverts_the_magnitude_moments() -> None:
    from gen_sr.physics import RAYLEIGH_MEAN_OVER_STD, rician_snr

    rng = np.random.default_rng(0)
    for theta in (1.0, 3.0, 10.0):
        magnitude = np.hypot(theta + rng.standard_normal(400_000), rng.standard_normal(400_000))
        assert rician_snr(magnitude.mean() / magnitude.std()) == pytest.approx(theta, rel=0.03)
    assert rician_snr(RAYLEIGH_MEAN_OVER_STD) == 0.0
    assert rician_snr(1.01 * RAYLEIGH_MEAN_OVER_STD, pure_noise_tolerance=0.02) == 0.0


def test_a_slice_profile_file_reads_as_its_samples_and_a_bad_one_is_one_line(tmp_path) -> None:
    from gen_sr.physics import read_slice_profile

    good = tmp_path / "profile.txt"
    good.write_text("# measured on a phantom, edge to edge\n0, 0.5 1\n2.0\n1 0.5,0  # the far edge\n")
    assert read_slice_profile(good) == (0.0, 0.5, 1.0, 2.0, 1.0, 0.5, 0.0)
    for text, fragment in [("0 1 x 1", "numbers only"), ("1", ">= 2 finite"), ("0 -1 0", "non-negative"),
                           ("0 0 0", "not all zero")]:
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(ValueError, match=fragment) as e:
            read_slice_profile(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="cannot read the slice profile"):
        read_slice_profile(tmp_path / "missing.txt")


def test_structure_visibility_known_answers() -> None:
    """Rectangular 4 mm slices on a 1 mm grid keep half of a 2 mm structure on a slice centre and a quarter of it
    between two slices; a structure thicker than a slice by a voxel on each side comes through whole; one in a gap
    between thin slices not at all; a Gaussian profile keeps more of a thicker structure, never more than all."""
    rect = AcquisitionOperator([SliceAcquisition(2, 4.0, profile="rect")], (4, 4, 64), (1.0, 1.0, 1.0))
    two, eight = structure_visibility(rect, (2.0, 8.0))
    assert (two.axis, two.size_mm) == (2, 2.0)
    assert two.best == pytest.approx(0.5, abs=1e-12) and two.worst == pytest.approx(0.25, abs=1e-12)
    assert eight.best == pytest.approx(1.0, abs=1e-12)
    gaps = AcquisitionOperator([SliceAcquisition(2, 2.0, spacing=6.0, profile="rect")], (4, 4, 64), (1.0, 1.0, 1.0))
    assert structure_visibility(gaps, (1.0,))[0].worst == 0.0
    gauss = AcquisitionOperator([SliceAcquisition(2, 4.0)], (4, 4, 96), (1.0, 1.0, 0.7))
    records = structure_visibility(gauss, (1.0, 2.0, 4.0, 8.0, 24.0))
    assert all(0 < r.worst <= r.best <= 1 + 1e-12 for r in records)
    assert all(a.worst < b.worst and a.best < b.best for a, b in itertools.pairwise(records))
    assert records[-1].worst > 0.99
    assert structure_visibility(gauss, (80.0,)) == []  # does not fit in the 67 mm axis


def test_structure_visibility_matches_the_operator_on_a_volume() -> None:
    """The fractions kept equal the extreme measurements of whole 3D layers seen through the operator itself (each
    layer's voxels weighted by the fraction of them it covers, counted on 1,000 points per voxel), placed every
    quarter voxel over the middle of each of two sliced axes (Gaussian 5 mm slices along one, rectangular 3 mm slices
    4 mm apart along another); the k-space truncation along the third is not reported."""
    shape = (80, 16, 60)
    op = AcquisitionOperator([SliceAcquisition(0, 5.0), KSpaceTruncation(1, 2.0),
                              SliceAcquisition(2, 3.0, spacing=4.0, profile="rect")], shape, (1.0, 1.0, 1.0))
    records = {r.axis: r for r in structure_visibility(op, (3.0,))}
    assert set(records) == {0, 2}
    points = np.arange(-0.5, 0.5, 1e-3) + 5e-4  # within a voxel, about its centre
    for axis in records:
        n, kept = shape[axis], []
        for c in np.arange(n / 4, 3 * n / 4, 0.25):
            weights = (np.abs(np.arange(n)[:, None] + points - c) <= 1.5).mean(axis=1)
            view = [1, 1, 1, 1, 1]
            view[axis + 2] = n
            layer = torch.from_numpy(weights).reshape(view).expand(1, 1, *shape).contiguous()
            kept.append(float(op(layer).max()))
        assert records[axis].best == pytest.approx(max(kept), abs=1e-9)
        assert records[axis].worst == pytest.approx(min(kept), abs=1e-9)
    with pytest.raises(ValueError, match="positive"):
        structure_visibility(op, (0.0,))
    with pytest.raises(ValueError, match="positive"):
        structure_visibility(op, positions_per_voxel=0)
