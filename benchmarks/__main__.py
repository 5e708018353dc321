"""Run the benchmarks, each in its own process, and say where their tables went.

    python -m benchmarks                 the speed benchmarks (a few minutes in all)
    python -m benchmarks --results       also the result benchmarks (a few hours on 2 cores)
    python -m benchmarks novelty kd_loss only these

Every benchmark prints its table and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
SPEED = ["llm_throughput", "hf_generate", "novelty", "world_novelty", "kd_loss", "kd_step", "real_student", "scaling"]
RESULTS = ["api_teacher_kd", "lion_vs_self_instruct", "pt_kd_study", "on_policy"]


def main() -> None:
    parser = argparse.ArgumentParser(description="Run lionkd's benchmarks.")
    parser.add_argument("names", nargs="*", help=f"any of {', '.join(SPEED + RESULTS)}")
    parser.add_argument("--results", action="store_true", help="include the long result benchmarks")
    args = parser.parse_args()
    names = args.names or SPEED + (RESULTS if args.results else [])
    unknown = [n for n in names if n not in SPEED + RESULTS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    failed = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        started = time.time()
        code = subprocess.call([sys.executable, str(HERE / f"{name}.py")], cwd=HERE.parent)
        print(f"=== {name}: {'ok' if code == 0 else f'exit {code}'} in {time.time() - started:.0f} s", flush=True)
        if code:
            failed.append(name)
    print(f"\nresults in {HERE / 'results'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
