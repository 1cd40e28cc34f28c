"""What both training scripts share: the accelerator, optimizer and schedule, data loaders, crash-safe checkpoints,
the step loop with logging, validation and checkpointing, and the command-line wrapper.

Ctrl-C ends a run with one line naming the last complete checkpoint, and exit code 130. A resumed run first cuts
``metrics.jsonl`` back to the checkpoint's step, so the interrupted attempt's later entries do not stay in the log.

The scripts keep only what differs (the model, one training step, validation, export) and stay short.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from gen_sr.config import config_to_dict, parse_cli, save_config
from gen_sr.data import SRPairDataset
from gen_sr.distributed import exit_if_distributed
from gen_sr.errors import InputError
from gen_sr.io import atomic_dir, atomic_write, write_json
from gen_sr.training.experiment import ExperimentConfig, TrainConfig

__all__ = ["Checkpoints", "Run", "backward_and_step", "export_model", "finish", "interrupted_message", "make_loaders",
           "make_optimizer", "run_script", "start_run", "train_loop"]

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_STEP_FILE = "gen_sr_step.json"
_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
_current: Run | None = None  # the run this process's script started, for the Ctrl-C message


class Checkpoints:
    """Crash-safe ``accelerator.save_state`` checkpoints, keeping the last ``keep``.

    A checkpoint is written into a hidden temporary folder and renamed to ``checkpoint-<step>`` only once complete,
    so a process killed mid-write leaves the previous checkpoints intact and loadable; leftovers are removed at the
    next save.
    """

    def __init__(self, accelerator: Accelerator, directory: Path, keep: int) -> None:
        self.accelerator, self.directory, self.keep = accelerator, Path(directory), keep

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir()
                 if (m := _CHECKPOINT.match(p.name)) and (p / _STEP_FILE).is_file()]
        return [p for _, p in sorted(found)]

    def save(self, step: int) -> Path:
        final = self.directory / f"checkpoint-{step}"
        tmp = self.directory / f".tmp-checkpoint-{step}"
        if self.accelerator.is_main_process:
            for stale in self.directory.glob(".tmp-checkpoint-*"):
                shutil.rmtree(stale, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            (tmp / _STEP_FILE).write_text(json.dumps({"step": step}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def resume(self, which: str | None) -> int:
        """Load ``"latest"`` or a checkpoint folder; returns the step to continue from (0 without ``which``)."""
        if which is None:
            return 0
        if which == "latest":
            done = self.complete()
            if not done:
                raise InputError("no complete checkpoint to resume from", self.directory, "start without --resume")
            path = done[-1]
        else:
            path = Path(which)
            if not (path / _STEP_FILE).is_file():
                raise InputError("is not a complete gen_sr checkpoint", path)
        self.accelerator.load_state(str(path))
        return int(json.loads((path / _STEP_FILE).read_text())["step"])


@dataclass
class Run:
    """The state of one training stage that the loop and the scripts share."""

    cfg: ExperimentConfig
    train: TrainConfig
    directory: Path
    accelerator: Accelerator
    checkpoints: Checkpoints
    metrics_path: Path
    timings: list[float] = field(default_factory=list)
    step: int | None = None  # the last completed optimizer step, once the loop has started

    def log(self, step: int, values: dict[str, float]) -> None:
        """Log to the trackers (tensorboard) and to ``metrics.jsonl``, from the main process."""
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Keep only the ``metrics.jsonl`` entries of steps ``<= step`` (main process; atomic: a temporary file
        renamed over the log). A run resumed from step ``step`` repeats the steps after it, so the entries an
        interrupted attempt logged for them are dropped; a line cut short by a kill is dropped too."""
        if not (self.accelerator.is_main_process and self.metrics_path.is_file()):
            return
        lines = self.metrics_path.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= step:
                keep.append(line)
        if len(keep) != len(lines):
            atomic_write(self.metrics_path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in keep)))


def start_run(cfg: ExperimentConfig, stage: str, train: TrainConfig) -> Run:
    """Create the accelerator (mixed precision, accumulation, tensorboard) and the run folder for one stage."""
    directory = cfg.stage_dir(stage)
    accelerator = Accelerator(
        mixed_precision=train.mixed_precision,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(directory), logging_dir=str(directory / "logs")),
    )
    set_seed(train.seed, device_specific=False)
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        save_config(cfg, directory / "config.yaml")
    accelerator.wait_for_everyone()
    accelerator.init_trackers(stage, config=_flat_scalars(config_to_dict(cfg)))
    global _current
    _current = Run(cfg, train, directory, accelerator, Checkpoints(accelerator, directory / "checkpoints",
                   train.keep_checkpoints), directory / "metrics.jsonl")
    return _current


def _flat_scalars(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Tensorboard hyper-parameters must be scalars: flatten sections, stringify lists."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_scalars(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return out


def make_optimizer(params: Any, run: Run) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with warm-up and the configured decay (diffusers' ``get_scheduler``).

    The prepared schedule advances once per process at each optimizer step (accelerate's convention), so its
    lengths are scaled by the number of processes.
    """
    train, n = run.train, run.accelerator.num_processes
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    schedule = get_scheduler(train.lr_schedule, optimizer, num_warmup_steps=train.lr_warmup_steps * n,
                             num_training_steps=train.steps * n)
    return optimizer, schedule


def make_loaders(run: Run, volumes: Sequence[Any]) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """The training loader (sequential over index-seeded items, sharded by accelerate) and the held-out loader.

    ``volumes`` come from :func:`gen_sr.data.load_training_volumes`, called before :func:`start_run` so that a bad
    data path fails before anything is written.
    """
    cfg, train = run.cfg, run.train
    per_step = train.batch_size * train.gradient_accumulation_steps * run.accelerator.num_processes
    datasets = (
        SRPairDataset(volumes, cfg.data, "train", length=train.steps * per_step, seed=train.seed),
        SRPairDataset(volumes, cfg.data, "val", length=train.val_batches * train.batch_size, seed=train.seed),
    )
    return tuple(  # type: ignore[return-value]
        # Own generator: creating an iterator draws a seed, which must not come from the global RNG that the
        # training noise uses (a resumed run creates its iterator at a different point of that stream).
        torch.utils.data.DataLoader(ds, batch_size=train.batch_size, shuffle=False, drop_last=True,
                                    num_workers=train.num_workers, generator=torch.Generator().manual_seed(train.seed))
        for ds in datasets
    )


def train_loop(
    run: Run,
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    start_step: int,
    train_step: Callable[[dict[str, torch.Tensor]], dict[str, float]],
    validate: Callable[[], dict[str, float]],
) -> None:
    """Run optimizer steps ``start_step + 1 .. train.steps``.

    ``train_step`` does forward, backward and the optimizer step for one micro-batch (inside
    ``accelerator.accumulate``); this loop counts synchronised steps, and logs, validates and checkpoints on schedule.
    ``loader`` must be prepared by the accelerator; on resume its first batches are skipped, so the data order
    equals an uninterrupted run, and ``metrics.jsonl`` is cut back to ``start_step``. ``run.step`` follows the
    completed steps (for the Ctrl-C message of :func:`run_script`).
    """
    acc, train = run.accelerator, run.train
    run.truncate_metrics(start_step)
    batches: Iterator = iter(acc.skip_first_batches(loader, start_step * train.gradient_accumulation_steps)
                             if start_step else loader)
    step = run.step = start_step
    bar = tqdm(total=train.steps, initial=step, desc=run.directory.name, disable=not acc.is_local_main_process,
               dynamic_ncols=True)
    try:
        _steps(run, model, batches, step, train_step, validate, bar)
    finally:
        bar.close()


def _steps(run: Run, model: torch.nn.Module, batches: Iterator, step: int,
           train_step: Callable[[dict[str, torch.Tensor]], dict[str, float]],
           validate: Callable[[], dict[str, float]], bar: tqdm) -> None:
    acc, train = run.accelerator, run.train
    tic = time.perf_counter()
    for batch in batches:
        with acc.accumulate(model):
            logs = train_step(batch)
        if not acc.sync_gradients:
            continue
        step = run.step = step + 1
        run.timings.append(time.perf_counter() - tic)
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4f}")
        if step % train.log_every == 0 or step == train.steps:
            run.log(step, {**logs, "data": float(batch["hr"].double().sum())})
        if step % train.validate_every == 0 or step == train.steps:
            values = validate() if acc.is_main_process else {}
            acc.wait_for_everyone()
            if values:
                run.log(step, values)
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
        if step % train.checkpoint_every == 0 or step == train.steps:
            run.checkpoints.save(step)
        tic = time.perf_counter()
        if step >= train.steps:
            break


def finish(run: Run, model: torch.nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check that every rank holds the same parameters and write ``summary.json``; returns the summary."""
    acc = run.accelerator
    params = [p.detach().double().sum() for p in acc.unwrap_model(model).parameters()]
    fingerprint = (torch.stack(params).sum() if params else torch.zeros((), dtype=torch.float64)).reshape(1)
    fingerprint = fingerprint.to(acc.device)
    prints = acc.gather(fingerprint).cpu().tolist()
    timings = sorted(run.timings[1:] or run.timings)  # the first step pays one-off costs
    summary = {
        "world_size": acc.num_processes,
        "steps": run.train.steps,
        "seconds_per_step_median": timings[len(timings) // 2] if timings else None,
        "parameter_fingerprints": prints,
        "parameters_identical_across_ranks": all(abs(p - prints[0]) <= 1e-9 * max(1.0, abs(prints[0]))
                                                 for p in prints),
        **(extra or {}),
    }
    if acc.is_main_process:
        write_json(run.directory / "summary.json", summary)
    for tracker in acc.trackers:
        tracker.finish()
    acc.wait_for_everyone()  # the process group stays up: see gen_sr.distributed
    return summary


def backward_and_step(run: Run, loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      schedule: Any) -> None:
    """One optimizer update from ``loss``: backward, gradient clipping on synchronised steps
    (``max_grad_norm``), the optimizer and learning-rate steps, and clearing the gradients."""
    acc = run.accelerator
    acc.backward(loss)
    if acc.sync_gradients:
        acc.clip_grad_norm_(model.parameters(), run.train.max_grad_norm)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()


def export_model(run: Run, write: Callable[[Path], str]) -> Path:
    """Write the stage's ``model/`` folder from the main process, whole or not at all (:func:`~gen_sr.io.atomic_dir`;
    ``write(folder)`` returns what to say about it), while the other processes wait; returns the folder."""
    acc, out = run.accelerator, run.directory / "model"
    if acc.is_main_process:
        acc.print(f"exported {out}{atomic_dir(out, write)}")
    acc.wait_for_everyone()
    return out


def interrupted_message(run: Run | None) -> str:
    """The one line a Ctrl-C prints: where the run stopped and the checkpoint to resume from."""
    if run is None:
        return "interrupted before training started; nothing was written"
    where = "before the first step" if run.step is None else f"at step {run.step}"
    done = run.checkpoints.complete()
    if not done:
        return (f"interrupted {where}; no checkpoint in {run.checkpoints.directory} yet (the first is written at "
                f"step {run.train.checkpoint_every}): start again without --resume")
    return f"interrupted {where}; the last checkpoint is {done[-1]}: resume with --resume latest"


def run_script(train: Callable[[ExperimentConfig, Any], None], argv: Sequence[str] | None, description: str) -> int:
    """Parse ``--config``/``--resume``/overrides and run ``train``; a user mistake is one line and exit code 2, a
    Ctrl-C one line naming the last checkpoint and exit code 130 (``--debug`` shows the traceback of either)."""
    global _current
    _current = None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, args = parse_cli(ExperimentConfig, argv, description=description)
        train(cfg, args)
    except InputError as e:
        if "--debug" in argv:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if "--debug" in argv:
            raise
        run = _current
        if run is None or run.accelerator.is_main_process:
            print(interrupted_message(run), file=sys.stderr, flush=True)
        exit_if_distributed(_INTERRUPTED)
        return _INTERRUPTED
    exit_if_distributed(0)
    return 0
