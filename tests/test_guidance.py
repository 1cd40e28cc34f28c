"""Latent data-consistency hooks (gen_sr.pipelines.guidance): the DPS-style gradient step is the true gradient of
``Σₙ ‖y − A merge(D(ẑ0))‖`` whatever the tiling, overlapping weighted patches included."""

from __future__ import annotations

import pytest
import torch

from gen_sr.models import HaarAutoencoder
from gen_sr.physics import AcquisitionOperator, SliceAcquisition
from gen_sr.pipelines.guidance import GradientGuidance
from gen_sr.pipelines.tiling import PatchTiler, SlicePatchTiler, SliceTiler

SHAPE = (6, 12, 10)


@pytest.mark.parametrize(("spatial_dims", "make"), [
    (2, lambda: SliceTiler(SHAPE, 0, 2, 2)),
    (2, lambda: SlicePatchTiler(SHAPE, 0, 2, (8, 6), 0.5, 2)),
    (3, lambda: PatchTiler(SHAPE, (4, 8, 6), 0.5, 2)),
])
def test_the_gradient_step_is_autograds_gradient_through_decoder_merge_and_operator(spatial_dims: int, make) -> None:
    tiler = make()
    vae = HaarAutoencoder(spatial_dims=spatial_dims).double()
    operator = AcquisitionOperator([SliceAcquisition(2, 3.0, 2.0)], SHAPE, (1.0, 1.0, 1.0))
    g = torch.Generator().manual_seed(0)
    y = torch.randn(1, 1, *operator.lr_shape, generator=g, dtype=torch.float64)
    latent_shape = [n // 2 for n in tiler.tile_shape]
    z0 = torch.randn(2 * tiler.num_tiles, vae.config.latent_channels, *latent_shape, generator=g, dtype=torch.float64)
    hook = GradientGuidance(vae, tiler, operator, y, timesteps=[7], chunk_size=5, scale=0.3)

    z = z0.clone().requires_grad_(True)
    r = operator(tiler.merge(vae.decode_latent(z))) - y
    (grad,) = torch.autograd.grad(r.flatten(1).norm(dim=1).sum(), z)
    torch.testing.assert_close(hook(z0, 7), z0 - 0.3 * grad, rtol=1e-10, atol=1e-12)
    assert hook.calls == 1 and torch.equal(hook(z0, 3), z0)  # an unguided timestep leaves ẑ0 as it is
