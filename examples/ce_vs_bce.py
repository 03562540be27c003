"""Multi-class vs multi-label: softmax cross-entropy vs sigmoid BCE on scikit-learn's digits.

The question: BCE-with-logits "works" on a multi-class problem such as MNIST, so what does
softmax-CE buy, and for a genuinely multi-label problem how should the per-class thresholds
be chosen instead of a fixed 0.5? Two experiments, same MLP, several seeds:

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
   trained with BCE; the test set is decoded with the threshold 0.5 and with thresholds tuned
   for F1 on the validation split (`fusedloss.thresholds`, exact): per class (each class's
   F1), one shared threshold (micro-F1), per class jointly for micro-F1 ("micro-per-class"),
   and per class from the streaming `ThresholdHistogram`. Micro and macro F1 come from the
   library's counts (`return_counts=True`). Two label distributions: "uniform" (each slot's
   digit uniform) and "skewed" (digit d with probability proportional to 0.7**d, so 9 is 25x
   rarer than 0), each at two training budgets (under-trained: --short-epochs; trained:
   --epochs), since how much tuning buys depends on how well calibrated the scores are. Also
   on the validation split: F1 at 0.5 and at the tuned thresholds (in-sample: the gap to the
   test F1 is what tuning on a finite validation set costs), and the 5-fold cross-validated
   F1 of per-class tuning (`cross_validate_thresholds`: tuned on 4/5 of the validation
   split, scored on the rest), an estimate of the test F1 from validation data alone.
   How sure each class's threshold is: `bootstrap_thresholds` on the validation split gives
   90% intervals of the threshold and of the tuned F1, plotted against the class's positives.

Data split: one fixed stratified 60/20/20 split of the 1797 images; seeds vary the weight
initialisation, minibatch order and the multi-label sample composition.

Usage: python examples/ce_vs_bce.py [--quick] [--out DIR] [--seeds N] [--backend NAME]
Prints markdown tables and writes ce_vs_bce.png, thresholds.png and results.json to --out
(default examples/out/). Tables and figures are made by ce_vs_bce_report.py (next to this file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import fusedloss
from fusedloss.thresholds import (
    ThresholdHistogram,
    bootstrap_thresholds,
    cross_validate_thresholds,
    tune_thresholds,
)

NUM_CLASSES = 10
SLOTS = 3  # images per multi-label sample (each slot may be blank)
VAL_PREFIX = "val, in-sample: "
CV_FOLDS = 5
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


def per_class_f1(counts: torch.Tensor) -> list[float]:
    tp, fp, fn = counts.double()
    den = 2 * tp + fp + fn
    return torch.where(den == 0, 1.0, 2 * tp / den.clamp(min=1)).tolist()


def multilabel_run(data, seed: int, epochs: int, sizes: dict, skew, backend: str,
                   hist_bins: int, resamples: int) -> tuple[dict, dict]:
    """(micro / macro F1 of every decoding, per-class threshold intervals) of one seed."""
    g = torch.Generator().manual_seed(10_000 + seed)
    ml = {k: make_multilabel(*data[k], sizes[k], skew, g) for k in ("train", "val", "test")}
    xtr, ytr = ml["train"]
    model = mlp(64 * SLOTS, 256, seed)
    train(model, xtr, lambda z, i: fusedloss.binary_cross_entropy_with_logits(
        z, ytr[i], backend=backend), epochs, seed)
    with torch.no_grad():
        zva, zte = model(ml["val"][0]), model(ml["test"][0])
    yva, yte = ml["val"][1], ml["test"][1]

    def counts(z, y, **thr):
        return fusedloss.binary_cross_entropy_with_logits(z, y, return_counts=True,
                                                          backend=backend, **thr).counts

    hist = ThresholdHistogram(NUM_CLASSES, bins=hist_bins, range=(-16.0, 16.0))
    for chunk in torch.arange(len(zva)).split(256):  # as if streamed batch by batch
        hist.update(zva[chunk], yva[chunk])
    tuned = {"tuned per-class": tune_thresholds(zva, yva, "f1"),
             "tuned micro": tune_thresholds(zva, yva, "f1", average="micro"),
             "tuned micro-per-class": tune_thresholds(zva, yva, "f1", average="micro_per_class"),
             f"histogram ({hist_bins} bins)": hist.tune("f1")}
    rows = {"0.5": counts(zte, yte, threshold=0.5)}
    rows.update({k: counts(zte, yte, logit_threshold=t.logit_threshold)
                 for k, t in tuned.items()})
    # On the validation data itself (in-sample: what tuning promises before it generalises),
    # and cross-validated within it (an estimate of the test rows from validation alone).
    rows[VAL_PREFIX + "0.5"] = counts(zva, yva, threshold=0.5)
    for k in ("tuned per-class", "tuned micro-per-class"):
        rows[VAL_PREFIX + k] = tuned[k].counts
    folds = torch.randint(0, CV_FOLDS, (len(zva),), generator=g)
    rows[f"val, {CV_FOLDS}-fold CV: tuned per-class"] = cross_validate_thresholds(
        zva, yva, folds, "f1").counts
    boot = bootstrap_thresholds(zva, yva, "f1", resamples=resamples, seed=seed)
    detail = {"positives": boot.positives.tolist(),
              "threshold": boot.tuned.threshold.tolist(),
              "threshold_lo": boot.threshold[0].tolist(),
              "threshold_hi": boot.threshold[1].tolist(),
              "logit_lo": boot.logit_threshold[0].tolist(),
              "logit_hi": boot.logit_threshold[1].tolist(),
              "val_f1": boot.tuned.score.tolist(),
              "val_f1_lo": boot.score[0].tolist(), "val_f1_hi": boot.score[1].tolist(),
              "oob_f1": boot.out_of_bag_score.tolist(),
              "test_f1": per_class_f1(rows["tuned per-class"]),
              "test_f1_half": per_class_f1(rows["0.5"])}
    f1 = {k: dict(zip(("micro_f1", "macro_f1"), f1s(c), strict=True)) for k, c in rows.items()}
    return f1, detail


def parse_args(argv=None) -> argparse.Namespace:
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
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = args.seeds or (2 if args.quick else 5)
    epochs = args.epochs or (6 if args.quick else 40)
    short = args.short_epochs or (2 if args.quick else 5)
    sizes = ({"train": 1500, "val": 500, "test": 500} if args.quick
             else {"train": 8000, "val": 2000, "test": 3000})
    hist_bins = 512
    resamples = 50 if args.quick else 200
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()

    data = load_digits_split(0)
    mc = [multiclass_run(data, s, epochs, args.backend) for s in range(seeds)]
    # Two label distributions x two training budgets: tuning matters when the scores are
    # miscalibrated (under-trained), much less for a well-trained, calibrated model.
    mlres, mldetail = {}, {}
    for setting, skew in (("uniform", None), ("skewed", 0.7)):
        for ep in (short, epochs):
            runs = [multilabel_run(data, s, ep, sizes, skew, args.backend, hist_bins, resamples)
                    for s in range(seeds)]
            key = f"{setting} digits, {ep} epochs"
            mlres[key], mldetail[key] = [r[0] for r in runs], [r[1] for r in runs]
    elapsed = time.time() - t0

    import ce_vs_bce_report as report  # next to this script (run it as a script)

    lines = [f"Command: python examples/ce_vs_bce.py{' --quick' if args.quick else ''}"
             f" (seeds {seeds}, epochs {epochs} / {short}, backend {args.backend} -> "
             f"{fusedloss.resolve_backend(args.backend, 'cpu')}, "
             f"{args.threads} threads, {resamples} bootstrap resamples, {elapsed:.0f} s)",
             f"Machine: {platform.machine()} {platform.processor() or ''} "
             f"{os.cpu_count()} cores, torch {torch.__version__}", ""]
    lines += report.multiclass_table(mc)
    for setting, runs in mlres.items():
        lines += report.multilabel_table(setting, runs, sizes)
    for setting, runs in mldetail.items():
        lines += report.intervals_table(setting, runs)
    print("\n".join(lines))
    pngs = [os.path.join(args.out, name) for name in ("ce_vs_bce.png", "thresholds.png")]
    report.plot(mc, mlres, pngs[0])
    report.plot_thresholds(mldetail, pngs[1])
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"multiclass": mc, "multilabel": mlres, "multilabel_classes": mldetail,
                   "seeds": seeds, "epochs": epochs, "short_epochs": short, "sizes": sizes,
                   "resamples": resamples, "seconds": elapsed}, f, indent=1)
    print(f"\nwrote {' and '.join(pngs)}")
    return mc, mlres, mldetail


if __name__ == "__main__":
    main()
