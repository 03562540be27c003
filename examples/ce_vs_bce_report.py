"""Tables and figures of examples/ce_vs_bce.py (kept apart so the experiment stays short).

Run the experiment, not this module: `python examples/ce_vs_bce.py`.
"""

from __future__ import annotations

import torch

SETTING_COLORS = ("tab:blue", "tab:cyan", "tab:red", "tab:orange")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mean_std(values):
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def fmt(values, scale=1.0, digits=2, sign=False):
    m, s = mean_std([v * scale for v in values])
    return f"{m:{'+' if sign else ''}.{digits}f} ± {s:.{digits}f}"


def plot(mc, mlres, path):
    """ce_vs_bce.png: multi-class bars and reliability, test F1 of every multi-label decoding."""
    plt = _pyplot()

    ncols = 1 + (len(mlres) + 1) // 2
    fig, grid = plt.subplots(2, ncols, figsize=(5.0 * ncols, 8.0), squeeze=False)
    metrics = [("accuracy", "test accuracy"), ("nll", "test NLL"), ("ece", "test ECE")]
    ax = grid[0][0]
    width = 0.35
    for j, name in enumerate(("ce", "bce")):
        means = [mean_std([r[name][m] for r in mc])[0] for m, _ in metrics]
        stds = [mean_std([r[name][m] for r in mc])[1] for m, _ in metrics]
        ax.bar([i + (j - 0.5) * width for i in range(3)], means, width, yerr=stds, capsize=3,
               label={"ce": "softmax CE", "bce": "sigmoid BCE"}[name])
    ax.set_xticks(range(3), [label for _, label in metrics])
    ax.set_title(f"multi-class digits ({len(mc)} seeds)")
    ax.legend()
    # Reliability diagram, pooled over seeds: accuracy against mean confidence per bin.
    ax = grid[1][0]
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":")
    for name, label in (("ce", "softmax CE"), ("bce", "sigmoid BCE, normalised")):
        n, acc, conf = (torch.tensor([r[name]["reliability"][i] for r in mc]).sum(0)
                        for i in range(3))
        keep = n > 0
        ax.plot((conf / n.clamp(min=1))[keep], (acc / n.clamp(min=1))[keep], "o-", label=label)
    ax.set_xlabel("mean confidence in bin")
    ax.set_ylabel("accuracy in bin")
    ax.set_title("multi-class reliability (test, all seeds)")
    ax.legend(loc="lower right")
    ml_axes = [grid[r][c] for c in range(1, ncols) for r in range(2)]
    for ax in ml_axes[len(mlres):]:
        ax.axis("off")
    for ax, (setting, runs) in zip(ml_axes, mlres.items(), strict=False):
        methods = [k for k in runs[0] if not k.startswith("val")]
        for j, metric in enumerate(("micro_f1", "macro_f1")):
            means = [mean_std([r[k][metric] for r in runs])[0] for k in methods]
            stds = [mean_std([r[k][metric] for r in runs])[1] for k in methods]
            ax.bar([i + (j - 0.5) * width for i in range(len(methods))], means, width,
                   yerr=stds, capsize=3, label=metric.replace("_", " "))
        ax.set_xticks(range(len(methods)), methods, rotation=20, fontsize=7)
        lo = min(mean_std([r[k][m] for r in runs])[0] for k in methods
                 for m in ("micro_f1", "macro_f1"))
        ax.set_ylim(max(0.0, lo - 0.05), 1.0)
        ax.set_title(f"multi-label, {setting}: test F1", fontsize=10)
    handles, labels = ml_axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=2, title="multi-label panels")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_thresholds(mldetail, path):
    """thresholds.png: per-class F1 and the width of the threshold intervals against the number
    of validation positives of the class (every setting; F1 intervals of the first seed)."""
    plt = _pyplot()
    fig, (ax_f1, ax_w) = plt.subplots(1, 2, figsize=(12.0, 4.8))
    for color, (setting, runs) in zip(SETTING_COLORS, mldetail.items(), strict=False):
        d = runs[0]
        pos = torch.tensor(d["positives"], dtype=torch.float64)
        f1, lo, hi = (torch.tensor(d[k]) for k in ("val_f1", "val_f1_lo", "val_f1_hi"))
        ax_f1.errorbar(pos, f1, yerr=torch.stack([f1 - lo, hi - f1]), fmt="o", ms=4,
                       capsize=2, color=color, label=f"{setting}: validation, tuned (90% CI)")
        ax_f1.plot(pos, d["test_f1"], "x", ms=6, color=color)
        for r in runs:
            width = torch.tensor(r["logit_hi"]) - torch.tensor(r["logit_lo"])
            ax_w.plot(r["positives"], width, "o", ms=3, alpha=0.6, color=color,
                      label=setting if r is runs[0] else None)
    ax_f1.plot([], [], "x", color="grey", label="x: test F1 at the tuned threshold")
    for ax in (ax_f1, ax_w):
        ax.set_xscale("log")
        ax.set_xlabel("positives of the class in the validation split")
    ax_f1.set_ylabel("per-class F1")
    ax_f1.set_title("per-class F1, bootstrap 90% interval (first seed)", fontsize=10)
    ax_f1.legend(fontsize=7, loc="lower right")
    ax_w.set_ylabel("width of the 90% threshold interval (logit)")
    ax_w.set_yscale("log")
    ax_w.set_title("how sure each tuned threshold is (all seeds)", fontsize=10)
    ax_w.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def multiclass_table(mc) -> list[str]:
    lines = ["Multi-class digits (test split, 360 images; mean ± std over seeds):", "",
             "| loss | accuracy % | NLL | ECE % | 1 label at 0.5 % |", "|---|---|---|---|---|"]
    for name, label in (("ce", "softmax CE"), ("bce", "sigmoid BCE (sigmoids normalised)")):
        lines.append(f"| {label} | {fmt([r[name]['accuracy'] for r in mc], 100)} | "
                     f"{fmt([r[name]['nll'] for r in mc], 1, 3)} | "
                     f"{fmt([r[name]['ece'] for r in mc], 100)} | "
                     f"{fmt([r[name]['one_label'] for r in mc], 100, 1)} |")
    return lines


def multilabel_table(setting, runs, sizes) -> list[str]:
    lines = ["", f"Multi-label, {setting} (BCE; {sizes['test']} test samples, "
             f"thresholds tuned on {sizes['val']} validation samples):", "",
             "| decoding | micro F1 % | Δ micro vs 0.5 | macro F1 % | Δ macro vs 0.5 |",
             "|---|---|---|---|---|"]
    val_base = next(k for k in runs[0] if k.startswith("val") and k.endswith(": 0.5"))
    for k in runs[0]:
        # Paired differences: every decoding of a seed uses the same model and data; rows on
        # the validation split are compared with 0.5 on the validation split.
        base = val_base if k.startswith("val") else "0.5"
        cells = []
        for m in ("micro_f1", "macro_f1"):
            cells.append(fmt([r[k][m] for r in runs], 100))
            cells.append("" if k == base else
                         fmt([r[k][m] - r[base][m] for r in runs], 100, sign=True))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def intervals_table(setting, runs) -> list[str]:
    """Per class, means over seeds: validation positives, tuned threshold and its bootstrap
    interval (probability), validation F1 with its interval, out-of-bag and test F1."""
    mean = lambda key, c: sum(r[key][c] for r in runs) / len(runs)  # noqa: E731
    lines = ["", f"Per-class F1 thresholds, {setting} (bootstrap on validation; means over "
             f"{len(runs)} seeds):", "",
             "| class | val positives | threshold p [90% interval] | interval width (logit) "
             "| val F1 % [90% interval] | out-of-bag F1 % | test F1 % tuned | test F1 % at 0.5 |",
             "|---|---|---|---|---|---|---|---|"]
    for c in range(len(runs[0]["positives"])):
        lines.append(
            f"| {c} | {mean('positives', c):.0f} | {mean('threshold', c):.2f} "
            f"[{mean('threshold_lo', c):.2f}, {mean('threshold_hi', c):.2f}] | "
            f"{mean('logit_hi', c) - mean('logit_lo', c):.2f} | "
            f"{100 * mean('val_f1', c):.1f} [{100 * mean('val_f1_lo', c):.1f}, "
            f"{100 * mean('val_f1_hi', c):.1f}] | {100 * mean('oob_f1', c):.1f} | "
            f"{100 * mean('test_f1', c):.1f} | {100 * mean('test_f1_half', c):.1f} |")
    return lines
