#!/usr/bin/env bash
# One-shot check on a lent GPU machine (issue 14): H100 / H200, driver 580, no Rust, no
# internet. Runs the prebuilt bundle of tools/gpu-bundle.sh from the repository root, in under
# 8 minutes:
#   1. the CUDA test executables (the kernel tests and tests/device_pipeline.rs) on the GPU;
#   2. rq-tiny quantized in every format with --device cuda and --device cpu, the exports
#      compared by tools/compare_exports.py (the rules of tests/device_pipeline.rs); formats the
#      device refuses are reported as refused (issue 14), not as failures; AWQ exports that differ
#      (a near-tie of the alpha search broken the other way) are compared by perplexity (0.1%);
#   3. `rq-min synth --shape llama3-8b`, then fp8, nvfp4 and int4_awq timed end to end with
#      512 x 512 calibration tokens (wall seconds, peak device memory from nvidia-smi, peak host
#      RSS); int4_awq on llama3-1b too;
#   4. one markdown table: step | result | target | ModelOpt | verdict (also written to
#      $RQ_GPU_CHECK_OUT/table.md).
#
#   tools/gpu-check.sh [BUNDLE_DIR]          (default target/gpu-bundle)
#
# Needs bash, Python 3 (standard library), nvidia-smi, and ../shared or shared/ (models/rq-tiny,
# data/). Environment:
#   RQ_GPU_CHECK_SMALL=1   dry run for a machine without a GPU (with the bundle of
#                          `tools/gpu-bundle.sh --emu`, the kernels run under the host emulator):
#                          step 3 becomes `synth --shape llama3-1b --layers 1` with 4 x 64
#                          calibration, step 2 uses 4 x 64 too, the timeouts are 10 times longer
#                          and the targets are not applied
#   RQ_GPU_CHECK_OUT=DIR   logs, JSON measurements and table.md (default target/gpu-check)
#   RQ_GPU_CHECK_WORK=DIR  scratch for the models and exports, ~30 GB, deleted at the end
#                          (default $RQ_GPU_CHECK_OUT/work)
#   RQ_GPU_CHECK_BUDGET=S  total seconds (default 470; 3600 with RQ_GPU_CHECK_SMALL=1)
# Exit status: 0 when every test and comparison passed (a missed performance target is reported
# in the table, not in the status), 1 when one failed, 2 when it could not start (no bundle, no
# GPU).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

bundle="${1:-target/gpu-bundle}"
small=0
[[ "${RQ_GPU_CHECK_SMALL:-0}" == 1 ]] && small=1
out="${RQ_GPU_CHECK_OUT:-target/gpu-check}"
work="${RQ_GPU_CHECK_WORK:-$out/work}"
if ((small)); then budget="${RQ_GPU_CHECK_BUDGET:-3600}"; scale=10; else budget="${RQ_GPU_CHECK_BUDGET:-470}"; scale=1; fi
tools="$repo/tools"

die() { echo "gpu-check: $*" >&2; exit 2; }

# ---- before anything long: the bundle, the GPU, the data ----
[[ -x "$bundle/rq-min" && -f "$bundle/MANIFEST.txt" && -d "$bundle/tests" ]] \
    || die "no bundle in $bundle (rq-min, tests/, MANIFEST.txt): build it with tools/gpu-bundle.sh where cargo is, copy target/gpu-bundle here"
bundle="$(cd "$bundle" && pwd)"
bin="$bundle/rq-min"
feature="$(sed -n 's/^feature: //p' "$bundle/MANIFEST.txt")"
bundle_commit="$(sed -n 's/^commit: //p' "$bundle/MANIFEST.txt")"
command -v python3 >/dev/null || die "python3 not found (the comparisons and measurements need it)"

gpu=""
if command -v nvidia-smi >/dev/null 2>&1; then
    gpu="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader -i 0 2>/dev/null | head -n 1)"
fi
if [[ -z "$gpu" ]]; then
    why="nvidia-smi not found"
    command -v nvidia-smi >/dev/null 2>&1 && why="nvidia-smi finds no GPU"
    if ((!small)); then
        die "no GPU: $why. This script is for a machine with an NVIDIA GPU (H100 / H200). Without one, dry-run it: bash tools/gpu-bundle.sh --emu && RQ_GPU_CHECK_SMALL=1 bash tools/gpu-check.sh target/gpu-bundle-emu"
    fi
    gpu="none ($why)"
    [[ "$feature" == cuda-emu ]] || echo "gpu-check: warning: no GPU and a bundle built with feature '$feature': the device steps will fail; use tools/gpu-bundle.sh --emu for a dry run" >&2
fi

shared=""
for d in "$repo/../shared" "$repo/shared"; do
    if [[ -d "$d/models/rq-tiny" ]]; then shared="$(cd "$d" && pwd)"; break; fi
done

mkdir -p "$out/logs" "$work" || die "cannot create $out/logs and $work"
out="$(cd "$out" && pwd)"
work="$(cd "$work" && pwd)"
rm -f "$out"/logs/*
export RQ_REPO_DIR="$repo"
unset CI

head_commit="$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)"
echo "== gpu-check: GPU: $gpu"
echo "== bundle $bundle: feature $feature, commit $bundle_commit; repository at $head_commit"
echo "== shared data: ${shared:-not found}; logs in $out/logs; budget ${budget} s$( ((small)) && echo ', dry run (RQ_GPU_CHECK_SMALL=1)')"
if [[ "$head_commit" != unknown && "${bundle_commit%% *}" != "$head_commit" ]]; then
    echo "gpu-check: warning: the bundle was built from ${bundle_commit%% *}, the repository is at $head_commit (the tests read fixtures from the repository)" >&2
fi

# ---- the table ----
rows=()
fails=0
missed=0
row() { # step, result, target, ModelOpt, verdict
    local r
    r="| $1 | $2 | $3 | $4 | $5 |"
    rows+=("$r")
    echo "   $r"
    [[ "$5" == FAIL* ]] && fails=$((fails + 1))
    [[ "$5" == MISSED* ]] && missed=$((missed + 1))
    return 0
}

# ---- time: a global deadline and one per step ----
t0=$SECONDS
deadline=$((t0 + budget))
step_deadline=$deadline
begin_step() { # seconds this step may take at most
    step_deadline=$((SECONDS + $1 * scale))
    ((step_deadline > deadline)) && step_deadline=$deadline
    return 0
}
# The timeout of a command: its own (times $scale), cut to what the step and the run have left;
# 0 when under 3 s are left.
timeout_for() {
    local t=$(($1 * scale)) left=$((step_deadline - SECONDS))
    ((t > left)) && t=$left
    ((t < 3)) && t=0
    echo "$t"
}

# run NAME TIMEOUT CMD...: runs CMD under tools/timed_run.py (log $out/logs/NAME.log); sets rc,
# secs, rss_mib, gpu_mib (- where not measured) and timed_out.
run() {
    local name="$1" t="$2"
    shift 2
    : > "$out/logs/$name.log"
    python3 "$tools/timed_run.py" --timeout "$t" --log "$out/logs/$name.log" --json "$out/logs/$name.json" -- "$@"
    local prc=$?
    ((prc >= 128)) && { echo "gpu-check: stopped by a signal" >&2; exit 1; }
    read -r rc secs rss_mib gpu_mib timed_out < <(python3 - "$out/logs/$name.json" <<'EOF'
import json, sys
try:
    j = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    j = {"rc": 125}
f = lambda v, fmt: "-" if v is None else fmt.format(v)
print(j["rc"], f(j.get("seconds"), "{:.1f}"), f(j.get("peak_rss_mib"), "{:.0f}"), f(j.get("peak_gpu_mib"), "{:.0f}"), int(bool(j.get("timed_out"))))
EOF
    )
}
# The command's error line (rq-min's "rq-min: error: ..."), else its last line; | escaped.
error_line() {
    local l
    l="$(grep -m1 'rq-min: error:' "$1" || grep -m1 -i 'error\|panicked' "$1" || true)"
    [[ -n "$l" ]] || l="$(grep -v '^\s*$' "$1" | tail -n 1)"
    l="${l//|/\\|}"
    echo "${l:0:200}"
}
refused() { grep -q 'is not on the device yet' "$1"; }
gib() { [[ "$1" == - ]] && echo "-" || python3 -c "print(f'{$1 / 1024:.2f}')"; }

# ---- step 1: the CUDA test executables ----
echo "== step 1: CUDA test executables on the device ($(ls "$bundle/tests" | tr '\n' ' '))"
begin_step 150
for exe in "$bundle"/tests/*; do
    t="$(basename "$exe")"
    own=40
    [[ "$t" == device_pipeline ]] && own=100
    to="$(timeout_for $own)"
    if ((to == 0)); then row "1. tests/$t.rs" "not run: out of time" "all pass" "—" "FAIL (no time)"; continue; fi
    echo "-- tests/$t.rs (timeout $to s)"
    run "test-$t" "$to" "$exe"
    log="$out/logs/test-$t.log"
    summary="$(grep -m1 '^test result:' "$log" | sed -E 's/^test result: (ok|FAILED)\. ([0-9]+) passed; ([0-9]+) failed.*/\2 passed, \3 failed/')"
    [[ -n "$summary" ]] || summary="no test summary"
    skips="$(grep -cE '^(skipped|skipping): ' "$log")"
    failed_names="$(grep -E '^test .* \.\.\. FAILED$' "$log" | sed -E 's/^test (.*) \.\.\. FAILED$/\1/' | head -n 3 | tr '\n' ' ')"
    result="$summary in ${secs} s"
    if ((timed_out)); then
        row "1. tests/$t.rs" "timed out after $to s" "all pass" "—" "FAIL"
    elif ((rc != 0)); then
        row "1. tests/$t.rs" "$result; failed: ${failed_names:-$(error_line "$log")}" "all pass" "—" "FAIL"
    elif ((skips > 0)); then
        row "1. tests/$t.rs" "$result, $skips skipped ($(grep -m1 -E '^(skipped|skipping): ' "$log" | sed -E 's/^(skipped|skipping): //' | cut -c1-120))" "all pass" "—" "FAIL (skipped)"
    else
        row "1. tests/$t.rs" "$result" "all pass" "—" "PASS"
    fi
done

# ---- step 2: rq-tiny, every format, device against CPU ----
echo "== step 2: rq-tiny in every format, --device cuda against --device cpu"
begin_step 80
if ((small)); then tiny_calib=(--calib-size 4 --calib-seq 64); else tiny_calib=(--calib-size 16 --calib-seq 128); fi
exact=()
[[ "$feature" == cuda-emu ]] && exact=(--exact)
cases=( # log name | label | flags
    "fp8|fp8|--qformat fp8"
    "int8_sq|int8_sq|--qformat int8_sq"
    "nvfp4|nvfp4|--qformat nvfp4"
    "fp8_kv|fp8 + FP8 KV cache|--qformat fp8 --kv-cache fp8"
    "nvfp4_kv|nvfp4 + FP8 KV cache|--qformat nvfp4 --kv-cache fp8"
    "int4_awq|int4_awq|--qformat int4_awq"
    "w4a8_awq|w4a8_awq|--qformat w4a8_awq"
    "nvfp4_awq|nvfp4_awq|--qformat nvfp4_awq"
)
target2="device export = CPU export (scales ≤ 1 bf16 step)"
((${#exact[@]})) && target2="device export = CPU export, byte for byte (emulator)"
for c in "${cases[@]}"; do
    IFS='|' read -r key name flags <<<"$c"
    read -r -a args <<<"$flags"
    step="2. rq-tiny $name, ${tiny_calib[1]} x ${tiny_calib[3]}"
    if [[ -z "$shared" ]]; then row "$step" "not run: no ../shared or shared/ with models/rq-tiny" "$target2" "—" "FAIL (no data)"; continue; fi
    common=(quantize --model "$shared/models/rq-tiny" --calib-text "$shared/data/tinystories_calib.txt" "${tiny_calib[@]}" --no-eval --quiet --force "${args[@]}")
    to="$(timeout_for 20)"
    if ((to == 0)); then row "$step" "not run: out of time" "$target2" "—" "FAIL (no time)"; continue; fi
    echo "-- $name (timeout $to s per run)"
    run "tiny-$key-gpu" "$to" "$bin" "${common[@]}" --device cuda --out "$work/tiny-$key-gpu"
    log="$out/logs/tiny-$key-gpu.log"
    if ((rc != 0)) && refused "$log"; then
        row "$step" "refused on the device (issue 14): $(error_line "$log")" "$target2" "—" "refused (issue 14)"
        continue
    elif ((timed_out)); then
        row "$step" "device run timed out after $to s" "$target2" "—" "FAIL"; continue
    elif ((rc != 0)); then
        row "$step" "device run failed: $(error_line "$log")" "$target2" "—" "FAIL"; continue
    fi
    gpu_secs="$secs"
    to="$(timeout_for 20)"
    ((to == 0)) && to=3
    run "tiny-$key-cpu" "$to" "$bin" "${common[@]}" --device cpu --out "$work/tiny-$key-cpu"
    if ((rc != 0)); then
        row "$step" "CPU run failed: $(error_line "$out/logs/tiny-$key-cpu.log")" "$target2" "—" "FAIL"; continue
    fi
    cmp_out="$(python3 "$tools/compare_exports.py" "$work/tiny-$key-cpu" "$work/tiny-$key-gpu" "${exact[@]}" 2>&1)"
    crc=$?
    echo "$cmp_out" > "$out/logs/tiny-$key-compare.log"
    first="$(echo "$cmp_out" | head -n 1)"
    if ((crc == 0)); then
        row "$step" "${first#same: } (device ${gpu_secs} s, CPU ${secs} s)" "$target2" "—" "PASS"
    elif [[ "$key" == *_awq && ${#exact[@]} -eq 0 ]]; then
        # The tensor cores sum AWQ's search products in their own order, so a near-tie between
        # two alphas may go the other way: then the two exports are compared by perplexity.
        ppl_of() { "$bin" eval --model "$1" --device cuda --quiet 2>&1 | sed -n 's/^perplexity \([0-9.]*\).*/\1/p'; }
        pc="$(ppl_of "$work/tiny-$key-cpu")" pg="$(ppl_of "$work/tiny-$key-gpu")"
        verdict="$(python3 -c "import sys; c, g = float(sys.argv[1] or 'nan'), float(sys.argv[2] or 'nan'); print('PASS' if abs(g / c - 1) <= 1e-3 else 'FAIL')" "$pc" "$pg" 2>/dev/null || echo FAIL)"
        row "$step" "exports differ (${first:0:80}); perplexity CPU export $pc, device export $pg" "$target2 (AWQ: ppl within 0.1%)" "—" "$verdict"
    else
        row "$step" "$first $(echo "$cmp_out" | sed -n 2p | sed 's/^ *//' | cut -c1-160)" "$target2" "—" "FAIL"
    fi
    rm -rf "$work/tiny-$key-gpu" "$work/tiny-$key-cpu"
done

# ---- step 3: synthetic llama3-8b (and llama3-1b), timed end to end ----
if ((small)); then
    big=llama3-1b; big_layers=(--layers 1); big_label="llama3-1b --layers 1"; rows_n=4; seq_n=64
else
    big=llama3-8b; big_layers=(); big_label="llama3-8b"; rows_n=512; seq_n=512
fi
echo "== step 3: synth $big_label, quantize --device cuda timed end to end ($rows_n x $seq_n calibration)"
begin_step 100000
ids="$work/calib-ids-${rows_n}x${seq_n}.json"
python3 - "$ids" "$rows_n" "$seq_n" <<'EOF'
import json, random, sys
path, rows, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(14)  # fixed: the same ids on every run; below 128000, the Llama 3 specials
json.dump([[rng.randrange(128000) for _ in range(seq)] for _ in range(rows)], open(path, "w"))
EOF
calib=(--calib-ids "$ids" --calib-size "$rows_n" --calib-seq "$seq_n")

free_gib() { df -Pk "$work" | awk 'NR == 2 { printf "%d", $4 / 1048576 }'; }

# synth_model SHAPE LABEL DIR OWN_TIMEOUT LAYERS...: sets synth_ok.
synth_model() {
    local shape="$1" label="$2" dir="$3" own="$4"
    shift 4
    synth_ok=0
    local to
    to="$(timeout_for "$own")"
    if ((to == 0)); then row "3. synth $label" "not run: out of time" "—" "—" "FAIL (no time)"; return; fi
    echo "-- synth $label (timeout $to s; $(free_gib) GiB free in $work)"
    run "synth-$shape" "$to" "$bin" synth --shape "$shape" --out "$dir" --force --quiet "$@"
    if ((rc == 0)); then
        row "3. synth $label (random bf16 weights)" "$secs s, $(du -sh "$dir" | cut -f1)" "—" "—" "PASS"
        synth_ok=1
    elif ((timed_out)); then
        row "3. synth $label" "timed out after $to s" "—" "—" "FAIL"
    else
        row "3. synth $label" "failed: $(error_line "$out/logs/synth-$shape.log")" "—" "—" "FAIL"
    fi
}

# timed MODEL_DIR LABEL FORMAT OWN_TIMEOUT TARGET_S TARGET_GIB MODELOPT
timed() {
    local dir="$1" label="$2" fmt="$3" own="$4" tsec="$5" tgib="$6" mo="$7"
    local step="3. $label $fmt, $rows_n x $seq_n, end to end" target="—" to
    [[ "$tsec" != - ]] && target="≤ $tsec s, ≤ $tgib GiB device"
    ((small)) && [[ "$tsec" != - ]] && target="(llama3-8b, 512 x 512: $target)"
    if ((!synth_ok)); then row "$step" "not run: no model" "$target" "$mo" "FAIL"; return; fi
    to="$(timeout_for "$own")"
    if ((to == 0)); then row "$step" "not run: out of time (8-minute budget)" "$target" "$mo" "MISSED (no time)"; return; fi
    echo "-- $label $fmt (timeout $to s)"
    run "time-$label-$fmt" "$to" "$bin" quantize --model "$dir" --out "$work/q-$fmt" --qformat "$fmt" --device cuda \
        "${calib[@]}" --no-eval --force
    local log="$out/logs/time-$label-$fmt.log"
    rm -rf "$work/q-$fmt"
    if ((rc != 0)) && refused "$log"; then
        row "$step" "refused on the device (issue 14): $(error_line "$log")" "$target" "$mo" "refused (issue 14)"
        return
    fi
    if ((timed_out)); then
        row "$step" "timed out after $to s" "$target" "$mo" "MISSED (timed out)"
        return
    fi
    if ((rc != 0)); then
        row "$step" "failed after $secs s: $(error_line "$log")" "$target" "$mo" "FAIL"
        return
    fi
    local dev="n/a (no nvidia-smi)"
    [[ "$gpu_mib" != - ]] && dev="$(gib "$gpu_mib") GiB"
    local result="$secs s, peak device $dev, host RSS $(gib "$rss_mib") GiB" verdict="PASS"
    if ((small)); then
        verdict="PASS (dry run: targets not applied)"
    elif [[ "$tsec" != - ]]; then
        local why=()
        python3 -c "import sys; sys.exit(0 if $secs <= $tsec else 1)" || why+=("time")
        if [[ "$gpu_mib" == - ]]; then why+=("memory not measured")
        else python3 -c "import sys; sys.exit(0 if $gpu_mib <= $tgib * 1024 else 1)" || why+=("memory"); fi
        ((${#why[@]})) && verdict="MISSED (${why[*]})" || verdict="PASS (target met)"
    fi
    row "$step" "$result" "$target" "$mo" "$verdict"
}

need=$((small ? 4 : 30))
if (($(free_gib) < need)); then
    row "3. synth $big_label" "not run: $(free_gib) GiB free in $work, $need GiB needed" "—" "—" "FAIL (disk)"
    synth_ok=0
else
    synth_model "$big" "$big_label" "$work/$big" 120 "${big_layers[@]}"
fi
timed "$work/$big" "$big" fp8 90 10 8 "27 s, 18 GiB"
timed "$work/$big" "$big" nvfp4 90 10 8 "24 s, 18 GiB"
timed "$work/$big" "$big" int4_awq 150 90 8 "≈ 7 min"
rm -rf "${work:?}/$big"
if ((!small)); then
    synth_model llama3-1b llama3-1b "$work/llama3-1b" 40
    timed "$work/llama3-1b" llama3-1b int4_awq 60 - - "—"
    rm -rf "${work:?}/llama3-1b"
fi
rm -f "$ids"
rmdir "$work" 2>/dev/null

# ---- step 4: the table ----
total=$((SECONDS - t0))
{
    echo
    echo "gpu-check: $gpu; bundle $feature @ ${bundle_commit:0:12}; $total s$( ((small)) && echo '; dry run (RQ_GPU_CHECK_SMALL=1)')"
    echo
    echo "| step | result | target | ModelOpt 0.47, H100 | verdict |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
    echo
    echo "$fails failed, $missed target(s) missed; logs in $out/logs"
} | tee "$out/table.md"
((fails == 0))
