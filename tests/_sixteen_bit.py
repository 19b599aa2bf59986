"""The small 16-bit training problem shared by the master-weights and
stochastic-rounding tests: a two-layer MLP regression whose float32 run moves
about 0.34 in 200 steps at lr 1e-3."""

from __future__ import annotations

import torch

from interpolatron.optim import Anderson, Interpolatron


def make_model(dtype: torch.dtype) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.to(dtype)


def make_data(dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 16, generator=g)
    w = torch.randn(16, 4, generator=g)
    return x.to(dtype), (torch.sin(x @ w)).to(dtype)


def make_optimizer(algo: str, params, backend: str, **kw):
    if algo == "interpolatron":
        return Interpolatron(params, lr=kw.pop("lr", 0.05), alphas=(0.3, 0.7), weight_decay=0.01,
                             backend=backend, **kw)
    return Anderson(params, lr=kw.pop("lr", 0.05), history=3, reg=1e-3, weight_decay=0.01, backend=backend,
                    **kw)
