"""Tests for gen_sr.training.ema: diffusers' EMAModel behaviour the training scripts rely on, and our helpers."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from gen_sr.training.ema import EMAModel, create_ema, ema_weights


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _trajectory(model: torch.nn.Module, ema: EMAModel, n: int) -> list[list[torch.Tensor]]:
    """Set the model to ``n`` random weight vectors, stepping the EMA after each; return the vectors."""
    thetas = []
    for _ in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        thetas.append(_params(model))
        ema.step(model.parameters())
    return thetas


def test_constant_decay_matches_closed_form_exponential_average() -> None:
    model = torch.nn.Linear(3, 2).double()
    d, n = 0.9, 6
    ema = create_ema(model, decay=d, min_decay=d)  # min_decay = decay: constant once averaging starts
    thetas = _trajectory(model, ema, n)
    # EMAModel's first step uses decay 0 (copies θ_1); every later one uses d:
    # ema_n = d^(n-1) θ_1 + Σ_{k=2..n} (1 − d) d^(n−k) θ_k
    for i, shadow in enumerate(ema.shadow_params):
        expected = d ** (n - 1) * thetas[0][i] + sum((1 - d) * d ** (n - k) * thetas[k - 1][i] for k in range(2, n + 1))
        torch.testing.assert_close(shadow, expected, rtol=0, atol=1e-12)
    assert ema.optimization_step == n and ema.cur_decay_value == d
    assert ema.get_decay(1) == 0.0


def test_decay_schedule_defaults_and_update_after_step() -> None:
    model = torch.nn.Linear(3, 2).double()
    ema = create_ema(model, decay=0.9999)  # no warm-up: implicit (1 + s) / (10 + s), s = t − 1
    assert [ema.get_decay(t) for t in (1, 2, 3)] == [0.0, 2 / 11, 3 / 12]
    assert ema.get_decay(10**7) == 0.9999

    ema = create_ema(model, decay=0.5, min_decay=0.5, update_after_step=2)  # 3 copies, then averaging
    thetas = _trajectory(model, ema, 3)
    for shadow, theta in zip(ema.shadow_params, thetas[-1], strict=True):
        torch.testing.assert_close(shadow, theta, rtol=0, atol=1e-12)  # "copy" = s − 1·(s − θ): up to rounding
    thetas.append(_trajectory(model, ema, 1)[0])
    for shadow, prev, new in zip(ema.shadow_params, thetas[2], thetas[3], strict=True):
        torch.testing.assert_close(shadow, 0.5 * prev + 0.5 * new, rtol=0, atol=1e-12)


def test_create_ema_validates_and_tracks_frozen_params() -> None:
    with pytest.raises(ValueError, match="min_decay"):
        create_ema(torch.nn.Linear(2, 2), decay=0.9, min_decay=0.95)
    model = torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    ema = create_ema(model, decay=0.5, min_decay=0.5)
    assert ema.model_cls is None and ema.model_config is None  # not a diffusers model
    _trajectory(model, ema, 3)
    torch.testing.assert_close(ema.shadow_params[1], model.bias.detach(), rtol=0, atol=0)  # frozen: copied


def test_ema_weights_swaps_in_and_restores() -> None:
    model = torch.nn.Linear(4, 3)
    ema = create_ema(model, decay=0.9, min_decay=0.9)
    _trajectory(model, ema, 4)
    trained = _params(model)
    assert not torch.equal(trained[0], ema.shadow_params[0])

    with ema_weights(ema, model) as swapped:
        assert swapped is model
        for p, s in zip(model.parameters(), ema.shadow_params, strict=True):
            assert torch.equal(p.detach(), s)
    for p, t in zip(model.parameters(), trained, strict=True):
        assert torch.equal(p.detach(), t)
    assert ema.temp_stored_params is None

    with pytest.raises(KeyError), ema_weights(ema, model):
        assert torch.equal(model.weight.detach(), ema.shadow_params[0])
        raise KeyError("validation failed")
    for p, t in zip(model.parameters(), trained, strict=True):
        assert torch.equal(p.detach(), t)
    assert ema.temp_stored_params is None  # usable again

    with pytest.raises(RuntimeError, match="nested"), ema_weights(ema, model), ema_weights(ema, model):
        pass
    for p, t in zip(model.parameters(), trained, strict=True):
        assert torch.equal(p.detach(), t)

    with pytest.raises(ValueError, match="do not match"), ema_weights(ema, torch.nn.Linear(4, 2)):
        pass


def _assert_same_ema(a: EMAModel, b: EMAModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert {k: v for k, v in sa.items() if k != "shadow_params"} == {
        k: v for k, v in sb.items() if k != "shadow_params"
    }
    for x, y in zip(sa["shadow_params"], sb["shadow_params"], strict=True):
        assert torch.equal(x, y)


def test_state_dict_round_trip() -> None:
    model = torch.nn.Linear(4, 3)
    ema = create_ema(model, decay=1, min_decay=0, update_after_step=1, use_ema_warmup=True, power=3 / 4)
    _trajectory(model, ema, 5)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)

    fresh = create_ema(torch.nn.Linear(4, 3), decay=0.5)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    _assert_same_ema(ema, fresh)
    # Identical from here on: one more step on each gives the same result.
    ema.step(model.parameters())
    fresh.step(model.parameters())
    _assert_same_ema(ema, fresh)

    # Why create_ema casts the settings: EMAModel itself keeps an int min_decay and then refuses its own state.
    raw = EMAModel(model.parameters(), decay=0.9, min_decay=0)
    with pytest.raises(ValueError, match="min_decay"):
        raw.load_state_dict(raw.state_dict())


def test_accelerate_checkpointing_round_trip(tmp_path: Path) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        accelerator = Accelerator()
        model = torch.nn.Linear(4, 3)
        ema = create_ema(model, decay=0.9, min_decay=0.9)
        accelerator.register_for_checkpointing(ema)
        _trajectory(model, ema, 3)
        saved = EMAModel(model.parameters())
        saved.load_state_dict(ema.state_dict())  # a deep copy
        accelerator.save_state(str(tmp_path / "ckpt"))

        _trajectory(model, ema, 2)
        accelerator.load_state(str(tmp_path / "ckpt"))
        ema.to(accelerator.device)
        _assert_same_ema(ema, saved)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


class _TinyNet(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, features: int = 3) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(features, 2)


# diffusers' own EMAModel.from_pretrained calls the deprecated from_config(<path>).
@pytest.mark.filterwarnings("ignore:It is deprecated to pass a pretrained model name or path:FutureWarning")
def test_save_and_load_pretrained_for_diffusers_models(tmp_path: Path) -> None:
    model = _TinyNet(features=5)
    ema = create_ema(model, decay=0.9, min_decay=0.9)
    assert ema.model_cls is _TinyNet and ema.model_config["features"] == 5
    _trajectory(model, ema, 3)
    ema.save_pretrained(str(tmp_path / "ema"))

    loaded = EMAModel.from_pretrained(str(tmp_path / "ema"), model_cls=_TinyNet)
    _assert_same_ema(ema, loaded)
    exported = _TinyNet.from_pretrained(str(tmp_path / "ema"))  # the EMA weights as a plain model
    for p, s in zip(exported.parameters(), ema.shadow_params, strict=True):
        assert torch.equal(p.detach(), s)
