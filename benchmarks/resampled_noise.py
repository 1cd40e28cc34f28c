"""How well a run reads the noise std of a scan it resamples in-plane (``noise_std="auto"`` with a coarser target):
the std read before the resampling times :func:`gen_sr.physics.air_noise_gain` (the change of 2026-12-07), against
the std read on the resampled air (before it) and against the truth (the resampled noisy head less the resampled
clean one, in the head). Synthetic heads (``tests/helpers.head_in_air``), 0.5 mm in-plane, 4 mm slices, Rician
noise σ = 3: white on the 0.5 mm grid, or a 1 mm acquisition interpolated 2x by zero-filling its k-space (as
scanners do), each resampled to 1 and 1.25 mm; figures in ``benchmarks/NOISE_ESTIMATE.md``.

    python benchmarks/resampled_noise.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import head_in_air

from gen_sr.physics import air_noise_gain, coarsen, scan_noise_std
from gen_sr.volume import Volume

SIGMA = 3.0


def zero_filled(image: np.ndarray) -> np.ndarray:
    """A complex 1 mm image interpolated 2x in-plane by zero-filling its k-space, as a magnitude."""
    k = np.fft.fftshift(np.fft.fft2(image, axes=(0, 1)), axes=(0, 1))
    n0, n1 = image.shape[:2]
    padded = np.zeros((2 * n0, 2 * n1, image.shape[2]), complex)
    padded[n0 // 2:n0 // 2 + n0, n1 // 2:n1 // 2 + n1] = k
    return np.abs(np.fft.ifft2(np.fft.ifftshift(padded, axes=(0, 1)), axes=(0, 1))) * 4


def heads(kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The noisy and the clean 0.5 mm head of ``kind`` (``white`` or ``zero-filled``)."""
    if kind == "white":
        return (head_in_air((160, 160, 8), sigma=SIGMA, radius=50, seed=seed + 1),
                head_in_air((160, 160, 8), sigma=0.0, radius=50))
    clean = head_in_air((80, 80, 8), sigma=0.0, radius=25)
    rng = np.random.default_rng(seed + 5)
    noise = SIGMA * (rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape))
    return zero_filled(clean + noise), zero_filled(clean.astype(complex))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    fine = np.diag([0.5, 0.5, 4.0, 1.0])
    print("| noise | seed | grid (mm) | truth | read after (before the change) | read before x white factor | "
          "read before x air_noise_gain (now) |\n| --- | --- | --- | --- | --- | --- | --- |")
    for kind in ("white", "zero-filled"):
        for seed in args.seeds:
            noisy, clean = heads(kind, seed)
            given = Volume(noisy.astype(np.float32), fine)
            before = scan_noise_std(given)
            for grid in (1.0, 1.25):
                out, white = coarsen(given, (grid, grid, 4.0))
                truth_image, _ = coarsen(Volume(clean.astype(np.float32), fine), (grid, grid, 4.0))
                head = truth_image.data > 50
                truth = float(np.std((out.data - truth_image.data)[head]))
                now = before * (air_noise_gain(given, out) or white)
                print(f"| {kind} | {seed} | {grid:g} | {truth:.3f} | {scan_noise_std(out):.3f} | {before * white:.3f} "
                      f"| {now:.3f} |", flush=True)


if __name__ == "__main__":
    main()
