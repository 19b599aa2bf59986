"""RNA on L2-regularised logistic regression (Scieur et al., Section 4.1, Figure 1).

Madelon-like data (scikit-learn's ``make_classification`` is the Madelon
generator: 500 features, 5 informative, 15 redundant, the rest noise), the
L2 term setting the condition number ``kappa = (L_loss + tau) / tau`` with
``L_loss = ||X||_2^2 / (4 n)``. Everything in float64.

Methods, against gradient evaluations:
gradient descent (step 1/L), Nesterov (step 1/L, momentum
(sqrt(kappa)-1)/(sqrt(kappa)+1), torch.optim.SGD's nesterov form),
L-BFGS (scipy's L-BFGS-B, memory 10, its strong-Wolfe line search; every
function+gradient call counts), offline RNA on gradient descent and on
Nesterov (extrapolating the window of past iterates after every step; costs
no gradient evaluation), online RNA on gradient descent and on Nesterov
(the extrapolation replaces the iterate after every step; the residuals are
the gradients at the points the steps start from, Scieur et al.'s scheme;
Nesterov's momentum buffer is reset after each extrapolation unless
``--keep-momentum``).

f* comes from a long L-BFGS run polished by Newton steps (exact Hessian,
500 x 500) to the precision of float64.

Claims tested (ALGORITHMS.md section 5): online RNA is competitive with
L-BFGS; offline RNA shifts the gradient-descent and Nesterov curves by a
constant factor (same slope).

    python bench/convergence/logreg_rna.py            # ~20 s on a 2-core CPU
    python bench/convergence/logreg_rna.py --quick
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from convlib import device_of, out_dir, plt, run_info, save_fig, save_json
from scipy.optimize import minimize
from sklearn.datasets import make_classification

from interpolatron import RNA


class LogReg:
    """f(w) = mean(log(1 + exp(-y x.w))) + tau/2 ||w||^2 on (X, y), float64."""

    def __init__(self, n: int, d: int, kappa: float, seed: int, device: torch.device):
        X, y = make_classification(n_samples=n, n_features=d, n_informative=5, n_redundant=15,
                                   n_repeated=0, random_state=seed)
        X = (X - X.mean(0)) / X.std(0)
        self.X = torch.tensor(X, dtype=torch.float64, device=device)
        self.y = torch.tensor(2.0 * y - 1.0, dtype=torch.float64, device=device)
        self.n = n
        l_loss = float(torch.linalg.matrix_norm(self.X, ord=2)) ** 2 / (4 * n)
        self.tau = l_loss / (kappa - 1.0)  # (l_loss + tau) / tau = kappa
        self.L = l_loss + self.tau
        self.kappa = kappa
        self.evals = 0

    def f(self, w: torch.Tensor) -> float:
        margins = self.y * (self.X @ w)
        return float(torch.nn.functional.softplus(-margins).mean() + 0.5 * self.tau * (w @ w))

    def grad(self, w: torch.Tensor) -> torch.Tensor:
        self.evals += 1
        s = torch.sigmoid(-self.y * (self.X @ w))
        return -(self.X.T @ (self.y * s)) / self.n + self.tau * w

    def hessian(self, w: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.y * (self.X @ w))
        weights = s * (1 - s) / self.n
        H = self.X.T @ (self.X * weights[:, None])
        return H + self.tau * torch.eye(len(w), dtype=w.dtype, device=w.device)


def optimum(prob: LogReg) -> float:
    """f* to float64 precision: L-BFGS to its own limit, then Newton steps."""
    X = prob.X.cpu().numpy()
    def fg(w_np):
        w = torch.tensor(w_np, dtype=torch.float64, device=prob.X.device)
        g = prob.grad(w)
        return prob.f(w), g.cpu().numpy()
    res = minimize(fg, np.zeros(X.shape[1]), jac=True, method="L-BFGS-B",
                   options={"maxiter": 50000, "maxfun": 100000, "ftol": 0.0, "gtol": 1e-13})
    w = torch.tensor(res.x, dtype=torch.float64, device=prob.X.device)
    best = prob.f(w)
    for _ in range(8):  # Newton: quadratic convergence from L-BFGS's point
        w = w - torch.linalg.solve(prob.hessian(w), prob.grad(w))
        best = min(best, prob.f(w))
    return best


def run_first_order(prob: LogReg, method: str, evals: int, window: int, reg: float,
                    rna_mode: str | None, reset: bool = False) -> tuple[list[int], list[float]]:
    """Gradient descent or Nesterov, plain, with offline RNA or with online RNA.

    Returns (gradient evaluations, f) after each step; offline, f is taken at
    the extrapolated point (training itself is untouched)."""
    w = torch.zeros(prob.X.shape[1], dtype=torch.float64, device=prob.X.device, requires_grad=True)
    if method == "gd":
        opt = torch.optim.SGD([w], lr=1.0 / prob.L)
    else:
        root = math.sqrt(prob.kappa)
        opt = torch.optim.SGD([w], lr=1.0 / prob.L, momentum=(root - 1) / (root + 1), nesterov=True)
    rna = None
    if rna_mode is not None:
        # Online, the residual of step i must be the gradient at the point the
        # step started from (the extrapolation), not the difference of two
        # recorded iterates: residual="gradients" gives exactly Scieur et al.'s
        # online scheme, y_i = x_i - g(x_i)/L, x_{i+1} = sum c_i y_i with c from
        # the Gram matrix of the g(x_i). Offline, consecutive iterate differences
        # are the residuals (the default).
        residual = "gradients" if rna_mode == "online" else "iterates"
        rna = RNA([w], window=window, reg=reg, mode=rna_mode, optimizer=opt, residual=residual,
                  reset_optimizer=reset)
        if residual == "iterates":
            rna.record()
    prob.evals = 0
    xs, fs = [0], [prob.f(w.detach())]
    for _ in range(evals):
        w.grad = prob.grad(w.detach())
        opt.step()
        if rna is None:
            value = prob.f(w.detach())
        elif rna_mode == "offline":
            rna.record()
            value = prob.f(rna.extrapolate()[0])
        else:
            rna.record()  # online: the extrapolation is now the iterate
            value = prob.f(w.detach())
        xs.append(prob.evals)
        fs.append(value)
    return xs, fs


def run_lbfgs(prob: LogReg, evals: int) -> tuple[list[int], list[float]]:
    """scipy L-BFGS-B (memory 10, strong-Wolfe line search); every call is one
    gradient evaluation; the curve is the best f found so far."""
    xs, fs, best = [0], [prob.f(torch.zeros(prob.X.shape[1], dtype=torch.float64, device=prob.X.device))], []
    prob.evals = 0

    def fg(w_np):
        w = torch.tensor(w_np, dtype=torch.float64, device=prob.X.device)
        g = prob.grad(w)
        value = prob.f(w)
        best.append(min(value, best[-1]) if best else value)
        xs.append(prob.evals)
        fs.append(min(best[-1], fs[0]))
        return value, g.cpu().numpy()

    minimize(fg, np.zeros(prob.X.shape[1]), jac=True, method="L-BFGS-B",
             options={"maxiter": evals, "maxfun": evals, "ftol": 0.0, "gtol": 0.0, "maxcor": 10})
    return xs, fs


METHODS = {  # label: (base method, RNA mode)
    "gradient descent": ("gd", None),
    "Nesterov": ("nesterov", None),
    "GD + offline RNA": ("gd", "offline"),
    "Nesterov + offline RNA": ("nesterov", "offline"),
    "GD + online RNA": ("gd", "online"),
    "Nesterov + online RNA": ("nesterov", "online"),
}


def evals_to(xs: list[int], sub: list[float], tol: float) -> int | None:
    for x, s in zip(xs, sub):
        if s <= tol:
            return x
    return None


def rate(xs: list[int], sub: list[float], floor: float = 1e-12) -> float | None:
    """Decades of suboptimality gained per 100 gradient evaluations, fitted on
    the second half of the curve above the float64 floor (the slope)."""
    pts = [(x, math.log10(s)) for x, s in zip(xs, sub) if s > floor and x >= xs[-1] / 2]
    if len(pts) < 5:
        pts = [(x, math.log10(s)) for x, s in zip(xs, sub) if s > floor][-20:]
    if len(pts) < 3:
        return None
    a = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)[0]
    return float(-100 * a)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kappas", type=float, nargs="+", default=[1e2, 1e4])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--features", type=int, default=500)
    parser.add_argument("--evals", type=int, default=1000, help="gradient evaluations per method")
    parser.add_argument("--window", type=int, default=10, help="RNA window k (the reference code's default)")
    parser.add_argument("--keep-momentum", action="store_true",
                        help="online RNA on Nesterov: keep the momentum buffer after each extrapolation "
                             "(default: reset it, since it belongs to the point before the jump)")
    parser.add_argument("--reg", type=float, default=1e-8, help="RNA lambda, relative to ||R^T R||")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="default: bench/results/convergence")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--quick", action="store_true", help="200 evaluations")
    args = parser.parse_args(argv)
    if args.quick:
        args.evals = 200
    started = time.time()
    device = device_of(args.device)
    out = out_dir(args.out)
    results = {}
    fig, axes = plt.subplots(1, len(args.kappas), figsize=(6.2 * len(args.kappas), 4.6), squeeze=False)
    for ax, kappa in zip(axes[0], args.kappas):
        prob = LogReg(args.samples, args.features, kappa, args.seed, device)
        fstar = optimum(prob)
        curves = {"L-BFGS": run_lbfgs(prob, args.evals)}
        for label, (method, mode) in METHODS.items():
            curves[label] = run_first_order(prob, method, args.evals, args.window, args.reg, mode,
                                            reset=not args.keep_momentum)
        summary = {}
        for label, (xs, fs) in curves.items():
            # max(., 1e-16): f* itself is exact only to float64 rounding.
            sub = [max(f - fstar, 1e-16) for f in fs]
            summary[label] = {"evals_to_1e-4": evals_to(xs, sub, 1e-4),
                              "evals_to_1e-8": evals_to(xs, sub, 1e-8),
                              "final": sub[-1], "rate_decades_per_100": rate(xs, sub)}
            style = "--" if "offline" in label else ("-." if "online" in label else "-")
            ax.semilogy(xs, sub, style, label=label, lw=1.4)
            curves[label] = (xs, sub)
        ax.set_title(f"kappa = {kappa:g} (tau = {prob.tau:.3g}), n = {args.samples}, d = {args.features}")
        ax.set_xlabel("gradient evaluations")
        ax.set_ylabel("f(x) - f*")
        ax.set_ylim(1e-14, None)
        ax.grid(alpha=0.3)
        # offline RNA vs its base: the suboptimality ratio along the curve (constant = a pure shift)
        for base, acc in (("gradient descent", "GD + offline RNA"), ("Nesterov", "Nesterov + offline RNA")):
            bx, bs = curves[base]
            _, as_ = curves[acc]
            ratios = [math.log10(a / b) for a, b in zip(as_, bs) if b > 1e-12 and a > 1e-12][5:]
            q = np.percentile(ratios, [10, 50, 90]).tolist() if ratios else None
            summary[acc]["log10_ratio_to_base_p10_p50_p90"] = q
        results[f"{kappa:g}"] = {"tau": prob.tau, "L": prob.L, "fstar": fstar, "summary": summary,
                                 "curves": {k: {"evals": v[0], "subopt": v[1]} for k, v in curves.items()}}
        print(f"\nkappa = {kappa:g}: f* = {fstar:.15f}")
        print(f"{'method':<24} {'evals to 1e-4':>14} {'evals to 1e-8':>14} {'final':>10} "
              f"{'decades/100 evals':>18}")
        for label, s in summary.items():
            r = s["rate_decades_per_100"]
            print(f"{label:<24} {str(s['evals_to_1e-4']):>14} {str(s['evals_to_1e-8']):>14} "
                  f"{s['final']:10.2e} {f'{r:.3f}' if r is not None else 'n/a':>18}")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Logistic regression, Madelon-like data: RNA window {args.window}, lambda {args.reg:g}",
                 fontsize=10)
    stem = "logreg_rna" + (f"_{args.tag}" if args.tag else "")
    png = save_fig(fig, out / f"{stem}.png")
    save_json(out / f"{stem}.json", {"info": run_info(device, started), "args": vars(args),
                                         "results": results})
    print(f"\nwrote {png} and {stem}.json ({time.time() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
