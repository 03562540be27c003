"""Multi-class vs multi-label: softmax cross-entropy vs sigmoid BCE on scikit-learn's digits.

The question (see /work/shared/seeds): BCE-with-logits "works" on a multi-class problem such
as MNIST, so what does softmax-CE buy, and for a genuinely multi-label problem how should the
per-class thresholds be chosen instead of a fixed 0.5? Two experiments, same MLP, several seeds:

1. Multi-class (each 8x8 digit image is exactly one of 10 classes). The MLP is trained with
   `fusedloss.cross_entropy` or with `fusedloss.binary_cross_entropy_with_logits` on one-hot
   targets. Test accuracy (CE: argmax of the softmax; BCE: argmax of the sigmoids, which is
   the argmax of the logits), NLL and expected calibration error (ECE, 15 equal-width
   confidence bins). For BCE the ten sigmoids do not form a distribution: NLL and ECE use the
   sigmoids normalised to sum to 1 (`q = s / sum(s)`), confidence = max q. Also reported: the
   fraction of test images for which BCE's 0.5 decoding yields exactly one label (CE always
   yields one by construction: BCE has to learn the exclusivity).
2. Multi-label (each sample is 3 slots, each holding a digit image or left blank, 0 to 3
   images; labels = the set of digits present, the empty set included; images come from the
   train / validation / test pools of the digit split, so there is no leakage). The MLP is
   trained with BCE; the test set is decoded with the threshold 0.5, with per-class thresholds
   tuned for F1 on the validation split (`fusedloss.thresholds.tune_thresholds`, exact), with
   one micro-F1 threshold tuned on validation, and with per-class thresholds from the
   streaming `ThresholdHistogram`. Micro and macro F1 come from the library's counts
   (`return_counts=True`). Two label distributions: "uniform" (each slot's digit uniform) and
   "skewed" (digit d with probability proportional to 0.7**d, so 9 is 25x rarer than 0), each
   at two training budgets (under-trained: --short-epochs; trained: --epochs), since how much
   tuning buys depends on how well calibrated the scores are. The validation F1 at 0.5 and at
   the tuned thresholds (in-sample) is reported too: the gap between it and the test F1 is
   what tuning on a finite validation set costs.

Data split: one fixed stratified 60/20/20 split of the 1797 images; seeds vary the weight
initialisation, minibatch order and the multi-label sample composition.

Usage: python examples/ce_vs_bce.py [--quick] [--out DIR] [--seeds N] [--backend NAME]
Prints a markdown table and writes ce_vs_bce.png (and results.json) to --out
(default examples/out/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import fusedloss
from fusedloss.thresholds import ThresholdHistogram, tune_thresholds

NUM_CLASSES = 10
SLOTS = 3  # images per multi-label sample (each slot may be blank)
VAL_PREFIX = "val, in-sample: "
ECE_BINS = 15  # the usual choice since Guo et al. 2017 ("On calibration of modern NNs")


# ----------------------------------------------------------------------------- data
def load_digits_split(seed: int = 0):
    """Digits (1797 x 64, scaled to [0, 1]) split 60 / 20 / 20, stratified by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    idx = torch.arange(len(y)).numpy()
    tr, rest = train_test_split(idx, test_size=0.4, stratify=d.target, random_state=seed)
    va, te = train_test_split(rest, test_size=0.5, stratify=d.target[rest], random_state=seed)
    return {name: (x[i], y[i]) for name, i in (("train", tr), ("val", va), ("test", te))}


def make_multilabel(x: torch.Tensor, y: torch.Tensor, n: int, skew: float | None,
                    g: torch.Generator):
    """n samples of SLOTS slots; each slot blank or one image; labels = digits present."""
    n_images = torch.randint(0, SLOTS + 1, (n,), generator=g)  # 0..3 images, uniform
    filled = torch.rand(n, SLOTS, generator=g).argsort(1) < n_images[:, None]  # random slots
    if skew is None:
        digit_p = torch.full((NUM_CLASSES,), 1.0 / NUM_CLASSES)
    else:
        digit_p = skew ** torch.arange(NUM_CLASSES, dtype=torch.float64)
        digit_p = (digit_p / digit_p.sum()).float()
    digits = torch.multinomial(digit_p, n * SLOTS, replacement=True, generator=g).view(n, SLOTS)
    # An image of each chosen digit, drawn from this split's pool only.
    by_digit = [torch.nonzero(y == d).flatten() for d in range(NUM_CLASSES)]
    pick = torch.empty(n, SLOTS, dtype=torch.int64)
    for d in range(NUM_CLASSES):
        m = digits == d
        pool = by_digit[d]
        pick[m] = pool[torch.randint(0, len(pool), (int(m.sum()),), generator=g)]
    feats = x[pick] * filled[..., None]  # (n, SLOTS, 64), blank slots are zeros
    # Multi-hot: scatter each slot's digit, blank slots into an extra column that is dropped.
    hot = torch.zeros(n, NUM_CLASSES + 1)
    hot.scatter_(1, torch.where(filled, digits, torch.full_like(digits, NUM_CLASSES)), 1.0)
    labels = hot[:, :NUM_CLASSES]
    return feats.reshape(n, -1), labels


# ----------------------------------------------------------------------------- model
def mlp(n_in: int, hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, NUM_CLASSES))


def train(model, x, loss_fn, epochs: int, seed: int, batch: int = 64, lr: float = 1e-3):
    """Adam, minibatches in a seeded order; loss_fn(logits, batch_indices) -> scalar."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), idx).backward()
            opt.step()
    model.eval()
    return model


def ece(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over equal-width confidence bins of
    (fraction of samples in the bin) * |accuracy - mean confidence| in the bin."""
    b = (confidence.clamp(0, 1) * bins).long().clamp(max=bins - 1)
    # Per bin: n_b / N * |sum(correct) / n_b - sum(conf) / n_b| = |sum(correct) - sum(conf)| / N.
    acc = torch.bincount(b, weights=correct.double(), minlength=bins)
    conf = torch.bincount(b, weights=confidence.double(), minlength=bins)
    return float((acc - conf).abs().sum() / len(confidence))


def reliability(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS):
    """Per confidence bin: [count, sum of correct, sum of confidence] (for the plot)."""
    b = (confidence.clamp(0, 1) * bins).long().clamp(max=bins - 1)
    return [torch.bincount(b, minlength=bins).tolist(),
            torch.bincount(b, weights=correct.double(), minlength=bins).tolist(),
            torch.bincount(b, weights=confidence.double(), minlength=bins).tolist()]


# ----------------------------------------------------------------------------- experiment 1
def multiclass_run(data, seed: int, epochs: int, backend: str) -> dict:
    xtr, ytr = data["train"]
    xte, yte = data["test"]
    out = {}
    for name in ("ce", "bce"):
        model = mlp(64, 128, seed)
        if name == "ce":
            fn = lambda z, i: fusedloss.cross_entropy(z, ytr[i], backend=backend)
        else:
            onehot = torch.nn.functional.one_hot(ytr, NUM_CLASSES).float()
            fn = lambda z, i, t=onehot: fusedloss.binary_cross_entropy_with_logits(
                z, t[i], backend=backend)
        train(model, xtr, fn, epochs, seed)
        with torch.no_grad():
            z = model(xte)
        if name == "ce":
            dec = fusedloss.cross_entropy(z, yte, reduction="none", return_decoding=True,
                                          backend=backend)
            nll = float(dec.loss.mean())
            correct, conf = dec.correct, dec.confidence
            one_label = 1.0
        else:
            dec = fusedloss.binary_cross_entropy_with_logits(
                z, torch.nn.functional.one_hot(yte, NUM_CLASSES).float(), threshold=0.5,
                return_probs=True, backend=backend)
            s = dec.probs.double()
            q = s / s.sum(1, keepdim=True)  # sigmoids normalised to a distribution
            pred = fusedloss.softmax_decode(z, backend=backend).pred  # argmax of logits
            correct = pred == yte
            conf = q.gather(1, pred[:, None])[:, 0]  # = max q (argmax s = argmax q)
            nll = float(-q.gather(1, yte[:, None]).log().mean())
            one_label = float((dec.labels.sum(1) == 1).double().mean())
        out[name] = {"accuracy": float(correct.double().mean()), "nll": nll,
                     "ece": ece(conf.double(), correct), "one_label": one_label,
                     "reliability": reliability(conf.double(), correct)}
    return out


# ----------------------------------------------------------------------------- experiment 2
def f1s(counts: torch.Tensor) -> tuple[float, float]:
    """(micro F1, macro F1) from (3, C) [TP, FP, FN]; a class with nothing to find and
    nothing predicted counts as F1 = 1 (the convention of fusedloss.thresholds)."""
    tp, fp, fn = counts.double()
    micro = float(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()))
    den = 2 * tp + fp + fn
    per = torch.where(den == 0, 1.0, 2 * tp / den.clamp(min=1))
    return micro, float(per.mean())


def multilabel_run(data, seed: int, epochs: int, sizes: dict, skew, backend: str,
                   hist_bins: int) -> dict:
    g = torch.Generator().manual_seed(10_000 + seed)
    ml = {k: make_multilabel(*data[k], sizes[k], skew, g) for k in ("train", "val", "test")}
    xtr, ytr = ml["train"]
    model = mlp(64 * SLOTS, 256, seed)
    train(model, xtr, lambda z, i: fusedloss.binary_cross_entropy_with_logits(
        z, ytr[i], backend=backend), epochs, seed)
    with torch.no_grad():
        zva, zte = model(ml["val"][0]), model(ml["test"][0])
    yva, yte = ml["val"][1], ml["test"][1]

    def test_counts(**thr):
        return fusedloss.binary_cross_entropy_with_logits(zte, yte, return_counts=True,
                                                          backend=backend, **thr).counts

    hist = ThresholdHistogram(NUM_CLASSES, bins=hist_bins, range=(-16.0, 16.0))
    for chunk in torch.arange(len(zva)).split(256):  # as if streamed batch by batch
        hist.update(zva[chunk], yva[chunk])
    rows = {
        "0.5": test_counts(threshold=0.5),
        "tuned per-class": test_counts(
            logit_threshold=tune_thresholds(zva, yva, "f1").logit_threshold),
        "tuned micro": test_counts(
            logit_threshold=tune_thresholds(zva, yva, "f1", average="micro").logit_threshold),
        f"histogram ({hist_bins} bins)": test_counts(logit_threshold=hist.tune("f1")
                                                     .logit_threshold),
    }
    # On the validation data itself (in-sample: what tuning promises before it generalises).
    val = lambda **thr: fusedloss.binary_cross_entropy_with_logits(
        zva, yva, return_counts=True, backend=backend, **thr).counts
    rows[VAL_PREFIX + "0.5"] = val(threshold=0.5)
    rows[VAL_PREFIX + "tuned per-class"] = val(
        logit_threshold=tune_thresholds(zva, yva, "f1").logit_threshold)
    return {k: dict(zip(("micro_f1", "macro_f1"), f1s(c), strict=True)) for k, c in rows.items()}


# ----------------------------------------------------------------------------- report
def mean_std(values):
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def fmt(values, scale=1.0, digits=2, sign=False):
    m, s = mean_std([v * scale for v in values])
    return f"{m:{'+' if sign else ''}.{digits}f} ± {s:.{digits}f}"


def plot(mc, mlres, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        methods = [k for k in runs[0] if not k.startswith(VAL_PREFIX)]
        for j, metric in enumerate(("micro_f1", "macro_f1")):
            means = [mean_std([r[k][metric] for r in runs])[0] for k in methods]
            stds = [mean_std([r[k][metric] for r in runs])[1] for k in methods]
            ax.bar([i + (j - 0.5) * width for i in range(len(methods))], means, width,
                   yerr=stds, capsize=3, label=metric.replace("_", " "))
        ax.set_xticks(range(len(methods)), methods, rotation=15, fontsize=8)
        lo = min(mean_std([r[k][m] for r in runs])[0] for k in methods
                 for m in ("micro_f1", "macro_f1"))
        ax.set_ylim(max(0.0, lo - 0.05), 1.0)
        ax.set_title(f"multi-label, {setting}: test F1", fontsize=10)
    handles, labels = ml_axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=2, title="multi-label panels")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 seeds (< 1 min)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds (default 5, quick 2)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="epochs of the fully trained models (default 40, quick 6)")
    ap.add_argument("--short-epochs", type=int, default=None,
                    help="epochs of the under-trained multi-label models (default 5, quick 2)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    ap.add_argument("--backend", default="auto", help="fusedloss backend (default auto)")
    # One thread: these matrices are tiny, and on a shared 2-core machine two OpenMP threads
    # ran an MLP step 20x slower than one (29 ms vs 1.3 ms, measured here under load).
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = args.seeds or (2 if args.quick else 5)
    epochs = args.epochs or (6 if args.quick else 40)
    short = args.short_epochs or (2 if args.quick else 5)
    sizes = ({"train": 1500, "val": 500, "test": 500} if args.quick
             else {"train": 8000, "val": 2000, "test": 3000})
    hist_bins = 512
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()

    data = load_digits_split(0)
    mc = [multiclass_run(data, s, epochs, args.backend) for s in range(seeds)]
    # Two label distributions x two training budgets: tuning matters when the scores are
    # miscalibrated (under-trained), much less for a well-trained, calibrated model.
    mlres = {f"{setting} digits, {ep} epochs":
             [multilabel_run(data, s, ep, sizes, skew, args.backend, hist_bins)
              for s in range(seeds)]
             for setting, skew in (("uniform", None), ("skewed", 0.7))
             for ep in (short, epochs)}
    elapsed = time.time() - t0

    lines = [f"Command: python examples/ce_vs_bce.py{' --quick' if args.quick else ''}"
             f" (seeds {seeds}, epochs {epochs} / {short}, backend {args.backend} -> "
             f"{fusedloss.resolve_backend(args.backend, 'cpu')}, "
             f"{args.threads} threads, {elapsed:.0f} s)",
             f"Machine: {platform.machine()} {platform.processor() or ''} "
             f"{os.cpu_count()} cores, torch {torch.__version__}",
             "",
             "Multi-class digits (test split, 360 images; mean ± std over seeds):",
             "",
             "| loss | accuracy % | NLL | ECE % | 1 label at 0.5 % |",
             "|---|---|---|---|---|"]
    for name, label in (("ce", "softmax CE"), ("bce", "sigmoid BCE (sigmoids normalised)")):
        lines.append(f"| {label} | {fmt([r[name]['accuracy'] for r in mc], 100)} | "
                     f"{fmt([r[name]['nll'] for r in mc], 1, 3)} | "
                     f"{fmt([r[name]['ece'] for r in mc], 100)} | "
                     f"{fmt([r[name]['one_label'] for r in mc], 100, 1)} |")
    for setting, runs in mlres.items():
        lines += ["", f"Multi-label, {setting} (BCE; {sizes['test']} test samples, "
                  f"thresholds tuned on {sizes['val']} validation samples):", "",
                  "| decoding | micro F1 % | Δ micro vs 0.5 | macro F1 % | Δ macro vs 0.5 |",
                  "|---|---|---|---|---|"]
        for k in runs[0]:
            # Paired differences: every decoding of a seed uses the same model and data.
            base = VAL_PREFIX + "0.5" if k.startswith(VAL_PREFIX) else "0.5"
            cells = []
            for m in ("micro_f1", "macro_f1"):
                cells.append(fmt([r[k][m] for r in runs], 100))
                cells.append("" if k == base else
                             fmt([r[k][m] - r[base][m] for r in runs], 100, sign=True))
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    png = os.path.join(args.out, "ce_vs_bce.png")
    plot(mc, mlres, png)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"multiclass": mc, "multilabel": mlres, "seeds": seeds,
                   "epochs": epochs, "short_epochs": short,
                   "sizes": sizes, "seconds": elapsed}, f, indent=1)
    print(f"\nwrote {png}")
    return mc, mlres


if __name__ == "__main__":
    main()
