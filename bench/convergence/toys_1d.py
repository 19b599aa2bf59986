"""The Interpolatron paper's 1-D toys (Xie et al. 2018, Figures 2 and 3):
trajectories of heavy ball and 2-step Interpolatron at the SAME learning rate.

The objectives, the setups (our reconstruction: the paper gives the slopes
and the outcomes, not the breakpoints, starting points or step sizes) and the
trajectory helper are :mod:`interpolatron.toys`; this script runs them,
prints every step, plots every step and prints the paper's numbers next to
ours (they are not targets: ALGORITHMS.md section 5). "Escaped" means past
the barrier from that step on; the first crossing is reported separately.
It also runs the Figure 2 robustness grid (learning rate, start, width,
coefficients) and counts where heavy ball leaves first.

    python bench/convergence/toys_1d.py        # a few seconds
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from convlib import out_dir, plt, run_info, save_fig, save_json

from interpolatron.toys import FIGURE2, FIGURE3, OBJECTIVES, escape_step, first_crossing, trajectory


def run(setup: dict, steps: int) -> dict[str, list[float]]:
    objective, x0, width, lr = setup["objective"], setup["x0"], setup["width"], setup["lr"]
    return {
        "heavy ball": trajectory("heavy_ball", objective, x0, steps, lr, momentum=setup["momentum"],
                                 width=width),
        "Interpolatron-2": trajectory("interpolatron", objective, x0, steps, lr, alphas=setup["alphas"],
                                      width=width),
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
    for t, (x, y) in enumerate(zip(xs, ys)):
        if xlim[0] <= x <= xlim[1] and t <= 16:
            ax.annotate(str(t), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xlim(*xlim)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("x")


def robustness_grid() -> list[dict]:
    """Figure 2 over learning rates, starts, widths and coefficients (400 steps)."""
    rows = []
    for lr in (0.02, 0.05, 0.1, 0.2):
        for x0 in (0.0, 0.002, 0.005, 0.008):
            for width in (0.8, 0.9, 1.0, 1.1):
                for alphas in ((0.05, 0.95), (0.1, 0.9)):
                    hb = trajectory("heavy_ball", "flat_valley", x0, 400, lr, momentum=0.9, width=width)
                    ip = trajectory("interpolatron", "flat_valley", x0, 400, lr, alphas=alphas, width=width)
                    rows.append({"lr": lr, "x0": x0, "width": width, "alphas": alphas,
                                 "heavy_ball": escape_step(hb, width),
                                 "interpolatron": escape_step(ip, width)})
    return rows


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
    first = {k: first_crossing(v, w2) for k, v in fig2.items()}
    grid = robustness_grid()
    hb_first = sum(1 for r in grid if r["heavy_ball"] is not None
                   and (r["interpolatron"] is None or r["heavy_ball"] <= r["interpolatron"]))
    summary = {
        "lr_both": {"figure2": FIGURE2["lr"], "figure3": FIGURE3["lr"]},
        "figure2_escape_step": esc,
        "figure2_first_crossing": first,
        "figure2_paper": {"heavy ball": 29, "Interpolatron-2": 4},
        "figure2_grid_heavy_ball_leaves_first": f"{hb_first} of {len(grid)}",
        "figure2_grid_interpolatron_never_within_400": sum(1 for r in grid if r["interpolatron"] is None),
        "figure3_x_after_2": {k: v[2] for k, v in fig3.items()},
        "figure3_x_after_3": {k: v[3] for k, v in fig3.items()},
        "figure3_x_after_8": {k: v[8] for k, v in fig3.items()},
        "figure3_x_after_9": {k: v[9] for k, v in fig3.items()},
        "figure3_max_abs_x": {k: max(abs(x) for x in v) for k, v in fig3.items()},
        "figure3_paper": {"heavy ball after 2": 14.806, "heavy ball after 8": 50.441},
    }
    print(f"Figure 2 (flat valley), lr {FIGURE2['lr']} for both: every step")
    for k, v in fig2.items():
        print(f"  {k:<16} " + " ".join(f"{x:.3g}" for x in v[:21]))
    print("  steps to leave the local minimum for good (x > width from then on); first crossing")
    for k, v in esc.items():
        print(f"  {k:<16} escapes at {v}, first crosses at {first[k]}   paper: {summary['figure2_paper'][k]}")
    never = summary["figure2_grid_interpolatron_never_within_400"]
    print(f"  robustness grid: heavy ball leaves no later than Interpolatron in {hb_first} of {len(grid)} "
          f"setups (Interpolatron never within 400 steps in {never})")
    print(f"Figure 3 (cliff), lr {FIGURE3['lr']} for both: every step")
    for k, v in fig3.items():
        print(f"  {k:<16} " + " ".join(f"{x:.3g}" for x in v[:21]))
    for k in fig3:
        print(f"  {k:<16} x2 = {fig3[k][2]:8.3f}   x3 = {fig3[k][3]:8.3f}   x8 = {fig3[k][8]:8.3f}   "
              f"x9 = {fig3[k][9]:8.3f}   max |x| over {args.steps} steps = "
              f"{summary['figure3_max_abs_x'][k]:.3f}")
    print("  paper: heavy ball x2 = 14.806, x8 = 50.441 (not reproducible from its Eq. 1)")

    fig, axes = plt.subplots(2, 3, figsize=(17, 8))
    for col, (name, xs) in enumerate(fig2.items()):
        stop = min((esc[name] or args.steps) + 2, args.steps)
        plot_panel(axes[0][col], "flat_valley", w2, xs[:stop + 1],
                   f"Figure 2, {name}, lr {FIGURE2['lr']}: first crosses at step {first[name]}, "
                   f"stays out from step {esc[name]}", (-0.3, 3.0))
    for col, (name, xs) in enumerate(fig3.items()):
        plot_panel(axes[1][col], "cliff", w3, xs[:17],
                   f"Figure 3, {name}, lr {FIGURE3['lr']}: 16 steps, x2 = {xs[2]:.2f}, x3 = {xs[3]:.2f}, "
                   f"x8 = {xs[8]:.2f}, x9 = {xs[9]:.2f}", (-1.0, 30.0))
    for row, (fig_xs, width) in enumerate(((fig2, w2), (fig3, w3))):
        ax = axes[row][2]
        for name, xs in fig_xs.items():
            ax.plot(range(len(xs)), xs, ".-", label=name, lw=1, ms=3)
        ax.axhline(width, color="0.6", lw=0.8, ls="--")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel("step (every step)")
        ax.set_ylabel("x")
        name = "Figure 2" if row == 0 else "Figure 3"
        ax.set_title(f"{name}: x against the step; dashed: width", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("1-D toys (interpolatron.toys reconstruction), same learning rate for both; "
                 "blue: steps right, red: steps left; numbers: step", fontsize=10)
    png = save_fig(fig, out / "toys_1d.png")
    save_json(out / "toys_1d.json", {"info": run_info(torch.device("cpu"), started), "summary": summary,
                                     "setups": {"figure2": FIGURE2, "figure3": FIGURE3},
                                     "trajectories": {"figure2": fig2, "figure3": fig3},
                                     "figure2_grid": grid})
    print(f"wrote {png} and toys_1d.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
