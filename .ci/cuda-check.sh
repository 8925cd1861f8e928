#!/usr/bin/env bash
# CUDA compile + link check, no GPU needed: installs the toolchain (tools/cuda-toolchain.sh),
# builds with --features cuda (real kernels for sm_89, sm_90a, sm_100a + compute_90 PTX),
# builds the tests, checks that no binary links a CUDA library dynamically (the static CUDA
# runtime loads the driver at run time, so it starts on machines without one) and runs the
# CUDA tests, which on a machine without a GPU check that this is reported, not a crash.
# Then the same kernels under the host emulator (feature cuda-emu, g++, cuda/emu/): tests/cuda.rs,
# tests/cuda_forward.rs and tests/device_pipeline.rs (quantize/eval --device cuda against the
# CPU) for real (no skip) and the emulator's self-tests, under two
# seeded schedules (RQ_EMU_SEED; the self-tests also run thread order themselves).
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc="$(bash tools/cuda-toolchain.sh | tail -n 1)"
echo "== nvcc: $nvcc"

echo "== cargo build --release --features cuda"
cargo build --release --features cuda

echo "== cargo test --release --features cuda --no-run"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --release --features cuda --no-run 2>&1 | tee "$log"
cuda_tests="$(sed -n 's/^ *Executable tests\/cuda.rs (\(.*\))$/\1/p' "$log")"
[[ -n "$cuda_tests" ]] || { echo "FAIL: no tests/cuda.rs executable in the cargo output" >&2; exit 1; }

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

echo "== tests/cuda.rs (skips with the reason where there is no GPU)"
"$cuda_tests" --nocapture
forward_tests="$(sed -n 's/^ *Executable tests\/cuda_forward.rs (\(.*\))$/\1/p' "$log")"
[[ -n "$forward_tests" ]] || { echo "FAIL: no tests/cuda_forward.rs executable in the cargo output" >&2; exit 1; }
echo "== tests/cuda_forward.rs (skips with the reason where there is no GPU)"
"$forward_tests"
pipeline_tests="$(sed -n 's/^ *Executable tests\/device_pipeline.rs (\(.*\))$/\1/p' "$log")"
[[ -n "$pipeline_tests" ]] || { echo "FAIL: no tests/device_pipeline.rs executable in the cargo output" >&2; exit 1; }
echo "== tests/device_pipeline.rs (--device cuda against --device cpu; skips where there is no GPU)"
"$pipeline_tests"

echo "== cargo test --release --features cuda-emu (host emulator) --no-run"
cargo test --release --features cuda-emu --test cuda --test cuda_forward --test cuda_emu --test device_pipeline --no-run 2>&1 | tee "$log"
emu_tests=()
for t in cuda cuda_forward cuda_emu device_pipeline; do
    exe="$(sed -n "s/^ *Executable tests\/$t.rs (\(.*\))$/\1/p" "$log")"
    [[ -n "$exe" ]] || { echo "FAIL: no tests/$t.rs executable in the cargo output" >&2; exit 1; }
    emu_tests+=("$exe")
done
for seed in 1 2; do
    echo "== emulator tests, RQ_EMU_SEED=$seed"
    for exe in "${emu_tests[@]}"; do
        RQ_EMU_SEED="$seed" "$exe"
    done
done

echo "== CUDA check passed"
