"""Typed experiment configs: defaults < YAML < dotted overrides, strict keys and types, round trip, CLI front end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from gen_sr.config import ConfigError, config_to_dict, load_config, parse_cli, save_config
from gen_sr.errors import InputError


@dataclass
class Model:
    channels: tuple[int, ...] = (8, 16)
    kind: Literal["vae", "unet"] = "vae"
    patch: tuple[int, int] = (32, 32)


@dataclass
class Train:
    steps: int = 10
    lr: float = 1e-3
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    resume: str | None = None
    ema_decay: Optional[float] = None  # noqa: UP045 - typing.Optional must work too
    compile: bool = False
    loss_weights: dict[str, float] = field(default_factory=lambda: {"l1": 1.0})

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class Exp:
    seed: int = 0
    model: Model = field(default_factory=Model)
    train: Train = field(default_factory=Train)
    tags: list[str] = field(default_factory=list)


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(Exp, *args, **kwargs)
    assert isinstance(info.value, InputError)
    assert "\n" not in str(info.value)
    return str(info.value)


# ----------------------------------------------------------------------------------------------------- precedence
def test_defaults_only():
    assert load_config(Exp) == Exp()


def test_yaml_overrides_defaults(tmp_path):
    path = write(tmp_path, "seed: 3\nmodel:\n  kind: unet\ntrain:\n  steps: 500\n  mixed_precision: no\ntags: [a, b]\n")
    cfg = load_config(Exp, path)
    assert cfg.seed == 3 and cfg.tags == ["a", "b"]
    assert cfg.model == Model(kind="unet")  # the rest of a section keeps its defaults
    assert cfg.train.steps == 500 and cfg.train.lr == 1e-3
    assert cfg.train.mixed_precision == "no"  # YAML 1.2 scalars: `no` is a string, not False


def test_cli_overrides_yaml(tmp_path):
    path = write(tmp_path, "seed: 3\ntrain:\n  steps: 500\n  lr: 1e-4\n")
    cfg = load_config(Exp, str(path), ["--train.steps=7", "--seed", "4", "--train.mixed_precision", "bf16"])
    assert (cfg.seed, cfg.train.steps, cfg.train.mixed_precision) == (4, 7, "bf16")
    assert cfg.train.lr == 1e-4  # from the file, a float without a dot
    assert load_config(Exp, overrides=["--train.steps", "-5"]).train.steps == -5
    assert load_config(Exp, overrides=["--seed=1", "--seed=2"]).seed == 2  # last one wins


def test_override_section_as_mapping():
    overrides = ["--model={kind: unet, channels: [4]}", "--train.loss_weights={l1: 1, lpips: 0.1}"]
    cfg = load_config(Exp, overrides=overrides)
    assert cfg.model == Model(channels=(4,), kind="unet")
    assert cfg.train.loss_weights == {"l1": 1.0, "lpips": 0.1}
    msg = error(overrides=["--model=unet"])
    assert "--model=unet" in msg and "'model'" in msg and "mapping" in msg


# ----------------------------------------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize(
    ("text", "key", "hint"), [("sed: 1\n", "sed", "seed"), ("train:\n  stesp: 1\n", "train.stesp", "train.steps")]
)
def test_unknown_key_in_yaml(tmp_path, text, key, hint):
    path = write(tmp_path, text)
    msg = error(path)
    assert msg == f"{path}: unknown key '{key}' (did you mean '{hint}'?)"


@pytest.mark.parametrize(
    ("arg", "key", "hint"),
    [
        ("--sed=1", "sed", "seed"),
        ("--train.stesp=1", "train.stesp", "train.steps"),
        ("--modl.kind=unet", "modl", "model"),
    ],
)
def test_unknown_key_on_command_line(arg, key, hint):
    msg = error(overrides=[arg])
    assert msg == f"{arg}: unknown key '{key}' (did you mean '{hint}'?)"


def test_unknown_key_without_close_match_lists_known_keys():
    assert "known keys: train.steps, train.lr" in error(overrides=["--train.zzz=1"])


def test_not_a_section_and_bad_arguments():
    assert "'seed' is not a section" in error(overrides=["--seed.x=1"])
    assert "'foo'" in error(overrides=["foo"])
    assert "--train.steps" in error(overrides=["--train.steps"])  # no value


# ----------------------------------------------------------------------------------------------------- types
@pytest.mark.parametrize(
    ("yaml_text", "key", "expected"),
    [
        ("train:\n  steps: abc\n", "train.steps", "expected int"),  # str for int
        ("train:\n  steps: 1.5\n", "train.steps", "expected int"),  # float for int
        ("seed: [1, 2]\n", "seed", "expected int"),  # list for scalar
        ("model:\n  kind: gan\n", "model.kind", "expected one of 'vae', 'unet'"),
        ("train:\n  compile: yes\n", "train.compile", "expected bool"),  # only real booleans in files
        ("train:\n  compile: 1\n", "train.compile", "expected bool"),
        ("model:\n  channels: 8\n", "model.channels", "expected a list"),
        ("model:\n  channels: [8, x]\n", "model.channels[1]", "expected int"),
        ("model:\n  patch: [1, 2, 3]\n", "model.patch", "expected 2 items"),
        ("train: 5\n", "train", "expected a mapping"),
        ("tags: a\n", "tags", "expected a list"),
        ("train:\n  resume: 3\n", "train.resume", "expected str"),
    ],
)
def test_wrong_type_in_yaml(tmp_path, yaml_text, key, expected):
    path = write(tmp_path, yaml_text)
    msg = error(path)
    assert msg.startswith(f"{path}: ") and f"'{key}'" in msg and expected in msg


def test_wrong_type_on_command_line():
    assert error(overrides=["--train.steps=abc"]) == "--train.steps=abc: expected int for 'train.steps', got 'abc'"
    assert "'train.steps'" in error(overrides=["--train.steps=2.5"])
    assert "one of 'no', 'fp16', 'bf16'" in error(overrides=["--train.mixed_precision=fp8"])
    assert "'train.compile'" in error(overrides=["--train.compile=maybe"])
    assert "'seed'" in error(overrides=["--seed=[1, 2]"])


def test_accepted_values():
    cfg = load_config(Exp, overrides=["--train.lr=1", "--train.ema_decay=0.999", "--train.resume=runs/a/ckpt"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # an int is fine for a float
    assert cfg.train.ema_decay == 0.999 and cfg.train.resume == "runs/a/ckpt"
    cfg = load_config(Exp, overrides=["--train.resume=null", "--train.ema_decay=null"])
    assert cfg.train.resume is None and cfg.train.ema_decay is None
    for text, value in [("true", True), ("yes", True), ("1", True), ("false", False), ("no", False), ("0", False)]:
        assert load_config(Exp, overrides=[f"--train.compile={text}"]).train.compile is value
    assert load_config(Exp, overrides=["--tags=42"]).tags == ["42"]  # a str field keeps the text
    assert load_config(Exp, overrides=["--tags=[1, x, 2.5]"]).tags == ["1", "x", "2.5"]


def test_none_for_optional_in_yaml(tmp_path):
    cfg = load_config(Exp, write(tmp_path, "train:\n  resume: null\n  ema_decay: ~\n  lr: 2\n"))
    assert cfg.train.resume is None and cfg.train.ema_decay is None and cfg.train.lr == 2.0
    assert "'train.steps'" in error(write(tmp_path, "train:\n  steps: null\n"))


@pytest.mark.parametrize("text", ["1,2,3", "[1, 2, 3]", "1, 2, 3"])
def test_sequences_from_command_line(text):
    cfg = load_config(Exp, overrides=[f"--model.channels={text}", "--tags", text])
    assert cfg.model.channels == (1, 2, 3) and cfg.tags == ["1", "2", "3"]
    assert load_config(Exp, overrides=["--model.patch=64,48"]).model.patch == (64, 48)
    assert load_config(Exp, overrides=["--model.channels=[]"]).model.channels == ()
    assert "'model.patch'" in error(overrides=["--model.patch=1,2,3"])


# ----------------------------------------------------------------------------------------------------- files
def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert error(path) == f"{path}: no such config file"


@pytest.mark.parametrize(
    ("text", "expected"), [("train: [1, 2\n", "invalid YAML"), ("- 1\n- 2\n", "top level must be a mapping")]
)
def test_bad_file_content(tmp_path, text, expected):
    path = write(tmp_path, text)
    msg = error(path)
    assert msg.startswith(f"{path}: ") and expected in msg


def test_empty_file_means_defaults(tmp_path):
    assert load_config(Exp, write(tmp_path, "# nothing here\n")) == Exp()


# ----------------------------------------------------------------------------------------------------- round trip
def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        Exp, overrides=["--model.channels=4,8", "--train.lr=3e-4", "--tags=no,1e-3,yes", "--train.ema_decay=0.99"]
    )
    path = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(Exp, path) == cfg
    assert config_to_dict(cfg)["model"] == {"channels": [4, 8], "kind": "vae", "patch": [32, 32]}
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left behind
    with pytest.raises(ConfigError, match="does not exist"):
        save_config(cfg, tmp_path / "missing" / "config.yaml")


# ----------------------------------------------------------------------------------------------------- validation
def test_post_init_error_becomes_config_error(tmp_path):
    assert error(overrides=["--train.lr=-1"]) == "invalid section 'train': lr must be positive, got -1.0"
    assert "lr must be positive" in error(write(tmp_path, "train:\n  lr: 0\n"))


# ----------------------------------------------------------------------------------------------------- parse_cli
def test_parse_cli_end_to_end(tmp_path):
    path = write(tmp_path, "train:\n  steps: 100\n")
    argv = ["--config", str(path), "--resume", "latest", "--train.steps", "5", "--model.kind=unet", "--debug"]
    cfg, ns = parse_cli(Exp, argv, description="train a toy model")
    assert cfg == Exp(model=Model(kind="unet"), train=Train(steps=5))
    assert ns.config == path and ns.resume == "latest" and ns.debug
    assert ns.overrides == ["--train.steps", "5", "--model.kind=unet"]

    cfg, ns = parse_cli(Exp, [], description="x")
    assert cfg == Exp() and ns.config is None and ns.resume is None and not ns.debug


def test_parse_cli_rejects_stray_arguments(tmp_path):
    for argv, name in [(["stray"], "'stray'"), (["-x"], "'-x'"), (["--train.stesp=3"], "train.stesp")]:
        with pytest.raises(ConfigError, match=name):
            parse_cli(Exp, argv, description="x")
    with pytest.raises(ConfigError, match="no such config file"):
        parse_cli(Exp, ["--config", str(tmp_path / "missing.yaml")], description="x")


def test_parse_cli_help_lists_keys(capsys):
    with pytest.raises(SystemExit):
        parse_cli(Exp, ["--help"], description="x")
    out = capsys.readouterr().out
    assert "--train.mixed_precision" in out and "--model.channels: tuple[int, ...] = [8, 16]" in out


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_committed_experiment_config_loads(path: Path) -> None:
    """The configs in configs/ are checked against the schema like any user's (no unknown key, right types)."""
    from gen_sr.training.experiment import ExperimentConfig

    cfg = load_config(ExperimentConfig, path)
    assert cfg.output_dir.startswith("runs/")


def test_the_shipped_model_card_matches_its_config() -> None:
    from gen_sr.model_card import ModelCard
    from gen_sr.training.experiment import ExperimentConfig

    root = Path(__file__).parents[1]
    cfg = load_config(ExperimentConfig, root / "configs" / "heads2d.yaml")
    card = ModelCard.from_folder(root / "models" / "heads2d")
    assert card.trained_for == cfg.data.acquisition and card.unet_condition == cfg.unet.condition
    assert card.holdout is not None and card.holdout.fraction == cfg.data.holdout_fraction
