# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Tables, JSON and plots of bench records (lists of dicts with ``sampler``, ``nfe`` and metric keys)."""

from __future__ import annotations

import json
import math
import os
from typing import Iterable


def format_table(records: list[dict], columns: Iterable[str]) -> str:
    """A fixed-width text table of ``records`` with the given columns (missing values print as '-')."""
    columns = list(columns)

    def cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    rows = [[cell(r.get(c)) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(row) for row in rows])


def write_json(records: list[dict], path: str) -> None:
    """Write ``records`` atomically (a crash never leaves a half-written file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=2)
    os.replace(tmp, path)


def plot_metric_vs_nfe(
    records: list[dict], metric: str, path: str, *, title: str = "", logy: bool = True, ylabel: str | None = None
) -> None:
    """One line per sampler of ``metric`` against NFE (log-log when ``logy``), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for sampler in dict.fromkeys(r["sampler"] for r in records):
        rows = sorted((r for r in records if r["sampler"] == sampler and r.get(metric) is not None),
                      key=lambda r: r["nfe"])
        if rows:
            ax.plot([r["nfe"] for r in rows], [r[metric] for r in rows], marker="o", label=sampler)
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("NFE (model calls)")
    ax.set_ylabel(ylabel or metric)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def save_grid(rows: list, labels: list[str], path: str, *, title: str = "", scale: int = 4) -> None:
    """Save rows of images in [0, 1] (each ``(N, C, H, W)``) as one labelled PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = max(len(r) for r in rows)
    h, w = rows[0].shape[-2:]
    fig, axes = plt.subplots(len(rows), ncol, figsize=(ncol * w * scale / 40 + 1, len(rows) * h * scale / 40 + 0.4),
                             dpi=100, squeeze=False)
    for i, (row, label) in enumerate(zip(rows, labels)):
        for j in range(ncol):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(row):
                img = row[j].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
            else:
                ax.axis("off")
        axes[i][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
