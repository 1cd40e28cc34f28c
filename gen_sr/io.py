"""Writing outputs safely: output paths checked before any work, atomic writes, strict JSON and run sidecars.

Every command checks all its output paths first (:func:`check_output_file`, :func:`check_output_path` for NIfTI,
:func:`check_output_dir` for folders), so a mistake costs one line and no computation. Files are written to a
temporary file beside the target and renamed (:func:`atomic_write`), so an interrupted run never leaves a
half-written file.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gen_sr.errors import InputError

__all__ = ["MODEL_FILE_SUFFIXES", "NIFTI_SUFFIXES", "SLICE_PROFILE_KEY", "atomic_dir", "atomic_write",
           "check_output_dir", "check_output_file", "check_output_path", "check_writable_dir", "file_sha256",
           "is_nifti_name", "json_ready", "model_digests", "read_sidecar", "sidecar_path", "sidecar_profile_error",
           "sidecar_slice_profile", "sidecar_slice_thickness", "slice_sidecar", "write_json"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SLICE_PROFILE_KEY = "SliceProfile"
"""gen_sr's own key (not a BIDS one) in a scan's JSON sidecar: its slice profile, ``"gaussian"``, ``"rect"`` or a list
of samples across the slice (as ``--profile FILE`` reads them), which ``gen-sr degrade`` writes beside
``SliceThickness``."""
PathLike = str | os.PathLike[str]


def is_nifti_name(path: PathLike) -> bool:
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def check_writable_dir(folder: PathLike, what: str = "the output directory") -> None:
    """Raise :class:`InputError` unless ``folder`` exists and a file can be created in it (tried with a probe
    file, which also catches read-only mounts and holds for every user, root included)."""
    p = Path(folder)
    if not p.is_dir():
        raise InputError(f"{what} does not exist" if not p.exists() else f"{what} is not a directory", p,
                         "create it first")
    try:
        fd, probe = tempfile.mkstemp(dir=p, prefix=".gen_sr-probe-")
    except OSError:
        raise InputError(f"{what} is not writable", p, "choose a folder you can write to") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: PathLike, overwrite: bool = False, inputs: Sequence[PathLike] = (),
                      suffixes: Sequence[str] | None = None) -> Path:
    """Check one output file before any work is done; returns it as a ``Path``.

    Its folder may be missing where the folder above it is writable: it is then created when the file is written
    (:func:`atomic_write`), as an output folder is (:func:`check_output_dir`).

    Raises:
        InputError: a wrong suffix, a folder that is a file or is missing with the one above it, an unwritable
            folder, an existing file without ``overwrite``, or the same file as one of ``inputs`` or as the JSON
            sidecar of a NIfTI one (``scan.nii`` and the run record of an output ``scan.nii.gz`` are both
            ``scan.json``).
    """
    p = Path(path)
    if suffixes is not None and not p.name.lower().endswith(tuple(suffixes)):
        raise InputError(f"output must end in {' or '.join(suffixes)}", p)
    if p.is_dir():
        raise InputError("is a directory; an output file name is needed", p)
    _check_folder_of(p.parent)
    _check_not_an_input(p, inputs, "give the output another name")
    if p.exists() and not overwrite:
        raise InputError("output already exists", p, "pass --overwrite to replace it")
    return p


def _check_not_an_input(p: Path, inputs: Sequence[PathLike], hint: str) -> None:
    """Refuse an output that is one of ``inputs`` or the JSON sidecar of a NIfTI one (existing or not: a run would
    read it as the scan's), whatever ``overwrite``; ``hint``: what to do."""
    for src in inputs:
        if not is_nifti_name(src) and not Path(src).exists():  # a description, e.g. "synthetic subject 3"
            continue
        if Path(src).exists() and p.exists() and p.resolve() == Path(src).resolve():
            raise InputError("output is the same file as an input; inputs are never modified", p, hint)
        if is_nifti_name(src) and p.resolve() == sidecar_path(src).resolve():
            raise InputError(f"output is the JSON sidecar of the input {Path(src).name}, where a run reads its slices "
                             "from; inputs are never modified", p, hint)


def check_output_path(path: PathLike, overwrite: bool = False, inputs: Sequence[PathLike] = ()) -> Path:
    """:func:`check_output_file` for a NIfTI output (``.nii`` or ``.nii.gz``)."""
    return check_output_file(path, overwrite, inputs, NIFTI_SUFFIXES)


def _check_folder_of(out: Path) -> None:
    """Check a folder that outputs go into: it is a writable folder, or missing where its parent is one (it is then
    created when written)."""
    if out.exists() and not out.is_dir():
        raise InputError("is a file; an output folder is needed", out)
    check_writable_dir(out if out.is_dir() else out.parent,
                       "the output folder" if out.is_dir() else "the output folder's parent")


def check_output_dir(path: PathLike, overwrite: bool = False, markers: Sequence[str] = (),
                     inputs: Sequence[PathLike] = ()) -> Path:
    """Check an output folder before any work: it exists and is writable, or its parent is (it is then created
    when written); it holds none of ``markers`` (earlier outputs) unless ``overwrite``; none of them would be one of
    ``inputs`` or an input's JSON sidecar (:func:`check_output_file`), whatever ``overwrite``."""
    out = Path(path)
    _check_folder_of(out)
    for marker in markers:
        _check_not_an_input(out / marker, inputs, "give another output folder")
    if not overwrite and (existing := [m for m in markers if (out / m).exists()]):
        raise InputError(f"holds outputs already ({', '.join(existing)})", out, "pass --overwrite to replace them")
    return out


def atomic_write(path: PathLike, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``; the temporary file never outlives a
    failure, and the failure itself is what is raised. The temporary name keeps the suffix, so writers that choose
    the format by suffix still work. A missing folder of ``path`` is created first, one level only, as the output
    checks allow (one whose parent is writable: :func:`check_output_file`)."""
    path = Path(path)
    path.parent.mkdir(exist_ok=True)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
    stem = path.name[: len(path.name) - len(suffix)]
    tmp = path.with_name(f".{stem}.partial-{os.getpid()}{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # never hide the real error behind a failed clean-up
            tmp.unlink(missing_ok=True)
        raise


def atomic_dir(folder: PathLike, write: Callable[[Path], Any]) -> Any:
    """Write a folder whole or not at all: ``write(tmp_folder)`` into a hidden temporary folder beside ``folder``,
    then renamed onto it. An existing ``folder`` is first renamed aside (a hidden sibling), and only removed once the
    new one is in place; if putting the new one in place fails, the old one is renamed back. So at every moment one
    whole folder exists, the old or the new (after a hard kill between the two renames, the old one under its hidden
    name). The temporary folder never outlives a failure, and the failure itself is what is raised. Returns what
    ``write`` returns. An old folder left aside by an earlier write that was killed is named in a warning (it is the
    user's to remove once the new one is checked)."""
    folder = Path(folder)
    if stale := sorted(p.name for p in folder.parent.glob(f".{glob.escape(folder.name)}.old-*")):
        warnings.warn(f"an earlier write of {folder} was interrupted and left its old version beside it as "
                      f"{', '.join(stale)}: remove it once {folder.name} is checked", stacklevel=2)
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    aside = folder.with_name(f".{folder.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result = write(tmp)
        moved_aside = folder.exists()
        if moved_aside:
            os.replace(folder, aside)
        try:
            os.replace(tmp, folder)
        except BaseException:
            if moved_aside:
                with contextlib.suppress(OSError):  # never hide the real error; the old folder is kept aside then
                    os.replace(aside, folder)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)  # the new folder is in place: a failed clean-up is no failed write
    return result


def sidecar_path(path: PathLike) -> Path:
    """The ``.json`` beside a NIfTI file (``sr.nii.gz`` → ``sr.json``), where a run records how it was made."""
    p = Path(path)
    return p.with_name(p.name.removesuffix(".gz").removesuffix(".nii") + ".json")


def read_sidecar(path: PathLike | None) -> dict[str, Any]:
    """The JSON object in the sidecar beside a NIfTI file (:func:`sidecar_path`), as dcm2niix and ``gen-sr degrade``
    write it; ``{}`` where there is no such file or ``path`` is not a NIfTI file name (e.g. a description).

    Raises:
        InputError: a sidecar that cannot be read or is not a JSON object (a trailing comma left by a hand edit):
            what it says about the slices would be dropped without a word.
    """
    if path is None or not is_nifti_name(path):
        return {}
    sidecar = sidecar_path(path)
    hint = "correct or remove it, or give what it should say (--slice-thickness, --profile)"
    try:
        value = json.loads(sidecar.read_bytes())  # UTF-8, -16 or -32, with or without a byte-order mark
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise InputError(f"the scan's JSON sidecar cannot be read ({str(e).splitlines()[0]})", sidecar, hint) from e
    if not isinstance(value, dict):
        raise InputError("the scan's JSON sidecar is not a JSON object", sidecar, hint)
    return value


def sidecar_slice_thickness(path: PathLike | None) -> float | None:
    """The slice thickness in mm that the BIDS JSON sidecar beside a NIfTI file records (``SliceThickness``, as
    dcm2niix copies it from the DICOM header, and as ``gen-sr degrade`` writes it), or ``None`` where there is no
    such file or field (:func:`read_sidecar`).

    Raises:
        InputError: a value that is not a positive number of mm.
    """
    value = read_sidecar(path).get("SliceThickness")
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < float("inf"):
        return float(value)
    kind = " (a string: write it as a number)" if isinstance(value, str) else ""
    raise InputError(f"SliceThickness {json.dumps(json_ready(value))[:40]} is not a thickness in mm{kind}",
                     sidecar_path(path),  # type: ignore[arg-type]  (not None: it has a sidecar)
                     "give the run's --slice-thickness, which is used instead, or correct or remove the field")


def slice_sidecar(thickness: float, spacing: float, profile: str | Sequence[float]) -> dict[str, Any]:
    """The entries of a scan's JSON sidecar (:func:`sidecar_path`) that say how its slices were acquired: the BIDS
    ``SliceThickness`` and ``SpacingBetweenSlices`` in mm, and the slice profile under gen_sr's own
    :data:`SLICE_PROFILE_KEY` (``"gaussian"``, ``"rect"`` or samples across the slice), as ``gen-sr degrade`` writes
    them; :func:`sidecar_slice_thickness` and :func:`sidecar_slice_profile` read them back, so that a run on the scan
    takes them where it is not given them."""
    return {"SliceThickness": thickness, "SpacingBetweenSlices": spacing,
            SLICE_PROFILE_KEY: profile if isinstance(profile, str) else list(profile)}


MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin")
"""The files of a model folder that loading it reads (configs, card, calibration, weights): :func:`model_digests`."""


def model_digests(folder: PathLike) -> dict[str, str]:
    """The SHA-256 (first 16 hex digits) of each file of a model folder that loading it reads
    (:data:`MODEL_FILE_SUFFIXES`; not its README or hidden files), by relative path: whether a model folder is still
    the one an earlier run used, and which file changed."""
    root = Path(folder)
    digests = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        digests[relative.as_posix()] = file_sha256(path)[:16]
    return digests


def file_sha256(path: PathLike) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sidecar_slice_profile(path: PathLike | None) -> str | tuple[float, ...] | None:
    """The slice profile that the JSON sidecar beside a NIfTI file records under :data:`SLICE_PROFILE_KEY` (gen_sr's own
    key, which ``gen-sr degrade`` writes): ``"gaussian"``, ``"rect"`` or a tuple of samples, as it is written (whether
    samples make a profile is the acquisition's to check: :class:`~gen_sr.physics.SliceAcquisition`); ``None`` where
    there is no such file or field (:func:`read_sidecar`).

    Raises:
        InputError: the field holds anything else (a misspelt name, a dict). A wrong profile would change the fit
            without a word, so the sidecar is named rather than passed over; a profile given to the run
            (``--profile``) is used instead of it, and the sidecar then not read.
    """
    value = read_sidecar(path).get(SLICE_PROFILE_KEY)
    if value is None or value in ("gaussian", "rect"):
        return value
    if isinstance(value, list) and value and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        return tuple(float(v) for v in value)
    raise sidecar_profile_error(path, value, "expected gaussian, rect or a list of profile samples")


def sidecar_profile_error(path: PathLike | None, value: Any, problem: str) -> InputError:
    """The error for a :data:`SLICE_PROFILE_KEY` value of the sidecar beside ``path`` that is not a slice profile."""
    return InputError(f"{SLICE_PROFILE_KEY} {json.dumps(json_ready(value))[:60]} is not a slice profile: {problem}",
                      sidecar_path(path),  # type: ignore[arg-type]  (not None: it has a sidecar)
                      "give the run's --profile, which is used instead, or correct or remove the field")


def json_ready(value: Any) -> Any:
    """A strict-JSON version of ``value``: numpy to Python, NaN and ±inf to ``None``, tuples to lists, keys to
    strings, anything else unknown to its string."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [json_ready(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    return value if value is None or isinstance(value, bool | int | str) else str(value)


def write_json(path: PathLike, payload: Any) -> None:
    """Write ``payload`` as indented strict JSON (see :func:`json_ready`), atomically."""
    text = json.dumps(json_ready(payload), indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))
