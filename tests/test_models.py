"""The MONAI-backed diffusers models: shapes, save/load round trips, the latent condition and input validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gen_sr.errors import InputError
from gen_sr.models import (
    CONDITION_MODES,
    AutoencoderKLModel,
    ConditionalUNetModel,
    HaarAutoencoder,
    condition_channels,
    describe_autoencoder,
    latent_condition,
    load_autoencoder,
)

DIMS = [2, 3]
LATENT_CHANNELS = 3


def tiny_vae(spatial_dims: int, scaling_factor: float = 0.5) -> AutoencoderKLModel:
    return AutoencoderKLModel(
        spatial_dims=spatial_dims,
        channels=(8, 16),
        latent_channels=LATENT_CHANNELS,
        attention_levels=(False, False),
        norm_num_groups=4,
        scaling_factor=scaling_factor,
    ).eval()


def tiny_unet(spatial_dims: int, cond_channels: int = 1, num_noise_levels: int | None = 10) -> ConditionalUNetModel:
    """A tiny UNet whose zero-initialised layers are made random, so outputs are not all zero."""
    unet = ConditionalUNetModel(
        spatial_dims=spatial_dims,
        latent_channels=LATENT_CHANNELS,
        condition_channels=cond_channels,
        channels=(8, 16),
        attention_levels=(False, True),
        num_head_channels=8,
        norm_num_groups=4,
        num_noise_levels=num_noise_levels,
    ).eval()
    # MONAI zero-initialises the output conv, each resblock's second conv and the attention output projections,
    # so a fresh UNet predicts exactly 0 and equality tests would be vacuous.
    with torch.no_grad():
        for param in unet.parameters():
            if not param.any():
                param.normal_(0.0, 0.2)
    return unet


def image(spatial_dims: int, batch: int = 2, channels: int = 1) -> torch.Tensor:
    """16x16 images or 8x8x8 volumes."""
    spatial = (16, 16) if spatial_dims == 2 else (8, 8, 8)
    return torch.randn(batch, channels, *spatial)


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_vae_shapes_and_scaling(spatial_dims: int) -> None:
    vae = tiny_vae(spatial_dims)
    x = image(spatial_dims)
    f = vae.downsample_factor
    assert f == 2
    latent_spatial = tuple(s // f for s in x.shape[2:])
    assert vae.latent_shape(x.shape[2:]) == latent_spatial
    with torch.no_grad():
        mu, sigma = vae.encode(x)
        assert mu.shape == sigma.shape == (2, LATENT_CHANNELS, *latent_spatial)
        assert (sigma > 0).all()
        z = vae.encode_latent(x)
        torch.testing.assert_close(z, mu * 0.5, rtol=0, atol=0)
        assert vae.decode_latent(z).shape == x.shape
        torch.testing.assert_close(vae.decode_latent(z), vae.net.decode(mu))
        recon, mu2, _ = vae(x)
        assert recon.shape == x.shape
        torch.testing.assert_close(mu2, mu, rtol=0, atol=0)
        # Posterior samples are reproducible with a generator.
        a = vae.encode_latent(x, sample=True, generator=torch.Generator().manual_seed(3))
        b = vae.encode_latent(x, sample=True, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b) and not torch.equal(a, z)
    with pytest.raises(ValueError, match="multiples of 2"):
        vae.encode(torch.randn(1, 1, *(7,) * spatial_dims))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.randn(1, LATENT_CHANNELS + 1, *(4,) * spatial_dims))


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_vae_save_load_roundtrip(spatial_dims: int, tmp_path: Path) -> None:
    vae = tiny_vae(spatial_dims)
    vae.set_scaling_factor(0.25)
    vae.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = AutoencoderKLModel.from_pretrained(tmp_path).eval()
    for key in ("spatial_dims", "channels", "attention_levels", "latent_channels", "norm_num_groups"):
        assert loaded.config[key] == vae.config[key], key
    assert loaded.config.channels == (8, 16)  # tuples again after the JSON round trip
    assert loaded.scaling_factor == 0.25
    assert describe_autoencoder(tmp_path) == f"learned (AutoencoderKLModel), {LATENT_CHANNELS} channels at 1/2 the size"
    x = image(spatial_dims)
    with torch.no_grad():
        z = vae.encode_latent(x)
        assert torch.equal(loaded.encode_latent(x), z)
        assert torch.equal(loaded.decode_latent(z), vae.decode_latent(z))
        g = torch.Generator()
        assert torch.equal(loaded(x, generator=g.manual_seed(1))[0], vae(x, generator=g.manual_seed(1))[0])


def test_vae_gradient_checkpointing_gives_the_same_gradients() -> None:
    vae = tiny_vae(2).train()
    x = image(2)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            vae.enable_gradient_checkpointing()
        assert vae.net.use_checkpoint is checkpointing
        vae.zero_grad()
        recon, mu, sigma = vae(x, generator=torch.Generator().manual_seed(0))
        (recon.square().mean() + mu.square().mean() + sigma.mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in vae.parameters()]))
    vae.disable_gradient_checkpointing()
    assert vae.net.use_checkpoint is False
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_unet_shapes_and_save_load_roundtrip(spatial_dims: int, tmp_path: Path) -> None:
    unet = tiny_unet(spatial_dims, cond_channels=2)
    latent_spatial = (8, 8) if spatial_dims == 2 else (4, 4, 4)
    sample = torch.randn(2, LATENT_CHANNELS, *latent_spatial)
    cond = torch.randn(2, 2, *latent_spatial)
    t = torch.tensor([5, 900])
    level = torch.tensor([0, 7])
    with torch.no_grad():
        out = unet(sample, t, cond, noise_level=level)
    assert out.shape == sample.shape
    assert out.abs().min() > 0
    unet.save_pretrained(tmp_path)
    loaded = ConditionalUNetModel.from_pretrained(tmp_path).eval()
    for key in ("spatial_dims", "channels", "attention_levels", "condition_channels", "num_noise_levels"):
        assert loaded.config[key] == unet.config[key], key
    assert loaded.net.conv_in.conv.in_channels == LATENT_CHANNELS + 2
    with torch.no_grad():
        assert torch.equal(loaded(sample, t, cond, noise_level=level), out)


def test_unet_timestep_and_noise_level_broadcast() -> None:
    unet = tiny_unet(2)
    sample, cond = torch.randn(2, LATENT_CHANNELS, 8, 8), torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        ref = unet(sample, torch.tensor([17, 17]), cond, noise_level=torch.tensor([0, 0]))
        assert ref.abs().min() > 0
        assert not torch.equal(unet(sample, 18, cond), ref)
        assert not torch.equal(unet(sample, 17, torch.zeros_like(cond)), ref)
        assert torch.equal(unet(sample, 17, cond), ref)
        assert torch.equal(unet(sample, torch.tensor(17), cond, noise_level=0), ref)
        assert not torch.equal(unet(sample, 17, cond, noise_level=3), ref)
        # Without noise-level conditioning the model takes no noise_level.
        plain = tiny_unet(2, num_noise_levels=None)
        assert plain(sample, 17, cond).shape == sample.shape


@pytest.mark.parametrize(
    ("sample_shape", "cond_shape", "kwargs", "match"),
    [
        ((2, 3, 8, 8), (2, 2, 8, 8), {}, "condition must be"),  # wrong condition channels
        ((2, 3, 8, 8), (2, 1, 8, 6), {}, "condition must be"),  # mismatched spatial shape
        ((2, 3, 8, 8), (1, 1, 8, 8), {}, "condition must be"),  # mismatched batch
        ((2, 3, 8, 8), (2, 1, 8, 8, 8), {}, "condition must be"),  # 3D condition for a 2D model
        ((2, 4, 8, 8), (2, 1, 8, 8), {}, "sample must be"),  # wrong latent channels
        ((2, 3, 7, 8), (2, 1, 7, 8), {}, "multiples of 2"),  # UNet cannot down/upsample 7
        ((2, 3, 8, 8), (2, 1, 8, 8), {"timestep": torch.tensor([1, 2, 3])}, "timestep"),
        ((2, 3, 8, 8), (2, 1, 8, 8), {"noise_level": 10}, r"\[0, 10\)"),
        ((2, 3, 8, 8), (2, 1, 8, 8), {"noise_level": torch.tensor([0.5, 1.0])}, "integer"),
    ],
)
def test_unet_rejects_bad_inputs(sample_shape, cond_shape, kwargs, match) -> None:
    unet = tiny_unet(2)
    kwargs = {"timestep": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        unet(torch.randn(sample_shape), condition=torch.randn(cond_shape), **kwargs)
    plain = tiny_unet(2, num_noise_levels=None)
    with pytest.raises(ValueError, match="num_noise_levels=None"):
        plain(torch.randn(2, 3, 8, 8), 3, torch.randn(2, 1, 8, 8), noise_level=1)


@pytest.mark.parametrize("spatial_dims", DIMS)
@pytest.mark.parametrize("mode", CONDITION_MODES)
def test_latent_condition_modes_feed_the_unet(spatial_dims: int, mode: str) -> None:
    vae = tiny_vae(spatial_dims)
    lr_on_hr = image(spatial_dims)
    latent_spatial = vae.latent_shape(lr_on_hr.shape[2:])
    n_cond = condition_channels(mode, image_channels=1, latent_channels=LATENT_CHANNELS)
    with torch.no_grad():
        cond = latent_condition(lr_on_hr, latent_spatial, vae=vae, mode=mode)
        assert cond.shape == (2, n_cond, *latent_spatial)
        # A full (B, C, *S) latent shape is accepted as well.
        assert torch.equal(latent_condition(lr_on_hr, (2, LATENT_CHANNELS, *latent_spatial), vae=vae, mode=mode), cond)
        resampled = F.avg_pool2d(lr_on_hr, 2) if spatial_dims == 2 else F.avg_pool3d(lr_on_hr, 2)
        latent = vae.encode_latent(lr_on_hr)
        expected = {"resample": resampled, "latent": latent, "both": torch.cat([resampled, latent], 1)}[mode]
        torch.testing.assert_close(cond, expected)
        unet = tiny_unet(spatial_dims, cond_channels=n_cond)
        out = unet(torch.randn(2, LATENT_CHANNELS, *latent_spatial), 10, cond, noise_level=torch.tensor([1, 2]))
    assert out.shape == (2, LATENT_CHANNELS, *latent_spatial)


def test_latent_condition_non_integer_factor_and_errors() -> None:
    x = torch.randn(1, 3, 12, 10)  # e.g. three neighbouring LR slices (2.5D)
    cond = latent_condition(x, (8, 5))
    torch.testing.assert_close(cond, F.interpolate(x, size=(8, 5), mode="bilinear", align_corners=False))
    assert condition_channels("resample", 3, LATENT_CHANNELS) == cond.shape[1] == 3
    assert condition_channels("both", 3, 4) == 7
    with pytest.raises(ValueError, match="needs the autoencoder"):
        latent_condition(x, (6, 5), mode="latent")
    with pytest.raises(ValueError, match="Unknown condition mode"):
        latent_condition(x, (6, 5), mode="nearest")
    with pytest.raises(ValueError, match="Unknown condition mode"):
        condition_channels("nearest", 1, 3)
    with pytest.raises(ValueError, match="latent_shape"):
        latent_condition(x, (6, 5, 4))
    vae = tiny_vae(2)
    with pytest.raises(ValueError, match="not to the latent shape"):
        latent_condition(torch.randn(1, 1, 16, 16), (4, 4), vae=vae, mode="latent")


def test_from_pretrained_float64_and_num_parameters(tmp_path: Path) -> None:
    vae, unet = tiny_vae(2), tiny_unet(2)
    vae.save_pretrained(tmp_path / "vae")
    unet.save_pretrained(tmp_path / "unet")
    vae64 = AutoencoderKLModel.from_pretrained(tmp_path / "vae", dtype=torch.float64).eval()
    unet64 = ConditionalUNetModel.from_pretrained(tmp_path / "unet", dtype=torch.float64).eval()
    assert vae64.dtype == unet64.dtype == torch.float64
    x = image(2).double()
    with torch.no_grad():
        z = vae64.encode_latent(x)
        assert z.dtype == torch.float64
        out = unet64(z, 3, latent_condition(x, z.shape[2:]))
        assert out.dtype == torch.float64
        torch.testing.assert_close(vae64.encode_latent(x).float(), vae.encode_latent(x.float()))
    n = unet.num_parameters()  # diffusers' ModelMixin
    assert n == sum(p.numel() for p in unet.parameters()) == unet64.num_parameters() > 0
    unet.net.time_embed.requires_grad_(False)
    frozen = sum(p.numel() for p in unet.net.time_embed.parameters())
    assert unet.num_parameters(only_trainable=True) == n - frozen


@pytest.mark.parametrize(("spatial_dims", "levels"), [(2, 1), (2, 2), (3, 1)])
def test_haar_autoencoder_is_exact_orthogonal_and_saves(spatial_dims: int, levels: int, tmp_path: Path) -> None:
    """The wavelet latent inverts to round-off for any image, keeps its energy (an orthogonal map), is linear (so a
    data-consistency correction re-encodes exactly), and round-trips through save_pretrained/load_autoencoder."""
    vae = HaarAutoencoder(spatial_dims=spatial_dims, levels=levels, scaling_factor=2.5)
    f, k = 2**levels, 2 ** (spatial_dims * levels)
    assert vae.downsample_factor == f and vae.config.latent_channels == k
    x = torch.randn(3, 1, *[4 * f] * spatial_dims, generator=torch.Generator().manual_seed(0))
    z = vae.encode_latent(x)
    assert z.shape == (3, k, *[4] * spatial_dims) and torch.allclose(z, vae.encode(x)[0] * 2.5)
    assert torch.allclose(vae.decode_latent(z), x, atol=1e-5)
    assert torch.allclose((z / 2.5).pow(2).sum(), x.pow(2).sum(), rtol=1e-5)  # orthonormal
    d = torch.randn_like(x)
    assert torch.allclose(vae.encode_latent(x + d) - vae.encode_latent(x), vae.encode_latent(d), atol=1e-5)
    constant = vae.encode(torch.ones(1, 1, *[2 * f] * spatial_dims))[0]
    assert torch.count_nonzero(constant.abs() > 1e-6) == 2**spatial_dims  # a flat image: only the low-pass band
    vae.save_pretrained(tmp_path / "haar")
    loaded = load_autoencoder(tmp_path / "haar")
    assert type(loaded) is HaarAutoencoder and loaded.scaling_factor == 2.5
    assert describe_autoencoder(tmp_path / "haar").startswith(f"the Haar wavelet transform, {levels} level")
    assert torch.equal(loaded.encode_latent(x), z)
    with pytest.raises(ValueError, match="latent channels"):
        HaarAutoencoder(spatial_dims=spatial_dims, levels=levels, latent_channels=k + 1)
    # band statistics: every band of training-like images comes out standardised, and it still inverts exactly
    images = [torch.rand(4, 1, *[4 * f] * spatial_dims, generator=torch.Generator().manual_seed(s)) * 3 + 1
              for s in range(3)]
    assert "band means" in vae.fit_latent_scaling(images)
    z = torch.cat([vae.encode_latent(x) for x in images]).transpose(0, 1).flatten(1)
    assert torch.allclose(z.mean(dim=1), torch.zeros(k), atol=1e-4)
    assert torch.allclose(z.std(dim=1), torch.ones(k), atol=1e-3)
    assert torch.allclose(vae.decode_latent(vae.encode_latent(images[0])), images[0], atol=1e-5)
    vae.save_pretrained(tmp_path / "bands")
    again = load_autoencoder(tmp_path / "bands")
    assert torch.allclose(again.encode_latent(images[1]), vae.encode_latent(images[1]))
    with pytest.raises(ValueError, match="multiples of"):
        vae.encode(torch.zeros(1, 1, *[4 * f + 1] * spatial_dims))


def test_load_autoencoder_names_what_it_cannot_load(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no exported autoencoder"):
        load_autoencoder(tmp_path)
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(InputError, match="expected one of"):
        load_autoencoder(tmp_path)


def test_band_loss_weights_give_a_two_level_latent_the_one_level_loss() -> None:
    """Weighted by :meth:`HaarAutoencoder.band_loss_weights` (1), the squared error of standardised two-level bands
    is that of standardised one-level bands, up to one constant, for any image-space error."""
    from gen_sr.training.losses import diffusion_loss

    g = torch.Generator().manual_seed(0)
    images = F.avg_pool2d(torch.rand(8, 1, 64, 64, generator=g), 3, 1, 1) * 4 + 1  # smooth, with a mean
    one, two = HaarAutoencoder(levels=1), HaarAutoencoder(levels=2)
    for vae in (one, two):
        vae.fit_latent_scaling([images])
    weights = two.band_loss_weights(1)
    assert weights.shape == (16,) and weights.mean().item() == pytest.approx(1.0)

    def loss(vae: HaarAutoencoder, error: torch.Tensor, w: torch.Tensor | None = None) -> float:
        e = vae.encode(error)[0] / torch.tensor(vae.config.band_std).reshape(1, -1, 1, 1)
        return float(diffusion_loss(e, torch.zeros_like(e), channel_weights=w))

    errors = (torch.randn(4, 1, 64, 64, generator=g),  # white
              F.avg_pool2d(torch.randn(4, 1, 64, 64, generator=g), 5, 1, 2))  # smooth
    weighted = [loss(two, e, weights) / loss(one, e) for e in errors]
    plain = [loss(two, e) / loss(one, e) for e in errors]
    assert weighted[0] == pytest.approx(weighted[1], rel=0.05)
    assert abs(plain[0] / plain[1] - 1) > 0.2  # without the weights the two losses do not agree
    with pytest.raises(ValueError, match="1 to 1 levels, not 2"):
        two.band_loss_weights(2)
