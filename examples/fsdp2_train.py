"""Train a small model sharded with FSDP2, with Anderson mixing (or
Interpolatron), checkpoint it with torch.distributed.checkpoint, and evaluate
an RNA extrapolation of the sharded weights.

    torchrun --nproc-per-node 2 examples/fsdp2_train.py             # CPU: gloo
    torchrun --nproc-per-node 2 examples/fsdp2_train.py --steps 30 --save /tmp/ckpt
    torchrun --nproc-per-node 3 examples/fsdp2_train.py --steps 50 --resume /tmp/ckpt
        # resumes on 3 ranks (DCP reshards) and continues the 2-rank trajectory

On GPUs it uses NCCL and one GPU per rank. Every rank sees its own slice of
each batch; FSDP2 averages the gradients, and the optimizer's one Gram
all-reduce per step makes Anderson's coefficients those of the whole model.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import interpolatron


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank (FSDP2 shards them)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))


def batch(step: int, rank: int, world: int, device: torch.device, size: int = 64):
    """This rank's slice of the step's global batch (a fixed regression task)."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(size, 32, generator=gen)
    y = torch.sin(x[:, :1] * 2) + 0.5 * x[:, 1:2] * x[:, 2:3]
    part = slice(rank * size // world, (rank + 1) * size // world)
    return x[part].to(device), y[part].to(device)


def global_loss(model: nn.Module, step: int, rank: int, world: int, device: torch.device) -> float:
    """The loss on a held-out global batch, the same number on every rank."""
    with torch.no_grad():
        x, y = batch(10_000 + step, rank, world, device)
        total = torch.stack([((model(x) - y) ** 2).sum(), torch.tensor(float(len(x)), device=device)])
        dist.all_reduce(total)
        return float(total[0] / total[1])


def train(args: argparse.Namespace) -> None:
    cuda = torch.cuda.is_available()
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda" if cuda else "cpu")
    torch.set_num_threads(1)

    model = make_model().to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)  # parameters become DTensors sharded on dim 0 (uneven shards are fine)
    fully_shard(model)
    if args.optimizer == "anderson":
        opt = interpolatron.Anderson(model.parameters(), lr=args.lr, history=3, reg=1e-6)
    else:
        opt = interpolatron.Interpolatron(model.parameters(), lr=args.lr, alphas=(0.1, 0.9))
    rna = interpolatron.RNA(model, window=5)

    start = 0
    if args.resume:
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd, "step": torch.zeros((), dtype=torch.int64)}
        dcp.load(state, checkpoint_id=args.resume)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = int(state["step"])
        if rank == 0:
            print(f"resumed at step {start} on {world} ranks")

    for step in range(start, args.steps):
        x, y = batch(step, rank, world, device)
        opt.zero_grad(set_to_none=True)
        # FSDP2 averages the ranks' gradients: scaled by the world size, the
        # ranks' sums make the global batch's mean (exactly, whatever the slices).
        (((model(x) - y) ** 2).sum() * (world / 64)).backward()
        opt.step()
        if step % 5 == 4:
            rna.record()
        if rank == 0 and (step % 10 == 9 or step == args.steps - 1):
            coefs = [round(c, 4) for c in opt.coefficients.tolist()] if args.optimizer == "anderson" else []
            extra = f"  coefficients {coefs}" if coefs else ""
            loss = global_loss(model, step, rank, world, device)
            print(f"step {step + 1:4d}  held-out loss {loss:.5f}{extra}")
        elif step % 10 == 9 or step == args.steps - 1:
            global_loss(model, step, rank, world, device)  # every rank joins the all-reduce

    if args.save:
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd, "step": torch.tensor(args.steps)},
                 checkpoint_id=args.save)
        if rank == 0:
            print(f"saved step {args.steps} to {args.save}")

    if rna.residuals >= 1:
        plain = global_loss(model, -1, rank, world, device)
        with rna.swapped():  # the extrapolated weights, on the shards, restored on exit
            extrapolated = global_loss(model, -1, rank, world, device)
        if rank == 0:
            print(f"RNA over the last {rna.residuals + 1} snapshots: held-out loss {extrapolated:.5f} "
                  f"(weights as trained {plain:.5f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", choices=["anderson", "interpolatron"], default="anderson")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--save", metavar="DIR", help="save a distributed checkpoint there at the end")
    parser.add_argument("--resume", metavar="DIR", help="resume from a distributed checkpoint")
    args = parser.parse_args()

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    train(args)
    # Shut down in step: every rank past its last collective, and the model,
    # optimizer and RNA (whose device meshes hold the process group) gone, so
    # that no communicator is torn down at interpreter exit while a peer still
    # talks to it (a gloo rank aborted there once in CI).
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
