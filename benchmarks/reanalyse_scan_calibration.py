"""Re-analyse the arrays that ``scan_region_calibration.py --keep DIR`` kept (no sampling).

    python benchmarks/reanalyse_scan_calibration.py conditional runs/bench/round7/robex4_ax2/noise-free [...]
    python benchmarks/reanalyse_scan_calibration.py simex runs/bench/round7/val_robex7/SNR_30 [...]

``conditional``: the error against the std, in-plane (the per-scan calibration's held-out problems) and
through-plane (the real run, in the head's foreground): the 90th percentile of |error| in ten bins of the std (equal
counts of both pooled), and their ratio; then the through-plane coverage of half-widths ∝ std^p (p = 1, 1.5, 2)
fitted in-plane. Where the ratio is 1, any interval built on the std alone carries from
in-plane to through-plane; above 1, the through-plane problem is harder than the in-plane ones at the same spread.

``margins``: the rule as it is, its scale times a constant margin k (1 to 1.25), and the coverage each gives
through-plane over the head, per folder (``FOLDER:KIND`` picks a folder's problems) and over all of them.

``bootstrap``: how much the per-scan scale depends on which in-plane slices were held out: the rule refitted on the
held-out slices drawn with replacement, and the through-plane coverage of its 5th, 50th and 95th percentiles.

``scatter``: over many folders (``FOLDER:KIND[:MM]`` picks a folder's problems, and its voxel size in mm where
the arrays were kept without the grid), how far the per-scan scale falls from
the scale the through-plane run needed (λ90 over the head): the mean and spread of log(λ90 / λ̂), and how much of the
spread the head's anisotropy explains, measured on the truth (the slice axis's gradient energy over the in-plane
axes') and as the thick-slice scan itself would give it (slice axis and one in-plane axis both blurred by the 4 mm
Gaussian profile and differenced 4 mm apart, averaged over both in-plane axes), with the correction's leave-one-out
residual; the anisotropy is the one part of the per-scan assumption that the scan could measure.

``simex``: the reference-noise extrapolation (``reference_noise="extrapolate"``) done more ways on the kept
recorrupted problems (``extrapolate/``), against the oracle (``clean/``): with the expected miss rate under the
added noise computed exactly (Gaussian) instead of drawn, extrapolated per λ to reference noise 0 (the risk curve:
a line through the rule's three levels, and a parabola through five) and as the scale² line; to tell a draw's luck
from a wrong model of how the scale grows with the noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import re
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.special import ndtr
from scipy.stats import pearsonr

from gen_sr.data import recorrupted_reference_variance
from gen_sr.eval.calibration import CalibrationVolume, fit_shape, split_units
from gen_sr.eval.cases import simulate_case
from gen_sr.volume import Volume


def held_out_volumes(folder: Path, kind: str = "") -> tuple[list[CalibrationVolume], int, float]:
    """The held-out problems kept in ``folder/kind`` as calibration volumes, the axis their units are cut along and
    the scan's noise std."""
    held = np.load(folder / "held_out.npz")
    slices, axis, inside = list(held["slices"]), int(held["axis"]), held["foreground"]
    sigma = float(np.load(folder / "through_plane.npz")["noise_std"])
    volumes = []
    for path in sorted((folder / kind).glob("slice_*.npz")):
        index = int(re.match(r"slice_(\d+)_", path.stem).group(1))
        with np.load(path) as z:
            hr, mean, std = (z[k].astype(np.float64) for k in ("hr", "mean", "std"))
        mask = np.take(inside, [slices.index(index)], axis=axis).reshape(hr.shape)
        volumes.append(CalibrationVolume(path.stem, hr - mean, mean, std, mask, sigma))
    return volumes, min(a for a in range(3) if a != axis), sigma


def rule_scale(volumes: list[CalibrationVolume], axis: int, alpha: float = 0.1, blocks: int = 4) -> float:
    """The per-scan rule's scale on ``volumes`` (conformal risk control on their units, as ``calibrate_on_scan``)."""
    return fit_shape(volumes, alpha=alpha, delta=0.1, method="crc", blocks=blocks, axis=axis).scale


def through_plane_ratios(folder: Path) -> np.ndarray:
    """|error| / std of the run over the head's foreground, sorted (for :func:`covered`)."""
    with np.load(folder / "through_plane.npz") as z:
        ratio = (np.abs(z["truth"] - z["mean"]) / np.maximum(z["std"], 1e-12))[z["head"]]
    return np.sort(ratio.astype(np.float64))


def covered(ratios: np.ndarray, scale: float) -> float:
    """The fraction of the sorted ``ratios`` within ``scale``: the coverage of ``mean ± scale · std``."""
    return float(np.searchsorted(ratios, scale, side="right") / ratios.size)


def conditional(folder: Path) -> None:
    volumes, _, _ = held_out_volumes(folder)
    e_in = np.concatenate([v.error[v.mask] for v in volumes])
    s_in = np.concatenate([v.std[v.mask] for v in volumes])
    with np.load(folder / "through_plane.npz") as z:
        head = z["head"]
        e_tp, s_tp = (z["truth"] - z["mean"])[head].astype(np.float64), z["std"][head].astype(np.float64)
    q90 = lambda e, s: float(np.quantile(np.abs(e) / np.maximum(s, 1e-12), 0.9))  # noqa: E731
    print(f"{folder}: λ90 in-plane {q90(e_in, s_in):.3f}, through-plane {q90(e_tp, s_tp):.3f}; rms std "
          f"{np.sqrt(np.mean(s_in ** 2)):.4g} / {np.sqrt(np.mean(s_tp ** 2)):.4g}")
    print("| std bin | voxels in-plane / through-plane | q90 \\|err\\| in-plane | through-plane | ratio |")
    print("| --- | --- | --- | --- | --- |")
    edges = np.quantile(np.concatenate([s_in, s_tp]), np.linspace(0, 1, 11))
    edges[-1] = np.inf
    for lo, hi in itertools.pairwise(edges):
        a, b = (s_in >= lo) & (s_in < hi), (s_tp >= lo) & (s_tp < hi)
        qa, qb = np.quantile(np.abs(e_in[a]), 0.9), np.quantile(np.abs(e_tp[b]), 0.9)
        print(f"| [{lo:.4g}, {hi:.4g}) | {a.sum()} / {b.sum()} | {qa:.4g} | {qb:.4g} | {qb / qa:.2f} |")
    reference = float(np.median(s_in))  # a half-width c·std·(std/reference)^(p−1), c the in-plane 90th percentile
    for power in (1.0, 1.5, 2.0):
        scaled = lambda e, s, p=power: np.abs(e) / (np.maximum(s, 1e-12) / reference) ** p  # noqa: E731
        c = np.quantile(scaled(e_in, s_in), 0.9)
        print(f"half-width ∝ std^{power:g} fitted in-plane (pooled 90th percentile) covers "
              f"{np.mean(scaled(e_tp, s_tp) <= c):.3f} through-plane")


def power(folder: Path, kind: str, alpha: float = 0.1, blocks: int = 4) -> None:
    """The per-scan rule (conformal risk control on the held-out problems' units) for half-widths ``λ̂ std^p``, and
    their coverage through-plane over the head and in the brain."""
    volumes, axis, _ = held_out_volumes(folder, kind)
    with np.load(folder / "through_plane.npz") as z:
        err, std = np.abs(z["truth"] - z["mean"]).astype(np.float64), z["std"].astype(np.float64)
        regions = {"head": z["head"], "brain": z["brain"]}
    cells = []
    reference = float(np.median(np.concatenate([v.std[v.mask] for v in volumes])))  # keeps λ̂ on its grid
    for p in (1.0, 1.5, 2.0, 2.5):
        powered = [dataclasses.replace(v, std=reference * (np.maximum(v.std, 1e-12) / reference) ** p)
                   for v in volumes]
        scale = rule_scale(powered, axis, alpha, blocks)
        half = scale * reference * (np.maximum(std, 1e-12) / reference) ** p
        cells.append(f"p {p:g}: " + " / ".join(f"{np.mean(err[m] <= half[m]):.3f}" for m in regions.values()))
    print(f"{folder}{'/' + kind if kind else ''}: coverage head / brain; " + "; ".join(cells))


def scan_scale(entry: Path | str, kind: str, alpha: float = 0.1,
               blocks: int = 4) -> tuple[Path, float, np.ndarray, str]:
    """One ``FOLDER[:KIND[:MM]]`` entry: its folder, the per-scan rule's scale on its held-out problems (``KIND``, else
    ``kind``), its sorted through-plane ratios (:func:`through_plane_ratios`) and its voxel size as given (or "")."""
    folder, own, mm = [*str(entry).split(":"), "", ""][:3]
    volumes, axis, _ = held_out_volumes(Path(folder), own or kind)
    return Path(folder), rule_scale(volumes, axis, alpha, blocks), through_plane_ratios(Path(folder)), mm


def margins(folders: list[Path], kind: str, alpha: float = 0.1, blocks: int = 4) -> None:
    """Through-plane coverage over the head of ``k · λ̂ · std`` for constant margins ``k``, per folder and as the mean
    and largest distance from ``1 − alpha`` over the folders (``folder:kind`` picks a folder's problems)."""
    ratios = []
    for entry in folders:
        _, scale, folder_ratios, _ = scan_scale(entry, kind, alpha, blocks)
        ratios.append(folder_ratios / scale)
    print("| k | " + " | ".join(str(f) for f in folders) + " | mean \\|cov − target\\| | largest |")
    print("| --- " * (len(folders) + 3) + "|")
    for k in (1.0, 1.05, 1.1, 1.15, 1.2, 1.25):
        cov = np.array([covered(r, k) for r in ratios])
        gap = np.abs(cov - (1 - alpha))
        print(f"| {k:g} | " + " | ".join(f"{c:.3f}" for c in cov) + f" | {gap.mean():.3f} | {gap.max():.3f} |")


def bootstrap(folder: Path, kind: str, min_foreground: float = 0.0, draws: int = 200, alpha: float = 0.1,
              blocks: int = 4) -> None:
    """How much the per-scan scale depends on which in-plane slices were held out: the rule refitted on held-out
    slices drawn with replacement (each slice with both its directions and all its blocks), ``draws`` times, seeded;
    the 5th, 50th and 95th percentiles of the scale and of the through-plane coverage over the head they give.
    ``min_foreground``: leave out the held-out slices whose foreground is below this fraction of the largest one's
    (each unit weighs the same in the rule, however few voxels it holds)."""
    volumes, axis, _ = held_out_volumes(folder, kind)
    largest = max(int(v.mask.sum()) for v in volumes)
    volumes = [v for v in volumes if v.mask.sum() >= min_foreground * largest]
    slices = sorted({re.match(r"slice_(\d+)_", v.name).group(1) for v in volumes})
    by_slice = {k: [v for v in volumes if v.name.startswith(f"slice_{k}_")] for k in slices}
    ratio = through_plane_ratios(folder)
    rng = np.random.default_rng(0)
    scales = []
    for _ in range(draws):
        drawn = [v for k in rng.choice(slices, size=len(slices)) for v in by_slice[k]]
        try:
            scales.append(rule_scale(drawn, axis, alpha, blocks))
        except ValueError:  # a draw the rule cannot certify with
            continue
    q = np.percentile(scales, [5, 50, 95])
    cover = [covered(ratio, x) for x in q]
    scale = rule_scale(volumes, axis, alpha, blocks)
    print(f"{folder}{'/' + kind if kind else ''}: {len(slices)} held-out slices, scale {scale:.3f} (through-plane "
          f"coverage {covered(ratio, scale):.3f}); over {len(scales)} draws 5/50/95 % {q[0]:.3f} / {q[1]:.3f} / "
          f"{q[2]:.3f}, through-plane coverage "
          f"{cover[0]:.3f} / {cover[1]:.3f} / {cover[2]:.3f}")


def _step_energy(data: np.ndarray, inside: np.ndarray, axis: int, step: int) -> float:
    """Mean squared difference of ``data`` between voxels ``step`` apart along ``axis``, both inside."""
    n = data.shape[axis]
    a, b = (np.take(x, np.arange(step, n), axis) for x in (data, inside))
    c, d = (np.take(x, np.arange(n - step), axis) for x in (data, inside))
    return float(np.mean((a - c)[b & d] ** 2))


def anisotropy(truth: np.ndarray, inside: np.ndarray, axis: int, voxel: float, thickness: float = 4.0) -> tuple:
    """The slice axis's share of fine detail: its gradient energy over the in-plane axes' mean, on the truth (1-voxel
    differences) and as the scan shows it (both axes blurred by the Gaussian profile, differenced a slice apart)."""
    in_plane = [a for a in range(3) if a != axis]
    fine = [_step_energy(truth, inside, a, 1) for a in range(3)]
    sigma, step = thickness / (2 * math.sqrt(2 * math.log(2))) / voxel, max(1, round(thickness / voxel))
    scan = gaussian_filter1d(truth, sigma, axis=axis)
    coarse = []
    for a in in_plane:
        both = gaussian_filter1d(scan, sigma, axis=a)
        coarse.append((_step_energy(both, inside, axis, step), _step_energy(both, inside, a, step)))
    return (fine[axis] / np.mean([fine[a] for a in in_plane]),
            np.mean([c[0] for c in coarse]) / np.mean([c[1] for c in coarse]))


def scatter(folders: list[Path], kind: str, alpha: float = 0.1, blocks: int = 4) -> None:
    rows = []
    print("| folder | λ90 | λ̂ | log(λ90 / λ̂) | coverage | anisotropy: truth / scan |")
    print("| --- | --- | --- | --- | --- | --- |")
    for entry in folders:
        folder, scale, ratios, mm = scan_scale(entry, kind, alpha, blocks)
        need = float(np.quantile(ratios, 1 - alpha))
        with np.load(folder / "through_plane.npz") as z, np.load(folder / "held_out.npz") as h:
            truth, head, axis = z["truth"].astype(np.float64), z["head"], int(h["axis"])
        true_a, scan_a = anisotropy(truth, head, axis, _voxel(folder, float(mm) if mm else None))
        rows.append((math.log(need / scale), true_a, scan_a))
        print(f"| {entry} | {need:.2f} | {scale:.2f} | {rows[-1][0]:+.3f} | {covered(ratios, scale):.3f} | "
              f"{true_a:.3f} / {scan_a:.3f} |")
    gap, true_a, scan_a = (np.array(c) for c in zip(*rows, strict=True))
    print(f"\nlog(λ90 / λ̂) over {len(gap)} folders: mean {gap.mean():+.3f} (a margin of {math.exp(gap.mean()):.3f}), "
          f"sd {gap.std(ddof=1):.3f}")
    for name, a in (("truth", true_a), ("scan", scan_a)):
        x = np.log(a)
        slope, intercept = np.polyfit(x, gap, 1)
        loo = [gap[i] - np.polyval(np.polyfit(np.delete(x, i), np.delete(gap, i), 1), x[i]) for i in range(len(x))]
        print(f"anisotropy of the {name}: Pearson {pearsonr(x, gap)[0]:.2f}, log(λ90 / λ̂) ≈ {intercept:+.3f} "
              f"{slope:+.3f} log(anisotropy); residual sd {np.std(gap - slope * x - intercept, ddof=2):.3f}, "
              f"leave-one-out {np.sqrt(np.mean(np.square(loo))):.3f} (a constant margin's leave-one-out "
              f"{np.sqrt(np.mean(np.square(gap - gap.mean()))) * len(gap) / (len(gap) - 1):.3f})")


def simex(folder: Path, voxel: float | None, alpha: float = 0.1, blocks: int = 4) -> None:
    volumes, axis, sigma = held_out_volumes(folder, "extrapolate")
    clean, _, _ = held_out_volumes(folder, "clean")
    errors, spreads, masks = split_units(volumes, blocks=blocks, axis=axis)
    pairs = [(e[m], s[m]) for e, s, m in zip(errors, spreads, masks, strict=True)]
    n = len(pairs)

    def risk(lam: float, extra: float) -> float:
        if extra == 0:
            return float(np.mean([np.mean(np.abs(e) > lam * s) for e, s in pairs]))
        t = sigma * math.sqrt(extra)
        return float(np.mean([np.mean(ndtr((-lam * s - e) / t) + 1 - ndtr((lam * s - e) / t)) for e, s in pairs]))

    grid = np.linspace(0.5, 12, 576)
    extras = (0.0, 0.5, 1.0, 2.0, 3.0)
    curves = np.array([[risk(lam, c) for c in extras] for lam in grid])

    def crc(r: np.ndarray) -> float:
        ok = (n * np.minimum.accumulate(np.clip(r, 0, 1)) + 1) / (n + 1) <= alpha
        return float(grid[np.argmax(ok)]) if ok.any() else float("nan")

    scales = [crc(curves[:, k]) for k in range(len(extras))]
    v0 = _reference_variance(folder, voxel)
    variances = np.array([v0 + c for c in extras])
    rule = [0, 2, 3]  # the rule's own levels: the references' noise, σ² and 2σ² more
    curve = crc(np.polyfit(variances[rule], curves[:, rule].T, 1)[1])
    parabola = crc(np.polyfit(variances, curves.T, 2)[2])
    line = math.sqrt(max(np.polyfit(variances[rule], np.square(np.take(scales, rule)), 1)[1], 0.0))
    print(f"{folder}: oracle (clean references) {rule_scale(clean, axis, alpha, blocks):.3f}; recorrupted references "
          f"(variance {v0:.3f} σ²) {rule_scale(volumes, axis, alpha, blocks):.3f}; expected scale with σ², 2σ² more "
          f"{scales[2]:.3f}, {scales[3]:.3f}; extrapolated: risk curve {curve:.3f}, scale² line {line:.3f}, risk "
          f"parabola through 0, 0.5, 1, 2, 3 σ² more {parabola:.3f}")


def _reference_variance(folder: Path, voxel: float | None) -> float:
    """:func:`gen_sr.data.recorrupted_reference_variance` of the held-out problems' operator: 4 mm Gaussian slices
    (as ``scan_region_calibration.py`` degrades) on the run's grid (its voxel size in mm: kept with the arrays
    since they hold the affine, else ``voxel``)."""
    voxel = _voxel(folder, voxel)
    case = simulate_case(Volume(np.zeros((8, 8, 24), np.float32), np.diag([voxel] * 3 + [1.0])), "grid", axis=2,
                         thickness=4.0)
    return float(recorrupted_reference_variance(case.operator))


def _voxel(folder: Path, voxel: float | None) -> float:
    """The run's isotropic voxel size in mm: from the kept affine, else ``voxel`` (older runs kept no grid)."""
    with np.load(folder / "through_plane.npz") as z:
        if "affine" in z:
            return float(np.linalg.norm(z["affine"][:3, 0]))
    if voxel is None:
        raise SystemExit(f"{folder}: these arrays do not hold the grid: give its voxel size (--voxel MM, or "
                         "FOLDER:KIND:MM for scatter)")
    return voxel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("analysis", choices=("conditional", "power", "margins", "bootstrap", "scatter", "simex"))
    parser.add_argument("folders", type=Path, nargs="+", help="folders that --keep wrote (one per noise level)")
    parser.add_argument("--kind", default="", help="power: the problems' subfolder (keep, extrapolate, clean), "
                        "where the arrays were kept with several")
    parser.add_argument("--min-foreground", type=float, default=0.0, help="bootstrap: leave out the held-out slices "
                        "whose foreground is below this fraction of the largest one's")
    parser.add_argument("--voxel", type=float, help="simex: the run's isotropic voxel size in mm, where the arrays "
                        "were kept without the grid")
    args = parser.parse_args()
    if args.analysis in ("margins", "scatter"):
        (margins if args.analysis == "margins" else scatter)(args.folders, args.kind)
        return
    for folder in args.folders:
        if args.analysis == "conditional":
            conditional(folder)
        elif args.analysis == "power":
            power(folder, args.kind)
        elif args.analysis == "bootstrap":
            bootstrap(folder, args.kind, args.min_foreground)
        else:
            simex(folder, args.voxel)


if __name__ == "__main__":
    main()
