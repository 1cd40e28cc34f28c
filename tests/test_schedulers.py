"""DDIMDataConsistencyScheduler: exact parity with diffusers' DDIMScheduler, the x0 hook and config compatibility."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from gen_sr.errors import InputError
from gen_sr.schedulers import SCHEDULERS, DDIMDataConsistencyScheduler, folder_sampler_name

PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]
ETAS = [0.0, 0.5, 1.0]
SHAPES = {"2d": (2, 3, 8, 8), "3d": (2, 3, 4, 4, 4)}
# Scheduler configs beyond the prediction type: the default (leading spacing, clip_sample=True), no clipping with
# set_alpha_to_one=False (final_alpha_cumprod = alphas_cumprod[0]) and an offset, and dynamic thresholding.
CONFIGS = {
    "default": {},
    "noclip": {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1},
    "threshold": {"thresholding": True, "sample_max_value": 2.0, "beta_schedule": "scaled_linear"},
}
NUM_STEPS = 5


def fake_model(sample: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """A fixed, deterministic stand-in for the UNet."""
    return 0.3 * sample + 0.01 * t


def make_pair(prediction_type: str, **config) -> tuple[DDIMDataConsistencyScheduler, DDIMScheduler]:
    ours = DDIMDataConsistencyScheduler(prediction_type=prediction_type, **config)
    ref = DDIMScheduler(prediction_type=prediction_type, **config)
    ours.set_timesteps(NUM_STEPS)
    ref.set_timesteps(NUM_STEPS)
    return ours, ref


def run_loop(scheduler, shape, eta, seed=0, dtype=torch.float32, **step_kwargs):
    """Full sampling loop; returns the final sample and every step's pred_original_sample."""
    sample = torch.randn(shape, generator=torch.Generator().manual_seed(123), dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    preds = []
    for t in scheduler.timesteps:
        out = scheduler.step(fake_model(sample, t), t, sample, eta=eta, generator=generator, **step_kwargs)
        sample = out.prev_sample
        preds.append(out.pred_original_sample)
    return sample, preds


def alpha_prev(scheduler: DDIMScheduler, t: int) -> torch.Tensor:
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dim", list(SHAPES))
@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_hook_off_is_bitwise_ddim(prediction_type, eta, dim, config):
    ours, ref = make_pair(prediction_type, **CONFIGS[config])
    got, got_preds = run_loop(ours, SHAPES[dim], eta)
    want, want_preds = run_loop(ref, SHAPES[dim], eta)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_preds, want_preds, strict=True))


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_hook_off_is_bitwise_ddim_zero_snr(prediction_type):
    config = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "clip_sample": False}
    ours, ref = make_pair(prediction_type, **config)
    assert ours.alphas_cumprod[ours.timesteps[0]] == 0  # the first step is at zero SNR
    got, _ = run_loop(ours, SHAPES["2d"], eta=0.5)
    want, _ = run_loop(ref, SHAPES["2d"], eta=0.5)
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)


# float32: a few ulps of x_t amplified by 1/sqrt(abar_t) (~25 at t=800) through the x0 <-> model-output round trip.
@pytest.mark.parametrize(("dtype", "atol", "rtol"), [(torch.float64, 1e-6, 0.0), (torch.float32, 1e-5, 1e-5)])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dim", list(SHAPES))
@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_identity_hook_matches_ddim(prediction_type, eta, dim, config, dtype, atol, rtol):
    ours, ref = make_pair(prediction_type, **CONFIGS[config])
    got, got_preds = run_loop(ours, SHAPES[dim], eta, dtype=dtype, x0_hook=lambda x0, t: x0.clone())
    want, want_preds = run_loop(ref, SHAPES[dim], eta, dtype=dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_preds, want_preds, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dim", list(SHAPES))
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_predict_original_sample_round_trip(prediction_type, dim):
    scheduler, ref = make_pair(prediction_type, clip_sample=False)
    sample = torch.randn(SHAPES[dim])
    for t in [*scheduler.timesteps, 999, torch.tensor(1)]:
        model_output = fake_model(sample, t)
        x0 = scheduler.predict_original_sample(model_output, t, sample)
        # bitwise the parent's (unclipped) prediction
        assert torch.equal(x0, ref.step(model_output, t, sample).pred_original_sample)
        back = scheduler.model_output_from_original_sample(x0, t, sample)
        torch.testing.assert_close(back, model_output, atol=1e-5, rtol=1e-5)
        # and the other way round, from a clean sample
        x0_fixed = torch.rand(SHAPES[dim]) * 2 - 1
        m = scheduler.model_output_from_original_sample(x0_fixed, t, sample)
        torch.testing.assert_close(scheduler.predict_original_sample(m, t, sample), x0_fixed, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("dim", list(SHAPES))
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_fixed_hook_rederives_ddim_step(prediction_type, dim, set_alpha_to_one):
    scheduler, _ = make_pair(prediction_type, clip_sample=False, set_alpha_to_one=set_alpha_to_one)
    shape = SHAPES[dim]
    # float64 tensors; the parent forms its coefficients from float32 alphas, hence 1e-6 rather than 1e-12.
    x_fixed = torch.randn(shape, dtype=torch.float64)
    sample = torch.randn(shape, dtype=torch.float64)
    seen = []

    def hook(x0_hat, t):
        seen.append((x0_hat.shape, t))
        return x_fixed

    for i, t in enumerate(scheduler.timesteps):
        out = scheduler.step(fake_model(sample, t), t, sample, eta=0.0, x0_hook=hook)
        torch.testing.assert_close(out.pred_original_sample, x_fixed, atol=1e-6, rtol=0)
        a_t = scheduler.alphas_cumprod[t].double()
        a_prev = alpha_prev(scheduler, int(t)).double()
        if i == NUM_STEPS - 1:
            assert int(t) - 1000 // NUM_STEPS < 0
            assert a_prev == scheduler.final_alpha_cumprod.double()
        eps = (sample - a_t.sqrt() * x_fixed) / (1 - a_t).sqrt()
        expected = a_prev.sqrt() * x_fixed + (1 - a_prev).sqrt() * eps
        torch.testing.assert_close(out.prev_sample, expected, atol=1e-6, rtol=0)
        sample = out.prev_sample
    assert seen == [(torch.Size(shape), t) for t in scheduler.timesteps]
    if set_alpha_to_one:  # the final step lands on x0' exactly
        torch.testing.assert_close(sample, x_fixed, atol=1e-6, rtol=0)


@pytest.mark.parametrize("thresholding", [False, True])
def test_hooked_x0_is_clipped_by_parent(thresholding):
    scheduler, _ = make_pair("epsilon", thresholding=thresholding)  # clip_sample=True by default
    x_fixed = torch.linspace(-3, 3, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    sample = torch.randn(2, 3, 8, 8)
    t = scheduler.timesteps[2]
    out = scheduler.step(fake_model(sample, t), t, sample, x0_hook=lambda x0, t: x_fixed)
    expected = scheduler._threshold_sample(x_fixed) if thresholding else x_fixed.clamp(-1, 1)
    torch.testing.assert_close(out.pred_original_sample, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_generator_consumption_matches_parent(prediction_type, eta):
    ours, ref = make_pair(prediction_type)
    sample = torch.randn(2, 3, 8, 8)
    g_ours, g_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for t in ours.timesteps:
        model_output = fake_model(sample, t)
        x0_hook = lambda x0, t: x0.double() * 0.5  # noqa: E731 - another dtype must not change the noise draw
        out = ours.step(model_output, t, sample, eta=eta, generator=g_ours, x0_hook=x0_hook)
        ref.step(model_output, t, sample, eta=eta, generator=g_ref)
        assert torch.equal(g_ours.get_state(), g_ref.get_state())
        assert out.prev_sample.dtype == torch.float32
        sample = out.prev_sample


def test_variance_noise_and_tuple_output():
    ours, ref = make_pair("v_prediction")
    sample, noise = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    t = ours.timesteps[1]
    kwargs = {"eta": 1.0, "variance_noise": noise, "return_dict": False}
    got = ours.step(fake_model(sample, t), t, sample, x0_hook=lambda x0, t: x0.clone(), **kwargs)
    want = ref.step(fake_model(sample, t), t, sample, **kwargs)
    assert isinstance(got, tuple) and len(got) == 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_int_and_tensor_timesteps_agree():
    scheduler, _ = make_pair("epsilon")
    sample = torch.randn(2, 3, 4, 4, 4)
    hook = lambda x0, t: 0.5 * x0  # noqa: E731
    t = scheduler.timesteps[1]
    a = scheduler.step(fake_model(sample, t), t, sample, x0_hook=hook).prev_sample
    b = scheduler.step(fake_model(sample, t), int(t), sample, x0_hook=hook).prev_sample
    assert torch.equal(a, b)


def test_errors():
    scheduler = DDIMDataConsistencyScheduler()
    sample = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(sample, 10, sample, x0_hook=lambda x0, t: x0)
    scheduler.set_timesteps(NUM_STEPS)
    with pytest.raises(ValueError, match="shape"):
        scheduler.step(sample, 800, sample, x0_hook=lambda x0, t: x0[:1])


def test_config_round_trip(tmp_path: Path):
    config = {"prediction_type": "v_prediction", "clip_sample": False, "timestep_spacing": "trailing"}
    ours = DDIMDataConsistencyScheduler(**config)
    ours.save_pretrained(tmp_path)
    for cls in (DDIMScheduler, DDIMDataConsistencyScheduler):
        loaded = cls.from_pretrained(tmp_path)
        assert type(loaded) is cls
        assert all(loaded.config[k] == v for k, v in config.items())

    from_ref = DDIMDataConsistencyScheduler.from_config(DDIMScheduler(**config).config)
    assert type(from_ref) is DDIMDataConsistencyScheduler
    assert all(from_ref.config[k] == v for k, v in config.items())
    assert torch.equal(from_ref.alphas_cumprod, DDIMScheduler(**config).alphas_cumprod)
    assert type(DDIMScheduler.from_config(ours.config)) is DDIMScheduler


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers' DPMSolver
def test_compatible_with_other_diffusers_schedulers():
    ours = DDIMDataConsistencyScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear")
    assert set(DDIMScheduler._compatibles) <= set(ours._compatibles)
    assert DPMSolverMultistepScheduler in ours.compatibles
    dpm = DPMSolverMultistepScheduler.from_config(ours.config)
    assert dpm.config.prediction_type == "v_prediction"
    assert dpm.config.beta_schedule == "scaled_linear"
    dpm.set_timesteps(NUM_STEPS)
    assert len(dpm.timesteps) == NUM_STEPS


# ----------------------------------------------------------------------------------------------- multistep solvers
MULTISTEP = {"dpmsolver++": (DPMSolverMultistepScheduler, "DPMSolverDataConsistencyScheduler"),
             "unipc": (UniPCMultistepScheduler, "UniPCDataConsistencyScheduler")}
_CFG = {"beta_schedule": "scaled_linear", "beta_start": 0.0015, "beta_end": 0.0195, "prediction_type": "v_prediction"}


def _solve(scheduler, steps: int = 6, hook=None, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """A fixed fake network (a linear map of the sample) through a whole sampling run; returns the final sample and
    the timesteps the hook saw."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.3
    scheduler.set_timesteps(steps)
    seen = []

    def watched(x0, t):
        seen.append(int(t))
        return hook(x0, t)

    kwargs = {"x0_hook": watched} if hook is not None else {}
    for t in scheduler.timesteps:
        out = torch.einsum("ij,bjhw->bihw", weight, x)
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x, seen


@pytest.mark.parametrize("name", list(MULTISTEP))
def test_multistep_solvers_without_a_hook_are_the_parent_bitwise_and_with_one_use_it(name: str) -> None:
    parent_cls, _ = MULTISTEP[name]
    ours = SCHEDULERS[name](**_CFG)
    plain, _ = _solve(parent_cls(**_CFG))
    assert torch.equal(_solve(ours)[0], plain)
    same, seen = _solve(SCHEDULERS[name](**_CFG), hook=lambda x0, t: x0)
    assert torch.equal(same, plain) and seen == ours.timesteps.tolist()
    target = torch.full((2, 3, 8, 8), 0.25, dtype=torch.float64)
    hooked, _ = _solve(SCHEDULERS[name](**_CFG), hook=lambda x0, t: target)
    torch.testing.assert_close(hooked, target, rtol=0, atol=1e-6)  # the last step lands on the hooked prediction


def test_a_noise_predicting_solver_refuses_the_hook() -> None:
    scheduler = SCHEDULERS["dpmsolver++"](algorithm_type="dpmsolver", final_sigmas_type="sigma_min", **_CFG)
    scheduler.set_timesteps(4)
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="data-prediction form"):
        scheduler.step(x, scheduler.timesteps[0], x, x0_hook=lambda x0, t: x0)


@pytest.mark.parametrize("name", list(MULTISTEP))
def test_multistep_predict_original_sample_is_the_x0_a_step_hands_its_hook_and_leaves_the_solver_as_it_was(
        name: str) -> None:
    """``predict_original_sample`` gives the clean-sample prediction the solver's own conversion makes at that
    timestep (what a step hands ``x0_hook``), at any step of the run, without moving the solver's step counter."""
    scheduler = SCHEDULERS[name](**_CFG)
    scheduler.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    for t in scheduler.timesteps:
        out = torch.randn(x.shape, generator=g, dtype=torch.float64)
        before = scheduler.step_index
        predicted = scheduler.predict_original_sample(out, t, x)
        assert scheduler.step_index == before
        seen: list[torch.Tensor] = []

        def hook(x0: torch.Tensor, _t, seen=seen) -> torch.Tensor:
            seen.append(x0.clone())
            return x0

        x = scheduler.step(out, t, x, x0_hook=hook).prev_sample
        torch.testing.assert_close(predicted, seen[0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="set_timesteps"):
        SCHEDULERS[name](**_CFG).predict_original_sample(out, 999, x)


def test_a_model_folders_sampler_is_named_as_the_loaded_pipeline_names_it(tmp_path: Path) -> None:
    """:func:`folder_sampler_name` reads the sampler off a model folder's scheduler config without loading the model:
    one of ours with its variant, as ``pipe.sampler_name`` names it; another scheduler by its class name; none where
    the folder records none; a config that is not one is an error naming the file."""
    heads2d = Path(__file__).parents[1] / "models" / "heads2d"
    assert folder_sampler_name(heads2d) == "DPMSolverDataConsistencyScheduler(trailing)"
    assert folder_sampler_name(tmp_path) is None
    config = tmp_path / "scheduler" / "scheduler_config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"_class_name": "EulerDiscreteScheduler"}))
    assert folder_sampler_name(tmp_path) == "EulerDiscreteScheduler"
    config.write_text(json.dumps({"num_train_timesteps": 1000}))
    with pytest.raises(InputError, match=r"scheduler_config.json: is not a scheduler config"):
        folder_sampler_name(tmp_path)
