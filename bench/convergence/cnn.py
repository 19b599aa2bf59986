"""A small residual CNN trained with every optimizer of the two papers'
comparisons, on scikit-learn's digits and on a harder synthetic image set.

Optimizers (ALGORITHMS.md section 5's learning rates as they are;
``--lr-scale`` multiplies all but Adam's, which has no curvature scale to
share): SGD 0.25, momentum and Nesterov 0.025 (tau 0.9), Adam 5e-4,
Interpolatron-2 0.1 with a = (0.05, 0.95), Interpolatron-3 0.1 with
a = (0.1, 0.3, 0.6), Anderson-2 0.25; weight decay 2e-4 in the
objective; lr / 10 at 50 % and 75 % of the epochs (the Interpolatron paper's
step schedule, compressed). SGD + momentum + offline RNA is the momentum run
itself (offline RNA never changes training) with the RNA extrapolation
(window 10, snapshots once per epoch, parameters and batch-norm statistics)
evaluated through ``rna.swapped()`` after every epoch.

Several seeds (data order and initialisation; every optimizer of a seed starts
from the same weights); loss and accuracy curves (mean, min-max band); the
RNA paper's table: epochs until the test error is within a tolerance of the
best test error any method reached (seed means).

    python bench/convergence/cnn.py             # a few minutes on a 2-core CPU
    python bench/convergence/cnn.py --quick     # one seed, fewer epochs
    python bench/convergence/cnn.py --device cuda --epochs 40 --seeds 5
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import numpy as np
import torch
from convlib import device_of, out_dir, plt, run_info, save_fig, save_json
from torch import Tensor, nn
from torch.nn import functional as F

from interpolatron import RNA, Anderson, Interpolatron
from interpolatron.demo import ResidualBlock as Block

WEIGHT_DECAY = 2e-4
RNA_LABEL = "momentum + offline RNA"


# -- data ---------------------------------------------------------------------


def digits(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8x8 digits (1,797 images), 80/20 stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X = (d.images / 16.0).astype(np.float32)[:, None]
    Xtr, Xte, ytr, yte = train_test_split(X, d.target, test_size=0.2, stratify=d.target, random_state=seed)
    mean, std = Xtr.mean(), Xtr.std()
    return (torch.tensor((Xtr - mean) / std), torch.tensor(ytr), torch.tensor((Xte - mean) / std),
            torch.tensor(yte))


def _shape(kind: int, size: int, rng: np.random.Generator, side: int) -> np.ndarray:
    """One 16x16 image of class ``kind``: a shape or texture at a random place,
    size, contrast and phase."""
    img = np.zeros((side, side), np.float32)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    s = size
    cy, cx = rng.uniform(s / 2, side - s / 2, 2)
    dy, dx = yy - cy, xx - cx
    r = np.hypot(dy, dx)
    box = (np.abs(dy) <= s / 2) & (np.abs(dx) <= s / 2)
    if kind == 0:    # filled square
        img[box] = 1
    elif kind == 1:  # hollow square
        img[box & ((np.abs(dy) > s / 2 - 1.2) | (np.abs(dx) > s / 2 - 1.2))] = 1
    elif kind == 2:  # disk
        img[r <= s / 2] = 1
    elif kind == 3:  # ring
        img[(r <= s / 2) & (r > s / 2 - 1.3)] = 1
    elif kind == 4:  # plus
        img[box & ((np.abs(dy) < 0.8) | (np.abs(dx) < 0.8))] = 1
    elif kind == 5:  # x
        img[box & ((np.abs(dy - dx) < 0.9) | (np.abs(dy + dx) < 0.9))] = 1
    elif kind == 6:  # horizontal stripes (texture over the whole image)
        period = rng.uniform(3, 5)
        img[:] = (np.sin(2 * np.pi * yy / period + rng.uniform(0, 2 * np.pi)) > 0)
    elif kind == 7:  # vertical stripes
        period = rng.uniform(3, 5)
        img[:] = (np.sin(2 * np.pi * xx / period + rng.uniform(0, 2 * np.pi)) > 0)
    elif kind == 8:  # triangle (pointing up)
        img[(dy <= s / 2) & (dy >= -s / 2) & (np.abs(dx) <= (dy + s / 2) / 2)] = 1
    else:            # checkerboard
        cell = int(rng.integers(2, 4))
        oy, ox = rng.integers(0, cell, 2)
        img[:] = (((yy + oy) // cell + (xx + ox) // cell) % 2)
    return img * rng.uniform(0.4, 1.0)


def shapes(seed: int = 0, n_train: int = 2000, n_test: int = 1000, noise: float = 0.6,
           side: int = 16) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """10 classes of shapes and textures in 16x16 images with Gaussian noise of
    ``noise`` times the shapes' mean contrast: harder than the digits."""
    rng = np.random.default_rng(1000 + seed)
    n = n_train + n_test
    y = rng.integers(0, 10, n)
    X = np.stack([_shape(int(k), int(rng.integers(5, 11)), rng, side) for k in y])
    X += noise * 0.7 * rng.standard_normal(X.shape).astype(np.float32)
    X = ((X - X[:n_train].mean()) / X[:n_train].std()).astype(np.float32)[:, None]
    return (torch.tensor(X[:n_train]), torch.tensor(y[:n_train]), torch.tensor(X[n_train:]),
            torch.tensor(y[n_train:]))


Data = tuple[Tensor, Tensor, Tensor, Tensor]
DATASETS: dict[str, Callable[..., Data]] = {"digits": digits, "shapes": shapes}


# -- model ----------------------------------------------------------------------


def resnet(width: int = 16, classes: int = 10, stem_stride: int = 1) -> nn.Module:
    """Stem, two residual blocks, a strided stage with one more, pooling, linear.
    ``stem_stride = 2`` for 16x16 inputs keeps the cost of the 8x8 digits (this
    CPU is small; the shapes stay resolvable at 8x8 after a 3x3 stem)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, stride=stem_stride, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        Block(width), Block(width),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        Block(2 * width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes))


# -- optimizers -------------------------------------------------------------------


def recipes(scale: float) -> dict[str, Callable]:
    wd = WEIGHT_DECAY
    sgd = torch.optim.SGD
    interp = Interpolatron
    return {
        "SGD": lambda p: sgd(p, lr=0.25 * scale, weight_decay=wd),
        "momentum": lambda p: sgd(p, lr=0.025 * scale, momentum=0.9, weight_decay=wd),
        "Nesterov": lambda p: sgd(p, lr=0.025 * scale, momentum=0.9, nesterov=True, weight_decay=wd),
        "Adam": lambda p: torch.optim.Adam(p, lr=5e-4, weight_decay=wd),
        "Interpolatron-2": lambda p: interp(p, lr=0.1 * scale, alphas=(0.05, 0.95), weight_decay=wd),
        "Interpolatron-3": lambda p: interp(p, lr=0.1 * scale, alphas=(0.1, 0.3, 0.6), weight_decay=wd),
        "Anderson-2": lambda p: Anderson(p, lr=0.25 * scale, history=2, weight_decay=wd),
    }


@torch.no_grad()
def evaluate(model: nn.Module, X: Tensor, y: Tensor, batch: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode."""
    model.eval()
    loss = correct = 0.0
    for i in range(0, len(X), batch):
        out = model(X[i:i + batch])
        loss += float(F.cross_entropy(out, y[i:i + batch], reduction="sum"))
        correct += float((out.argmax(1) == y[i:i + batch]).sum())
    model.train()
    return loss / len(X), correct / len(X)


def train(name: str, make_opt: Callable, data, seed: int, epochs: int, batch: int, width: int,
          device: torch.device, window: int, reg: float) -> dict[str, dict[str, list[float]]]:
    """One run; returns curves per label (``name``, and RNA's for momentum)."""
    Xtr, ytr, Xte, yte = data
    torch.manual_seed(seed)
    model = resnet(width, stem_stride=1 if Xtr.shape[-1] <= 8 else 2).to(device)
    opt = make_opt(model.parameters())
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [epochs // 2, (3 * epochs) // 4], gamma=0.1)
    rna = RNA(model, window=window, reg=reg) if name == "momentum" else None
    if rna is not None:
        rna.record()  # y_0: the initial weights
    gen = torch.Generator(device="cpu").manual_seed(seed)
    curves = {name: {"train_loss": [], "test_loss": [], "test_acc": []}}
    if rna is not None:
        curves[RNA_LABEL] = {"train_loss": [], "test_loss": [], "test_acc": []}

    def log(label: str, m: nn.Module):
        tr, _ = evaluate(m, Xtr[:1000], ytr[:1000])  # a fixed training subset: cheaper
        te, acc = evaluate(m, Xte, yte)
        c = curves[label]
        c["train_loss"].append(tr)
        c["test_loss"].append(te)
        c["test_acc"].append(acc)

    for _ in range(epochs):
        order = torch.randperm(len(Xtr), generator=gen).to(device)
        for i in range(0, len(Xtr), batch):
            idx = order[i:i + batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
        sched.step()
        log(name, model)
        if rna is not None:
            rna.record()
            with rna.swapped():  # the extrapolated weights and BN statistics, restored after
                log(RNA_LABEL, model)
    for c in curves.values():
        if not all(math.isfinite(v) for v in c["train_loss"]):
            print(f"  warning: {name} seed {seed} diverged (non-finite loss)")
    return curves


def epochs_to_tolerance(mean_err: dict[str, list[float]], tols: list[float]) -> tuple[float, dict]:
    """First epoch (1-based) at which each method's seed-mean test error is within
    ``tol`` of the best test error any method reached."""
    best = min(min(v) for v in mean_err.values())
    table = {}
    for label, errs in mean_err.items():
        table[label] = {f"{t:g}": next((e + 1 for e, v in enumerate(errs) if v <= best + t), None)
                        for t in tols}
    return best, table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "shapes"], choices=sorted(DATASETS))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--lr-scale", type=float, default=1.0,
                        help="multiplies the papers' learning rates (not Adam's)")
    parser.add_argument("--window", type=int, default=10, help="RNA window (snapshots once per epoch)")
    parser.add_argument("--reg", type=float, default=1e-5, help="RNA lambda (relative)")
    parser.add_argument("--only", nargs="+", default=None, help="a subset of the optimizers")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--out", default=None, help="default: bench/results/convergence")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--quick", action="store_true", help="one seed, 6 epochs")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: these models are too small for two threads to pay, "
                             "and on a shared CPU two threads stall each other)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.epochs = 1, 6
    started = time.time()
    device = device_of(args.device)
    out = out_dir(args.out)
    suffix = f"_{args.tag}" if args.tag else ""
    tols = [0.05, 0.02, 0.01, 0.005]
    all_results = {}
    for ds in args.datasets:
        data = tuple(t.to(device) for t in DATASETS[ds](0))
        opts = recipes(args.lr_scale)
        if args.only:
            opts = {k: v for k, v in opts.items() if k in args.only}
        runs: dict[str, list[dict[str, list[float]]]] = {}
        times: dict[str, float] = {}
        for name, make in opts.items():
            t0 = time.time()
            for seed in range(args.seeds):
                for label, c in train(name, make, data, seed, args.epochs, args.batch, args.width, device,
                                      args.window, args.reg).items():
                    runs.setdefault(label, []).append(c)
            times[name] = time.time() - t0
            last = [r["test_acc"][-1] for r in runs[name]]
            print(f"{ds:<7} {name:<16} final test acc {np.mean(last):.4f} "
                  f"(seeds {', '.join(f'{a:.3f}' for a in last)})  {times[name]:.1f} s", flush=True)
            if name == "momentum":
                last = [r["test_acc"][-1] for r in runs[RNA_LABEL]]
                print(f"{ds:<7} {RNA_LABEL:<16} final test acc {np.mean(last):.4f} "
                      f"(seeds {', '.join(f'{a:.3f}' for a in last)})", flush=True)
        mean = {label: {k: np.mean([r[k] for r in rs], axis=0).tolist() for k in rs[0]}
                for label, rs in runs.items()}
        mean_err = {label: [1 - a for a in m["test_acc"]] for label, m in mean.items()}
        best, table = epochs_to_tolerance(mean_err, tols)
        ref = table.get("momentum")
        print(f"\n{ds}: epochs until the mean test error is within tol of the best ({100 * best:.2f} %)")
        print(f"{'optimizer':<24}" + "".join(f"{100 * t:>9g} %" for t in tols))
        for label, row in table.items():
            cells = []
            for t in tols:
                e, r = row[f"{t:g}"], (ref or {}).get(f"{t:g}")
                cells.append(f"{('-' if e is None else str(e)) + (f' ({r / e:.2f})' if e and r else ''):>11}")
            print(f"{label:<24}" + "".join(cells))
        all_results[ds] = {"best_test_error": best, "epochs_to_tolerance": table, "mean": mean,
                           "runs": runs, "seconds": times,
                           "final_test_acc": {k: [r["test_acc"][-1] for r in rs] for k, rs in runs.items()}}
        # curves: train loss, test loss, test accuracy; mean with min-max band over seeds
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
        epochs = np.arange(1, args.epochs + 1)
        for label, rs in runs.items():
            for ax, key in zip(axes, ("train_loss", "test_loss", "test_acc")):
                arr = np.array([r[key] for r in rs])
                style = "--" if label == RNA_LABEL else "-"
                (line,) = ax.plot(epochs, arr.mean(0), style, label=label, lw=1.4)
                ax.fill_between(epochs, arr.min(0), arr.max(0), color=line.get_color(), alpha=0.15)
        titles = ("train loss (1,000 training images, eval mode)", "test loss", "test accuracy")
        for ax, title in zip(axes, titles):
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[0].set_yscale("log")
        axes[1].set_yscale("log")
        worst = min(np.mean([r["test_acc"][-1] for r in rs]) for rs in runs.values())
        axes[2].set_ylim(max(0.0, worst - 0.15), 1.0)
        axes[2].legend(fontsize=8)
        fig.suptitle(f"{ds}: small ResNet (width {args.width}), batch {args.batch}, {args.seeds} seeds, "
                     f"lr scale {args.lr_scale}, lr/10 after epochs {args.epochs // 2} and "
                     f"{3 * args.epochs // 4}",
                     fontsize=10)
        save_fig(fig, out / f"cnn_{ds}{suffix}.png")
    save_json(out / f"cnn{suffix}.json", {"info": run_info(device, started), "args": vars(args),
                                  "results": all_results})
    print(f"\nwrote cnn_*{suffix}.png and cnn{suffix}.json under {out} ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
