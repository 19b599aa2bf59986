"""The demo runs at the learning rates its sweep found, says so, and the sweep
file it cites is the one committed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from interpolatron import Anderson, Interpolatron, cli, demo

SWEEP = Path(__file__).resolve().parents[2] / "bench" / "results" / "convergence" / "lr_sweep.json"


def test_tuned_rates_are_the_sweeps_best():
    sweep = json.loads(SWEEP.read_text())
    assert sweep["complete"]
    results = sweep["results"]
    assert set(results) == set(demo.PAPER_LR) == set(demo.TUNED_LR)
    for name, res in results.items():
        assert demo.TUNED_LR[name] == pytest.approx(res["best_lr"], rel=1e-12), name
        # the chosen rate really has the lowest seed-mean final training loss of its grid
        means = {float(lr): v["final_loss_mean"] for lr, v in res["per_lr"].items()}
        assert min(means, key=means.get) == pytest.approx(res["best_lr"], rel=1e-12), name
        assert len(res["runs"][f"{res['best_lr']:g}"]) == sweep["args"]["seeds"] >= 3


@pytest.mark.parametrize("name", sorted(demo.PAPER_LR))
def test_make_optimizer_builds_the_named_method_at_the_rate(name):
    p = [torch.nn.Parameter(torch.zeros(3))]
    opt = demo.make_optimizer(name, p, 0.123)
    assert opt.param_groups[0]["lr"] == 0.123
    assert opt.param_groups[0]["weight_decay"] == demo.WEIGHT_DECAY
    expected = {"Interpolatron-2": Interpolatron, "Interpolatron-3": Interpolatron, "Anderson-2": Anderson,
                "Adam": torch.optim.Adam}.get(name, torch.optim.SGD)
    assert type(opt) is expected
    if name.startswith("Interpolatron"):
        assert len(opt.param_groups[0]["alphas"]) == int(name[-1])


def test_demo_says_which_rates_it_used(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a shared CPU stall each other: a 1-epoch run took 8-15 s
    try:
        for rates, table, phrase in (("tuned", demo.TUNED_LR, "tuned per optimizer"),
                                     ("paper", demo.PAPER_LR, "the papers'")):
            cli.main(["demo", "--epochs", "1", "--out", str(tmp_path), "--only", "Adam", "--rates", rates])
            out = capsys.readouterr().out
            assert phrase in out
            assert re.search(rf"^Adam\s+{table['Adam']:g}\s", out, re.M)  # the table shows the rate used
            meta = json.loads((tmp_path / "demo_results.json").read_text())["meta"]
            assert meta["rates"] == rates and meta["lr"] == {"Adam": table["Adam"]}
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="unknown optimizer"):
        demo.run(epochs=1, out=str(tmp_path), only=["Adagrad"], quiet=True)
