"""Learning-rate sweep of every optimizer of ``interpolatron demo``.

Trains the demo's small ResNet on scikit-learn's digits (the demo's own
``train_one``: same model, data split, batch, epochs and weight decay) for each
optimizer at each learning rate of its grid (factors of 2 around the papers'
rates) and several seeds, and picks for each optimizer the rate with the lowest
seed-mean final training loss (a non-finite loss counts as divergence). The
rates it finds are what ``interpolatron demo`` uses (``demo.TUNED_LR``).

    python bench/convergence/lr_sweep.py                 # about 10 min on one idle core
    python bench/convergence/lr_sweep.py --only Adam SGD --seeds 2

Writes ``lr_sweep.json`` (every run's loss curve and test accuracy, the chosen
rates with their seed spreads) and ``lr_sweep.png`` under
``bench/results/convergence``.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from convlib import device_of, out_dir, plt, run_info, save_fig, save_json

from interpolatron import demo

# Factors of 2. Momentum's rates are SGD's divided by 5, i.e. effective steps
# lr / (1 - 0.9) of twice SGD's (a first sweep at SGD's / 10 chose its top
# rate); Interpolatron's are SGD's times about 2 (its effective
# step is lr / sum_i i*a_i: lr / 1.95 for (0.05, 0.95), lr / 2.5 for
# (0.1, 0.3, 0.6)).
_SGD = [0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6]
GRIDS: dict[str, list[float]] = {
    "SGD": _SGD,
    "momentum": [v / 5 for v in _SGD],
    "Nesterov": [v / 5 for v in _SGD],
    "Adam": [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2],
    "Interpolatron-2": [2 * v for v in _SGD],
    "Interpolatron-3": [2 * v for v in _SGD],
    "Anderson-2": [4 * v for v in _SGD],  # a first sweep at SGD's chose its top rate
    "momentum+RNA": [v / 5 for v in _SGD],
}


def score(losses: list[float]) -> float:
    """The final training loss, infinite when the run diverged."""
    return losses[-1] if all(math.isfinite(v) for v in losses) else math.inf


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per learning rate: mean, std, min, max of the final training loss and the
    test accuracy over seeds; and the chosen rate."""
    table = {}
    for lr, rs in runs.items():
        finals = np.array([score(r["losses"]) for r in rs])
        accs = np.array([r["accuracy"] for r in rs])
        table[lr] = {"final_loss_mean": float(finals.mean()), "final_loss_std": float(finals.std()),
                     "final_loss_min": float(finals.min()), "final_loss_max": float(finals.max()),
                     "test_acc_mean": float(accs.mean()), "test_acc_min": float(accs.min()),
                     "test_acc_max": float(accs.max()), "diverged": int(np.sum(~np.isfinite(finals)))}
    best = min(table, key=lambda k: table[k]["final_loss_mean"])
    lrs = sorted(table, key=float)
    return {"per_lr": table, "best_lr": float(best), "best": table[best],
            "at_grid_edge": best in (lrs[0], lrs[-1])}


def report(path) -> str:
    """The markdown table of RESULTS.md section 2.4, from a result file."""
    data = json.loads(path.read_text())
    rows = ["| optimizer | grid | tuned lr | final train loss, mean +- std [min, max] | test acc % mean "
            "[min, max] | at the paper's rate (demo scale) |", "|---|---|---|---|---|---|"]
    for name, res in data["results"].items():
        b = res["best"]
        paper = demo.PAPER_LR[name]
        at_paper = res["per_lr"].get(f"{paper:g}")
        paper_cell = (f"lr {paper:g}: {at_paper['final_loss_mean']:.4f} +- {at_paper['final_loss_std']:.4f}"
                      if at_paper else f"lr {paper:g}: not on the grid")
        grid = f"{res['grid'][0]:g} .. {res['grid'][-1]:g}"
        edge = " (grid edge)" if res["at_grid_edge"] else ""
        rows.append(f"| {name} | {grid} | {res['best_lr']:g}{edge} | {b['final_loss_mean']:.4f} +- "
                    f"{b['final_loss_std']:.4f} [{b['final_loss_min']:.4f}, {b['final_loss_max']:.4f}] | "
                    f"{100 * b['test_acc_mean']:.1f} [{100 * b['test_acc_min']:.1f}, "
                    f"{100 * b['test_acc_max']:.1f}] | {paper_cell} |")
    return "\n".join(rows)


def save(path, device, started, args, commands, results, complete: bool) -> None:
    info = run_info(device, started)
    info["commands"] = commands + [info["command"]]  # merged files: every command that wrote them
    ordered = {k: results[k] for k in GRIDS if k in results}
    save_json(path, {"info": info, "args": vars(args), "complete": complete, "results": ordered})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15, help="the demo's default")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--only", nargs="+", default=None, choices=sorted(GRIDS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="default: bench/results/convergence")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--report", action="store_true",
                        help="print the markdown table of an existing result file and exit")
    parser.add_argument("--merge", action="store_true",
                        help="keep the optimizers of an existing result file that this run does not redo")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    device = device_of(args.device)
    out = out_dir(args.out)
    suffix = f"_{args.tag}" if args.tag else ""
    if args.report:
        print(report(out / f"lr_sweep{suffix}.json"))
        return 0
    train, test = demo.load_digits_tensors(device, 0)  # the demo's split (seed 0)
    names = args.only or list(GRIDS)
    results: dict[str, dict] = {}
    path = out / f"lr_sweep{suffix}.json"
    if args.merge and path.exists():
        old = json.loads(path.read_text())
        results = {k: v for k, v in old["results"].items() if k not in names}
        commands = old["info"].get("commands", [old["info"]["command"]])
    else:
        commands = []
    for name in names:
        runs: dict[str, list[dict]] = {}
        t0 = time.time()
        for lr in GRIDS[name]:
            for seed in range(args.seeds):
                r = demo.train_one(name, lambda p, n=name, v=lr: demo.make_optimizer(n, p, v), train, test,
                                   device, args.epochs, args.batch, seed)
                runs.setdefault(f"{lr:g}", []).append(
                    {"seed": seed, "losses": r.losses, "accuracy": r.accuracy})
        results[name] = {"grid": GRIDS[name], "runs": runs, **summarise(runs),
                         "seconds": round(time.time() - t0, 1)}
        b = results[name]["best"]
        edge = "  (AT THE GRID EDGE)" if results[name]["at_grid_edge"] else ""
        print(f"{name:<16} best lr {results[name]['best_lr']:<8g} final train loss "
              f"{b['final_loss_mean']:.4f} +- {b['final_loss_std']:.4f} "
              f"[{b['final_loss_min']:.4f}, {b['final_loss_max']:.4f}]  test acc "
              f"{100 * b['test_acc_mean']:.1f} % "
              f"[{100 * b['test_acc_min']:.1f}, {100 * b['test_acc_max']:.1f}]"
              f"  {results[name]['seconds']:.0f} s{edge}", flush=True)
        # partial results survive an interrupted sweep
        save(path, device, started, args, commands, results, complete=False)
    save(path, device, started, args, commands, results, complete=set(GRIDS) <= set(results))

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    for name, res in ((k, results[k]) for k in GRIDS if k in results):
        lrs = np.array(res["grid"])
        rel = lrs / res["best_lr"]
        mean = np.array([res["per_lr"][f"{v:g}"]["final_loss_mean"] for v in lrs])
        lo = np.array([res["per_lr"][f"{v:g}"]["final_loss_min"] for v in lrs])
        hi = np.array([res["per_lr"][f"{v:g}"]["final_loss_max"] for v in lrs])
        finite = np.isfinite(mean)
        (line,) = axes[0].plot(rel[finite], mean[finite], "o-", label=f"{name} (best {res['best_lr']:g})")
        axes[0].fill_between(rel[finite], lo[finite], np.where(np.isfinite(hi), hi, np.nan)[finite],
                             color=line.get_color(), alpha=0.15)
        curves = np.array([r["losses"] for r in res["runs"][f"{res['best_lr']:g}"]])
        epochs = np.arange(1, curves.shape[1] + 1)
        axes[1].plot(epochs, curves.mean(0), color=line.get_color(), label=name)
        axes[1].fill_between(epochs, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15)
    axes[0].set_xscale("log", base=2)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("learning rate / tuned learning rate")
    axes[0].set_ylabel(f"final training loss (mean, min-max over {args.seeds} seeds)")
    axes[0].legend(fontsize=7)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("training loss at the tuned rate (RNA: extrapolated)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"interpolatron demo (digits, small ResNet): learning-rate sweep, {args.epochs} epochs, "
                 f"batch {args.batch}, {args.seeds} seeds", fontsize=10)
    save_fig(fig, out / f"lr_sweep{suffix}.png")
    print(f"wrote lr_sweep{suffix}.json and .png under {out} ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
