"""Offline RNA's batch-norm statistics on the demo's CNN: extrapolated and
clamped (the default), extrapolated unclamped (``positive_buffers=[]``, what
RNA did before), or recomputed from the training data (``bn_loader=``, the
recommended path); against the momentum iterate itself.

The demo's momentum+RNA setup (digits, small ResNet, batch 64, 15 epochs,
window 5, lambda 1e-6, one snapshot per epoch), at the learning rates given.

    python bench/convergence/rna_bn.py                 # a few minutes on one core
    python bench/convergence/rna_bn.py --lrs 0.32 0.16 --seeds 3

Writes ``rna_bn.json`` under ``bench/results/convergence``.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from convlib import out_dir, run_info, save_json
from torch.nn import functional as F

from interpolatron import RNA, demo

VARIANTS = ("iterate", "RNA clamped", "RNA unclamped", "RNA bn_loader")


def run(lr: float, seed: int, epochs: int, batch: int = 64) -> dict[str, list[float]]:
    train, _ = demo.load_digits_tensors(torch.device("cpu"), 0)
    x, y = train
    torch.manual_seed(seed)
    model = demo.small_resnet()
    opt = demo.make_optimizer("momentum", model.parameters(), lr)
    window = min(5, epochs)
    clamped = RNA(model, window=window, reg=1e-6)
    unclamped = RNA(model, window=window, reg=1e-6, positive_buffers=[])
    loader = [x[i:i + 256] for i in range(0, len(x), 256)]
    for r in (clamped, unclamped):
        r.record()
    curves: dict[str, list[float]] = {v: [] for v in VARIANTS}
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for r in (clamped, unclamped):
            r.record()
        curves["iterate"].append(demo.evaluate(model, train)[0])
        with clamped.swapped():
            curves["RNA clamped"].append(demo.evaluate(model, train)[0])
        with unclamped.swapped():
            curves["RNA unclamped"].append(demo.evaluate(model, train)[0])
        with clamped.swapped(bn_loader=loader):
            curves["RNA bn_loader"].append(demo.evaluate(model, train)[0])
    return curves


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.32, 0.16, 0.02])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    results = {}
    for lr in args.lrs:
        runs = [run(lr, seed, args.epochs) for seed in range(args.seeds)]
        summary = {}
        for v in VARIANTS:
            finals = np.array([c[v][-1] for c in runs])
            nonfinite_epochs = int(sum(not math.isfinite(val) for c in runs for val in c[v]))
            summary[v] = {"final": finals.tolist(), "final_mean": float(np.mean(finals)),
                          "nonfinite_epochs": nonfinite_epochs,
                          "nonfinite_final_seeds": int(np.sum(~np.isfinite(finals)))}
            print(f"lr {lr:g} {v:<14} final train loss per seed {', '.join(f'{f:.4g}' for f in finals)}; "
                  f"non-finite in {nonfinite_epochs} of {args.seeds * args.epochs} epochs", flush=True)
        results[f"{lr:g}"] = {"summary": summary, "runs": runs}
        save_json(out_dir(None) / "rna_bn.json", {"info": run_info(torch.device("cpu"), started),
                                                 "args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
