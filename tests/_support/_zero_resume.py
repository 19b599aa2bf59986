"""What each rank runs in tests/integration/test_zero_resume.py (module-level,
so spawned processes can import it): ZeroRedundancyOptimizer saves its
consolidated state_dict, steps on, and loads it back into the SAME wrapped
optimizer, compared with loading it into a fresh one."""

from __future__ import annotations

import functools
import io

import _dist_cases as C
import torch
import torch.distributed as dist

SAVED_AT, DETOUR, AFTER = 3, 2, 3


def _roundtrip(state_dict: dict) -> dict:
    """Through torch.save: the saved tensors are no longer the optimizer's own."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _build(name: str, model):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    cls = functools.partial(C._optimizer, name, process_group=dist.group.WORLD)
    return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls)


def _put(model, params) -> None:
    with torch.no_grad():
        for p, x in zip(model.parameters(), params):
            p.copy_(x)


def reload(rank: int, world: int, name: str) -> dict:
    """Train, save (consolidated on rank 0, sent to every rank), train on, then
    resume from the save twice: into the same wrapped optimizer ("same") and
    into a fresh model and optimizer ("fresh"); each trains AFTER steps more."""
    model = C.make_model()
    opt = _build(name, model)
    C.train(model, opt, 0, SAVED_AT)
    opt.consolidate_state_dict(to=0)
    box = [_roundtrip(opt.state_dict()) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    saved, x_saved = box[0], C.full_params(model)
    last = SAVED_AT + DETOUR + AFTER

    C.train(model, opt, SAVED_AT, SAVED_AT + DETOUR)
    _put(model, x_saved)
    opt.load_state_dict(_roundtrip(saved))
    C.train(model, opt, SAVED_AT + DETOUR, last)
    same = C.full_params(model)

    fresh_model = C.make_model()
    _put(fresh_model, x_saved)
    fresh_opt = _build(name, fresh_model)
    fresh_opt.load_state_dict(_roundtrip(saved))
    C.train(fresh_model, fresh_opt, SAVED_AT + DETOUR, last)
    return {"same": same, "fresh": C.full_params(fresh_model)}


def suite(rank: int, world: int, names) -> dict:
    return {name: reload(rank, world, name) for name in names}
