#!/usr/bin/env python3
"""Runs one command for tools/gpu-check.sh and measures it (Python 3 standard library only).

    tools/timed_run.py --timeout S --log FILE --json FILE [--gpu-baseline MIB] -- COMMAND...

- the command's stdout and stderr go to --log; it runs in its own process group, which gets
  SIGTERM at --timeout seconds and SIGKILL 5 s later (exit status 124 then, as timeout(1));
- wall time (monotonic clock);
- peak host memory: the command's maximum resident set (wait4's ru_maxrss);
- peak device memory: where `nvidia-smi` answers, `memory.used` of GPU 0 polled every 0.2 s
  while the command runs, minus --gpu-baseline (MiB; default: the value read just before the
  start). Everything on the GPU counts, so run nothing else there meanwhile.

Writes {"rc", "timed_out", "seconds", "peak_rss_mib", "peak_gpu_mib", "gpu_baseline_mib"} to
--json (null where not measured) and exits 0, whatever the command's status (that is in the
JSON); 2 on a usage error; 128 + N when it got signal N (SIGTERM, SIGINT, SIGHUP), after
stopping the command's group the same way.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

POLL_SECONDS = 0.2
NVIDIA_SMI = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"]


def gpu_used_mib():
    """memory.used of GPU 0 in MiB, or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(NVIDIA_SMI, capture_output=True, text=True, timeout=5)
        return float(out.stdout.strip().splitlines()[0]) if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


class Poller(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = None
        self.stop = threading.Event()

    def run(self):
        while True:
            v = gpu_used_mib()
            if v is not None:
                self.peak = v if self.peak is None else max(self.peak, v)
            if self.stop.wait(POLL_SECONDS):
                return


def main(argv):
    if "--" not in argv:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    split = argv.index("--")
    opts, cmd = argv[:split], argv[split + 1:]
    o = dict(zip(opts[::2], opts[1::2]))
    if not cmd or len(opts) % 2 or set(o) - {"--timeout", "--log", "--json", "--gpu-baseline"} or not {"--timeout", "--log", "--json"} <= set(o):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    timeout = float(o["--timeout"])
    baseline = float(o["--gpu-baseline"]) if "--gpu-baseline" in o else gpu_used_mib()
    poller = Poller()
    poller.start()
    timed_out = False
    stopped = []  # the signal that stopped gpu-check.sh: pass it on to the command's group
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: stopped.append(signum))
    start = time.monotonic()
    with open(o["--log"], "ab") as log:
        try:
            child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            log.write(f"timed_run: cannot start {cmd[0]}: {e}\n".encode())
            rc, rss, seconds = 127, None, 0.0
            child = None
        if child is not None:
            deadline, killed_at = start + timeout, None
            while True:
                pid, status, usage = os.wait4(child.pid, os.WNOHANG)
                if pid:
                    break
                now = time.monotonic()
                if (now >= deadline or stopped) and killed_at is None:
                    timed_out, killed_at = not stopped, now
                    try:
                        os.killpg(child.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                elif killed_at is not None and now >= killed_at + 5:
                    try:
                        os.killpg(child.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.05)
            seconds = time.monotonic() - start
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
            child.returncode = code
            rc = 124 if timed_out else code
            rss = usage.ru_maxrss / 1024.0  # KiB on Linux
            if timed_out:
                log.write(f"\ntimed_run: killed after {timeout:.0f} s (timeout)\n".encode())
    poller.stop.set()
    poller.join()
    peak = None
    if poller.peak is not None and baseline is not None:
        peak = max(0.0, poller.peak - baseline)
    result = {
        "rc": rc,
        "timed_out": timed_out,
        "seconds": round(seconds, 3),
        "peak_rss_mib": None if rss is None else round(rss, 1),
        "peak_gpu_mib": peak,
        "gpu_baseline_mib": baseline,
    }
    with open(o["--json"], "w") as f:
        json.dump(result, f)
    return 128 + stopped[0] if stopped else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
