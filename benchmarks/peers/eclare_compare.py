"""ECLARE (Remedios et al., the self-supervised peer users pick) on the same LR scans as
``benchmarks/adaptation_benchmark.py``, measured the same way.

ECLARE pins an old scipy, so it lives in its own virtual environment, never a dependency of gen_sr:

    python3 -m venv benchmarks/peers/.venv-eclare
    benchmarks/peers/.venv-eclare/bin/pip install torch==2.13.0 eclare==1.0.1
    python benchmarks/peers/eclare_compare.py [--contrast t1|t2like] [--n-patches 3000] [--slab 8] [--output PATH]

The whole head (Colin27, cropped to its bounding box) is degraded with 4 mm Gaussian slices along RAS+ axis 2,
noise-free and at SNR 30, exactly as the adaptation benchmark does (same seeds); ECLARE gets that LR file and the
true slice profile (``--relative-slice-thickness``: thickness over the in-plane spacing, Gaussian), so it skips its
profile estimation; ``--n-patches`` sets its training budget (its default is 1,000,000). Its output is resampled onto
the truth's grid (linear; ECLARE keeps the field of view, so the grids align up to its edge convention) and measured
on the central coronal slab, inside the brain, against the best interpolation.
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from adaptation_benchmark import central_slab_case  # noqa: E402
from prior_benchmark import report  # noqa: E402

from gen_sr.eval.baselines import BASELINES, baseline  # noqa: E402
from gen_sr.eval.cases import held_out_head, simulate_case  # noqa: E402
from gen_sr.eval.metrics import psnr, ssim_volume  # noqa: E402
from gen_sr.eval.tables import figures_table  # noqa: E402
from gen_sr.volume import load_volume, resample_to, save_volume  # noqa: E402

ECLARE = ROOT / "benchmarks" / "peers" / ".venv-eclare" / "bin" / "run-eclare"


def run_eclare(lr_path: Path, out_dir: Path, thickness_ratio: float, n_patches: int,
               batch_size: int) -> tuple[Path, float, str]:
    """Run ECLARE on the CPU; returns its output file, the wall time and its log (standard output, then its
    progress bars)."""
    cmd = [str(ECLARE), "--in-fpath", str(lr_path), "--out-dir", str(out_dir), "--gpu-id", "-1",
           "--relative-slice-thickness", f"{thickness_ratio:g}", "--relative-slice-profile-type", "gaussian",
           "--n-patches", str(n_patches), "--batch-size", str(batch_size)]
    tic = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - tic
    if result.returncode != 0:
        raise SystemExit(f"ECLARE failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return next(out_dir.glob("*_eclare.nii*")), seconds, result.stdout + result.stderr


def training_seconds(log: str) -> float:
    """The elapsed time of ECLARE's training, from the last state of its first progress bar (the training's, over
    its patches: ``k/N [mm:ss<...`` or ``[h:mm:ss<...``); NaN where there is none."""
    bars = re.findall(r"\d+/(\d+) \[(?:(\d+):)?(\d+):(\d+)<", log)
    if not bars:
        return float("nan")
    _total, h, m, sec = [b for b in bars if b[0] == bars[0][0]][-1]
    return 3600 * int(h or 0) + 60 * int(m) + int(sec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brain", default="colin27")
    parser.add_argument("--contrast", choices=("t1", "t2like"), default="t1",
                        help="t2like: the brain's intensities inverted, skull removed (as adaptation_benchmark.py)")
    parser.add_argument("--thickness", type=float, default=4.0)
    parser.add_argument("--slab", type=float, default=8.0)
    parser.add_argument("--n-patches", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--snr", type=float, nargs="*", default=[0.0, 30.0], help="0 for noise-free")
    parser.add_argument("--output")
    args = parser.parse_args()
    if not ECLARE.is_file():
        raise SystemExit(f"ECLARE is not installed at {ECLARE}: see this script's docstring")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    head, brain = held_out_head(args.brain, contrast=args.contrast, margin=4)
    columns = {}
    for snr in args.snr:
        label = "noise-free" if snr == 0 else f"SNR {snr:g}"
        full = simulate_case(head, args.brain, axis=2, thickness=args.thickness, snr=snr or None)
        slab, slab_brain = central_slab_case(full, brain, args.slab)
        with tempfile.TemporaryDirectory() as work:
            lr_path = Path(work) / "lr.nii.gz"
            save_volume(full.lr, lr_path)
            out, seconds, log = run_eclare(lr_path, Path(work) / "out", args.thickness / min(head.spacing),
                                           args.n_patches, args.batch_size)
            sr = resample_to(load_volume(out), slab.hr, order=1).data
        truth = slab.hr.data.astype(np.float64)
        data_range = float(np.ptp(truth[slab_brain]))
        row = {"psnr": psnr(sr, truth, slab_brain, data_range), "ssim": ssim_volume(sr, truth, slab_brain, data_range),
               "best interpolation": max(psnr(baseline(slab, b), truth, slab_brain, data_range) for b in BASELINES),
               "wall s": seconds}
        row["gain"] = row["psnr"] - row["best interpolation"]
        times = dict(re.findall(r"(ECLARE|Total) elapsed time: ([0-9.]+)s", log))
        row |= {f"{k} elapsed s (its log)": float(v) for k, v in times.items()}
        row["training s (its progress bar)"] = training_seconds(log)
        columns[f"ECLARE, {label}"] = row
        print(label, row, flush=True)
    lines = [f"`python {' '.join(sys.argv)}` ({datetime.date.today()}, commit {commit}): ECLARE 1.0.1 on the CPU, "
             f"{args.n_patches} patches of batch {args.batch_size}, true Gaussian profile; {head.source}, whole head "
             f"{head.shape}, contrast {args.contrast}, {args.thickness:g} mm slices along RAS+ axis 2; measured on the "
             f"central {args.slab:g} mm "
             "coronal slab, inside the brain.", ""]
    report("\n".join(lines) + "\n" + figures_table(columns), args.output)


if __name__ == "__main__":
    main()
