"""The ``gen-sr`` command.

Every subcommand checks its inputs and output paths before any work, writes outputs atomically, and turns a user
mistake into one line on stderr with exit code 2 (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from gen_sr.distributed import exit_if_distributed, process_state
from gen_sr.errors import InputError

__all__ = ["main"]

EXIT_USER_ERROR = 2


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _fmt(values: Sequence[float], digits: int = 3) -> str:
    return " x ".join(f"{v:.{digits}f}".rstrip("0").rstrip(".") for v in values)


def _shape(shape: Sequence[int]) -> str:
    return " x ".join(str(n) for n in shape)


# ----------------------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    import nibabel as nib

    from gen_sr.volume import read_nifti, stored_pixdim

    img, data = read_nifti(args.file)
    hdr = img.header
    affine = img.affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    units = hdr.get_xyzt_units()[0] or "unknown"
    cosines = affine[:3, :3] / np.where(spacing > 0, spacing, 1)
    obliquity = float(np.degrees(np.arccos(np.clip(np.abs(cosines).max(axis=0), -1, 1))).max())
    finite = np.isfinite(data)
    values = data[finite]
    lines = [
        f"file:        {args.file}",
        f"format:      {type(img).__name__}, stored as {hdr.get_data_dtype()}",
        f"shape:       {_shape(data.shape)}"
        + (f"  ({data.shape[3]} volumes; pick one with --volume N)" if data.ndim == 4 and data.shape[3] > 1 else ""),
        f"spacing:     {_fmt(spacing)} ({units})",
        f"orientation: {''.join(nib.aff2axcodes(affine))}"
        + (f" (oblique by {obliquity:.1f} deg)" if obliquity > 0.01 else ""),
        f"qform/sform: codes {int(hdr['qform_code'])}/{int(hdr['sform_code'])}",
        "affine:      " + "\n             ".join(" ".join(f"{v:9.3f}" for v in row) for row in affine[:3]),
    ]
    if values.size:
        p1, p99 = np.percentile(values, [1, 99])
        lines.append(
            f"intensity:   min {values.min():.4g}, max {values.max():.4g}, mean {values.mean():.4g}, "
            f"1st-99th percentile {p1:.4g}..{p99:.4g}"
        )
    pixdim = stored_pixdim(args.file, img)
    if np.any(pixdim <= 0):
        lines.append(f"warning:     stored voxel size (pixdim) {pixdim.tolist()} is not positive")
    if not finite.all():
        lines.append(f"warning:     {int((~finite).sum())} NaN or Inf voxels")
    print("\n".join(lines))
    return 0


# ----------------------------------------------------------------------------------------------------- degrade
def cmd_degrade(args: argparse.Namespace) -> int:
    from gen_sr.physics import SliceAcquisition, simulate_acquisition
    from gen_sr.volume import check_output_path, load_volume, save_volume

    out = check_output_path(args.output, args.overwrite, inputs=[args.input])
    if args.save_operator:
        _check_json_output(args.save_operator, args.overwrite)
    hr = load_volume(args.input, volume_index=args.volume)
    acquisition = SliceAcquisition(
        axis=args.axis, thickness=args.slice_thickness, spacing=args.slice_spacing, profile=args.profile
    )
    try:
        lr, operator, sigma = simulate_acquisition(hr, [acquisition], snr=args.snr, noise=args.noise, seed=args.seed)
    except ValueError as e:  # e.g. a slice thicker than the field of view
        raise InputError(str(e), args.input) from e
    direction = hr.orientation[args.axis]
    print(f"input:       {args.input} ({_shape(hr.shape)} voxels of {_fmt(hr.spacing)} mm, {''.join(hr.orientation)})")
    print(
        f"acquisition: {args.slice_thickness:g} mm {args.profile} slices every {acquisition.slice_spacing:g} mm "
        f"along voxel axis {args.axis} ({direction})"
    )
    if args.snr is None:
        print("noise:       none")
    else:
        print(f"noise:       {args.noise}, SNR {args.snr:g} (std {sigma:.4g}), seed {args.seed}")
    save_volume(lr, out, overwrite=args.overwrite)
    print(f"wrote:       {out} ({_shape(lr.shape)} voxels of {_fmt(lr.spacing)} mm)")
    if args.save_operator:
        _write_json(args.save_operator, {"operator": operator.to_dict(), "noise_std": sigma, "noise": args.noise})
        print(f"wrote:       {args.save_operator} (the operator on the canonical RAS+ HR grid)")
    return 0


def _check_json_output(path: str, overwrite: bool) -> None:
    p = Path(path)
    if not p.parent.is_dir():
        raise InputError("the output directory does not exist", p)
    if p.exists() and not overwrite:
        raise InputError("output already exists", p, "pass --overwrite to replace it")


def _write_json(path: str | Path, payload: dict) -> None:
    from gen_sr.volume import write_json

    write_json(path, payload)


# ----------------------------------------------------------------------------------------------------- super-resolve
def _spacing(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers like 1,1,1, got {text!r}") from None
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected three positive numbers like 1,1,1, got {text!r}")
    return values


def _load_pipeline(folder: str, device: str):
    """The model folder's pipeline on ``device``, or one clear error line."""
    import torch

    from gen_sr.pipelines import LatentDiffusionSRPipeline

    model = Path(folder)
    if not (model / "model_index.json").is_file():
        raise InputError("is not a gen_sr model folder (no model_index.json)", model)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} was asked for, but no CUDA device is available", hint="use --device cpu")
    try:
        pipe = LatentDiffusionSRPipeline.from_pretrained(model).to(device)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the model: {str(e).splitlines()[0]}", model) from e
    pipe.set_progress_bar_config(disable=not process_state().is_local_main_process)
    return pipe


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    import torch

    return {"num_inference_steps": args.steps, "eta": args.eta, "num_samples": args.samples,
            "guidance": args.guidance, "batch_size": args.batch_size,
            "generator": torch.Generator().manual_seed(args.seed)}


def _acquisition_kwargs(args: argparse.Namespace) -> dict:
    return {"target_spacing": args.target_spacing, "slice_profile": args.profile,
            "slice_thickness": args.slice_thickness, "noise_std": args.noise_std}


def _steps(args: argparse.Namespace, pipe) -> int:
    """The DDIM steps a run uses: ``--steps``, else the model folder's default."""
    return args.steps or int(pipe.config.acquisition.get("num_inference_steps", 50))


def cmd_super_resolve(args: argparse.Namespace) -> int:
    from gen_sr.volume import check_output_path, load_volume, save_volume, sidecar_path

    maps = {"mean": args.output, "std": args.std, "risk": args.risk, "dc_residual": args.dc_residual}
    outputs = {k: check_output_path(v, args.overwrite, inputs=[args.input]) for k, v in maps.items() if v}
    sidecar = sidecar_path(outputs["mean"])
    _check_json_output(str(sidecar), args.overwrite)
    lr = load_volume(args.input, volume_index=args.volume)
    pipe = _load_pipeline(args.model, args.device)
    out = pipe(lr, keep_samples=False, output_type="np", **_acquisition_kwargs(args), **_sampling_kwargs(args))
    if not process_state().is_main_process:  # under `accelerate launch`, the main process writes the outputs
        return 0
    for key, path in outputs.items():
        save_volume(lr.with_data(getattr(out, key), out.affine), path, overwrite=args.overwrite)
        print(f"wrote:    {path} ({key})")
    _write_json(sidecar, out.metadata)
    residual = max(out.metadata["relative_residual"])
    print(f"wrote:    {sidecar} (seeds, operator, residuals, timings)")
    print(f"samples:  {args.samples}, {out.metadata['num_inference_steps']} steps, guidance {args.guidance}; "
          f"max relative residual ‖Ax−y‖/‖y‖ {residual:.2e}")
    return 0


# ----------------------------------------------------------------------------------------------------- evaluation
def _hr_volumes(args: argparse.Namespace, pipe) -> list:
    """``(name, Volume)`` of every HR volume of ``--data``, cut to the ``--region``."""
    from gen_sr.data import find_volumes
    from gen_sr.eval.evaluate import crop_to_foreground, has_calibration_slab, model_slab
    from gen_sr.sample_data import load_mni152
    from gen_sr.volume import load_volume

    named = []
    for entry in args.data:
        if entry == "mni152":
            named.append(("mni152", load_mni152("t1")))
        else:
            named += [(f.name.removesuffix(".gz").removesuffix(".nii"), load_volume(f)) for f in find_volumes([entry])]
    if args.region != "all":
        if not pipe.config.acquisition.get("holdout") or (args.region == "calibration"
                                                          and not has_calibration_slab(pipe)):
            what = {"heldout": "held-out"}.get(args.region, args.region)
            raise InputError(f"the model folder records no {what} slab", args.model, "use --region all")
        split = {"heldout": "val"}.get(args.region, args.region)
        named = [(n, crop_to_foreground(model_slab(pipe, v, split))) for n, v in named]  # as the benchmarks do
    return named


def _operator_transforms(path: str, sr_axis: int) -> list:
    """The acquisition of an operator JSON (``gen-sr degrade --save-operator``'s file, or ``A.to_json()``)."""
    from gen_sr.physics import AxisTransform, SliceAcquisition

    try:
        d = json.loads(Path(path).read_text())
        d = d.get("operator", d)
        transforms = [AxisTransform.from_dict(t) for t in d["transforms"]]
    except FileNotFoundError:
        raise InputError("does not exist", path) from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"is not an acquisition operator JSON ({e})", path) from None
    sliced = {t.axis for t in transforms if isinstance(t, SliceAcquisition)}
    if sliced != {sr_axis}:
        raise InputError(f"slices along RAS+ axes {sorted(sliced)}, but the model super-resolves axis {sr_axis}", path)
    return transforms


def _cases(args: argparse.Namespace, pipe) -> list:
    """The HR volumes of ``--data`` with the acquisition simulated on each."""
    from gen_sr.eval.evaluate import simulate_case

    named = _hr_volumes(args, pipe)
    transforms = _operator_transforms(args.operator, pipe.sr_axis) if args.operator else None
    try:
        return [simulate_case(v, n, axis=pipe.sr_axis, thickness=args.slice_thickness, spacing=args.slice_spacing,
                              profile=args.profile, snr=args.snr, seed=args.seed + i, transforms=transforms)
                for i, (n, v) in enumerate(named)]
    except ValueError as e:  # e.g. slices thicker than a volume
        raise InputError(f"cannot simulate the acquisition: {e}") from e


def cmd_calibrate(args: argparse.Namespace) -> int:
    from gen_sr.eval.calibration import (
        CALIBRATION_FILE,
        IntervalShape,
        calibration_volumes,
        choose_shape,
        fit_calibration,
        split_units,
        transfer_coverage,
    )

    target = Path(args.model) / CALIBRATION_FILE
    if target.exists() and not args.overwrite:
        raise InputError("the model is calibrated already", target, "pass --overwrite to replace its calibration")
    pipe = _load_pipeline(args.model, args.device)
    cases = _cases(args, pipe)
    if args.interval == "auto" and len(cases) < 3:
        raise InputError(f"--interval auto chooses between shapes by leaving one volume out, and needs at least 3 "
                         f"volumes; --data gives {len(cases)}", hint="add volumes, or use --interval std")
    volumes = calibration_volumes(pipe, cases, **_sampling_kwargs(args))
    fit = {"alpha": args.alpha, "delta": args.delta, "method": args.method}
    shape, transfer = IntervalShape(), None
    try:  # every fit below leaves a volume out: with too few units, the rule cannot certify
        if args.interval == "auto":
            shape, rows = choose_shape(volumes, blocks=args.blocks, progress=True, **fit)
            transfer = next(r["coverages"] for r in rows if IntervalShape(**r["shape"]) == shape)
        elif len(volumes) >= 2:
            transfer = transfer_coverage(volumes, shape, blocks=args.blocks, **fit)
    except ValueError as e:
        if args.interval == "auto":
            raise InputError(f"cannot choose the interval shape: {e}", args.model,
                             "use more --blocks or volumes, or --interval std") from e
        print(f"(no transfer check: with a volume left out, {e})")
    errors, spreads, masks = split_units(volumes, shape, blocks=args.blocks)
    details = {"data": list(args.data), "region": args.region, "volumes": [c.name for c in cases],
               "blocks_per_volume": args.blocks, "units": len(errors), "operator": args.operator,
               "slice_thickness": args.slice_thickness,
               "profile": args.profile, "snr": args.snr, "samples": args.samples, "steps": _steps(args, pipe),
               "guidance": args.guidance, "seed": args.seed, "mask": "foreground of the reference",
               "interval": args.interval,
               "leave_one_volume_out_coverage": transfer}
    try:
        cal = fit_calibration(errors, spreads, masks, **fit, details=details)
    except ValueError as e:
        raise InputError(str(e), args.model) from e
    cal.shape = shape
    pipe.calibration = cal
    cal.save(args.model)
    print(f"wrote:    {target}")
    print(f"interval: {cal.describe()}, from {cal.num_volumes} units ({args.method})")
    print(f"coverage: {1 - cal.risk_hat:.4f} on the calibration units; target ≥ {1 - cal.alpha:g}"
          + (f" with probability ≥ {1 - cal.delta:g} (upper bound of the miss rate {cal.risk_upper:.4f})"
             if cal.method == "rcps" else " in expectation"))
    if transfer is not None:
        print("transfer: coverage of each volume calibrated on the others: "
              + ", ".join(f"{n} {c:.4f}" for n, c in zip(details["volumes"], transfer, strict=True)))
    other = "crc" if args.method == "rcps" else "rcps"
    try:  # the other rule on the same units, for comparison (not written)
        alt = fit_calibration(errors, spreads, masks, **(fit | {"method": other}))
        print(f"({other} would give λ = {alt.scale:.4g}, coverage {1 - alt.risk_hat:.4f} on these units)")
    except ValueError as e:
        print(f"({other} cannot certify with these units: {e})")
    return 0


def _output_dir(args: argparse.Namespace, marker: str | None = None) -> Path:
    """``--output-dir``, checked before any work: its parent exists, and it holds no earlier ``marker`` file
    unless ``--overwrite``."""
    out = Path(args.output_dir)
    if not out.parent.is_dir():
        raise InputError("the output folder's parent does not exist", out)
    if marker is not None and (out / marker).exists() and not args.overwrite:
        raise InputError(f"holds an earlier {marker}", out, "pass --overwrite to replace it")
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    from gen_sr.eval.evaluate import evaluate, markdown_table, summarize, write_table

    out = _output_dir(args, "evaluation.json")
    pipe = _load_pipeline(args.model, args.device)
    cases = _cases(args, pipe)
    regression = _load_pipeline(args.regression_model, args.device) if args.regression_model else None
    rows = evaluate(pipe, cases, regression=regression, **_sampling_kwargs(args))
    meta = {"model": str(args.model), "regression_model": args.regression_model, "data": list(args.data),
            "region": args.region,
            "operator": args.operator, "slice_thickness": args.slice_thickness, "profile": args.profile,
            "snr": args.snr, "samples": args.samples, "steps": _steps(args, pipe), "guidance": args.guidance,
            "seed": args.seed,
            "calibration": None if pipe.calibration is None else dataclasses.asdict(pipe.calibration)}
    paths = write_table(out, rows, meta=meta)
    print(markdown_table(summarize(rows)), end="")
    print(f"wrote:    {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_stress_test(args: argparse.Namespace) -> int:
    from gen_sr.eval.stress import run_stress_test

    out = _output_dir(args, "stress_test.json")
    pipe = _load_pipeline(args.model, args.device)
    if args.slice_spacing is not None or args.operator is not None:
        raise InputError("the stress test simulates contiguous slices of --slice-thickness",
                         hint="leave out --slice-spacing and --operator")
    volumes = [v for _, v in _hr_volumes(args, pipe)]
    kwargs = _sampling_kwargs(args)
    kwargs.pop("generator")
    try:
        result = run_stress_test(
            pipe, volumes, thickness_mm=args.slice_thickness, snr=args.snr, profile=args.profile,
            num_samples=kwargs.pop("num_samples"), num_inference_steps=kwargs.pop("num_inference_steps"),
            seed=args.seed, output_dir=out, contrast=args.contrast, n_per_size=args.lesions_per_size,
            diameters_mm=args.diameters, **kwargs)
    except ValueError as e:  # e.g. no room for lesions of that size
        raise InputError(f"cannot run the stress test: {e}") from e
    every = result["summary"]["all"]
    print(f"lesions:  {every['n_added']} added, {every['n_controls']} control sites, {every['n_removed']} removed")
    print(f"erasure:  {every['erasure']:.3f}   false structure: {every['false_structure']:.3f}   "
          f"risk AUROC (|error| > tau): {result['auroc']:.3f}")
    print(f"wrote:    {out}/stress_test.md, .csv, .json, .png")
    return 0


def _tissue(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE, e.g. GM=gm.nii.gz, got {text!r}")
    return name, path


def cmd_audit(args: argparse.Namespace) -> int:
    from gen_sr.eval.audit import audit
    from gen_sr.volume import load_volume

    out = _output_dir(args)
    lr = load_volume(args.input, volume_index=args.volume)
    reference = load_volume(args.reference) if args.reference else None
    brain = load_volume(args.mask) if args.mask else None
    tissues = {name: load_volume(path) for name, path in args.tissue} or None
    pipe = _load_pipeline(args.model, args.device)
    payload = audit(pipe, lr, out, input_name=Path(args.input).name, model_name=str(args.model), reference=reference,
                    masks=tissues, brain_mask=brain, reuse=args.reuse, risk_threshold=args.risk_threshold,
                    overwrite=args.overwrite, **_acquisition_kwargs(args), **_sampling_kwargs(args))
    print(f"verdict:  {payload['verdict']['text']}")
    for method, row in (payload.get("metrics") or {}).items():
        print(f"          {method:<10} PSNR {row['psnr']:6.2f} dB  SSIM {row['ssim']:.4f}")
    print(f"wrote:    {out / 'report.html'} (open it in any browser; it is self-contained), report.json, maps")
    return 0


# ----------------------------------------------------------------------------------------------------- sample data
def cmd_sample_data(args: argparse.Namespace) -> int:
    from gen_sr.sample_data import load_mni152, synthetic_subject
    from gen_sr.volume import check_output_path, save_volume

    out = check_output_path(args.output, args.overwrite)
    vol = load_mni152(args.kind) if args.subject is None else synthetic_subject(args.subject, args.kind)
    save_volume(vol, out, overwrite=args.overwrite)
    print(f"wrote: {out} ({vol.source}, {_shape(vol.shape)} voxels of {_fmt(vol.spacing)} mm)")
    return 0


# ----------------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from gen_sr.demo import run_demo

    run_demo(Path(args.output_dir), overwrite=args.overwrite, model=Path(args.model), num_samples=args.samples,
             num_inference_steps=args.steps)
    return 0


# ----------------------------------------------------------------------------------------------------- parser
def _whole_number(text: str, lo: int, hi: int | None = None, what: str = "a whole number") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < lo or (hi is not None and value > hi):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1, what="a positive whole number")


def _subject_seed(text: str) -> int:
    return _whole_number(text, 0, 2**32 - 1, what="a whole number from 0 to 2**32 - 1")


def _add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=_positive_int, default=8, help="posterior samples (default: 8)")
    p.add_argument("--steps", type=_positive_int,
                   help="DDIM steps (default: the model folder's; 50 for diffusion, 1 for a regression model)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default: 0, deterministic given the seed)")
    p.add_argument("--guidance", choices=("projection", "gradient", "none"), default="projection",
                   help="data consistency during sampling (default: projection); outputs are always projected")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="tiles per network call: the memory knob")


def _add_acquisition_arguments(p: argparse.ArgumentParser) -> None:
    """How the LR input was acquired, and the HR grid to reconstruct on."""
    p.add_argument("--target-spacing", type=_spacing, metavar="X,Y,Z",
                   help="HR voxel spacing in mm (default: isotropic at the finest input spacing)")
    p.add_argument("--slice-thickness", type=_positive_float, metavar="MM", help="default: the slice spacing")
    p.add_argument("--profile", choices=("gaussian", "rect"), default="gaussian", help="slice profile")
    p.add_argument("--noise-std", type=float, default=0.0, help="measurement noise std in input units (default 0)")
    p.add_argument("--volume", type=int, metavar="N", help="volume index to take from a 4D series")


def _add_simulation_arguments(p: argparse.ArgumentParser) -> None:
    """HR volumes to simulate acquisitions from, and the acquisition."""
    p.add_argument("--data", required=True, nargs="+", metavar="PATH",
                   help="HR NIfTI files or folders of them, or 'mni152' for the embedded template")
    p.add_argument("--region", choices=("all", "train", "calibration", "heldout"), default="all",
                   help="use the whole volumes, or only the training, calibration or held-out slab the model folder "
                        "records, cropped to the brain's bounding box (default: all)")
    p.add_argument("--slice-thickness", type=_positive_float, default=4.0, metavar="MM",
                   help="simulated slice thickness in mm (default: 4)")
    p.add_argument("--slice-spacing", type=_positive_float, metavar="MM", help="default: the thickness")
    p.add_argument("--profile", choices=("gaussian", "rect"), default="gaussian", help="slice profile")
    p.add_argument("--snr", type=_positive_float, help="add Rician noise at this SNR (default: noise-free)")
    p.add_argument("--operator", metavar="JSON",
                   help="simulate this acquisition instead (as `gen-sr degrade --save-operator` writes it; its axes "
                        "are RAS+ axes); replaces --slice-thickness, --slice-spacing and --profile")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show a full traceback on errors")

    parser = argparse.ArgumentParser(
        prog="gen-sr",
        description="MRI super-resolution with latent diffusion models and calibrated hallucination-risk maps.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(func=func)
        return p

    p = add("info", cmd_info, "print a NIfTI file's shape, spacing, orientation and intensity range")
    p.add_argument("file", help="a .nii or .nii.gz file")

    p = add("degrade", cmd_degrade, "simulate a low-resolution acquisition of a high-resolution volume")
    p.add_argument("--input", required=True, help="high-resolution NIfTI volume")
    p.add_argument("--output", required=True, help="where to write the simulated low-resolution volume")
    p.add_argument("--slice-thickness", required=True, type=_positive_float, metavar="MM",
                   help="slice thickness in mm (the FWHM for a Gaussian profile)")
    p.add_argument("--axis", required=True, type=int, choices=(0, 1, 2),
                   help="voxel axis of the input file the slices are stacked along (see `gen-sr info`)")
    p.add_argument("--slice-spacing", type=_positive_float, metavar="MM",
                   help="centre-to-centre slice distance in mm (default: the thickness; larger leaves gaps)")
    p.add_argument("--profile", choices=("gaussian", "rect"), default="gaussian",
                   help="slice profile (default: gaussian)")
    p.add_argument("--snr", type=_positive_float,
                   help="add noise at this SNR (mean foreground / noise std); default: none")
    p.add_argument("--noise", choices=("rician", "gaussian"), default="rician", help="noise model (default: rician)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--volume", type=int, metavar="N", help="volume index to take from a 4D series")
    p.add_argument("--save-operator", metavar="JSON", help="also write the acquisition operator as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")

    p = add("super-resolve", cmd_super_resolve, "super-resolve an LR volume with a trained model, with uncertainty")
    p.add_argument("--model", required=True, help="a model folder (model_index.json, safetensors weights)")
    p.add_argument("--input", required=True, help="the low-resolution NIfTI volume")
    p.add_argument("--output", required=True, help="where to write the super-resolved mean")
    p.add_argument("--std", help="also write the per-voxel standard deviation across samples")
    p.add_argument("--risk", help="also write the hallucination-risk map")
    p.add_argument("--dc-residual", help="also write |A x - y| on the HR grid")
    _add_sampling_arguments(p)
    _add_acquisition_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")

    p = add("calibrate", cmd_calibrate, "fit the scale that turns the sample std into intervals with a coverage "
            "guarantee, and write calibration.json into the model folder")
    p.add_argument("--model", required=True, help="a model folder; calibration.json is written into it")
    _add_simulation_arguments(p)
    p.add_argument("--alpha", type=float, default=0.1, help="target miss rate: coverage 1 - alpha (default: 0.1)")
    p.add_argument("--delta", type=float, default=0.1, help="failure probability of the guarantee (default: 0.1)")
    p.add_argument("--method", choices=("rcps", "crc"), default="rcps",
                   help="rcps: coverage with probability 1 - delta (conservative); crc: conformal risk control, "
                        "coverage in expectation (tight) (default: rcps)")
    p.add_argument("--blocks", type=_positive_int, default=1,
                   help="cut each volume into this many slabs of equal brain volume, each a calibration unit "
                        "(default: 1)")
    p.add_argument("--interval", choices=("std", "auto"), default="std",
                   help="std: intervals mean ± λ·std; auto: also choose a spread from the std, a noise floor and an "
                        "edge term, the one whose calibration transfers best when each volume is left out in turn "
                        "(needs 3 or more volumes) (default: std)")
    _add_sampling_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing calibration")

    p = add("evaluate", cmd_evaluate, "run the model and every baseline on HR volumes and tabulate all metrics")
    p.add_argument("--model", required=True, help="a model folder")
    _add_simulation_arguments(p)
    p.add_argument("--output-dir", required=True, help="where to write evaluation.md/.csv/.json")
    p.add_argument("--regression-model", metavar="DIR",
                   help="also evaluate a regression baseline (the same UNet trained with L1: train_diffusion with "
                        "--unet.objective=regression --noise_schedule.prediction_type=sample)")
    _add_sampling_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing evaluation")

    p = add("stress-test", cmd_stress_test, "insert synthetic lesions into HR volumes, degrade, super-resolve, "
            "and measure erasure, false structure and how well the risk map flags errors")
    p.add_argument("--model", required=True, help="a model folder")
    _add_simulation_arguments(p)
    p.add_argument("--output-dir", required=True, help="where to write stress_test.md/.csv/.json/.png")
    p.add_argument("--contrast", type=float, default=0.3,
                   help="lesion contrast as a signed fraction of the robust intensity range (default: 0.3)")
    p.add_argument("--diameters", type=_positive_float, nargs="+", metavar="MM",
                   help="lesion diameters in mm (default: half and 1.5 times the slice thickness)")
    p.add_argument("--lesions-per-size", type=_positive_int, default=2, help="lesions per size and volume (default 2)")
    _add_sampling_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing stress test")

    p = add("audit", cmd_audit, "super-resolve an LR volume (or reuse a run) and write a self-contained HTML "
            "hallucination-audit report with its NIfTI maps")
    p.add_argument("--model", required=True, help="a model folder")
    p.add_argument("--input", required=True, help="the low-resolution NIfTI volume")
    p.add_argument("--output-dir", required=True, help="where to write report.html, report.json and the maps")
    p.add_argument("--reference", help="the HR truth on the SR grid: adds metrics against every baseline and the "
                                       "calibration plot")
    p.add_argument("--mask", help="brain mask on the SR grid: where the flagged fraction and metrics are counted")
    p.add_argument("--tissue", type=_tissue, action="append", default=[], metavar="NAME=FILE",
                   help="a tissue probability map on the SR grid, to label risk clusters (repeatable)")
    p.add_argument("--reuse", nargs=2, metavar=("SR", "STD"),
                   help="the mean and std of an earlier super-resolve run (its .json beside SR) instead of sampling")
    p.add_argument("--risk-threshold", type=_positive_float, default=0.1,
                   help="risk above which a voxel is flagged, as a fraction of the intensity range (default: 0.1)")
    _add_acquisition_arguments(p)
    _add_sampling_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")

    p = add("sample-data", cmd_sample_data, "write the embedded MNI152 2009 template (shipped by nilearn) as NIfTI")
    p.add_argument("--output", required=True, help="where to write it (.nii or .nii.gz)")
    p.add_argument("--kind", choices=("t1", "gm", "wm"), default="t1", help="T1 template or GM/WM map (default: t1)")
    p.add_argument("--subject", type=_subject_seed, metavar="SEED",
                   help="write synthetic subject SEED instead: the template under a random smooth deformation (for "
                        "the T1 also a bias field and contrast change); the same SEED with --kind gm/wm gives its "
                        "tissue maps. Subjects are exchangeable: calibrate on some, test on others")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    p = add("demo", cmd_demo, "super-resolve the held-out slab of the embedded MNI152 template with the demo model "
            "and write the hallucination audit")
    p.add_argument("--output-dir", default="demo_out", help="folder for the demo's files (default: demo_out)")
    p.add_argument("--model", default="models/mni2d", help="model folder (default: models/mni2d)")
    p.add_argument("--samples", type=_positive_int, default=8, help="posterior samples (default: 8)")
    p.add_argument("--steps", type=_positive_int, default=50, help="DDIM steps (default: 50)")
    p.add_argument("--overwrite", action="store_true", help="replace files from an earlier run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gen-sr``; returns the exit code (0 success, 2 user error)."""
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        exit_if_distributed(code)  # under `accelerate launch`: see gen_sr.distributed
        return code
    except InputError as e:
        if args.debug:
            raise
        print(f"gen-sr {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"gen-sr {args.command}: interrupted; no partial output was left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
