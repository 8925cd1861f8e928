#!/usr/bin/env bash
# Builds what tools/gpu-check.sh runs on a lent GPU machine (which has no Rust): the rq-min
# binary and the CUDA test executables, copied into one folder with a manifest.
#
#   tools/gpu-bundle.sh [--emu] [--out DIR]
#
# Default: `cargo build --release --features cuda` and `cargo test --release --features cuda
# --no-run` for every CUDA test file (tests/*.rs with the line
# `#![cfg(any(feature = "cuda", feature = "cuda-emu"))]`, found as .ci/cuda-check.sh finds
# them), into target/gpu-bundle/. --emu: the same with --features cuda-emu (the kernels under
# the host emulator, no GPU needed) into target/gpu-bundle-emu/, to dry-run gpu-check.sh here.
#
# The folder: rq-min, tests/<file stem> (one executable per CUDA test file) and MANIFEST.txt
# (git commit, build date, feature, rustc, nvcc, the glibc it needs, each file's size and
# sha256). Copy it to the GPU machine next to the repository (same commit) and run
# tools/gpu-check.sh DIR there (README: "One-shot GPU check").
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

feature=cuda
out=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --emu) feature=cuda-emu ;;
        --out) out="${2:?--out needs a folder}"; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "tools/gpu-bundle.sh: unknown argument $1 (usage: tools/gpu-bundle.sh [--emu] [--out DIR])" >&2; exit 2 ;;
    esac
    shift
done
if [[ -z "$out" ]]; then
    if [[ "$feature" == cuda ]]; then out=target/gpu-bundle; else out=target/gpu-bundle-emu; fi
fi
target_dir="${CARGO_TARGET_DIR:-target}"

# nvcc (feature cuda) or NVIDIA's headers (the emulator) from .cuda-toolchain/, libclang.
nvcc="$(bash tools/cuda-toolchain.sh | tail -n 1)"

names=()
for f in $(grep -l '^#!\[cfg(any(feature = "cuda", feature = "cuda-emu"))\]' tests/*.rs); do
    names+=("$(basename "$f" .rs)")
done
[[ ${#names[@]} -gt 0 ]] || { echo "FAIL: no CUDA test files in tests/" >&2; exit 1; }
echo "== CUDA test files: ${names[*]}"

echo "== cargo build --release --features $feature"
cargo build --release --features "$feature"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
args=()
for t in "${names[@]}"; do args+=(--test "$t"); done
echo "== cargo test --release --features $feature ${args[*]} --no-run"
cargo test --release --features "$feature" "${args[@]}" --no-run 2>&1 | tee "$log"

rm -rf "$out"
mkdir -p "$out/tests"
cp "$target_dir/release/rq-min" "$out/rq-min"
for t in "${names[@]}"; do
    exe="$(sed -n "s/^ *Executable tests\/$t.rs (\(.*\))$/\1/p" "$log")"
    [[ -n "$exe" && -x "$exe" ]] || { echo "FAIL: no tests/$t.rs executable in the cargo output" >&2; exit 1; }
    cp "$exe" "$out/tests/$t"
done

commit="$(git rev-parse HEAD)"
dirty=""
git diff --quiet HEAD -- src tests cuda ffi build.rs Cargo.toml Cargo.lock 2>/dev/null || dirty=" (plus uncommitted changes)"
{
    echo "rq-min GPU bundle (tools/gpu-bundle.sh)"
    echo "commit: $commit$dirty"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n)"
    echo "feature: $feature"
    echo "rustc: $(rustc --version)"
    echo "nvcc: $("$nvcc" --version 2>/dev/null | tail -n 1)"
    if command -v objdump >/dev/null; then
        # The newest glibc symbol version the executables use: the GPU machine needs at least it.
        echo "needs: glibc >= $(for f in "$out"/rq-min "$out"/tests/*; do objdump -T "$f"; done | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1)"
    fi
    echo "files (bytes sha256 path):"
    (cd "$out" && find . -type f ! -name MANIFEST.txt | sed 's|^\./||' | sort | while read -r f; do
        echo "  $(stat -c %s "$f") $(sha256sum "$f" | cut -d' ' -f1) $f"
    done)
} > "$out/MANIFEST.txt"
cat "$out/MANIFEST.txt"
echo "== bundle: $out ($(du -sh "$out" | cut -f1)); on the GPU machine: bash tools/gpu-check.sh $out"
