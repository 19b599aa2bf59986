"""Exact against one-pass Anderson (``Anderson(one_pass=True)``, ALGORITHMS.md
section 2b: the coefficients of step t solved from the Gram kept at the end
of step t-1), each at its own tuned learning rate, on three problems:

* ``cnn``: the demo's small ResNet on scikit-learn's digits (the demo's own
  ``train_one``: data split, batch 64, 15 epochs, weight decay 2e-4; the
  setup of ``lr_sweep.py``, whose Anderson-2 runs this reproduces), a grid
  of rates (factors of 2) and several seeds per method, k = 2 and 3;
* ``logreg``: full-batch float32 logistic regression (Madelon-like, as in
  ``logreg_rna.py``, 1,000 x 500) at condition numbers 1e2, 1e3 and 1e4 (the
  L2 term as coupled weight decay), rates mult/L, reg 0 and 1e-4, f* in float64;
* ``lm``: a byte-level transformer language model trained from scratch on
  the license texts every Debian/Ubuntu system ships in
  /usr/share/common-licenses (package base-files; the regular files sorted
  by name, concatenated; the SHA-256 is recorded), the last 10 % held out.

For each method the rate with the lowest seed-mean final loss (training loss
for the CNN, f - f* for logistic regression, held-out loss for the LM) is its
tuned rate; reported there: the final loss, steps to a target, fallbacks, the
coefficient paths (every step's coefficients are in the JSON at the tuned
rates; summaries elsewhere).

    python bench/convergence/one_pass.py cnn       # ~10 min of one core
    python bench/convergence/one_pass.py logreg    # ~2 min
    python bench/convergence/one_pass.py lm        # ~30 min
    python bench/convergence/one_pass.py report    # tables for RESULTS.md, figures

Writes ``one_pass_<problem>.json`` and ``.png`` under bench/results/convergence.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from convlib import out_dir, plt, run_info, save_fig, save_json
from torch import nn
from torch.nn import functional as F

from interpolatron import Anderson, demo

METHODS = {"exact": False, "one-pass": True}


class Tracker:
    """Every step's coefficients and the fallback count (host copies: a study)."""

    def __init__(self, opt: Anderson):
        self.opt = opt
        self.coefs: list[list[float]] = []
        opt.register_step_post_hook(lambda o, a, k: self.coefs.append(o.coefficients.tolist()))

    @property
    def fallbacks(self) -> int:
        return int(self.opt.fallbacks)

    def summary(self) -> dict:
        c = np.array(self.coefs) if self.coefs else np.zeros((0, 1))
        later = c[2:] if len(c) > 2 else c  # the first steps are SGD steps by construction
        return {"max_abs_coef": float(np.abs(c).max()) if c.size else 0.0,
                "mean_a1": float(later[:, 0].mean()) if later.size else 1.0,
                "std_a1": float(later[:, 0].std()) if later.size else 0.0,
                "negative_steps": int((later < 0).any(1).sum()) if later.size else 0,
                "steps": len(c), "fallbacks": self.fallbacks}


def first_at_or_below(values: list[float], target: float) -> int | None:
    """1-based index of the first value <= target (None: never)."""
    for i, v in enumerate(values):
        if math.isfinite(v) and v <= target:
            return i + 1
    return None


def pick_best(per_lr: dict[str, list[dict]], key: str = "final") -> tuple[str, dict]:
    """The rate with the lowest seed-mean ``key`` (a non-finite run counts as infinite)."""
    table = {}
    for lr, runs in per_lr.items():
        vals = np.array([r[key] if math.isfinite(r[key]) else math.inf for r in runs])
        finite = bool(np.isfinite(vals).all())
        table[lr] = {"mean": float(vals.mean()), "std": float(vals.std()) if finite else math.inf,
                     "min": float(vals.min()), "max": float(vals.max()),
                     "diverged": int((~np.isfinite(vals)).sum())}
    best = min(table, key=lambda k: (table[k]["mean"], float(k)))
    return best, table


# -- (a) the digits CNN ---------------------------------------------------------------

CNN_GRID = [0.2, 0.4, 0.8, 1.6, 3.2, 6.4]


def cnn_configs(args) -> list[tuple[str, object]]:
    """(name, make(params, lr) -> (optimizer, tracker or None)) of every configuration to run."""
    out = []
    for k in args.history:
        for constraint in args.cnn_constraints:
            for method, one in METHODS.items():
                c = None if constraint == "none" else constraint
                name = f"Anderson-{k} {method}" + (f" {c}" if c else "")

                def make(p, lr, k=k, one=one, c=c):
                    opt = Anderson(p, lr=lr, history=k, weight_decay=demo.WEIGHT_DECAY, constraint=c,
                                   one_pass=one)
                    return opt, Tracker(opt)

                out.append((name, make))
    if args.reference:
        # Interpolatron-2 (a = (0.05, 0.95)) costs what one-pass Anderson-2 costs.
        out.append(("Interpolatron-2 (reference)",
                    lambda p, lr: (demo.make_optimizer("Interpolatron-2", p, lr), None)))
    return out


def run_cnn(args) -> dict:
    train, test = demo.load_digits_tensors(torch.device("cpu"), 0)
    results = {}
    for name, make_opt in cnn_configs(args):
        per_lr: dict[str, list[dict]] = {}
        t0 = time.time()
        for lr in args.grid:
            for seed in range(args.seeds):
                holder: dict = {}

                def make(p, lr=lr, holder=holder, make_opt=make_opt):
                    opt, holder["track"] = make_opt(p, lr)
                    return opt

                r = demo.train_one(name, make, train, test, torch.device("cpu"), args.epochs, 64, seed)
                tr = holder["track"]
                final = r.losses[-1] if all(math.isfinite(v) for v in r.losses) else math.inf
                extra = {**tr.summary(), "coefs": tr.coefs} if tr is not None else {}
                per_lr.setdefault(f"{lr:g}", []).append(
                    {"seed": seed, "losses": r.losses, "final": final, "accuracy": r.accuracy, **extra})
        best, table = pick_best(per_lr)
        for lr, runs in per_lr.items():  # coefficient paths at the tuned rate only
            if lr != best:
                for run in runs:
                    run.pop("coefs", None)
        results[name] = {"one_pass": "one-pass" in name, "anderson": name.startswith("Anderson"),
                         "grid": args.grid, "runs": per_lr, "per_lr": table,
                         "best_lr": float(best), "best": table[best],
                         "at_grid_edge": best in (f"{args.grid[0]:g}", f"{args.grid[-1]:g}"),
                         "seconds": round(time.time() - t0, 1)}
        b = table[best]
        print(f"{name:<28} tuned lr {best:<5} final train loss {b['mean']:.4g} +- {b['std']:.2g} "
              f"[{b['min']:.4g}, {b['max']:.4g}] ({time.time() - t0:.0f} s)", flush=True)
    return results


# -- (b) logistic regression -------------------------------------------------------

LOGREG_MULTS = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]


def variant(text: str) -> tuple[float, str | None]:
    """``reg=1e-4`` -> (1e-4, None); ``simplex`` -> (0, "simplex")."""
    if text == "simplex":
        return 0.0, "simplex"
    return float(text.removeprefix("reg=")), None


def run_logreg(args) -> dict:
    from logreg_rna import LogReg, optimum

    results = {}
    for kappa in args.kappas:
        prob = LogReg(1000, 500, kappa, 0, torch.device("cpu"))
        fstar = optimum(prob)
        X, yy = prob.X.float(), prob.y.float()
        entry = {"kappa": kappa, "L": prob.L, "tau": prob.tau, "fstar": fstar, "runs": {}}
        for var in args.variants:
            reg, constraint = variant(var)
            for method, one in METHODS.items():
                per_lr = {}
                for mult in LOGREG_MULTS:
                    w = torch.zeros(X.shape[1], dtype=torch.float32, requires_grad=True)
                    opt = Anderson([w], lr=mult / prob.L, history=args.logreg_history, reg=reg,
                                   constraint=constraint, weight_decay=prob.tau, one_pass=one)
                    track = Tracker(opt)
                    sub = []
                    for _ in range(args.logreg_steps):
                        opt.zero_grad(set_to_none=True)
                        F.softplus(-(yy * (X @ w))).mean().backward()
                        opt.step()
                        f = prob.f(w.detach().double())
                        sub.append(max(f - fstar, 1e-16) if math.isfinite(f) else math.inf)
                    per_lr[f"{mult:g}"] = [{"subopt": sub, "final": sub[-1], "best_subopt": min(sub),
                                            "steps_to_1e-3": first_at_or_below(sub, 1e-3),
                                            "steps_to_1e-6": first_at_or_below(sub, 1e-6),
                                            **track.summary(), "coefs": track.coefs}]
                best, table = pick_best(per_lr)
                for lr, runs in per_lr.items():
                    if lr != best:
                        for run in runs:
                            run.pop("coefs")
                            run["subopt"] = run["subopt"][::10]
                key = f"{var} {method}"
                edges = (f"{LOGREG_MULTS[0]:g}", f"{LOGREG_MULTS[-1]:g}")
                entry["runs"][key] = {"variant": var, "one_pass": one, "per_lr": per_lr,
                                      "best_mult": float(best), "at_grid_edge": best in edges,
                                      "best": per_lr[best][0] | {"subopt": None, "coefs": None}}
                b = per_lr[best][0]
                print(f"kappa {kappa:g} {key:<20} tuned lr {best}/L: f - f* {b['final']:.3g} after "
                      f"{args.logreg_steps} steps (best {b['best_subopt']:.3g}), "
                      f"to 1e-6: {b['steps_to_1e-6']}, max |a| {b['max_abs_coef']:.3g}, "
                      f"fallbacks {b['fallbacks']}", flush=True)
        results[f"{kappa:g}"] = entry
    return results


# -- (c) a byte-level transformer language model ----------------------------------------

CORPUS_DIR = Path("/usr/share/common-licenses")


def corpus() -> tuple[bytes, dict]:
    files = sorted(p for p in CORPUS_DIR.iterdir() if p.is_file() and not p.is_symlink())
    data = b"".join(p.read_bytes() for p in files)
    return data, {"dir": str(CORPUS_DIR), "files": [p.name for p in files], "bytes": len(data),
                  "sha256": hashlib.sha256(data).hexdigest()}


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Bytes in, next-byte logits out: embeddings, pre-norm blocks, a linear head."""

    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, ctx: int = 64):
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, d), nn.Embedding(ctx, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 256)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.head(self.ln(self.blocks(x)))


def lm_batches(data: torch.Tensor, n: int, batch: int, ctx: int, gen: torch.Generator):
    for _ in range(n):
        starts = torch.randint(0, len(data) - ctx - 1, (batch,), generator=gen)
        rows = torch.stack([data[s:s + ctx + 1] for s in starts.tolist()]).long()
        yield rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def lm_loss(model, batches) -> float:
    model.eval()
    total = [F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1)).item() for x, y in batches]
    model.train()
    return float(np.mean(total))


def run_lm(args) -> dict:
    data, info = corpus()
    tokens = torch.tensor(list(data), dtype=torch.uint8)
    cut = int(0.9 * len(tokens))
    train, held = tokens[:cut], tokens[cut:]
    val = list(lm_batches(held, args.lm_val_batches, args.lm_batch, args.lm_ctx,
                          torch.Generator().manual_seed(123)))
    results = {"corpus": info, "train_bytes": cut, "held_out_bytes": len(held), "runs": {}}
    for method in args.lm_methods:
        one, constraint = method.startswith("one-pass"), ("simplex" if method.endswith("simplex") else None)
        per_lr = {}
        t0 = time.time()
        for lr in args.lm_grid:
            for seed in range(args.lm_seeds):
                torch.manual_seed(seed)
                model = TinyGPT(args.lm_d, args.lm_layers, args.lm_heads, args.lm_ctx)
                opt = Anderson(model.parameters(), lr=lr, history=args.lm_history, one_pass=one,
                               constraint=constraint)
                track = Tracker(opt)
                evals, train_curve, running = [], [], []
                gen = torch.Generator().manual_seed(1000 + seed)
                batches = lm_batches(train, args.lm_steps, args.lm_batch, args.lm_ctx, gen)
                for step, (x, y) in enumerate(batches):
                    loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    running.append(loss.item())
                    if (step + 1) % args.lm_eval_every == 0:
                        evals.append(lm_loss(model, val) if math.isfinite(running[-1]) else math.inf)
                        train_curve.append(float(np.mean(running)))
                        running = []
                        if not math.isfinite(evals[-1]):
                            break
                final = evals[-1] if evals and math.isfinite(evals[-1]) else math.inf
                per_lr.setdefault(f"{lr:g}", []).append(
                    {"seed": seed, "held_out": evals, "train": train_curve, "final": final,
                     "evals_to_target": first_at_or_below(evals, args.lm_target), **track.summary(),
                     "coefs": track.coefs})
                print(f"  {method} lr {lr:g} seed {seed}: held-out {final:.4f} "
                      f"(max |a| {track.summary()['max_abs_coef']:.3g}, fallbacks {track.fallbacks}, "
                      f"{time.time() - t0:.0f} s)", flush=True)
        best, table = pick_best(per_lr)
        for lr, runs in per_lr.items():
            if lr != best and not args.lm_keep_coefs:
                for run in runs:
                    run.pop("coefs")
        results["runs"][method] = {"one_pass": one, "constraint": constraint, "grid": args.lm_grid,
                                   "runs": per_lr, "per_lr": table,
                                   "best_lr": float(best), "best": table[best],
                                   "at_grid_edge": best in (f"{args.lm_grid[0]:g}", f"{args.lm_grid[-1]:g}"),
                                   "seconds": round(time.time() - t0, 1)}
        b = table[best]
        print(f"LM {method:<9} tuned lr {best}: held-out loss {b['mean']:.4f} +- {b['std']:.2g}", flush=True)
    return results


def merge_lm(old: dict, new: dict) -> dict:
    """New rates of a method added to an earlier LM sweep (the corpus must be
    the same); the tuned rate is chosen again over the union."""
    if old["corpus"]["sha256"] != new["corpus"]["sha256"]:
        raise SystemExit("--merge: the corpus differs from the earlier run's")
    runs = dict(old["runs"])
    for method, res in new["runs"].items():
        if method not in runs:
            runs[method] = res
            continue
        per_lr = {**runs[method]["runs"], **res["runs"]}
        grid = sorted(float(v) for v in per_lr)
        per_lr = {f"{v:g}": per_lr[f"{v:g}"] for v in grid}
        best, table = pick_best(per_lr)
        for lr, rs in per_lr.items():
            if lr != best:
                for run in rs:
                    run.pop("coefs", None)
        runs[method] = {**runs[method], "grid": grid, "runs": per_lr, "per_lr": table, "best_lr": float(best),
                        "best": table[best], "at_grid_edge": best in (f"{grid[0]:g}", f"{grid[-1]:g}"),
                        "seconds": runs[method]["seconds"] + res["seconds"]}
    return {**old, "runs": runs}


# -- the report -----------------------------------------------------------------------

def _steps(v) -> str:
    return "-" if v is None else str(v)


def lag_stats(runs: list[dict]) -> tuple[float, float]:
    """Over the runs' coefficient paths (after the two SGD steps): the lag-1
    autocorrelation of a_1, and the mean |a(t+1) - a(t)| (max over i).

    For one-pass Anderson a(t+1) is exactly what exact Anderson would have
    solved at step t from the same state (the Gram kept at the end of step t),
    so the second number is how far the applied coefficients are, on average,
    from the exact ones at the state where they are applied."""
    corr, change = [], []
    for r in runs:
        c = np.array(r["coefs"])[2:]
        if len(c) < 3:
            continue
        a1 = c[:, 0]
        if a1.std() > 0:
            corr.append(float(np.corrcoef(a1[:-1], a1[1:])[0, 1]))
        change.append(float(np.abs(np.diff(c, axis=0)).max(1).mean()))
    return (float(np.mean(corr)) if corr else math.nan), (float(np.mean(change)) if change else math.nan)


def report(out: Path) -> str:
    lines = []
    path = out / "one_pass_cnn.json"
    if path.exists():
        data = json.loads(path.read_text())["results"]
        lines += ["CNN (digits, small ResNet, 15 epochs, batch 64; final training loss over seeds; "
                  "epochs to a training loss of 0.01 and 0.003, seed mean; coefficients at the tuned rate)",
                  "",
                  "| method | grid | tuned lr | final train loss mean +- std [min, max] | test acc % | "
                  "epochs to 0.01 / 0.003 | max \\|a_i\\| | mean a_1 (std) | a_1 lag-1 autocorr. | "
                  "mean \\|a(t+1) - a(t)\\| | fallbacks |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, res in data.items():
            b, runs = res["best"], res["runs"][f"{res['best_lr']:g}"]
            e1 = [first_at_or_below(r["losses"], 0.01) for r in runs]
            e2 = [first_at_or_below(r["losses"], 0.003) for r in runs]
            mean_e = lambda es: "-" if any(e is None for e in es) else f"{np.mean(es):.1f}"  # noqa: E731
            edge = " (edge)" if res["at_grid_edge"] else ""
            if "coefs" in runs[0]:
                corr, change = lag_stats(runs)
                coefs = (f"{max(r['max_abs_coef'] for r in runs):.2f} | "
                         f"{np.mean([r['mean_a1'] for r in runs]):.3f} "
                         f"({np.mean([r['std_a1'] for r in runs]):.3f}) | {corr:.2f} | {change:.3f} | "
                         f"{sum(r['fallbacks'] for r in runs)}")
            else:
                coefs = "fixed (0.05, 0.95) | - | - | - | -"
            lines.append(
                f"| {name} | {res['grid'][0]:g} .. {res['grid'][-1]:g} | {res['best_lr']:g}{edge} | "
                f"{b['mean']:.4f} +- {b['std']:.4f} [{b['min']:.4f}, {b['max']:.4f}] | "
                f"{100 * np.mean([r['accuracy'] for r in runs]):.1f} | {mean_e(e1)} / {mean_e(e2)} | "
                f"{coefs} |")
        lines.append("")
        lines += ["Per rate (seed-mean final training loss, diverged runs):", "",
                  "| method | " + " | ".join(f"{v:g}" for v in CNN_GRID) + " |",
                  "|---|" + "---|" * len(CNN_GRID)]
        for name, res in data.items():
            cells = []
            for v in res["grid"]:
                t = res["per_lr"][f"{v:g}"]
                cells.append(f"{t['mean']:.4f}" + (f" ({t['diverged']} div.)" if t["diverged"] else ""))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    path = out / "one_pass_logreg.json"
    if path.exists():
        data = json.loads(path.read_text())["results"]
        mults = "/".join(f"{m:g}" for m in LOGREG_MULTS)
        lines += ["Logistic regression (float32, full batch, 300 steps; tuned rate mult/L per method, reg)",
                  "", "| kappa | reg | method | tuned lr | f - f* final (best) | steps to 1e-3 / 1e-6 | "
                  f"max \\|a_i\\| | fallbacks | f - f* final at mult {mults} |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for kappa, entry in data.items():
            for res in entry["runs"].values():
                b = res["best"]
                every = " / ".join(f"{res['per_lr'][f'{m:g}'][0]['final']:.2g}" for m in LOGREG_MULTS)
                edge = " (edge)" if res["at_grid_edge"] else ""
                lines.append(f"| {kappa} | {res['variant']} | {'one-pass' if res['one_pass'] else 'exact'} | "
                             f"{res['best_mult']:g}/L{edge} | {b['final']:.3g} ({b['best_subopt']:.3g}) | "
                             f"{_steps(b['steps_to_1e-3'])} / {_steps(b['steps_to_1e-6'])} | "
                             f"{b['max_abs_coef']:.3g} | {b['fallbacks']} | {every} |")
        lines.append("")
    path = out / "one_pass_lm.json"
    if path.exists():
        blob = json.loads(path.read_text())
        data, args = blob["results"], blob["args"]
        c = data["corpus"]
        lines += [f"Byte-level transformer LM ({c['bytes']:,} bytes of {c['dir']}, "
                  f"sha256 {c['sha256'][:12]}..., {args['lm_steps']} steps; held-out loss in nats/byte)", "",
                  "| method | grid | tuned lr | held-out loss mean +- std [min, max] | "
                  f"evals to {args['lm_target']:g} | max \\|a_i\\| | mean a_1 (std) | a_1 lag-1 autocorr. | "
                  "mean \\|a(t+1) - a(t)\\| | fallbacks | per rate |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for method, res in data["runs"].items():
            b, runs = res["best"], res["runs"][f"{res['best_lr']:g}"]
            ev = [r["evals_to_target"] for r in runs]
            per = " / ".join(f"{res['per_lr'][f'{v:g}']['mean']:.3f}" for v in res["grid"])
            edge = " (edge)" if res["at_grid_edge"] else ""
            a1 = f"{np.mean([r['mean_a1'] for r in runs]):.3f} ({np.mean([r['std_a1'] for r in runs]):.3f})"
            corr, change = lag_stats(runs)
            lines.append(f"| {method} | {res['grid'][0]:g} .. {res['grid'][-1]:g} | "
                         f"{res['best_lr']:g}{edge} | {b['mean']:.4f} +- {b['std']:.4f} "
                         f"[{b['min']:.4f}, {b['max']:.4f}] | "
                         f"{'-' if any(e is None for e in ev) else f'{np.mean(ev):.1f}'} | "
                         f"{max(r['max_abs_coef'] for r in runs):.2f} | "
                         f"{a1} | {corr:.2f} | {change:.3f} | {sum(r['fallbacks'] for r in runs)} | {per} |")
    return "\n".join(lines)


def plot(out: Path) -> None:
    path = out / "one_pass_cnn.json"
    if path.exists():
        data = json.loads(path.read_text())["results"]
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
        for name, res in data.items():
            runs = res["runs"][f"{res['best_lr']:g}"]
            curves = np.array([r["losses"] for r in runs])
            ep = np.arange(1, curves.shape[1] + 1)
            ls = "--" if res["one_pass"] else "-"
            (line,) = axes[0].plot(ep, curves.mean(0), ls, label=f"{name} (lr {res['best_lr']:g})")
            axes[0].fill_between(ep, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.12)
            grid = np.array(res["grid"])
            means = np.array([res["per_lr"][f"{v:g}"]["mean"] for v in grid])
            axes[1].plot(grid, np.where(np.isfinite(means), means, np.nan), ls + "o", color=line.get_color(),
                         label=name)
            if "coefs" not in runs[0]:
                continue
            a1 = np.concatenate([np.array(r["coefs"])[2:, 0] for r in runs])
            axes[2].hist(a1, bins=np.linspace(-0.25, 1.25, 31), histtype="step", linestyle=ls,
                         color=line.get_color(), label=f"{name} (lag-1 autocorr. {lag_stats(runs)[0]:.2f})")
        axes[0].set(yscale="log", xlabel="epoch", ylabel="training loss at the tuned rate")
        axes[1].set(yscale="log", xlabel="learning rate", ylabel="final training loss (seed mean)")
        axes[1].set_xscale("log", base=2)
        axes[2].set(xlabel="a_1, the newest iterate's coefficient (tuned rate, every step of every seed)",
                    ylabel="steps")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle("exact vs one-pass Anderson: digits CNN", fontsize=10)
        save_fig(fig, out / "one_pass_cnn.png")
    path = out / "one_pass_logreg.json"
    if path.exists():
        data = json.loads(path.read_text())["results"]
        fig, axes = plt.subplots(1, len(data), figsize=(5.5 * len(data), 4.2), squeeze=False)
        for ax, (kappa, entry) in zip(axes[0], data.items()):
            for key, res in entry["runs"].items():
                b = res["per_lr"][f"{res['best_mult']:g}"][0]
                ax.plot(np.arange(1, len(b["subopt"]) + 1), b["subopt"], "--" if res["one_pass"] else "-",
                        label=f"{key} ({res['best_mult']:g}/L)")
            ax.set(yscale="log", xlabel="step", ylabel="f - f*", title=f"kappa {kappa}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle("exact vs one-pass Anderson-2: float32 logistic regression, tuned rates", fontsize=10)
        save_fig(fig, out / "one_pass_logreg.png")
    path = out / "one_pass_lm.json"
    if path.exists():
        blob = json.loads(path.read_text())
        data, args = blob["results"], blob["args"]
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
        for method, res in data["runs"].items():
            runs = res["runs"][f"{res['best_lr']:g}"]
            ls = "--" if res["one_pass"] else "-"
            n = min(len(r["held_out"]) for r in runs)
            curves = np.array([r["held_out"][:n] for r in runs])
            steps = args["lm_eval_every"] * np.arange(1, n + 1)
            (line,) = axes[0].plot(steps, curves.mean(0), ls, label=f"{method} (lr {res['best_lr']:g})")
            axes[0].fill_between(steps, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.12)
            grid = np.array(res["grid"])
            means = np.array([res["per_lr"][f"{v:g}"]["mean"] for v in grid])
            axes[1].plot(grid, np.where(np.isfinite(means), means, np.nan), ls + "o", color=line.get_color(),
                         label=method)
            a1 = np.concatenate([np.array(r["coefs"])[2:, 0] for r in runs])
            axes[2].hist(a1, bins=np.linspace(-0.25, 1.25, 31), histtype="step", linestyle=ls,
                         color=line.get_color(), label=f"{method} (lag-1 autocorr. {lag_stats(runs)[0]:.2f})")
        axes[0].set(xlabel="step", ylabel="held-out loss (nats/byte)")
        axes[1].set(xlabel="learning rate (missing: diverged on a seed)",
                    ylabel="final held-out loss (seed mean)")
        axes[1].set_xscale("log", base=2)
        axes[2].set(xlabel="a_1 (tuned rate, every step of every seed)", ylabel="steps")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle("exact vs one-pass Anderson: byte-level transformer LM", fontsize=10)
        save_fig(fig, out / "one_pass_lm.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("problem", choices=["cnn", "logreg", "lm", "report"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="default: bench/results/convergence")
    parser.add_argument("--history", type=int, nargs="+", default=[2, 3], help="CNN: k")
    parser.add_argument("--cnn-constraints", nargs="+", default=["none"], choices=["none", "simplex"])
    parser.add_argument("--reference", action="store_true", help="CNN: also Interpolatron-2")
    parser.add_argument("--merge", action="store_true",
                        help="keep the configurations of an existing result file that this run does not redo")
    parser.add_argument("--grid", type=float, nargs="+", default=CNN_GRID, help="CNN rates")
    parser.add_argument("--seeds", type=int, default=3, help="CNN seeds")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--kappas", type=float, nargs="+", default=[1e2, 1e3, 1e4])
    parser.add_argument("--variants", nargs="+", default=["reg=0", "reg=1e-4", "reg=1e-2", "simplex"],
                        help="logistic regression: reg=VALUE or simplex")
    parser.add_argument("--logreg-steps", type=int, default=300)
    parser.add_argument("--logreg-history", type=int, default=2)
    parser.add_argument("--lm-grid", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--lm-seeds", type=int, default=2)
    parser.add_argument("--lm-keep-coefs", action="store_true",
                        help="keep every run's coefficient path (to --merge rates into an earlier sweep)")
    parser.add_argument("--lm-methods", nargs="+", default=["exact", "one-pass", "one-pass simplex"],
                        choices=["exact", "one-pass", "exact simplex", "one-pass simplex"])
    parser.add_argument("--lm-steps", type=int, default=1000)
    parser.add_argument("--lm-eval-every", type=int, default=100)
    parser.add_argument("--lm-val-batches", type=int, default=8)
    parser.add_argument("--lm-batch", type=int, default=32)
    parser.add_argument("--lm-ctx", type=int, default=64)
    parser.add_argument("--lm-d", type=int, default=64)
    parser.add_argument("--lm-layers", type=int, default=2)
    parser.add_argument("--lm-heads", type=int, default=4)
    parser.add_argument("--lm-history", type=int, default=2)
    parser.add_argument("--lm-target", type=float, default=2.5, help="held-out loss target (nats/byte)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = out_dir(args.out)
    if args.problem == "report":
        plot(out)
        print(report(out))
        return 0
    started = time.time()
    run = {"cnn": run_cnn, "logreg": run_logreg, "lm": run_lm}[args.problem]
    results = run(args)
    path = out / f"one_pass_{args.problem}.json"
    info = run_info(torch.device("cpu"), started)
    if args.merge and path.exists():
        old = json.loads(path.read_text())
        results = merge_lm(old["results"], results) if args.problem == "lm" else {**old["results"], **results}
        info["commands"] = old["info"].get("commands", [old["info"]["command"]]) + [info["command"]]
    save_json(path, {"info": info, "args": vars(args), "results": results})
    plot(out)
    print(f"wrote one_pass_{args.problem}.json under {out} ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
