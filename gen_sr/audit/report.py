"""The hallucination-audit report: one self-contained ``report.html`` and the same figures in ``report.json``.

:func:`build_report` takes the results of a super-resolution run as plain data (volumes, the model card, metrics
and a calibration curve computed elsewhere) and writes both files atomically. The HTML embeds every image as a
base64 PNG data URI and uses inline CSS only: no script, no external resource, so it opens offline. Every
user-supplied string (input name, card, mask and metric names) is HTML-escaped. :func:`risk_clusters` finds the
connected high-risk regions and :func:`risk_peaks` the places inside them to look at first. This is a research tool,
not for diagnosis.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from scipy import ndimage

from gen_sr.eval.metrics import foreground
from gen_sr.io import atomic_write, json_ready, write_json
from gen_sr.volume import Volume, resample_to

__all__ = ["build_report", "risk_clusters", "risk_peaks"]

BACKGROUND = "background/other"
DISCLAIMER = ("Research tool, not for diagnosis. The risk map flags where the super-resolved image may differ from the "
              "true anatomy; an unflagged region is not proof that it is correct.")
_PLANES = (("sagittal", 0, (1, 2)), ("coronal", 1, (0, 2)), ("axial", 2, (0, 1)))  # (name, fixed axis, shown axes)
_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))  # RAS+ voxel axes: low end, high end
_HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "nrmse": False, "hfen": False, "mse": False, "rmse": False,
                     "mae": False, "lpips": False}
_UNITS = {"psnr": "dB"}


# ----------------------------------------------------------------------------------------------------- numbers
def _on_grid(volume: Volume, ref: Volume, order: int = 1) -> np.ndarray:
    """``volume``'s voxels on ``ref``'s grid, as float64."""
    return np.asarray(resample_to(volume, ref, order).data, dtype=np.float64)


def risk_clusters(risk: Volume, threshold: float, *, masks: dict[str, Volume] | None = None, top: int | None = 10,
                  min_voxels: int = 1) -> list[dict]:
    """The connected components (26-connectivity) of ``risk > threshold``, highest peak risk first, then largest.

    Args:
        risk: the risk map.
        threshold: voxels strictly above it are high-risk.
        masks: tissue probability maps by class name, e.g. ``{"GM": gm, "WM": wm}``, resampled (linear) onto the
            risk grid when on another grid.
        top: how many clusters to return; ``None`` for all.
        min_voxels: smaller clusters are dropped.

    Returns:
        One dict per cluster: ``rank`` (1-based), ``centroid_mm`` (world position of the unweighted centroid of its
        voxel centres), ``peak_mm`` (world position of its highest-risk voxel), ``size_mm3`` (voxels × voxel volume,
        ``|det|`` of the affine's 3x3), ``voxels``, ``peak_risk``, ``mean_risk``, ``bbox`` (``start``/``stop`` voxel
        indices in ``risk``'s voxel order, stop exclusive), ``tissue`` and ``tissue_mean``. ``tissue`` is the mask
        class with the highest mean probability inside the cluster, or ``"background/other"`` when every class's
        mean is below 0.5; with no masks, ``tissue`` is ``None`` and ``tissue_mean`` empty.
    """
    data = np.asarray(risk.data, dtype=np.float64)
    labels, keep, counts, peaks = _ranked_components(data, threshold, min_voxels)
    if not keep:
        return []
    n = len(counts)
    idx = np.arange(1, n + 1)
    means = ndimage.mean(data, labels, idx)
    centres = np.asarray(ndimage.center_of_mass(labels > 0, labels, idx), dtype=np.float64).reshape(n, 3)
    peak_at = np.asarray(ndimage.maximum_position(data, labels, idx), dtype=np.float64).reshape(n, 3)
    boxes = ndimage.find_objects(labels)
    tissue_means = {name: ndimage.mean(_on_grid(m, risk), labels, idx) for name, m in (masks or {}).items()}
    rot, shift = risk.affine[:3, :3], risk.affine[:3, 3]
    voxel_mm3 = abs(float(np.linalg.det(rot)))
    clusters = []
    for rank, i in enumerate(keep[:top] if top is not None else keep, start=1):
        fractions = {name: float(v[i]) for name, v in tissue_means.items()}
        tissue = _tissue(fractions)
        clusters.append({
            "rank": rank, "centroid_mm": (rot @ centres[i] + shift).tolist(),
            "peak_mm": (rot @ peak_at[i] + shift).tolist(), "size_mm3": float(counts[i]) * voxel_mm3,
            "voxels": int(counts[i]), "peak_risk": float(peaks[i]), "mean_risk": float(means[i]),
            "bbox": {"start": [s.start for s in boxes[i]], "stop": [s.stop for s in boxes[i]]},
            "tissue": tissue, "tissue_mean": fractions,
        })
    return clusters


def risk_peaks(risk: Volume, threshold: float, *, masks: dict[str, Volume] | None = None, top: int = 10,
               min_distance_mm: float = 10.0) -> list[dict]:
    """Where to look inside the clusters: local maxima of ``risk`` above ``threshold``, highest first, each at least
    ``min_distance_mm`` from every higher one kept (as FSL ``cluster`` lists local maxima). One cluster can be a
    whole cortical rim; its peaks still point at places.

    Args:
        risk, threshold, masks: as in :func:`risk_clusters`.
        top: how many peaks to return.
        min_distance_mm: smallest distance between two peaks, in mm.

    Returns:
        One dict per peak: ``rank`` (1-based), ``position_mm``, ``risk``, ``cluster`` (its cluster's rank in
        :func:`risk_clusters` with every cluster kept) and ``tissue`` (as in :func:`risk_clusters`, from the masks'
        values at the peak; ``None`` without masks).
    """
    data = np.asarray(risk.data, dtype=np.float64)
    labels, keep, _, _ = _ranked_components(data, threshold)
    rank_of = {i + 1: rank for rank, i in enumerate(keep, start=1)}  # label -> cluster rank
    local = (data > threshold) & (data == ndimage.maximum_filter(data, size=3, mode="nearest"))
    candidates = np.argwhere(local)
    candidates = candidates[np.argsort(-data[local], kind="stable")]
    world = candidates @ risk.affine[:3, :3].T + risk.affine[:3, 3]
    on_grid = {name: _on_grid(m, risk) for name, m in (masks or {}).items()}
    kept: list[int] = []
    for k in range(len(candidates)):
        if len(kept) == top:
            break
        if not kept or np.min(np.linalg.norm(world[kept] - world[k], axis=1)) >= min_distance_mm:
            kept.append(k)
    peaks = []
    for rank, k in enumerate(kept, start=1):
        voxel = tuple(candidates[k])
        peaks.append({"rank": rank, "position_mm": world[k].tolist(), "risk": float(data[voxel]),
                      "cluster": rank_of.get(int(labels[voxel])),
                      "tissue": _tissue({name: float(m[voxel]) for name, m in on_grid.items()})})
    return peaks


def _ranked_components(data: np.ndarray, threshold: float,
                       min_voxels: int = 1) -> tuple[np.ndarray, list[int], np.ndarray, np.ndarray]:
    """The connected components (26-connectivity) of ``data > threshold``, ranked as :func:`risk_clusters` ranks
    them: ``(labels, keep, counts, peaks)``, where ``keep`` lists component indices (label − 1) with at least
    ``min_voxels`` voxels, highest peak first, then largest, and ``counts``/``peaks`` are per component."""
    labels, n = ndimage.label(data > threshold, structure=np.ones((3, 3, 3), dtype=bool))
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    peaks = np.asarray(ndimage.maximum(data, labels, np.arange(1, n + 1)), dtype=np.float64).reshape(n)
    keep = sorted((i for i in range(n) if counts[i] >= min_voxels), key=lambda i: (-peaks[i], -counts[i]))
    return labels, keep, counts, peaks


def _tissue(fractions: dict[str, float]) -> str | None:
    """The class with the highest mean probability, ``BACKGROUND`` when all are below 0.5, ``None`` without any."""
    if not fractions:
        return None
    tissue = max(fractions, key=fractions.__getitem__)
    return tissue if fractions[tissue] >= 0.5 else BACKGROUND


def _foreground(mean: np.ndarray, masks: dict[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """The voxels that the verdict's percentage counts: the brain (sum of the tissue masks ≥ 0.5) when masks are
    given, else the SR mean above 10 % of its robust (0.5-99.5 percentile) range, holes filled."""
    if masks:
        fg, label = sum(masks.values()) >= 0.5, "brain (tissue masks, summed probability ≥ 0.5)"
    else:
        fg, label = foreground(mean), "foreground (SR mean above 10 % of its robust intensity range)"
    return (fg, label) if fg.any() else (np.ones_like(mean, dtype=bool), "whole volume")


def _profile(risk: np.ndarray, fg: np.ndarray, threshold: float, axis: int) -> dict[str, list]:
    """Mean risk and flagged fraction inside the foreground, per slice along voxel ``axis`` (None: no foreground)."""
    r, f = np.moveaxis(risk, axis, 0), np.moveaxis(fg, axis, 0)
    n = f.reshape(len(f), -1).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (r * f).reshape(len(r), -1).sum(axis=1) / n
        frac = ((r > threshold) & f).reshape(len(r), -1).sum(axis=1) / n
    return {"slice": list(range(len(r))), "mean_risk": mean.tolist(), "flagged_fraction": frac.tolist()}


# ----------------------------------------------------------------------------------------------------- figures
def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _window(a: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> tuple[float, float]:
    vmin, vmax = (float(v) for v in np.percentile(a, [lo, hi]))
    return vmin, vmax if vmax > vmin else vmin + 1e-6


def _view_row(volume: Volume, centre: np.ndarray, layers: list[tuple[np.ndarray, dict]], label: str,
              contour: float | None = None) -> str:
    """Three orthogonal planes through ``centre`` (RAS+ voxel index) of stacked ``layers`` (canonical arrays with
    imshow options), a colour bar for the last layer, and a contour of the last layer at ``contour``. Returns a PNG
    data URI."""
    fig = Figure(figsize=(10, 3.3), dpi=110, layout="constrained")
    axes = fig.subplots(1, 3)
    sp, world = volume.spacing, volume.affine[:3, :3] @ centre + volume.affine[:3, 3]
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
    bar = fig.colorbar(im, ax=axes, shrink=0.85, pad=0.01)
    bar.set_label(label, fontsize=8)
    if contour is not None:
        bar.ax.axhline(contour, color="#00bcd4", lw=1.5)
    return _png(fig)


def _translucent(name: str, opaque_at: float) -> ListedColormap:
    """``name`` with opacity rising from 0 at the bottom to 0.85 at the fraction ``opaque_at`` of the scale."""
    colours = colormaps[name](np.linspace(0, 1, 256))
    colours[:, 3] = np.minimum(0.85 * np.linspace(0, 1, 256) / opaque_at, 0.85)
    return ListedColormap(colours, name=f"{name}_translucent")


def _profile_plot(profile: dict[str, list], threshold: float, axis: int, spacing: float) -> str:
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
    ax.set_ylabel("mean risk")
    ax2.set_ylabel("flagged [%]")
    handles = [h for a in (ax, ax2) for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, fontsize=8, loc="upper right", ncols=3, framealpha=0.9)
    return _png(fig)


def _calibration_plot(curve: dict) -> str:
    fig = Figure(figsize=(4.2, 4), dpi=110, layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="ideal")
    ax.plot(np.asarray(curve["nominal"], float), np.asarray(curve["observed"], float), marker="o", color="#1565c0",
            label="observed")
    if isinstance(curve.get("alpha"), int | float):
        ax.axvline(1 - curve["alpha"], color="#c62828", lw=0.8, ls=":", label=f"target 1 − α = {1 - curve['alpha']:g}")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="nominal coverage", ylabel="observed coverage", aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


# ----------------------------------------------------------------------------------------------------- HTML
def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return {True: "yes", False: "no", None: "—"}[v]
    if isinstance(v, int | float | np.number):
        return "∞" if v == math.inf else "—" if not math.isfinite(v) else f"{v:.4g}"
    return json.dumps(json_ready(v), ensure_ascii=False) if isinstance(v, dict | list | tuple) else str(v)


def _table(header: list[str], rows: list[list[str]], cls: str = "", numeric: range = range(0)) -> str:
    """An HTML table; every cell is escaped here; a cell starting with ``\\x00`` is bold; ``numeric`` columns are
    right-aligned."""
    def cell(tag: str, col: int, text: str) -> str:
        attr = ' class="n"' if col in numeric else ""
        body = html.escape(text.lstrip("\x00"))
        return f"<{tag}{attr}>{f'<b>{body}</b>' if text.startswith(chr(0)) else body}</{tag}>"
    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    names = list(dict.fromkeys(k for row in metrics.values() for k in row))
    best = {}
    for name in names:
        direction = _HIGHER_IS_BETTER.get(name.lower())
        values = [v for row in metrics.values() if isinstance(v := row.get(name), int | float) and math.isfinite(v)]
        if direction is not None and values:
            best[name] = max(values) if direction else min(values)
    header = ["method"] + [f"{n} [{_UNITS[n.lower()]}]" if n.lower() in _UNITS else n for n in names]
    rows = [[method] + [("\x00" if row.get(n) is not None and row.get(n) == best.get(n) else "") + _fmt(row.get(n))
                        for n in names] for method, row in metrics.items()]
    return _table(header, rows, numeric=range(1, len(header)))


_CSS = """
body { margin: 0; background: #f4f5f7; color: #1d2330;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 24px 28px 40px; }
h1 { font-size: 26px; margin: 0; }
h2 { font-size: 19px; margin: 0 0 10px; border-bottom: 1px solid #dde1e7; padding-bottom: 4px; }
section { background: #fff; border: 1px solid #dde1e7; border-radius: 8px; padding: 16px 20px; margin: 16px 0; }
.sub { color: #5b6475; margin: 2px 0 18px; word-break: break-all; }
.verdict { border-left: 6px solid #e6a100; } .verdict.ok { border-left-color: #2e7d32; }
.big { font-size: 18px; font-weight: 600; margin: 4px 0; }
.disclaimer { background: #fff4e5; border: 1px solid #f0c36d; border-radius: 6px; padding: 8px 12px; font-weight: 600; }
.note { color: #5b6475; font-size: 13px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { padding: 5px 10px; border-bottom: 1px solid #e8ebf0; text-align: left; vertical-align: top; }
th { background: #f0f2f5; } .n { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th:first-child { width: 28%; }
figure { margin: 10px 0 18px; } figcaption { font-weight: 600; margin-bottom: 4px; }
figure img { max-width: 100%; height: auto; display: block; border: 1px solid #e8ebf0; }
.side { display: flex; gap: 24px; align-items: center; } .side figure { flex: 0 0 auto; } .side div { flex: 1; }
footer { color: #5b6475; font-size: 12px; text-align: center; }
"""


def _figure(fig: dict) -> str:
    return (f'<figure><figcaption>{html.escape(fig["title"])}</figcaption><img src="{fig["uri"]}" '
            f'alt="{html.escape(fig["title"])}"></figure>')


def _html(p: dict, figures: list[dict]) -> str:
    from gen_sr import __version__

    esc, v = html.escape, p["verdict"]
    views = "".join(_figure(f) for f in figures if f["id"].startswith("view_"))
    others = {f["id"]: _figure(f) for f in figures if not f["id"].startswith("view_")}
    card = _table(["field", "value"], [[str(k), _fmt(x)] for k, x in p["card"].items()], "kv")
    has_tissue = any(c["tissue"] is not None for c in p["clusters"])
    cluster_rows = [[str(c["rank"]), *(f"{x:.1f}" for x in c["centroid_mm"]), f"{c['size_mm3']:.4g}", str(c["voxels"]),
                     f"{c['peak_risk']:.3g}", f"{c['mean_risk']:.3g}",
                     "({})".format(", ".join(f"{x:.1f}" for x in c["peak_mm"]))] + ([c["tissue"]] if has_tissue else [])
                    for c in p["clusters"]]
    clusters = (_table(["#", "x [mm]", "y [mm]", "z [mm]", "size [mm³]", "voxels", "peak risk", "mean risk",
                        "peak at [mm]"] + (["tissue"] if has_tissue else []), cluster_rows, numeric=range(1, 8))
                if cluster_rows else "<p>No voxel exceeds the threshold.</p>")
    peak_tissue = any(q["tissue"] is not None for q in p["peaks"])
    peak_rows = [[str(q["rank"]), *(f"{x:.1f}" for x in q["position_mm"]), f"{q['risk']:.3g}", str(q["cluster"])]
                 + ([q["tissue"]] if peak_tissue else []) for q in p["peaks"]]
    peak_table = (_table(["#", "x [mm]", "y [mm]", "z [mm]", "risk", "cluster"] + (["tissue"] if peak_tissue else []),
                         peak_rows, numeric=range(1, 6)) if peak_rows else "<p>No voxel exceeds the threshold.</p>")
    sections = [
        f'<section class="verdict{" ok" if v["flagged_voxels"] == 0 else ""}"><h2>Summary</h2>'
        f'<p class="big">{esc(v["text"])}</p><p class="note">{esc(v["risk_note"])}</p></section>',
        f'<p class="disclaimer">{esc(DISCLAIMER)}</p>',
        f"<section><h2>Acquisition and model card</h2>{card}</section>",
        f'<section><h2>Orthogonal views</h2><p class="note">RAS+ display, neurological convention (R on the right), '
        f'planes through {esc(p["views"]["centred_on"])} at ({", ".join(f"{x:.1f}" for x in p["views"]["centre_mm"])})'
        f" mm (dotted crosshair). The cyan contour marks risk = {p['risk_threshold']:g}.</p>{views}</section>",
        f'<section><h2>Top high-risk clusters</h2><p class="note">{v["n_clusters"]} connected component(s) '
        f"(26-connectivity) of risk &gt; {p['risk_threshold']:g}; highest peak first; world coordinates of each "
        f"cluster's centroid (x, y, z) and of its peak.</p>{clusters}</section>",
        '<section><h2>Highest-risk places</h2><p class="note">Local maxima of risk above the threshold, at least '
        f"10 mm apart, highest first, with the cluster each lies in: where to look first, even inside a large "
        f"cluster.</p>{peak_table}</section>",
        f"<section><h2>Per-slice risk profile</h2>{others['profile']}</section>",
    ]
    if p["metrics"]:
        sections.append("<section><h2>Metrics against the reference</h2>" + _metrics_table(p["metrics"])
                        + '<p class="note">Best value per column in bold.</p></section>')
    if "calibration" in others:
        c = p["calibration_curve"]
        params = _table(["parameter", "value"], [[str(k), _fmt(x)] for k, x in c.items()
                                                 if k not in ("nominal", "observed")], numeric=range(1, 2))
        pairs = _table(["nominal coverage", "observed coverage"], [[_fmt(a), _fmt(b)] for a, b in zip(
            c["nominal"], c["observed"], strict=False)], numeric=range(2))
        sections.append(f'<section><h2>Calibration</h2><div class="side">{others["calibration"]}<div>{params}<br>'
                        f"{pairs}</div></div></section>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>Hallucination audit: {esc(p["input_name"])}'
            f"</title><style>{_CSS}</style></head>\n<body><main><h1>Hallucination-risk audit</h1>"
            f'<p class="sub">{esc(p["input_name"])}</p>\n' + "\n".join(sections)
            + f"\n<footer>gen_sr {esc(__version__)} · report.json holds the same figures</footer>"
            "</main></body></html>\n")


# ----------------------------------------------------------------------------------------------------- report
def build_report(output_dir: str | Path, *, lr: Volume, mean: Volume, std: Volume, risk: Volume, dc_residual: Volume,
                 card: dict, risk_threshold: float, calibrated: bool, masks: dict[str, Volume] | None = None,
                 reference: Volume | None = None, metrics: dict[str, dict[str, float]] | None = None,
                 calibration_curve: dict | None = None, input_name: str, sr_axis: int) -> dict:
    """Write ``report.html`` and ``report.json`` into ``output_dir`` (created if missing), atomically.

    All maps are brought onto the risk map's grid (the LR, and any map on another grid, by linear resampling), and
    shown in RAS+ orientation. The verdict's percentage counts flagged voxels (risk > ``risk_threshold``) inside
    the brain (masks given) or the SR mean's foreground (see :func:`_foreground`); the per-slice profile runs along
    the risk map's voxel axis ``sr_axis``.

    Args:
        metrics: ``{method: {metric: value}}``, shown when given (with the reference).
        calibration_curve: ``{"nominal": [...], "observed": [...]}`` and optional scalars (``alpha``, ``lambda``).

    Returns:
        The JSON payload (what ``report.json`` holds).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = float(risk_threshold)
    r = np.asarray(risk.data, dtype=np.float64)
    maps = {"mean": _on_grid(mean, risk), "lr": _on_grid(lr, risk), "std": _on_grid(std, risk),
            "dc": _on_grid(dc_residual, risk)}
    fg, fg_label = _foreground(maps["mean"], {k: _on_grid(m, risk) for k, m in (masks or {}).items()})
    all_clusters = risk_clusters(risk, t, masks=masks, top=None)
    peaks = risk_peaks(risk, t, masks=masks)
    voxel_mm3 = abs(float(np.linalg.det(risk.affine[:3, :3])))
    flagged = int(np.count_nonzero((r > t) & fg))
    pct = 100 * flagged / int(fg.sum())
    text = f"{pct:.1f} % of the {fg_label.split(' (')[0]} flagged high-risk (risk > {t:g}, " \
           f"{'calibrated' if calibrated else 'uncalibrated'})"
    largest = max(all_clusters, key=lambda c: c["voxels"], default=None)
    if largest is not None:
        text += "; largest cluster {:.4g} mm³, peak risk at ({}) mm".format(
            largest["size_mm3"], ", ".join(f"{x:.1f}" for x in largest["peak_mm"]))
    verdict = {"text": text, "flagged_percent": pct, "flagged_voxels": flagged, "flagged_mm3": flagged * voxel_mm3,
               "foreground_voxels": int(fg.sum()), "foreground": fg_label, "flagged_percent_of_volume":
               100 * float(np.mean(r > t)), "n_clusters": len(all_clusters), "largest_cluster": largest,
               "risk_note": "Calibrated: the risk scale comes from the model's calibration (card)." if calibrated
               else "Uncalibrated: risk is the sample spread relative to the intensity range; the threshold has no "
                    "coverage guarantee."}
    # ------------------------------------------------------------------ orthogonal views in RAS+
    can = {k: Volume(a, risk.affine).canonical() for k, a in {**maps, "risk": r}.items()}
    ref_vol = can["mean"]
    if all_clusters:
        # the peak, not the centroid: the centroid of a curved cluster (a rim, a ribbon) can lie outside it
        world = np.append(all_clusters[0]["peak_mm"], 1.0)
        centre = np.clip(np.rint(np.linalg.solve(ref_vol.affine, world)[:3]), 0, np.asarray(ref_vol.shape) - 1)
        centred_on = "the peak of the highest-risk cluster"
    else:
        centre, centred_on = (np.asarray(ref_vol.shape) - 1) // 2, "the volume centre"
    risk_max = max(2 * t, float(np.percentile(r, 99.9)))
    gray = {"cmap": "gray", **dict(zip(("vmin", "vmax"), _window(can["mean"].data), strict=True))}
    rows = [("lr", "LR input (linear resampling onto the SR grid)", [(can["lr"].data, gray)], "intensity", None),
            ("mean", "SR mean", [(can["mean"].data, gray)], "intensity", None),
            ("std", "SR standard deviation across samples", [(can["std"].data, {"cmap": "magma", "vmin": 0,
             "vmax": _window(can["std"].data)[1]})], "std", None),
            ("risk", "Hallucination risk over the SR mean", [(can["mean"].data, gray), (can["risk"].data, {
             "cmap": _translucent("YlOrRd", t / risk_max), "vmin": 0, "vmax": risk_max})],
             "risk (opaque from the threshold up)", t),
            ("dc", "Data-consistency residual |A x − y|", [(can["dc"].data, {"cmap": "viridis", "vmin": 0,
             "vmax": _window(can["dc"].data)[1]})], "|A x − y|", None)]
    if reference is not None:
        ref_can = Volume(_on_grid(reference, risk), risk.affine).canonical().data
        err = np.abs(can["mean"].data - ref_can)
        rows += [("reference", "Reference", [(ref_can, gray)], "intensity", None),
                 ("error", "|SR mean − reference|", [(err, {"cmap": "magma", "vmin": 0, "vmax": _window(err)[1]})],
                  "absolute error", None)]
    figures = [{"id": f"view_{key}", "title": title, "uri": _view_row(ref_vol, centre, layers, label, contour)}
               for key, title, layers, label, contour in rows]
    profile = _profile(r, fg, t, sr_axis)
    figures.append({"id": "profile", "title": f"Mean risk and flagged fraction per slice along voxel axis {sr_axis}",
                    "uri": _profile_plot(profile, t, sr_axis, risk.spacing[sr_axis])})
    if calibration_curve is not None:
        figures.append({"id": "calibration", "title": "Observed against nominal coverage",
                        "uri": _calibration_plot(calibration_curve)})
    payload = json_ready({
        "input_name": str(input_name), "disclaimer": DISCLAIMER, "verdict": verdict, "risk_threshold": t,
        "calibrated": bool(calibrated), "card": card, "clusters": all_clusters[:10], "peaks": peaks,
        "views": {"centred_on": centred_on, "centre_mm": (ref_vol.affine[:3, :3] @ centre + ref_vol.affine[:3, 3])},
        "profile": {**profile, "axis": sr_axis, "spacing_mm": risk.spacing[sr_axis]},
        "metrics": metrics, "calibration_curve": calibration_curve,
        "figures": [{"id": f["id"], "title": f["title"]} for f in figures],
    })
    page = _html(payload, figures)
    write_json(out / "report.json", payload)
    atomic_write(out / "report.html", lambda p: p.write_text(page, encoding="utf-8"))
    return payload
