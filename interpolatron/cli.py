"""Command line: ``interpolatron demo | info | bench`` (also ``python -m interpolatron``)."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys

import torch


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        return f"not available ({type(exc).__name__}: {exc})"


def info() -> None:
    from . import __version__
    from .backends import availability

    print(f"interpolatron {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, triton {_version('triton')}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
        devices.append("cuda")
    else:
        print("cuda: no CUDA device visible to torch")
    try:
        from .backends.native_backend import extension_status
    except ImportError as exc:
        print(f"C++/CUDA extension: cannot be inspected ({exc})")
    else:
        status = extension_status()
        print("C++/CUDA extension: " + ", ".join(f"{k}={v}" for k, v in status.items()))
    from .backends import resolve

    for device in devices:
        for dtype in (torch.float32, torch.bfloat16):
            print(f"\nbackends for {dtype} on {device}:")
            for name, why in availability(device, dtype).items():
                print(f"  {name:<7} {'available' if why is None else 'unavailable: ' + why}")
            print(f"  auto -> {resolve('auto', torch.device(device), dtype).name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser: argparse.REMAINDER refuses a leading "--flag"
        from .benchmark import main as bench_main

        return bench_main(argv[1:]) or 0
    parser = argparse.ArgumentParser(prog="interpolatron", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small CNN on the bundled digits with every optimizer")
    demo.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    demo.add_argument("--epochs", type=int, default=15)
    demo.add_argument("--out", default="interpolatron-demo", help="folder for the plot and the JSON")
    demo.add_argument("--batch", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--only", nargs="+", help="a subset of the optimizers, by name")
    demo.add_argument("--rates", choices=("tuned", "paper"), default="tuned",
                      help="learning rates: tuned for this demo by bench/convergence/lr_sweep.py (default), "
                           "or the papers'")
    sub.add_parser("info", help="backends available here, and why not")
    sub.add_parser("bench", help="time one optimizer step of every optimizer and backend "
                                 "(see `interpolatron bench -h`)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        run(args.device, args.epochs, args.out, args.batch, args.seed, args.only, rates=args.rates)
    else:
        info()
    return 0


if __name__ == "__main__":
    sys.exit(main())
