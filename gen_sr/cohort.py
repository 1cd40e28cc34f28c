"""Cohorts: super-resolve many scans, split over processes, resumable, with one summary at the end.

    gen-sr super-resolve --model DIR --input scans/ --output-dir sr/          # a folder, a BIDS dataset or a glob
    accelerate launch -m gen_sr.cli super-resolve --model DIR --input 'bids/sub-*/anat/*_T1w.nii.gz' --output-dir sr/

In Python: ``run_cohort(pipe, find_scans(["scans/"]), "sr/", **pipe_kwargs)``.

* **Scans** are NIfTI files under the inputs (folders are searched recursively; globs are expanded), each
  super-resolved with the same settings and seed.
* **Names:** a BIDS file keeps its place and entities (``sub-01/ses-1/anat/sub-01_ses-1_T2w.nii.gz`` becomes
  ``sub-01/ses-1/anat/sub-01_ses-1_desc-sr_T2w.nii.gz``, with ``desc-srstd`` and ``desc-risk`` maps and a JSON
  sidecar); any other file becomes ``<stem>_sr.nii.gz``, ``<stem>_std.nii.gz``, ``<stem>_risk.nii.gz`` and
  ``<stem>_sr.json`` under the same relative folder.
* **Processes:** under ``accelerate launch`` (several processes, GPUs or machines) each process takes every
  world-size-th scan and draws all of that scan's samples itself.
* **Reruns** skip every scan whose maps and run record exist, and take its figures from that record
  (``overwrite=True`` redoes them, removing their earlier outputs first); a scan whose file or JSON sidecar changed
  since (:func:`input_stamp`) is redone; a rerun with other settings (model files, sampler, seed, acquisition) than
  the runs that finished scans is refused before any sampling, so that one folder never mixes two settings. The
  acquisition is compared as each scan's run takes it, not as it was given: a slice profile or thickness given as
  the scan's JSON sidecar says, or a target spacing given as the default one, is the same setting.
* **Single-scan runs' outputs** (``gen-sr super-resolve --input a.nii.gz --output ... --std ... --risk ...``) at
  a scan's very output paths count as an earlier run's where their record proves them its: the scan as it is now
  (its :func:`input_stamp`) and the settings (:func:`single_scan_record`: runs without ``--adapt`` record both), with
  the std and risk maps there; settings that differ are refused as above. Any other file where a scan's output would
  go is the user's: the scan fails and keeps it (``--overwrite`` replaces maps without a record beside them, never
  another record). Two scans that would write the same outputs are refused. A scan that fails is reported with its
  one-line reason and does not stop the others.
* **Summary:** ``summary.tsv`` and ``summary.json`` in the output folder, one row per scan: status, seconds, the
  noise std the run used (given, or read from the scan's air), the largest relative residual ``‖A x − y‖/‖y‖``, and
  the fraction of the head flagged (risk above the threshold; ``n/a`` for a single-scan run's outputs, whose record
  holds neither it nor the seconds), and whether the scan's risk map is calibrated for its run
  (``calibration_holds``; where not, ``calibration_mismatch`` says why: :data:`~gen_sr.risk.Mismatch`, or
  ``uncalibrated``), from its run record: a flagged fraction bounds nothing where it is not
  (:func:`calibration_line` says how many).
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, astuple, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from gen_sr.distributed import process_state
from gen_sr.errors import InputError
from gen_sr.io import (
    NIFTI_SUFFIXES,
    atomic_write,
    file_sha256,
    is_nifti_name,
    json_ready,
    model_digests,
    sidecar_path,
    write_json,
)
from gen_sr.risk import MISMATCH_WORDING, mismatch_text
from gen_sr.run_record import CohortRecord, RunRecord
from gen_sr.volume import IntensityNormalization, load_volume, save_maps

__all__ = ["UNCALIBRATED", "CohortRow", "ScanOutputs", "calibration_line", "find_scans", "flagged_fraction",
           "input_stamp", "run_cohort", "run_settings", "same_input", "scan_outputs", "single_scan_record"]

_BIDS = re.compile(r"^(?P<entities>sub-[A-Za-z0-9]+(?:_[a-z]+-[A-Za-z0-9]+)*)_(?P<suffix>[A-Za-z0-9]+)$")
UNCALIBRATED = "uncalibrated"
"""A row's ``calibration_mismatch`` where the run had no calibration at all (else a :data:`~gen_sr.risk.Mismatch`)."""
_ACQUISITION = ("target_spacing", "slice_profile", "slice_thickness")
"""The settings that, with each scan's grid and JSON sidecar, make its acquisition: compared as each scan's run takes
them (:func:`run_cohort`)."""


def find_scans(inputs: Sequence[str | os.PathLike[str]],
               output_dir: str | os.PathLike[str] | None = None) -> list[tuple[Path, Path]]:
    """``(file, root)`` of every NIfTI scan under ``inputs`` (files, folders searched recursively, or glob
    patterns), sorted and without repeats; ``root`` is what output names are made relative to (the folder given, or
    the file's own folder). Files whose name starts with a dot are left out, and with ``output_dir`` the outputs that
    a cohort run writes there for the scans found (:func:`scan_outputs`: an output folder inside the input folder, or
    the same one, is not read back as scans).

    Raises:
        InputError: an input that does not exist or matches nothing, no scan at all, or (with ``output_dir``) a scan
            where another's output would go that is not an earlier run's output (whose record is its scan's:
            :class:`_Scan`).
    """
    found: dict[Path, Path] = {}
    for entry in inputs:
        text = str(entry)
        path = Path(text)
        if path.is_dir():
            files = [f for f in sorted(path.rglob("*")) if f.is_file() and is_nifti_name(f)]
            pairs = [(f, path) for f in files]
        elif path.is_file():
            pairs = [(path, path.parent)]
        elif glob.has_magic(text):
            files = [Path(f) for f in sorted(glob.glob(text, recursive=True)) if is_nifti_name(f)]
            root = Path(os.path.commonpath([str(f.parent) for f in files])) if files else Path(".")
            pairs = [(f, root) for f in files]
        else:
            raise InputError("no such file, folder or pattern", path)
        pairs = [(f, r) for f, r in pairs if not f.name.startswith(".")]
        if not pairs:
            raise InputError("holds no .nii or .nii.gz files", path)
        for f, r in pairs:
            found.setdefault(f.resolve(), r.resolve())
    if output_dir is not None:
        out = Path(output_dir).resolve()
        claims: dict[Path, list[tuple[Path, ScanOutputs]]] = {}  # output file -> the scans whose output it is
        for f, r in found.items():
            paths = scan_outputs(f, r, out)
            for p in astuple(paths):
                claims.setdefault(p, []).append((f, paths))
        written = set()
        for f in found.keys() & claims.keys():  # an earlier run's output (its record names its scan), or a scan
            if not any(_Scan.read(scan, paths).ours for scan, paths in claims[f]):
                raise InputError(f"is a scan, and where the output of {claims[f][0][0].name} would go", f,
                                 "give another --output-dir, or rename it")
            written.add(f)
        found = {f: r for f, r in found.items() if f not in written}
        if not found:
            raise InputError("holds only the outputs of earlier runs", inputs[0] if inputs else None)
    return sorted(found.items())


@dataclass(frozen=True)
class ScanOutputs:
    """Where one scan's outputs go."""

    mean: Path
    std: Path
    risk: Path
    sidecar: Path


@dataclass(frozen=True)
class _Scan:
    """A scan of a run, its output paths and what an earlier run left there, found once per run (:meth:`read`)."""

    scan: Path
    paths: ScanOutputs
    record: CohortRecord | None  # the JSON at the run record's place, as a cohort reads it: None where there is none
    ours: bool  # the record is a run record of this scan
    single: bool  # the record is a single-scan run's (it proves itself this scan's only where ``ours``)
    finished: bool  # ours, a run record not under way, and the mean, std and risk maps are there
    changed: bool  # finished, but the scan or its JSON sidecar changed since (:func:`same_input`)
    run: RunRecord | None = None  # where finished, the record as a run record

    @classmethod
    def read(cls, scan: Path, paths: ScanOutputs) -> _Scan:
        """``scan`` and its output place. A record is the scan's where it names it (a cohort run's ``input``: by path,
        or by file name where the folders were moved or mounted elsewhere since), or where it is a single-scan run's
        (no ``input``: :func:`single_scan_record`) that proves it: the scan's stamp as it is now, the run's settings,
        and the std and risk maps beside it. A run writes its record first, unfinished, so that its partial outputs
        are known as its own, and again last."""
        raw = _read_record(paths.sidecar)
        if raw is None:
            return cls(scan, paths, None, ours=False, single=False, finished=False, changed=False)
        record = CohortRecord.from_dict(raw)
        name, stamp = record.input, record.input_stamp
        maps = all(p.is_file() for p in (paths.mean, paths.std, paths.risk))
        named = isinstance(name, str) and (name == str(scan) or Path(name).name == scan.name)
        single = name is None and stamp is not None and record.cohort_settings is not None
        same = (named or single) and (stamp is None or same_input(stamp, scan))  # no stamp kept: as unchanged
        ours = named or (single and same and maps)
        run = _run_record(raw) if ours and not record.under_way and maps else None
        finished = run is not None
        return cls(scan, paths, record, ours=ours, single=single, finished=finished, changed=finished and not same,
                   run=run)


def scan_outputs(scan: Path, root: Path, output_dir: Path) -> ScanOutputs:
    """The output paths of ``scan`` (found under ``root``) in ``output_dir``: BIDS names for a BIDS file, else
    ``<stem>_sr`` and its siblings, in the same relative folder (see the module docstring)."""
    relative = scan.parent.resolve().relative_to(root) if scan.parent.resolve().is_relative_to(root) else Path()
    folder = output_dir / relative
    stem = scan.name
    for suffix in NIFTI_SUFFIXES[::-1]:
        stem = stem.removesuffix(suffix)
    bids = _BIDS.match(stem)
    if bids:
        entities = "_".join(e for e in bids["entities"].split("_") if not e.startswith("desc-"))
        name = lambda desc: f"{entities}_desc-{desc}_{bids['suffix']}"  # noqa: E731
        names = (name("sr"), name("srstd"), name("risk"))
    else:
        names = (f"{stem}_sr", f"{stem}_std", f"{stem}_risk")
    return ScanOutputs(*(folder / f"{n}.nii.gz" for n in names), folder / f"{names[0]}.json")


def flagged_fraction(risk: np.ndarray, mean: np.ndarray, threshold: float = 0.1) -> float:
    """The fraction of the imaged object (voxels of the mean above a tenth of its robust range over the low end)
    whose risk exceeds ``threshold``: the audit report's verdict figure, without a brain mask."""
    norm = IntensityNormalization.fit(mean)
    inside = norm(mean) > 0.1
    return float(np.mean(risk[inside] > threshold)) if inside.any() else 0.0


@dataclass
class CohortRow:
    """One scan of a cohort run."""

    scan: str
    status: str  # "done", "skipped" or "failed"
    seconds: float | None = None  # None: not recorded (a single-scan run's outputs taken as the scan's)
    noise_std: float | None = None  # the one the run used: given, or read from the scan's air (``"auto"``)
    max_relative_residual: float | None = None
    flagged_fraction: float | None = None
    calibration_holds: bool | None = None  # whether its risk map is calibrated for its run (None: not recorded)
    calibration_mismatch: str | None = None  # where not, why: a Mismatch, or UNCALIBRATED
    output: str = ""
    message: str = ""


def _calibration(run: RunRecord) -> dict[str, Any]:
    """A :class:`CohortRow`'s ``calibration_holds`` and ``calibration_mismatch``, from a run record's ``risk``
    (:class:`~gen_sr.run_record.RiskRecord`: ``calibrated``, ``holds``, ``mismatch``); none for a record without
    them."""
    risk = run.risk
    if risk is None:
        return {}
    if not risk.calibrated:
        return {"calibration_holds": False, "calibration_mismatch": UNCALIBRATED}
    if risk.holds is None:
        return {}
    return {"calibration_holds": risk.holds, "calibration_mismatch": risk.mismatch}


def calibration_line(rows: Sequence[CohortRow]) -> str | None:
    """How many scans' risk maps are not calibrated for their runs, and why, in a sentence for the end of a cohort
    run (each reason as :data:`~gen_sr.risk.MISMATCH_WORDING` says it; with one reason, what to do); ``None`` where
    the calibration holds for every scan whose record says."""
    said = [r for r in rows if r.calibration_holds is not None]
    why = Counter(r.calibration_mismatch for r in said if not r.calibration_holds)
    if not why:
        return None
    labels = {m: "uncalibrated" if m == UNCALIBRATED else f"calibrated {MISMATCH_WORDING[m].label}"
              if m in MISMATCH_WORDING else f"calibrated, but not for it ({m})" for m in why}
    text = (f"the risk maps of {why.total()} of {len(said)} scans are not calibrated for their runs "
            f"({', '.join(f'{n} {labels[m]}' for m, n in why.items())}), so their flagged fractions bound nothing")
    only = next(iter(why)) if len(why) == 1 else None
    if only in MISMATCH_WORDING:
        text += f": {mismatch_text(only)}"
    return text


def run_cohort(pipe: Any, scans: Sequence[tuple[Path, Path]], output_dir: str | os.PathLike[str], *,
               overwrite: bool = False, risk_threshold: float = 0.1, progress: bool = True,
               **pipe_kwargs: Any) -> list[CohortRow]:
    """Super-resolve every scan of ``scans`` (from :func:`find_scans`) into ``output_dir``; see the module docstring.

    Args:
        pipe: the pipeline.
        overwrite: redo scans an earlier run finished.
        risk_threshold: risk above which a voxel counts as flagged in the summary.
        pipe_kwargs: for each pipeline call (``num_samples``, ``generator`` as a seed: pass ``seed=`` instead, so that
            every scan starts from the same one; ...).

    Returns:
        Every scan's row, in the order of ``scans`` (on every process); the main process also writes the summary.
    """
    out = Path(output_dir)
    state = process_state()
    seed = pipe_kwargs.pop("seed", 0)
    settings = run_settings(pipe, seed, pipe_kwargs)
    _check_distinct_outputs(scans, out)
    found = [_Scan.read(scan, scan_outputs(scan, root, out)) for scan, root in scans]  # each record read once
    if not overwrite:
        _check_earlier_settings(found, pipe, settings, pipe_kwargs, out)
    mine = found[state.process_index :: state.num_processes]
    rows = []
    for one in tqdm(mine, desc="cohort", unit="scan", disable=not (progress and state.is_local_main_process)):
        rows.append(_one_scan(pipe, one, overwrite, risk_threshold, seed, pipe_kwargs, settings))
    everyone = gather_object([asdict(r) for r in rows]) if state.num_processes > 1 else [asdict(r) for r in rows]
    order = {str(scan): k for k, (scan, _) in enumerate(scans)}
    result = sorted((CohortRow(**r) for r in everyone), key=lambda r: order.get(r.scan, len(order)))
    if state.is_main_process:
        write_summary(result, out)
    return result


def run_settings(pipe: Any, seed: int, pipe_kwargs: dict[str, Any]) -> dict[str, Any]:
    """What makes a cohort's outputs what they are, as JSON (recorded in each sidecar as ``cohort_settings``): the
    settings as asked, the same for every scan (a rerun compares them with its own: :func:`run_cohort`), not as each
    scan's run resolved them from its data (its run record says that). They are the model folder and its content
    (:func:`~gen_sr.io.model_digests`: weights, card and calibration), the sampler settings as asked
    (``sampling_as_asked``: ``pipe.sampling_settings``, so that a step count left to the model's default equals the
    same count given; without ``noise_known``, which each scan's air decides where the noise std is ``"auto"``, and
    with the ``refit_disagreement`` asked, which a run without a noise std does not do), the seed and the other
    pipeline arguments as given, but for ``batch_size`` (a memory knob: the output depends on it only by float32
    rounding). The acquisition's (target spacing, slice profile and thickness) are recorded as given too, and a rerun
    compares them as each scan's run resolves them (its ``operator``; :func:`run_cohort`)."""
    model = getattr(pipe.config, "_name_or_path", None)
    folder = Path(model).resolve() if model and Path(model).is_dir() else None
    noise = pipe_kwargs.get("noise_std")
    asked = asdict(pipe.sampling_settings(**{**pipe_kwargs, "noise_std": noise if noise != "auto" else None}))
    others = {k: v for k, v in pipe_kwargs.items() if k not in asked and k != "batch_size"}
    sampling = {k: v for k, v in asked.items() if k not in _RESOLVED_PER_SCAN}
    return json_ready({"model": None if folder is None else str(folder),
                       "model_files": None if folder is None else model_digests(folder),
                       "sampling_as_asked": sampling, "seed": seed, **dict(sorted(others.items()))})


_RESOLVED_PER_SCAN = ("noise_known",)
"""Sampler settings that each scan's run resolves from its own data, left out of the settings as asked
(:func:`run_settings`; records from before wrote ``noise_known`` there, always true, which a rerun does not compare)."""


def single_scan_record(pipe: Any, seed: int, pipe_kwargs: dict[str, Any], stamp: dict[str, Any]) -> CohortRecord:
    """What a single-scan run of a model folder (not adapted: its pipeline is the folder's) adds to its record so that
    a cohort can take its outputs as the scan's: the :func:`input_stamp` taken before it read the scan, and its
    :func:`run_settings` (``pipe_kwargs``: its pipeline arguments but the generator, the input's ``volume_index``
    with them)."""
    return CohortRecord(input_stamp=stamp, cohort_settings=run_settings(pipe, seed, pipe_kwargs))


def _read_record(path: Path) -> dict[str, Any] | None:
    """The JSON object at a run record's place: ``None`` where there is no file, ``{}`` where it holds none."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _run_record(record: dict[str, Any]) -> RunRecord | None:
    """A scan's JSON as a run record, or ``None`` where it is none (a cohort's record of a run under way, or the
    user's file)."""
    try:
        return RunRecord.from_dict(record)
    except ValueError:
        return None


def _check_earlier_settings(scans: Sequence[_Scan], pipe: Any, settings: dict[str, Any], pipe_kwargs: dict[str, Any],
                            output_dir: Path) -> None:
    """Refuse a rerun whose settings differ from those of the runs that finished some of its scans (:func:`_changes`;
    a scan whose input changed since is redone, and a record without ``cohort_settings``, from before they were
    recorded, is taken as the same).

    Raises:
        InputError: naming how many scans, and the settings that differ for the first of them.
    """
    stale = [changes for one in scans if one.finished and not one.changed
             and (changes := _changes(one, pipe, settings, pipe_kwargs))]
    if stale:
        said = lambda v: "none" if v is None else repr(v)  # noqa: E731
        changed = ", ".join(f"{k} {said(before)} → {said(now)}" for k, (before, now) in stale[0].items())
        raise InputError(f"{len(stale)} scan(s) here were finished by an earlier run with other settings ({changed}), "
                         "and a folder should not mix two", output_dir,
                         "pass --overwrite to redo them with these settings, or give another --output-dir")


def _changes(earlier: _Scan, pipe: Any, settings: dict[str, Any], pipe_kwargs: dict[str, Any]
             ) -> dict[str, tuple[Any, Any]]:
    """The settings of this run that differ from those of the run that finished ``earlier`` (its record's
    ``cohort_settings``; ``{}`` without them), as ``{name: (before, now)}``, each setting and model file by its own
    name (:func:`_flat`; one that a record does not hold is none). The acquisition is compared as the scan's run takes
    it: where its settings were given otherwise, the acquisition this run would take for the scan (the pipeline's
    ``plan``) against the one the earlier run recorded (``operator``), field by field (``slice profile (axis 2)``);
    given alike, they are alike (the scan, its JSON sidecar and the model files are those of the earlier run)."""
    recorded = None if earlier.record is None else earlier.record.cohort_settings
    if recorded is None:
        return {}
    before, now = _flat(recorded), _flat(settings)
    for key in _RESOLVED_PER_SCAN:  # an older record's, as asked (always true): not a setting
        before.pop(key, None)
    if any(before.get(k) != now.get(k) for k in _ACQUISITION):
        given = {k: pipe_kwargs[k] for k in _ACQUISITION if k in pipe_kwargs}
        plan = pipe.plan(earlier.scan, noise_std=0.0, **given)  # a noise std given: no air to read for the plan
        before = _resolved(before, earlier.run.operator)
        now = _resolved(now, json_ready(plan.operator.to_dict()))
    return {k: (before.get(k), now.get(k)) for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)}


def _resolved(settings: dict[str, Any], operator: dict[str, Any] | None) -> dict[str, Any]:
    """Flat ``settings`` with the acquisition as given (:data:`_ACQUISITION`) replaced by the one a run took, an
    operator's record (``metadata["operator"]``): its grid (``hr_shape``, ``hr_spacing``) and each transform's fields
    by name and axis, e.g. ``slice thickness (axis 2)``."""
    resolved = {k: v for k, v in settings.items() if k not in _ACQUISITION}
    resolved.update({k: v for k, v in (operator or {}).items() if k != "transforms"})
    for t in (operator or {}).get("transforms", []):
        resolved.update({f"{t['type']} {k} (axis {t['axis']})": v for k, v in t.items() if k not in ("type", "axis")})
    return resolved


def _check_distinct_outputs(scans: Sequence[tuple[Path, Path]], output_dir: Path) -> None:
    """Refuse two scans whose outputs would be the same files (``a.nii`` and ``a.nii.gz`` in one folder)."""
    seen: dict[Path, Path] = {}
    for scan, root in scans:
        other = seen.setdefault(scan_outputs(scan, root, output_dir).mean, scan)
        if other != scan:
            raise InputError(f"{scan.name} and {other.name} would write the same outputs (and share one JSON "
                             "sidecar)", scan.parent, "rename one, with its sidecar, or move it to another folder")


def input_stamp(scan: Path) -> dict[str, list[Any] | None]:
    """The size, modification time (ns) and SHA-256 of a scan's file and of its JSON sidecar (``None`` without one):
    what a finished scan's outputs were made from (:func:`same_input`)."""
    return {"scan": _file_stamp(scan), "sidecar": _file_stamp(sidecar_path(scan))}


def same_input(recorded: dict[str, Any], scan: Path) -> bool:
    """Whether a scan and its sidecar hold what they held when ``recorded`` (:func:`input_stamp`) was taken: a file
    whose size and time are unchanged is taken as unchanged; one whose time changed (copied, touched, checked out)
    is compared by content, so only an edit makes a rerun redo the scan."""
    for key, path in (("scan", scan), ("sidecar", sidecar_path(scan))):
        before, now = recorded.get(key), path.stat() if path.is_file() else None
        if before is None or now is None:
            if (before is None) != (now is None):
                return False
        elif [now.st_size, now.st_mtime_ns] != before[:2] and (len(before) < 3 or file_sha256(path) != before[2]):
            return False
    return True


def _file_stamp(path: Path) -> list[Any] | None:
    return [path.stat().st_size, path.stat().st_mtime_ns, file_sha256(path)] if path.is_file() else None


def _flat(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with its nested records flattened (``{"sampling": {"num_samples": 8}}`` gives
    ``{"num_samples": 8}``, ``{"model_files": {"unet/config.json": ...}}`` ``{"unet/config.json": ...}``): each
    setting, and each model file, by its own name."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        flat.update(_flat(value) if isinstance(value, dict) else {key: value})
    return flat


def _one_scan(pipe: Any, found: _Scan, overwrite: bool, threshold: float, seed: int, pipe_kwargs: dict[str, Any],
              settings: dict[str, Any]) -> CohortRow:
    import torch

    scan, paths, changed = found.scan, found.paths, found.changed
    if found.record is not None and not found.ours and not (overwrite and found.single):  # never taken or removed
        what = ("is a single-scan run's record of this scan as it was before it changed, or without its std and risk "
                "maps: pass --overwrite to redo it" if found.single else
                "is not a run record of this scan that a cohort can take (a single-scan run's counts where it records "
                "this very scan and its settings, with its std and risk maps beside it): move it away")
        return CohortRow(str(scan), "failed", message=f"{paths.sidecar} {what}, or give another --output-dir")
    if found.record is None and not overwrite and (there := [p for p in astuple(paths) if p.exists()]):
        return CohortRow(str(scan), "failed", message=f"{there[0]} is there and is no output of a run of this scan: "
                                                      "remove it, pass --overwrite, or give another --output-dir")
    if found.finished and not (overwrite or changed):
        run, record = found.run, found.record
        return CohortRow(str(scan), "skipped", record.seconds, noise_std=run.noise_std,
                         max_relative_residual=run.max_relative_residual,
                         flagged_fraction=record.flagged_fraction, **_calibration(run),
                         output=str(paths.mean), message="finished by an earlier run")
    _remove(paths)  # redone: no output of the earlier run stays, even where this one fails
    tic, stamp = time.perf_counter(), input_stamp(scan)  # what this run reads
    try:
        paths.mean.parent.mkdir(parents=True, exist_ok=True)
        write_json(paths.sidecar, CohortRecord(input=str(scan), finished=False, cohort_settings=settings).to_dict())
        lr = load_volume(scan)
        result = pipe(lr, keep_samples=False, output_type="np", split_samples=False,
                      generator=torch.Generator().manual_seed(seed), **pipe_kwargs)
        digests = save_maps(lr, {key: (getattr(result, key), result.affine, path)  # the mean last
                                 for key, path in (("std", paths.std), ("risk", paths.risk), ("mean", paths.mean))},
                            overwrite=True)
        seconds = time.perf_counter() - tic
        flagged = flagged_fraction(np.asarray(result.risk), np.asarray(result.mean), threshold)
        run = replace(result.record, output_digests=digests)
        cohort = CohortRecord(input=str(scan), finished=True, flagged_fraction=flagged, risk_threshold=threshold,
                              seconds=seconds, cohort_settings=settings, input_stamp=stamp)
        write_json(paths.sidecar, {**run.to_dict(), **cohort.to_dict()})
        return CohortRow(str(scan), "done", seconds, noise_std=run.noise_std,
                         max_relative_residual=run.max_relative_residual, flagged_fraction=flagged,
                         **_calibration(run), output=str(paths.mean),
                         message="its input changed since an earlier run" if changed else "")
    except (InputError, ValueError, RuntimeError, OSError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if os.environ.get("GEN_SR_DEBUG"):
            traceback.print_exc()
        _remove(paths)  # nothing half-made stays
        return CohortRow(str(scan), "failed", time.perf_counter() - tic, message=message)


def _remove(paths: ScanOutputs) -> None:
    """Remove a scan's outputs (its maps, then its run record)."""
    for path in astuple(paths):
        path.unlink(missing_ok=True)


def write_summary(rows: Sequence[CohortRow], output_dir: Path) -> tuple[Path, Path]:
    """``summary.tsv`` (one row per scan, tab-separated) and ``summary.json`` in ``output_dir``, atomically."""
    output_dir.mkdir(parents=True, exist_ok=True)
    tsv, js = output_dir / "summary.tsv", output_dir / "summary.json"

    def cell(v: Any) -> str:
        if v is None:
            return "n/a"
        return f"{v:.4g}" if isinstance(v, float) else str(v).replace("\t", " ")

    columns = [f.name for f in fields(CohortRow)]
    lines = ["\t".join(columns)] + ["\t".join(cell(getattr(r, c)) for c in columns) for r in rows]
    atomic_write(tsv, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    counts = {s: sum(r.status == s for r in rows) for s in ("done", "skipped", "failed")}
    counts["calibration_does_not_hold"] = sum(r.calibration_holds is False for r in rows)
    write_json(js, {"counts": counts, "scans": [asdict(r) for r in rows]})
    return tsv, js
