#!/usr/bin/env bash
# CUDA compile + link check, no GPU needed: installs the toolchain (tools/cuda-toolchain.sh),
# builds with --features cuda (real kernels for sm_89, sm_90a, sm_100a + compute_90 PTX),
# builds the tests, checks that no binary links a CUDA library dynamically (the static CUDA
# runtime loads the driver at run time, so it starts on machines without one) and runs the
# CUDA tests, which on a machine without a GPU check that this is reported, not a crash.
# Then the same kernels under the host emulator (feature cuda-emu, g++, cuda/emu/): every test
# file built for the CUDA features (kernels against the CPU, --device cuda against --device cpu,
# the emulator's self-tests) for real (no skip), under two seeded schedules (RQ_EMU_SEED; the
# self-tests also run thread order themselves; the whole-model comparisons under one), then
# once more built with AddressSanitizer.
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc="$(bash tools/cuda-toolchain.sh | tail -n 1)"
echo "== nvcc: $nvcc"

# The CUDA test files: every tests/*.rs built only with feature cuda or cuda-emu (cuda_names),
# and the emulator's: those plus the ones built only with cuda-emu (its self-tests).
cuda_names=() emu_names=()
for f in $(grep -l '^#!\[cfg(any(feature = "cuda", feature = "cuda-emu"))\]' tests/*.rs); do
    cuda_names+=("$(basename "$f" .rs)")
done
for f in $(grep -l '^#!\[cfg(.*feature = "cuda-emu".*)\]' tests/*.rs); do
    emu_names+=("$(basename "$f" .rs)")
done
echo "== CUDA test files: ${cuda_names[*]}; under the emulator: ${emu_names[*]}"

echo "== cargo build --release --features cuda"
cargo build --release --features cuda

echo "== cargo test --release --features cuda --no-run"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --release --features cuda --no-run 2>&1 | tee "$log"
# The executable of tests/$1.rs in the cargo output in $log.
test_exe() {
    local exe
    exe="$(sed -n "s/^ *Executable tests\/$1.rs (\(.*\))$/\1/p" "$log")"
    [[ -n "$exe" ]] || { echo "FAIL: no tests/$1.rs executable in the cargo output" >&2; exit 1; }
    echo "$exe"
}
cuda_tests="$(test_exe cuda)"

# The test executable holds the kernels; the binary too once main uses them.
for exe in "${CARGO_TARGET_DIR:-target}/release/rq-min" "$cuda_tests"; do
    echo "== ldd $exe"
    ldd "$exe"
    if ldd "$exe" | grep -Ei 'libcuda|libnvidia'; then
        echo "FAIL: $exe links a CUDA library dynamically" >&2
        exit 1
    fi
done
# grep reads all of nm's output (no -q): an early exit would SIGPIPE nm and fail under pipefail.
if ! nm "$cuda_tests" | grep ' rq_quantize_fp8_bf16$' > /dev/null; then
    echo "FAIL: $cuda_tests does not contain the CUDA launchers" >&2
    exit 1
fi

for t in "${cuda_names[@]}"; do
    exe="$(test_exe "$t")"
    echo "== tests/$t.rs with feature cuda (each test skips with the reason where there is no GPU)"
    "$exe"
done

# Builds the emulator tests (extra environment in "$@"), lists their executables in emu_tests.
build_emu_tests() {
    local args=()
    for t in "${emu_names[@]}"; do args+=(--test "$t"); done
    env "$@" cargo test --release --features cuda-emu "${args[@]}" --no-run 2>&1 | tee "$log"
    emu_tests=()
    for t in "${emu_names[@]}"; do
        exe="$(test_exe "$t")"
        emu_tests+=("$exe")
    done
}

echo "== cargo test --release --features cuda-emu (host emulator) --no-run"
build_emu_tests
# The whole-model comparisons (minutes) run under one schedule; every kernel runs under both in
# the other tests, and once more under ASan below.
whole_models=(--skip every_family_cpu_and_device_agree --skip rq_tiny_cpu_and_device_agree)
echo "== emulator tests, RQ_EMU_SEED=1"
for exe in "${emu_tests[@]}"; do
    RQ_EMU_SEED=1 "$exe"
done
echo "== emulator tests but the whole-model comparisons, RQ_EMU_SEED=2"
for exe in "${emu_tests[@]}"; do
    RQ_EMU_SEED=2 "$exe" "${whole_models[@]}"
done

# Once more with AddressSanitizer on the emulator and the kernels (device memory is host heap
# memory there, so an out-of-bounds access of a kernel is reported; tests/cuda_emu.rs shows it
# firing); its own target dir; without the whole-model comparisons.
echo "== emulator tests under AddressSanitizer (RQ_EMU_ASAN=1), RQ_EMU_SEED=3"
build_emu_tests RQ_EMU_ASAN=1 CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/asan"
for exe in "${emu_tests[@]}"; do
    ASAN_OPTIONS=verify_asan_link_order=0:detect_leaks=0 RQ_EMU_SEED=3 "$exe" "${whole_models[@]}"
done

echo "== CUDA check passed"
