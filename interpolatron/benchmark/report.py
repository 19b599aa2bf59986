"""Result files: JSON, a markdown table and a plot, and reading them back."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

from .run import BenchResult


def write_json(result: BenchResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": result.meta, "rows": result.rows, "skipped": result.skipped},
                               indent=1, default=str) + "\n")
    return path


def _mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("| set | dtype | optimizer | impl | elements | median ms | min ms | B/elem | GB/s "
            "| of copy | floor ms | peak extra MiB | state MiB |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        elem = r["bytes"] // (r["numel"] * r["accesses_per_elem"])
        plain = (r["bytes"] == r["numel"] * r["accesses_per_elem"] * elem
                 and not r["optimizer"].endswith("-master"))
        # A master-weights step mixes widths: its bytes per element as such.
        per_elem = f"{r['accesses_per_elem']}x{elem}" if plain else str(r["bytes"] // r["numel"])
        lines.append(
            f"| {r['set']} | {r['dtype']} | {r['optimizer']} | {r['impl']} | {r['numel']:,} "
            f"| {r['time_s'] * 1e3:.3f} | {r['time_min_s'] * 1e3:.3f} | {per_elem} "
            f"| {r['bytes_per_s'] / 1e9:.2f} | {100 * r['fraction_of_copy']:.1f} % "
            f"| {r['floor_s'] * 1e3:.3f} | {_mb(r['peak_extra_bytes'])} | {_mb(r['state_bytes'])} |")
    return "\n".join(lines)


def write_markdown(result: BenchResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = result.meta
    peak_methods = sorted({r["peak_method"] for r in result.rows})
    timers = sorted({r["timer"] for r in result.rows})
    text = [
        f"# Optimizer step benchmark: {m['device_name']} ({m['device']})", "",
        f"- torch {m['torch']}, triton {m['triton']}, interpolatron {m['interpolatron']}, "
        f"python {m['python']}, commit `{m['git_commit']}`, {m['date']}",
        f"- command: `{m['command']}`",
        f"- copy bandwidth (`dst.copy_(src)`, {m['copy_buffer_bytes'] >> 20} MiB, 2 bytes moved per byte): "
        f"{m['copy_bytes_per_s'] / 1e9:.2f} GB/s (before the cases {m['copy_bytes_per_s_before'] / 1e9:.2f}, "
        f"after {m['copy_bytes_per_s_after'] / 1e9:.2f}; the higher is the reference)",
        f"- timer: {', '.join(timers)}; {m['warmup']} warm-up calls, median of {m['reps']} "
        f"(CPU; CUDA: do_bench's own budget)",
        f"- peak extra memory: {', '.join(peak_methods)}; state = net allocation of building the "
        f"optimizer plus its warm-up steps",
        f"- threads: {m.get('torch_threads')} of {m.get('cpu_count')} CPUs; load average at start "
        f"{m.get('loadavg_start')}, at end {m.get('loadavg_end')}",
        "- B/elem: element reads + writes per parameter element (ALGORITHMS.md section 4) x element size; "
        "`of copy` = achieved bytes/s over the copy bandwidth; `floor` = bytes / copy bandwidth",
        "",
        markdown_table(result.rows), "",
    ]
    if result.skipped:
        text += ["Not run:", ""]
        seen = set()
        for s in result.skipped:
            key = (s["case"].split("[")[-1], s["reason"], s.get("dtype"))
            if key in seen:
                continue
            seen.add(key)
            text.append(f"- [{key[0]} ({s.get('dtype')}): {s['reason']}")
        text.append("")
    path.write_text("\n".join(text))
    return path


def write_plot(result: BenchResult, path: str | Path) -> Path:
    """One panel per (set, dtype): each case's fraction of the copy bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in result.rows:
        groups.setdefault((r["set"], r["dtype"]), []).append(r)
    n = max(1, len(groups))
    cols = min(n, 2)
    nrows = math.ceil(n / cols)
    height = max(len(g) for g in groups.values()) * 0.28 + 1.2 if groups else 2
    fig, axes = plt.subplots(nrows, cols, figsize=(7.5 * cols, height * nrows), squeeze=False)
    colors = {"torch.optim": "tab:gray"}
    palette = {"torch": "tab:blue", "native": "tab:orange", "triton": "tab:green"}
    for ax, ((set_label, dtype), rows) in zip(axes.flat, groups.items()):
        labels = [f"{r['optimizer']} [{r['impl']}]" for r in rows]
        fracs = [100 * r["fraction_of_copy"] for r in rows]
        bar_colors = [colors.get(r["family"], palette.get(r["impl"], "tab:purple")) for r in rows]
        y = range(len(rows))
        ax.barh(y, fracs, color=bar_colors)
        for yi, (f, r) in enumerate(zip(fracs, rows)):
            ax.text(f, yi, f" {r['time_s'] * 1e3:.2f} ms", va="center", fontsize=7)
        ax.set_yticks(list(y), labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(100, color="k", lw=0.8, ls="--")
        ax.set_xlabel("% of copy bandwidth (bytes each step must move / median time)")
        ax.set_title(f"{set_label}, {dtype}: {rows[0]['numel']:,} elements, {rows[0]['n_tensors']} tensors",
                     fontsize=9)
        ax.set_xlim(0, max(110, max(fracs) * 1.25))
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    m = result.meta
    fig.suptitle(f"{m['device_name']}: copy {m['copy_bytes_per_s'] / 1e9:.1f} GB/s; "
                 f"torch {m['torch']}, commit {m['git_commit'][:12]}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the suptitle
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_json(path: str | Path) -> BenchResult:
    """A result written by :func:`write_json` (to redraw or re-tabulate it)."""
    data = json.loads(Path(path).read_text())
    return BenchResult(data["rows"], data.get("skipped", []), data["meta"])


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def result_stem(result: BenchResult, dtypes: Sequence[str]) -> str:
    """``steps-<device>-torch<version>-<dtypes>``: a result file names its device and versions."""
    m = result.meta
    device = _slug(m["device_name"])[:40]
    torch_v = m["torch"].split("+")[0]
    return f"steps-{m['device']}-{device}-torch{torch_v}-{'-'.join(dtypes)}"


def write_all(result: BenchResult, out: str | Path, stem: str, plot: bool = True) -> list[Path]:
    out = Path(out)
    paths = [write_json(result, out / f"{stem}.json"), write_markdown(result, out / f"{stem}.md")]
    if plot and result.rows:
        paths.append(write_plot(result, out / f"{stem}.png"))
    return paths
