"""Result tables: :func:`summarize` turns per-volume rows into mean ± std across volumes, :func:`markdown_table`
shows them, and :func:`write_table_files` writes a result as Markdown, CSV and JSON, each atomically
(``gen-sr evaluate``, ``gen-sr stress-test`` and the benchmarks all write through here)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gen_sr.eval.metrics import LPIPS_NOTE
from gen_sr.io import atomic_write, write_json

__all__ = ["COLUMNS", "UNCERTAINTY_COLUMNS", "figures_table", "markdown_rows", "markdown_table", "summarize",
           "write_table", "write_table_files"]


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std across volumes of every numeric column, per (method, region), in first-seen order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["region"]), []).append(row)
    table = []
    for (method, region), group in groups.items():
        entry: dict[str, Any] = {"method": method, "region": region, "volumes": len(group)}
        for key in group[0]:
            values = [r[key] for r in group if isinstance(r.get(key), int | float)]
            if key not in ("volume", "method", "region") and values:
                finite = np.asarray(values, dtype=np.float64)
                entry[key] = float(np.mean(finite))
                entry[f"{key}_std"] = float(np.std(finite))
        table.append(entry)
    return table


UNCERTAINTY_COLUMNS = ("spearman", "ause", "uce", "ence", "coverage_1sigma", "coverage_2sigma", "coverage_calibrated")
"""The uncertainty figures of a model's rows (:func:`~gen_sr.eval.evaluate.estimate_metrics`), in table order."""
COLUMNS = ("psnr", "ssim", "nrmse", "hfen", *UNCERTAINTY_COLUMNS, "relative_residual", "seconds")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def markdown_rows(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def figures_table(columns: dict[str, dict[str, float]], figures: Sequence[str] | None = None) -> str:
    """Benchmark figures as a Markdown table: one row per figure (default: all, in first-seen order), one column per
    run, ``.4g``, blank where a run has no such figure; ``|`` in a figure's name is escaped."""
    figures = list(figures or dict.fromkeys(f for c in columns.values() for f in c))
    rows = [[f.replace("|", "\\|"), *(f"{c[f]:.4g}" if f in c else "" for c in columns.values())] for f in figures]
    return markdown_rows(["figure", *columns], rows)


def markdown_table(table: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """The summary as a Markdown table: ``mean ± std`` per column (— where a method has no such figure)."""
    cols = [c for c in columns if any(c in t for t in table)]
    rows = [[t["method"], t["region"], str(t["volumes"]),
             *(f"{_fmt(t[c])} ± {_fmt(t[c + '_std'])}" if c in t else "—" for c in cols)] for t in table]
    return markdown_rows(["method", "region", "volumes", *cols], rows)


def write_table(output_dir: str | Path, rows: Sequence[dict[str, Any]], stem: str = "evaluation",
                meta: dict[str, Any] | None = None, notes: Sequence[str] = ()) -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.csv`` (one line per volume, method and region) and ``<stem>.json`` (rows,
    summary and ``meta``), each atomically; ``notes``: sentences on the rows (e.g. a baseline that computed something
    other than it is named: :func:`~gen_sr.eval.baselines.baseline_notes`), under the Markdown table and in the
    JSON's ``notes``."""
    table = summarize(rows)
    said = "".join(f"\n{note}.\n" for note in notes)
    return write_table_files(output_dir, stem, markdown_table(table) + said + f"\n{LPIPS_NOTE}.\n", rows,
                             {"meta": meta or {}, "summary": table, "rows": list(rows), "note": LPIPS_NOTE,
                              "notes": list(notes)})


def write_table_files(output_dir: str | Path, stem: str, markdown: str, rows: Sequence[dict[str, Any]],
                      payload: dict[str, Any], columns: Sequence[str] | None = None) -> dict[str, Path]:
    """Write a result three ways, each atomically: ``<stem>.md`` (``markdown``), ``<stem>.csv`` (``rows``, in
    ``columns``, by default every key) and ``<stem>.json`` (``payload``). Returns the paths by extension."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns or dict.fromkeys(k for r in rows for k in r)),
                            lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    paths = {ext: out / f"{stem}.{ext}" for ext in ("md", "csv", "json")}
    for ext, text in (("md", markdown), ("csv", buffer.getvalue())):
        atomic_write(paths[ext], lambda tmp, text=text: tmp.write_text(text))
    write_json(paths["json"], payload)
    return paths
