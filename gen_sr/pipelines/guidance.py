"""Data consistency as hooks on the predicted clean latent ``ẑ0`` (cf. guided-diffusion's ``denoised_fn``).

A hook is called by the scheduler (``step(..., x0_hook=hook)``) with ``ẑ0`` for all tiles of all samples and the
timestep, and returns a corrected ``ẑ0'``; the scheduler re-derives its step from it. The physics lives on the whole
volume: a hook decodes the tiles, merges them into one volume per sample, corrects that volume against the
measurement with the acquisition operator ``A``, and brings the correction back to the tiles' latents.

* :class:`ProjectionGuidance`: project onto ``{x : A x = y}`` (or its noise-aware soft version) and re-encode the
  image-space correction as a latent *difference*, ``ẑ0 + E(x̂0 + δ) − E(x̂0)``. Re-encoding the projected image
  directly (DDNM in latent space) would also replace ``ẑ0`` by the autoencoder's lossy round trip; the difference
  keeps everything but the correction.
* :class:`GradientGuidance`: a DPS-style step on ``‖y − A D(ẑ0)‖`` with respect to ``ẑ0`` (the unsquared norm, with
  the step normalised by it, as the DPS authors' code does). ``A`` is linear, so the image-space gradient is
  ``Aᵀ r / ‖r‖`` exactly; it is brought to the tiles through the transpose of the merge
  (:func:`~gen_sr.pipelines.tiling.merge_adjoint`, not ``split``: the weighted merge of overlapping patches is not
  orthogonal), and only the decoder is back-propagated, one chunk of tiles at a time, which bounds memory.

Either runs on a chosen set of timesteps only. Every output sample is also projected in pixel space at the end
(:func:`final_projection`), so its data consistency does not depend on the latent corrections.

Tensors: latents ``(N * T, C, *latent)``, tiles ``(N * T, 1, *tile)``, volumes ``(N, 1, X, Y, Z)``, the measurement
``y`` ``(1 or N, 1, *lr_shape)``, with ``N`` samples and ``T`` tiles per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Protocol

import torch

from gen_sr.physics import NOISE_GAIN_FLOOR, AcquisitionOperator
from gen_sr.pipelines.tiling import Tiler, merge_adjoint
from gen_sr.risk import DataDisagreement

__all__ = ["GradientGuidance", "ProjectionGuidance", "final_projection", "fit_where_data_disagree"]


class Autoencoder(Protocol):
    dtype: torch.dtype

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor: ...
    def decode_latent(self, z: torch.Tensor) -> torch.Tensor: ...


def final_projection(
    x: torch.Tensor, operator: AcquisitionOperator, y: torch.Tensor, noise_std: float = 0.0
) -> torch.Tensor:
    """Project every sample volume onto the data: for noise-free data exactly (up to ``A⁺``'s gain cap,
    :data:`~gen_sr.physics.NOISE_GAIN_FLOOR`: without a noise std the data are still a real scan's, and overlapping
    slices would put its noise into the output with a gain of up to 30), else to the noise level.

    Args:
        x: sample volumes ``(N, 1, *hr_shape)``.
        operator: the acquisition on the HR grid.
        y: the measurement ``(1 or N, 1, *lr_shape)``.
        noise_std: measurement noise std in the units of ``y``; 0 for the (capped) exact projection.
    """
    y = y.expand(x.shape[0], *y.shape[1:])
    if noise_std > 0:
        return operator.soft_project(x, y, noise_std=noise_std)
    return operator.project(x, y, floor=NOISE_GAIN_FLOOR)


def fit_where_data_disagree(x: torch.Tensor, operator: AcquisitionOperator, y: torch.Tensor, noise_std: float,
                            flag: DataDisagreement | None = None,
                            measured: torch.Tensor | None = None) -> torch.Tensor:
    """Fit the data exactly where the samples' mean departs from it by more than the noise explains.

    The noise-aware projection lets the residual reach the noise level over the whole volume, and a prior that
    disagrees with the data locally (a lesion-free prior at a lesion) spends that allowance there, in every sample
    alike. Here the measurements where the mean's :meth:`~gen_sr.risk.DataDisagreement.measured_statistic` exceeds
    ``flag.refit_level`` are fitted, in every sample: ``x + A⁺(M ⊙ (y − A x))`` (``M`` those measurements).
    Where ``A`` has full row rank (slices no denser than the HR grid) the other measurements keep their values; the
    HR change spreads as far as ``A⁺`` does (a few voxels along the slice normal). It fits the noise too there, so
    ``A⁺``'s gain is capped at ``flag.refit_floor``: exact for slices whose spacing equals their thickness (4 mm
    slices at 4 mm spacing were validated), damped in the components that overlapping slices measure poorly
    (``benchmarks/DATA_DISAGREEMENT.md``).

    Args:
        x: sample volumes ``(N, 1, *hr_shape)``, already projected (:func:`final_projection`).
        operator: the acquisition on the HR grid.
        y: the measurement ``(1, 1, *lr_shape)``.
        noise_std: its noise std (positive), in the units of ``y``.
        flag: the statistic and its level (default: :class:`~gen_sr.risk.DataDisagreement`'s defaults).
        measured: the mean's ``flag.measured_statistic`` where the caller has it already (else computed here).
    """
    flag = flag or DataDisagreement()
    if measured is None:
        measured = flag.measured_statistic(operator, x.mean(dim=0, keepdim=True), y, noise_std)
    mask = (measured > flag.refit_level).to(x)
    return x + operator.pinv(mask * (y - operator.forward(x)), floor=flag.refit_floor)


class _VolumeHook:
    """Shared machinery: which timesteps are guided, and chunked decoding/encoding of tiles."""

    def __init__(
        self,
        vae: Autoencoder,
        tiler: Tiler,
        operator: AcquisitionOperator,
        y: torch.Tensor,
        timesteps: Collection[int],
        chunk_size: int,
        noise_std: float = 0.0,
    ) -> None:
        self.vae, self.tiler, self.operator, self.y = vae, tiler, operator, y
        self.timesteps = {int(t) for t in timesteps}
        self.chunk_size, self.noise_std = chunk_size, noise_std
        self.calls = 0

    def active(self, t: int | torch.Tensor) -> bool:
        return int(t) in self.timesteps

    def _chunked(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``fn`` (the autoencoder's) on chunks of ``x``, in the autoencoder's dtype; the result in ``x``'s."""
        return torch.cat([fn(chunk.to(self.vae.dtype)).to(x.dtype) for chunk in x.split(self.chunk_size)])

    def _volumes(self, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tiles = self._chunked(self.vae.decode_latent, z0)
        return tiles, self.tiler.merge(tiles.to(self.y.dtype))  # the physics runs in the measurement's precision

    def _measurement(self, n: int) -> torch.Tensor:
        return self.y.expand(n, *self.y.shape[1:])


class ProjectionGuidance(_VolumeHook):
    """Projection data consistency; see the module docstring. Called as ``hook(z0, t) -> z0'``."""

    @torch.no_grad()
    def __call__(self, z0: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        if not self.active(t):
            return z0
        self.calls += 1
        tiles, x = self._volumes(z0)
        delta = self.tiler.split(final_projection(x, self.operator, self.y, self.noise_std) - x).to(tiles.dtype)
        return z0 + self._chunked(self.vae.encode_latent, tiles + delta) - self._chunked(self.vae.encode_latent, tiles)


class GradientGuidance(_VolumeHook):
    """DPS-style gradient data consistency; see the module docstring.

    Args:
        scale: step size ``ζ``; the update is ``ẑ0 − ζ ∇ ‖y − A D(ẑ0)‖`` per sample.
        noise_std: taken, so that both hooks are built alike, but not used: the step's size is ``scale`` alone.
        (others as :class:`ProjectionGuidance`)
    """

    def __init__(self, *args, scale: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scale = scale

    def __call__(self, z0: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        if not self.active(t):
            return z0
        self.calls += 1
        with torch.no_grad():
            _, x = self._volumes(z0)
            r = self.operator(x) - self._measurement(x.shape[0])
            norm = r.flatten(1).norm(dim=1).clamp_min(torch.finfo(r.dtype).tiny)
            grad_x = self.operator.adjoint(r) / norm.view(-1, *([1] * (r.ndim - 1)))
        grad_tiles = merge_adjoint(self.tiler, grad_x).to(z0.dtype)
        grads = []
        for z_chunk, g_chunk in zip(z0.split(self.chunk_size), grad_tiles.split(self.chunk_size), strict=True):
            with torch.enable_grad():
                z = z_chunk.detach().requires_grad_(True)
                decoded = self.vae.decode_latent(z.to(self.vae.dtype))
                (grad,) = torch.autograd.grad(decoded, z, grad_outputs=g_chunk.to(decoded.dtype))
            grads.append(grad)
        return z0 - self.scale * torch.cat(grads)
