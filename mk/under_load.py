"""Run a command again and again while busy loops hold every core: a loaded CI machine, on purpose.

    python mk/under_load.py --runs 20 -- python -m pytest -q -m "multiprocess and not slow"

Multi-process tests have failed only on loaded machines (a rank's gloo thread lagging behind the interpreter's
exit: fam_hf.distributed.leave_process_group), so they are repeated here under a load of ``--busy`` spinning processes
(default: twice the cores, load average ≈ 3× the cores with the test's own ranks). Each busy loop stops by
itself after ``--limit`` seconds even if this script is killed. Prints one line per run and a tally, keeps each
failed run's output in ``--logs``, and exits 1 if any run failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SPIN = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end: pass\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--busy", type=int, default=2 * (os.cpu_count() or 1), help="spinning processes")
    parser.add_argument("--limit", type=float, default=4 * 3600, help="seconds after which a busy loop stops")
    parser.add_argument("--logs", type=Path, default=Path("outputs/under-load"))
    parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: the command to repeat")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("name the command to repeat after --")
    args.logs.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` stops the busy loops too (finally below)

    spinners = [subprocess.Popen([sys.executable, "-c", SPIN.format(limit=args.limit)]) for _ in range(args.busy)]
    failed = []
    try:
        for run in range(1, args.runs + 1):
            start = time.monotonic()
            proc = subprocess.run(command, capture_output=True, text=True)
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            print(f"run {run}/{args.runs}: {status}, {time.monotonic() - start:.0f} s, load {load:.1f}", flush=True)
            if proc.returncode != 0:
                failed.append(run)
                (args.logs / f"run{run}.log").write_text(proc.stdout + proc.stderr)
    finally:
        for spinner in spinners:
            spinner.kill()
    print(f"{args.runs - len(failed)} of {args.runs} runs passed under {args.busy} busy loops: {' '.join(command)}")
    if failed:
        print(f"failed: runs {', '.join(map(str, failed))}; their output is in {args.logs}/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
