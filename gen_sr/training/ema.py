"""Exponential moving average (EMA) of model weights, on top of :class:`diffusers.training_utils.EMAModel`.

The training scripts use :class:`~diffusers.training_utils.EMAModel` directly for everything it already does:

* ``ema.step(model.parameters())`` after each optimiser step;
* ``accelerator.register_for_checkpointing(ema)``: ``EMAModel`` has the ``state_dict()``/``load_state_dict()`` that
  ``accelerate`` requires. ``accelerator.load_state`` loads it with ``map_location="cpu"``, so call
  ``ema.to(accelerator.device)`` afterwards;
* ``ema.save_pretrained(path)`` / ``EMAModel.from_pretrained(path, model_cls=...)`` for diffusers models (it needs the
  ``model_cls``/``model_config`` that :func:`create_ema` fills in).

This module adds what it lacks: :func:`create_ema` (parameters, model class and config, and float-typed settings so the
state survives ``load_state_dict``'s type checks) and the :func:`ema_weights` context manager.

Decay schedule of ``EMAModel.step`` (``t`` = number of ``step`` calls so far, including the current one, and
``s = t - update_after_step - 1``): for ``s <= 0`` the decay is 0, i.e. the EMA is set to the weights (always the case
for the very first call, so the initial weights never enter the average); afterwards it is
``clamp(w(s), min_decay, decay)`` with ``w(s) = (1 + s) / (10 + s)`` when ``use_ema_warmup=False`` (an implicit
warm-up) or ``w(s) = 1 - (1 + s / inv_gamma) ** -power`` when ``use_ema_warmup=True``. For a constant decay ``d``,
pass ``decay=d, min_decay=d``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.training_utils import EMAModel

__all__ = ["EMAModel", "create_ema", "ema_weights"]


def create_ema(
    model: torch.nn.Module,
    decay: float = 0.9999,
    *,
    min_decay: float = 0.0,
    update_after_step: int = 0,
    use_ema_warmup: bool = False,
    inv_gamma: float = 1.0,
    power: float = 2 / 3,
    foreach: bool = False,
) -> EMAModel:
    """An :class:`EMAModel` tracking all of ``model``'s parameters (trainable or not, in ``parameters()`` order).

    The shadow weights start as a copy of the current weights, on their device. For a diffusers model
    (a :class:`~diffusers.configuration_utils.ConfigMixin`) ``model_cls``/``model_config`` are set, so
    ``ema.save_pretrained`` works; for other models (e.g. MONAI networks) they stay ``None``: export them with
    :func:`ema_weights` and the model's own saving instead. Pass the unwrapped model (not the DDP or compiled wrapper).

    Args:
        model: the model being trained.
        decay: the maximum decay.
        min_decay: the minimum decay once averaging has started; ``min_decay=decay`` gives a constant decay.
        update_after_step: number of ``step`` calls, after the first, that copy the weights instead of averaging.
        use_ema_warmup: use ``1 - (1 + s / inv_gamma) ** -power`` rather than ``(1 + s) / (10 + s)`` as the
            warm-up decay (see the module docstring).
        inv_gamma: inverse multiplicative factor of the EMA warm-up.
        power: exponent of the EMA warm-up.
        foreach: use the ``torch._foreach`` kernels.

    Returns:
        The EMA, with every setting stored as the Python type ``EMAModel.load_state_dict`` insists on (it rejects,
        for example, an ``int`` ``min_decay``).

    Raises:
        ValueError: unless ``0 <= min_decay <= decay <= 1``.
    """
    if not 0.0 <= min_decay <= decay <= 1.0:
        raise ValueError(f"need 0 <= min_decay <= decay <= 1, got min_decay={min_decay}, decay={decay}")
    is_diffusers = isinstance(model, ConfigMixin)
    return EMAModel(
        model.parameters(),
        decay=float(decay),
        min_decay=float(min_decay),
        update_after_step=int(update_after_step),
        use_ema_warmup=bool(use_ema_warmup),
        inv_gamma=float(inv_gamma),
        power=float(power),
        foreach=foreach,
        model_cls=type(model) if is_diffusers else None,
        model_config=model.config if is_diffusers else None,
    )


@contextmanager
def ema_weights(ema: EMAModel, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Temporarily load the EMA weights into ``model``, e.g. for validation or export.

    ``ema.store`` (a CPU copy of the current weights) → ``ema.copy_to`` → ``yield`` → ``ema.restore``, the restore
    running also when the body raises. Buffers (e.g. BatchNorm statistics) are not averaged and stay as they are.
    Not re-entrant: ``EMAModel`` holds a single stored copy.

    Args:
        ema: the EMA, created from this model's parameters (:func:`create_ema`).
        model: the model being trained (a DDP or compiled wrapper is fine: same parameters, same order).

    Yields:
        ``model``, holding the EMA weights.

    Raises:
        ValueError: if the model's parameters do not match the EMA's shadow parameters in number and shapes.
        RuntimeError: if the EMA already holds stored weights (nested use, or an earlier ``store`` never restored).
    """
    params = list(model.parameters())
    shadow = ema.shadow_params
    if len(params) != len(shadow) or any(p.shape != s.shape for p, s in zip(params, shadow, strict=True)):
        raise ValueError(f"model has {len(params)} parameters that do not match the EMA's {len(shadow)}")
    if ema.temp_stored_params is not None:
        raise RuntimeError("the EMA already holds stored weights; ema_weights cannot be nested")
    ema.store(params)
    try:
        ema.copy_to(params)
        yield model
    finally:
        ema.restore(params)
