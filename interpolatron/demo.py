"""``interpolatron demo``: a small residual CNN on scikit-learn's bundled digits,
trained with every optimizer of the papers' comparison, side by side."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import RNA, Anderson, Interpolatron

WEIGHT_DECAY = 2e-4

# The papers' learning rates (ALGORITHMS.md section 5) with their ratios kept
# and one common scale (0.4) for this 8x8 problem; Adam at its default 1e-3.
PAPER_LR = {"SGD": 0.1, "momentum": 0.01, "Nesterov": 0.01, "Adam": 1e-3, "Interpolatron-2": 0.04,
            "Interpolatron-3": 0.04, "Anderson-2": 0.1, "momentum+RNA": 0.01}

# Tuned per optimizer by bench/convergence/lr_sweep.py on this demo (15
# epochs, batch 64, 3 seeds, lowest mean final training loss; the grid, every
# run and the spreads are in bench/results/convergence/lr_sweep.json).
# Comparing at one shared or "paper" rate misleads: the methods' effective
# steps differ (Interpolatron's is lr / sum_i i*a_i, ALGORITHMS.md section 1).
TUNED_LR = {"SGD": 0.8, "momentum": 0.16, "Nesterov": 0.16, "Adam": 8e-3, "Interpolatron-2": 1.6,
            "Interpolatron-3": 1.6, "Anderson-2": 1.6, "momentum+RNA": 0.16}
TUNED_SOURCE = "bench/convergence/lr_sweep.py (bench/results/convergence/lr_sweep.json)"


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """The demo's optimizer ``name`` at learning rate ``lr`` (weight decay 2e-4
    in the objective for all; momentum+RNA trains exactly like momentum)."""
    wd = WEIGHT_DECAY
    sgd = torch.optim.SGD
    if name == "SGD":
        return sgd(params, lr=lr, weight_decay=wd)
    if name in ("momentum", "momentum+RNA"):
        return sgd(params, lr=lr, momentum=0.9, weight_decay=wd)
    if name == "Nesterov":
        return sgd(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "Interpolatron-2":
        return Interpolatron(params, lr=lr, alphas=(0.05, 0.95), weight_decay=wd)
    if name == "Interpolatron-3":
        return Interpolatron(params, lr=lr, alphas=(0.1, 0.3, 0.6), weight_decay=wd)
    if name == "Anderson-2":
        return Anderson(params, lr=lr, history=2, weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}; one of {', '.join(PAPER_LR)}")


def _recipes(rates: dict[str, float] | None = None) -> dict[str, Callable]:
    rates = TUNED_LR if rates is None else rates
    return {name: (lambda p, n=name: make_optimizer(n, p, rates[n])) for name in PAPER_LR}


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity, then ReLU."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


def small_resnet(width: int = 16, classes: int = 10) -> nn.Module:
    """Stem, two residual blocks, a strided stage, global pooling."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        ResidualBlock(width), ResidualBlock(width),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes),
    )


def load_digits_tensors(device: torch.device, seed: int = 0):
    """The 1,797 bundled 8x8 digits (no download), standardised, 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    x = (x - x.mean()) / x.std()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    train, test = perm[:cut], perm[cut:]
    return (x[train].to(device), y[train].to(device)), (x[test].to(device), y[test].to(device))


@dataclass
class RunResult:
    name: str
    final_loss: float
    accuracy: float
    wall_s: float
    step_ms: float
    backend: str
    losses: list[float] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: nn.Module, data: tuple[Tensor, Tensor]) -> tuple[float, float]:
    model.eval()
    x, y = data
    logits = model(x)
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one(name: str, make_opt: Callable, train, test, device: torch.device, epochs: int,
              batch: int, seed: int, progress=None) -> RunResult:
    torch.manual_seed(seed)
    model = small_resnet().to(device)
    opt = make_opt(model.parameters())
    rna = RNA(model, window=min(5, epochs), reg=1e-6) if name.endswith("+RNA") else None
    if rna is not None:
        rna.record()
    x, y = train
    losses, step_time, steps = [], 0.0, 0
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen).to(device)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _sync(device)
            t0 = time.perf_counter()
            opt.step()
            _sync(device)
            step_time += time.perf_counter() - t0
            steps += 1
        if rna is not None:
            rna.record()
            with rna.swapped():
                losses.append(evaluate(model, train)[0])
        else:
            losses.append(evaluate(model, train)[0])
        if progress is not None:
            progress.update(1)
    wall = time.perf_counter() - start
    if rna is not None:
        with rna.swapped():
            loss, acc = evaluate(model, test)
    else:
        loss, acc = evaluate(model, test)
    backend = ",".join(sorted(set(opt.backends_in_use().values()))) if hasattr(opt, "backends_in_use") \
        else "torch.optim"
    return RunResult(name, losses[-1], acc, wall, 1e3 * step_time / max(steps, 1), backend, losses)


def format_table(results: list[RunResult], rates: dict[str, float] | None = None) -> str:
    rates = TUNED_LR if rates is None else rates
    head = (f"{'optimizer':<16} {'lr':>8} {'train loss':>10} {'test acc':>8} {'wall s':>7} "
            f"{'step ms':>8}  backend")
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(f"{r.name:<16} {rates.get(r.name, float('nan')):>8g} {r.final_loss:>10.4f} "
                    f"{100 * r.accuracy:>7.1f}% {r.wall_s:>7.2f} {r.step_ms:>8.3f}  {r.backend}")
    return "\n".join(rows)


def plot(results: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot(range(1, len(r.losses) + 1), r.losses, label=r.name,
                linestyle="--" if r.name.startswith(("Interpolatron", "Anderson")) else "-")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (RNA: extrapolated model)")
    ax.set_title("small ResNet on scikit-learn digits")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(device: str = "auto", epochs: int = 15, out: str = "interpolatron-demo", batch: int = 64,
        seed: int = 0, only: list[str] | None = None, quiet: bool = False,
        rates: str = "tuned") -> list[RunResult]:
    """Train every optimizer (``rates="tuned"``: the rates lr_sweep.py found
    for this demo; ``"paper"``: the papers' rates, scaled)."""
    if rates not in ("tuned", "paper"):
        raise ValueError(f"rates must be 'tuned' or 'paper', got {rates!r}")
    if only is not None and (unknown := sorted(set(only) - set(PAPER_LR))):
        raise ValueError(f"unknown optimizer(s) {unknown}; choose from {', '.join(PAPER_LR)}")
    table = TUNED_LR if rates == "tuned" else PAPER_LR
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                       else ("cpu" if device == "auto" else device))
    train, test = load_digits_tensors(dev, seed)
    recipes = {k: v for k, v in _recipes(table).items() if only is None or k in only}
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=epochs * len(recipes), desc="training", unit="epoch", disable=quiet)
    except ImportError:
        bar = None
    results = []
    for name, make in recipes.items():
        if bar is not None:
            bar.set_postfix_str(name)
        results.append(train_one(name, make, train, test, dev, epochs, batch, seed, bar))
    if bar is not None:
        bar.close()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(results, out_dir / "demo_loss.png")
    meta = {"device": str(dev), "torch": torch.__version__, "epochs": epochs, "batch": batch, "seed": seed,
            "rates": rates, "lr": {k: table[k] for k in recipes}}
    (out_dir / "demo_results.json").write_text(
        json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1))
    print(f"\n{len(train[0])} training / {len(test[0])} test digits, {epochs} epochs, batch {batch}, "
          f"device {dev}\n")
    print(format_table(results, table))
    if rates == "tuned":
        print(f"\nlearning rates: tuned per optimizer on this demo by {TUNED_SOURCE} (15 epochs, 3 seeds, "
              "lowest mean final training loss); `--rates paper` runs the papers' rates instead")
    else:
        print("\nlearning rates: the papers' (ALGORITHMS.md section 5, scaled by 0.4; Adam 1e-3); they are "
              "not tuned for this problem and misrepresent the methods' relative speed")
    print(f"\nloss curves: {out_dir / 'demo_loss.png'}   numbers: {out_dir / 'demo_results.json'}")
    return results
