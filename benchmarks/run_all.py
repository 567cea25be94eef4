"""Run every benchmarks/bench_*.py and assemble BENCHMARKS.md from their result sections.

Each benchmark compares against its named baseline in the same run and writes a
markdown section to benchmarks/results/<name>.md; this script only orchestrates.
`python benchmarks/run_all.py --only tokenize` runs one; `--collect` only reassembles.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS

ROOT = Path(__file__).resolve().parent.parent


def collect() -> None:
    sections = [p.read_text().strip() for p in sorted(RESULTS.glob("*.md"))]
    header = (
        "# Benchmarks\n\n"
        "Written by `make bench` (benchmarks/run_all.py). Each section names its baseline,\n"
        "measured in the same run on the same machine; ratios matter, absolute seconds\n"
        "do not travel between machines. Each section says when and where it ran.\n"
    )
    (ROOT / "BENCHMARKS.md").write_text(header + "\n" + "\n\n".join(sections) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", action="append", help="run only bench_<name>.py")
    parser.add_argument("--collect", action="store_true", help="only rebuild BENCHMARKS.md")
    args = parser.parse_args()
    failed = []
    if not args.collect:
        scripts = sorted((ROOT / "benchmarks").glob("bench_*.py"))
        if args.only:
            scripts = [s for s in scripts if s.stem.removeprefix("bench_") in args.only]
        for script in scripts:
            print(f"== {script.name}", flush=True)
            start = time.monotonic()
            rc = subprocess.call([sys.executable, str(script)], cwd=ROOT)
            print(f"== {script.name}: exit {rc} after {time.monotonic() - start:.0f} s", flush=True)
            if rc:
                failed.append(script.name)
    collect()
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
