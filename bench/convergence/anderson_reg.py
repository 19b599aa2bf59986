"""How robust is Anderson mixing's solve? Sensitivity to float32 rounding and
convergence for Tikhonov ``reg`` in {0, 1e-8, 1e-6, 1e-4, 1e-2}.

1. Sensitivity: the same training run computed twice, once with the batch loss
   as one mean and once as two half-batch means backpropagated one after
   the other (gradient accumulation) (equal in exact
   arithmetic, different float32 roundings), on the demo's CNN (digits, batch
   64, Anderson-2 at the demo's tuned rate) and on float32 logistic regression.
   Reported: the largest difference of the mixing coefficients over the steps,
   the largest |a_i| seen, the parameter difference after ``--steps`` steps,
   and the fallbacks counted.
2. Convergence: the demo's CNN at Anderson-2's tuned rate (the demo's 15
   epochs, 3 seeds: final training loss, test accuracy, largest |a_i|) and
   full-batch float32 logistic regression (Madelon-like, as in logreg_rna.py,
   lr = 1/L: f - f* after ``--logreg-steps`` steps, f* in float64).

    python bench/convergence/anderson_reg.py      # a few minutes on one core

Writes ``anderson_reg.json`` under ``bench/results/convergence``.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from convlib import DEFAULT_OUT, out_dir, run_info, save_json
from logreg_rna import LogReg, optimum
from torch.nn import functional as F

from interpolatron import Anderson, demo

REGS = [0.0, 1e-8, 1e-6, 1e-4, 1e-2]


def backward(loss_parts: list[torch.Tensor]) -> None:
    """Backward of the sum of the parts, one part at a time (gradient
    accumulation): the same gradient in exact arithmetic, float32 sums in
    another order. (A loss written as an average of half-batch means but
    backpropagated once scales every sample's gradient by 1/64 exactly and
    rounds identically.)"""
    for i, part in enumerate(loss_parts):
        part.backward(retain_graph=i + 1 < len(loss_parts))


def fallbacks(opt: Anderson) -> int:
    """The fallback count, wherever this version keeps Anderson's global state."""
    for st in opt.state.values():
        for key in ("anderson_fallbacks", "fallbacks"):
            if isinstance(st, dict) and key in st:
                return int(st[key])
    return 0


class CoefTracker:
    """Records the mixing coefficients after every step (a host copy: this is a study)."""

    def __init__(self, opt: Anderson):
        self.opt = opt
        self.coefs: list[np.ndarray] = []
        opt.register_step_post_hook(lambda o, a, k: self.coefs.append(o.coefficients.cpu().numpy().copy()))

    @property
    def max_abs(self) -> float:
        return float(max(np.abs(c).max() for c in self.coefs)) if self.coefs else 0.0


def cnn_sensitivity(lr: float, reg: float | None, steps: int, seed: int = 0) -> dict:
    """Two CNN runs differing only in how the batch mean is summed (``reg=None``:
    SGD at the same rate, the baseline: how much training itself amplifies
    rounding)."""
    train, _ = demo.load_digits_tensors(torch.device("cpu"), 0)
    x, y = train
    out = []
    for halves in (False, True):
        torch.manual_seed(seed)
        model = demo.small_resnet()
        if reg is None:
            opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=demo.WEIGHT_DECAY)
            track = None
        else:
            opt = Anderson(model.parameters(), lr=lr, history=2, reg=reg, weight_decay=demo.WEIGHT_DECAY)
            track = CoefTracker(opt)
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(x), generator=gen)
        for s in range(steps):
            idx = perm[(s * 64) % (len(x) - 64):][:64]
            logits = model(x[idx])
            opt.zero_grad(set_to_none=True)
            if halves:
                backward([0.5 * F.cross_entropy(logits[:32], y[idx][:32]),
                          0.5 * F.cross_entropy(logits[32:], y[idx][32:])])
            else:
                backward([F.cross_entropy(logits, y[idx])])
            opt.step()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        if track is None:
            out.append((np.zeros(1), flat, 0.0, 0))
        else:
            out.append((np.array(track.coefs), flat, track.max_abs, fallbacks(opt)))
    (c0, p0, m0, f0), (c1, p1, m1, f1) = out
    return {"coef_max_diff": float(np.abs(c0 - c1).max()), "max_abs_coef": max(m0, m1),
            "param_max_diff": float((p0 - p1).abs().max()), "fallbacks": [f0, f1]}


def logreg_problem(kappa: float, seed: int = 0):
    prob = LogReg(1000, 500, kappa, seed, torch.device("cpu"))
    return prob, optimum(prob)


def logreg_run(prob: LogReg, reg: float, steps: int, halves: bool = False,
               mult: float = 1.0) -> tuple[list[float], np.ndarray,
                                                                                     Anderson, CoefTracker]:
    """Full-batch float32 Anderson-2 (lr mult/L, the L2 term as coupled weight decay)."""
    X, yy = prob.X.float(), prob.y.float()
    w = torch.zeros(X.shape[1], dtype=torch.float32, requires_grad=True)
    opt = Anderson([w], lr=mult / prob.L, history=2, reg=reg, weight_decay=prob.tau)
    track = CoefTracker(opt)
    fs = []
    h = len(X) // 2
    for _ in range(steps):
        margins = yy * (X @ w)
        opt.zero_grad(set_to_none=True)
        if halves:
            backward([0.5 * F.softplus(-margins[:h]).mean(), 0.5 * F.softplus(-margins[h:]).mean()])
        else:
            backward([F.softplus(-margins).mean()])
        opt.step()
        fs.append(prob.f(w.detach().double()))
    return fs, w.detach().numpy().copy(), opt, track


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regs", type=float, nargs="+", default=REGS)
    parser.add_argument("--lr", type=float, default=None,
                        help="Anderson-2's CNN rate (default: the tuned one in lr_sweep.json, "
                             "else the demo's)")
    parser.add_argument("--steps", type=int, default=20, help="steps of the sensitivity runs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--kappa", type=float, default=1e4)
    parser.add_argument("--logreg-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-cnn", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    out = out_dir(None)
    lr = args.lr
    if lr is None:
        sweep = DEFAULT_OUT / "lr_sweep.json"
        lr = (json.loads(sweep.read_text())["results"].get("Anderson-2", {}).get("best_lr")
              if sweep.exists() else None) or demo.TUNED_LR["Anderson-2"]
    results: dict = {"cnn_lr": lr, "sensitivity_cnn": {}, "sensitivity_logreg": {}, "cnn": {}, "logreg": {}}
    prob, fstar = logreg_problem(args.kappa)
    results["logreg_setup"] = {"kappa": args.kappa, "n": 1000, "d": 500, "L": prob.L, "fstar": fstar,
                               "steps": args.logreg_steps}
    if not args.skip_cnn:
        results["sensitivity_cnn"]["SGD"] = s = cnn_sensitivity(lr, None, args.steps)
        print(f"SGD baseline (lr {lr:g}) CNN sensitivity: param diff {s['param_max_diff']:.3g}", flush=True)
    for reg in args.regs:
        key = f"{reg:g}"
        if not args.skip_cnn:
            results["sensitivity_cnn"][key] = s = cnn_sensitivity(lr, reg, args.steps)
            print(f"reg {key:<6} CNN sensitivity: coef diff {s['coef_max_diff']:.3g}, max |a| "
                  f"{s['max_abs_coef']:.3g}, param diff {s['param_max_diff']:.3g}, "
                  f"fallbacks {s['fallbacks']}",
                  flush=True)
        results["logreg"][key] = {}
        for mult in (1.0, 2.0, 4.0):
            fs, _, o, t = logreg_run(prob, reg, args.logreg_steps, mult=mult)
            sub = [max(f - fstar, 1e-16) if math.isfinite(f) else math.inf for f in fs]
            results["logreg"][key][f"{mult:g}/L"] = {
                "final_subopt": sub[-1], "best_subopt": min(sub), "max_abs_coef": t.max_abs,
                "fallbacks": fallbacks(o), "finite": all(math.isfinite(f) for f in fs),
                "subopt_every_10": sub[::10]}
            print(f"reg {key:<6} logreg lr {mult:g}/L: f - f* {sub[-1]:.3g} after {args.logreg_steps} steps "
                  f"(best {min(sub):.3g}), max |a| {t.max_abs:.3g}, fallbacks {fallbacks(o)}", flush=True)
        _, w0s, _, t0 = logreg_run(prob, reg, args.steps)
        _, w1, _, t1 = logreg_run(prob, reg, args.steps, halves=True)
        coef_diff = float(np.abs(np.array(t0.coefs) - np.array(t1.coefs)).max())
        results["sensitivity_logreg"][key] = {"coef_max_diff": coef_diff,
                                              "max_abs_coef": max(t0.max_abs, t1.max_abs),
                                              "param_max_diff": float(np.abs(w0s - w1).max())}
        s = results["sensitivity_logreg"][key]
        print(f"reg {key:<6} logreg sensitivity: coef diff {coef_diff:.3g}, max |a| {s['max_abs_coef']:.3g}, "
              f"param diff {s['param_max_diff']:.3g}", flush=True)
        if not args.skip_cnn:
            train, test = demo.load_digits_tensors(torch.device("cpu"), 0)
            runs = []
            for seed in range(args.seeds):
                holder = {}

                def make(p, reg=reg, holder=holder):
                    opt = Anderson(p, lr=lr, history=2, reg=reg, weight_decay=demo.WEIGHT_DECAY)
                    holder["track"], holder["opt"] = CoefTracker(opt), opt
                    return opt

                r = demo.train_one("Anderson-2", make, train, test, torch.device("cpu"), args.epochs, 64,
                                   seed)
                runs.append({"seed": seed, "losses": r.losses, "accuracy": r.accuracy,
                             "max_abs_coef": holder["track"].max_abs, "fallbacks": fallbacks(holder["opt"])})
            finals = np.array([r["losses"][-1] for r in runs])
            results["cnn"][key] = {"runs": runs, "final_loss_mean": float(finals.mean()),
                                   "final_loss_std": float(finals.std()),
                                   "test_acc_mean": float(np.mean([r["accuracy"] for r in runs])),
                                   "max_abs_coef": float(max(r["max_abs_coef"] for r in runs))}
            c = results["cnn"][key]
            print(f"reg {key:<6} CNN lr {lr:g}: final train loss {c['final_loss_mean']:.4f} +- "
                  f"{c['final_loss_std']:.4f}, test acc {100 * c['test_acc_mean']:.1f} %, max |a| "
                  f"{c['max_abs_coef']:.3g}", flush=True)
        save_json(out / "anderson_reg.json", {"info": run_info(torch.device("cpu"), started),
                                             "args": vars(args), "results": results})
    print(f"wrote anderson_reg.json under {out} ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
