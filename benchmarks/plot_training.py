"""Plot a training run's curves: training loss and held-out validation figures of both stages.

    python benchmarks/plot_training.py runs/heads2d_haar --output curves.png

Reads ``<run>/autoencoder/metrics.jsonl`` and ``<run>/diffusion/metrics.jsonl`` (written by the training scripts).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the experiment's output_dir")
    parser.add_argument("--output", type=Path, required=True, help="PNG to write")
    args = parser.parse_args()
    ae, dm = read(args.run / "autoencoder" / "metrics.jsonl"), read(args.run / "diffusion" / "metrics.jsonl")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].plot(*series(ae, "loss"), label="training loss (L1 + KL)")
    ax = axes[0].twinx()
    ax.plot(*series(ae, "val/psnr"), "o-", color="C1", label="held-out reconstruction PSNR")
    ax.set_ylabel("PSNR (dB)")
    axes[0].set(title="autoencoder", xlabel="step", ylabel="loss")
    axes[0].legend(loc="upper center")
    ax.legend(loc="center right")
    axes[1].plot(*series(dm, "loss"), alpha=0.6, label="training loss")
    axes[1].plot(*series(dm, "val/loss"), "o-", label="held-out loss (fixed noise)")
    axes[1].set(title="diffusion", xlabel="step", ylabel="v-prediction MSE", yscale="log")
    axes[1].legend()
    for key, label, style in (("val/psnr", "DDIM samples (EMA UNet)", "o-"),
                              ("val/psnr_condition", "condition: cubic interpolation of the LR", "--")):
        axes[2].plot(*series(dm, key), style, label=label)
    axes[2].set(title="held-out slab: PSNR against HR", xlabel="step", ylabel="PSNR (dB)")
    axes[2].legend()
    fig.suptitle(f"{args.run}: training curves (validation on the held-out anterior slab)")
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=90)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
