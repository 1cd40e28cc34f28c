"""Design and test of the data-disagreement flag (``gen_sr.risk.DataDisagreement``; protocol and figures in
``benchmarks/DATA_DISAGREEMENT.md``)

    python benchmarks/data_disagreement.py --scans robex_brain:11 mni152:11 [colin27_brain ...] --out DIR \\
        [--choose | --size MM --threshold T | --refit-levels L,L,... [--refit-floors F,F,...] | --refit-check |
         --projection-check [--given-noise none,auto,mad,true] | --noise-readings] \
        [--thickness 4 --spacing 4] [--model models/heads2d] [--snr 30] [--slab 24] [--samples 8]

Each scan (``NAME:N``: synthetic subject ``N`` of a sample head; ``NAME``: the head itself; ``NAME+air0[:N]``: the
same with its background air set to 0, :func:`without_air`; ``NAME+masked[:N]``, for ``--projection-check``: its
slices set to 0 outside the head after the noise, as a skull-stripped scan, :func:`skull_stripped`) is cut to its
central coronal slab of ``--slab`` mm and cropped to its foreground, then super-resolved twice from Gaussian axial
slices (``--thickness`` FWHM at ``--spacing``, 4 mm at 4 mm by default) with the same Rician noise (SNR ``--snr``):
lesion-free, and with the stress test's sites inserted (2 and 6 mm; six added lesions, six controls and one removed
site per size; placement seed N). The outputs go to ``DIR/NAME_N.npz`` (a scan already there is not run again).
Then, over all scans in ``--scans``:

* ``--choose``: per window size (2, 3, 4, 6 mm), the threshold that flags 2 % of the pooled lesion-free foreground
  (rounded up to 0.1), and the size whose 6 mm lesion site recall is highest (ties: the larger);
* otherwise, at ``--size`` / ``--threshold`` (default: the class defaults): the pass criterion's three figures;
* ``--refit-levels``: the refit (``gen_sr.pipelines.guidance.fit_where_data_disagree``, window ``--size``) of the
  saved means at each level and each gain floor of ``--refit-floors`` (default: the class default): the
  lesion-free PSNR gain in the foreground per scan and the gap ``data_alone - recovered`` of the thinned 6 and 2 mm
  lesions before and after (contrast against a two-voxel shell; the refit is linear, so the refitted mean is the
  mean of the refitted samples);
* ``--projection-check``: instead, each scan's lesion-free slab is super-resolved with each noise std of
  ``--given-noise`` (default ``none``: the noise-free projections, as ``gen-sr super-resolve`` without
  ``--noise-std``; ``auto``: read from the slices' background air by ``gen_sr.physics.scan_noise_std``; ``mad``:
  estimated from the slices' in-plane detail by ``gen_sr.physics.estimate_noise_std``; ``true``: the added noise's;
  ``--snr 0`` for noise-free slices), and the PSNR in the brain is printed beside cubic interpolation's, with the
  coverage in the brain of the calibrated interval the run's risk map used;
* ``--noise-readings``: only the noise std read from each scan's slices, by ``scan_noise_std`` (the air) and
  ``estimate_noise_std`` (in-plane detail), beside the added noise's, without sampling;
* ``--refit-check``: instead, each scan's lesion-free slab is super-resolved with and without ``refit_disagreement``
  (same seeds) and PSNR, the calibrated interval's coverage and the ±2σ coverage in the brain are printed (the
  refit's third criterion).

Printed per scan and pooled: the lesion-free flagged fraction, the site recall of added lesions (all, and those the
model thinned: ``recovered <= data_alone - 0.05``), controls flagged, and the mean ``|SR - truth|`` in flagged
against unflagged voxels of the lesion-free scan. A JSON of it all goes to ``DIR/summary.json`` (``refit_levels.json``,
``refit_check.json`` for those modes).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from gen_sr.eval.cases import central_slab, crop_to_foreground, simulate_case, super_resolve
from gen_sr.eval.metrics import foreground
from gen_sr.eval.stress import insert_lesions, measure_sites
from gen_sr.eval.uncertainty import coverage
from gen_sr.io import atomic_write, write_json
from gen_sr.physics import AcquisitionOperator, estimate_noise_std, scan_noise_std
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.pipelines.guidance import fit_where_data_disagree
from gen_sr.risk import DataDisagreement
from gen_sr.run_record import run_calibration
from gen_sr.sample_data import load_sample, synthetic_subject

SIZES_MM = (2.0, 3.0, 4.0, 6.0)
FALSE_FLAG_BUDGET = 0.02
THINNED = 0.05


def scan_volume(spec: str, slab_mm: float):
    """The HR slab of a scan spec (``NAME[+air0][:N]``), and its lesion placement seed."""
    name, _, subject = spec.partition(":")
    name = name.removesuffix(MASKED)  # applied to the slices: skull_stripped
    base = name.removesuffix(AIRLESS)
    volume = synthetic_subject(int(subject), "t1", base) if subject else load_sample(base)
    if name.endswith(AIRLESS):
        volume = without_air(volume)
    return crop_to_foreground(central_slab(volume, slab_mm, 1)), int(subject or 0)


AIRLESS = "+air0"
MASKED = "+masked"


def skull_stripped(case):
    """``case`` with its slices set to 0 outside the head as a brain extraction of the scan would leave them (their
    own foreground, smoothed by one voxel, grown by one): a scan without air, whose noise std cannot be read from
    it. The truth is unchanged."""
    head = ndimage.binary_dilation(foreground(case.lr.data, smooth=1.0), iterations=1)
    return dataclasses.replace(case, lr=case.lr.with_data(np.where(head, case.lr.data, 0).astype(case.lr.data.dtype)))


def without_air(volume, grow: int = 2):
    """``volume`` with its background set to 0 outside the head (its foreground, smoothed by one voxel, grown by
    ``grow`` voxels): a truth whose air holds no noise of its own, as a noise-free head's would. The ROBEX
    reference's air holds its own noise, which its truth keeps; zeroed, the air of the simulated slices holds
    only the noise added to them."""
    head = ndimage.binary_dilation(foreground(volume.data, smooth=1.0), iterations=grow)
    return volume.with_data(np.where(head, volume.data, 0).astype(volume.data.dtype))


def run_scan(pipe: LatentDiffusionSRPipeline, spec: str, path: Path, args: argparse.Namespace) -> None:
    """Super-resolve the lesion-free and the lesioned version of one scan; save what the analysis needs."""
    hr, seed = scan_volume(spec, args.slab)
    with_lesions, lesions = insert_lesions(hr, diameters_mm=(2.0, 6.0), n_per_size=6, removed=1, seed=seed)
    saved: dict[str, Any] = {}
    for tag, volume in (("free", hr), ("lesions", with_lesions)):
        case = simulate_case(volume, spec, **acquisition(args))
        out = super_resolve(pipe, case, num_samples=args.samples, generator=torch.Generator().manual_seed(0),
                            keep_samples=False, output_type="np", refit_disagreement=False)  # the map is of these
        saved |= {f"{tag}_mean": np.asarray(out.mean, np.float32), f"{tag}_truth": case.hr.data.astype(np.float32),
                  f"{tag}_lr": case.lr.data.astype(np.float32)}
        if tag == "lesions":
            sites = measure_sites(out.mean, case.hr.data, lesions, case.hr.affine, operator=case.operator)
            labels = np.zeros(case.hr.shape, np.int16)
            for k, les in enumerate(lesions, 1):
                labels[les.mask(case.hr.affine, case.hr.shape)] = k
            saved |= {"sites": json.dumps(sites), "site_labels": labels, "noise_std": case.noise_std,
                      "operator": case.operator.to_json()}
        print(f"{spec} ({tag}): {case.hr.shape} voxels, {sum(out.record.timings.values()):.0f} s", flush=True)
    atomic_write(path, lambda tmp: np.savez_compressed(tmp, **saved))  # a killed run leaves no half file


def acquisition(args: argparse.Namespace) -> dict[str, Any]:
    """The simulated slices: axial, Gaussian, ``--thickness`` FWHM at ``--spacing``, Rician noise at ``--snr`` (0:
    none); noise seed 0."""
    return {"axis": 2, "thickness": args.thickness, "spacing": args.spacing, "snr": args.snr or None, "seed": 0}


def brain_psnr(sr: np.ndarray, truth: np.ndarray) -> float:
    """PSNR in the truth's foreground, against the truth's range there."""
    brain = foreground(truth)
    return float(10 * np.log10(np.ptp(truth[brain]) ** 2 / np.mean((sr - truth)[brain] ** 2)))


def thinned(site: dict[str, Any]) -> bool:
    """An added lesion the model showed at least ``THINNED`` fainter than the slices alone carry it."""
    return site["kind"] == "added" and site["recovered"] <= site["data_alone"] - THINNED


def statistic(scan: dict[str, Any], tag: str, flag: DataDisagreement) -> np.ndarray:
    operator = AcquisitionOperator.from_json(str(scan["operator"]))
    x, y = (torch.from_numpy(scan[f"{tag}_{k}"].astype(np.float64))[None, None] for k in ("mean", "lr"))
    return flag.statistic(operator, x, y, float(scan["noise_std"]))[0, 0].numpy()


def measure(scans: dict[str, dict[str, Any]], flag: DataDisagreement) -> dict[str, Any]:
    """The criterion's figures per scan and pooled, at one window and threshold."""
    rows, pooled = {}, {"flagged": 0, "voxels": 0, "err_in": [], "err_out": [], "caught": {}, "n": {}}
    for spec, scan in scans.items():
        truth = scan["free_truth"]
        fg = foreground(truth)
        flags = flag.flags(statistic(scan, "free", flag)) & fg
        err = np.abs(scan["free_mean"] - truth)
        stat = statistic(scan, "lesions", flag)
        row: dict[str, Any] = {"false_flagged": float(flags.sum() / fg.sum()),
                               "err_flagged": float(err[flags].mean()) if flags.any() else math.nan,
                               "err_unflagged": float(err[fg & ~flags].mean())}
        for k, site in enumerate(json.loads(str(scan["sites"])), 1):
            if site["kind"] == "removed":
                continue
            group = site["kind"] + " " + site["label"]
            caught = bool(stat[scan["site_labels"] == k].mean() > flag.threshold)
            keys = [group] + ([group + " thinned"] if thinned(site) else [])
            for key in keys:
                row.setdefault(key, []).append(caught)
                pooled["caught"][key] = pooled["caught"].get(key, 0) + caught
                pooled["n"][key] = pooled["n"].get(key, 0) + 1
        rows[spec] = row
        pooled["flagged"] += int(flags.sum())
        pooled["voxels"] += int(fg.sum())
        pooled["err_in"].append(err[flags])
        pooled["err_out"].append(err[fg & ~flags])
    err_in, err_out = np.concatenate(pooled["err_in"]), np.concatenate(pooled["err_out"])
    summary = {"false_flagged": pooled["flagged"] / pooled["voxels"],
               "error_ratio": float(err_in.mean() / err_out.mean()) if err_in.size else math.nan,
               "recall": {k: [pooled["caught"][k], pooled["n"][k]] for k in sorted(pooled["n"])}}
    return {"size_mm": flag.size_mm, "threshold": flag.threshold, "scans": rows, "pooled": summary}


def choose(scans: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The protocol's design rule: per size the threshold at the false-flag budget, then the best 6 mm recall."""
    results = []
    for size in SIZES_MM:
        probe = DataDisagreement(size_mm=size)
        values = np.concatenate([statistic(s, "free", probe)[foreground(s["free_truth"])] for s in scans.values()])
        threshold = math.ceil(float(np.quantile(values, 1 - FALSE_FLAG_BUDGET)) * 10) / 10
        results.append(measure(scans, DataDisagreement(size_mm=size, threshold=threshold)))
    best = max(results, key=lambda r: (r["pooled"]["recall"]["added 6 mm"][0], r["size_mm"]))
    return {"candidates": results, "chosen": {"size_mm": best["size_mm"], "threshold": best["threshold"]}}


def report(result: dict[str, Any]) -> None:
    print(f"\n== window {result['size_mm']:g} mm, threshold {result['threshold']:g}")
    for spec, row in result["scans"].items():
        recall = "; ".join(f"{k} {sum(v)}/{len(v)}" for k, v in row.items() if isinstance(v, list))
        print(f"{spec}: lesion-free flagged {100 * row['false_flagged']:.2f} %, |err| flagged "
              f"{row['err_flagged']:.4g} vs unflagged {row['err_unflagged']:.4g}; caught: {recall}")
    p = result["pooled"]
    recall = "; ".join(f"{k} {c}/{n}" for k, (c, n) in p["recall"].items())
    print(f"pooled: lesion-free flagged {100 * p['false_flagged']:.2f} %, |err| flagged / unflagged "
          f"{p['error_ratio']:.2f}; caught: {recall}")


def refit_levels(scans: dict[str, dict[str, Any]], levels: list[float], size_mm: float,
                 floors: list[float]) -> dict[str, Any]:
    """The refit of the saved means at each level and gain floor (window ``size_mm``): lesion-free PSNR gains and
    the thinned lesions' gap, per size."""

    def refitted(scan: dict[str, Any], tag: str, level: float, floor: float) -> np.ndarray:
        operator = AcquisitionOperator.from_json(str(scan["operator"]))
        x, y = (torch.from_numpy(scan[f"{tag}_{k}"].astype(np.float64))[None, None] for k in ("mean", "lr"))
        flag = DataDisagreement(size_mm=size_mm, refit_level=level, refit_floor=floor)
        return fit_where_data_disagree(x, operator, y, float(scan["noise_std"]), flag)[0, 0].numpy()

    def gaps(scan: dict[str, Any], sr: np.ndarray, label: str) -> list[float]:
        truth, out = scan["lesions_truth"], []
        for k, site in enumerate(json.loads(str(scan["sites"])), 1):
            if site["label"] == label and thinned(site):
                inside = scan["site_labels"] == k
                shell = ndimage.binary_dilation(inside, iterations=2) & ~inside
                change = (sr[inside].mean() - sr[shell].mean()) - (truth[inside].mean() - truth[shell].mean())
                out.append(site["data_alone"] - 1 - change / site["contrast"])
        return out

    results = {}
    for level, floor in itertools.product(levels, floors):
        gains = {spec: brain_psnr(refitted(s, "free", level, floor), s["free_truth"])
                 - brain_psnr(s["free_mean"], s["free_truth"]) for spec, s in scans.items()}
        lesions = {s: refitted(scan, "lesions", level, floor) for s, scan in scans.items()}
        r = results[f"level {level:g}, floor {floor:g}"] = {"psnr_gain_db": gains,
                                                           "mean_gain_db": float(np.mean(list(gains.values())))}
        text = []
        for label in ("6 mm", "2 mm"):
            before = [g for s in scans.values() for g in gaps(s, s["lesions_mean"], label)]
            after = [g for spec, s in scans.items() for g in gaps(s, lesions[spec], label)]
            r[label] = {"gap_before": float(np.mean(before)), "gap_after": float(np.mean(after)), "n": len(before)}
            text.append(f"thinned {label} gap {np.mean(before):.3f} -> {np.mean(after):.3f} "
                        f"({100 * (1 - np.mean(after) / np.mean(before)):.0f} % smaller, n = {len(before)})")
        print(f"level {level:g}, floor {floor:g}: lesion-free PSNR gain "
              f"{', '.join(f'{k} {v:+.3f}' for k, v in gains.items())} dB (mean {r['mean_gain_db']:+.3f}); "
              f"{'; '.join(text)}")
    return results


def refit_check(pipe: LatentDiffusionSRPipeline, specs: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """PSNR and coverage in the brain of each lesion-free scan, without and with the refit."""
    # one interval for both runs: the calibration made without the refit (as when the criterion was registered)
    calibration = pipe.calibration_for(pipe.sampling_settings(num_samples=args.samples, refit_disagreement=False))
    rows: dict[str, Any] = {}
    for spec in specs:
        case = simulate_case(scan_volume(spec, args.slab)[0], spec, **acquisition(args))
        truth = case.hr.data.astype(np.float64)
        brain = foreground(truth)
        peak = float(np.ptp(truth[brain]))
        for refit in (False, True):
            out = super_resolve(pipe, case, num_samples=args.samples, generator=torch.Generator().manual_seed(0),
                                keep_samples=False, output_type="np", refit_disagreement=refit)
            mean, std = np.asarray(out.mean, np.float64), np.asarray(out.std, np.float64)
            err = np.abs(mean - truth)[brain]
            half = calibration.halfwidth(std, mean, case.noise_std)[brain]
            rows.setdefault(spec, {})["refit" if refit else "plain"] = {
                "psnr": float(10 * np.log10(peak**2 / np.mean(err**2))), "calibrated": float(np.mean(err <= half)),
                "two_sigma": float(np.mean(err <= 2 * std[brain]))}
        plain, refitted = rows[spec]["plain"], rows[spec]["refit"]
        print(f"{spec}: PSNR {plain['psnr']:.2f} -> {refitted['psnr']:.2f} dB, calibrated coverage "
              f"{plain['calibrated']:.3f} -> {refitted['calibrated']:.3f}, ±2σ {plain['two_sigma']:.3f} -> "
              f"{refitted['two_sigma']:.3f}", flush=True)
    deltas = {k: float(np.mean([r["refit"][k] - r["plain"][k] for r in rows.values()]))
              for k in ("psnr", "calibrated", "two_sigma")}
    print(f"mean change: PSNR {deltas['psnr']:+.3f} dB, calibrated coverage {100 * deltas['calibrated']:+.2f} points, "
          f"±2σ {100 * deltas['two_sigma']:+.2f} points ({calibration.describe() if calibration else 'uncalibrated'})")
    return {"scans": rows, "mean_change": deltas}


def given_noise_std(case, given: str) -> float | None:
    """The noise std a run of ``case`` is given: ``none`` 0, ``true`` the added noise's, ``auto`` read from the
    slices' air (``None`` for masked scans), ``mad`` from their in-plane detail."""
    if given == "auto":
        return scan_noise_std(case.lr)
    if given == "mad":
        return estimate_noise_std(case.lr.data, int(np.argmax(case.lr.spacing)))
    return {"none": 0.0, "true": case.noise_std}[given]


def projection_check(pipe: LatentDiffusionSRPipeline, specs: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """PSNR in the brain of each lesion-free scan super-resolved with each noise std of ``--given-noise`` (``none``:
    as ``gen-sr super-resolve`` without ``--noise-std``, the noise-free projections; ``auto``: read from the
    scan's air; ``mad``: from its in-plane detail; ``true``: the added noise's), and of cubic
    interpolation of its slices."""
    rows: dict[str, Any] = {}
    for spec in specs:
        case = simulate_case(scan_volume(spec, args.slab)[0], spec, **acquisition(args))
        if MASKED in spec:
            case = skull_stripped(case)
        truth = case.hr.data.astype(np.float64)
        brain = foreground(truth)
        y = torch.from_numpy(np.asarray(case.lr.data, np.float64))[None, None]
        row = rows[spec] = {"cubic": brain_psnr(case.operator.interpolate(y, "cubic")[0, 0].numpy(), truth)}
        for given in args.given_noise.split(","):
            noise_std = given_noise_std(case, given) or 0.0
            out = pipe(case.lr, operator=case.operator, noise_std=noise_std, num_samples=args.samples,
                       generator=torch.Generator().manual_seed(0), keep_samples=False, output_type="np")
            mean = np.asarray(out.mean, np.float64)
            row[given] = brain_psnr(mean, truth)
            row[f"{given}_std"] = out.record.noise_std
            if (calibration := run_calibration(pipe, out.record)) is not None:  # the record its risk map used
                half = calibration.halfwidth(np.asarray(out.std, np.float64), mean, noise_std)
                row[f"{given}_coverage"] = coverage(half, truth - mean, 1.0, brain)
        print(f"{spec}: PSNR " + ", ".join(f"{k} {v:.2f} dB" for k, v in row.items() if "_" not in k)
              + f" (true std {case.noise_std:.4g}" + "".join(f", {k} {'not known' if v is None else format(v, '.4g')}"
                                                            for k, v in row.items() if k.endswith("_std"))
              + "); calibrated coverage " + ", ".join(f"{k.removesuffix('_coverage')} {v:.3f}"
                                                      for k, v in row.items() if k.endswith("_coverage")), flush=True)
    return rows


def noise_readings(specs: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Without sampling: each scan's slices (``--snr``) and the noise std read from them, from the air
    (``scan_noise_std``; ``None`` for masked scans) and from the in-plane detail (``estimate_noise_std``)."""
    rows = {}
    for spec in specs:
        case = simulate_case(scan_volume(spec, args.slab)[0], spec, **acquisition(args))
        rows[spec] = {given: given_noise_std(case, given) for given in ("true", "auto", "mad")}
        print(f"{spec} at SNR {args.snr:g}: " + ", ".join(f"{k} {v:.4g}" if v is not None else f"{k} none"
                                                          for k, v in rows[spec].items()), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", nargs="+", required=True, help="NAME:N (synthetic subject N) or NAME")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--choose", action="store_true", help="apply the design rule")
    parser.add_argument("--refit-levels", help="comma-separated levels: refit the saved means at each")
    parser.add_argument("--refit-check", action="store_true", help="PSNR and coverage with and without the refit")
    parser.add_argument("--projection-check", action="store_true",
                        help="PSNR of the lesion-free scans super-resolved without a noise std")
    parser.add_argument("--given-noise", default="none",
                        help="for --projection-check: comma-separated noise stds to run with: none, auto, mad, true")
    parser.add_argument("--noise-readings", action="store_true",
                        help="only the noise std read from each scan's slices (air and in-plane detail), no sampling")
    parser.add_argument("--refit-floors", help="comma-separated gain floors for --refit-levels (default: the class's)")
    parser.add_argument("--thickness", type=float, default=4.0, help="slice FWHM in mm")
    parser.add_argument("--spacing", type=float, default=None, help="slice spacing in mm (default: the thickness)")
    parser.add_argument("--size", type=float, default=DataDisagreement.size_mm)
    parser.add_argument("--threshold", type=float, default=DataDisagreement.threshold)
    parser.add_argument("--model", default="models/heads2d")
    parser.add_argument("--snr", type=float, default=30.0, help="0: noise-free")
    parser.add_argument("--slab", type=float, default=24.0, help="coronal slab width in mm")
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.noise_readings:
        write_json(args.out / "noise_readings.json", noise_readings(args.scans, args))
        return
    pipe = LatentDiffusionSRPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.refit_check:
        write_json(args.out / "refit_check.json", refit_check(pipe, args.scans, args))
        return
    if args.projection_check:
        write_json(args.out / "projection_check.json", projection_check(pipe, args.scans, args))
        return
    scans = {}
    for spec in args.scans:
        path = args.out / (spec.replace(":", "_") + ".npz")
        if not path.is_file():
            run_scan(pipe, spec, path, args)
        scans[spec] = dict(np.load(path))
    if args.refit_levels:
        floors = [float(v) for v in (args.refit_floors or str(DataDisagreement.refit_floor)).split(",")]
        result = refit_levels(scans, [float(v) for v in args.refit_levels.split(",")], args.size, floors)
        write_json(args.out / "refit_levels.json", result)
        return
    if args.choose:
        result = choose(scans)
        for candidate in result["candidates"]:
            report(candidate)
        print(f"\nchosen: window {result['chosen']['size_mm']:g} mm, threshold {result['chosen']['threshold']:g}")
    else:
        result = measure(scans, DataDisagreement(size_mm=args.size, threshold=args.threshold))
        report(result)
    write_json(args.out / "summary.json", result)


if __name__ == "__main__":
    main()
