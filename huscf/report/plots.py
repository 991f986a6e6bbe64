"""Report figures as PNG bytes: matplotlib's object-oriented API on the Agg canvas (no pyplot, no display).

Every function takes plain numbers (lists, dicts) and returns the bytes of one PNG, so the report
code never touches matplotlib state and a figure is freed as soon as it is drawn.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap, to_hex, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

DPI = 100
PALETTE = [to_hex(c) for c in matplotlib.colormaps["tab10"].colors]
_CLUSTER_COLOURS = [to_hex(c) for c in matplotlib.colormaps["tab20"].colors]
_STAGE_COLOURS = {"head": PALETTE[0], "server": PALETTE[1], "tail": PALETTE[2]}
_OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "borderaxespad": 0}  # a legend right of the axes


@dataclass
class Line:
    """One series: ``fmt`` is a matplotlib format string ("-o", "o", "--")."""

    label: str | None
    x: Sequence[float]
    y: Sequence[float]
    fmt: str = "-o"
    color: str | None = None
    width: float = 1.6
    alpha: float = 1.0
    markersize: float = 4.0


@dataclass
class Panel:
    """One axes of a multi-panel line figure."""

    title: str
    lines: list[Line] = field(default_factory=list)
    ylabel: str = ""
    xlabel: str = "round"
    ylim: tuple[float | None, float | None] | None = None
    legend_outside: bool = False


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def domain_colours(domains: Sequence[str]) -> dict[str, str]:
    """A stable colour per domain, in order of first appearance."""
    return {d: PALETTE[i % len(PALETTE)] for i, d in enumerate(dict.fromkeys(domains))}


def curves(panels: Sequence[Panel], ncols: int = 2, panel_size: tuple[float, float] = (5.2, 3.2)) -> bytes:
    """Line plots, one axes per panel, legends without repeated labels, integer round ticks."""
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(panel_size[0] * ncols, panel_size[1] * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, panel in zip(axes, panels):
        seen = set()
        for ln in panel.lines:
            label = ln.label if ln.label not in seen else None
            seen.add(ln.label)
            ax.plot(list(ln.x), list(ln.y), ln.fmt, color=ln.color, linewidth=ln.width, alpha=ln.alpha,
                    markersize=ln.markersize, label=label)
        ax.set_title(panel.title, fontsize=10)
        ax.set(xlabel=panel.xlabel, ylabel=panel.ylabel)
        if panel.ylim:
            ax.set_ylim(*panel.ylim)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if any(label for label in seen):
            ax.legend(fontsize=8, **(_OUTSIDE if panel.legend_outside else {"loc": "best"}))
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return _png(fig)


def cluster_map(clusters: Sequence[Sequence[int]], rounds: Sequence[int], client_labels: Sequence[str]) -> bytes:
    """Clients (rows) x rounds (columns), each cell coloured by the client's cluster id that round;
    lines separate runs of clients of the same domain (labels are ``"i: domain"``)."""
    grid = np.asarray(clusters, dtype=int).T  # (clients, rounds)
    n, r = grid.shape
    top = max(int(grid.max()) + 1, 1)
    colours = (PALETTE if top <= len(PALETTE) else _CLUSTER_COLOURS * math.ceil(top / len(_CLUSTER_COLOURS)))[:top]
    fig = _figure(min(max(4.5, 1.8 + 0.32 * r), 14), min(max(2.4, 0.9 + 0.22 * n), 16))
    ax = fig.subplots()
    ax.imshow(grid, cmap=ListedColormap(colours), norm=BoundaryNorm(np.arange(top + 1) - 0.5, top), aspect="auto",
              interpolation="nearest")
    if n * r <= 800:
        for (i, j), g in np.ndenumerate(grid):
            rgb = to_rgb(colours[g])
            ink = "black" if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 0.55 else "white"
            ax.text(j, i, str(g), ha="center", va="center", fontsize=7, color=ink)
    else:  # too many cells to number: a legend instead
        handles = [Patch(color=colours[g], label=f"cluster {g}") for g in sorted(set(grid.ravel().tolist()))]
        ax.legend(handles=handles, fontsize=8, **_OUTSIDE)
    ax.set_yticks(range(n), list(client_labels), fontsize=8 if n <= 40 else 6)
    step = max(1, math.ceil(r / 25))
    ax.set_xticks(range(0, r, step), [str(rounds[k]) for k in range(0, r, step)], fontsize=8)
    domains = [label.split(": ", 1)[-1] for label in client_labels]
    for i in range(1, n):
        if domains[i] != domains[i - 1]:
            ax.axhline(i - 0.5, color="black", linewidth=1.5)
    ax.set_xlabel("round")
    ax.set_title("cluster id per client and round", fontsize=10)
    return _png(fig)


def stage_bars(stages: dict[str, float], title: str) -> bytes:
    """Horizontal bars of per-iteration stage latency in milliseconds, coloured by where the stage runs."""
    names = list(stages)
    ms = [1000.0 * float(stages[k]) for k in names]
    colours = [next((c for part, c in _STAGE_COLOURS.items() if k.endswith(part)), PALETTE[7]) for k in names]
    fig = _figure(7.0, max(2.2, 0.6 + 0.28 * len(names)))
    ax = fig.subplots()
    ax.barh(range(len(names)), ms, color=colours)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(ms):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=7)
    ax.set(xlim=(0, max(ms + [1e-9]) * 1.18), xlabel="milliseconds per iteration")
    ax.set_title(title, fontsize=10)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in _STAGE_COLOURS.items()], fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def tstr_detail(per_class: Sequence[float], ceiling: Sequence[float] | None,
                confusion: Sequence[Sequence[float]] | None, title: str) -> bytes:
    """Left: per-class accuracy of the TSTR classifier (and of the real-data ceiling); right: the
    TSTR confusion matrix (rows true class, columns predicted), coloured by row-normalised share."""
    panels = 2 if confusion else 1
    fig = _figure(5.0 * panels + 0.6, 4.0)
    axes = np.atleast_1d(fig.subplots(1, panels))
    ax = axes[0]
    k = len(per_class)
    x = np.arange(k)
    width = 0.4 if ceiling else 0.7
    ax.bar(x - (width / 2 if ceiling else 0), [_nan(v) for v in per_class], width, label="TSTR", color=PALETTE[0])
    if ceiling:
        ax.bar(x + width / 2, [_nan(v) for v in ceiling[:k]], width, label="real (ceiling)", color=PALETTE[7])
    ax.set_xticks(x, [str(i) for i in x], fontsize=8)
    ax.set(ylim=(0, 1.2), yticks=np.linspace(0, 1, 6), xlabel="class", ylabel="accuracy")
    ax.set_title("per-class accuracy", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    if confusion:
        _confusion(axes[1], np.asarray(confusion, dtype=float))
    fig.suptitle(title, fontsize=11)
    return _png(fig)


def _confusion(ax, m: np.ndarray) -> None:
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    integral = np.allclose(m, np.round(m))
    if m.size <= 400:
        for (i, j), v in np.ndenumerate(m):
            text = f"{int(round(v))}" if integral else f"{v:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=6 if m.shape[0] > 10 else 7,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(m.shape[1]), [str(i) for i in range(m.shape[1])], fontsize=8)
    ax.set_yticks(range(m.shape[0]), [str(i) for i in range(m.shape[0])], fontsize=8)
    ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title("TSTR confusion matrix", fontsize=10)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")


def _nan(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")
