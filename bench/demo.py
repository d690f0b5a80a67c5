"""Demo benchmark: wall time of `kompressor demo` end to end (search, gates, serving, drift, rollback, report).

    python bench/demo.py [--runs 1] [--out docs/benchmarks/demo.md]

Each run uses a fresh work folder and a fresh model cache (so the builtin model is trained, as on a first
run), in a subprocess exactly as a user starts it. Target: under 5 minutes on 2 cores. The Markdown records
the 1-minute load average before and after each run: a loaded machine gives a slower figure.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 300.0


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None


def one_run(port: int) -> tuple[float, int, float | None, float | None]:
    """(seconds, exit code, 1-minute load average before, after)."""
    work = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    before = load_average()
    try:
        env = {**os.environ, "KOMPRESSOR_CACHE": str(work / "cache")}
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "kompressor.cli", "demo", "--workdir", str(work / "demo"),
                               "--port", str(port)], env=env, capture_output=True, text=True, timeout=1800)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
        return seconds, done.returncode, before, load_average()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--port", type=int, default=18631)
    parser.add_argument("--out", help="write the Markdown here too")
    args = parser.parse_args()
    results = [one_run(args.port) for _ in range(args.runs)]
    times = [s for s, rc, _, _ in results if rc == 0]
    failed = sum(rc != 0 for _, rc, _, _ in results)
    loads = [f"{a:.1f} -> {b:.1f}" for _, _, a, b in results if a is not None and b is not None]
    text = "\n".join([
        "## Demo (bench/demo.py)", "",
        f"`kompressor demo` end to end, {args.runs} run(s) in a subprocess with a fresh model cache each, on "
        f"{platform.machine()} with {os.cpu_count()} CPUs shared with other jobs: "
        + (", ".join(f"{s:.0f} s" for s in times) if times else "no successful run")
        + (f"; {failed} run(s) failed" if failed else "") + ".",
        "",
        *([f"1-minute load average before -> after each run: {', '.join(loads)} (on {os.cpu_count()} CPUs; "
           "above the CPU count, other work was competing for them)", ""] if loads else []),
        f"Target: under {TARGET_S:.0f} s: " + ("met" if times and max(times) < TARGET_S else "NOT met") + ".",
        "",
    ])
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if times and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
