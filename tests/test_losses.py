"""Tests for gen_sr.training.losses: KL, the autoencoder loss (adversarial and perceptual terms), diffusion losses."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from gen_sr.training.losses import (
    AutoencoderLoss,
    diffusion_loss,
    diffusion_target,
    kl_divergence,
)
from gen_sr.training.noisy_targets import noisy_target_min_timestep, noisy_target_pair, noisy_target_share
from gen_sr.training.perceptual import perceptual_weights_status

DISABLED = "perceptual loss disabled"


@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point torch.hub at an empty directory, so no pretrained weights are found whatever this machine caches."""
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    return hub


def _batch(spatial: tuple[int, ...], channels: int = 1, batch: int = 2):
    """A tiny 'autoencoder' step: images, a conv generator, its reconstruction and latent statistics."""
    conv = torch.nn.Conv2d if len(spatial) == 2 else torch.nn.Conv3d
    generator = conv(channels, channels, 3, padding=1)
    x = torch.rand(batch, channels, *spatial)
    reconstruction = generator(x)
    mu = 0.1 * reconstruction[:, :, ::2, ::2]
    sigma = torch.exp(0.05 * reconstruction[:, :, 1::2, 1::2])
    return generator, x, reconstruction, mu, sigma


# ---------------------------------------------------------------- KL


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3, 4, 5, 6)])
def test_kl_zero_at_standard_normal_and_positive_elsewhere(shape: tuple[int, ...]) -> None:
    assert kl_divergence(torch.zeros(shape), torch.ones(shape)).item() == 0.0
    kl = kl_divergence(0.5 * torch.randn(shape), torch.rand(shape) + 0.5)
    assert kl.ndim == 0 and kl.item() > 0


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_kl_closed_form(spatial_dims: int) -> None:
    # Per element: 0.5 (mu² + sigma² − log sigma² − 1). Sample 0: 0.5 + 0.5 (e² − 2 − 1); sample 1: 0 + 2.
    e = math.e
    mu = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    sigma = torch.tensor([[1.0, e], [1.0, 1.0]])
    shape = (2, 1) + (1,) * (spatial_dims - 1) + (2,)
    expected = ((0.5 * e**2 - 1.0) + 2.0) / 2  # summed per sample, averaged over the batch
    assert kl_divergence(mu.reshape(shape), sigma.reshape(shape)).item() == pytest.approx(expected, rel=1e-6)


def test_kl_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        kl_divergence(torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 2))


# ---------------------------------------------------------------- autoencoder loss


@pytest.mark.parametrize("spatial", [(16, 16), (8, 8, 8)])
def test_autoencoder_loss_without_adversarial_is_l1_plus_weighted_kl(spatial: tuple[int, ...]) -> None:
    loss_fn = AutoencoderLoss(spatial_dims=len(spatial), kl_weight=1e-3)
    assert loss_fn.discriminator is None
    generator, x, reconstruction, mu, sigma = _batch(spatial)
    loss, logs = loss_fn.generator_loss(x, reconstruction, mu, sigma, step=10)
    expected = F.l1_loss(reconstruction, x) + 1e-3 * kl_divergence(mu, sigma)
    torch.testing.assert_close(loss, expected)
    assert set(logs) == {"recon", "kl", "loss"}
    assert logs["loss"] == pytest.approx(loss.item())
    loss.backward()
    assert generator.weight.grad is not None and generator.weight.grad.abs().sum() > 0

    d_loss, d_logs = loss_fn.discriminator_loss(x, reconstruction, step=10)
    assert d_loss.item() == 0.0 and not d_loss.requires_grad and d_logs == {"disc_loss": 0.0}


@pytest.mark.parametrize(("spatial", "layers"), [((16, 16), 2), ((8, 8, 8), 1)])
def test_adversarial_losses_and_gradients(spatial: tuple[int, ...], layers: int) -> None:
    loss_fn = AutoencoderLoss(
        spatial_dims=len(spatial), kl_weight=1e-3, adversarial_weight=0.5, disc_channels=4, disc_num_layers=layers
    )
    disc = loss_fn.discriminator
    assert disc is not None
    disc_params = [p for p in disc.parameters() if p.requires_grad]
    generator, x, reconstruction, mu, sigma = _batch(spatial)

    loss, logs = loss_fn.generator_loss(x, reconstruction, mu, sigma, step=0)
    assert torch.isfinite(loss) and logs["gen_adv"] > 0
    assert loss.item() == pytest.approx(logs["recon"] + 1e-3 * logs["kl"] + 0.5 * logs["gen_adv"], rel=1e-5)
    loss.backward()
    assert generator.weight.grad is not None and generator.weight.grad.abs().sum() > 0
    # Documented: the generator's backward also fills the discriminator's grads; its optimizer must zero them.
    assert any(p.grad is not None for p in disc_params)

    generator.zero_grad(set_to_none=True)
    disc.zero_grad(set_to_none=True)
    fake = reconstruction.detach().requires_grad_(True)  # a leaf, to see that no gradient reaches it
    d_loss, d_logs = loss_fn.discriminator_loss(x, fake, step=0)
    assert torch.isfinite(d_loss) and d_loss.requires_grad
    assert d_loss.item() == pytest.approx(0.5 * 0.5 * (d_logs["disc_real"] + d_logs["disc_fake"]), rel=1e-5)
    d_loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in disc_params)
    assert sum(p.grad.abs().sum().item() for p in disc_params) > 0
    assert fake.grad is None
    assert generator.weight.grad is None


def test_adversarial_term_absent_before_start_step() -> None:
    loss_fn = AutoencoderLoss(
        spatial_dims=2,
        kl_weight=1e-3,
        adversarial_weight=0.5,
        adversarial_start_step=5,
        disc_channels=4,
        disc_num_layers=2,
    )
    bn_steps = [m.num_batches_tracked.clone() for m in loss_fn.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    _, x, reconstruction, mu, sigma = _batch((16, 16))

    assert not loss_fn.adversarial_active(4) and loss_fn.adversarial_active(5)
    loss, logs = loss_fn.generator_loss(x, reconstruction, mu, sigma, step=4)
    torch.testing.assert_close(loss, F.l1_loss(reconstruction, x) + 1e-3 * kl_divergence(mu, sigma))
    assert logs["gen_adv"] == 0.0
    d_loss, _ = loss_fn.discriminator_loss(x, reconstruction, step=4)
    assert d_loss.item() == 0.0 and not d_loss.requires_grad
    bn_after = [m.num_batches_tracked for m in loss_fn.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn_steps and all(torch.equal(a, b) for a, b in zip(bn_steps, bn_after, strict=True))  # never ran

    loss, logs = loss_fn.generator_loss(x, reconstruction, mu, sigma, step=5)
    assert logs["gen_adv"] > 0 and loss.item() > logs["recon"] + 1e-3 * logs["kl"]


def test_discriminator_rejects_too_small_inputs() -> None:
    loss_fn = AutoencoderLoss(spatial_dims=2, adversarial_weight=0.1, disc_channels=4, disc_num_layers=3)
    _, x, reconstruction, mu, sigma = _batch((16, 16))
    with pytest.raises(ValueError, match=r"spatial sizes >= 24"):
        loss_fn.generator_loss(x, reconstruction, mu, sigma, step=0)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="spatial_dims"):
        AutoencoderLoss(spatial_dims=1)
    with pytest.raises(ValueError, match="kl_weight"):
        AutoencoderLoss(spatial_dims=2, kl_weight=-1.0)
    with pytest.raises(ValueError, match="unknown perceptual network"):
        AutoencoderLoss(spatial_dims=2, perceptual_weight=1.0, perceptual_network="not-a-net")
    with pytest.raises(ValueError, match="spatial_dims=3"):
        AutoencoderLoss(spatial_dims=2, perceptual_weight=1.0, perceptual_network="medicalnet_resnet10_23datasets")


# ---------------------------------------------------------------- perceptual term


@pytest.mark.parametrize("spatial", [(16, 16), (8, 8, 8)])
def test_perceptual_without_weights_warns_once_and_trains_without_it(empty_hub: Path, spatial: tuple[int, ...]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_fn = AutoencoderLoss(spatial_dims=len(spatial), kl_weight=1e-3, perceptual_weight=1.0)
        _, x, reconstruction, mu, sigma = _batch(spatial)
        for step in range(2):
            loss, logs = loss_fn.generator_loss(x, reconstruction, mu, sigma, step=step)
    messages = [str(w.message) for w in caught if DISABLED in str(w.message)]
    assert len(messages) == 1, messages
    assert "not available offline" in messages[0] and "training without it" in messages[0]
    assert loss_fn.perceptual_loss is None and "perceptual" not in logs
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, F.l1_loss(reconstruction, x) + 1e-3 * kl_divergence(mu, sigma))
    assert list(empty_hub.iterdir()) == []  # nothing was downloaded or even attempted


_FAKE_HUBCONF = """
dependencies = ["torch"]
import torch


def radimagenet_resnet50(cache_dir=None, **kwargs):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
"""


def test_perceptual_is_built_from_local_files_only(empty_hub: Path) -> None:
    """With the hub repository and weights on disk, MONAI's PerceptualLoss is built and used, offline."""
    assert "not found" in perceptual_weights_status("radimagenet_resnet50")
    repo = empty_hub / "Project-MONAI_perceptual-models_main"
    repo.mkdir()
    (repo / "hubconf.py").write_text(_FAKE_HUBCONF)  # a stand-in network: the real one would be fetched from GitHub
    (empty_hub / "RadImageNet-ResNet50_notop.pth").touch()
    assert perceptual_weights_status("radimagenet_resnet50") is None

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_fn = AutoencoderLoss(
            spatial_dims=2, kl_weight=1e-3, perceptual_weight=0.5, perceptual_network="radimagenet_resnet50"
        )
    assert not [w for w in caught if DISABLED in str(w.message)]
    assert loss_fn.perceptual_loss is not None and loss_fn.perceptual_network == "radimagenet_resnet50"
    assert not any(p.requires_grad for p in loss_fn.perceptual_loss.parameters())

    generator, x, reconstruction, mu, sigma = _batch((16, 16))
    loss, logs = loss_fn.generator_loss(x, reconstruction, mu, sigma, step=0)
    assert logs["perceptual"] > 0
    assert loss.item() == pytest.approx(logs["recon"] + 1e-3 * logs["kl"] + 0.5 * logs["perceptual"], rel=1e-5)
    loss.backward()
    assert generator.weight.grad is not None and torch.isfinite(generator.weight.grad).all()


def test_medicalnet_needs_hf_offline_mode(empty_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    (empty_hub / "Project-MONAI_perceptual-models_main").mkdir()
    snapshot = empty_hub / "models--MONAI--checkpoints" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "medicalnet_resnet_10_23dataset.pth").touch()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert "HF_HUB_OFFLINE" in perceptual_weights_status("medicalnet_resnet10_23datasets")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert perceptual_weights_status("medicalnet_resnet10_23datasets") is None
    assert "no cached" in perceptual_weights_status("medicalnet_resnet50_23datasets")


# ---------------------------------------------------------------- diffusion


@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("shape", [(3, 4, 6, 6), (3, 4, 4, 6, 6)])
def test_diffusion_target(scheduler_cls, shape: tuple[int, ...]) -> None:
    latents, noise = torch.randn(shape), torch.randn(shape)
    timesteps = torch.tensor([0, 500, 999])

    eps = scheduler_cls(num_train_timesteps=1000, prediction_type="epsilon")
    assert diffusion_target(eps, latents, noise, timesteps) is noise
    sample = scheduler_cls(num_train_timesteps=1000, prediction_type="sample")
    assert diffusion_target(sample, latents, noise, timesteps) is latents

    v_sched = scheduler_cls(num_train_timesteps=1000, prediction_type="v_prediction")
    v = diffusion_target(v_sched, latents, noise, timesteps)
    torch.testing.assert_close(v, v_sched.get_velocity(latents, noise, timesteps))
    # The argument order matters: v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x_0.
    alpha_bar = v_sched.alphas_cumprod[timesteps].reshape(-1, *([1] * (len(shape) - 1)))
    torch.testing.assert_close(v, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents)

    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_target(scheduler_cls(prediction_type="flow"), latents, noise, timesteps)


def test_diffusion_loss() -> None:
    out, target = torch.randn(3, 2, 4, 4, 4), torch.randn(3, 2, 4, 4, 4)
    torch.testing.assert_close(diffusion_loss(out, target), F.mse_loss(out, target))
    torch.testing.assert_close(diffusion_loss(out, target, torch.ones(3)), F.mse_loss(out, target))
    per_sample = ((out - target) ** 2).mean(dim=(1, 2, 3, 4))
    weights = torch.tensor([0.0, 1.0, 3.0])
    torch.testing.assert_close(diffusion_loss(out, target, weights), (per_sample[1] + 3 * per_sample[2]) / 3)
    assert diffusion_loss(out.half(), target.half()).dtype == torch.float32
    with pytest.raises(ValueError, match="differ"):
        diffusion_loss(out, target[:2])
    with pytest.raises(ValueError, match="weights"):
        diffusion_loss(out, target, torch.ones(3, 1))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_noisy_target_pair_without_noise_is_the_clean_pair(prediction_type: str) -> None:
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=prediction_type)
    latents, noise, t = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6), torch.tensor([0, 400, 999])
    noisy, target = noisy_target_pair(scheduler, latents, noise, t, torch.zeros(4))
    torch.testing.assert_close(noisy, scheduler.add_noise(latents, noise, t))
    torch.testing.assert_close(target, diffusion_target(scheduler, latents, noise, t))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_noisy_targets_have_the_clean_targets_conditional_expectation(prediction_type: str) -> None:
    """Gaussian clean latents x0 ~ N(0, v), seen only as z = x0 + s n: E[target | x_t] is linear in x_t, and its slope
    from the noisy pairs must equal the clean pairs' (a least-squares fit over many draws), where taking z for x0
    misses it by far (the test can fail)."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015,
                              beta_end=0.0195, prediction_type=prediction_type)
    gen = torch.Generator().manual_seed(0)
    std = torch.tensor([0.1, 0.4, 0.8])  # per channel, as the Haar bands of a scan at SNR 30 (HH ~ 0.8)
    n, v = 200_000, 0.25
    t = torch.full((n,), 333)
    assert float(noisy_target_share(scheduler, std, t[:1]).max()) == pytest.approx(0.337, abs=0.01)

    def draw() -> torch.Tensor:
        return torch.randn(n, 3, 1, 1, generator=gen, dtype=torch.float64)

    def slope(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # per channel
        x, y = x[:, :, 0, 0], y[:, :, 0, 0]
        return (x * y).mean(0) / (x * x).mean(0)

    x0 = v**0.5 * draw()
    noise = draw()
    clean = slope(scheduler.add_noise(x0, noise, t), diffusion_target(scheduler, x0, noise, t))
    z = x0 + std.double().reshape(1, 3, 1, 1) * draw()
    noisy, target = noisy_target_pair(scheduler, z, draw(), t, std)
    torch.testing.assert_close(noisy.var(0).flatten(), scheduler.add_noise(x0, noise, t).var(0).flatten(), rtol=0.02,
                               atol=0)  # x_t is distributed as the clean latents noised to t
    torch.testing.assert_close(slope(noisy, target), clean, rtol=0, atol=0.01)
    naive = slope(*[a.double() for a in (scheduler.add_noise(z, noise, t), diffusion_target(scheduler, z, noise, t))])
    assert float((naive - clean).abs()[2]) > 0.05  # taking z for x0 learns a different denoiser in the noisy band


def test_noisy_target_timesteps_keep_the_noise_below_the_diffusions() -> None:
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015,
                              beta_end=0.0195, prediction_type="v_prediction")
    std = torch.tensor([0.05, 0.8])
    first = noisy_target_min_timestep(scheduler, std)
    share = noisy_target_share(scheduler, std, torch.tensor([first - 1, first]))
    assert float(share[0].max()) > 0.5 >= float(share[1].max())
    assert noisy_target_min_timestep(scheduler, torch.zeros(2)) == 0
    assert noisy_target_min_timestep(scheduler, std, max_share=0.25) > first
    with pytest.raises(ValueError, match="every timestep"):
        noisy_target_min_timestep(scheduler, torch.tensor([1e3]))
    with pytest.raises(ValueError, match="exceeds the diffusion noise"):
        noisy_target_pair(scheduler, torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), torch.tensor([0]), std)
