#!/usr/bin/env python3
"""Compares a `--device cuda` export with the `--device cpu` export of the same run, by the
rules of tests/device_pipeline.rs (`compare_exports`), with the Python 3 standard library only.

    tools/compare_exports.py CPU_DIR GPU_DIR [--exact] [--smoothquant | --no-smoothquant]

- both folders hold the same files (recursively); every file that is not `.safetensors` is
  byte-identical;
- the `.safetensors` files hold the same tensors (by name, over all files), each with the same
  dtype and shape, and byte-identical data, except:
  - activation / KV-cache scales (`input_scale`, `k_scale`, `v_scale`): within one bf16 step
    (2^-7 relative), since they come from device statistics;
  - INT8 SmoothQuant exports: `pre_quant_scale` and `weight_scale` within one bf16 step, INT8
    codes within 1 (the smoothing factors come from per-channel activation amaxes).
  SmoothQuant is recognised by `"quant_algo": "W8A8_SQ_PER_CHANNEL"` in hf_quant_config.json
  (or forced with --smoothquant / --no-smoothquant).
- --exact: every byte must agree (the host emulator, whose device repeats the CPU's arithmetic).

Prints one summary line (files, tensors, largest scale difference, INT8 codes one apart) and
exits 0, or prints each disagreement (the first 20) and exits 1.
"""
import json
import math
import os
import struct
import sys

SCALE_TOLERANCE = 1.0 / 128.0
STAT_SCALES = ("input_scale", "k_scale", "v_scale")
SMOOTHING = ("pre_quant_scale", "weight_scale")
MAX_REPORTED = 20


class Mismatch(Exception):
    pass


def files_under(root):
    out = []
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            out.append(os.path.relpath(os.path.join(dirpath, n), root))
    return sorted(out)


def read_header(path):
    """(header dict without __metadata__, data offset, metadata) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise Mismatch(f"{path}: shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 1024 * 1024:
            raise Mismatch(f"{path}: header length {n} is not plausible")
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", None)
    return header, 8 + n, meta


def tensors(folder, files):
    """name -> (file path, dtype, shape, absolute start, end) over every .safetensors file."""
    out = {}
    for rel in files:
        if not rel.endswith(".safetensors"):
            continue
        path = os.path.join(folder, rel)
        header, base, _meta = read_header(path)
        for name, t in header.items():
            start, end = t["data_offsets"]
            if name in out:
                raise Mismatch(f"{folder}: tensor {name} is in two files")
            out[name] = (path, t["dtype"], tuple(t["shape"]), base + start, base + end)
    return out


def read_bytes(entry):
    path, _dtype, _shape, start, end = entry
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def e4m3(b):
    s = -1.0 if b & 0x80 else 1.0
    e, m = (b >> 3) & 0xF, b & 0x7
    if e == 0xF and m == 0x7:
        return math.nan
    if e == 0:
        return s * m / 8.0 * 2.0 ** -6
    return s * (1.0 + m / 8.0) * 2.0 ** (e - 7)


def to_floats(dtype, data):
    if dtype == "F32":
        return struct.unpack(f"<{len(data) // 4}f", data)
    if dtype == "F64":
        return struct.unpack(f"<{len(data) // 8}d", data)
    if dtype == "F16":
        return struct.unpack(f"<{len(data) // 2}e", data)
    if dtype == "BF16":
        halves = struct.unpack(f"<{len(data) // 2}H", data)
        return struct.unpack(f"<{len(halves)}f", struct.pack(f"<{len(halves)}I", *(h << 16 for h in halves)))
    if dtype == "F8_E4M3":
        return [e4m3(b) for b in data]
    if dtype == "I8":
        return struct.unpack(f"<{len(data)}b", data)
    raise Mismatch(f"dtype {dtype} has no float reading here")


def is_smoothquant(folder):
    path = os.path.join(folder, "hf_quant_config.json")
    try:
        with open(path) as f:
            q = json.load(f)
    except (OSError, ValueError):
        return False
    return (q.get("quantization") or {}).get("quant_algo") == "W8A8_SQ_PER_CHANNEL"


def compare(cpu, gpu, exact=False, smoothed=None):
    """Returns (files, tensors, largest relative scale difference, INT8 codes one apart,
    problems)."""
    problems = []
    cpu_files, gpu_files = files_under(cpu), files_under(gpu)
    if cpu_files != gpu_files:
        only_cpu = sorted(set(cpu_files) - set(gpu_files))
        only_gpu = sorted(set(gpu_files) - set(cpu_files))
        problems.append(f"different files: only in cpu {only_cpu}, only in gpu {only_gpu}")
        return len(cpu_files), 0, 0.0, 0, problems
    for rel in cpu_files:
        if rel.endswith(".safetensors"):
            continue
        with open(os.path.join(cpu, rel), "rb") as a, open(os.path.join(gpu, rel), "rb") as b:
            if a.read() != b.read():
                problems.append(f"{rel} differs")
    if smoothed is None:
        smoothed = is_smoothquant(cpu)
    c, g = tensors(cpu, cpu_files), tensors(gpu, gpu_files)
    if sorted(c) != sorted(g):
        problems.append(f"different tensors: only in cpu {sorted(set(c) - set(g))[:5]}, only in gpu {sorted(set(g) - set(c))[:5]}")
        return len(cpu_files), len(c), 0.0, 0, problems
    worst, codes = 0.0, 0
    for name in sorted(c):
        a, b = c[name], g[name]
        if a[1:3] != b[1:3]:
            problems.append(f"{name}: cpu {a[1]} {list(a[2])}, gpu {b[1]} {list(b[2])}")
            continue
        da, db = read_bytes(a), read_bytes(b)
        if da == db:
            continue
        if exact:
            problems.append(f"{name} differs (--exact: the emulator repeats the CPU's arithmetic)")
            continue
        dtype = a[1]
        if smoothed and dtype == "I8":
            xs, ys = to_floats("I8", da), to_floats("I8", db)
            far = [(i, x, y) for i, (x, y) in enumerate(zip(xs, ys)) if abs(x - y) > 1]
            if far:
                i, x, y = far[0]
                problems.append(f"{name}: INT8 codes {x} (cpu) and {y} (gpu) at {i}, {len(far)} more than one apart")
            codes += sum(1 for x, y in zip(xs, ys) if x != y)
            continue
        tolerated = name.endswith(STAT_SCALES) or (smoothed and name.endswith(SMOOTHING))
        if not tolerated:
            problems.append(f"{name} ({dtype}) is not byte-identical")
            continue
        for i, (x, y) in enumerate(zip(to_floats(dtype, da), to_floats(dtype, db))):
            rel = abs(x - y) / max(abs(x), sys.float_info.min)
            if not rel <= SCALE_TOLERANCE:
                problems.append(f"{name}[{i}]: cpu {x} gpu {y} ({rel:.3e} relative, more than one bf16 step)")
                break
            worst = max(worst, rel)
    return len(cpu_files), len(c), worst, codes, problems


def main(argv):
    args = [a for a in argv if not a.startswith("--")]
    flags = {a for a in argv if a.startswith("--")}
    unknown = flags - {"--exact", "--smoothquant", "--no-smoothquant"}
    if len(args) != 2 or unknown or {"--smoothquant", "--no-smoothquant"} <= flags:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    cpu, gpu = args
    for d in (cpu, gpu):
        if not os.path.isdir(d):
            print(f"compare_exports: {d} is not a folder", file=sys.stderr)
            return 2
    smoothed = True if "--smoothquant" in flags else False if "--no-smoothquant" in flags else None
    try:
        n_files, n_tensors, worst, codes, problems = compare(cpu, gpu, "--exact" in flags, smoothed)
    except (Mismatch, OSError, ValueError, KeyError) as e:
        print(f"DIFFERENT: {e}")
        return 1
    if problems:
        print(f"DIFFERENT: {len(problems)} disagreement(s) in {n_files} files, {n_tensors} tensors")
        for p in problems[:MAX_REPORTED]:
            print(f"  {p}")
        return 1
    if worst == 0.0 and codes == 0:
        print(f"same: {n_files} files, {n_tensors} tensors, byte-identical")
    else:
        print(f"same: {n_files} files, {n_tensors} tensors identical but scales (largest scale difference {worst:.2e}, {codes} INT8 codes one apart)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
