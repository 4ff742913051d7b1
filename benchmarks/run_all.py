"""Run every benchmark at its default settings, one after another (each writes benchmarks/results/NAME.json).

They run in sequence, never in parallel, since each one's baseline must see the same machine as its measurement.

    python benchmarks/run_all.py [--only recording analysis selection recorder_overhead]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {"recording": "bench_recording.py", "recorder_overhead": "bench_recorder_overhead.py",
           "analysis": "bench_analysis.py", "selection": "bench_selection.py"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(SCRIPTS), default=list(SCRIPTS))
    args = parser.parse_args()
    failed = []
    for name in args.only:
        print(f"=== {name}", flush=True)
        start = time.perf_counter()
        code = subprocess.run([sys.executable, str(HERE / SCRIPTS[name])], check=False).returncode
        print(f"=== {name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
