"""Seconds per optimizer step of both training stages, for each experiment config, on this machine.

    python benchmarks/training_speed.py [--steps 12] [--configs tiny mni2d mni3d_gpu]

Each stage runs ``--steps`` steps in a fresh single process (no validation or checkpoints inside the timed
steps) and reports the median step time from its ``summary.json`` (the first step, which pays one-off costs, is
left out). On a CPU-only machine the 3D config runs with ``mixed_precision=no`` (bf16 autocast is far slower on
CPUs) and ``num_workers=0``; everything else is as configured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_stage(config: str, stage: str, steps: int, out: Path) -> dict:
    section = f"{stage}_training"
    overrides = [f"--{section}.steps={steps}", f"--{section}.validate_every={10 * steps}",
                 f"--{section}.checkpoint_every={10 * steps}", f"--{section}.log_every={steps}",
                 f"--{section}.val_batches=1", f"--output_dir={out}"]
    if not torch.cuda.is_available():
        overrides += [f"--{section}.mixed_precision=no", f"--{section}.num_workers=0"]
    cmd = [sys.executable, "-m", f"gen_sr.training.train_{stage}", "--config", str(ROOT / "configs" / f"{config}.yaml"),
           *overrides]
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    return json.loads((out / stage / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--configs", nargs="+", default=["tiny", "mni2d", "mni3d_gpu"])
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"machine: {platform.machine()}, {device}, torch {torch.__version__}")
    print("| config | stage | parameters | s/step (median) |\n| --- | --- | --- | --- |")
    for config in args.configs:
        with tempfile.TemporaryDirectory() as tmp:
            for stage in ("autoencoder", "diffusion"):
                s = run_stage(config, stage, args.steps, Path(tmp))
                print(f"| {config} | {stage} | {s['parameters']:,} | {s['seconds_per_step_median']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
