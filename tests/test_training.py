"""Both training scripts, run for real on the tiny config: 2 gloo processes, resume, crash-safe checkpoints, and
clear errors for bad configs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gen_sr.model_card import Holdout
from gen_sr.training import train_autoencoder, train_diffusion

ROOT = Path(__file__).parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
CPU_2PROC = str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml")
TIMEOUT = 300


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script(stage: str, out: Path, *extra: str, processes: int = 1) -> list[str]:
    module = f"gen_sr.training.train_{stage}"
    args = ["--config", TINY, f"--output_dir={out}", *extra]
    if processes == 1:
        return [sys.executable, "-m", module, *args]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_2PROC,
                "--num_processes", str(processes), "--main_process_port", str(_free_port())]
    return [*launcher, "-m", module, *args]


def _run(stage: str, out: Path, *extra: str, processes: int = 1) -> subprocess.CompletedProcess:
    env = _env()
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"  # gloo ranks on the CPU (see configs/accelerate/cpu_2proc.yaml)
    result = subprocess.run(_script(stage, out, *extra, processes=processes), env=env, capture_output=True,
                            text=True, timeout=TIMEOUT, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _train(stage: str, out: Path, *extra: str) -> None:
    """One process of a training script, in this one (no interpreter to start: the scripts' own tests of processes,
    signals and resumption use :func:`_run`)."""
    script = train_autoencoder if stage == "autoencoder" else train_diffusion
    assert script.main(["--config", TINY, f"--output_dir={out}", *extra, "--debug"]) == 0


def _metrics(out: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path, stage: str) -> list[float]:
    return [m["loss"] for m in _metrics(out, stage) if "loss" in m]


def test_a_wavelet_latent_needs_no_training_and_carries_into_the_pipeline(tmp_path: Path, capfd) -> None:
    """autoencoder.kind=haar: the autoencoder stage only measures the band statistics and exports; the diffusion
    stage trains on it, and the exported pipeline reconstructs its latents exactly."""
    from gen_sr.models import HaarAutoencoder
    from gen_sr.pipelines import LatentDiffusionSRPipeline

    out = tmp_path / "haar"
    _train("autoencoder", out, "--autoencoder.kind=haar")
    assert "Haar wavelet transform (exact; not trained)" in "".join(capfd.readouterr())
    checkpoints = out / "autoencoder" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())  # nothing was trained
    _train("diffusion", out, "--autoencoder.kind=haar", "--diffusion_training.steps=2")
    pipe = LatentDiffusionSRPipeline.from_pretrained(out / "diffusion" / "model")
    assert type(pipe.vae) is HaarAutoencoder and len(pipe.vae.config.band_std) == 4
    x = torch.rand(2, 1, 16, 16)
    assert torch.allclose(pipe.vae.decode_latent(pipe.vae.encode_latent(x)), x, atol=1e-5)
    # two levels, with the loss of a one-level latent (unet.loss_levels): it trains, to a different first loss
    two = ["--autoencoder.kind=haar", "--autoencoder.levels=2"]
    _train("autoencoder", tmp_path / "haar2", *two)
    _train("diffusion", tmp_path / "haar2", *two, "--diffusion_training.steps=2")
    _train("diffusion", tmp_path / "haar2w", f"--autoencoder_path={tmp_path / 'haar2' / 'autoencoder' / 'model'}",
         *two, "--unet.loss_levels=1", "--diffusion_training.steps=2")
    first = [_losses(tmp_path / run, "diffusion")[0] for run in ("haar2", "haar2w")]
    assert first[0] != pytest.approx(first[1], rel=1e-3)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    _run("autoencoder", out, processes=2)
    _run("diffusion", out, processes=2)
    return out


@pytest.mark.parametrize("stage", ["autoencoder", "diffusion"])
def test_two_gloo_processes_train_and_agree(two_process_run: Path, stage: str) -> None:
    summary = json.loads((two_process_run / stage / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["parameters_identical_across_ranks"]
    assert len(summary["parameter_fingerprints"]) == 2
    losses = _losses(two_process_run, stage)
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2]), losses
    assert sorted(p.name for p in (two_process_run / stage / "checkpoints").iterdir()) == [
        "checkpoint-3", "checkpoint-6"]
    assert any((two_process_run / stage / "logs").rglob("events.out.tfevents*"))
    model = two_process_run / stage / "model"
    expected = ["config.json", "diffusion_pytorch_model.safetensors"] if stage == "autoencoder" else [
        "model_index.json", "scheduler", "unet", "vae"]
    assert sorted(p.name for p in model.iterdir()) == expected
    validations = [m for m in _metrics(two_process_run, stage) if "val/psnr" in m]
    assert [m["step"] for m in validations] == [3, 6]


def test_the_exported_model_is_a_pipeline(two_process_run: Path) -> None:
    from gen_sr.pipelines import LatentDiffusionSRPipeline

    pipe = LatentDiffusionSRPipeline.from_pretrained(two_process_run / "diffusion" / "model")
    assert pipe.vae.scaling_factor != 1.0  # measured at export
    assert pipe.unet.config.condition_channels == 1 + pipe.vae.config.latent_channels  # condition "both"
    assert pipe.scheduler.config.prediction_type == "v_prediction" and not pipe.scheduler.config.clip_sample
    assert pipe.model_card.sr_axis == 2
    # the slabs training never saw, for evaluate/calibrate --region (tiny.yaml keeps the defaults)
    assert pipe.model_card.holdout == Holdout(1, 0.2, 0.0)
    assert pipe.model_card.trained_on == ["mni152"]  # tiny.yaml names no data: the embedded template
    assert pipe.model_card.in_plane_spacing == (1.0, 1.0) and pipe.model_card.intensity_range is not None


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single")
    _run("autoencoder", out)
    return out


def test_resume_matches_an_uninterrupted_run(autoencoder_run: Path, tmp_path: Path) -> None:
    full = autoencoder_run
    _run("diffusion", full)
    # "N/2 steps": the uninterrupted run's checkpoint at step 3 is exactly that state; continue it to N = 6.
    half = tmp_path / "half"
    shutil.copytree(full / "autoencoder", half / "autoencoder")
    (half / "diffusion" / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "diffusion" / "checkpoints" / "checkpoint-3", half / "diffusion" / "checkpoints" /
                    "checkpoint-3")
    _run("diffusion", half, "--resume", "latest")
    for weights in ("checkpoints/checkpoint-6/model.safetensors",  # the trained UNet
                    "model/unet/diffusion_pytorch_model.safetensors"):  # its exported EMA
        a, b = (load_file(run / "diffusion" / weights) for run in (full, half))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    data = [[m["data"] for m in _metrics(run, "diffusion") if "data" in m and m["step"] > 3] for run in (full, half)]
    assert data[0] == data[1] and len(data[0]) == 3  # the same batches, in the same order


def test_unet_init_starts_the_diffusion_stage_from_a_saved_model(autoencoder_run: Path, tmp_path: Path,
                                                                  capsys) -> None:
    """``unet_init``: the UNet starts from a model folder's weights (a learning rate of 1e-12 leaves them as they
    were), not from new ones; another architecture or a folder without a UNet is one clear line, nothing written."""
    source = tmp_path / "source"
    vae = f"--autoencoder_path={autoencoder_run / 'autoencoder' / 'model'}"
    _train("diffusion", source, vae, "--diffusion_training.steps=2", "--diffusion_training.seed=1")  # other weights
    frozen = ["--diffusion_training.steps=1", "--diffusion_training.learning_rate=1e-12", vae]
    _train("diffusion", tmp_path / "init", f"--unet_init={source / 'diffusion' / 'model'}", *frozen)
    _train("diffusion", tmp_path / "new", *frozen)
    weights = "diffusion/model/unet/diffusion_pytorch_model.safetensors"
    src, init, new = (load_file(tmp_path / run / weights) for run in ("source", "init", "new"))
    for key in src:
        torch.testing.assert_close(init[key], src[key], rtol=0, atol=1e-6)
    assert any(not torch.allclose(new[key], src[key], atol=1e-3) for key in src)  # seed 0's weights are others
    capsys.readouterr()  # what the runs above printed
    for init_from, message in ((source / "diffusion" / "model", "another architecture (channels differ"),
                               (tmp_path / "nowhere", "holds no saved UNet")):
        out = tmp_path / "refused"
        code = train_diffusion.main(["--config", TINY, f"--output_dir={out}", vae, f"--unet_init={init_from}",
                                     "--unet.channels=[8,8]"])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
        assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_kill_during_checkpointing_leaves_the_previous_checkpoint_loadable(autoencoder_run: Path) -> None:
    out = autoencoder_run
    args = _script("diffusion", out, "--diffusion_training.steps=500", "--diffusion_training.checkpoint_every=1",
                   "--diffusion_training.keep_checkpoints=3", "--diffusion_training.validate_every=1000",
                   f"--autoencoder_path={out / 'autoencoder' / 'model'}")
    args[args.index(f"--output_dir={out}")] = f"--output_dir={out / 'killed'}"
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = out / "killed" / "diffusion" / "checkpoints"
    deadline = time.monotonic() + TIMEOUT
    while not (ckpts.is_dir() and sum(1 for p in ckpts.iterdir() if p.name.startswith("checkpoint-")) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before two checkpoints"
        time.sleep(0.05)
    time.sleep(0.13)  # land somewhere inside the following save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    complete = [p for p in ckpts.iterdir() if p.name.startswith("checkpoint-")]
    assert complete and all((p / "gen_sr_step.json").is_file() for p in complete)
    last = max(int(p.name.split("-")[1]) for p in complete)
    _run("diffusion", out / "killed", "--resume", "latest", f"--diffusion_training.steps={last + 1}",
         "--diffusion_training.checkpoint_every=1", "--diffusion_training.validate_every=1000",
         f"--autoencoder_path={out / 'autoencoder' / 'model'}")
    summary = json.loads((out / "killed" / "diffusion" / "summary.json").read_text())
    assert summary["steps"] == last + 1
    assert not list(ckpts.glob(".tmp-*"))  # the killed write's leftovers are cleaned up by the next save


@pytest.mark.parametrize(
    "script,override,message",
    [
        (train_autoencoder, "--autoencoder_training.stepz=3", "unknown key 'autoencoder_training.stepz'"),
        (train_autoencoder, "--autoencoder_training.steps=three", "expected int"),
        (train_diffusion, "--unet.condition=pixels", "unet.condition"),
        (train_diffusion, "--unet.loss_levels=1", "needs autoencoder.kind=haar with more than 1 levels"),
        (train_autoencoder, "--data.paths=[/no/such/folder]", "/no/such/folder"),
        (train_autoencoder, "--data.acquisition.thickness=[2.0,20.0]", "crop_size (16, 16) holds no slice"),
    ],
)
def test_bad_configs_exit_2_with_one_line(script, override: str, message: str, tmp_path: Path, capsys) -> None:
    code = script.main(["--config", TINY, f"--output_dir={tmp_path}", override])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_diffusion_without_an_autoencoder_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert train_diffusion.main(["--config", TINY, f"--output_dir={tmp_path}"]) == 2
    assert "train_autoencoder first" in capsys.readouterr().err


def test_only_complete_checkpoints_count(tmp_path: Path) -> None:
    from gen_sr.training.common import Checkpoints

    for name, complete in (("checkpoint-2", True), ("checkpoint-10", True), ("checkpoint-12", False),
                           (".tmp-checkpoint-14", True), ("notes", True)):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "gen_sr_step.json").write_text(json.dumps({"step": 0}))
    found = Checkpoints(None, tmp_path, keep=2).complete()  # type: ignore[arg-type]
    assert [p.name for p in found] == ["checkpoint-2", "checkpoint-10"]  # numeric order, partial ones ignored


def test_three_d_is_a_config_change(tmp_path: Path) -> None:
    """The same scripts and tiny config train 3D models when crop_size has three entries."""
    three_d = ["--data.crop_size=[8,8,8]", "--autoencoder_training.steps=2", "--diffusion_training.steps=2"]
    _train("autoencoder", tmp_path, *three_d)
    _train("diffusion", tmp_path, *three_d)
    config = json.loads((tmp_path / "diffusion" / "model" / "unet" / "config.json").read_text())
    assert config["spatial_dims"] == 3
    assert json.loads((tmp_path / "diffusion" / "summary.json").read_text())["steps"] == 2


def test_adversarial_term_and_gradient_accumulation(tmp_path: Path) -> None:
    _train("autoencoder", tmp_path, "--autoencoder.adversarial_weight=0.1", "--autoencoder.adversarial_start_step=1",
         "--autoencoder.discriminator_layers=2", "--autoencoder_training.gradient_accumulation_steps=2",
         "--autoencoder_training.steps=3")
    rows = [m for m in _metrics(tmp_path, "autoencoder") if "loss" in m]
    assert [m["step"] for m in rows] == [1, 2, 3]
    assert rows[0].get("disc_loss", 0.0) == 0.0 and rows[-1]["disc_loss"] > 0  # starts after step 1
    assert "gen_adv" in rows[-1]


def test_regression_baseline_is_one_config_away(autoencoder_run: Path, tmp_path: Path) -> None:
    """The same UNet trained with L1 at the last timestep; it exports as a pipeline that samples in one step."""
    from gen_sr.eval.cases import simulate_case
    from gen_sr.eval.evaluate import evaluate
    from gen_sr.pipelines import LatentDiffusionSRPipeline
    from gen_sr.volume import Volume

    shutil.copytree(autoencoder_run / "autoencoder", tmp_path / "autoencoder")
    _train("diffusion", tmp_path, "--unet.objective=regression", "--noise_schedule.prediction_type=sample")
    rows = _metrics(tmp_path, "diffusion")
    assert [m["step"] for m in rows if "val/psnr" in m] == [3, 6]
    pipe = LatentDiffusionSRPipeline.from_pretrained(tmp_path / "diffusion" / "model")
    assert pipe.model_card.objective == "regression"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.scheduler.config.prediction_type == "sample"
    pipe.set_progress_bar_config(disable=True)
    lr = Volume(torch.rand(12, 10, 5).numpy() + 1, torch.diag(torch.tensor([1.0, 1.0, 3.0, 1.0])).numpy())
    out = pipe(lr, num_samples=1, noise_std=0.0)
    assert out.metadata["num_inference_steps"] == 1 and out.metadata["relative_residual"][0] < 1e-4
    case = simulate_case(Volume(torch.rand(12, 10, 24).numpy() + 1, torch.eye(4).numpy()), "v", thickness=4.0)
    methods = {r["method"] for r in evaluate(None, [case], regression=pipe, progress=False)}
    assert "regression (L1)" in methods


def test_regression_needs_the_sample_prediction_type(tmp_path: Path, capsys) -> None:
    assert train_diffusion.main(["--config", TINY, f"--output_dir={tmp_path}", "--unet.objective=regression"]) == 2
    assert "prediction_type=sample" in capsys.readouterr().err


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a child of a background job may inherit an ignored SIGINT


def _logged_steps(metrics: Path) -> list[int]:
    if not metrics.is_file():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.endswith("}")]


def test_ctrl_c_names_the_last_checkpoint_and_resume_drops_the_later_metrics(autoencoder_run: Path,
                                                                            tmp_path: Path) -> None:
    from gen_sr.training.common import Checkpoints

    out = tmp_path / "interrupted"
    common = ["--diffusion_training.checkpoint_every=3", "--diffusion_training.validate_every=1000",
              f"--autoencoder_path={autoencoder_run / 'autoencoder' / 'model'}"]
    args = _script("diffusion", out, "--diffusion_training.steps=500", *common)
    ckpts, metrics = out / "diffusion" / "checkpoints", out / "diffusion" / "metrics.jsonl"
    with (tmp_path / "stderr.txt").open("w") as err_file:
        proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=err_file,
                                preexec_fn=_default_sigint)
        deadline = time.monotonic() + TIMEOUT
        # after the first checkpoint, once a step past the last checkpoint is logged
        while not ((done := Checkpoints(None, ckpts, keep=1).complete())  # type: ignore[arg-type]
                   and max(_logged_steps(metrics), default=0) > int(done[-1].name.split("-")[1])):
            assert proc.poll() is None and time.monotonic() < deadline, "training ended before its first checkpoint"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=TIMEOUT)
    err = (tmp_path / "stderr.txt").read_text()
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last = Checkpoints(None, ckpts, keep=1).complete()[-1]  # type: ignore[arg-type]
    lines = [line for line in err.splitlines() if "checkpoint" in line]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("interrupted at step ") and f"the last checkpoint is {last}" in lines[0], lines
    assert "--resume latest" in lines[0]
    resumed_from = int(last.name.split("-")[1])
    assert max(_logged_steps(metrics)) > resumed_from  # the killed attempt logged steps after its checkpoint

    _run("diffusion", out, "--resume", "latest", f"--diffusion_training.steps={resumed_from + 2}", *common)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in rows if "loss" in m] == list(range(1, resumed_from + 3))  # each step once, in order


def test_truncate_metrics_keeps_the_steps_up_to_the_checkpoint_atomically(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from gen_sr.training.common import Run

    path = tmp_path / "metrics.jsonl"
    entries = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4, 5)] + [{"step": 3, "val/psnr": 20.0}]
    path.write_text("".join(json.dumps(e) + "\n" for e in entries) + '{"step": 6, "lo')  # a line cut by a kill
    run = Run(None, None, tmp_path, SimpleNamespace(is_main_process=True), None, path)  # type: ignore[arg-type]
    inode = path.stat().st_ino
    run.truncate_metrics(3)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == [e for e in entries if e["step"] <= 3]
    assert path.stat().st_ino != inode  # replaced by a rename, not rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left
    run.truncate_metrics(0)
    assert path.read_text() == ""


def test_the_interrupt_message_without_a_checkpoint(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from gen_sr.training.common import Checkpoints, Run, interrupted_message

    run = Run(None, SimpleNamespace(checkpoint_every=100), tmp_path, SimpleNamespace(is_main_process=True),  # type: ignore[arg-type]
              Checkpoints(None, tmp_path / "checkpoints", keep=1), tmp_path / "metrics.jsonl")  # type: ignore[arg-type]
    assert interrupted_message(run).startswith("interrupted before the first step; no checkpoint in ")
    run.step = 42
    message = interrupted_message(run)
    assert message.startswith("interrupted at step 42; no checkpoint") and "step 100" in message
    assert "without --resume" in message and "\n" not in message
    assert interrupted_message(None) == "interrupted before training started; nothing was written"
