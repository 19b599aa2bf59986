"""The command line: `interpolatron info` and a short `interpolatron demo`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from interpolatron import cli
from interpolatron.backends import BACKEND_NAMES, availability, resolve


def test_info_lists_every_backend_with_its_verdict(capsys):
    """Each backend's line says what availability() says: "available", or
    "unavailable: " and the reason (a bare "available" substring would also
    match the latter)."""
    cli.main(["info"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    section = lines.index("backends for torch.float32 on cpu:")
    for name, why in availability("cpu", torch.float32).items():
        line = next(ln.strip() for ln in lines[section + 1:] if ln.strip().startswith(name + " "))
        verdict = line[len(name):].strip()
        assert verdict == ("available" if why is None else f"unavailable: {why}"), line
    assert lines[section + 1 + len(BACKEND_NAMES)].strip() == (
        f"auto -> {resolve('auto', torch.device('cpu'), torch.float32).name}")


def test_demo_trains_writes_plot_and_json(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    names = ["SGD", "Interpolatron-2", "Anderson-2", "momentum+RNA"]
    cli.main(["demo", "--epochs", "2", "--out", str(tmp_path), "--only", *names])
    out = capsys.readouterr().out
    for name in names:
        assert name in out
    png = tmp_path / "demo_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((tmp_path / "demo_results.json").read_text())
    assert [r["name"] for r in record["results"]] == names
    for r in record["results"]:
        assert len(r["losses"]) == 2 and 0 <= r["accuracy"] <= 1 and r["step_ms"] > 0
        # Two epochs on digits already beat chance by far.
        assert r["accuracy"] > 0.3


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "interpolatron", "info"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "interpolatron" in done.stdout


def test_unknown_command_is_refused():
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])
