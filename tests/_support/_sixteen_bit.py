"""The small 16-bit training problem shared by the master-weights and
stochastic-rounding tests: a two-layer MLP regression whose float32 run moves
about 0.34 in 200 steps at lr 1e-3."""

from __future__ import annotations

import torch
from optimizers import make


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
    """Interpolatron k = 2, Anderson k = 3 or one-pass Anderson k = 2 of the
    registry, with weight decay."""
    name = {"interpolatron": "interpolatron-k2", "anderson": "anderson-k3",
            "anderson-onepass": "anderson-k2-onepass"}[algo]
    return make(name, params, backend, **{"weight_decay": 0.01, **kw})


def assert_skipped_step_writes_nothing(algo: str, backend: str, **kw) -> None:
    """float16, GradScaler's scale 64: two steps taken, then one with found_inf
    set; the parameters and every state tensor stay bitwise as they were."""
    m = make_model(torch.float16)
    opt = make_optimizer(algo, m.parameters(), backend, **kw)
    x, y = make_data(torch.float16)
    scale = torch.tensor(2.0 ** 6)
    for found in (0.0, 0.0, 1.0):
        if found:
            before = {p: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
                      for p in m.parameters()}
        opt.zero_grad()
        (torch.nn.functional.mse_loss(m(x).float(), y.float()) * scale).backward()
        opt.step(grad_scale=scale, found_inf=torch.tensor(found))
    for p, (value, state) in before.items():
        assert torch.equal(p, value)
        for k, v in state.items():
            assert torch.equal(opt.state[p][k], v), k
