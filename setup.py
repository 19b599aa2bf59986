"""interpolatron: fused interpolation / extrapolation optimizers for PyTorch.

The pure-Python package (reference backend, optimizers, Triton kernels) always
installs. The C++/CUDA extension ``interpolatron._C`` is built from ``csrc/``
against the installed torch, so install with ``--no-build-isolation`` (an
isolated build would fetch a second, multi-GB torch to build against):

    MAX_JOBS=2 pip install --no-build-isolation -e .

Environment switches (``1`` turns a switch on):

* ``INTERPOLATRON_SKIP_EXT``: build no extension (pure Python).
* ``INTERPOLATRON_SKIP_CUDA``: build the CPU kernels only.
* ``INTERPOLATRON_FORCE_CUDA``: fail unless the CUDA kernels are built.
* ``INTERPOLATRON_FORCE_EXT``: fail unless the extension (CPU kernels at least) is built.

Without a FORCE switch a failed or impossible build prints a warning and the
package still installs (a failed CUDA build falls back to the CPU-only
extension); ``python -m interpolatron info`` says what was built and why not.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# Why the CUDA kernels are absent; the extension reports the code and
# interpolatron/backends/native_backend.py words it. Keep the two in sync.
CUDA_BUILT, CUDA_SKIPPED_BY_ENV, CUDA_TORCH_CPU_ONLY, CUDA_NO_NVCC, CUDA_BUILD_FAILED = range(5)


def _switch(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _warn(msg):
    print(f"\nWARNING (interpolatron): {msg}\n", file=sys.stderr, flush=True)


def _sources(*patterns):
    out = []
    for pattern in patterns:
        out += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern)))
    return out


def _extension_setup():
    """(ext_modules, cmdclass) for this build, honouring the switches."""
    force_cuda = _switch("INTERPOLATRON_FORCE_CUDA")
    force_ext = _switch("INTERPOLATRON_FORCE_EXT") or force_cuda
    if _switch("INTERPOLATRON_SKIP_EXT"):
        if force_ext:
            raise SystemExit("INTERPOLATRON_SKIP_EXT=1 contradicts INTERPOLATRON_FORCE_EXT / _FORCE_CUDA")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if force_ext:
            raise SystemExit(f"cannot build interpolatron._C: torch is not importable ({exc})") from exc
        _warn(f"torch is not importable ({exc}); interpolatron installs without its C++ extension. "
              "Install torch first, then `pip install --no-build-isolation -e .`")
        return [], {}

    # One translation unit per instruction set for the CPU kernels (vector
    # headers only, cheap to compile), plus two that include torch.
    cpu_sources = _sources("bindings.cpp", "cpu/*.cpp")
    cuda_sources = _sources("cuda/*.cpp", "cuda/*.cu")
    # torch appends the -std it was built with (C++20 for torch 2.13).
    # -g0 overrides the -g of Python's own CFLAGS: debug info would make the
    # extension ~20 MB and the build slower.
    # -ffp-contract=off: GCC would fuse `grad * sign + wd * param` into an FMA in
    # one order in the vector body and possibly another in the scalar tail, so an
    # element's effective gradient would depend on where a shard boundary puts it
    # (measured: 1.2e-11 relative in a Gram entry). Explicit fmadd calls stay fused.
    cxx_flags = ["-O3", "-g0", "-ffp-contract=off", "-fopenmp", "-fvisibility=hidden", "-Wno-unknown-pragmas",
                 "-Wno-psabi"]
    # nvcc: no --use_fast_math (IEEE rounding and denormals, as the CPU kernels
    # and the torch reference); -lineinfo costs nothing at run time and lets a
    # profiler attribute stalls to source lines. --fmad=false is the CPU kernels'
    # -ffp-contract=off: nvcc would contract multiply-adds, unevenly across a
    # 16-byte fragment, so an fp32 result would depend on where its element sits
    # and differ from the CPU's by a rounding (measured in simulation, issue 20:
    # 35k of 75k parameters at k = 5). Explicit fma() calls (the float64 dot
    # products) stay fused on both sides. tests/test_cuda_sass.py holds the
    # kernels to it (no FFMA); the simulated-GPU tests compare CPU = CUDA bitwise.
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false"]
    link_flags = ["-fopenmp"]  # resolves to the libgomp torch already loaded

    skipped = CUDA_BUILT
    nvcc = shutil.which("nvcc") or (os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
                                    if cpp_extension.CUDA_HOME else None)
    if _switch("INTERPOLATRON_SKIP_CUDA"):
        skipped, why = CUDA_SKIPPED_BY_ENV, "INTERPOLATRON_SKIP_CUDA=1"
    elif torch.version.cuda is None:
        skipped, why = CUDA_TORCH_CPU_ONLY, f"the installed torch {torch.__version__} has no CUDA"
    elif not nvcc or not os.path.exists(nvcc) or cpp_extension.CUDA_HOME is None:
        skipped, why = CUDA_NO_NVCC, "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    if skipped != CUDA_BUILT:
        if force_cuda:
            raise SystemExit(f"INTERPOLATRON_FORCE_CUDA=1 but the CUDA kernels cannot be built: {why}")
        print(f"interpolatron: building the CPU kernels only ({why})", file=sys.stderr)

    def cpu_extension(code):
        return cpp_extension.CppExtension(
            "interpolatron._C", cpu_sources,
            define_macros=[("INTERPOLATRON_CUDA_SKIPPED", str(code))],
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

    if skipped == CUDA_BUILT:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
            # torch derives the arch list from the visible GPUs and raises
            # IndexError without one (a container build, a login node); that
            # would silently fall back to a CPU-only build.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;8.6;8.9;9.0+PTX"
            _warn("no GPU visible: building the CUDA kernels for TORCH_CUDA_ARCH_LIST="
                  + os.environ["TORCH_CUDA_ARCH_LIST"])
        ext = cpp_extension.CUDAExtension(
            "interpolatron._C", cpu_sources + cuda_sources,
            define_macros=[("INTERPOLATRON_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags)
    else:
        ext = cpu_extension(skipped)

    class GuardedBuildExt(cpp_extension.BuildExtension):
        """Builds the extension; a failure warns and leaves the pure-Python package
        working (a failed CUDA build is retried without CUDA) unless forced."""

        def build_extensions(self):
            try:
                super().build_extensions()
                return
            except Exception as exc:  # the compiler's errors are already on stderr
                error = exc
            if self.extensions and self.extensions[0].name == ext.name and skipped == CUDA_BUILT:
                if force_cuda:
                    raise error
                _warn(f"building the CUDA kernels failed ({error}); retrying with the CPU kernels only")
                self._reset_compiler()
                # In place: setuptools has already attached its own bookkeeping
                # attributes to the Extension object it finalized.
                cpu = cpu_extension(CUDA_BUILD_FAILED)
                for attr in ("sources", "define_macros", "undef_macros", "include_dirs", "library_dirs",
                             "libraries", "runtime_library_dirs", "extra_compile_args", "extra_link_args"):
                    setattr(self.extensions[0], attr, getattr(cpu, attr))
                try:
                    super().build_extensions()
                    return
                except Exception as exc:
                    error = exc
            if force_ext:
                raise error
            _warn(f"building interpolatron._C failed ({error}); the package installs without it and "
                  "backend='native' reports why it is unavailable")
            self.extensions = []

        def _reset_compiler(self):
            # BuildExtension wraps the compiler's methods in place; drop the
            # wrappers so that a second build_extensions() wraps the originals.
            for name in ("compile", "_compile", "spawn"):
                self.compiler.__dict__.pop(name, None)

        def get_outputs(self):
            return super().get_outputs() if self.extensions else []

    return [ext], {"build_ext": GuardedBuildExt}


ext_modules, cmdclass = _extension_setup()

setup(
    name="interpolatron",
    version="0.1.0",
    description="Interpolatron, Anderson mixing and RNA optimizers with fused Triton and C++/CUDA kernels",
    python_requires=">=3.10",
    packages=["interpolatron", "interpolatron.backends", "interpolatron.optim",
              "interpolatron.triton_kernels"],
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton"],
        "demo": ["scikit-learn", "matplotlib", "tqdm"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "scipy", "scikit-learn", "matplotlib", "tqdm",
                 "ruff"],
    },
    entry_points={"console_scripts": ["interpolatron = interpolatron.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
