"""DDIM with a hook on the predicted clean sample (data consistency), the step re-derived from the hooked sample.

The denoising loop stays the standard diffusers one::

    for t in scheduler.timesteps:
        out = unet(z, t).sample
        z = scheduler.step(out, t, z, x0_hook=data_consistency).prev_sample

``x0_hook`` plays the role of guided-diffusion's ``denoised_fn``: it receives the predicted clean sample
``x0_hat`` and returns a replacement ``x0'``. The scheduler converts ``x0'`` back into the model output that would have
produced it (noise estimate re-derived as ``eps' = (x_t - sqrt(abar_t) x0') / sqrt(1 - abar_t)``) and hands that to
:meth:`diffusers.DDIMScheduler.step`, so every DDIM update formula (eta = 0 and eta > 0, clipping, thresholding, the
final step) is diffusers' own and the caller never touches alpha maths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from diffusers import (
    DDIMScheduler,
    SchedulerMixin,  # noqa: F401  (DiffusionPipeline.from_pretrained looks it up in this module)
)
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

__all__ = ["DDIMDataConsistencyScheduler", "NamedSampler", "X0Hook", "describe_sampler"]

X0Hook = Callable[[torch.Tensor, int | torch.Tensor], torch.Tensor]
"""``x0_hook(x0_hat, timestep) -> x0'``: tensors of the shape of the sample, ``(B, C, H, W)`` or ``(B, C, D, H, W)``."""


def describe_sampler(scheduler: Any, *variants: str) -> str:
    """What run records and calibrations name a sampler by: its class name, with what changes the samples it draws in
    brackets: ``variants`` (e.g. the SDE form) and a ``timestep_spacing`` other than ``"leading"`` (the spacing
    decides where the first step starts: at 3 DPM-Solver++ steps ``"leading"`` starts at t = 750, ``"trailing"`` at
    t = 999, the pure noise the sampler starts from)."""
    spacing = scheduler.config.get("timestep_spacing", "leading")
    parts = [*variants, *([spacing] if spacing != "leading" else [])]
    return type(scheduler).__name__ + (f"({', '.join(parts)})" if parts else "")


class NamedSampler:
    """Gives a scheduler :attr:`sampler_name`, what a calibration records of it (:func:`describe_sampler`)."""

    @property
    def sampler_name(self) -> str:
        """What a calibration records of this sampler (:func:`describe_sampler`)."""
        return describe_sampler(self)


class DDIMDataConsistencyScheduler(NamedSampler, DDIMScheduler):
    """:class:`diffusers.DDIMScheduler` whose predicted clean sample can be replaced by a hook in :meth:`step`.

    Config, constructor, ``set_timesteps``, ``add_noise`` and saving/loading are exactly those of ``DDIMScheduler``:
    ``DDIMDataConsistencyScheduler.from_config(DDIMScheduler(...).config)`` works and vice versa.

    Edge cases:
        * ``clip_sample`` / ``thresholding`` are applied by the parent *after* the hook, to ``x0'`` (as
          guided-diffusion clips after ``denoised_fn``); the hook sees the unclipped ``x0_hat``. With
          ``use_clipped_model_output=True`` the parent also re-derives the noise estimate from the clipped ``x0'``.
        * At the final step the previous timestep is negative and the parent uses ``final_alpha_cumprod`` (1 with
          ``set_alpha_to_one=True``) as ``abar_prev``. The conversion here only needs ``abar_t``.
        * The parent's previous timestep is always ``t - num_train_timesteps // num_inference_steps``, whatever
          ``timestep_spacing`` is.
        * With ``prediction_type="epsilon"`` and ``abar_t = 0`` (``rescale_betas_zero_snr`` at ``t = T - 1``) the
          predicted clean sample is not finite, in the parent as here; use ``v_prediction`` there.
        * Round-tripping through the model output costs float rounding: the step's ``pred_original_sample`` equals
          ``x0'`` (after clipping) only up to a few ulps scaled by ``1 / sqrt(abar_t)`` for epsilon prediction.
    """

    # The KarrasDiffusionSchedulers names, DDIMScheduler included: from_config works both ways with all of them.
    _compatibles: ClassVar[list[str]] = list(DDIMScheduler._compatibles)

    def _alpha_beta_prod(self, timestep: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(abar_t, 1 - abar_t)`` as 0-d tensors, indexed exactly as ``DDIMScheduler.step`` does."""
        alpha_prod_t = self.alphas_cumprod[timestep]
        return alpha_prod_t, 1 - alpha_prod_t

    def _for_prediction_type(self, formulas: dict[str, Callable[[], torch.Tensor]]) -> torch.Tensor:
        """``formulas[prediction_type]()`` for the configured ``prediction_type``.

        Raises:
            ValueError: If ``prediction_type`` is not ``epsilon``, ``v_prediction`` or ``sample``.
        """
        prediction_type = self.config.prediction_type
        if prediction_type not in formulas:
            raise ValueError(f"prediction_type {prediction_type!r} must be one of 'epsilon', 'sample' or "
                             "'v_prediction'")
        return formulas[prediction_type]()

    def predict_original_sample(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor
    ) -> torch.Tensor:
        """Predicted clean sample ``x0_hat`` for the configured ``prediction_type``, before clipping/thresholding.

        Uses the same expressions as ``DDIMScheduler.step``, so the result is bitwise the parent's unclipped
        ``pred_original_sample``.

        Args:
            model_output: Network output, shape of ``sample``: ``(B, C, H, W)`` or ``(B, C, D, H, W)``.
            timestep: Current discrete timestep, an int or a 0-d integer tensor.
            sample: Current noisy sample ``x_t``, same shape.

        Returns:
            ``x0_hat``, same shape as ``sample``.

        Raises:
            ValueError: If ``prediction_type`` is not ``epsilon``, ``v_prediction`` or ``sample``.
        """
        alpha_prod_t, beta_prod_t = self._alpha_beta_prod(timestep)
        return self._for_prediction_type({
            "epsilon": lambda: (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5),
            "sample": lambda: model_output,
            "v_prediction": lambda: (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output,
        })

    def model_output_from_original_sample(
        self, x0: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor
    ) -> torch.Tensor:
        """Model output that would have produced the clean sample ``x0``; inverse of :meth:`predict_original_sample`.

        The noise estimate is re-derived as ``eps' = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``; for v-prediction
        ``v' = sqrt(abar_t) eps' - sqrt(1 - abar_t) x0 = (sqrt(abar_t) x_t - x0) / sqrt(1 - abar_t)``.

        Args:
            x0: Clean sample, shape of ``sample``: ``(B, C, H, W)`` or ``(B, C, D, H, W)``.
            timestep: Current discrete timestep, an int or a 0-d integer tensor.
            sample: Current noisy sample ``x_t``, same shape.

        Returns:
            Model output for the configured ``prediction_type``, same shape as ``sample``.

        Raises:
            ValueError: If ``prediction_type`` is not ``epsilon``, ``v_prediction`` or ``sample``.
        """
        alpha_prod_t, beta_prod_t = self._alpha_beta_prod(timestep)
        return self._for_prediction_type({
            "epsilon": lambda: (sample - alpha_prod_t ** (0.5) * x0) / beta_prod_t ** (0.5),
            "sample": lambda: x0,
            "v_prediction": lambda: (alpha_prod_t ** (0.5) * sample - x0) / beta_prod_t ** (0.5),
        })

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        x0_hook: X0Hook | None = None,
    ) -> DDIMSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step ``x_t -> x_{t_prev}``, optionally with the predicted clean sample replaced by ``x0_hook``.

        Without a hook this is ``DDIMScheduler.step`` (bitwise). With a hook, ``x0' = x0_hook(x0_hat, timestep)`` is
        converted by :meth:`model_output_from_original_sample` and ``DDIMScheduler.step`` runs on that model output,
        so the update, clipping/thresholding and the variance noise (drawn once, as the parent draws it, with the
        same shape, dtype and device as ``model_output``) are the parent's.

        Args:
            model_output: Network output, ``(B, C, H, W)`` or ``(B, C, D, H, W)``.
            timestep: Current discrete timestep, an int or a 0-d integer tensor (an element of ``self.timesteps``).
            sample: Current noisy sample ``x_t``, same shape as ``model_output``.
            eta: DDIM noise weight: 0 deterministic DDIM, 1 DDPM-like.
            use_clipped_model_output: Re-derive the noise estimate from the clipped ``x0`` (see the parent).
            generator: Random generator for the variance noise when ``eta > 0``.
            variance_noise: Explicit variance noise instead of ``generator``.
            return_dict: Return a ``DDIMSchedulerOutput`` rather than a tuple.
            x0_hook: ``x0_hook(x0_hat, timestep) -> x0'``, both the shape of ``sample``; ``None`` for plain DDIM.

        Returns:
            ``DDIMSchedulerOutput(prev_sample, pred_original_sample)`` (or the tuple of both), where
            ``pred_original_sample`` is the hooked ``x0'`` after the configured clipping/thresholding.

        Raises:
            ValueError: If ``set_timesteps`` was not called, or the hook returns another shape than ``sample``.
        """
        if x0_hook is not None:
            if self.num_inference_steps is None:
                raise ValueError("Number of inference steps is 'None', run 'set_timesteps' before 'step'")
            x0_hat = self.predict_original_sample(model_output, timestep, sample)
            x0_new = x0_hook(x0_hat, timestep)
            if x0_new.shape != sample.shape:
                raise ValueError(f"x0_hook returned shape {tuple(x0_new.shape)}, expected {tuple(sample.shape)}")
            model_output = self.model_output_from_original_sample(x0_new, timestep, sample).to(
                device=model_output.device, dtype=model_output.dtype
            )
        return super().step(
            model_output,
            timestep,
            sample,
            eta=eta,
            use_clipped_model_output=use_clipped_model_output,
            generator=generator,
            variance_noise=variance_noise,
            return_dict=return_dict,
        )
