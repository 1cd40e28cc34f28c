"""The error of ``--slice-profile auto`` (:func:`gen_sr.slice_profile.estimate_slice_profile`) on real heads.

    python benchmarks/slice_profile_estimate.py [--heads colin27 robex] [--thickness 2 4 6 8] [--output PATH]

Each head is degraded along RAS+ axis 2 with Gaussian and rectangular slices of each thickness (spacing = thickness),
noise-free and at SNR 30, and the Gaussian FWHM that ``auto`` uses is estimated from the LR scan alone. For a
Gaussian truth the error is against its FWHM; for a rectangular one against the FWHM of the Gaussian with the same
blur near the slices' Nyquist frequency (:func:`gaussian_equivalent`), since below it, which is all the scan holds,
the two shapes are hard to tell apart.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time

import numpy as np
from prior_benchmark import report

from gen_sr.eval.cases import simulate_case
from gen_sr.eval.tables import markdown_rows
from gen_sr.sample_data import load_sample
from gen_sr.slice_profile import estimate_slice_profile


def gaussian_equivalent(width: float, spacing: float) -> float:
    """The FWHM of the Gaussian whose transfer function equals a ``width`` mm rectangle's at 0.8 of the Nyquist
    frequency of slices ``spacing`` mm apart (the top of the band the estimate uses)."""
    f = 0.8 / (2 * spacing)
    mtf = abs(np.sinc(width * f))
    return float(np.sqrt(-np.log(mtf) * 4 * np.log(2)) / (np.pi * f))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", nargs="+", default=["colin27", "robex"])
    parser.add_argument("--thickness", type=float, nargs="+", default=[2.0, 4.0, 6.0, 8.0])
    parser.add_argument("--output", help="also write the table here (Markdown)")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    for head in args.heads:
        hr = load_sample(head).canonical()
        for profile in ("gaussian", "rect"):
            for t in args.thickness:
                truth = t if profile == "gaussian" else gaussian_equivalent(t, t)
                for snr in (None, 30.0):
                    case = simulate_case(hr, head, axis=2, thickness=t, profile=profile, snr=snr)
                    tic = time.perf_counter()
                    est = estimate_slice_profile(case.lr, shapes=("gaussian",))
                    rows.append({"head": head, "profile": profile, "thickness mm": t,
                                 "noise": "noise-free" if snr is None else f"SNR {snr:g}",
                                 "Gaussian FWHM to find": round(truth, 2), "estimate": round(est.thickness, 2),
                                 "error %": round(100 * (est.thickness - truth) / truth, 1),
                                 "seconds": round(time.perf_counter() - tic, 1)})
                    print(rows[-1], flush=True)
    errors = np.abs([r["error %"] for r in rows])
    lines = [f"`python {' '.join(sys.argv)}` ({datetime.date.today()}, commit {commit}): slices along RAS+ axis 2, "
             "spacing = thickness.", "", markdown_rows(list(rows[0]), [[str(v) for v in r.values()] for r in rows]), "",
             f"|error|: median {np.median(errors):.1f} %, 90th percentile {np.percentile(errors, 90):.1f} %, "
             f"max {errors.max():.1f} % over {len(rows)} scans."]
    report("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
