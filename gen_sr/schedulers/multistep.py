"""diffusers' multistep solvers (DPM-Solver++, UniPC) with the same data-consistency hook as DDIM.

Both solvers turn each network output into a predicted clean sample (``convert_model_output``, in their
data-prediction form) and build the update from the last few of those. The hook replaces that prediction, exactly
where :class:`~gen_sr.schedulers.DDIMDataConsistencyScheduler` replaces DDIM's, before the solver stores it, so every
update formula stays diffusers' own::

    scheduler = DPMSolverDataConsistencyScheduler.from_config(pipe.scheduler.config)
    z = scheduler.step(out, t, z, x0_hook=data_consistency).prev_sample

Only the data-prediction variants have a clean-sample prediction to replace: ``algorithm_type="dpmsolver++"`` or
``"sde-dpmsolver++"`` (the defaults) and UniPC with ``predict_x0=True`` (its default); the others refuse a hook.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    SchedulerMixin,  # noqa: F401  (DiffusionPipeline.from_pretrained looks it up in this module)
    UniPCMultistepScheduler,
)

from gen_sr.schedulers.ddim import NamedSampler, X0Hook, describe_sampler

__all__ = ["DPMSolverDataConsistencyScheduler", "UniPCDataConsistencyScheduler"]


class _X0HookMixin(NamedSampler):
    """Applies ``x0_hook`` to the solver's predicted clean sample inside one ``step`` call."""

    _hook: tuple[X0Hook, int | torch.Tensor] | None = None
    _step_index: int | None
    timesteps: torch.Tensor | None
    num_inference_steps: int | None

    def _predicts_x0(self) -> bool:
        raise NotImplementedError

    def _hooked_step(self, step: Any, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
                     x0_hook: X0Hook | None, **kwargs: Any) -> Any:
        if x0_hook is not None and not self._predicts_x0():
            raise ValueError(f"{type(self).__name__} predicts noise with this config; the data-consistency hook needs "
                             "the data-prediction form (dpmsolver++ / predict_x0=True)")
        self._hook = None if x0_hook is None else (x0_hook, timestep)
        try:
            return step(model_output, timestep, sample, **kwargs)
        finally:
            self._hook = None

    def predict_original_sample(self, model_output: torch.Tensor, timestep: int | torch.Tensor,
                                sample: torch.Tensor) -> torch.Tensor:
        """The solver's clean-sample prediction ``x0_hat`` from ``model_output`` at ``timestep`` (diffusers'
        ``convert_model_output``, hook-free), without advancing the solver: its step counter is left as it was.

        Shapes: ``model_output`` and ``sample`` ``(B, C, H, W)`` or ``(B, C, D, H, W)``; the result the same.
        """
        if self.timesteps is None or self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', run 'set_timesteps' first")
        saved = self._step_index
        self._step_index = self.index_for_timestep(timestep)  # type: ignore[attr-defined]
        try:
            return super().convert_model_output(model_output, sample=sample)  # type: ignore[misc]
        finally:
            self._step_index = saved

    def convert_model_output(self, model_output: torch.Tensor, *args: Any, sample: torch.Tensor | None = None,
                             **kwargs: Any) -> torch.Tensor:
        """The solver's own conversion (``x0_hat``), then the hook's replacement ``x0'`` when a hook is set."""
        x0 = super().convert_model_output(model_output, *args, sample=sample, **kwargs)  # type: ignore[misc]
        if self._hook is None:
            return x0
        hook, timestep = self._hook
        replaced = hook(x0, timestep)
        if replaced.shape != x0.shape:
            raise ValueError(f"x0_hook returned shape {tuple(replaced.shape)}, expected {tuple(x0.shape)}")
        return replaced.to(device=x0.device, dtype=x0.dtype)


class DPMSolverDataConsistencyScheduler(_X0HookMixin, DPMSolverMultistepScheduler):
    """:class:`diffusers.DPMSolverMultistepScheduler` whose predicted clean sample can be replaced by ``x0_hook`` in
    :meth:`step`; without a hook it is the parent, bitwise. Config and loading are the parent's."""

    _compatibles: ClassVar[list[str]] = list(DPMSolverMultistepScheduler._compatibles)

    def _predicts_x0(self) -> bool:
        return self.config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++")

    @property
    def stochastic(self) -> bool:
        """Whether :meth:`step` adds fresh noise (the SDE variants): the pipeline then gives it each sample's own
        draw (``variance_noise``), so that seeded runs repeat."""
        return str(self.config.algorithm_type).startswith("sde")

    @property
    def sampler_name(self) -> str:
        """What a calibration records of this sampler: :func:`~gen_sr.schedulers.ddim.describe_sampler`, with the
        SDE variant where it is one."""
        return describe_sampler(self, *([self.config.algorithm_type] if self.stochastic else []))

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True, x0_hook: X0Hook | None = None) -> Any:
        """The parent's step, with ``x0_hook(x0_hat, timestep) -> x0'`` applied to this step's clean-sample
        prediction (shapes of ``sample``: ``(B, C, H, W)`` or ``(B, C, D, H, W)``)."""
        return self._hooked_step(super().step, model_output, timestep, sample, x0_hook, generator=generator,
                                 variance_noise=variance_noise, return_dict=return_dict)


class UniPCDataConsistencyScheduler(_X0HookMixin, UniPCMultistepScheduler):
    """:class:`diffusers.UniPCMultistepScheduler` whose predicted clean sample can be replaced by ``x0_hook`` in
    :meth:`step` (the corrector then uses the replaced prediction too); without a hook it is the parent, bitwise."""

    _compatibles: ClassVar[list[str]] = list(UniPCMultistepScheduler._compatibles)

    def _predicts_x0(self) -> bool:
        return bool(self.config.predict_x0)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             return_dict: bool = True, x0_hook: X0Hook | None = None) -> Any:
        """The parent's step, with ``x0_hook(x0_hat, timestep) -> x0'`` applied to this step's clean-sample
        prediction."""
        return self._hooked_step(super().step, model_output, timestep, sample, x0_hook, return_dict=return_dict)
