"""What a command spends resampling a scan finer in-plane than the model was trained for, and reading its noise from
the air: the Colin27 head resampled to 0.5 mm in-plane (linear), with 4 mm Gaussian slices simulated across it (as
``gen-sr degrade`` does, SNR 40), and a tiny random model (``tests/helpers.tiny_pipeline``) whose card says it was
trained for 0.7-1.5 mm in-plane, so that a run first resamples the scan in-plane
(:meth:`gen_sr.pipelines.LatentDiffusionSRPipeline.coarsened`) and its sampling costs little.

Two tables. Commands: each ``gen-sr`` command in a process of its own (as a user runs it), ``--target-spacing
4,4,4`` so that the sampling is short, ``--repeats`` times; the median seconds of the command (imports not
counted; and the median CPU seconds of its process, which the other jobs on the cores move less), and how often it
called :func:`gen_sr.physics.coarsen`, :func:`gen_sr.physics.air_noise_gain` and
:func:`gen_sr.physics.scan_noise_std` (a passthrough around the pipeline module's names counts them). Looks: the
pipeline's calls that resample the scan for the default grid (0.7 mm), one after the other in one process, as a
command makes them, each on a scan of its own per repeat (one voxel changed): the median seconds of each.

    python benchmarks/repeated_resampling.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import zoom

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import count_calls, tiny_pipeline

import gen_sr.pipelines.pipeline_latent_sr as pipeline_module
from gen_sr.physics import SliceAcquisition, simulate_acquisition
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.sample_data import load_sample
from gen_sr.volume import Volume, load_volume, save_volume

COUNTED = ("coarsen", "air_noise_gain", "scan_noise_std")
SMALL = "--samples 2 --steps 1 --target-spacing 4,4,4"
COMMANDS = {  # each a gen-sr command line on {scan}, the {model} folder and an output folder {out}, in this order
    "info --time": "info {scan} --model {model} --time --samples 2 --target-spacing 4,4,4",
    "super-resolve": "super-resolve --input {scan} --output {out}/sr.nii.gz --std {out}/std.nii.gz --model {model} "
                     + SMALL,
    "super-resolve --adapt": "super-resolve --input {scan} --output {out}/sra.nii.gz --model {model} --adapt "
                             "--adapt-steps 0 --holdout-every 2 " + SMALL,
    "audit": "audit --input {scan} --output-dir {out}/audit --model {model} " + SMALL,
    "audit --reuse": "audit --input {scan} --output-dir {out}/reuse --model {model} --reuse {out}/sr.nii.gz "
                     "{out}/std.nii.gz",
}


def fine_scan() -> Volume:
    """Colin27 resampled to 0.5 mm in-plane (linear), with 4 mm Gaussian slices across it (SNR 40, seed 0)."""
    head = load_sample("colin27")
    affine = head.affine @ np.diag([0.5, 0.5, 1.0, 1.0])
    fine = Volume(zoom(head.data, (2, 2, 1), order=1).astype(np.float32), affine, source="colin27 at 0.5 mm")
    return simulate_acquisition(fine, [SliceAcquisition(axis=2, thickness=4.0)], snr=40.0)[0]


def run_command(argv: list[str]) -> None:
    """One command, in this process: prints its seconds and counted calls as JSON."""
    from gen_sr import cli

    calls = count_calls(pipeline_module, COUNTED)
    tic, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = cli.main(argv)
    print(json.dumps({"code": code, "seconds": time.perf_counter() - tic, "cpu": time.process_time() - cpu, **calls}))


def commands(folder: Path, repeats: int) -> None:
    print("| command | median s | runs (s) | median CPU s | " + " | ".join(f"{n} calls" for n in COUNTED) + " |\n"
          + "| --- " * (4 + len(COUNTED)) + "|")
    runs: dict[str, list[dict]] = {name: [] for name in COMMANDS}
    for k in range(repeats):
        out = folder / f"run{k}"
        out.mkdir()
        for name, line in COMMANDS.items():
            argv = line.format(scan=folder / "scan.nii.gz", model=folder / "model", out=out).split()
            done = subprocess.run([sys.executable, __file__, "--command", *argv], capture_output=True, text=True)
            result = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {"code": "crash"}
            if result["code"] != 0:
                raise SystemExit(f"{name} failed: {done.stderr[-2000:]}")
            runs[name].append(result)
    for name, results in runs.items():
        seconds = [r["seconds"] for r in results]
        cpu = statistics.median(r["cpu"] for r in results)
        print(f"| {name} | {statistics.median(seconds):.1f} | {', '.join(f'{s:.1f}' for s in seconds)} | {cpu:.1f} | "
              + " | ".join(str(results[0].get(n, 0)) for n in COUNTED) + " |", flush=True)


def looks(folder: Path, repeats: int) -> None:
    """The pipeline's calls that resample the scan for its default grid, in sequence, timed."""
    pipe = LatentDiffusionSRPipeline.from_pretrained(folder / "model")
    scan = load_volume(folder / "scan.nii.gz")
    record = {"coarsened_input": {"to_spacing": list(pipe.measured_scan(scan)[0].canonical().spacing)}}
    calls = {"plan(lr)": lambda lr: pipe.plan(lr), "plan(lr) again": lambda lr: pipe.plan(lr),
             "output_grid(lr)": lambda lr: pipe.output_grid(lr), "measured_scan(lr)": lambda lr: pipe.measured_scan(lr),
             "measured_input(lr, record)": lambda lr: pipe.measured_input(lr, record)}
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for k in range(repeats):
        data = scan.data.copy()
        data[0, 0, 0] += k + 1  # a scan of its own
        lr = scan.with_data(data)
        for name, call in calls.items():
            tic = time.perf_counter()
            call(lr)
            seconds[name].append(time.perf_counter() - tic)
    print("| call (in this order) | median s | runs (s) |\n| --- | --- | --- |")
    for name, values in seconds.items():
        print(f"| {name} | {statistics.median(values):.2f} | {', '.join(f'{s:.2f}' for s in values)} |", flush=True)


def main() -> None:
    if sys.argv[1:2] == ["--command"]:
        return run_command(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tables", nargs="+", choices=("commands", "looks"), default=["commands", "looks"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_volume(fine_scan(), folder / "scan.nii.gz")
        pipe = tiny_pipeline()
        pipe.model_card = dataclasses.replace(pipe.model_card, in_plane_spacing=(0.7, 1.5))
        pipe.save_pretrained(folder / "model")
        if "commands" in args.tables:
            commands(folder, args.repeats)
        if "looks" in args.tables:
            looks(folder, args.repeats)
    return None


if __name__ == "__main__":
    main()
