"""What the convergence scripts share: output folder, device choice, the
record of a run (JSON next to every figure) and the plot style."""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "bench" / "results" / "convergence"


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    return device


def out_dir(path: str | None) -> Path:
    out = Path(path) if path else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_info(device: torch.device, started: float) -> dict[str, Any]:
    """What a result file says about how it was made."""
    from interpolatron.benchmark import device_name, git_commit

    return {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
            "python": platform.python_version(), "git_commit": git_commit(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - started, 1), "torch_threads": torch.get_num_threads()}


def save_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data, indent=1, default=float) + "\n")
    return path


def save_fig(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
