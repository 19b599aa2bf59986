"""Adaptive RNA with and without the line search, on logistic-regression windows.

For each window of snapshots (gradient descent or minibatch SGD on the
Madelon-like logistic regression of logreg_rna.py, float64, window k, one
snapshot per step or per epoch), the objective at:

- the newest snapshot,
- the best extrapolation over the lambda grid alone (what ``RNA(objective=)``
  returned before the line search),
- ``RNA(objective=)`` now: the grid, the line search from the oldest snapshot
  (t doubling while the objective decreases), the fall-back to the newest.

    python bench/convergence/rna_adaptive.py        # under a minute on one core

Writes ``rna_adaptive.json`` under ``bench/results/convergence``.
"""

from __future__ import annotations

import argparse
import time

import torch
from convlib import out_dir, run_info, save_json
from logreg_rna import LogReg, optimum
from torch import nn

from interpolatron import RNA


class Linear(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d, dtype=torch.float64))


def windows(prob: LogReg, method: str, window: int, stops: list[int], seed: int):
    """Yields (stop, adaptive RNA, grid-only value) after ``stop`` snapshots."""
    model = Linear(prob.X.shape[1])
    f = lambda m: prob.f(m.w.detach())  # noqa: E731
    rna = RNA(model, window=window, objective=f, backend="torch")
    rna.record()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=1.0 / prob.L)
    n = len(prob.X)
    for s in range(1, max(stops) + 1):
        if method == "gd":
            model.w.grad = prob.grad(model.w.detach())
            opt.step()
        else:  # one epoch of minibatch SGD (batch 50) between snapshots
            order = torch.randperm(n, generator=gen)
            for i in range(0, n, 50):
                idx = order[i:i + 50]
                margins = prob.y[idx] * (prob.X[idx] @ model.w.detach())
                g = -(prob.X[idx].T @ (prob.y[idx] * torch.sigmoid(-margins))) / len(idx)
                model.w.grad = g + prob.tau * model.w.detach()
                opt.step()
        rna.record()
        if s in stops:
            yield s, rna, f


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kappas", type=float, nargs="+", default=[1e2, 1e4])
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--stops", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--features", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    rows = []
    for kappa in args.kappas:
        prob = LogReg(args.samples, args.features, kappa, 0, torch.device("cpu"))
        fstar = optimum(prob)
        for method in ("gd", "sgd"):
            for stop, rna, _ in windows(prob, method, args.window, args.stops, 0):
                newest = prob.f(rna._named["w"].detach())
                out = rna.extrapolate()
                value = prob.f(out["w"])
                # the grid's best extrapolation, from the window's snapshots
                c = rna.coefficients_for(rna.reg_used)
                ages = torch.arange(len(c))
                b = rna._snap[0]
                slots = torch.remainder(b.count - 1 - ages, b.slots)
                w_grid = c @ b.window.index_select(0, slots)
                grid_value = prob.f(w_grid)
                row = {"kappa": kappa, "method": method, "snapshots": stop, "fstar": fstar,
                       "newest": newest - fstar, "grid_only": grid_value - fstar,
                       "line_search": value - fstar,
                       "t": rna.step_used, "fell_back": rna.fell_back, "reg_used": rna.reg_used}
                rows.append(row)
                print(f"kappa {kappa:g} {method:<3} after {stop:>3}: f - f* newest {row['newest']:.4g}, "
                      f"grid only {row['grid_only']:.4g}, with line search {row['line_search']:.4g} "
                      f"(t {rna.step_used:g}"
                      f"{', fell back' if rna.fell_back else ''})", flush=True)
    save_json(out_dir(None) / "rna_adaptive.json", {"info": run_info(torch.device("cpu"), started),
                                                    "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
