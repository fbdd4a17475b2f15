#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (PyTorch + MPI only) against the installed torch.
#
# Usage: scripts/build_horovod.sh [PYTHON]
#   PYTHON defaults to <repo>/.venv/bin/python, else python3.
#
# Horovod 0.28.1 (last release) does not build against torch >= 2.1 as shipped;
# scripts/horovod-0.28.1-torch2.patch switches its torch extension to C++17.
# Gloo is left out (its bundled copy fails to link with C++17), so the MPI
# controller is the only one: launch with mpirun / srun --mpi=pmix, not gloo.
#
# Wheels are cached in ${HPCLLM_WHEEL_CACHE:-$HOME/.cache/hpcllm/wheels}/
#   horovod-<ver>-torch<torch ver>-<python tag>/   (one per torch/python combo)
# so a reinstall (e.g. a fresh venv) takes seconds and needs no compiler.
#
# Environment:
#   HPCLLM_WHEEL_CACHE   wheel cache root (see above)
#   MAKEFLAGS            passed to the build (default: -j2)
#   HOROVOD_BUILD_FORCE  =1: skip the "already installed" check and reinstall
#   HOROVOD_REBUILD      =1: ignore a cached wheel and rebuild it
set -euo pipefail

HVD_VERSION=0.28.1
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
PATCH_FILE="$SCRIPT_DIR/horovod-${HVD_VERSION}-torch2.patch"
PY_DEPS=(cloudpickle psutil pyyaml packaging)

log() { printf '[build_horovod] %s\n' "$*" >&2; }
die() { printf '[build_horovod] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- python
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
    sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
fi
if [[ $# -gt 1 ]]; then
    die "usage: $0 [PYTHON]"
fi
if [[ $# -eq 1 ]]; then
    PYTHON="$1"
elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
    PYTHON="$REPO_ROOT/.venv/bin/python"
else
    PYTHON="$(command -v python3 || true)"
fi
[[ -n "${PYTHON:-}" ]] || die "no python found (pass one: $0 /path/to/python)"
command -v "$PYTHON" >/dev/null 2>&1 || die "python '$PYTHON' not found / not executable"
log "python: $PYTHON"

TORCH_VERSION="$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null)" \
    || die "cannot import torch with $PYTHON; install torch first"
PY_TAG="$("$PYTHON" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')"
CACHE_ROOT="${HPCLLM_WHEEL_CACHE:-$HOME/.cache/hpcllm/wheels}"
CACHE_KEY="horovod-${HVD_VERSION}-torch${TORCH_VERSION}-${PY_TAG}"
CACHE_DIR="$CACHE_ROOT/$CACHE_KEY"
log "torch: $TORCH_VERSION  python tag: $PY_TAG  cache: $CACHE_DIR"

[[ -f "$PATCH_FILE" ]] || die "patch not found: $PATCH_FILE"
PATCH_SHA="$(sha256sum "$PATCH_FILE" | cut -d' ' -f1)"

# ---------------------------------------------------------------- quick path
# Installed, importable, and installed from the wheel cached for *this* torch
# (pip records the wheel's file:// URL in direct_url.json).
check_installed() {
    "$PYTHON" - "$HVD_VERSION" "$CACHE_KEY" <<'EOF'
import importlib.metadata as md, sys, urllib.parse
want_ver, key = sys.argv[1], sys.argv[2]
import horovod, horovod.torch as hvd
assert horovod.__version__ == want_ver, "horovod %s != %s" % (horovod.__version__, want_ver)
assert hvd.mpi_built(), "horovod.torch built without MPI"
url = urllib.parse.unquote(md.distribution("horovod").read_text("direct_url.json") or "")
assert key in url, "installed horovod was not built for this torch (%s)" % url.strip()
EOF
}

if [[ "${HOROVOD_BUILD_FORCE:-0}" != 1 ]]; then
    if out="$(check_installed 2>&1)"; then
        log "horovod $HVD_VERSION already installed for torch $TORCH_VERSION ($PY_TAG); nothing to do"
        exit 0
    fi
    log "horovod not usable yet: $(printf '%s' "$out" | tail -n1)"
fi

# ---------------------------------------------------------------- build if needed
find_wheel() {
    local w
    [[ -f "$CACHE_DIR/patch.sha256" && "$(cat "$CACHE_DIR/patch.sha256")" == "$PATCH_SHA" ]] || return 1
    for w in "$CACHE_DIR"/horovod-"$HVD_VERSION"-"$PY_TAG"-*.whl; do
        [[ -f "$w" ]] && { printf '%s\n' "$w"; return 0; }
    done
    return 1
}

WHEEL=""
if [[ "${HOROVOD_REBUILD:-0}" != 1 ]]; then
    WHEEL="$(find_wheel || true)"
fi

if [[ -n "$WHEEL" ]]; then
    log "using cached wheel: $WHEEL"
else
    log "no cached wheel for $CACHE_KEY; building from source (several minutes)"

    # toolchain checks
    if ! command -v cmake >/dev/null 2>&1 && [[ ! -x "$(dirname "$PYTHON")/cmake" ]]; then
        log "cmake not found; installing it with pip into $PYTHON's environment"
        "$PYTHON" -m pip install cmake || die "cannot install cmake (apt-get install cmake)"
    fi
    # a pip-installed cmake lives next to the venv python
    export PATH="$(dirname "$PYTHON"):$PATH"
    command -v cmake >/dev/null 2>&1 || die "cmake not found"
    command -v g++ >/dev/null 2>&1 || die "g++ not found (apt-get install g++)"
    command -v mpicxx >/dev/null 2>&1 || die "mpicxx not found (apt-get install libopenmpi-dev, or load an MPI module)"
    command -v patch >/dev/null 2>&1 || die "patch not found (apt-get install patch)"
    "$PYTHON" -m pip --version >/dev/null 2>&1 || die "pip not available in $PYTHON"
    # setup.py needs these at build time (no build isolation)
    "$PYTHON" -c 'import setuptools, wheel' 2>/dev/null \
        || die "$PYTHON lacks setuptools/wheel (pip install setuptools wheel)"

    WORK="$(mktemp -d "${TMPDIR:-/tmp}/build_horovod.XXXXXX")"
    trap 'rm -rf "$WORK"' EXIT

    SDIST="$CACHE_ROOT/horovod-${HVD_VERSION}.tar.gz"
    if [[ -f "$SDIST" ]]; then
        log "using cached sdist: $SDIST"
    else
        log "downloading horovod==$HVD_VERSION sdist from PyPI"
        "$PYTHON" -m pip download --no-deps --no-binary :all: "horovod==$HVD_VERSION" -d "$WORK/dl" \
            || die "pip download of horovod==$HVD_VERSION failed (network? put the sdist at $SDIST)"
        mkdir -p "$CACHE_ROOT"
        cp "$WORK/dl/horovod-${HVD_VERSION}.tar.gz" "$SDIST.tmp.$$" && mv "$SDIST.tmp.$$" "$SDIST"
    fi

    tar -xzf "$SDIST" -C "$WORK" || die "cannot unpack $SDIST"
    SRC="$WORK/horovod-$HVD_VERSION"
    log "applying $(basename "$PATCH_FILE")"
    (cd "$SRC" && patch -p1 --forward < "$PATCH_FILE") || die "patch failed to apply"

    export MAKEFLAGS="${MAKEFLAGS:--j2}"
    log "building wheel (MAKEFLAGS=$MAKEFLAGS; log: $WORK/build.log)"
    t0=$SECONDS
    if ! HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
         HOROVOD_WITHOUT_GLOO=1 HOROVOD_WITH_MPI=1 HOROVOD_CPU_OPERATIONS=MPI \
         "$PYTHON" -m pip wheel -v --no-build-isolation --no-deps -w "$WORK/wheelhouse" "$SRC" \
         > "$WORK/build.log" 2>&1; then
        tail -n 40 "$WORK/build.log" >&2
        cp "$WORK/build.log" "${TMPDIR:-/tmp}/build_horovod.failed.log" 2>/dev/null || true
        die "horovod build failed (full log: ${TMPDIR:-/tmp}/build_horovod.failed.log)"
    fi
    log "build finished in $((SECONDS - t0))s"

    built=("$WORK"/wheelhouse/horovod-*.whl)
    [[ -f "${built[0]}" ]] || die "pip wheel produced no horovod wheel"
    mkdir -p "$CACHE_DIR"
    rm -f "$CACHE_DIR"/horovod-*.whl "$CACHE_DIR/patch.sha256"
    WHEEL="$CACHE_DIR/$(basename "${built[0]}")"
    cp "${built[0]}" "$WHEEL.tmp.$$" && mv "$WHEEL.tmp.$$" "$WHEEL"
    printf '%s\n' "$PATCH_SHA" > "$CACHE_DIR/patch.sha256"
    log "cached wheel: $WHEEL"
fi

# ---------------------------------------------------------------- install
missing=()
for dep in "${PY_DEPS[@]}"; do
    mod="$dep"; [[ "$dep" == pyyaml ]] && mod=yaml
    "$PYTHON" -c "import $mod" 2>/dev/null || missing+=("$dep")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    log "installing runtime deps: ${missing[*]}"
    "$PYTHON" -m pip install "${missing[@]}" || die "cannot install ${missing[*]}"
fi

log "installing $(basename "$WHEEL")"
"$PYTHON" -m pip install --no-deps --force-reinstall "$WHEEL" || die "pip install of $WHEEL failed"

if ! out="$(check_installed 2>&1)"; then
    printf '%s\n' "$out" >&2
    die "horovod installed but 'import horovod.torch' check failed"
fi
log "OK: horovod $HVD_VERSION (torch $TORCH_VERSION, MPI only, no gloo) installed in $PYTHON"
