"""The one-dimensional toys of Xie et al. (2018), Section 3 (Figures 2 and 3).

The paper gives the shape of the functions (piecewise linear; slopes -15 on
the sheer parts and 0.1 on the flat part for Figure 2; a cliff next to the
minimum for Figure 3) and the outcome, not the breakpoints, the starting
points or the step sizes, and its counts (heavy ball 29 steps against 4;
14.806 and 50.441) cannot be reproduced from its Eq. 1 with the stated slopes
(ALGORITHMS.md section 5). The setups below (:data:`FIGURE2`,
:data:`FIGURE3`) are our reconstruction, run FAIRLY: both methods get the
same learning rate, "escaped" means the iterate stays out from that step on
(:func:`escape_step`), and every step counts, odd ones included. What they
show (``bench/convergence/toys_1d.py`` prints and plots every step;
``tests/optim/test_theory.py`` checks it):

- :func:`flat_valley` (Figure 2): a local minimum at ``x = 0`` between a
  sheer wall on the left and a long, slightly rising flat part ``[0, width]``;
  past ``width`` the function falls steeply again. At the same learning rate
  heavy ball leaves the local minimum FIRST (at ``lr = 0.1``: step 2), while
  2-step Interpolatron's two interleaved chains cross the barrier at step 3,
  fall back at step 4 and stay out only from step 11. The paper's claim
  (Interpolatron leaves much sooner) holds only when heavy ball's rate is
  cut to ``lr * (1 - momentum)``, which is how this toy used to be set up.
- :func:`cliff` (Figure 3): a valley ``[0, width]`` whose left side is a
  cliff. At the same learning rate both are thrown onto the plateau by the
  cliff; heavy ball keeps flying away (x2 = 8.36, x8 = 42.97, past 60 after
  40 steps), while Interpolatron swings between about 1 and 8 (x3 = 8.03,
  x4 = 0.98, x9 = 5.98, x10 = 1.93) and drifts back slowly. Interpolatron
  is nearer the minimum than heavy ball at every step from step 2 on, but it
  does not "take the cliff's push once and come back".

:func:`trajectory` runs either method on either toy and is what the tests,
benchmarks and plot scripts share.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["flat_valley", "cliff", "OBJECTIVES", "FIGURE2", "FIGURE3", "trajectory",
           "escape_step", "first_crossing"]


def flat_valley(x: Tensor, width: float = 1.0, steep: float = 15.0, flat: float = 0.1) -> Tensor:
    """Figure 2: slope ``-steep`` for ``x < 0``, ``+flat`` on ``[0, width]``,
    ``-steep`` again past ``width``; continuous, local minimum at ``x = 0``."""
    top = flat * width
    return torch.where(x < 0, -steep * x,
                       torch.where(x <= width, flat * x, top - steep * (x - width)))


def cliff(x: Tensor, width: float = 1.0, wall: float = 15.0, valley: float = 1.0,
          plateau: float = 0.1) -> Tensor:
    """Figure 3: a cliff of slope ``-wall`` for ``x < 0``, the valley's right
    side of slope ``valley`` on ``[0, width]`` and a long plateau of slope
    ``plateau`` past it; continuous, minimum at ``x = 0``."""
    edge = valley * width
    return torch.where(x < 0, -wall * x,
                       torch.where(x <= width, valley * x, edge + plateau * (x - width)))


OBJECTIVES: dict[str, Callable[..., Tensor]] = {"flat_valley": flat_valley, "cliff": cliff}

# Our reconstruction of the papers' setups (see the module docstring); one
# learning rate for both methods.
FIGURE2 = dict(objective="flat_valley", x0=0.005, lr=0.1, alphas=(0.05, 0.95), momentum=0.9, width=1.0)
FIGURE3 = dict(objective="cliff", x0=0.5, lr=0.6, alphas=(0.1, 0.9), momentum=0.9, width=1.0)


def trajectory(optimizer_name: str, objective: str | Callable[..., Tensor], x0: float, steps: int,
               lr: float, *, alphas=(0.05, 0.95), momentum: float = 0.9, backend: str = "auto",
               **objective_kwargs) -> list[float]:
    """The iterates ``[x_0, x_1, ..., x_steps]`` of one method on a 1-D toy.

    ``optimizer_name``: ``"heavy_ball"`` (``torch.optim.SGD`` with
    ``momentum``), ``"sgd"``, ``"interpolatron"`` (with ``alphas``) or
    ``"anderson"`` (``history = len(alphas)``). ``objective`` is a name in
    :data:`OBJECTIVES` or a callable on a 0-dim float64 tensor;
    ``objective_kwargs`` go to it (e.g. ``width``).
    """
    from .optim import Anderson, Interpolatron

    f = OBJECTIVES[objective] if isinstance(objective, str) else objective
    x = torch.tensor(float(x0), dtype=torch.float64, requires_grad=True)
    if optimizer_name == "heavy_ball":
        opt = torch.optim.SGD([x], lr=lr, momentum=momentum)
    elif optimizer_name == "sgd":
        opt = torch.optim.SGD([x], lr=lr)
    elif optimizer_name == "interpolatron":
        opt = Interpolatron([x], lr=lr, alphas=alphas, backend=backend)
    elif optimizer_name == "anderson":
        opt = Anderson([x], lr=lr, history=len(alphas), backend=backend)
    else:
        raise ValueError(f"optimizer_name must be 'heavy_ball', 'sgd', 'interpolatron' or 'anderson', "
                         f"got {optimizer_name!r}")
    xs = [float(x.detach())]
    for _ in range(steps):
        opt.zero_grad()
        f(x, **objective_kwargs).backward()
        opt.step()
        xs.append(float(x.detach()))
    return xs


def escape_step(xs: list[float], width: float) -> int | None:
    """The step from which a :func:`flat_valley` trajectory stays past the top
    of the barrier (``x > width`` at that step and at every later one), or
    None if its last iterate is not past it."""
    step = None
    for t in range(len(xs) - 1, -1, -1):
        if not xs[t] > width:
            break
        step = t
    return step


def first_crossing(xs: list[float], width: float) -> int | None:
    """The first step at which the trajectory is past ``width`` (it may come
    back: not an escape), or None."""
    return next((t for t, x in enumerate(xs) if x > width), None)
