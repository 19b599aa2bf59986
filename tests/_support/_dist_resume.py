"""What each rank runs in tests/integration/test_sharded_resume.py (module-level,
so spawned ranks can import it): sharded Anderson with 16-bit rings saved
with ``state_dict()`` and loaded into a new optimizer, compared with the
uninterrupted run (issue 17 item 5).

Two routes: DTensor shards (FSDP2's layout: Shard(0) over every rank, one
parameter replicated) and whole plain tensors partitioned over the ranks
with ``process_group=`` (ZeRO's layout, FSDP1's flat shards). Each returns,
per mode, the coefficients of every step and the final parameters, rings
and Anderson's Gram, gathered where sharded."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from _dist_cases import suite  # noqa: F401 (the spawned ranks' entry point)
from torch import nn

import interpolatron
from interpolatron.sharding import is_dtensor

# Large enough that float64 sums of products round, one parameter replicated
# (DTensor route) and one with a few elements (uneven shards).
SHAPES = [(301, 7), (30001,), (5,), (64, 33)]
REPLICATED = 2


def _data(dtype: torch.dtype, steps: int):
    gen = torch.Generator().manual_seed(11)
    x0 = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
             for _ in range(steps)]
    return x0, grads


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if is_dtensor(t) else t).detach().clone()


class _Route:
    """How a route lays the parameters out and hands them their gradients."""

    def __init__(self, route: str, world: int, rank: int):
        self.route = route
        if route == "dtensor":
            from torch.distributed.tensor import Replicate, Shard, init_device_mesh

            self.mesh = init_device_mesh("cpu", (world,))
            self.place = [[Replicate()] if i == REPLICATED else [Shard(0)] for i in range(len(SHAPES))]
            self.mine = list(range(len(SHAPES)))
        else:
            self.mine = [i for i in range(len(SHAPES)) if i % world == rank]

    def params(self, x0: list) -> list:
        if self.route == "dtensor":
            from torch.distributed.tensor import distribute_tensor

            return [nn.Parameter(distribute_tensor(x0[i].clone(), self.mesh, self.place[i],
                                                   src_data_rank=None)) for i in self.mine]
        return [x0[i].clone().requires_grad_() for i in self.mine]

    def grad(self, i: int, g: torch.Tensor):
        if self.route == "dtensor":
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(g, self.mesh, self.place[i], src_data_rank=None)
        return g.clone()

    def fresh(self, params: list) -> list:
        """New parameter objects with the same values (what a restarted job builds)."""
        return [nn.Parameter(p.detach().clone()) if is_dtensor(p) else p.detach().clone().requires_grad_()
                for p in params]

    def make(self, params, backend: str, one_pass: bool, sr: bool):
        group = dist.group.WORLD if self.route == "partition" else None
        return interpolatron.Anderson(params, lr=0.1, history=3, weight_decay=0.01, backend=backend,
                                      one_pass=one_pass, stochastic_rounding=sr, sr_seed=5,
                                      process_group=group)


def _train(route: _Route, params, opt, grads, first: int, last: int, coefs: list, skips: dict) -> None:
    for step in range(first, last):
        for p, i in zip(params, route.mine):
            p.grad = None if i in skips.get(step, ()) else route.grad(i, grads[step][i])
        opt.step()
        coefs.append(opt.coefficients.detach().clone())


def _outcome(route: _Route, params, opt, coefs: list) -> dict:
    anchor = opt.state[params[0]]
    return {"coefs": torch.stack(coefs),
            "params": {i: _full(p) for i, p in zip(route.mine, params)},
            "x_hist": {i: _full(opt.state[p]["x_hist"]) for i, p in zip(route.mine, params)},
            "g_hist": {i: _full(opt.state[p]["g_hist"]) for i, p in zip(route.mine, params)},
            "gram": anchor["anderson_gram"].detach().clone()}


def _strip(sd: dict) -> dict:
    """The state_dict as a checkpoint written before partial Grams were carried."""
    sd = dict(sd)
    sd.pop("anderson_partials", None)
    return sd


def resume(rank, world, route_name, backend, dtype, steps, save_at, one_pass=False, sr=False, skips=None):
    """The uninterrupted run; the run resumed at ``save_at`` from ``state_dict()``
    (through ``torch.save``/``torch.load``) into a new optimizer over new
    parameter objects of the same layout; and the same resume from the
    checkpoint without its partial Grams (what a checkpoint of the version
    before carried none of)."""
    import io

    skips = skips or {}
    route = _Route(route_name, world, rank)
    x0, grads = _data(dtype, steps)
    out = {}
    for mode in ("straight", "resumed", "stripped"):
        params = route.params(x0)
        opt, coefs = route.make(params, backend, one_pass, sr), []
        if mode == "straight":
            _train(route, params, opt, grads, 0, steps, coefs, skips)
        else:
            _train(route, params, opt, grads, 0, save_at, coefs, skips)
            sd = opt.state_dict()
            if mode == "resumed":
                out["carried"] = "anderson_partials" in sd
            buf = io.BytesIO()
            torch.save(sd if mode == "resumed" else _strip(sd), buf)
            buf.seek(0)
            loaded = torch.load(buf, weights_only=True)
            params = route.fresh(params)
            opt = route.make(params, backend, one_pass, sr)
            opt.load_state_dict(loaded)
            _train(route, params, opt, grads, save_at, steps, coefs, skips)
        out[mode] = _outcome(route, params, opt, coefs)
    return out


def fsdp1(rank, world, dtype, steps, save_at):
    """FSDP1 flat parameters (16-bit, no process_group: the optimizer finds
    FSDP1's group), uninterrupted and resumed at ``save_at`` from each rank's
    ``state_dict()`` into a new model and optimizer: the local flat shards
    and the coefficients."""
    import _dist_cases as C
    from torch.distributed.fsdp import FullyShardedDataParallel

    def model_():
        return FullyShardedDataParallel(C.make_model().to(dtype), use_orig_params=False,
                                        device_id=torch.device("cpu"))

    def make(model):
        return interpolatron.Anderson(model.parameters(), lr=0.05, history=3, weight_decay=0.01,
                                      backend="torch")

    def train(model, opt, first, last, coefs):
        for step in range(first, last):
            opt.zero_grad(set_to_none=True)
            x, y = C.batch(step)
            ((model(x.to(dtype)) - y.to(dtype)) ** 2).mean().backward()
            opt.step()
            coefs.append(opt.coefficients.detach().clone())

    out = {}
    for mode in ("straight", "resumed"):
        model = model_()
        opt, coefs = make(model), []
        if mode == "straight":
            train(model, opt, 0, steps, coefs)
        else:
            train(model, opt, 0, save_at, coefs)
            sd = copy.deepcopy(opt.state_dict())
            out["carried"] = "anderson_partials" in sd
            fresh = model_()
            with torch.no_grad():
                for a, b in zip(fresh.parameters(), model.parameters()):
                    a.copy_(b)
            model, opt = fresh, make(fresh)
            opt.load_state_dict(sd)
            train(model, opt, save_at, steps, coefs)
        out[mode] = {"coefs": torch.stack(coefs), "params": [p.detach().clone() for p in model.parameters()]}
    return out


def pickled(rank, world, backend, dtype, steps, save_at, one_pass=False):
    """The uninterrupted run, and a ``pickle`` copy of the optimizer (and its
    parameters) taken at ``save_at`` continuing in its place: pickle cannot
    carry the process groups the partial Grams are keyed by, so the copy
    carries them by layout, as a checkpoint does."""
    import pickle

    route = _Route("dtensor", world, rank)
    x0, grads = _data(dtype, steps)
    out = {}
    for mode in ("straight", "pickled"):
        params = route.params(x0)
        opt, coefs = route.make(params, backend, one_pass, False), []
        if mode == "straight":
            _train(route, params, opt, grads, 0, steps, coefs, {})
        else:
            _train(route, params, opt, grads, 0, save_at, coefs, {})
            opt = pickle.loads(pickle.dumps(opt))
            params = [p for g in opt.param_groups for p in g["params"]]
            _train(route, params, opt, grads, save_at, steps, coefs, {})
        out[mode] = _outcome(route, params, opt, coefs)
    return out


def ignored_elsewhere(rank, world, backend, dtype, steps, save_at):
    """A checkpoint's partial Grams are used only on the layout that wrote
    them: loaded on another (parameter 0 replicated instead of sharded; the
    ranks' checkpoints swapped for the replicated-only model), the run must
    be the one from the checkpoint without them, bitwise."""
    from torch.distributed.tensor import Replicate

    route = _Route("dtensor", world, rank)
    x0, grads = _data(dtype, steps)
    params = route.params(x0)
    opt, coefs = route.make(params, backend, False, False), []
    _train(route, params, opt, grads, 0, save_at, coefs, {})
    sd = opt.state_dict()
    values = [_full(p) for p in params]

    other = _Route("dtensor", world, rank)
    other.place = [[Replicate()] if i in (0, REPLICATED) else pl for i, pl in enumerate(route.place)]
    out = {"carried": "anderson_partials" in sd}
    for mode, state in (("with", sd), ("without", _strip(sd))):
        ps = other.params(values)
        o = other.make(ps, backend, False, False)
        o.load_state_dict(copy.deepcopy(state))
        cs: list = []
        _train(other, ps, o, grads, save_at, steps, cs, {})
        out[mode] = _outcome(other, ps, o, cs)
    return out
