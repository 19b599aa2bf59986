"""A step never reads a device value on the host, and a whole ``opt.step()``
(Anderson's solve included) can be captured in a CUDA graph.

On the CPU the profiler of one step of Interpolatron and of Anderson (plain
and simplex), on every backend available here, must show no ``aten::item`` /
``aten::_local_scalar_dense`` (on a GPU each is a device sync). The k = 2
Anderson solve must stay a handful of ops. The ``gpu`` tests capture a whole
step in a CUDA graph, replay it against eager steps under an in-place lr
change, and run steps under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import pytest
import torch
from _gpu import gpu_backends
from optimizers import backend_params, make
from torch.profiler import ProfilerActivity, profile

from interpolatron.solvers import anderson_coefficients

SYNC_OPS = ("aten::item", "aten::_local_scalar_dense")
# Ops that launch nothing (views, allocations): excluded when counting device ops.
NO_KERNEL = {"aten::" + op for op in (
    "select", "slice", "view", "as_strided", "expand", "unsqueeze", "squeeze", "diagonal", "t", "transpose",
    "reshape", "alias", "permute", "unbind", "split", "narrow", "detach", "empty", "empty_like",
    "empty_strided",
    "resolve_conj", "resolve_neg", "lift_fresh", "_reshape_alias", "result_type", "flatten", "_unsafe_view")}


def _profile(fn) -> list:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e for e in prof.events() if e.name.startswith("aten::")]


def _syncs(events) -> list[str]:
    return [e.name for e in events if e.name in SYNC_OPS]


def _device_ops(events) -> int:
    """Leaf aten ops (no aten child) that are not views or allocations."""
    return sum(1 for e in events
               if e.name not in NO_KERNEL and not any(c.name.startswith("aten::") for c in e.cpu_children))


def _optimizer(name: str, params, backend: str):
    """The registry's configuration ``name``; ``-diag`` adds Interpolatron's diagnostics."""
    if name.endswith("-diag"):
        return make(name.removesuffix("-diag"), params, backend, diagnostics=True)
    return make(name, params, backend, weight_decay=0.01)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _backward(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=False)
    model(x).square().sum().backward()


NAMES = ("interpolatron-k2", "interpolatron-k2-diag", "anderson-k2", "anderson-k2-simplex", "anderson-k3",
         "anderson-k2-onepass")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", NAMES)
def test_step_has_no_host_sync(name, backend):
    model = _model()
    opt = _optimizer(name, model.parameters(), backend)
    x = torch.randn(5, 12)
    for _ in range(3):  # past the warm-up, and the device tables exist
        _backward(model, x)
        opt.step()
    _backward(model, x)
    before = [p.detach().clone() for p in model.parameters()]
    events = _profile(opt.step)
    assert not _syncs(events), (name, backend, _syncs(events))
    # The profiled call was a real step (a vacuous pass would change nothing).
    assert events and any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("constraint", [None, "simplex"])
def test_anderson_2_solve_is_a_handful_of_ops(constraint):
    """The k = 2 solve in closed form: no LAPACK call, no sync, and few ops (the
    general path issued 48 non-view ops, 60 with the simplex, and 4 / 6 syncs)."""
    g = torch.randn(2, 9, dtype=torch.float64)
    gram = g @ g.T
    valid = torch.tensor([True, True])
    anderson_coefficients(gram, valid, 0.0, constraint)
    events = _profile(lambda: anderson_coefficients(gram, valid, 0.0, constraint))
    assert not _syncs(events)
    assert _device_ops(events) <= 32, _device_ops(events)


def test_anderson_2_closed_form_matches_general_solve():
    """The closed form against the k x k path it replaces (valid ages,
    regularisation, simplex, degenerate Gram matrices)."""
    from interpolatron import solvers

    torch.manual_seed(3)
    grams = []
    for _ in range(50):
        v = torch.randn(2, 6, dtype=torch.float64)
        grams.append(v @ v.T)
    g = torch.randn(6, dtype=torch.float64)
    for v in (torch.stack([g, -g]), torch.stack([g, g]), torch.stack([g, 3 * g])):
        grams.append(v @ v.T)
    grams.append(torch.zeros(2, 2, dtype=torch.float64))
    grams.append(torch.tensor([[float("inf"), 0.0], [0.0, 1.0]], dtype=torch.float64))

    def general(gram, valid, reg, constraint):
        system = solvers._masked_system(solvers._regularised(gram, valid, reg), valid)
        if constraint is None:
            factor, scale, info = solvers._cholesky_normed(system)
            ok = solvers._is_nonsingular(system, factor, info, solvers.DEFAULT_SINGULAR_TOL)
            a = solvers._normalised_affine_solve(factor, scale, valid.to(gram.dtype))
        else:
            ok = torch.isfinite(system).all()
            a = solvers._simplex_minimiser(system, valid)
        ok = ok & torch.isfinite(a).all()
        return torch.where(ok, a, torch.tensor([1.0, 0.0], dtype=torch.float64)), ~ok

    for gram in grams:
        for valid in (torch.tensor([True, True]), torch.tensor([True, False])):
            for reg in (0.0, 1e-3):
                for constraint in (None, "simplex"):
                    want, want_fb = general(gram, valid, reg, constraint)
                    got, got_fb = anderson_coefficients(gram, valid, reg, constraint)
                    assert bool(got_fb) == bool(want_fb), (gram, valid, reg, constraint)
                    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- GPU




@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("name", ["interpolatron-k2", "interpolatron-k2-diag", "anderson-k2",
                                  "anderson-k2-simplex", "anderson-k2-onepass"])
def test_gpu_whole_step_graph_replays_like_eager(name, backend):
    """A captured ``opt.step()`` replayed with new gradients and an in-place lr
    change gives the same parameters as eager steps (fp32, tight tolerance)."""
    dev = "cuda"
    xs = [torch.randn(5, 12, device=dev) for _ in range(6)]
    lrs = [0.05, 0.05, 0.02, 0.02, 0.03, 0.01]

    def run(capture: bool):
        model = _model().to(dev)
        lr = torch.tensor(lrs[0], device=dev)
        opt = _optimizer(name, model.parameters(), backend)
        opt.param_groups[0]["lr"] = lr
        static_x = xs[0].clone()
        for i in range(2):  # warm-up, uncaptured: tables, caches, solver constants
            static_x.copy_(xs[i])
            _backward(model, static_x)
            opt.step()
        if capture:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(s):
                with torch.cuda.graph(graph, stream=s):
                    _backward(model, static_x)
                    opt.step()
            torch.cuda.current_stream().wait_stream(s)
            # Capturing ran nothing: restart from the same state as eager.
        out = []
        for i in range(2, len(xs)):
            lr.fill_(lrs[i])  # in place: the graph reads the new value
            static_x.copy_(xs[i])
            if capture:
                graph.replay()
            else:
                _backward(model, static_x)
                opt.step()
            out.append([p.detach().clone() for p in model.parameters()])
        torch.cuda.synchronize()
        return out

    eager, replayed = run(False), run(True)
    for a, b in zip(eager, replayed):
        for pa, pb in zip(a, b):
            torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("name", NAMES)
def test_gpu_step_under_sync_debug_error(name, backend):
    model = _model().to("cuda")
    opt = _optimizer(name, model.parameters(), backend)
    x = torch.randn(5, 12, device="cuda")
    for _ in range(2):
        _backward(model, x)
        opt.step()
    _backward(model, x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
