"""The figures of the hallucination-audit report, each a PNG data URI (matplotlib's object API, no pyplot state):
orthogonal views of every map with its unit on the colour bar, the per-slice risk profile and the calibration
plot."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from nibabel.affines import apply_affine

from gen_sr.audit.summary import DISAGREEMENT_STAGES, INTENSITY_UNIT, DisagreementStage
from gen_sr.volume import Volume

__all__ = ["INTENSITY_UNIT", "RISK_UNIT", "FigureRecord", "calibration_plot", "orthogonal_views", "png_uri",
           "profile_plot", "translucent", "view_row", "window"]

RISK_UNIT = "fraction of the input's robust intensity range"
_PLANES = (("sagittal", 0, (1, 2)), ("coronal", 1, (0, 2)), ("axial", 2, (0, 1)))  # (name, fixed axis, shown axes)
_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))  # RAS+ voxel axes: low end, high end

Layer = tuple[np.ndarray, dict[str, Any]]  # a canonical array and its imshow options


class FigureRecord(TypedDict):
    """One figure of the report: an id, a title and the PNG data URI."""

    id: str
    title: str
    uri: str


def png_uri(fig: Figure) -> str:
    """``fig`` as a base64 PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def window(a: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> tuple[float, float]:
    """A display window: the ``lo`` and ``hi`` percentiles of ``a`` (never empty)."""
    vmin, vmax = (float(v) for v in np.percentile(a, [lo, hi]))
    return vmin, vmax if vmax > vmin else vmin + 1e-6


def saturated(data: np.ndarray, opts: Mapping[str, Any]) -> str:
    """Which ends of a layer's colour scale (``vmin``, ``vmax`` of ``opts``) its ``data`` runs past, as a colour
    bar's ``extend``: ``"max"``, ``"min"``, ``"both"`` or ``"neither"`` (the bar then shows an arrow there)."""
    above = "vmax" in opts and float(np.nanmax(data)) > opts["vmax"]
    below = "vmin" in opts and float(np.nanmin(data)) < opts["vmin"]
    return {(True, True): "both", (True, False): "max", (False, True): "min"}.get((above, below), "neither")


def translucent(name: str, opaque_at: float) -> ListedColormap:
    """Colormap ``name`` with opacity rising from 0 at the bottom to 0.85 at the fraction ``opaque_at`` of the
    scale."""
    colours = colormaps[name](np.linspace(0, 1, 256))
    colours[:, 3] = np.minimum(0.85 * np.linspace(0, 1, 256) / opaque_at, 0.85)
    return ListedColormap(colours, name=f"{name}_translucent")


def view_row(volume: Volume, centre: np.ndarray, layers: Sequence[Layer], label: str,
             contour: float | None = None) -> str:
    """Three orthogonal planes through ``centre`` (a voxel index of the RAS+ ``volume``) of stacked ``layers``, a
    colour bar labelled ``label`` for the last layer, and a contour of the last layer at ``contour``. Each plane's
    title gives the world (scanner, RAS+) coordinate it is fixed at. Returns a PNG data URI."""
    fig = Figure(figsize=(10, 3.3), dpi=110, layout="constrained")
    axes = fig.subplots(1, 3)
    sp, world = volume.spacing, apply_affine(volume.affine, centre)
    for ax, (name, axis, (a, b)) in zip(axes, _PLANES, strict=True):
        for data, opts in layers:
            cut = np.take(data, int(centre[axis]), axis=axis).T
            im = ax.imshow(cut, origin="lower", aspect=sp[b] / sp[a], interpolation="nearest", **opts)
        if contour is not None and cut.min() < contour < cut.max():
            ax.contour(cut, levels=[contour], colors="#00bcd4", linewidths=0.8)
        ax.axvline(centre[a], color="#4fc3f7", lw=0.5, ls=":", alpha=0.8)
        ax.axhline(centre[b], color="#4fc3f7", lw=0.5, ls=":", alpha=0.8)
        for x, y, text in ((0.02, 0.5, _LETTERS[a][0]), (0.98, 0.5, _LETTERS[a][1]), (0.5, 0.97, _LETTERS[b][1])):
            ax.text(x, y, text, transform=ax.transAxes, color="#ffeb3b", fontsize=8, ha="center", va="center")
        ax.set_title(f"{name} · {'xyz'[axis]} = {world[axis]:.1f} mm", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    extend = saturated(*layers[-1])
    bar = fig.colorbar(im, ax=axes, shrink=0.85, pad=0.01, extend=extend)
    peak = float(np.nanmax(layers[-1][0]))
    bar.set_label(label + (f" (up to {peak:.3g})" if extend in ("max", "both") else ""), fontsize=8)
    if contour is not None:
        bar.ax.axhline(contour, color="#00bcd4", lw=1.5)
    return png_uri(fig)


def orthogonal_views(maps: Mapping[str, Volume], centre: np.ndarray, threshold: float,
                     disagreement_threshold: float | None = None,
                     disagreement_stage: DisagreementStage = "output") -> list[FigureRecord]:
    """One row of orthogonal views per map, all RAS+ (canonical) on one grid, through voxel ``centre``.

    ``maps`` holds ``lr``, ``mean``, ``std``, ``risk`` and ``dc`` and, optionally, ``disagreement`` and
    ``reference``; the risk is drawn over the SR mean, opaque from ``threshold`` up, with a contour there, and the
    data disagreement likewise from ``disagreement_threshold``, its caption saying what it is of
    (``disagreement_stage``: :data:`~gen_sr.audit.summary.DISAGREEMENT_STAGES`).
    """
    data = {k: np.asarray(v.data) for k, v in maps.items()}
    grid = maps["mean"]
    gray = {"cmap": "gray", **dict(zip(("vmin", "vmax"), window(data["mean"]), strict=True))}

    def spread(a: np.ndarray, cmap: str) -> Layer:
        return a, {"cmap": cmap, "vmin": 0, "vmax": window(a)[1]}

    def over_mean(a: np.ndarray, level: float, cmap: str) -> list[Layer]:
        top = max(2 * level, float(np.percentile(a, 99.9)))
        return [(data["mean"], gray), (a, {"cmap": translucent(cmap, level / top), "vmin": 0, "vmax": top})]

    rows: list[tuple[str, str, list[Layer], str, float | None]] = [
        ("lr", "LR input (linear resampling onto the SR grid)", [(data["lr"], gray)],
         f"intensity ({INTENSITY_UNIT})", None),
        ("mean", "SR mean", [(data["mean"], gray)], f"intensity ({INTENSITY_UNIT})", None),
        ("std", "SR standard deviation across samples", [spread(data["std"], "magma")], f"std ({INTENSITY_UNIT})",
         None),
        ("risk", "Hallucination risk over the SR mean",
         over_mean(data["risk"], threshold, "YlOrRd"),
         f"risk, as a {RISK_UNIT.replace(' robust', chr(10) + 'robust')}\n(opaque from the threshold up)", threshold),
        ("dc", "Data-consistency residual |A x − y|", [spread(data["dc"], "viridis")],
         f"|A x − y| ({INTENSITY_UNIT})", None),
    ]
    if "disagreement" in data and disagreement_threshold is not None:
        rows.append(("disagreement", "Data disagreement over the SR mean: the departure from the measured slices "
                     f"beyond their noise, {DISAGREEMENT_STAGES[disagreement_stage]}",
                     over_mean(data["disagreement"], disagreement_threshold, "PuBu"),
                     "local mean of ((A x − y) / σ)²\nover its median (opaque from\nthe flag level up)",
                     disagreement_threshold))
    if "reference" in data:
        err = np.abs(data["mean"] - data["reference"])
        rows += [("reference", "Reference", [(data["reference"], gray)], f"intensity ({INTENSITY_UNIT})", None),
                 ("error", "|SR mean − reference|", [spread(err, "magma")], f"|error| ({INTENSITY_UNIT})", None)]
    return [{"id": f"view_{key}", "title": title, "uri": view_row(grid, centre, layers, label, contour)}
            for key, title, layers, label, contour in rows]


def profile_plot(profile: Mapping[str, Sequence[float]], threshold: float, axis: int, spacing: float) -> str:
    """Mean risk (line) and flagged fraction (bars) per slice; a PNG data URI."""
    fig = Figure(figsize=(10, 3), dpi=110, layout="constrained")
    ax = fig.subplots()
    x = np.asarray(profile["slice"])
    mean = np.asarray(profile["mean_risk"], dtype=float)
    frac = 100 * np.asarray(profile["flagged_fraction"], dtype=float)
    ax2 = ax.twinx()
    ax2.bar(x, frac, width=0.9, color="#ef9a9a", alpha=0.7, label="flagged (% of slice foreground)")
    ax.plot(x, mean, color="#1565c0", marker="o" if len(x) <= 40 else None, ms=3, lw=1.5, label="mean risk")
    ax.axhline(threshold, color="#1565c0", ls="--", lw=0.8, label=f"threshold {threshold:g}")
    ax.set_ylim(0, 1.3 * max(threshold, float(np.nanmax(mean, initial=0))))
    ax2.set_ylim(0, 1.3 * max(5.0, float(np.nanmax(frac, initial=0))))
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.set_xlim(-0.5, len(x) - 0.5)
    ax.set_xlabel(f"slice index along voxel axis {axis} ({spacing:.3g} mm per slice)")
    ax.set_ylabel("mean risk (fraction of the\nrobust intensity range)", fontsize=8)
    ax2.set_ylabel("flagged [%]")
    handles = [h for a in (ax, ax2) for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, fontsize=8, loc="upper right", ncols=3, framealpha=0.9)
    return png_uri(fig)


def calibration_plot(curve: Mapping[str, Any]) -> str:
    """Observed against nominal coverage, with the target ``1 − alpha`` when the curve has one; a PNG data URI."""
    fig = Figure(figsize=(4.2, 4), dpi=110, layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="ideal")
    ax.plot(np.asarray(curve["nominal"], float), np.asarray(curve["observed"], float), marker="o", color="#1565c0",
            label="observed")
    if isinstance(alpha := curve.get("alpha"), int | float):
        ax.axvline(1 - alpha, color="#c62828", lw=0.8, ls=":", label=f"target 1 − α = {1 - alpha:g}")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="nominal coverage", ylabel="observed coverage", aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return png_uri(fig)
