"""The super-resolution pipeline with tiny random-weight components: reproducibility, data consistency, geometry,
uncertainty and save/load."""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from helpers import count_calls, head_in_air, oblique_affine

from gen_sr.errors import InputError
from gen_sr.model_card import Adaptation, ModelCard
from gen_sr.models import AutoencoderKLModel, ConditionalUNetModel, HaarAutoencoder, condition_channels
from gen_sr.physics import AcquisitionOperator, SliceAcquisition, simulate_acquisition
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.pipelines.guidance import final_projection
from gen_sr.schedulers import DDIMDataConsistencyScheduler
from gen_sr.volume import Volume, VolumeMemo


def _pipe(spatial_dims: int, autoencoder: str = "kl", levels: int = 1) -> LatentDiffusionSRPipeline:
    torch.manual_seed(0)
    if autoencoder == "haar":
        vae = HaarAutoencoder(spatial_dims=spatial_dims, levels=levels)
    else:
        vae = AutoencoderKLModel(spatial_dims=spatial_dims, channels=(8, 16), latent_channels=2,
                                 attention_levels=(False, False), norm_num_groups=4)
    latent = vae.config.latent_channels
    unet = ConditionalUNetModel(spatial_dims=spatial_dims, latent_channels=latent,
                                condition_channels=condition_channels("both", 1, latent), channels=(8, 16),
                                attention_levels=(False, True), num_head_channels=8, norm_num_groups=4,
                                num_noise_levels=None)
    with torch.no_grad():  # MONAI zero-initialises output layers; random weights make the UNet's output matter
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    scheduler = DDIMDataConsistencyScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
                                             prediction_type="v_prediction", clip_sample=False)
    pipe = LatentDiffusionSRPipeline(vae=vae, unet=unet, scheduler=scheduler, model_card=ModelCard())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lr(shape=(12, 10, 5), affine=None) -> Volume:
    data = np.random.default_rng(0).random(shape).astype(np.float32) * 100 + 50
    return Volume(data, np.diag([1.0, 1.0, 3.0, 1.0]) if affine is None else affine)


def _gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


RUN = {"num_inference_steps": 3, "guidance_interval": 1, "batch_size": 8, "noise_std": 0.0}
"""The tests' run settings; their inputs are noise-free (``noise_std=0``: known noise-free) unless a test gives one
(``**(RUN | {"noise_std": ...})``)."""


def _unshared_and_shared(pipe: LatentDiffusionSRPipeline, lr: Volume, seeds: tuple[int, ...]) -> tuple:
    """A run of ``pipe`` on ``lr`` (one sample per seed) without and one with ``share_first_call``, each with the
    number of tiles its network calls saw: ``((plain, calls), (shared, calls))``."""
    runs = []
    for share in (False, True):
        seen: list[int] = []
        handle = pipe.unet.register_forward_hook(lambda _m, args, _out, seen=seen: seen.append(len(args[0])))
        try:
            out = pipe(lr, num_samples=len(seeds), generator=_gens(*seeds), share_first_call=share, **RUN)
        finally:
            handle.remove()
        runs.append((out, sum(seen)))
    return tuple(runs)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_same_seed_same_output_and_samples_are_independent(spatial_dims: int) -> None:
    pipe, lr = _pipe(spatial_dims), _lr()
    a = pipe(lr, num_samples=3, generator=_gens(1, 2, 3), eta=0.5, **RUN)
    b = pipe(lr, num_samples=3, generator=_gens(1, 2, 3), eta=0.5, **RUN)
    assert np.array_equal(a.samples, b.samples) and np.array_equal(a.mean, b.mean)
    alone = pipe(lr, num_samples=1, generator=_gens(2), eta=0.5, guidance="none", **RUN)
    batch = pipe(lr, num_samples=3, generator=_gens(1, 2, 3), eta=0.5, guidance="none", **RUN)
    np.testing.assert_allclose(alone.samples[0], batch.samples[1], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_batch_size_is_a_memory_knob_only(spatial_dims: int) -> None:
    """Tiles per network call change the memory and the speed; the output only by float32 rounding (kernels differ
    with the batch shape). The 2D UNet runs channels-last."""
    pipe, lr = _pipe(spatial_dims), _lr()
    run = {k: v for k, v in RUN.items() if k != "batch_size"}
    outs = [pipe(lr, num_samples=2, generator=_gens(5, 6), batch_size=b, **run) for b in (1, 3, 64)]
    for out in outs[1:]:
        np.testing.assert_allclose(out.samples, outs[0].samples, rtol=1e-5, atol=1e-3)
    weight = next(p for p in pipe.unet.parameters() if p.ndim == spatial_dims + 2 and p.shape[1] > 1)
    assert weight.is_contiguous() == (spatial_dims == 3)  # 2D: channels-last, so not in the default layout


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("guidance", ["projection", "gradient"])
def test_guided_outputs_match_noise_free_data(spatial_dims: int, guidance: str) -> None:
    out = _pipe(spatial_dims)(_lr(), num_samples=2, generator=_gens(0, 1), guidance=guidance, **RUN)
    assert max(out.metadata["relative_residual"]) <= 1e-4
    assert out.metadata["guidance_calls"] == RUN["num_inference_steps"]
    assert out.dc_residual.shape == out.mean.shape and float(np.abs(out.dc_residual).max()) < 1e-2
    assert out.data_disagreement is None and out.metadata["data_disagreement"] is None  # no noise std: nothing to judge


def test_fused_orientations_are_reproducible_per_sample_and_data_consistent() -> None:
    pipe, lr = _pipe(2), _lr()
    fused = pipe(lr, num_samples=2, generator=_gens(3, 4), slice_normal=(0, 1), eta=0.5, **RUN)
    alone = pipe(lr, num_samples=1, generator=_gens(4), slice_normal=(0, 1), eta=0.5, **RUN)
    np.testing.assert_allclose(alone.samples[0], fused.samples[1], rtol=1e-4, atol=1e-3)
    assert max(fused.metadata["relative_residual"]) <= 1e-4
    assert fused.metadata["slice_normals"] == [0, 1]
    assert fused.metadata["guidance_calls"] == 2 * RUN["num_inference_steps"]
    single = pipe(lr, num_samples=2, generator=_gens(3, 4), slice_normal=1, eta=0.5, **RUN)
    assert not np.allclose(single.mean, fused.mean)  # the second plane changed the result
    with pytest.raises(ValueError, match="super-resolved axis"):
        pipe(lr, num_samples=1, slice_normal=(0, 2), **RUN)


def test_strength_starts_from_the_noised_condition_and_runs_only_the_last_steps() -> None:
    pipe, lr = _pipe(2, "haar"), _lr()
    run = {"num_inference_steps": 10, "guidance": "none", "batch_size": 8, "noise_std": 0.0}
    seen: list[int] = []

    def record(_pipe, _i, t, _kw):
        seen.append(t)
        return {}

    full = pipe(lr, num_samples=2, generator=_gens(0, 1), callback_on_step_end=record, **run)
    timesteps, seen = list(seen), []
    part = pipe(lr, num_samples=2, generator=_gens(0, 1), strength=0.3, callback_on_step_end=record, **run)
    assert seen == timesteps[-3:] and part.metadata["denoising_steps"] == 3 and part.metadata["strength"] == 0.3
    alone = pipe(lr, num_samples=1, generator=_gens(1), strength=0.3, **run)
    np.testing.assert_allclose(alone.samples[0], part.samples[1], rtol=1e-4, atol=1e-3)
    # started near the condition, the samples differ far less than samples drawn from pure noise
    near = pipe(lr, num_samples=2, generator=_gens(0, 1), strength=0.1, **run)
    assert float(near.std.mean()) < 0.2 * float(full.std.mean())
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="strength must be in"):
            pipe(lr, num_samples=1, strength=bad, **run)


def test_a_2d_model_slices_across_the_shorter_other_axis_by_default() -> None:
    """The widest slices hold the most context: a thin coronal slab is cut into coronal slices, not strips."""
    pipe = _pipe(2)
    for shape, normal in (((14, 6, 4), 1), ((6, 14, 4), 0), ((8, 8, 4), 0)):
        out = pipe(_lr(shape), num_samples=1, generator=_gens(0), **RUN)
        assert out.metadata["slice_normals"] == [normal]


@pytest.mark.parametrize(("spacing", "exact"), [(4.0, True), (2.0, False)])
def test_the_noise_free_projection_is_exact_unless_the_slices_would_amplify_the_noise(spacing: float,
                                                                                       exact: bool) -> None:
    """Without a noise std the data are still a real scan's: 4 mm slices at 4 mm are fitted exactly, while 4 mm
    slices at 2 mm (whose exact inverse multiplies the noise up to 30 times) are fitted only as far as the gain cap
    allows, so the output keeps the noise near its own level."""
    shape, sigma = (48, 10, 12), 0.02
    op = AcquisitionOperator([SliceAcquisition(0, 4.0, spacing)], shape, (1.0, 1.0, 1.0))
    grid = np.indices(shape).astype(np.float64)
    truth = torch.from_numpy(1.0 + 0.3 * np.sin(grid[0] / 5) * np.cos(grid[1] / 4))[None, None]
    clean = op(truth)
    y = clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = truth + 0.1 * torch.from_numpy(np.cos(grid[0] / 3 + grid[2] / 5))[None, None]  # a prior's sample, off
    projected = final_projection(x, op, y)
    fit = float((op(projected) - y).norm() / y.norm())
    noise = float((projected - truth).std() / sigma)
    if exact:
        assert fit < 1e-10 and op.capped_fraction() == 0
    else:
        assert 0 < fit and noise < 2 and float((op.project(x, y) - truth).std() / sigma) > 3 * noise
        assert 0.3 < op.capped_fraction() < 0.7  # about the half of the components that half-overlapping slices add


def test_overlapping_slices_without_a_noise_std_warn_and_record_what_is_fitted_partially() -> None:
    pipe, lr = _pipe(2), _lr()
    with pytest.warns(UserWarning, match="fitted only partially"):
        overlapping = pipe(lr, slice_thickness=6.0, num_samples=1, generator=_gens(0), **RUN)  # 6 mm at 3 mm
    assert 0 < overlapping.metadata["capped_fraction"] < 1 and max(overlapping.metadata["relative_residual"]) > 1e-6
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fitted only partially")
        contiguous = pipe(lr, num_samples=1, generator=_gens(0), **RUN)
        pipe(lr, slice_thickness=6.0, num_samples=1, generator=_gens(0), **(RUN | {"noise_std": 2.0}))  # noise-aware
    assert contiguous.metadata["capped_fraction"] == 0


def test_the_noise_std_is_read_from_the_scans_background_air_by_default() -> None:
    """By default (``noise_std="auto"``, as in the commands and ``plan``) the noise std is read from the air around
    the head, recorded, and the run is a noisy one (it was taken as known noise-free before: a noisy scan's interval
    then under-covered); a masked scan has no air: a warning, and the run goes on as without a noise std, its noise
    recorded as not known. ``noise_std=0`` says noise-free."""
    default = {k: v for k, v in RUN.items() if k != "noise_std"}
    scan = head_in_air((40, 40, 4), sigma=2.0, radius=11)
    out = _pipe(2)(Volume(scan.astype(np.float32), np.diag([1.0, 1.0, 3.0, 1.0])), num_samples=1,
                   generator=_gens(0), **default)
    assert out.metadata["noise_std_estimated"] is True and out.metadata["noise_std"] == pytest.approx(2.0, rel=0.1)
    assert out.data_disagreement is not None  # a noisy run: the map is there
    masked = Volume(np.where(head_in_air((40, 40, 4), sigma=0.0, radius=11) > 0, scan, 0).astype(np.float32),
                    np.diag([1.0, 1.0, 3.0, 1.0]))
    with pytest.warns(UserWarning, match="no background air"):
        out = _pipe(2)(masked, num_samples=1, generator=_gens(0), **default)
    assert out.metadata["noise_std"] is None and out.record.noise_known is False and out.data_disagreement is None
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no background air")
        noise_free = _pipe(2)(masked, num_samples=1, generator=_gens(0), **RUN)
    assert noise_free.record.noise_known and not noise_free.record.noise_std_estimated
    with pytest.raises(ValueError, match="'auto'"):
        _pipe(2)(_lr(), num_samples=1, **(RUN | {"noise_std": "guess"}))


def test_noise_aware_projection_stops_at_the_noise_level() -> None:
    lr = _lr()
    out = _pipe(2)(lr, num_samples=2, generator=_gens(0, 1), **(RUN | {"noise_std": 2.0}))
    y = lr.data.astype(np.float64)
    # ‖A x − y‖ ≈ √m σ in input units: the relative residual equals the noise's relative size
    expected = 2.0 * np.sqrt(y.size) / np.linalg.norm(y - np.percentile(y, 0.5))
    assert out.metadata["relative_residual"][0] == pytest.approx(expected, rel=1e-2)
    # where the mean departs from the data beyond the noise: unitless, on the output grid, its foreground median 1
    d = out.data_disagreement
    assert d.shape == out.mean.shape and d.min() >= 0 and "noise std" in out.metadata["data_disagreement"]
    assert 0.5 < float(np.median(d[d > 0])) < 2
    # fitting the data where the mean departs from it: closer to the data, recorded; a no-op without noise
    refit = _pipe(2)(lr, num_samples=2, generator=_gens(0, 1), refit_disagreement=True, **(RUN | {"noise_std": 2.0}))
    assert refit.metadata["refit_disagreement"] is True and out.metadata["refit_disagreement"] is False
    assert max(refit.metadata["relative_residual"]) < max(out.metadata["relative_residual"])
    # its map is the mean's before the refit: where the prior departed from the data, as without the refit
    np.testing.assert_allclose(refit.data_disagreement, out.data_disagreement, rtol=1e-5, atol=1e-6)
    assert "before the data were refitted" in refit.metadata["data_disagreement"]
    plain, same = (_pipe(2)(lr, num_samples=1, generator=_gens(0), refit_disagreement=r, **RUN) for r in (False, True))
    np.testing.assert_array_equal(plain.mean, same.mean)
    assert same.metadata["refit_disagreement"] is False


def test_std_is_zero_for_identical_samples_and_positive_otherwise() -> None:
    pipe, lr = _pipe(2), _lr()
    same = pipe(lr, num_samples=3, generator=_gens(5, 5, 5), **RUN)
    # equal up to float rounding: the samples' tiles share network batches in different positions
    assert float(same.std.max()) < 1e-5 * float(np.ptp(lr.data)) and float(same.risk.max()) < 1e-5
    different = pipe(lr, num_samples=3, generator=_gens(5, 6, 7), **RUN)
    assert float(different.std.mean()) > 0


def test_an_adaptation_with_a_measured_slice_profile_round_trips_through_json() -> None:
    card = ModelCard(adapted=Adaptation(source="lr.nii.gz", profile=(0.0, 0.5, 1.0, 0.5, 0.0)))
    back = ModelCard.from_dict(json.loads(json.dumps(card.to_dict())))
    assert back.adapted.profile == (0.0, 0.5, 1.0, 0.5, 0.0) and back == card


def test_a_folder_written_before_the_model_card_key_loads_its_record(tmp_path: Path) -> None:
    pipe = _pipe(2)
    pipe.model_card = dataclasses.replace(pipe.model_card, objective="regression", num_inference_steps=1)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["acquisition"] = index.pop("model_card")  # the key older gen_sr wrote
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert LatentDiffusionSRPipeline.from_pretrained(tmp_path).model_card == pipe.model_card


def test_output_grid_is_the_grid_a_call_returns_without_sampling() -> None:
    pipe, lr = _pipe(2), Volume(_lr().data, oblique_affine(spacing=(1.0, 1.0, 3.0)))
    grid = pipe.output_grid(lr, target_spacing=(1.0, 1.0, 1.5))
    out = pipe(lr, num_samples=1, target_spacing=(1.0, 1.0, 1.5), **RUN)
    canon = Volume(out.mean, out.affine).canonical()
    assert grid.shape == canon.shape and np.allclose(grid.affine, canon.affine)


def test_a_target_coarser_than_the_input_in_plane_resamples_the_input_there_first() -> None:
    """1 mm voxels asked of a 0.5 mm in-plane scan: the run coarsens the input in-plane (recorded, with the factor
    that scales its noise), its output covers the input's field of view on the 1 mm grid and equals the run on the
    coarsened input itself (``measured_input``) given the scaled noise std. A target coarser along the slices is
    still refused."""
    pipe = _pipe(2)
    data = np.random.default_rng(0).random((24, 20, 5)).astype(np.float32) * 100 + 50
    lr = Volume(data, np.diag([0.5, 0.5, 3.0, 1.0]))
    run = {"num_samples": 1, "target_spacing": (1.0, 1.0, 1.0), **RUN}
    out = pipe(lr, generator=_gens(0), **(run | {"noise_std": 2.0}))
    record = out.metadata["coarsened_input"]
    assert record["from_spacing"] == [0.5, 0.5, 3.0] and record["to_spacing"] == [1.0, 1.0, 3.0]
    assert record["noise_std_factor"] == pytest.approx(0.5, rel=0.05)  # a quarter of the voxels: half the std
    assert out.mean.shape == (12, 10, 15) and out.metadata["noise_std"] == 2.0 * record["noise_std_factor"]
    grid = pipe.output_grid(lr, target_spacing=(1.0, 1.0, 1.0))
    assert grid.shape == out.mean.shape and np.allclose(grid.affine, out.affine)
    assert np.allclose(out.affine @ [-0.5, -0.5, -0.5, 1], lr.affine @ [-0.5, -0.5, -0.5, 1])  # the same first edge
    measured = pipe.measured_input(lr, out.record)
    assert measured.shape == (12, 10, 5)
    assert pipe.measured_input(measured, dataclasses.replace(out.record, coarsened_input=None)) is measured
    again = pipe(measured, generator=_gens(0), **(run | {"noise_std": 2.0 * record["noise_std_factor"]}))
    assert again.metadata["coarsened_input"] is None
    np.testing.assert_allclose(again.mean, out.mean, rtol=1e-5, atol=1e-3)
    with pytest.raises(InputError, match="coarser than the LR spacing"):
        pipe(lr, target_spacing=(1.0, 1.0, 4.0), num_samples=1, **RUN)


def test_a_resampled_scan_reads_its_noise_std_before_the_resampling() -> None:
    """A 0.5 mm scan with white Rician noise, asked for 1.25 mm voxels: ``noise_std="auto"`` reads the air of the
    scan as given and scales it as the resampling scales white noise, so the run, its plan and its record agree with
    the noise the resampled scan holds (within 8 %). Read on the resampled air, it came out 31 % low (a resampled
    magnitude is no longer Rayleigh); ``--noise-std`` given is scaled by the same factor."""
    from gen_sr.physics import coarsen, scan_noise_std

    pipe = _pipe(2)
    fine = np.diag([0.5, 0.5, 4.0, 1.0])
    lr = Volume(head_in_air((160, 160, 8), sigma=3.0, radius=50, seed=1).astype(np.float32), fine)
    clean = Volume(head_in_air((160, 160, 8), sigma=0.0, radius=50).astype(np.float32), fine)
    grid = (1.25, 1.25, 1.25)
    resampled, white = coarsen(lr, grid)
    truth = coarsen(clean, grid)[0].data
    held = float(np.std((resampled.data - truth)[truth > 50]))  # the noise the resampled scan holds
    assert scan_noise_std(resampled) < 0.75 * held  # the old reading
    plan = pipe.plan(lr, target_spacing=grid)
    assert plan.noise_std == pytest.approx(held, rel=0.08)
    out = pipe(lr, target_spacing=grid, num_samples=1, **(RUN | {"noise_std": "auto"}))
    assert out.metadata["noise_std"] == plan.noise_std
    assert out.metadata["coarsened_input"]["noise_std_factor"] == pytest.approx(white)  # white: coarsen's factor
    given = pipe(lr, target_spacing=grid, num_samples=1, **(RUN | {"noise_std": 3.0}))
    assert given.metadata["noise_std"] == pytest.approx(3.0 * white)


def test_the_default_grid_is_no_finer_in_plane_than_the_model_was_trained_for() -> None:
    """A 0.35 mm in-plane scan and a model trained for 0.7-1.5 mm: without a target spacing the run resamples the
    input to 0.7 mm in-plane and super-resolves onto 0.7 mm voxels; a scan within a tenth of the range keeps its own."""
    pipe = _pipe(2)
    pipe.model_card = dataclasses.replace(pipe.model_card, in_plane_spacing=(0.7, 1.5))
    data = np.random.default_rng(0).random((24, 20, 4)).astype(np.float32) * 100 + 50
    fine = Volume(data, np.diag([0.35, 0.35, 2.8, 1.0]))
    grid = pipe.output_grid(fine)
    assert grid.shape == (12, 10, 16) and np.allclose(grid.spacing, 0.7)
    out = pipe(fine, num_samples=1, **RUN)
    assert out.metadata["coarsened_input"]["to_spacing"] == pytest.approx([0.7, 0.7, 2.8])
    assert not out.metadata["outside_training"]
    near = Volume(data, np.diag([0.65, 0.65, 2.6, 1.0]))
    assert pipe.output_grid(near).shape == (24, 20, 16)


INPUT_WORK = ("coarsen", "air_noise_gain", "scan_noise_std")
"""What the pipeline computes from a fine input before any sampling, seconds each on a real scan: its resampling, how
that scaled its noise, and its noise read from the air."""


def counted_commands(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[str]], tuple[int, Counter]]:
    """``gen-sr`` as in a process of its own (keeping nothing that another command computed), returning its exit code
    and how often it called each of :data:`INPUT_WORK`."""
    import gen_sr.pipelines.pipeline_latent_sr as pipeline_module
    from gen_sr.cli import main

    calls = count_calls(pipeline_module, INPUT_WORK, monkeypatch.setattr)

    def command(argv: list[str]) -> tuple[int, Counter]:
        monkeypatch.setattr(pipeline_module, "_INPUTS", VolumeMemo())
        calls.clear()
        return main(argv), Counter(calls)
    return command


def test_the_calls_on_one_input_resample_it_and_read_its_noise_once(monkeypatch) -> None:
    """A 0.35 mm in-plane scan and a model trained for 0.7-1.5 mm: its plan, its output grid, two runs and the input
    as they measured it resample it, read how that scaled its noise and read its noise once (:data:`INPUT_WORK`, each
    the real function, counted), and the second run is the first bit for bit. The resampled input handed out is the
    caller's own, and a scan changed in place is one to resample anew."""
    import gen_sr.pipelines.pipeline_latent_sr as pipeline_module
    from gen_sr.physics import coarsen

    monkeypatch.setattr(pipeline_module, "_INPUTS", VolumeMemo())  # nothing kept from the tests before
    calls = count_calls(pipeline_module, INPUT_WORK, monkeypatch.setattr)
    pipe = _pipe(2)
    pipe.model_card = dataclasses.replace(pipe.model_card, in_plane_spacing=(0.7, 1.5))
    data = head_in_air((48, 48, 4), sigma=2.0, radius=14.4, seed=7).astype(np.float32)
    lr = Volume(data, np.diag([0.35, 0.35, 2.8, 1.0]))
    plan, grid = pipe.plan(lr), pipe.output_grid(lr)
    first, again = (pipe(lr, num_samples=2, generator=_gens(0, 1), **(RUN | {"noise_std": "auto"})) for _ in range(2))
    measured = pipe.measured_input(lr, first.record)
    assert calls == dict.fromkeys(INPUT_WORK, 1)
    assert plan.noise_std == first.record.noise_std and grid.shape == first.mean.shape
    for key in ("mean", "samples", "std", "risk", "dc_residual", "data_disagreement"):
        np.testing.assert_array_equal(getattr(again, key), getattr(first, key))
    assert {**again.metadata, "timings": None} == {**first.metadata, "timings": None}
    measured.data[:] = 0  # the caller's own: the next answer is still the resampled scan
    to_spacing = first.metadata["coarsened_input"]["to_spacing"]
    np.testing.assert_array_equal(pipe.measured_input(lr, first.record).data, coarsen(lr, to_spacing)[0].data)
    lr.data[20, 20, 1] += 50  # changed in place: another scan
    changed = pipe(lr, num_samples=2, generator=_gens(0, 1), **(RUN | {"noise_std": "auto"}))
    assert calls == dict.fromkeys(INPUT_WORK, 2) and not np.array_equal(changed.mean, first.mean)


def test_outputs_land_at_the_right_world_coordinates() -> None:
    """Re-acquiring the SR output (its own affine, an oblique one) reproduces the LR input on the LR grid."""
    hr = Volume(np.random.default_rng(1).random((10, 12, 15)).astype(np.float32) + 1, oblique_affine())
    canonical_axis = hr.canonical().orientation.index("S")
    file_axis = next(a for a in range(3) if hr.axis_to_canonical(a) == canonical_axis)
    lr, _, _ = simulate_acquisition(hr, [SliceAcquisition(file_axis, 3.0)])
    out = _pipe(2)(lr, num_samples=2, generator=_gens(0, 1), slice_thickness=3.0, output_type="nifti", **RUN)
    sr = Volume(out.mean.get_fdata(dtype=np.float32), out.mean.affine)
    again, _, _ = simulate_acquisition(sr, [SliceAcquisition(file_axis, 3.0)])
    assert again.shape == lr.shape
    assert np.allclose(again.affine, lr.affine, atol=1e-4)
    assert np.allclose(again.data, lr.data, rtol=1e-3, atol=1e-3 * float(np.abs(lr.data).max()))
    assert out.samples.shape[:3] == out.mean.shape and out.samples.shape[3] == 2


@pytest.mark.parametrize("file_axis", [0, 1, 2])
def test_a_thick_slice_stack_along_any_axis_is_super_resolved_along_that_axis(file_axis: int) -> None:
    """An any-axis model (trained on every slice orientation) takes sagittal, coronal and axial stacks: the output
    grid is the HR volume the stack was made from, voxel for voxel, and re-acquiring it gives the stack back."""
    pipe = _pipe(2)
    pipe.model_card = dataclasses.replace(pipe.model_card, trained_for=dataclasses.replace(
        pipe.model_card.trained_for, any_axis=True))
    hr = Volume(np.random.default_rng(1).random((12, 15, 18)).astype(np.float32) + 1,
                oblique_affine(spacing=(1.0, 1.0, 1.0)))  # 3 mm slices cover each axis exactly
    lr, _, _ = simulate_acquisition(hr, [SliceAcquisition(file_axis, 3.0)])
    assert lr.shape[file_axis] < hr.shape[file_axis]
    out = pipe(lr, num_samples=2, generator=_gens(0, 1), slice_thickness=3.0, output_type="nifti", **RUN)
    assert out.metadata["sr_axes"] == [hr.axis_to_canonical(file_axis)]
    sr = Volume(out.mean.get_fdata(dtype=np.float32), out.mean.affine)
    assert sr.shape == hr.shape and np.allclose(sr.affine, hr.affine, atol=1e-4)
    again, _, _ = simulate_acquisition(sr, [SliceAcquisition(file_axis, 3.0)])
    assert np.allclose(again.data, lr.data, rtol=1e-3, atol=1e-3 * float(np.abs(lr.data).max()))


def test_two_coarse_axes_are_super_resolved_one_after_the_other_with_exact_geometry() -> None:
    """A 1 x 3 x 6 mm stack (two coarse axes): an any-axis model super-resolves the coarser axis first, on slices
    across the other, then the other; the output is the HR grid voxel for voxel, consistent with the data along
    both axes, and each sample stays its own through both stages."""
    pipe = _pipe(2)
    pipe.model_card = dataclasses.replace(pipe.model_card, trained_for=dataclasses.replace(
        pipe.model_card.trained_for, any_axis=True))
    hr = Volume(np.random.default_rng(2).random((12, 15, 18)).astype(np.float32) + 1,
                oblique_affine(spacing=(1.0, 1.0, 1.0)))
    acquisition = [SliceAcquisition(1, 3.0), SliceAcquisition(2, 6.0)]
    lr, _, _ = simulate_acquisition(hr, acquisition)
    assert lr.shape == (12, 5, 3)
    out = pipe(lr, num_samples=2, generator=_gens(0, 1), output_type="nifti", **RUN)
    first, second = hr.axis_to_canonical(2), hr.axis_to_canonical(1)  # RAS+ axes of the 6 and 3 mm file axes
    assert out.metadata["sr_axes"] == [first, second]
    shape = hr.canonical().shape  # the second stage slices across the shorter of the axes other than `second`
    across = min((a for a in range(3) if a != second), key=shape.__getitem__)
    assert out.metadata["slice_normals"] == [[second], [across]]
    sr = Volume(out.mean.get_fdata(dtype=np.float32), out.mean.affine)
    assert sr.shape == hr.shape and np.allclose(sr.affine, hr.affine, atol=1e-4)
    again, _, _ = simulate_acquisition(sr, acquisition)
    assert np.allclose(again.data, lr.data, rtol=1e-3, atol=1e-3 * float(np.abs(lr.data).max()))
    assert float(out.std.get_fdata().max()) > 0  # the samples differ
    alone = pipe(lr, num_samples=1, generator=_gens(1), **RUN)  # sample 1 alone is sample 1 of the pair
    samples = np.moveaxis(np.asarray(out.samples.get_fdata(dtype=np.float32)), -1, 0)
    assert np.allclose(alone.mean, samples[1], atol=1e-4 * float(np.abs(samples).max()))
    fixed = _pipe(2)  # a model trained for one axis (RAS+ 2) super-resolves the coarsest only, as before
    expected = list(lr.canonical().shape)
    expected[first] = hr.shape[2]
    assert first == 2 and fixed.output_grid(lr).shape == tuple(expected)


def test_a_fixed_axis_model_and_an_input_with_no_coarse_axis_are_clear_errors() -> None:
    pipe = _pipe(2)  # trained for RAS+ axis 2 only
    coronal = Volume(_lr().data, np.diag([1.0, 3.0, 1.0, 1.0]))
    with pytest.raises(InputError, match=r"super-resolves RAS\+ axis 2 \(S\), but the input's coarsest axis is 1"):
        pipe(coronal, num_samples=1, **RUN)
    iso = Volume(_lr().data, np.eye(4))
    with pytest.raises(InputError, match="has no coarse axis"):
        pipe(iso, num_samples=1, **RUN)
    with pytest.raises(InputError, match="has no coarse axis"):
        pipe.output_grid(iso)


@pytest.mark.parametrize(("spatial_dims", "levels"), [(2, 1), (3, 1), (2, 2)])
def test_a_wavelet_latent_pipeline_is_data_consistent_and_saves(spatial_dims: int, levels: int,
                                                                tmp_path: Path) -> None:
    """The exact Haar latent in place of a learned autoencoder: the same pipeline, outputs consistent with the data,
    and a folder that loads back with the same outputs. Two levels (``configs/heads2d_haar2.yaml``) pad the tiles of
    12 x 15 voxels to a multiple of 8 and crop them back."""
    pipe = _pipe(spatial_dims, "haar", levels)
    assert pipe.tile_multiple == 2 ** levels * 2
    lr = _lr()
    out = pipe(lr, num_samples=2, generator=_gens(0, 1), **RUN)
    assert out.mean.shape == (12, 10, 15) and float(out.std.max()) > 0
    assert max(out.metadata["relative_residual"]) < 1e-4
    pipe.save_pretrained(tmp_path / "model")
    loaded = LatentDiffusionSRPipeline.from_pretrained(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.vae) is HaarAutoencoder
    again = loaded(lr, num_samples=2, generator=_gens(0, 1), **RUN)
    assert np.allclose(again.mean, out.mean, atol=1e-5 * float(np.abs(out.mean).max()))


def test_save_and_load_give_identical_output(tmp_path: Path) -> None:
    pipe, lr = _pipe(2), _lr()
    pipe.save_pretrained(tmp_path)
    assert not list(tmp_path.rglob("*.bin"))
    loaded = LatentDiffusionSRPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    a = pipe(lr, num_samples=2, generator=_gens(0, 1), **RUN)
    b = loaded(lr, num_samples=2, generator=_gens(0, 1), **RUN)
    assert np.array_equal(a.mean, b.mean) and np.array_equal(a.std, b.std)
    assert loaded.model_card == pipe.model_card and loaded.sr_axis == 2


def test_other_schedulers_run_without_guidance() -> None:
    pipe = _pipe(2)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    out = pipe(_lr(), num_samples=2, generator=_gens(0, 1), guidance="none", **RUN)
    assert max(out.metadata["relative_residual"]) <= 1e-4  # the final projection still applies
    with pytest.raises(ValueError, match="no data-consistency hook"):
        pipe(_lr(), num_samples=1, guidance="projection", **RUN)
    pipe.model_card = dataclasses.replace(pipe.model_card, share_first_call=True)  # as heads2d's card
    shared = pipe(_lr(), num_samples=2, generator=_gens(0, 1), guidance="none", **RUN)
    with pytest.warns(UserWarning, match="one sample has no spread: the std and risk maps are 0 everywhere"):
        alone = pipe(_lr(), num_samples=1, generator=_gens(0), guidance="none", **RUN)
    assert not alone.std.any() and not alone.risk.any()
    assert shared.metadata["share_first_call"] is False and np.array_equal(shared.mean, out.mean)


@pytest.mark.parametrize("name", ["dpmsolver++", "unipc"])
def test_multistep_solvers_take_the_data_consistency_hook(name: str, tmp_path: Path) -> None:
    from gen_sr.schedulers import SCHEDULERS

    pipe = _pipe(2)
    pipe.scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config)
    out = pipe(_lr(), num_samples=2, generator=_gens(0, 1), guidance="projection", **RUN)
    assert out.metadata["guidance_calls"] == RUN["num_inference_steps"]
    assert max(out.metadata["relative_residual"]) <= 1e-4
    pipe.save_pretrained(tmp_path / name)  # the folder records the solver and loads it back
    assert type(LatentDiffusionSRPipeline.from_pretrained(tmp_path / name).scheduler) is SCHEDULERS[name]


@pytest.mark.parametrize("name", ["dpmsolver++", "sde-dpmsolver++", "unipc"])
def test_multistep_solvers_start_afresh_in_every_pass(name: str) -> None:
    """A multistep solver keeps state (its step index, its earlier model outputs): each pass of a run with several,
    two fused slicing planes or two coarse axes one after the other, must start it afresh, as its own sampling."""
    from gen_sr.schedulers import scheduler_from_name

    pipe = _pipe(2)
    pipe.scheduler = scheduler_from_name(name, pipe.scheduler.config)
    pipe.model_card = dataclasses.replace(pipe.model_card, trained_for=dataclasses.replace(
        pipe.model_card.trained_for, any_axis=True))
    steps: list[int] = []

    def record(_pipe, i: int, t: int, tensors: dict) -> dict:
        steps.append(pipe.scheduler.step_index)
        return tensors

    fused = pipe(_lr(), num_samples=2, generator=_gens(0, 1), slice_normal=(0, 1), callback_on_step_end=record, **RUN)
    assert steps == [1, 2, 3] * 2 and max(fused.metadata["relative_residual"]) <= 1e-4
    hr = Volume(np.random.default_rng(2).random((12, 15, 18)).astype(np.float32) + 1, np.eye(4))
    lr, _, _ = simulate_acquisition(hr, [SliceAcquisition(1, 3.0), SliceAcquisition(2, 6.0)])
    steps.clear()
    two = pipe(lr, num_samples=2, generator=_gens(0, 1), callback_on_step_end=record, **RUN)
    assert steps == [1, 2, 3] * 2 and two.metadata["sr_axes"] == [2, 1]
    assert max(two.metadata["relative_residual"]) <= 1e-3


def test_the_sde_solver_draws_each_samples_noise_from_its_own_generator() -> None:
    """``sde-dpmsolver++`` adds noise at every step: seeded runs repeat, and a sample does not depend on which
    other samples share its batch; a calibration records the variant, so an ODE calibration warns on SDE runs."""
    from gen_sr.pipelines.pipeline_latent_sr import CalibrationMismatchWarning
    from gen_sr.risk import Calibration
    from gen_sr.schedulers import SCHEDULERS, scheduler_from_name

    pipe = _pipe(2)
    pipe.scheduler = scheduler_from_name("sde-dpmsolver++", pipe.scheduler.config)
    assert type(pipe.scheduler) is SCHEDULERS["sde-dpmsolver++"] and pipe.scheduler.stochastic
    a = pipe(_lr(), num_samples=2, generator=_gens(0, 1), **RUN)
    b = pipe(_lr(), num_samples=2, generator=_gens(0, 1), **RUN)
    alone = pipe(_lr(), num_samples=1, generator=_gens(1), **RUN)
    assert np.array_equal(a.samples, b.samples)
    assert np.allclose(alone.samples[0], a.samples[1], atol=1e-5 * float(np.abs(a.samples).max()))
    assert max(a.metadata["relative_residual"]) <= 1e-4
    assert a.metadata["scheduler"] == pipe.sampler_name
    # the fixture's DDIM config leaves timestep_spacing at its default, so from_config takes DPM-Solver's ("linspace")
    assert pipe.sampler_name == "DPMSolverDataConsistencyScheduler(sde-dpmsolver++, linspace)"
    ode = scheduler_from_name("dpmsolver++", pipe.scheduler.config)  # the name resets the variant
    assert not ode.stochastic
    pipe.scheduler = ode
    c = pipe(_lr(), num_samples=2, generator=_gens(0, 1), **RUN)
    assert not np.allclose(c.samples, a.samples)
    made = pipe.sampling_settings(num_samples=2, num_inference_steps=RUN["num_inference_steps"])
    assert made.scheduler == ode.sampler_name == "DPMSolverDataConsistencyScheduler(linspace)"
    pipe.calibration = Calibration(scale=2.0, alpha=0.1, delta=0.1, method="crc", bound="", num_volumes=3,
                                   risk_hat=0.1, risk_upper=0.1, sampling=made)  # an ODE calibration
    pipe.scheduler = scheduler_from_name("sde-dpmsolver++", ode.config)
    with pytest.warns(CalibrationMismatchWarning, match=r"this run uses 2 samples, SDE-DPM-Solver\+\+, 3 steps"):
        pipe(_lr(), num_samples=2, generator=_gens(0, 1), **RUN)


@pytest.mark.parametrize("name", ["ddim", "dpmsolver++", "sde-dpmsolver++", "unipc"])
def test_the_timestep_spacing_is_part_of_the_sampler_a_calibration_records(name: str) -> None:
    """``timestep_spacing="trailing"`` starts the first step at t = 999 (``"leading"`` later: t = 750 for 3 DPM-Solver++
    steps): the samples differ, so the sampler's name says so and a calibration made with the other spacing warns."""
    from gen_sr.pipelines.pipeline_latent_sr import CalibrationMismatchWarning
    from gen_sr.risk import Calibration
    from gen_sr.schedulers import scheduler_from_name

    pipe = _pipe(2)
    leading = scheduler_from_name(name, pipe.scheduler.config, timestep_spacing="leading")
    trailing = scheduler_from_name(name, pipe.scheduler.config, timestep_spacing="trailing")
    assert "trailing" not in leading.sampler_name and trailing.sampler_name.endswith("trailing)")
    assert (name == "sde-dpmsolver++") == ("sde-dpmsolver++" in trailing.sampler_name)
    trailing.set_timesteps(3)
    assert int(trailing.timesteps[0]) == pipe.scheduler.config.num_train_timesteps - 1
    pipe.scheduler = leading
    made = pipe.sampling_settings(num_samples=2, num_inference_steps=RUN["num_inference_steps"])
    pipe.calibration = Calibration(scale=2.0, alpha=0.1, delta=0.1, method="crc", bound="", num_volumes=3,
                                   risk_hat=0.1, risk_upper=0.1, sampling=made)
    pipe.scheduler = trailing
    with pytest.warns(CalibrationMismatchWarning, match="trailing"):
        out = pipe(_lr(), num_samples=2, generator=_gens(0, 1), **RUN)
    assert out.metadata["scheduler"] == trailing.sampler_name


def test_model_axis_mismatch_is_a_clear_error() -> None:
    sagittal_thick = _lr(shape=(4, 10, 12), affine=np.diag([3.0, 1.0, 1.0, 1.0]))
    with pytest.raises(InputError, match="super-resolves RAS"):
        _pipe(2)(sagittal_thick, num_samples=1, **RUN)


def test_cli_super_resolve(tmp_path: Path, capsys) -> None:
    from gen_sr.cli import main
    from gen_sr.volume import load_volume, save_volume

    _pipe(2).save_pretrained(tmp_path / "model")
    lr_path = save_volume(_lr(), tmp_path / "lr.nii.gz")
    args = ["super-resolve", "--model", str(tmp_path / "model"), "--input", str(lr_path), "--output",
            str(tmp_path / "sr.nii.gz"), "--std", str(tmp_path / "std.nii.gz"), "--risk", str(tmp_path / "risk.nii.gz"),
            "--samples", "2", "--steps", "2"]
    assert main(args) == 0
    sr = load_volume(tmp_path / "sr.nii.gz")
    assert sr.shape == (12, 10, 15) and sr.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert (tmp_path / "std.nii.gz").exists() and (tmp_path / "sr.json").exists()
    assert "relative residual" in capsys.readouterr().out
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err  # outputs exist now
    spaced = [*args[:6], str(tmp_path / "trailing.nii.gz"), "--samples", "2", "--steps", "2", "--timestep-spacing",
              "trailing", "--scheduler", "dpmsolver++", "--device", "auto"]  # auto: the CPU here
    assert main(spaced) == 0
    record = json.loads((tmp_path / "trailing.json").read_text())
    assert record["scheduler"] == "DPMSolverDataConsistencyScheduler(trailing)"
    bad = ["super-resolve", "--model", str(tmp_path), "--input", str(lr_path), "--output", str(tmp_path / "o.nii")]
    assert main(bad) == 2 and "not a gen_sr model folder" in capsys.readouterr().err


def test_two_processes_give_the_same_result_as_one(tmp_path: Path) -> None:
    import os
    import socket
    import subprocess
    import sys

    from gen_sr.cli import main
    from gen_sr.volume import load_volume, save_volume

    _pipe(2).save_pretrained(tmp_path / "model")
    lr_path = save_volume(_lr(), tmp_path / "lr.nii.gz")
    root = Path(__file__).parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", ACCELERATE_USE_CPU="1")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(root / "configs" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(port)]
    for name in ("one", "two"):
        for tag, flags in (("", []), ("_shared", ["--share-first-call"])):  # each process makes the shared call
            args = ["super-resolve", "--model", str(tmp_path / "model"), "--input", str(lr_path), "--output",
                    str(tmp_path / f"{name}{tag}.nii.gz"), "--std", str(tmp_path / f"{name}{tag}_std.nii.gz"),
                    "--samples", "3", "--steps", "2", "--eta", "0.5", *flags]
            if name == "one":  # one process: this one
                assert main(args) == 0
                continue
            result = subprocess.run([*launch, "-m", "gen_sr.cli", *args], env=env, capture_output=True, text=True,
                                    timeout=300, check=False)
            assert result.returncode == 0, result.stderr[-2000:]
    assert '"processes": 2' in (tmp_path / "two.json").read_text()
    assert '"share_first_call": true' in (tmp_path / "two_shared.json").read_text()
    for tag in ("", "_shared"):
        for suffix in ("", "_std"):
            a, b = (load_volume(tmp_path / f"{n}{tag}{suffix}.nii.gz").data for n in ("one", "two"))
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))
    shared, plain = (load_volume(tmp_path / f"one{tag}.nii.gz").data for tag in ("_shared", ""))
    assert not np.allclose(shared, plain, rtol=1e-4, atol=1e-4 * float(np.abs(plain).max()))


def test_pipe_to_float64_runs_in_float64() -> None:
    pipe = _pipe(2).to(torch.float64)
    assert pipe.unet.dtype == torch.float64 and pipe.vae.dtype == torch.float64
    out = pipe(_lr(), num_samples=2, generator=_gens(0, 1), output_type="pt", **RUN)
    assert max(out.metadata["relative_residual"]) <= 1e-10  # exact projection, now in float64


def test_attention_uses_torch_sdpa_with_the_same_result() -> None:
    from gen_sr.models import set_sdpa_attention

    pipe = _pipe(2)
    from monai.networks.blocks import SABlock

    blocks = [m for m in pipe.unet.modules() if isinstance(m, SABlock)]
    assert blocks and all(m.use_flash_attention for m in blocks)
    sdpa = pipe(_lr(), num_samples=2, generator=_gens(0, 1), **RUN)
    assert set_sdpa_attention(pipe.unet, False) > 0
    explicit = pipe(_lr(), num_samples=2, generator=_gens(0, 1), **RUN)
    np.testing.assert_allclose(sdpa.mean, explicit.mean, rtol=1e-4, atol=1e-3)
    with pytest.raises((ImportError, NotImplementedError), match="scaled_dot_product_attention"):
        pipe.enable_xformers_memory_efficient_attention()


def test_a_calibration_scales_risk_and_travels_with_the_model(tmp_path: Path) -> None:
    from gen_sr.risk import Calibration, IntervalShape

    pipe, lr = _pipe(2), _lr()
    plain = pipe(lr, num_samples=2, generator=_gens(0, 1), **RUN)
    assert plain.metadata["risk"]["calibrated"] is False
    pipe.calibration = Calibration(scale=2.5, alpha=0.1, delta=0.1, method="rcps", bound="hb", num_volumes=30,
                                   risk_hat=0.05, risk_upper=0.09)
    pipe.save_pretrained(tmp_path)
    loaded = LatentDiffusionSRPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.calibration == pipe.calibration
    calibrated = loaded(lr, num_samples=2, generator=_gens(0, 1), **RUN)
    np.testing.assert_allclose(calibrated.risk, 2.5 * plain.risk, rtol=1e-6)
    np.testing.assert_array_equal(calibrated.std, plain.std)
    assert calibrated.metadata["risk"]["calibrated"] is True and calibrated.metadata["risk"]["scale"] == 2.5
    # a noise floor in the interval: the risk rises by λ̂ times the noise std over the input's intensity range
    loaded.calibration = dataclasses.replace(pipe.calibration, shape=IntervalShape(noise_floor=1.0))
    pipe.calibration = None
    noisy, plain_noisy = (p(lr, num_samples=2, generator=_gens(0, 1), **(RUN | {"noise_std": 3.0}))
                          for p in (loaded, pipe))
    scale = loaded.intensity_normalization(lr.data).scale
    np.testing.assert_allclose(noisy.risk, 2.5 * (plain_noisy.risk + 3.0 / scale), rtol=1e-5)
    assert noisy.metadata["risk"]["shape"]["noise_floor"] == 1.0 and "noise std" in noisy.metadata["risk"]["definition"]
    with pytest.warns(UserWarning, match="pass the input's noise std"):  # the noise term would silently vanish
        loaded(lr, num_samples=1, generator=_gens(0), **RUN)


def test_float16_storage_loads_as_float32(tmp_path: Path) -> None:
    pipe, lr = _pipe(2), _lr()
    pipe.to(torch.float16).save_pretrained(tmp_path)
    loaded = LatentDiffusionSRPipeline.from_pretrained(tmp_path)
    assert loaded.unet.dtype == torch.float32 and loaded.vae.dtype == torch.float32
    loaded.set_progress_bar_config(disable=True)
    out = loaded(lr, num_samples=2, generator=_gens(0, 1), **RUN)
    assert max(out.metadata["relative_residual"]) <= 1e-4
    assert LatentDiffusionSRPipeline.from_pretrained(tmp_path, dtype=torch.float16).unet.dtype == torch.float16


def test_a_2d_model_can_sample_in_overlapping_in_slice_patches() -> None:
    pipe, lr = _pipe(2), _lr(shape=(20, 6, 8))
    whole = pipe(lr, num_samples=2, generator=_gens(0, 1), **RUN)
    patched = pipe(lr, num_samples=2, generator=_gens(0, 1), patch_size=(8, 8), **RUN)
    assert max(patched.metadata["relative_residual"]) <= 1e-4 and patched.mean.shape == whole.mean.shape
    assert not np.allclose(patched.mean, whole.mean)  # other tiles, other network inputs


def test_background_tiles_can_be_left_out_and_hold_the_condition() -> None:
    pipe = _pipe(2)
    data = np.zeros((24, 6, 8), np.float32)
    data[2:8, :, 2:6] = np.random.default_rng(0).random((6, 6, 4)) * 100 + 50  # an object in one corner
    lr = Volume(data, np.diag([1.0, 1.0, 3.0, 1.0]))
    out = pipe(lr, num_samples=2, generator=_gens(0, 1), patch_size=(8, 8), skip_background=0.02, **RUN)
    assert out.metadata["skipped_tiles"] > 0 and max(out.metadata["relative_residual"]) <= 1e-4
    assert float(np.abs(out.std[16:]).max()) == 0.0  # air far from the object: not sampled, every sample equal


@pytest.mark.parametrize("guidance", ["projection", "gradient"])
def test_networks_in_bfloat16_keep_the_latents_in_float32_and_the_output_near_float32(guidance: str) -> None:
    """The GPU path: networks in bf16, the scheduler's maths, the physics and the statistics in float32."""
    pipe, lr = _pipe(2), _lr()
    reference = pipe(lr, num_samples=2, generator=_gens(0, 1), guidance=guidance, **RUN)
    pipe.to(torch.bfloat16)
    seen = []

    def record(p, i, t, kwargs):
        seen.append(kwargs["latents"].dtype)
        return kwargs

    out = pipe(lr, num_samples=2, generator=_gens(0, 1), guidance=guidance, callback_on_step_end=record, **RUN)
    assert pipe.unet.dtype == torch.bfloat16 and set(seen) == {torch.float32}
    assert out.mean.dtype == np.float32 and max(out.metadata["relative_residual"]) <= 1e-4
    difference = np.abs(out.samples - reference.samples).max() / np.ptp(reference.samples)
    assert 0 < difference < 0.02  # bf16 rounding moves the samples, a little


@pytest.mark.parametrize("name", ["ddim", "dpmsolver++", "unipc"])
def test_a_shared_first_call_is_made_once_for_all_samples_from_sample_0s_start(name: str) -> None:
    """With ``share_first_call`` the network sees the tiles of one sample at the first step and of every sample at
    the others; sample 0 is then its unshared self (the shared call is made from its start), the others differ
    from theirs but not from each other, and the run stays data-consistent."""
    from gen_sr.schedulers import scheduler_from_name

    pipe, lr = _pipe(2), _lr()
    pipe.scheduler = scheduler_from_name(name, pipe.scheduler.config, timestep_spacing="trailing")
    (plain, per_sample_calls), (shared, shared_calls) = _unshared_and_shared(pipe, lr, (4, 5, 6))
    tiles = per_sample_calls // (3 * RUN["num_inference_steps"])  # tiles of one sample per step
    assert shared_calls == tiles + 3 * tiles * (RUN["num_inference_steps"] - 1)
    assert (plain.metadata["share_first_call"], shared.metadata["share_first_call"]) == (False, True)
    scale = float(np.abs(plain.samples).max())
    np.testing.assert_allclose(shared.samples[0], plain.samples[0], atol=1e-5 * scale)
    for k in (1, 2):
        assert not np.allclose(shared.samples[k], plain.samples[k], atol=1e-3 * scale)
    assert not np.allclose(shared.samples[1], shared.samples[2], atol=1e-3 * scale)
    assert max(shared.metadata["relative_residual"]) <= 1e-4


def test_the_model_cards_share_first_call_is_the_default_and_a_calibration_records_it() -> None:
    """The model card says whether a plain call shares the first call; with one step there is nothing to share, and
    a calibration made one way warns on runs made the other way."""
    from gen_sr.pipelines.pipeline_latent_sr import CalibrationMismatchWarning
    from gen_sr.risk import Calibration

    pipe, lr = _pipe(2), _lr()
    pipe.model_card = dataclasses.replace(pipe.model_card, share_first_call=True, num_inference_steps=2)
    made = pipe.sampling_settings(num_samples=2)
    assert made.share_first_call and "first call shared" in made.describe()
    assert not pipe.sampling_settings(num_samples=2, share_first_call=False).share_first_call
    assert not pipe.sampling_settings(num_samples=2, num_inference_steps=1).share_first_call
    assert not pipe.sampling_settings(num_samples=2, strength=0.5).share_first_call  # one step of two
    one_step = pipe(lr, num_samples=2, generator=_gens(0, 1), num_inference_steps=1, noise_std=0.0)
    assert not one_step.metadata["share_first_call"] and not np.allclose(one_step.samples[0], one_step.samples[1])
    pipe.calibration = Calibration(scale=2.0, alpha=0.1, delta=0.1, method="crc", bound="", num_volumes=3,
                                   risk_hat=0.1, risk_upper=0.1, sampling=made)
    out = pipe(lr, num_samples=2, generator=_gens(0, 1), noise_std=0.0)
    assert out.metadata["share_first_call"] and out.metadata["risk"]["calibrated"]
    with pytest.warns(CalibrationMismatchWarning, match="this run uses 2 samples, "):
        pipe(lr, num_samples=2, generator=_gens(0, 1), share_first_call=False, noise_std=0.0)


def test_a_scan_without_air_is_not_warned_that_its_interval_leaves_the_noise_out() -> None:
    """A scan without air (its noise std not known) under a calibration made for such runs: the interval counts the
    noise read in-plane, and the run says so; it was also warned, falsely, that the interval's noise term counted no
    noise. A run that does leave it out (known noise-free under a calibration with a noise term) is still warned."""
    from gen_sr.risk import NOISE_UNKNOWN_SHAPE, Calibration, Calibrations, IntervalShape

    pipe = _pipe(2)
    unknown = pipe.sampling_settings(num_samples=2, noise_std=0.0, noise_known=False)
    plain = {"alpha": 0.1, "delta": 0.1, "method": "crc", "bound": "hb", "num_volumes": 30, "risk_hat": 0.09,
             "risk_upper": 0.1}
    pipe.calibrations = Calibrations([
        Calibration(scale=2.0, **plain, shape=NOISE_UNKNOWN_SHAPE, sampling=unknown),
        Calibration(scale=2.0, **plain, shape=IntervalShape(noise_floor=1.0),
                    sampling=dataclasses.replace(unknown, noise_known=True))])
    scan = head_in_air((40, 40, 4), sigma=2.0, radius=11)
    masked = Volume(np.where(head_in_air((40, 40, 4), sigma=0.0, radius=11) > 0, scan, 0).astype(np.float32),
                    np.diag([1.0, 1.0, 3.0, 1.0]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pipe(masked, num_samples=2, generator=_gens(0, 1), **(RUN | {"noise_std": "auto"}))
    said = [str(w.message) for w in caught]
    assert out.metadata["noise_std_in_plane"] > 0 and any("counts the noise read in-plane" in m for m in said)
    assert not any("leaves the measurement noise out" in m for m in said)
    with pytest.warns(UserWarning, match="leaves the measurement noise out"):
        pipe(masked, num_samples=2, generator=_gens(0, 1), **RUN)


def test_a_two_stage_run_records_that_only_its_first_stage_shared_the_first_call() -> None:
    """With two coarse axes the second stage's samples each have their own condition (the first stage's sample), so
    only the first stage shares its first network call: the record says so per stage (``shared_first_call``), and
    keeps ``share_first_call``, the option a calibration is looked up by, as the first stage did."""
    pipe = _pipe(2)
    pipe.model_card = dataclasses.replace(pipe.model_card, trained_for=dataclasses.replace(
        pipe.model_card.trained_for, any_axis=True))
    hr = Volume(np.random.default_rng(2).random((12, 15, 18)).astype(np.float32) + 1, np.eye(4))
    lr, _, _ = simulate_acquisition(hr, [SliceAcquisition(1, 3.0), SliceAcquisition(2, 6.0)])
    (plain, plain_calls), (shared, shared_calls) = _unshared_and_shared(pipe, lr, (0, 1, 2))
    first_tiles = lr.canonical().shape[shared.record.sr_axes[1]]  # stage 1: one slice across the second axis each
    assert plain_calls - shared_calls == (3 - 1) * first_tiles  # saved in the first stage only
    assert shared.record.shared_first_call == (True, False) and shared.record.share_first_call
    assert plain.record.shared_first_call == (False, False) and not plain.record.share_first_call
    one = _pipe(2)
    one.model_card = dataclasses.replace(one.model_card, share_first_call=True)
    assert one(_lr(), num_samples=2, generator=_gens(0, 1), **RUN).record.shared_first_call == (True,)


def test_a_calibration_per_mm_holds_at_a_runs_grid_and_says_how_to_take_it_there() -> None:
    """``pipe.calibration`` is the default settings' record as stored: one per mm of the voxel size (the shipped
    model's) has no scale until it is taken at a grid, and says how; ``calibration_for`` a run's grid gives it."""
    from gen_sr.risk import Calibration

    pipe = _pipe(2)
    pipe.calibration = Calibration(scale=3.0, alpha=0.1, delta=0.1, method="crc", bound="hb", num_volumes=30,
                                   risk_hat=0.09, risk_upper=0.1, sampling=pipe.sampling_settings(), scale_per_mm=3.0,
                                   fitted_grids=(1.0, 1.5))
    std = np.ones((2, 2, 2))
    with pytest.raises(ValueError, match=r"holds at an output grid only.*at_grid\(voxel_mm\).*calibration_for"):
        pipe.calibration.halfwidth(std, std)
    at_run = pipe.calibration_for(pipe.sampling_settings(), grid_spacing=1.2)
    np.testing.assert_allclose(at_run.halfwidth(std, std), 3.6 * std)
    assert pipe.calibration.at_grid(1.2) == at_run and "of the finest output spacing (1.2 mm)" in at_run.describe()


def test_nifti_outputs_keep_the_inputs_header(tmp_path: Path) -> None:
    """``output_type="nifti"``: the maps on the input's header (units, codes, description), from a file or a
    nibabel image alike, so that ``nib.save(out.mean, path)`` writes what the input's geometry says."""
    import nibabel as nib

    affine = oblique_affine(spacing=(1.0, 1.0, 3.0))
    img = nib.Nifti1Image(_lr().data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = b"scan 7"
    img.set_sform(affine, code=4)
    img.set_qform(affine, code=1)
    nib.save(img, tmp_path / "lr.nii.gz")
    pipe = _pipe(2)
    for given in (tmp_path / "lr.nii.gz", nib.load(tmp_path / "lr.nii.gz")):
        out = pipe(given, num_samples=2, generator=_gens(0, 1), output_type="nifti", **RUN)
        nib.save(out.mean, tmp_path / "sr.nii.gz")
        back = nib.load(tmp_path / "sr.nii.gz")
        assert back.header.get_xyzt_units() == ("mm", "sec") and back.header["descrip"] == b"scan 7"
        assert (int(back.header["sform_code"]), int(back.header["qform_code"])) == (4, 1)
        assert np.allclose(back.affine, out.affine, atol=1e-4) and back.shape == out.mean.shape
