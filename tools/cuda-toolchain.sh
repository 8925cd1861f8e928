#!/usr/bin/env bash
# Installs the CUDA 13.0 compiler toolchain that `cargo build --features cuda` needs, from
# NVIDIA's PyPI wheels, into <repo>/.cuda-toolchain (git-ignored), and libclang for bindgen.
# Idempotent: a working nvcc already there is kept. No GPU or driver is needed to build.
# The last line printed is the path of nvcc.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$repo/.cuda-toolchain"
cu="$dest/nvidia/cu13"
nvcc="$cu/bin/nvcc"

wheels=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-runtime==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-cccl==13.0.85
)

if [[ -x "$nvcc" ]] && "$nvcc" --version >/dev/null 2>&1; then
    echo "cuda-toolchain: nvcc already installed in $dest" >&2
else
    echo "cuda-toolchain: installing ${wheels[*]} into $dest" >&2
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
        --target "$dest" "${wheels[@]}"
    "$nvcc" --version >&2
fi

# bindgen loads libclang at build time.
if ! ls /usr/lib/llvm-*/lib/libclang*.so* 2>/dev/null | grep -q 'libclang[-.0-9]*\.so'; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        echo "cuda-toolchain: installing libclang-dev for bindgen" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q libclang-dev >&2 \
            || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libclang-dev >&2; }
    else
        echo "cuda-toolchain: warning: no libclang found; install libclang-dev (bindgen needs it)" >&2
    fi
fi

echo "$nvcc"
