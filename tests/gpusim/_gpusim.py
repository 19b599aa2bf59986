"""The simulated GPU (GPGPU-Sim, built by ``tools/gpusim/build.sh``) and the
harness that runs the project's own CUDA kernels in it
(``tools/gpusim/harness.cpp``): where they are, compiling the harness (cached
by the hash of its sources), running it in functional or timing mode, and
reading the simulator's per-kernel statistics.

Used by the ``gpusim`` tests and by ``tools/gpusim/timing.py``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD_SH = ROOT / "tools" / "gpusim" / "build.sh"
CONFIG = "SM86_RTX3070"  # the simulator's RTX 3070 model: 46 SMs, 4 MB L2, 16 GDDR6 channels
ARCH = "compute_86"
# --fmad=false: the CUDA kernels round every multiply and add separately, as the
# CPU kernels (built with -ffp-contract=off) do: the same bits on both devices
# (setup.py builds the extension with the same flag).
NVCC_FLAGS = ["-std=c++17", "-O3", f"-gencode=arch={ARCH},code={ARCH}", "--fmad=false",
              "-D__NV_LEGACY_LAUNCH", "-Xcompiler", "-D__NV_LEGACY_LAUNCH"]
KERNEL_SOURCES = ["csrc/cuda/combine.cu", "csrc/cuda/gram_row.cu", "csrc/cuda/reduce.cu", "csrc/cuda/rna.cu",
                  "csrc/cuda/launch.cpp"]
HARNESS_SOURCES = ["tools/gpusim/bench_kernels.cu", "tools/gpusim/harness.cpp"]
HEADER_GLOBS = ["csrc/*.h", "csrc/cuda/*.h", "csrc/cuda/*.cuh", "tools/gpusim/*.h"]


def cache_dir() -> Path:
    if os.environ.get("INTERPOLATRON_GPUSIM_CACHE"):
        return Path(os.environ["INTERPOLATRON_GPUSIM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "interpolatron-gpusim"


@dataclass
class Simulator:
    env: dict = field(default_factory=dict)  # CUDA_INSTALL_PATH, INTERPOLATRON_GPUSIM_* from build.sh

    @property
    def lib(self) -> Path:
        return Path(self.env["INTERPOLATRON_GPUSIM_LIB"])

    @property
    def root(self) -> Path:
        return Path(self.env["INTERPOLATRON_GPUSIM_ROOT"])

    @property
    def cuda(self) -> Path:
        return Path(self.env["CUDA_INSTALL_PATH"])

    @property
    def commit(self) -> str:
        return self.env["INTERPOLATRON_GPUSIM_COMMIT"]

    @property
    def patch_sha(self) -> str:
        return self.env["INTERPOLATRON_GPUSIM_PATCH_SHA"]


def find() -> tuple[Simulator | None, str | None]:
    """The built simulator, or None and why not (one line saying what to run)."""
    nvcc = nvcc_path()
    if nvcc is None:
        return None, "nvcc is not on PATH (a CUDA 12/13 toolkit compiles the harness; set NVCC)"
    proc = subprocess.run(["bash", str(BUILD_SH), "--print-env"], capture_output=True, text=True,
                          env=dict(os.environ))
    if proc.returncode != 0:
        why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "unknown"
        return None, f"the simulated GPU is not built ({why}): run tools/gpusim/build.sh (~11 min, once)"
    env = dict(re.findall(r"^export (\w+)='([^']*)'$", proc.stdout, re.M))
    return Simulator(env), None


def nvcc_path() -> str | None:
    return os.environ.get("NVCC") or shutil.which("nvcc")


def _digest(paths: list[Path], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in sorted(paths):
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build_harness(fmad: bool = False) -> Path:
    """The harness binary for the current sources (compiled once per source hash:
    each translation unit is cached on its own, combine.cu takes minutes).
    ``fmad=True`` builds the kernels as nvcc would by default (contracting
    multiply-adds): the experiment that shows why the project does not."""
    nvcc = nvcc_path()
    headers = sorted({p for g in HEADER_GLOBS for p in ROOT.glob(g)})
    flags = [f for f in NVCC_FLAGS if not (fmad and f == "--fmad=false")]
    objdir = cache_dir() / "harness-obj"
    objdir.mkdir(parents=True, exist_ok=True)
    objects = []
    for src in KERNEL_SOURCES + HARNESS_SOURCES:
        path = ROOT / src
        key = _digest([path, *headers], " ".join(flags) + nvcc)
        obj = objdir / f"{path.name}.{key}.o"
        if not obj.exists():
            tmp = obj.with_suffix(".tmp.o")
            subprocess.run([nvcc, *flags, f"-I{ROOT / 'csrc'}", "-c", str(path), "-o", str(tmp)], check=True,
                           capture_output=True, text=True)
            tmp.rename(obj)
        objects.append(obj)
    key = hashlib.sha256("".join(o.name for o in objects).encode()).hexdigest()[:16]
    exe = cache_dir() / "harness" / key / "harness"
    if not exe.exists():
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(".tmp")
        lib64 = cache_dir() / "cuda" / "lib64"  # the 11.8 libcudart build.sh installed
        subprocess.run([nvcc, f"-gencode=arch={ARCH},code={ARCH}", *map(str, objects), "-cudart", "shared",
                        f"-L{lib64}", "-o", str(tmp)], check=True, capture_output=True, text=True)
        tmp.rename(exe)
    return exe


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    rundir: Path

    def kernels(self) -> list[dict]:
        """Per-kernel statistics the simulator printed (timing mode)."""
        return parse_kernel_stats(self.stdout)


def run(sim: Simulator, exe: Path, args: list[str], *, functional: bool, config: dict | None = None,
        timeout: float | None = None, keep: bool = False) -> Run:
    """Runs ``exe args`` on the simulated GPU in a fresh run directory (the
    simulator writes its extracted PTX there: one directory per concurrent run)."""
    rundir = Path(tempfile.mkdtemp(prefix="gpusim-run-"))
    cfgdir = sim.root / "configs" / "tested-cfgs" / CONFIG
    for f in cfgdir.iterdir():
        shutil.copy(f, rundir / f.name)
    if config:
        with open(rundir / "gpgpusim.config", "a") as fh:
            fh.write("\n# interpolatron overrides\n")
            for k, v in config.items():
                fh.write(f"{k} {v}\n")
    env = dict(os.environ)
    env.update(sim.env)
    env["PATH"] = f"{sim.cuda / 'bin'}:{env.get('PATH', '')}"
    env["LD_LIBRARY_PATH"] = f"{sim.lib}:{env.get('LD_LIBRARY_PATH', '')}"
    env["CUOBJDUMP_SIM_FILE"] = "jj"  # as Accel-Sim's scripts set it (else: "No PTX sections found")
    if functional:
        env["PTX_SIM_MODE_FUNC"] = "1"
    else:
        env.pop("PTX_SIM_MODE_FUNC", None)
    cmd = [str(exe), *args]
    if shutil.which("stdbuf"):
        cmd = ["stdbuf", "-o0", "-e0", *cmd]  # keep the end of the output if the simulator aborts
    try:
        proc = subprocess.run(cmd, cwd=rundir, env=env, capture_output=True, text=True, timeout=timeout,
                              errors="replace")
    finally:
        if not keep:
            shutil.rmtree(rundir, ignore_errors=True)
    return Run(proc.returncode, proc.stdout, proc.stderr, rundir)


_STAT = re.compile(r"^(\w+)\s*=\s*([-0-9.eE+]+)", re.M)


def parse_kernel_stats(text: str) -> list[dict]:
    """One dict per launched kernel: its name and the statistics the simulator
    prints at the kernel's end (gpu_sim_cycle, gpu_tot_sim_cycle, L2 and DRAM
    figures). DRAM per-channel lines are summarised (n_act, n_rd, n_write,
    bw utilisation, row-buffer locality)."""
    out = []
    for block in re.split(r"(?=^kernel_name = )", text, flags=re.M)[1:]:
        name = re.match(r"kernel_name = (\S+)", block).group(1)
        stats: dict = {"kernel": name}
        for k, v in _STAT.findall(block):
            try:
                stats.setdefault(k, float(v))
            except ValueError:  # "-nan" and the like
                pass
        n_act = [int(x) for x in re.findall(r"\bn_act=(\d+)", block)]
        n_rd = [int(x) for x in re.findall(r"\bn_rd=(\d+)", block)]
        n_wr = [int(x) for x in re.findall(r"\bn_write=(\d+)", block)]
        n_wrbk = [int(x) for x in re.findall(r"\bn_wr_bk=(\d+)", block)]
        bw = [float(x) for x in re.findall(r"\bbw_util=([0-9.]+)", block)]
        rbl = [float(x) for x in re.findall(r"^Row_Buffer_Locality = ([0-9.]+)", block, re.M)]
        if n_act:
            stats["dram_channels"] = len(n_act)
            stats["dram_n_act"] = sum(n_act)
            stats["dram_n_rd"] = sum(n_rd)
            stats["dram_n_write"] = sum(n_wr)
            stats["dram_n_wr_bk"] = sum(n_wrbk)
        if bw:
            stats["dram_bw_util_mean"] = sum(bw) / len(bw)
        if rbl:
            stats["dram_row_locality_mean"] = sum(rbl) / len(rbl)
        stalls = re.search(r"^Stall:(\d+)\tW0_Idle:(\d+)\tW0_Scoreboard:(\d+)", block, re.M)
        if stalls:
            stats["warp_stall"], stats["warp_idle"], stats["warp_scoreboard"] = map(int, stalls.groups())
        for key in ("gpgpu_stall_shd_mem[gl_mem][resource_stall]", "gpgpu_stall_shd_mem[gl_mem][coal_stall]"):
            m = re.search(re.escape(key) + r" = (\d+)", block)
            if m:
                stats[key] = int(m.group(1))
        for key in ("MISS_QUEUE_FULL",):
            got = [int(x) for x in re.findall(r"\[GLOBAL_ACC_[RW]\]\[" + key + r"\] = (\d+)", block)]
            if got:
                stats["l1_" + key.lower()] = sum(got)
        out.append(stats)
    return out
