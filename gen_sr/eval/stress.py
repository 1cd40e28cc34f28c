"""Hallucination stress test: insert synthetic lesions into HR volumes, degrade, super-resolve, and measure.

Sites are ellipsoids defined in world mm (semi-axes along the world x, y, z axes), so anisotropic voxels and oblique
affines are handled through the affine. Edges are *hard*: a voxel belongs to a site when its centre lies inside the
ellipsoid, which makes "where and how big" exactly testable. Three kinds of site, all of the same sizes:

* ``added``: a lesion of known contrast, added uniformly inside the ellipsoid;
* ``removed``: an existing local structure (the strongest difference-of-Gaussians response at that size) replaced by
  a smooth fill: the neighbourhood blurred with a Gaussian of sigma = the largest semi-axis, excluding the site itself
  (normalised convolution). Its ``contrast`` is the mean change inside;
* ``control``: nothing changes; these measure false structure.

Measurements, on numpy arrays on the HR grid (SR mean, risk, the true HR with lesions):

* site contrast ``c(img)`` = mean inside the ellipsoid − mean in the shell around it (semi-axes grown by
  ``shell_mm``); the shells of different sites never overlap other sites (``min_distance_mm >= shell_mm``);
* ``recovered`` = ``1 + (c(SR) − c(truth)) / contrast``: 1 when the SR reproduces the change, 0 when it shows the
  site as it was before the change (the lesion-free volume, or the removed structure back);
* **erasure**: fraction of added lesions with ``recovered < erasure_threshold`` (0.5); **restored**: the same for
  removed sites (the removed structure reappeared);
* **false structure**: fraction of control sites with ``|c(SR) − c(truth)| > false_threshold × reference`` (0.5), the
  reference being the inserted lesion contrast;
* **what the slices alone carry** (``data_alone``, added lesions, given the acquisition operator ``A``): the
  ``recovered`` of the image that knows everything but the lesion exactly and the lesion only through its own
  measurements, at minimum norm (``A⁺A δ``, ``δ`` the lesion): the contrast the acquisition lets through before any
  prior. ``recovered`` well above it: the model restored some of what the slices lost; well below it: the model
  took away some of what they carry ("well": beyond the model's error around a site without a lesion, which the
  control sites' ``relative_deviation`` measures);
* **flagging**: the voxel AUROC of risk for ``|SR − truth| > tau`` inside the foreground, and per-lesion recall:
  *recovered* (``recovered >= erasure_threshold``) and *recovered or flagged* (or mean risk inside the ellipsoid
  ``>= risk_threshold``). Lesions count as *above* the slice thickness when their extent along the slice normal
  exceeds it, else *below*.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from nibabel.affines import apply_affine
from scipy import ndimage
from tqdm.auto import tqdm

from gen_sr.eval.baselines import baseline
from gen_sr.eval.cases import SRModel, simulate_case, super_resolve
from gen_sr.eval.metrics import foreground
from gen_sr.eval.tables import markdown_rows, write_table_files
from gen_sr.eval.uncertainty import auroc
from gen_sr.io import atomic_write
from gen_sr.physics import AcquisitionOperator, SliceProfile
from gen_sr.volume import IntensityNormalization, Volume, load_volume

__all__ = ["Lesion", "erasure_rate", "false_structure_rate", "flagging", "insert_lesions",
           "measure_sites", "run_stress_test", "summarize_sites"]

Kind = Literal["added", "removed", "control"]
COLUMNS = ("group", "size_class", "n_added", "erasure", "recall_recovered", "recall_recovered_or_flagged",
           "mean_recovered", "mean_data_alone", "n_controls", "false_structure", "n_removed", "restored")


@dataclass(frozen=True)
class Lesion:
    """One stress-test site: a hard-edged ellipsoid in world coordinates.

    Attributes:
        kind: ``"added"``, ``"removed"`` or ``"control"``.
        centre_index: voxel index of the centre (a voxel centre).
        centre_mm: world position of the centre (mm).
        semi_axes_mm: semi-axes along the world x, y, z axes (mm).
        contrast: the true change inside, in the volume's intensity units: exact for ``added``, the mean change for
            ``removed``, 0 for ``control``.
    """

    kind: Kind
    centre_index: tuple[int, int, int]
    centre_mm: tuple[float, float, float]
    semi_axes_mm: tuple[float, float, float]
    contrast: float = 0.0

    @property
    def label(self) -> str:
        """The nominal size: ``"6 mm"`` for a sphere, ``"2x2x6 mm"`` (diameters) for an ellipsoid."""
        d = [2 * s for s in self.semi_axes_mm]
        return (f"{d[0]:g}" if len(set(d)) == 1 else "x".join(f"{v:g}" for v in d)) + " mm"

    @property
    def volume_mm3(self) -> float:
        return 4.0 / 3.0 * math.pi * math.prod(self.semi_axes_mm)

    def extent_mm(self, direction: Sequence[float] | None = None) -> float:
        """Full extent along a world direction (default: the largest diameter)."""
        semi = np.asarray(self.semi_axes_mm)
        if direction is None:
            return float(2 * semi.max())
        u = np.asarray(direction, dtype=np.float64)
        return float(2 * np.linalg.norm(semi * u / np.linalg.norm(u)))

    def mask(self, affine: np.ndarray, shape: Sequence[int], grow_mm: float = 0.0) -> np.ndarray:
        """``(X, Y, Z)`` boolean mask of the voxel centres inside the ellipsoid (semi-axes grown by ``grow_mm``)."""
        semi = np.asarray(self.semi_axes_mm) + grow_mm
        inv = np.linalg.inv(affine)
        centre = apply_affine(inv, np.asarray(self.centre_mm))
        half = np.linalg.norm(inv[:3, :3] * semi, axis=1)  # the ellipsoid's half-width along each index axis
        lo = np.clip(np.floor(centre - half).astype(int), 0, shape)
        hi = np.clip(np.ceil(centre + half).astype(int) + 1, 0, shape)
        idx = np.stack(np.meshgrid(*map(np.arange, lo, hi), indexing="ij"), axis=-1)
        world = apply_affine(affine, idx)
        out = np.zeros(tuple(shape), dtype=bool)
        out[tuple(map(slice, lo, hi))] = (((world - self.centre_mm) / semi) ** 2).sum(axis=-1) <= 1 + 1e-9
        return out


def _site_region(data: np.ndarray) -> np.ndarray:
    """Where sites go and risk is scored: the :func:`~gen_sr.eval.metrics.foreground`, lightly smoothed, with its
    holes kept (no lesion in a ventricle)."""
    return foreground(data, smooth=1.0, fill_holes=False)


def _semi_axes(diameter: float | Sequence[float]) -> tuple[float, float, float]:
    d = np.broadcast_to(np.asarray(diameter, dtype=np.float64), (3,))
    return tuple(float(v) / 2 for v in d)  # type: ignore[return-value]


def _smooth_fill(data: np.ndarray, inside: np.ndarray, sigma_vox: np.ndarray) -> np.ndarray:
    """The neighbourhood of ``inside``, blurred without it (normalised convolution): the values to put there."""
    outside = (~inside).astype(np.float64)
    num = ndimage.gaussian_filter(data * outside, sigma_vox)
    return num[inside] / np.maximum(ndimage.gaussian_filter(outside, sigma_vox)[inside], 1e-12)


def insert_lesions(volume: Volume, *, diameters_mm: Sequence[float | Sequence[float]] = (2.0, 6.0),
                   contrast: float = 0.3, n_per_size: int = 2, controls: int | None = None, removed: int = 0,
                   mask: np.ndarray | None = None, seed: int = 0, min_distance_mm: float | None = None,
                   shell_mm: float = 2.0) -> tuple[Volume, list[Lesion]]:
    """Place non-overlapping hard-edged ellipsoids inside the foreground and change the volume there.

    Centres are voxel centres drawn (seeded) so that each ellipsoid *and* its measurement shell lie inside ``mask``
    (exact for affines with orthogonal columns), with surfaces at least ``min_distance_mm`` apart. Larger sizes are
    placed first; per size: ``removed`` removal sites (the strongest local structures), ``n_per_size`` added lesions,
    ``controls`` control sites.

    Args:
        volume: the HR volume ``(X, Y, Z)``.
        diameters_mm: sizes: a diameter (sphere) or three diameters along world x, y, z (ellipsoid).
        contrast: added intensity, signed, as a fraction of the volume's robust (0.5-99.5 %) intensity range.
        n_per_size, controls, removed: sites per size of each kind (``controls`` defaults to ``n_per_size``).
        mask: ``(X, Y, Z)`` boolean foreground; default: :func:`_site_region`.
        seed: placement seed; the result is deterministic.
        min_distance_mm: gap between site surfaces (default ``shell_mm``, so no shell touches another site).
        shell_mm: thickness of the measurement shell around each site.

    Returns:
        The changed volume (float) and the site records (:class:`Lesion`, contrast in intensity units).

    Raises:
        ValueError: when a site does not fit.
    """
    data = volume.data.astype(np.result_type(volume.data.dtype, np.float32), copy=True)
    scale = IntensityNormalization.fit(volume.data).scale
    fg = _site_region(volume.data) if mask is None else np.asarray(mask, dtype=bool)
    spacing = np.asarray(volume.spacing)
    depth = ndimage.distance_transform_edt(np.pad(fg, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    gap = shell_mm if min_distance_mm is None else min_distance_mm
    rng = np.random.default_rng(seed)
    placed: list[tuple[np.ndarray, float]] = []
    lesions: list[Lesion] = []
    for semi in sorted(map(_semi_axes, diameters_mm), key=max, reverse=True):
        r = max(semi)
        idx = np.argwhere(depth > (r + shell_mm) * (1 + 1e-6))
        world = apply_affine(volume.affine, idx)
        free = np.ones(len(idx), dtype=bool)
        for c, rc in placed:
            free &= np.linalg.norm(world - c, axis=1) >= r + rc + gap
        if removed:  # local structure at this scale: |difference of Gaussians|
            dog = ndimage.gaussian_filter(data, r / 2 / spacing) - ndimage.gaussian_filter(data, 2 * r / spacing)
            score = np.abs(dog)[tuple(idx.T)]
        for kind, n in (("removed", removed), ("added", n_per_size), ("control", n_per_size if controls is None
                                                                               else controls)):
            for _ in range(n):
                options = np.flatnonzero(free)
                if not options.size:
                    raise ValueError(f"no room for another {2 * r:g} mm {kind} site in {volume.source or 'volume'}")
                j = options[np.argmax(score[options])] if kind == "removed" else rng.choice(options)
                free &= np.linalg.norm(world - world[j], axis=1) >= 2 * r + gap
                placed.append((world[j], r))
                site = Lesion(kind, tuple(map(int, idx[j])), tuple(map(float, world[j])), semi)  # type: ignore[arg-type]
                inside = site.mask(volume.affine, volume.shape)
                change = 0.0
                if kind == "added":
                    change = contrast * scale
                    data[inside] += change
                elif kind == "removed":
                    fill = _smooth_fill(data, inside, r / spacing)
                    change = float(np.mean(fill - data[inside]))
                    data[inside] = fill
                lesions.append(replace(site, contrast=float(change)))
    return volume.with_data(data), lesions


def measure_sites(sr: np.ndarray, truth: np.ndarray, lesions: Sequence[Lesion], affine: np.ndarray, *,
                  risk: np.ndarray | None = None, shell_mm: float = 2.0, reference_contrast: float | None = None,
                  slice_direction: Sequence[float] | None = None,
                  operator: AcquisitionOperator | None = None) -> list[dict[str, Any]]:
    """Per-site contrasts of the SR mean against the truth (see the module docstring for the definitions).

    Args:
        sr, truth, risk: ``(X, Y, Z)`` arrays on the grid of ``affine`` (the SR mean, the HR with lesions, the risk).
        lesions: the sites.
        shell_mm: shell thickness around each site.
        reference_contrast: the contrast false structure is measured against (default: the largest ``|contrast|``
            of the added lesions).
        slice_direction: world direction of the slice normal, for ``extent_mm`` (default: the largest diameter).
        operator: the acquisition on this grid (``A``, ``operator.hr_shape == truth.shape``), for ``data_alone``.

    Returns:
        One dict per site: kind, label, extent_mm, contrast, true_contrast, sr_contrast, recovered (nan for
        controls), data_alone (added lesions with ``operator``, else nan), relative_deviation
        ``(c(SR) − c(truth)) / reference``, mean_risk (nan without ``risk``).
    """
    added = [abs(les.contrast) for les in lesions if les.kind == "added"]
    ref = reference_contrast if reference_contrast is not None else (max(added) if added else math.nan)
    sr, truth = np.asarray(sr, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    records = []
    for les in lesions:
        inside = les.mask(affine, truth.shape)
        shell = les.mask(affine, truth.shape, shell_mm) & ~inside
        c_true, c_sr = (float(a[inside].mean() - a[shell].mean()) for a in (truth, sr))
        data_alone = math.nan
        if operator is not None and les.kind == "added":  # c(A⁺A δ) / contrast = c(A⁺A 1_inside): c is linear
            unit = torch.from_numpy(inside.astype(np.float64))[None, None]
            kept = operator.pinv(operator(unit))[0, 0].numpy()
            data_alone = float(kept[inside].mean() - kept[shell].mean())
        records.append({
            "kind": les.kind, "label": les.label, "extent_mm": les.extent_mm(slice_direction),
            "centre_index": list(les.centre_index), "centre_mm": list(les.centre_mm), "contrast": les.contrast,
            "true_contrast": c_true, "sr_contrast": c_sr,
            "recovered": 1 + (c_sr - c_true) / les.contrast if les.contrast != 0 else math.nan,
            "data_alone": data_alone,
            "relative_deviation": (c_sr - c_true) / ref,
            "mean_risk": float(np.mean(risk[inside])) if risk is not None else math.nan})
    return records


def _rate(values: Any) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()) if values.size else math.nan


def summarize_sites(sites: Sequence[dict[str, Any]], *, thickness_mm: float, risk_threshold: float = math.inf,
                    erasure_threshold: float = 0.5, false_threshold: float = 0.5) -> dict[str, dict[str, Any]]:
    """Erasure, recall, false structure and restoration per size (``label``), per size class (``"below"``,
    ``"above"`` the slice thickness) and over ``"all"`` sites (records from :func:`measure_sites`)."""

    def stats(group: list[dict[str, Any]], size_class: str) -> dict[str, Any]:
        by = {k: [s for s in group if s["kind"] == k] for k in ("added", "removed", "control")}
        rec = np.array([s["recovered"] for s in by["added"]])
        flagged = np.array([s["mean_risk"] >= risk_threshold for s in by["added"]], dtype=bool)
        return {"size_class": size_class, "n_added": len(rec), "erasure": _rate(rec < erasure_threshold),
                "recall_recovered": _rate(rec >= erasure_threshold),
                "recall_recovered_or_flagged": _rate((rec >= erasure_threshold) | flagged),
                "mean_recovered": _rate(rec), "mean_data_alone": _rate([s["data_alone"] for s in by["added"]]),
                "n_controls": len(by["control"]),
                "false_structure": _rate([abs(s["relative_deviation"]) > false_threshold for s in by["control"]]),
                "n_removed": len(by["removed"]),
                "restored": _rate([s["recovered"] < erasure_threshold for s in by["removed"]])}

    def size_class(s: dict[str, Any]) -> str:
        return "above" if s["extent_mm"] > thickness_mm else "below"

    out, sizes = {}, {s["label"]: s["extent_mm"] for s in sites}
    for label in sorted(sizes, key=sizes.__getitem__):
        group = [s for s in sites if s["label"] == label]
        out[label] = stats(group, "/".join(sorted({size_class(s) for s in group})))
    for name in ("below", "above"):
        out[name] = stats([s for s in sites if size_class(s) == name], name)
    out["all"] = stats(list(sites), "all")
    return out


def erasure_rate(sr: np.ndarray, truth: np.ndarray, lesions: Sequence[Lesion], affine: np.ndarray, *,
                 threshold: float = 0.5, shell_mm: float = 2.0) -> float:
    """Fraction of added lesions with ``recovered < threshold``; arrays ``(X, Y, Z)`` on the grid of ``affine``."""
    sites = measure_sites(sr, truth, lesions, affine, shell_mm=shell_mm)
    return summarize_sites(sites, thickness_mm=0.0, erasure_threshold=threshold)["all"]["erasure"]


def false_structure_rate(sr: np.ndarray, truth: np.ndarray, lesions: Sequence[Lesion], affine: np.ndarray, *,
                         reference_contrast: float | None = None, threshold: float = 0.5,
                         shell_mm: float = 2.0) -> float:
    """Fraction of control sites with ``|c(SR) − c(truth)| > threshold × reference_contrast``."""
    sites = measure_sites(sr, truth, lesions, affine, shell_mm=shell_mm, reference_contrast=reference_contrast)
    return summarize_sites(sites, thickness_mm=0.0, false_threshold=threshold)["all"]["false_structure"]


def flagging(sr: np.ndarray, risk: np.ndarray, truth: np.ndarray, lesions: Sequence[Lesion], affine: np.ndarray,
             *, tau: float, risk_threshold: float, thickness_mm: float, mask: np.ndarray | None = None,
             slice_direction: Sequence[float] | None = None, erasure_threshold: float = 0.5,
             shell_mm: float = 2.0) -> dict[str, float]:
    """How well ``risk`` marks the wrong places: voxel AUROC of ``risk`` for ``|sr − truth| > tau`` (inside
    ``mask``), and the recall of the added lesions above the slice thickness, recovered / recovered or flagged."""
    sites = measure_sites(sr, truth, lesions, affine, risk=risk, shell_mm=shell_mm, slice_direction=slice_direction)
    above = summarize_sites(sites, thickness_mm=thickness_mm, risk_threshold=risk_threshold,
                            erasure_threshold=erasure_threshold)["above"]
    return {"auroc": auroc(risk, np.abs(np.asarray(sr, np.float64) - truth) > tau, mask), "n_lesions": above["n_added"],
            "recall_recovered": above["recall_recovered"],
            "recall_recovered_or_flagged": above["recall_recovered_or_flagged"]}


def _figure(path: Path, images: Sequence[np.ndarray], truth: Volume, lesions: Sequence[Lesion], axis: int,
            n: int) -> None:
    """HR / LR / SR / risk crops through the centres of up to ``n`` sites (one per kind and size), slice axis up."""
    from matplotlib.figure import Figure

    first: dict[tuple[str, str], Lesion] = {}
    for les in lesions:
        first.setdefault((les.kind, les.label), les)
    picks = sorted(first.values(), key=lambda les: ("added", "control", "removed").index(les.kind))[:n]
    other = next(a for a in range(3) if a != axis)
    spacing = truth.spacing
    lo, hi = np.percentile(truth.data, [0.5, 99.5])
    fig = Figure(figsize=(8, 2.2 * len(picks) + 0.4), layout="constrained")
    for row, les in zip(fig.subplots(len(picks), 4, squeeze=False), picks, strict=True):
        h = max(6, math.ceil(1.5 * les.extent_mm() / min(spacing)))
        c = les.centre_index
        box = tuple(c[a] if a not in (axis, other) else slice(max(c[a] - h, 0), c[a] + h + 1) for a in range(3))
        for ax, img, title in zip(row, images, ("HR", "LR", "SR mean", "risk"), strict=True):
            crop = img[box].T if other < axis else img[box]
            limits = {"vmin": lo, "vmax": hi} if title != "risk" else {"vmin": 0}
            ax.imshow(crop, cmap="gray" if title != "risk" else "magma", origin="lower",
                      aspect=spacing[axis] / spacing[other], **limits)
            ax.set_title(f"{title}: {les.kind} {les.label}", fontsize=7)
            ax.set_axis_off()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def _write_reports(result: dict[str, Any], out: Path) -> None:
    rows = [{"group": name, **stats} for name, stats in result["summary"].items()]
    s = result["settings"]
    md = [f"# Hallucination stress test\n\n{s['n_volumes']} volume(s), {s['thickness_mm']:g} mm slices, SNR "
          f"{s['snr']}, {s['num_samples']} samples, {s['num_inference_steps']} steps of {s['scheduler']}, lesion "
          f"contrast {s['contrast']:g} of the robust intensity range. Voxel AUROC of risk for |error| > "
          f"{s['tau']:g} of the range: **{_cell(result['auroc'])}**. `mean_data_alone`: what the slices alone carry "
          "of the added lesions (the recovered contrast of the minimum-norm image of each lesion from its own "
          "measurements, A⁺Aδ), beside the model's `mean_recovered`. Definitions: `gen_sr/eval/stress.py`.\n",
          markdown_rows(COLUMNS, [[_cell(r[c]) for c in COLUMNS] for r in rows])]
    write_table_files(out, "stress_test", "\n".join(md), [{c: _cell(r[c]) for c in COLUMNS} for r in rows],
                      result, COLUMNS)


def run_stress_test(pipe: SRModel, hr_volumes: Sequence[Volume | str | Path], *, thickness_mm: float = 4.0,
                    snr: float | None = None, num_samples: int = 4,
                    num_inference_steps: int | None = None, seed: int = 0, output_dir: str | Path | None = None,
                    diameters_mm: Sequence[float | Sequence[float]] | None = None, contrast: float = 0.3,
                    n_per_size: int = 2, removed: int = 1, shell_mm: float = 2.0, tau: float | None = None,
                    risk_threshold: float | None = None, erasure_threshold: float = 0.5, false_threshold: float = 0.5,
                    profile: SliceProfile = "gaussian", n_figure: int = 4, progress: bool = True,
                    **pipe_kwargs: Any) -> dict[str, Any]:
    """Insert lesions, simulate the LR acquisition, super-resolve, measure, and aggregate over volumes.

    Args:
        pipe: a :class:`~gen_sr.pipelines.LatentDiffusionSRPipeline`.
        hr_volumes: HR volumes or NIfTI paths; they are processed in RAS+ orientation, sliced along the model's
            super-resolved axis, and super-resolved with the exact acquisition operator, so the SR output lies on
            the HR grid voxel for voxel (see :mod:`gen_sr.eval.evaluate`).
        thickness_mm, profile: the slices (spacing = thickness).
        snr: noise of the simulated acquisition (``None``: noise-free); the pipeline gets the matching ``noise_std``.
        num_samples, num_inference_steps, seed: sampling (``generator=torch.Generator().manual_seed(seed)``; the
            steps ``None``: the model folder's default, recorded in the settings with the sampler);
            volume ``i`` uses insertion and noise seed ``seed + i``.
        output_dir: where ``stress_test.{md,csv,json}`` and ``stress_test.png`` go (``None``: nothing written).
        diameters_mm, contrast, n_per_size, removed, shell_mm: see :func:`insert_lesions` (default diameters: half
            and 1.5 times the slice thickness, one below and one above it).
        tau: error threshold of the AUROC, as a fraction of each HR volume's robust intensity range (default: half
            of ``|contrast|``).
        risk_threshold: mean risk above which a lesion counts as flagged, in the pipeline's risk units (a fraction
            of the LR's robust intensity range while uncalibrated; default: half of ``|contrast|``).
        erasure_threshold, false_threshold: see :func:`summarize_sites`.
        n_figure: sites shown in the figure (from the first volume).
        progress: show a progress bar over volumes.
        **pipe_kwargs: passed to the pipeline call.

    Returns:
        ``{"settings", "summary" (per group, see summarize_sites), "auroc" (pooled voxels), "volumes", "sites"}``.
    """
    hr_volumes = list(hr_volumes)
    if not hr_volumes:
        raise ValueError("the stress test needs at least one HR volume")
    diameters_mm = diameters_mm or (thickness_mm / 2, 1.5 * thickness_mm)
    tau = 0.5 * abs(contrast) if tau is None else tau
    risk_threshold = 0.5 * abs(contrast) if risk_threshold is None else risk_threshold
    sites: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    scores, labels, figure, sampling = [], [], None, {}
    ax = pipe.sr_axis  # everything runs in RAS+ orientation, where the model's axis is counted
    for i, item in enumerate(tqdm(hr_volumes, desc="stress test", disable=not progress)):
        hr = (load_volume(item) if isinstance(item, str | Path) else item).canonical()
        scale = IntensityNormalization.fit(hr.data).scale
        truth, lesions = insert_lesions(hr, diameters_mm=diameters_mm, contrast=contrast, n_per_size=n_per_size,
                                        removed=removed, seed=seed + i, shell_mm=shell_mm)
        case = simulate_case(truth, hr.source or f"volume {i}", axis=ax, thickness=thickness_mm, profile=profile,
                             snr=snr, seed=seed + i)
        sigma = case.noise_std
        out = super_resolve(pipe, case, num_samples=num_samples, num_inference_steps=num_inference_steps,
                            generator=torch.Generator().manual_seed(seed),
                            **{"keep_samples": False, **pipe_kwargs, "output_type": "np"})
        sr, risk = np.asarray(out.mean, np.float64), np.asarray(out.risk, np.float64)
        run = out.record
        sampling = {"scheduler": run.scheduler, "num_inference_steps": run.num_inference_steps}
        fg = _site_region(truth.data)
        wrong = np.abs(sr - truth.data) > tau * scale
        scores.append(risk[fg])
        labels.append(wrong[fg])
        measured = measure_sites(sr, truth.data, lesions, truth.affine, risk=risk, shell_mm=shell_mm,
                                 slice_direction=truth.affine[:3, ax], operator=case.operator)
        sites += [{"volume": i, **s} for s in measured]
        volumes.append({"source": hr.source or f"volume {i}", "shape": list(truth.shape), "intensity_range": scale,
                        "auroc": auroc(risk, wrong, fg), "noise_std": sigma,
                        "relative_residual": list(run.relative_residual)})
        if figure is None:
            figure = ((truth.data, baseline(case, "trilinear"), sr, risk), truth, lesions, ax)
    settings = {"n_volumes": len(volumes), "thickness_mm": thickness_mm, "axis": ax, "snr": snr,
                "num_samples": num_samples, **sampling, "seed": seed,
                "diameters_mm": [np.broadcast_to(d, (3,)).astype(float).tolist() for d in diameters_mm],
                "contrast": contrast, "n_per_size": n_per_size, "removed": removed, "shell_mm": shell_mm, "tau": tau,
                "risk_threshold": risk_threshold, "erasure_threshold": erasure_threshold,
                "false_threshold": false_threshold, "profile": profile}
    result = {"settings": settings, "auroc": auroc(np.concatenate(scores), np.concatenate(labels)),
              "summary": summarize_sites(sites, thickness_mm=thickness_mm, risk_threshold=risk_threshold,
                                         erasure_threshold=erasure_threshold, false_threshold=false_threshold),
              "volumes": volumes, "sites": sites}
    if output_dir is not None:
        out_dir = Path(output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_reports(result, out_dir)
        if figure is not None:
            _figure(out_dir / "stress_test.png", *figure, n=n_figure)
    return result
