"""How well the end rows of ``A`` predict the end slices a scanner takes of a head that goes on beyond the HR grid.

Crops of ``--slices`` slices' field of view (``n × spacing`` mm, the HR grid of a stack with the default first
slice) are cut at random places along each axis of two 1 mm heads with skull (Colin27, ROBEX; ``make data``), 20 per
axis and head, each at least 10 voxels from the volume's ends. The truth for the crop's first and last slice is the
same slice taken of the whole head (``A`` built on the whole axis with the crop's slice positions: rows that lie well
within that grid, the same for every rule of the end rows). The crop's own ``A`` predicts them from the crop alone.
Printed per stack: the RMS of prediction − truth over the foreground (where the truth is above 5 % of the head's
foreground mean), in % of that mean; and the first row's standard deviation (mm) and the offset of its mean position
from the slice centre, against an interior row's. Run it with the package checkout to measure on ``PYTHONPATH``:

    python benchmarks/end_slices.py [--slices 12]
"""

from __future__ import annotations

import argparse

import numpy as np

from gen_sr.physics import SliceAcquisition
from gen_sr.sample_data import load_sample

STACKS = [("gaussian", 4.0, 3.0), ("gaussian", 4.0, 4.0), ("gaussian", 4.0, 5.0), ("gaussian", 6.0, 2.0),
          ("gaussian", 5.0, 2.5), ("rect", 4.0, 3.0), ("rect", 4.0, 4.0), ("rect", 4.0, 5.0), ("rect", 6.0, 2.0)]


def row_moments(matrix: np.ndarray, row: int, spacing: float, centre: float) -> tuple[float, float]:
    """A row's mean HR position minus ``centre``, and its standard deviation, in mm."""
    x = spacing * np.arange(matrix.shape[1])
    mean = float(matrix[row] @ x)
    return mean - centre, float(np.sqrt(matrix[row] @ x**2 - mean**2))


def end_row_error(heads: list[np.ndarray], stack: SliceAcquisition, n_slices: int, rng: np.random.Generator) -> float:
    """RMS error (fraction of the foreground mean) of the crop's first and last slice against the whole head's."""
    n = round(n_slices * stack.slice_spacing)  # 1 mm voxels
    crop_rows = stack.build(n, 1.0).matrix[[0, -1]]
    errors = []
    for head in heads:
        for axis in range(3):
            a = np.moveaxis(head, axis, 0)
            for _ in range(20):
                start = int(rng.integers(10, a.shape[0] - n - 10))
                whole = SliceAcquisition(0, stack.thickness, stack.spacing, stack.profile,
                                         first_center=stack._first(1.0) + start)
                truth = np.tensordot(whole.build(a.shape[0], 1.0).matrix[[0, n_slices - 1]], a, axes=(1, 0))
                predicted = np.tensordot(crop_rows, a[start:start + n], axes=(1, 0))
                inside = truth.min(axis=0) > 0.05
                errors.append((predicted - truth)[:, inside].ravel())
    return float(np.sqrt(np.mean(np.concatenate(errors) ** 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=12)
    args = parser.parse_args()
    heads = []
    for name in ("colin27", "mni152"):
        volume = load_sample(name).canonical()
        assert np.allclose(volume.spacing, 1.0, atol=1e-3), volume.spacing
        data = volume.data.astype(np.float64)
        heads.append(data / data[data > 0.1 * data.max()].mean())
    print("| profile | thickness / spacing (mm) | end-row RMS error (% of foreground mean) | first row: sd (mm), "
          "mean − centre (mm) | interior row sd (mm) |")
    print("| --- | --- | --- | --- | --- |")
    for profile, thickness, spacing in STACKS:
        stack = SliceAcquisition(0, thickness, spacing, profile)
        factor = stack.build(round(args.slices * spacing), 1.0)
        offset, sd = row_moments(factor.matrix, 0, 1.0, factor.first_center)
        mid = args.slices // 2
        _, sd_mid = row_moments(factor.matrix, mid, 1.0, factor.first_center + mid * spacing)
        error = end_row_error(heads, stack, args.slices, np.random.default_rng(0))
        print(f"| {profile} | {thickness:g} / {spacing:g} | {100 * error:.2f} | {sd:.2f}, {offset:+.2f} | "
              f"{sd_mid:.2f} |")


if __name__ == "__main__":
    main()
