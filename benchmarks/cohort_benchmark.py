"""The cohort command on small real volumes (issue 16): one process, two processes, and a rerun that skips all.

    python benchmarks/cohort_benchmark.py --model models/heads2d [--scans 4] [--crop 48] [--samples 2]

``--scans`` crops of ``--crop``³ voxels of the MNI152 template and the ROBEX head (1 mm and 1.5 mm), degraded to
4 mm Gaussian slices along RAS+ axis 2, are written as a BIDS dataset (``sub-XX/anat/sub-XX_T1w.nii.gz``). Then
``gen-sr super-resolve --input BIDS --output-dir OUT`` runs once in one process and once under
``accelerate launch`` with two CPU processes (gloo), and the two-process run again, which must skip every scan.
Printed: the seconds of each run, the scans done and skipped, and the largest difference between the one- and
two-process SR means (the scans are split over the processes, each scan drawn whole in one; same seeds, so the same
outputs up to float round-off).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_cohort(folder: Path, scans: int, crop: int) -> list[Path]:
    from gen_sr.physics import SliceAcquisition, simulate_acquisition
    from gen_sr.sample_data import load_sample
    from gen_sr.volume import save_volume

    heads = [load_sample(name).canonical() for name in ("mni152", "robex")]
    paths = []
    for k in range(scans):
        head = heads[k % 2]
        centre = np.asarray(head.shape) // 2 + (k // 2) * np.array([8, -8, 0])  # other crops of the same head
        start = np.clip(centre - crop // 2, 0, np.asarray(head.shape) - crop)
        lr, _, _ = simulate_acquisition(head.crop(start, start + crop), [SliceAcquisition(2, 4.0)], snr=30, seed=k)
        path = folder / f"sub-{k:02d}" / "anat" / f"sub-{k:02d}_T1w.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        paths.append(save_volume(lr, path))
    return paths


def run(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    tic = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - tic, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/heads2d")
    parser.add_argument("--scans", type=int, default=4)
    parser.add_argument("--crop", type=int, default=48)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--output", help="also write the table here (Markdown)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_cohort(work / "bids", args.scans, args.crop)
        common = ["-m", "gen_sr.cli", "super-resolve", "--model", args.model, "--input", str(work / "bids"),
                  "--samples", str(args.samples)]
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"), "--num_processes", "2",
                  "--main_process_port", str(port)]
        two_env = dict(env, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
        rows = []
        for label, command, run_env, out in (
                ("1 process", [sys.executable, *common], env, "one"),
                ("2 processes", [*launch, *common], two_env, "two"),
                ("2 processes, rerun", [*launch, *common], two_env, "two")):
            seconds, _ = run([*command, "--output-dir", str(work / out)], run_env)
            counts = json.loads((work / out / "summary.json").read_text())["counts"]
            rows.append((label, seconds, counts["done"], counts["skipped"]))
        diff = max(float(np.abs(np.asarray(nib.load(a).dataobj) - np.asarray(nib.load(b).dataobj)).max())
                   for a, b in ((p, work / "two" / p.relative_to(work / "one"))
                                for p in sorted((work / "one").rglob("*_desc-sr_T1w.nii.gz"))))
    lines = [f"`python {' '.join(sys.argv)}` ({datetime.date.today()}): {args.scans} scans of {args.crop}³ voxels "
             f"(MNI152 and ROBEX crops, 4 mm Gaussian slices, SNR 30), {args.samples} samples each, the model's "
             "default sampler.\n", "| run | seconds | done | skipped |", "| --- | --- | --- | --- |"]
    lines += [f"| {label} | {seconds:.0f} | {done} | {skipped} |" for label, seconds, done, skipped in rows]
    lines.append(f"\nLargest |one process − two processes| over the SR means: {diff:.2e} (input units).")
    print("\n".join(lines))
    if args.output:
        from gen_sr.io import atomic_write

        atomic_write(Path(args.output), lambda p: p.write_text("\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
