"""Coefficient solves for Anderson mixing and RNA, in float64 on the Gram
matrix's device.

Nothing here reads a tensor value on the host: every decision (warm-up size,
singularity, non-finite values, the simplex support) is a ``torch.where`` on
device tensors, so an optimizer step that calls these can be captured in a
CUDA graph. The ``*_ex`` linear-algebra variants are used because the plain
ones check their ``info`` on the host.
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch import Tensor

# Normalised Cholesky pivots below this (squared) make a Gram matrix singular
# for our purposes: the Gram entries of fp32 gradients carry relative errors
# of ~1e-7, so a smaller pivot is rounding noise, not information.
DEFAULT_SINGULAR_TOL = 1e-6


def _masked_system(gram: Tensor, valid: Tensor) -> Tensor:
    """The valid block of ``gram`` padded with the identity elsewhere."""
    pair = valid.unsqueeze(-1) & valid.unsqueeze(-2)
    return torch.where(pair, gram, torch.zeros_like(gram)) + torch.diag_embed((~valid).to(gram.dtype))


def _regularised(gram: Tensor, valid: Tensor, reg: float) -> Tensor:
    if reg == 0:
        return gram
    m = valid.sum(-1, keepdim=True).clamp(min=1).to(gram.dtype)
    trace = (torch.diagonal(gram, dim1=-2, dim2=-1) * valid).sum(-1, keepdim=True)
    shift = reg * trace / m
    return gram + torch.diag_embed(shift * valid.to(gram.dtype))


def _cholesky_normed(system: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cholesky factor of the unit-diagonal scaling of a (masked, PSD) system:
    (factor, scale, info). ``cholesky_ex`` and ``solve_triangular`` check nothing
    on the host (``solve_ex`` reads its pivots with ``.item()`` on the CPU)."""
    d = torch.diagonal(system, dim1=-2, dim2=-1)
    scale = torch.where(d > 0, d.rsqrt(), torch.zeros_like(d))
    normed = system * scale.unsqueeze(-1) * scale.unsqueeze(-2)
    factor, info = torch.linalg.cholesky_ex(normed)
    return factor, scale, info


def _is_nonsingular(system: Tensor, factor: Tensor, info: Tensor, tol: float) -> Tensor:
    d = torch.diagonal(system, dim1=-2, dim2=-1)
    pivots = torch.diagonal(factor, dim1=-2, dim2=-1)
    ok = (info == 0) & (d > 0).all(-1) & torch.isfinite(system).all(-1).all(-1)
    return ok & ((pivots * pivots).amin(-1) > tol)


def _normalised_affine_solve(factor: Tensor, scale: Tensor, rhs: Tensor) -> Tensor:
    """``z / sum(z)`` with ``z = system^-1 rhs``, from the factor of the scaled system
    (``system = D^-1 L L^T D^-1``, ``D = diag(scale)``)."""
    y = torch.linalg.solve_triangular(factor, (scale * rhs).unsqueeze(-1), upper=False)
    z = torch.linalg.solve_triangular(factor.mT, y, upper=True).squeeze(-1) * scale
    return z / z.sum(-1, keepdim=True)


@functools.lru_cache(maxsize=64)
def _first_unit(k: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    # Cached like _support_masks: no host-to-device copy inside a captured step.
    e1 = torch.zeros(k, dtype=dtype, device=device)
    e1[0] = 1
    return e1


def _anderson_2(gram: Tensor, valid: Tensor, reg: float, constraint: str | None,
                tol: float) -> tuple[Tensor, Tensor]:
    """k = 2 in closed form: the same coefficients as the general path in about
    twenty elementwise ops on two-element tensors (the general path issues
    several times more, a launch each on a GPU).

    With the masked, regularised system ``[[p, b], [b, q]]`` (``q = 1, b = 0``
    while only age 0 exists): unconstrained ``z = [q - b, p w - b]`` over its
    sum, ``w = valid[1]``; singular when the normalised pivot ``1 - b^2/(pq)``
    is at most ``tol``. Simplex: ``t = clamp((q - b) / (p + q - 2b), 0, 1)``,
    ``a = [t, 1 - t]``, and ``t = 0`` when ``p + q - 2b <= 0`` (then every
    point of the segment is optimal and the enumeration picks age 1 alone).
    """
    vf = valid.to(gram.dtype)
    d = torch.diagonal(gram)
    if reg != 0:
        d = d + (reg * (d * vf).sum() / vf.sum().clamp(min=1)) * vf
    dm = torch.where(valid, d, 1.0)
    b = torch.where(valid[1], gram[0, 1], 0.0)
    if constraint is None:
        num = dm.flip(0) * vf - b
        a = num / num.sum()
        # A non-finite entry makes ``a`` non-finite (checked below).
        ok = (dm > 0).all() & (1 - b * b / dm.prod() > tol)
    else:
        s = dm.sum()
        den = s - 2 * b
        t = torch.where(den > 0, ((dm[1] - b) / den).clamp(0, 1), 0.0)
        t = torch.where(valid[1], t, 1.0)
        a = torch.stack((t, 1 - t))
        ok = torch.isfinite(s + b)  # the system (finite a can come from an infinite p)
    ok = ok & torch.isfinite(a.sum())
    return torch.where(ok, a, _first_unit(2, gram.device, gram.dtype)), ~ok


@functools.lru_cache(maxsize=64)
def _support_masks(k: int, device: torch.device) -> Tensor:
    # Cached: building it is a host-to-device copy, not allowed inside a CUDA
    # graph capture (the first, uncaptured step builds it).
    rows = [bits for bits in itertools.product((False, True), repeat=k) if any(bits)]
    return torch.tensor(rows, dtype=torch.bool, device=device)


def _simplex_minimiser(system: Tensor, valid: Tensor) -> Tensor:
    """Exact ``argmin a^T M a`` over the simplex on the valid ages.

    The minimiser is the equality-constrained minimiser on its own support,
    so we solve the KKT system ``[[M_S, 1], [1^T, 0]]`` on every support
    (exact also where ``M_S`` is singular, e.g. opposite gradients) and keep
    the best candidate that is a point of the simplex.
    """
    k = system.shape[-1]
    supports = _support_masks(k, system.device)
    n = len(supports)
    kkt = torch.zeros(n, k + 1, k + 1, dtype=system.dtype, device=system.device)
    kkt[:, :k, :k] = _masked_system(system.expand(n, k, k), supports)
    s = supports.to(system.dtype)
    kkt[:, :k, k] = s
    kkt[:, k, :k] = s
    rhs = torch.zeros(n, k + 1, 1, dtype=system.dtype, device=system.device)
    rhs[:, k] = 1
    sol, _ = torch.linalg.solve_ex(kkt, rhs)
    cand = torch.where(supports, sol[:, :k, 0], torch.zeros_like(s))
    cand = cand / cand.sum(-1, keepdim=True)
    objective = torch.einsum("si,ij,sj->s", cand, system, cand)
    inside = (supports & ~valid).logical_not().all(-1) & (cand >= 0).all(-1)
    usable = inside & torch.isfinite(objective)
    objective = torch.where(usable, objective, torch.full_like(objective, float("inf")))
    # index_select with the argmin tensor: indexing with a 0-dim tensor reads it
    # on the host (a hidden .item(), a sync every step).
    return cand.index_select(0, objective.argmin().view(1))[0]


def anderson_coefficients(
    gram: Tensor,
    valid: Tensor,
    reg: float = 0.0,
    constraint: str | None = None,
    singular_tol: float = DEFAULT_SINGULAR_TOL,
) -> tuple[Tensor, Tensor]:
    """Anderson mixing coefficients ``a`` (age order) and a 0-dim bool ``fell_back``.

    ``gram`` is ``M_ij = <g(age i), g(age j)>`` (float64, ``k x k``); ``valid``
    marks the ages that exist yet (warm-up). Unconstrained:
    ``a = M^-1 1 / (1^T M^-1 1)`` on the valid block, after
    ``M += reg * tr(M)/m * I``; a singular or non-finite system gives
    ``a = e_1`` (an SGD step) and ``fell_back``. ``constraint="simplex"``:
    the exact minimiser of ``a^T M a`` over the simplex, by enumerating the
    supports; that problem is well posed for any finite PSD ``M``, so only a
    non-finite system falls back.
    """
    if constraint not in (None, "simplex"):
        raise ValueError(f"constraint must be None or 'simplex', got {constraint!r}")
    k = gram.shape[-1]
    if k == 2 and gram.dim() == 2:
        return _anderson_2(gram, valid, reg, constraint, singular_tol)
    system = _masked_system(_regularised(gram, valid, reg), valid)
    if constraint is None:
        factor, scale, info = _cholesky_normed(system)
        ok = _is_nonsingular(system, factor, info, singular_tol)
        a = _normalised_affine_solve(factor, scale, valid.to(gram.dtype))
    else:
        ok = torch.isfinite(system).all()
        a = _simplex_minimiser(system, valid)
    ok = ok & torch.isfinite(a).all()
    return torch.where(ok, a, _first_unit(k, gram.device, gram.dtype)), ~ok


def rna_coefficients(gram: Tensor, reg: float) -> Tensor:
    """RNA's regularised extrapolation weights from ``RR = R^T R`` (``m x m``).

    Follows the authors' reference code: ``RR /= ||RR||_2``,
    ``z = solve(RR + reg I, 1)`` (least squares if singular),
    ``c = z / sum z`` (uniform if ``|sum z| < 1e-10``).
    """
    m = gram.shape[-1]
    ones = torch.ones(m, 1, dtype=gram.dtype, device=gram.device)
    norm = torch.linalg.matrix_norm(gram, ord=2)
    scaled = torch.where(norm > 0, gram / norm, gram)
    system = scaled + reg * torch.eye(m, dtype=gram.dtype, device=gram.device)
    z, info = torch.linalg.solve_ex(system, ones)
    z_ls = torch.linalg.pinv(system, hermitian=True) @ ones
    z = torch.where((info == 0) & torch.isfinite(z).all(), z, z_ls).squeeze(-1)
    total = z.sum()
    uniform = torch.full_like(z, 1.0 / m)
    return torch.where(total.abs() < 1e-10, uniform, z / total)
