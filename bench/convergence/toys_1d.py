"""The Interpolatron paper's 1-D toys (Xie et al. 2018, Figures 2 and 3):
trajectories of heavy ball and 2-step Interpolatron.

The objectives, the setups (our reconstruction: the paper gives the slopes
and the outcomes, not the breakpoints, starting points or step sizes) and the
trajectory helper are :mod:`interpolatron.toys`; this script runs them, plots
them and prints the numbers the paper quotes next to ours.

    python bench/convergence/toys_1d.py        # about a second
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from convlib import out_dir, plt, run_info, save_fig, save_json

from interpolatron.toys import FIGURE2, FIGURE3, OBJECTIVES, escape_step, trajectory


def run(setup: dict, steps: int) -> dict[str, list[float]]:
    setup = dict(setup)
    objective, x0, width = setup.pop("objective"), setup["x0"], setup["width"]
    return {
        "heavy ball": trajectory("heavy_ball", objective, x0, steps, setup["heavy_ball_lr"],
                                 momentum=setup["momentum"], width=width),
        "Interpolatron-2": trajectory("interpolatron", objective, x0, steps, setup["lr"],
                                      alphas=setup["alphas"], width=width),
    }


def plot_panel(ax, objective: str, width: float, xs: list[float], title: str, xlim: tuple[float, float]):
    f = OBJECTIVES[objective]
    grid = np.linspace(*xlim, 800)
    ax.plot(grid, f(torch.tensor(grid), width=width).numpy(), color="0.6", lw=1)
    ys = f(torch.tensor(xs, dtype=torch.float64), width=width).numpy()
    for t in range(len(xs) - 1):
        color = "tab:blue" if xs[t + 1] >= xs[t] else "tab:red"
        ax.annotate("", (xs[t + 1], ys[t + 1]), (xs[t], ys[t]),
                    arrowprops=dict(arrowstyle="->", color=color, lw=1, shrinkA=0, shrinkB=0))
    ax.plot(xs, ys, ".", color="k", ms=3)
    ax.set_xlim(*xlim)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=None, help="default: bench/results/convergence")
    args = parser.parse_args(argv)
    started = time.time()
    out = out_dir(args.out)
    fig2, fig3 = run(FIGURE2, args.steps), run(FIGURE3, args.steps)
    w2, w3 = FIGURE2["width"], FIGURE3["width"]
    esc = {k: escape_step(v, w2) for k, v in fig2.items()}
    summary = {
        "figure2_escape_step": esc,
        "figure2_paper": {"heavy ball": 29, "Interpolatron-2": 4},
        "figure3_x_after_2": {k: v[2] for k, v in fig3.items()},
        "figure3_x_after_8": {k: v[8] for k, v in fig3.items()},
        "figure3_max_abs_x": {k: max(abs(x) for x in v) for k, v in fig3.items()},
        "figure3_paper": {"heavy ball after 2": 14.806, "heavy ball after 8": 50.441},
    }
    print("Figure 2 (flat valley): steps to leave the local minimum (x > width)")
    for k, v in esc.items():
        print(f"  {k:<16} ours {v}   paper {summary['figure2_paper'][k]}")
    print("Figure 3 (cliff): position after 2 and after 8 steps")
    for k in fig3:
        print(f"  {k:<16} x2 = {fig3[k][2]:8.3f}   x8 = {fig3[k][8]:8.3f}   "
              f"max |x| over {args.steps} steps = {summary['figure3_max_abs_x'][k]:.3f}")
    print("  paper: heavy ball x2 = 14.806, x8 = 50.441; Interpolatron stays near the minimum")

    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    for col, (name, xs) in enumerate(fig2.items()):
        stop = (esc[name] or args.steps) + 1
        plot_panel(axes[0][col], "flat_valley", w2, xs[:stop + 1],
                   f"Figure 2, {name}: leaves the local minimum at step {esc[name]} "
                   f"(paper: {summary['figure2_paper'][name]})", (-0.3, 2.0))
    for col, (name, xs) in enumerate(fig3.items()):
        plot_panel(axes[1][col], "cliff", w3, xs[:9],
                   f"Figure 3, {name}: 8 steps, x2 = {xs[2]:.2f}, x8 = {xs[8]:.2f}", (-1.0, 12.0))
    fig.suptitle("1-D toys (interpolatron.toys reconstruction); blue: steps right, red: steps left",
                 fontsize=10)
    png = save_fig(fig, out / "toys_1d.png")
    save_json(out / "toys_1d.json", {"info": run_info(torch.device("cpu"), started), "summary": summary,
                                     "setups": {"figure2": FIGURE2, "figure3": FIGURE3},
                                     "trajectories": {"figure2": fig2, "figure3": fig3}})
    print(f"wrote {png} and toys_1d.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
