#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with nvcc for one architecture (sm_90 unless
# INTERPOLATRON_CHECK_ARCH says otherwise) and prints ptxas' register / stack /
# spill report per kernel. Fails when a file does not compile, when nvcc warns,
# or when any kernel spills registers (spill stores or spill loads non-zero):
# the kernels are memory-bound and a spill adds local-memory traffic to every
# element.
#
# The .cu files include no torch header, so this needs nvcc alone. The launch
# layer (csrc/cuda/launch.cpp) is compiled with no torch include path and
# linked with the kernels into a program (built, never run): a torch header or
# a symbol only torch or the glue provides fails it. When torch is importable
# it also compiles the torch glue (csrc/cuda/*.cpp, bindings.cpp with
# INTERPOLATRON_WITH_CUDA) with -fsyntax-only, which catches glue errors on
# machines whose torch has no CUDA (set INTERPOLATRON_CHECK_GLUE=0 to skip).
#
# INTERPOLATRON_CHECK_KEEP=DIR keeps each kernel object (NAME.cu.o, SASS for
# the architecture inside) and its ptxas log (NAME.cu.log) in DIR, for the
# SASS tests to read without compiling again.
#
# Exit status: 0 ok, 1 a check failed, 2 nvcc not found.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
arch="${INTERPOLATRON_CHECK_ARCH:-sm_90}"
nvcc="${NVCC:-nvcc}"
if ! command -v "$nvcc" >/dev/null 2>&1; then
  echo "check_cuda_compile: nvcc not found (set NVCC or put it on PATH)" >&2
  exit 2
fi
demangle="cat"
for tool in cu++filt c++filt; do
  if command -v "$tool" >/dev/null 2>&1; then demangle="$tool"; break; fi
done

# nvcc may be a wrapper script: ask it where its toolkit is.
cuda_top="$("$nvcc" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
cuda_inc="${CUDA_HOME:-${cuda_top:-/usr/local/cuda}}/include"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
status=0

printf '%-10s %-62s %5s %7s %7s %7s\n' "file" "kernel" "regs" "stack" "spill_st" "spill_ld"
for cu in "$here"/cuda/*.cu; do
  name="$(basename "$cu")"
  log="$tmp/$name.log"
  if ! "$nvcc" -c -arch="$arch" -O3 -std=c++17 -lineinfo --fmad=false -Xptxas -v -Werror all-warnings -I"$here" \
      "$cu" -o "$tmp/$name.o" >"$log" 2>&1; then
    cat "$log" >&2
    echo "FAIL: $name does not compile for $arch" >&2
    status=1
    continue
  fi
  if [ -n "${INTERPOLATRON_CHECK_KEEP:-}" ]; then
    cp "$tmp/$name.o" "$INTERPOLATRON_CHECK_KEEP/$name.o" && cp "$log" "$INTERPOLATRON_CHECK_KEEP/$name.log"
  fi
  # ptxas prints, per entry: "Compiling entry function 'NAME' for 'sm_90'",
  # "N bytes stack frame, S bytes spill stores, L bytes spill loads" and
  # "Used R registers, ...".
  awk -v file="$name" '
    /Compiling entry function/ { match($0, /function .[^'"'"']+/); kern = substr($0, RSTART + 10, RLENGTH - 10) }
    /bytes stack frame/ { stack = $1; st = $5; ld = $9 }
    /Used [0-9]+ registers/ {
      for (i = 1; i <= NF; i++) if ($i == "Used") regs = $(i + 1)
      print file "\t" kern "\t" regs "\t" stack "\t" st "\t" ld
    }' "$log" >"$tmp/$name.tsv"
  while IFS=$'\t' read -r f kern regs stack st ld; do
    pretty="$(echo "$kern" | $demangle | sed -E 's/interp::cuda::\(anonymous namespace\):://; s/interp::cuda:://g; s/interp:://g')"
    printf '%-10s %-62s %5s %7s %7s %7s\n' "$f" "${pretty:0:62}" "$regs" "$stack" "$st" "$ld"
    if [ "$st" != "0" ] || [ "$ld" != "0" ]; then
      echo "FAIL: $pretty spills ($st bytes stores, $ld bytes loads)" >&2
      status=1
    fi
  done <"$tmp/$name.tsv"
  if ! [ -s "$tmp/$name.tsv" ]; then
    echo "FAIL: no ptxas report for $name" >&2
    status=1
  fi
done

# The torch-free launch layer: host C++ with the CUDA headers and csrc/ only,
# linked with every kernel object and the CUDA runtime into a program whose
# main takes the address of each function launch.h declares.
cat >"$tmp/launch_main.cpp" <<'EOF'
#include "cuda/launch.h"
int main() {
  using namespace interp::cuda;
  const void* volatile api[] = {
      reinterpret_cast<const void*>(&count_blocks),        reinterpret_cast<const void*>(&fill_table),
      reinterpret_cast<const void*>(&combine_partials),    reinterpret_cast<const void*>(&gram_row_partials),
      reinterpret_cast<const void*>(&rna_record_partials), reinterpret_cast<const void*>(&run_combine),
      reinterpret_cast<const void*>(&run_gram_row),        reinterpret_cast<const void*>(&run_rna_record),
      reinterpret_cast<const void*>(&run_rna_extrapolate)};
  return api[0] == nullptr;
}
EOF
launch_flags=(-std=c++17 -O2 -Wall -Wextra -Werror -isystem "$cuda_inc" -I"$here")
if ! "${CXX:-c++}" -c "${launch_flags[@]}" "$here/cuda/launch.cpp" -o "$tmp/launch.o" 2>"$tmp/launch.log" ||
   ! "${CXX:-c++}" -c "${launch_flags[@]}" "$tmp/launch_main.cpp" -o "$tmp/launch_main.o" 2>>"$tmp/launch.log" ||
   ! "$nvcc" -arch="$arch" "$tmp"/*.cu.o "$tmp/launch.o" "$tmp/launch_main.o" -o "$tmp/launch_check" \
       2>>"$tmp/launch.log"; then
  cat "$tmp/launch.log" >&2
  echo "FAIL: the launch layer (cuda/launch.cpp) does not compile and link without torch" >&2
  status=1
else
  echo "launch layer ok: cuda/launch.cpp compiled without torch and linked with the kernels"
fi

if [ "${INTERPOLATRON_CHECK_GLUE:-1}" != "0" ]; then
  py="${PYTHON:-python3}"
  inc="$("$py" - 2>/dev/null <<'EOF'
import os, sysconfig
import torch
base = os.path.join(os.path.dirname(torch.__file__), "include")
print(base, os.path.join(base, "torch", "csrc", "api", "include"), sysconfig.get_paths()["include"])
EOF
)"
  if [ -n "$inc" ]; then
    flags=(-fsyntax-only -std=c++20 -Wall -Wextra -Werror -fvisibility=hidden -DINTERPOLATRON_WITH_CUDA
           -DTORCH_EXTENSION_NAME=_C -isystem "$cuda_inc")
    for d in $inc; do flags+=(-isystem "$d"); done
    # CPU wheels of torch ship the c10/cuda headers without this generated one.
    torch_inc="${inc%% *}"
    if [ ! -f "$torch_inc/c10/cuda/impl/cuda_cmake_macros.h" ]; then
      mkdir -p "$tmp/stub/c10/cuda/impl"
      echo '#pragma once' >"$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
      flags+=(-isystem "$tmp/stub")
    fi
    for src in "$here"/cuda/*.cpp "$here"/bindings.cpp; do
      if ! "${CXX:-c++}" "${flags[@]}" "$src" 2>"$tmp/glue.log"; then
        cat "$tmp/glue.log" >&2
        echo "FAIL: $(basename "$src") does not compile with INTERPOLATRON_WITH_CUDA" >&2
        status=1
      else
        echo "glue ok: $(basename "$src") (syntax, with INTERPOLATRON_WITH_CUDA)"
      fi
    done
  else
    echo "glue check skipped: torch is not importable by ${py}"
  fi
fi

if [ "$status" -eq 0 ]; then echo "check_cuda_compile: OK ($arch, no spills)"; fi
exit "$status"
