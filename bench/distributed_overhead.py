"""What the whole-model Gram costs in communication: Anderson's step on DTensor
shards over 2 gloo ranks on the CPU, with its one all-reduce per step and with
the all-reduce skipped (numerically wrong, timing only), and the all-reduce alone.

    PYTHONPATH=. python bench/distributed_overhead.py [--numel 1000000] [--history 3]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _timed(fn, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls, from a barrier to a
    barrier: both variants then wait for the slower rank, and their difference
    is what the all-reduce itself adds."""
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rank(rank: int, world: int, port: int, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    import interpolatron
    from interpolatron import gram

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(0)
    sizes = [args.numel // 4] * 4
    params = [torch.nn.Parameter(distribute_tensor(torch.randn(n, generator=gen), mesh, [Shard(0)],
                                                   src_data_rank=None)) for n in sizes]
    grads = [distribute_tensor(torch.randn(n, generator=gen), mesh, [Shard(0)], src_data_rank=None)
             for n in sizes]
    # The same gradient every step: reg keeps the (rank-one) Gram system solvable.
    opt = interpolatron.Anderson(params, lr=1e-3, history=args.history, reg=1e-2, backend=args.backend)
    for p, g in zip(params, grads):
        p.grad = g
    for _ in range(3):
        opt.step()
    real = gram.all_reduce_sum
    with_reduce, without = [], []
    for _ in range(args.rounds):  # interleaved, so a busy moment hits both variants
        with_reduce.append(_timed(opt.step, args.repeats))
        gram.all_reduce_sum = lambda t, key: t  # timing only: every rank keeps its own partial
        try:
            without.append(_timed(opt.step, args.repeats))
        finally:
            gram.all_reduce_sum = real
    with_reduce, without = statistics.median(with_reduce), statistics.median(without)
    k = args.history
    probe = torch.zeros(k * k, dtype=torch.float64)
    alone = _timed(lambda: dist.all_reduce(probe), args.repeats * 5) - _timed(lambda: None, args.repeats * 5)
    if rank == 0:
        print(f"Anderson-{k}, {args.numel} fp32 elements over {world} gloo ranks "
              f"({args.numel // world} per rank), backend {opt.backends_in_use()}, "
              f"1 thread per rank")
        print(f"  step with the all-reduce   {with_reduce * 1e3:8.3f} ms "
              f"(median of {args.rounds} x {args.repeats})")
        print(f"  step without it            {without * 1e3:8.3f} ms")
        print(f"  difference                 {(with_reduce - without) * 1e3:8.3f} ms")
        print(f"  all-reduce of {k}x{k} float64 alone {alone * 1e3:8.3f} ms (barrier subtracted)")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1_000_000)
    parser.add_argument("--history", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(args.world, port, args), nprocs=args.world, start_method="spawn")


if __name__ == "__main__":
    main()
