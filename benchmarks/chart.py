"""A PNG chart of a benchmark run: for every case, each provider's median time as a bar, with
a tick at the time the bytes model allows at the copy bandwidth measured in the same run, and
"x ideal" (time over that bound) written beside the bar. Providers are compared by eye: the
shorter the bar and the closer to its tick, the better.

Needs matplotlib (a dependency of `make bench`); without it the run writes no chart and says why.
"""

from __future__ import annotations

import math
from pathlib import Path

THP_COLORS = {"0": "#4878a8", "1": "#e0913a"}
BAR_HEIGHT_IN = 0.28      # inches of figure height per bar
PANEL_PAD_IN = 0.9        # title and axis labels of one panel
LOG_SCALE_RATIO = 30.0    # a log time axis when the slowest bar is this many times the fastest


def _panels(rows: list[dict]) -> dict[str, list[dict]]:
    """Timed rows grouped by case title, in run order."""
    panels: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r["order"], r["thp"])):
        if r["status"] != "ok" or not r.get("median_ms"):
            continue
        dec = " decode" if r["decode"] else ""
        title = f"{r['op']} {r['pass']} {r['dtype']} {r['rows']}x{r['classes']}{dec}"
        panels.setdefault(title, []).append(r)
    return panels


def _times(v: float) -> str:
    return f"{v:.2f}x" if v < 10 else f"{v:.0f}x"


def _draw_panel(ax, title: str, rs: list[dict], thps: list[str]) -> None:
    labels = [r["label"] + (f" THP={r['thp']}" if len(thps) > 1 else "") for r in rs]
    times = [r["median_ms"] for r in rs]
    ideal = [r["median_ms"] / r["x_ideal"] if r.get("x_ideal") else math.nan for r in rs]
    y = list(range(len(rs)))
    ax.barh(y, times, color=[THP_COLORS.get(r["thp"], "#888888") for r in rs])
    ax.plot(ideal, y, linestyle="none", marker="|", markersize=14, color="black",
            label="bytes model at copy bandwidth")
    for yi, t, r in zip(y, times, rs, strict=True):
        text = f" {t:.3g} ms" + (f"  {_times(r['x_ideal'])} ideal" if r.get("x_ideal") else "")
        ax.text(t, yi, text, va="center", fontsize=7)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("median time per call (ms)", fontsize=8)
    lo, hi = min(times + [v for v in ideal if math.isfinite(v)]), max(times)
    if hi / max(lo, 1e-12) > LOG_SCALE_RATIO:
        ax.set_xscale("log")
        ax.set_xlim(lo / 2, hi * 8)
    else:
        ax.set_xlim(0, hi * 1.6)  # room for the text beside the longest bar
    ax.tick_params(axis="x", labelsize=7)


def write(rows: list[dict], path: Path, title: str) -> tuple[Path | None, str]:
    """Draw the chart into `path`; (path, "") or (None, the reason it was not drawn)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return None, f"matplotlib is not importable: {e}"
    panels = _panels(rows)
    if not panels:
        return None, "no provider was timed"
    thps = sorted({r["thp"] for r in rows})
    heights = [PANEL_PAD_IN + BAR_HEIGHT_IN * len(rs) for rs in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, sum(heights) + 0.8),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (name, rs) in zip(axes[:, 0], panels.items(), strict=True):
        _draw_panel(ax, name, rs, thps)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if len(thps) > 1:
        from matplotlib.patches import Patch
        handles += [Patch(color=THP_COLORS[t]) for t in thps if t in THP_COLORS]
        labels += [f"THP_MEM_ALLOC_ENABLE={t}" for t in thps if t in THP_COLORS]
    fig.legend(handles, labels, loc="upper right", fontsize=7)
    fig.suptitle(f"fusedloss benchmark: {title}", fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, ""
