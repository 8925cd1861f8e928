#!/usr/bin/env bash
# Builds two commits of rq-min and checks that they write byte-identical exports of one model
# with the same arguments (a refactor must not change a single byte), and the same perplexity.
#
#   tools/compare-exports.sh BASE [NEW] [MODEL]
#
# BASE, NEW: commits (NEW defaults to the working tree). MODEL defaults to ../shared/models/rq-tiny.
# Calibration: the built-in text, 32 rows of 256 tokens (the cases differ in format, not data).
# Prints one line per case (same / DIFFERENT, files compared) and exits 1 on any difference
# (auto_quantize.json is compared without its "search_seconds", the search's wall time).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
base="${1:?usage: tools/compare-exports.sh BASE [NEW] [MODEL]}"
new="${2:-}"
model="$(realpath "${3:-$repo/../shared/models/rq-tiny}")"
work="$(mktemp -d "${TMPDIR:-/tmp}/rq-min-compare.XXXXXX")"
trap 'git -C "$repo" worktree remove --force "$work/base-src" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

# $1: label, $2: source folder -> $work/$1/rq-min
build() {
    echo "== building $1 ($2)" >&2
    (cd "$2" && CARGO_TARGET_DIR="$work/target-$1" cargo build --release --quiet)
    mkdir -p "$work/$1"
    cp "$work/target-$1/release/rq-min" "$work/$1/rq-min"
}

git -C "$repo" worktree add --detach "$work/base-src" "$base" >/dev/null 2>&1
build base "$work/base-src"
if [[ -n "$new" ]]; then
    git -C "$repo" worktree add --detach "$work/new-src" "$new" >/dev/null 2>&1
    build new "$work/new-src"
    git -C "$repo" worktree remove --force "$work/new-src" >/dev/null
else
    build new "$repo"
fi

common=(--model "$model" --calib-size 32 --calib-seq 256 --no-eval --quiet)
cases=(
    "fp8|--qformat fp8"
    "int8_sq|--qformat int8_sq"
    "int4_awq|--qformat int4_awq"
    "w4a8_awq|--qformat w4a8_awq"
    "nvfp4|--qformat nvfp4"
    "nvfp4_awq|--qformat nvfp4_awq"
    "fp8_kv|--qformat fp8 --kv-cache fp8"
    "nvfp4_kv|--qformat nvfp4 --kv-cache fp8"
    "auto_5bits|--qformat nvfp4,fp8 --auto-bits 5.0 --exclude none --score-size 16"
    "trtllm_tp2|--qformat fp8 --export trtllm --tp 2"
    "qnemo|--qformat nvfp4 --export qnemo"
    "compressed_tensors|--qformat int4_awq --export compressed-tensors"
)

status=0
for c in "${cases[@]}"; do
    name="${c%%|*}"
    read -r -a args <<<"${c#*|}"
    out_name="$name"
    [[ "$name" == qnemo ]] && out_name="$name.qnemo"
    for side in base new; do
        "$work/$side/rq-min" quantize "${common[@]}" "${args[@]}" --out "$work/$side/$out_name" >"$work/$side/$name.log" 2>&1 \
            || { echo "$name: $side failed: $(tail -1 "$work/$side/$name.log")"; status=1; continue 2; }
    done
    files=$(cd "$work/base" && find "$out_name" -type f | sort)
    if [[ "$files" != "$(cd "$work/new" && find "$out_name" -type f | sort)" ]]; then
        echo "$name: DIFFERENT file lists"; status=1; continue
    fi
    n=0; diff=""
    while read -r f; do
        n=$((n + 1))
        if [[ "$f" == */auto_quantize.json ]]; then
            # The search report records its wall time; everything else must agree.
            cmp -s <(grep -v '"search_seconds"' "$work/base/$f") <(grep -v '"search_seconds"' "$work/new/$f") || diff="$diff $f"
        else
            cmp -s "$work/base/$f" "$work/new/$f" || diff="$diff $f"
        fi
    done <<<"$files"
    if [[ -z "$diff" ]]; then echo "$name: same ($n files)"; else echo "$name: DIFFERENT:$diff"; status=1; fi
done

# Perplexity of the original and of one export, printed by each build.
for m in "$model" "$work/base/nvfp4"; do
    a=$("$work/base/rq-min" eval --model "$m" --quiet 2>&1 | tail -1)
    b=$("$work/new/rq-min" eval --model "$m" --quiet 2>&1 | tail -1)
    if [[ "$a" == "$b" ]]; then echo "eval $(basename "$m"): same ($a)"; else echo "eval $(basename "$m"): DIFFERENT ($a | $b)"; status=1; fi
done
exit $status
