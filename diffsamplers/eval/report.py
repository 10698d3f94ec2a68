# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Tables, JSON and plots of bench records (lists of dicts with ``sampler``, ``nfe`` and metric keys)."""

from __future__ import annotations

import json
import math
import os
import re
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


def budget_label(budget: int, calls: float) -> str:
    """``"NFE 8"`` when the calls made equal the budget, else ``"budget 8: 7 calls"`` (AdaptiveDiffusion, Heun), so
    two rows of one sampler never share a label."""
    return f"NFE {budget}" if calls == budget else f"budget {budget}: {calls:g} calls"


# colour per base sampler (its family), line style and marker per variant of that base
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf")  # matplotlib's tab10
_LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def sampler_family(name: str) -> str:
    """The base a sampler name varies: ``"dpmpp2m+teleport"`` -> ``"dpmpp2m"``, ``"bdia-g1"`` -> ``"bdia"``."""
    return re.split(r"[+-]", name, maxsplit=1)[0]


def series_styles(names: Iterable[str]) -> dict[str, dict]:
    """Matplotlib ``plot`` keywords per sampler: the colour is the base's (:func:`sampler_family`), the line style and
    marker the variant's (``+teleport`` looks the same on every base; the base itself is solid with circles). Every
    other base has hollow markers. Past ten bases the colours repeat with shifted markers, so every (colour, line
    style, marker) stays distinct."""
    names = list(dict.fromkeys(names))
    families = list(dict.fromkeys(sampler_family(n) for n in names))
    kinds = list(dict.fromkeys([""] + [n[len(sampler_family(n)):] for n in names]))
    styles = {}
    for name in names:
        i, k = families.index(sampler_family(name)), kinds.index(name[len(sampler_family(name)):])
        styles[name] = dict(
            color=_PALETTE[i % len(_PALETTE)],
            linestyle=_LINESTYLES[k % len(_LINESTYLES)],
            marker=_MARKERS[(k + i // len(_PALETTE)) % len(_MARKERS)],
        )
        if i % 2:  # hollow markers on every other base: where two bases nearly coincide, both still show
            styles[name]["markerfacecolor"] = "none"
    return styles


def metric_vs_nfe_figure(
    records: list[dict], metric: str, *, title: str = "", logy: bool = True, ylabel: str | None = None
):
    """The figure of :func:`plot_metric_vs_nfe`: one series per sampler at the model calls it made (``nfe``); the
    x ticks are the budgets run (``budget``, else ``nfe``), as plain numbers; the legend sits outside the axes."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    samplers = list(dict.fromkeys(r["sampler"] for r in records))
    styles = series_styles(samplers)
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    drawn: dict[str, list[tuple[float, float]]] = {}
    for sampler in samplers:
        rows = sorted((r for r in records if r["sampler"] == sampler and r.get(metric) is not None),
                      key=lambda r: r["nfe"])
        if not rows:
            continue
        points = [(r["nfe"], r[metric]) for r in rows]
        style, label = dict(styles[sampler], markersize=6, linewidth=1.5), sampler
        # a series equal to one already drawn (Euler is DDIM on a VP model) would hide it: draw it thin and hollow
        # on top, and say so in the legend
        twin = next((name for name, other in drawn.items() if _same_points(points, other)), None)
        if twin is not None:
            style.update(linewidth=0.9, markersize=8, markerfacecolor="none")
            label = f"{sampler} (= {twin})"
        drawn[sampler] = points
        ax.plot(*zip(*points), label=label, **style)
    ax.set_xscale("log")
    ticks = sorted({r.get("budget", r["nfe"]) for r in records})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())  # log axes label minor ticks as 3x10^0
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("NFE (model calls)")
    ax.set_ylabel(ylabel or metric)
    ax.set_title(textwrap.fill(title, 80), fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", axis="y", alpha=0.1)
    ncol = 1 + (len(samplers) - 1) // 18
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=ncol, handlelength=3.2,
              frameon=False)
    fig.tight_layout()
    return fig


def _same_points(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> bool:
    return len(a) == len(b) and all(
        x1 == x2 and math.isclose(y1, y2, rel_tol=1e-3, abs_tol=1e-12) for (x1, y1), (x2, y2) in zip(a, b)
    )


def plot_metric_vs_nfe(
    records: list[dict], metric: str, path: str, *, title: str = "", logy: bool = True, ylabel: str | None = None
) -> None:
    """One line per sampler of ``metric`` against NFE (log-log when ``logy``), saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = metric_vs_nfe_figure(records, metric, title=title, logy=logy, ylabel=ylabel)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, bbox_inches="tight")  # the legend and a long title stay inside the image
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
