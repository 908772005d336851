"""How long each entry point takes to refuse a bad input, as a real process: wall and CPU seconds.

    python bench/bench_bad_inputs.py [--repeat 1]

Runs the real-process subset of tests/test_bad_inputs.py (issue 14's examples and one case per entry
point) and prints a table. The target is < 15 s wall on a quiet 2-core machine: a config or path mistake
is refused before any weights load. Wall time counts waiting for a core, so run it when the machine is
quiet (the load average is printed beside the table).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; the fastest is reported")
    args = parser.parse_args()

    import importlib.util  # the cases and the files they point at live in the checkout's tests/

    spec = importlib.util.spec_from_file_location("bad_input_cases", REPO_ROOT / "tests" / "test_bad_inputs.py")
    cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cases)

    with tempfile.TemporaryDirectory() as tmp:
        files = cases.write_case_files(Path(tmp))
        rows = []
        for index in cases.SUBPROCESS_CASES:
            entry, argv, _ = cases.CASES[index]
            best = None
            for _ in range(args.repeat):
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                start = time.perf_counter()
                result = subprocess.run([sys.executable, "-m", f"llm4gen.cli.{entry}", *cases.fill(argv, files)],
                                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
                wall = time.perf_counter() - start
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
                best = min(best or (wall, cpu), (wall, cpu))
            rows.append((cases.case_id(cases.CASES[index]), result.returncode, *best))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"| {'case':<70} | exit | wall s | CPU s |")
    print(f"| {'-' * 70} | ---- | ------ | ----- |")
    for name, code, wall, cpu in rows:
        print(f"| {name:<70} | {code:>4} | {wall:6.1f} | {cpu:5.1f} |")


if __name__ == "__main__":
    main()
