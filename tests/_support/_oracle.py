"""An independent float64 oracle, written straight from ALGORITHMS.md
(sections 1-3) on flat NumPy vectors. It does not import interpolatron: the
tests compare the package against it.

Conventions shared by the oracles:

- ``groups`` is a list of dicts like torch param groups, with NumPy arrays
  as ``params`` (copied to float64) and the hyperparameters of ALGORITHMS.md.
- ``step(grads, lrs)``: ``grads[g][i]`` is the raw gradient (``p.grad``) of
  parameter ``i`` of group ``g`` at the current iterate, or None when that
  parameter has no gradient this step (it is skipped: unchanged, and its
  history does not advance). ``lrs[g]`` is the learning rate of group ``g``
  at the moment of the step (a schedule); None keeps the group's ``lr``.
- Histories are per parameter and newest first; a parameter's history starts
  at its first gradient with copies of ``x^(0)`` and ``g^(0)`` (warm start).
"""

from __future__ import annotations

import itertools

import numpy as np


def effective_grad(grad: np.ndarray, x: np.ndarray, weight_decay: float, maximize: bool) -> np.ndarray:
    """``g = sign * grad + weight_decay * x`` (coupled weight decay)."""
    g = -grad if maximize else grad
    return g + weight_decay * x


def _copy_groups(groups: list[dict]) -> list[dict]:
    out = []
    for g in groups:
        g = dict(g)
        g["params"] = [np.array(p, dtype=np.float64, copy=True) for p in g["params"]]
        g.setdefault("weight_decay", 0.0)
        g.setdefault("maximize", False)
        out.append(g)
    return out


class _Oracle:
    def __init__(self, groups: list[dict]):
        self.groups = _copy_groups(groups)
        self.t = 0

    @property
    def params(self) -> list[list[np.ndarray]]:
        return [[p.copy() for p in g["params"]] for g in self.groups]

    def flat_params(self) -> list[np.ndarray]:
        return [p.copy() for g in self.groups for p in g["params"]]

    def _lr(self, gi: int, lrs) -> float:
        return float(self.groups[gi]["lr"] if lrs is None or lrs[gi] is None else lrs[gi])

    def _take_gradients(self, grads) -> list[tuple[int, int]]:
        """Anderson's intake of one step: each effective gradient becomes age 0
        of its g history (a first one warm-starts k copies of x^(0), g^(0));
        returns the keys of the parameters that had one."""
        k = self.k
        active = []
        for gi, group in enumerate(self.groups):
            for pi, x in enumerate(group["params"]):
                grad = grads[gi][pi]
                if grad is None:
                    continue
                g = effective_grad(np.asarray(grad, dtype=np.float64), x, group["weight_decay"],
                                   group["maximize"])
                key = (gi, pi)
                if key not in self.g_hist:  # warm start: copies of x^(0), g^(0)
                    self.x_hist[key] = [x.copy() for _ in range(k - 1)]
                    self.g_hist[key] = [g.copy() for _ in range(k)]
                else:
                    self.g_hist[key] = [g.copy()] + self.g_hist[key][: k - 1]
                active.append(key)
        return active


class InterpolatronOracle(_Oracle):
    """ALGORITHMS.md section 1:
    ``x^(t) = sum_i a_i x^(t-i) - lr_t sum_i a_i g^(t-i)``, ``a_1`` the newest."""

    def __init__(self, groups: list[dict]):
        super().__init__(groups)
        self.x_hist: dict[tuple[int, int], list[np.ndarray]] = {}
        self.g_hist: dict[tuple[int, int], list[np.ndarray]] = {}

    def step(self, grads, lrs=None) -> None:
        for gi, group in enumerate(self.groups):
            lr = self._lr(gi, lrs)
            a = [float(v) for v in group["alphas"]]
            k = len(a)
            for pi, x in enumerate(group["params"]):
                grad = grads[gi][pi]
                if grad is None:
                    continue
                g = effective_grad(np.asarray(grad, dtype=np.float64), x, group["weight_decay"],
                                   group["maximize"])
                key = (gi, pi)
                if key not in self.x_hist:  # warm start: copies of x^(0), g^(0)
                    self.x_hist[key] = [x.copy() for _ in range(k - 1)]
                    self.g_hist[key] = [g.copy() for _ in range(k - 1)]
                xs = [x] + self.x_hist[key]  # x^(t-1), x^(t-2), ..., x^(t-k)
                gs = [g] + self.g_hist[key]
                new = sum(a[i] * xs[i] for i in range(k)) - lr * sum(a[i] * gs[i] for i in range(k))
                self.x_hist[key] = [x.copy()] + self.x_hist[key][: k - 2] if k > 1 else []
                self.g_hist[key] = [g.copy()] + self.g_hist[key][: k - 2] if k > 1 else []
                group["params"][pi] = np.asarray(new, dtype=np.float64).reshape(x.shape)
        self.t += 1


# -- Anderson ------------------------------------------------------------------

def normalised_min_eig(gram: np.ndarray) -> float:
    """Smallest eigenvalue of ``D^-1/2 M D^-1/2`` (``D = diag M``): how close the
    system is to singular, independent of the gradients' scale."""
    d = np.diag(gram)
    if np.any(d <= 0) or not np.all(np.isfinite(gram)):
        return 0.0
    s = 1.0 / np.sqrt(d)
    return float(np.linalg.eigvalsh(gram * s[:, None] * s[None, :]).min())


def affine_minimiser(gram: np.ndarray) -> np.ndarray:
    """``a = M^-1 1 / (1^T M^-1 1)`` (the minimiser of ``a^T M a`` with ``sum a = 1``)."""
    z = np.linalg.solve(gram, np.ones(len(gram)))
    return z / z.sum()


def simplex_minimiser_enumerated(gram: np.ndarray) -> np.ndarray:
    """``argmin a^T M a`` over ``a >= 0, sum a = 1``, by brute force over the
    ``2^m - 1`` supports: on a support the minimiser of the equality-constrained
    problem solves the KKT system ``[[M_S, 1], [1^T, 0]] [a; nu] = [0; 1]``
    (least squares, so singular ``M_S`` work too); keep the feasible candidate
    with the smallest objective."""
    m = len(gram)
    best, best_value = None, np.inf
    for size in range(1, m + 1):
        for support in itertools.combinations(range(m), size):
            s = list(support)
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size] = gram[np.ix_(s, s)]
            kkt[:size, size] = 1.0
            kkt[size, :size] = 1.0
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:size]
            if not np.all(np.isfinite(sol)) or sol.min() < -1e-12 or abs(sol.sum() - 1) > 1e-9:
                continue
            a = np.zeros(m)
            a[s] = np.clip(sol, 0.0, None)
            a /= a.sum()
            value = float(a @ gram @ a)
            if best is None or value < best_value - 1e-15 * max(1.0, abs(best_value)):
                best, best_value = a, value
    assert best is not None, "the simplex always holds a vertex"
    return best


def anderson_solve(gram: np.ndarray, reg: float = 0.0, constraint: str | None = None,
                   singular_tol: float = 1e-6) -> tuple[np.ndarray, bool]:
    """ALGORITHMS.md section 2 on the ``m x m`` Gram of the gradients that exist.

    Returns ``(a, fell_back)``; the fallback is ``a = (1, 0, ..., 0)``. A
    system counts as singular when the smallest eigenvalue of its unit-diagonal
    scaling is below ``singular_tol`` (the tests keep away from that border).
    """
    m = len(gram)
    e1 = np.zeros(m)
    e1[0] = 1.0
    system = np.array(gram, dtype=np.float64)
    if reg:
        system = system + reg * np.trace(system) / m * np.eye(m)
    if not np.all(np.isfinite(system)):
        return e1, True
    if constraint is None:
        if normalised_min_eig(system) <= singular_tol:
            return e1, True
        a = affine_minimiser(system)
    elif constraint == "simplex":
        a = simplex_minimiser_enumerated(system)
    else:
        raise ValueError(constraint)
    if not np.all(np.isfinite(a)):
        return e1, True
    return a, False


class AndersonOracle(_Oracle):
    """ALGORITHMS.md section 2: one global ``a`` from the Gram of the last
    ``m = min(t, k)`` gradients of the whole model, each group with its own
    ``lr`` and ``weight_decay``.

    A parameter without a gradient at a step is skipped: unchanged, its own
    history does not advance, and it does not enter the Gram of that step (the
    fit is over the parameters being updated, each at its own history).
    """

    def __init__(self, groups: list[dict], history: int, reg: float = 0.0,
                 constraint: str | None = None, singular_tol: float = 1e-6):
        super().__init__(groups)
        self.k, self.reg, self.constraint, self.singular_tol = history, reg, constraint, singular_tol
        self.x_hist: dict[tuple[int, int], list[np.ndarray]] = {}  # k - 1 past iterates
        self.g_hist: dict[tuple[int, int], list[np.ndarray]] = {}  # k gradients, age 0 first
        self.fallbacks = 0
        self.coefficients = None
        self.min_eigs: list[float] = []  # the normalised Gram's smallest eigenvalue per step

    def step(self, grads, lrs=None) -> None:
        k = self.k
        active = self._take_gradients(grads)
        if not active:
            return
        m = min(self.t + 1, k)
        gram = np.zeros((m, m))
        for key in active:
            rows = np.stack([h.reshape(-1) for h in self.g_hist[key][:m]])
            gram += rows @ rows.T
        self.min_eigs.append(normalised_min_eig(gram))
        a_m, fell_back = anderson_solve(gram, self.reg, self.constraint, self.singular_tol)
        self.fallbacks += int(fell_back)
        a = np.zeros(k)
        a[:m] = a_m
        self.coefficients = a
        for key in active:
            gi, pi = key
            lr = self._lr(gi, lrs)
            x = self.groups[gi]["params"][pi]
            xs = [x] + self.x_hist[key]
            gs = self.g_hist[key]
            new = sum(a[i] * xs[i] for i in range(m)) - lr * sum(a[i] * gs[i] for i in range(m))
            self.x_hist[key] = ([x.copy()] + self.x_hist[key])[: k - 1]
            self.groups[gi]["params"][pi] = np.asarray(new, dtype=np.float64).reshape(x.shape)
        self.t += 1


class OnePassAndersonOracle(_Oracle):
    """ALGORITHMS.md section 2b (one-pass Anderson, lagged coefficients): step
    ``t`` solves from the Gram kept at the end of step ``t-1`` -- the Gram
    section 2 forms at step ``t-1``, over that step's parameters with
    gradients and its ``m = min(t-1, k)`` newest gradients -- and applies the
    ``m`` coefficients to the current window (``a_1`` on the newest). The
    first step has no kept Gram: it is an SGD step (``a = e_1``, not a
    fallback). Then the step forms its own Gram (over its parameters with
    gradients, ``min(t, k)`` gradients each at its own history), kept for the
    next step. Reg, simplex and the fallback are section 2's.
    """

    def __init__(self, groups: list[dict], history: int, reg: float = 0.0,
                 constraint: str | None = None, singular_tol: float = 1e-6):
        super().__init__(groups)
        self.k, self.reg, self.constraint, self.singular_tol = history, reg, constraint, singular_tol
        self.x_hist: dict[tuple[int, int], list[np.ndarray]] = {}  # k - 1 past iterates
        self.g_hist: dict[tuple[int, int], list[np.ndarray]] = {}  # k gradients, age 0 first
        self.kept: np.ndarray | None = None  # the Gram formed at the previous step
        self.fallbacks = 0
        self.coefficients = None
        # of the system each step solves (the kept Gram, reg added; 1.0 at the first step)
        self.min_eigs: list[float] = []
        self.grams: list[np.ndarray] = []  # the Gram each step keeps

    def step(self, grads, lrs=None) -> None:
        k = self.k
        active = self._take_gradients(grads)
        if not active:
            return
        a = np.zeros(k)
        if self.kept is None:
            a[0] = 1.0
            self.min_eigs.append(1.0)
        else:
            m = len(self.kept)
            system = self.kept + self.reg * np.trace(self.kept) / m * np.eye(m) if self.reg else self.kept
            self.min_eigs.append(normalised_min_eig(system))
            a_m, fell_back = anderson_solve(self.kept, self.reg, self.constraint, self.singular_tol)
            self.fallbacks += int(fell_back)
            a[: len(a_m)] = a_m
        self.coefficients = a
        m = min(self.t + 1, k)
        gram = np.zeros((m, m))
        for key in active:
            rows = np.stack([h.reshape(-1) for h in self.g_hist[key][:m]])
            gram += rows @ rows.T
        self.kept = gram
        self.grams.append(gram)
        for key in active:
            gi, pi = key
            lr = self._lr(gi, lrs)
            x = self.groups[gi]["params"][pi]
            xs = [x] + self.x_hist[key]
            gs = self.g_hist[key]
            new = sum(a[i] * xs[i] for i in range(k)) - lr * sum(a[i] * gs[i] for i in range(k))
            self.x_hist[key] = ([x.copy()] + self.x_hist[key])[: k - 1]
            self.groups[gi]["params"][pi] = np.asarray(new, dtype=np.float64).reshape(x.shape)
        self.t += 1


# -- RNA -----------------------------------------------------------------------

def rna_coefficients(residuals: np.ndarray, lam: float) -> np.ndarray:
    """ALGORITHMS.md section 3 on ``R`` (columns are residuals, oldest first):
    ``RR = R^T R / ||R^T R||_2``, ``z = solve(RR + lam I, 1)`` (least squares
    if singular), ``c = z / sum z`` (uniform if ``|sum z| < 1e-10``)."""
    R = np.asarray(residuals, dtype=np.float64)
    k = R.shape[1]
    RR = R.T @ R
    norm = np.linalg.norm(RR, 2)
    if norm > 0:
        RR = RR / norm
    system = RR + lam * np.eye(k)
    try:
        z = np.linalg.solve(system, np.ones(k))
        if not np.all(np.isfinite(z)):
            raise np.linalg.LinAlgError
    except np.linalg.LinAlgError:
        z = np.linalg.lstsq(system, np.ones(k), rcond=None)[0]
    total = z.sum()
    if abs(total) < 1e-10:
        return np.full(k, 1.0 / k)
    return z / total


def rna_iterates(snapshots: list[np.ndarray], lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Offline RNA on iterate residuals: ``snapshots`` ``y_0..y_k`` (oldest
    first, flat). Returns ``(sum_i c_i y_i over i = 1..k, c)``."""
    Y = np.stack([np.asarray(y, dtype=np.float64).reshape(-1) for y in snapshots], axis=1)
    R = Y[:, 1:] - Y[:, :-1]  # elementwise differences, before any product
    c = rna_coefficients(R, lam)
    return Y[:, 1:] @ c, c


def rna_gradients(iterates: list[np.ndarray], mean_grads: list[np.ndarray],
                  lam: float) -> tuple[np.ndarray, np.ndarray]:
    """RNA on gradient residuals: ``R = [gbar_1..gbar_k]``, extrapolation
    ``sum c_i x_i`` over the iterates recorded at the same times (oldest first)."""
    X = np.stack([np.asarray(x, dtype=np.float64).reshape(-1) for x in iterates], axis=1)
    R = np.stack([np.asarray(g, dtype=np.float64).reshape(-1) for g in mean_grads], axis=1)
    c = rna_coefficients(R, lam)
    return X @ c, c


# -- a deterministic test problem ---------------------------------------------

class Problem:
    """``grad(x) = A x - b + cubic * x**3`` on the concatenation of all
    parameters (A symmetric positive definite, eigenvalues in ``[lo, hi]``):
    the gradient of a random quadratic plus a quartic term. Evaluated in
    float64 from whatever values it is given, identically for the oracle and
    for torch."""

    def __init__(self, shapes: list[tuple[int, ...]], seed: int, lo: float = 0.5, hi: float = 2.0,
                 cubic: float = 0.05):
        rng = np.random.default_rng(seed)
        self.shapes = [tuple(s) for s in shapes]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        n = sum(self.sizes)
        q, _ = np.linalg.qr(rng.standard_normal((n, n))) if n else (np.zeros((0, 0)), None)
        self.A = (q * rng.uniform(lo, hi, n)) @ q.T
        self.b = rng.standard_normal(n)
        self.cubic = cubic

    def flat_grad(self, x: np.ndarray) -> np.ndarray:
        return self.A @ x - self.b + self.cubic * x ** 3

    def grad(self, params: list[np.ndarray]) -> list[np.ndarray]:
        x = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1) for p in params])
        g = self.flat_grad(x)
        out, pos = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            out.append(g[pos:pos + size].reshape(shape))
            pos += size
        return out
