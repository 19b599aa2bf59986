#!/usr/bin/env bash
# Builds the simulated GPU (GPGPU-Sim at a pinned commit, with this project's
# patch for the simulator defects we hit) into a cache directory outside the
# repository. Idempotent: a second run with the same commit and patch does
# nothing; a changed patch rebuilds (everything when a header, grammar, lexer
# or config changed, since the simulator's makefiles miss header
# dependencies).
#
#   tools/gpusim/build.sh            # build or check
#   tools/gpusim/build.sh --print-env  # print the run-time environment
#
# Environment:
#   INTERPOLATRON_GPUSIM_SRC    a local copy of the simulator's repository (a
#                               git directory, bare or not) holding the commit
#   INTERPOLATRON_GPUSIM_CACHE  where to build (default
#                               ${XDG_CACHE_HOME:-~/.cache}/interpolatron-gpusim)
#   INTERPOLATRON_GPUSIM_JOBS   make -j (default 2)
#   CUDA_HOME                   a CUDA 12/13 toolkit (ptxas; default
#                               /usr/local/cuda); the harness compiles with
#                               its nvcc
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
COMMIT=667834cfe5214523edd7769aeab77f91b7137686   # accel-sim/gpgpu-sim_distribution, branch dev
REPO_URL=https://github.com/accel-sim/gpgpu-sim_distribution.git
PATCH="$HERE/gpgpu-sim.patch"
CACHE=${INTERPOLATRON_GPUSIM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/interpolatron-gpusim}
JOBS=${INTERPOLATRON_GPUSIM_JOBS:-2}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PYPI_PKGS=(nvidia-cuda-runtime-cu11==11.8.89 nvidia-cuda-nvcc-cu11==11.8.89 nvidia-cuda-cuobjdump)

say() { echo "gpusim build: $*" >&2; }
die() { say "$*"; exit 1; }

# --- what must already be on the machine --------------------------------
missing=()
for tool in gcc g++ make bison flex makedepend bc patch python3; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ -f /usr/include/zlib.h ] || missing+=(zlib.h)
[ -f /usr/include/GL/gl.h ] || missing+=(GL/gl.h)
if [ ${#missing[@]} -gt 0 ]; then
  die "missing ${missing[*]}: apt-get install bison flex xutils-dev zlib1g-dev bc libgl-dev build-essential patch python3-pip"
fi
[ -x "$CUDA_HOME/bin/ptxas" ] || die "missing a CUDA 12/13 toolkit at CUDA_HOME=$CUDA_HOME (its ptxas and nvcc; set CUDA_HOME)"
[ -f "$PATCH" ] || die "missing $PATCH"

patch_sha=$(sha256sum "$PATCH" | cut -c1-16)
want="$COMMIT $patch_sha"
SRC="$CACHE/src"
STAMP="$CACHE/stamp"

print_env() {
  local lib
  lib=$(cat "$CACHE/libdir")
  cat <<EOF
export CUDA_INSTALL_PATH='$CACHE/cuda'
export INTERPOLATRON_GPUSIM_ROOT='$SRC'
export INTERPOLATRON_GPUSIM_LIB='$lib'
export INTERPOLATRON_GPUSIM_COMMIT='$COMMIT'
export INTERPOLATRON_GPUSIM_PATCH_SHA='$patch_sha'
EOF
}

if [ "${1:-}" = "--print-env" ]; then
  [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] || die "not built (run tools/gpusim/build.sh)"
  print_env
  exit 0
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -f "$(cat "$CACHE/libdir" 2>/dev/null)/libcudart.so" ]; then
  say "up to date ($CACHE, simulator ${COMMIT:0:8}, patch $patch_sha)"
  exit 0
fi
mkdir -p "$CACHE"

# --- CUDA 11.8 pieces from PyPI, into a private prefix --------------------
if [ ! -f "$CACHE/pypi/.done" ]; then
  say "installing ${PYPI_PKGS[*]} into $CACHE/pypi"
  rm -rf "$CACHE/pypi"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$CACHE/pypi" "${PYPI_PKGS[@]}" \
    || die "pip could not install ${PYPI_PKGS[*]} (needs PyPI)"
  touch "$CACHE/pypi/.done"
fi
NV="$CACHE/pypi/nvidia"
CUOBJDUMP=$(ls "$NV"/cu1*/bin/cuobjdump "$NV"/cuda_cuobjdump/bin/cuobjdump 2>/dev/null | head -1 || true)
[ -n "$CUOBJDUMP" ] || die "no cuobjdump in $NV (pip install nvidia-cuda-cuobjdump)"

# The prefix the simulator is built against and calls at run time
# (CUDA_INSTALL_PATH): 11.8 headers and libcudart, a bin/nvcc that only
# answers --version (the build refuses nvcc > 11.x), a ptxas that runs the
# CUDA 13 one (11.8 ptxas rejects PTX ISA 9.0) and drops the lines the
# simulator's ptxinfo parser does not know, and a CUDA 13 cuobjdump.
C="$CACHE/cuda"
rm -rf "$C"
mkdir -p "$C/bin" "$C/include" "$C/lib64"
cp -r "$NV/cuda_runtime/include/." "$C/include/"
cp -rn "$NV/cuda_nvcc/include/." "$C/include/" 2>/dev/null || true
for h in cudaProfiler.h cuda_profiler_api.h; do
  [ -f "$C/include/$h" ] || cp "$CUDA_HOME/include/$h" "$C/include/" \
    || die "missing $h in $CUDA_HOME/include"
done
rm -f "$C/include/__init__.py"
cp "$NV/cuda_runtime/lib/libcudart.so.11.0" "$C/lib64/"
ln -s libcudart.so.11.0 "$C/lib64/libcudart.so"
cat >"$C/bin/nvcc" <<'EOF'
#!/bin/sh
# Answers --version as CUDA 11.8 for the simulator's build; compiles nothing.
if [ "$1" = "--version" ]; then
  echo "nvcc: NVIDIA (R) Cuda compiler driver"
  echo "Cuda compilation tools, release 11.8, V11.8.89"
  exit 0
fi
echo "this nvcc only reports a version (interpolatron gpusim prefix)" >&2
exit 1
EOF
cat >"$C/bin/ptxas" <<EOF
#!/bin/sh
# CUDA 13 ptxas; drop the lines GPGPU-Sim's ptxinfo parser rejects.
tmp=\$(mktemp)
"$CUDA_HOME/bin/ptxas" "\$@" 2>"\$tmp"
rc=\$?
sed -e 's/, used [0-9]* barriers//' -e '/Compile time/d' "\$tmp" >&2
rm -f "\$tmp"
exit \$rc
EOF
ln -s "$CUOBJDUMP" "$C/bin/cuobjdump"
chmod +x "$C/bin/nvcc" "$C/bin/ptxas"

# --- source: pinned commit, pristine, then the project's patch -------------
NEW="$CACHE/src.new"
rm -rf "$NEW"
mkdir -p "$NEW"
export_from() {  # $1: a git directory (bare or a work tree's .git)
  git --git-dir="$1" cat-file -e "$COMMIT^{commit}" 2>/dev/null || return 1
  git --git-dir="$1" archive "$COMMIT" | tar -x -C "$NEW"
}
got=
for cand in "${INTERPOLATRON_GPUSIM_SRC:-}" "${INTERPOLATRON_GPUSIM_SRC:-}/.git" \
            /work/.mirror/accel-sim+gpgpu-sim_distribution/repo "$CACHE/repo.git"; do
  [ -n "$cand" ] && [ -d "$cand" ] || continue
  if export_from "$cand"; then got=$cand; break; fi
done
if [ -z "$got" ]; then
  say "cloning $REPO_URL into $CACHE/repo.git"
  rm -rf "$CACHE/repo.git"
  git clone --quiet --bare "$REPO_URL" "$CACHE/repo.git" \
    || die "no local copy of the simulator holds $COMMIT and cloning failed: set INTERPOLATRON_GPUSIM_SRC to a clone of $REPO_URL"
  export_from "$CACHE/repo.git" || die "$REPO_URL has no commit $COMMIT"
  got="$CACHE/repo.git"
fi
say "source ${COMMIT:0:8} from $got"
(cd "$NEW" && patch -p1 --quiet --forward <"$PATCH") || die "the patch does not apply to ${COMMIT:0:8}"

# Move the new tree in. Only changed files are copied, so make sees just them;
# anything but a .cc/.cpp/.c changing (headers, lexer, grammar, makefiles,
# configs) throws the objects away: make does not track those.
if [ -d "$SRC" ] && [ -f "$CACHE/libdir" ]; then
  clean=0
  while IFS= read -r -d '' f; do
    rel=${f#"$NEW"/}
    if ! cmp -s "$f" "$SRC/$rel"; then
      mkdir -p "$(dirname "$SRC/$rel")"
      cp -p "$f" "$SRC/$rel"
      touch "$SRC/$rel"
      case "$rel" in
        *.cc|*.cpp|*.c) ;;
        *) clean=1 ;;
      esac
      say "changed: $rel"
    fi
  done < <(find "$NEW" -type f -print0)
  if [ "$clean" = 1 ]; then
    say "a header, grammar or config changed: rebuilding everything"
    rm -rf "$SRC/build" "$SRC/lib"
  fi
  rm -rf "$NEW"
else
  rm -rf "$SRC"
  mv "$NEW" "$SRC"
fi
rm -f "$STAMP"

# --- build ----------------------------------------------------------------
LOG="$CACHE/build.log"
say "building with make -j$JOBS (about 11 minutes on 2 free cores; log: $LOG)"
(
  cd "$SRC"
  export CUDA_INSTALL_PATH="$C"
  export PATH="$C/bin:$PATH"
  set +eu
  # shellcheck disable=SC1091
  source setup_environment release >/dev/null 2>&1 || exit 1
  set -e
  make -j"$JOBS"
  echo "LIBDIR $SRC/lib/$GPGPUSIM_CONFIG"
) >"$LOG" 2>&1 || { tail -20 "$LOG" >&2; die "the simulator build failed (log: $LOG)"; }
libdir=$(sed -n 's/^LIBDIR //p' "$LOG" | tail -1)
[ -f "$libdir/libcudart.so" ] || die "the build made no $libdir/libcudart.so (log: $LOG)"
echo "$libdir" >"$CACHE/libdir"
echo "$want" >"$STAMP"
say "built $libdir"
