"""Throughput of the math grader (gvpo.rewards.math_accuracy) on 512 completions.

Completions are MATH500 reference solutions (right answers in MATH's LaTeX style) and the same solutions
graded against another problem's answer (wrong answers), half and half, in one batch as a trainer sends them.
Run: `python benchmarks/math_grader.py [--n 512] [--workers W] [--data-dir ../shared/data]`.
"""

from __future__ import annotations

import argparse
import random
import time

from gvpo.data import load_benchmark
from gvpo.rewards import configure_grader, grader_metrics, math_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    configure_grader(num_workers=args.workers)
    rows = load_benchmark("math500", data_dir=args.data_dir)

    def batch(seed: int):
        rng = random.Random(seed)
        completions, answers = [], []
        for i in range(args.n):
            row = rows[(i + seed * 37) % len(rows)]
            completions.append(row["solution"])
            answers.append(row["answer"] if i % 2 == 0 else rng.choice(rows)["answer"])
        return completions, answers

    start = time.perf_counter()
    math_accuracy(None, ["\\boxed{\\sqrt{4}}"], ["2"])  # starts the workers (math-verify path)
    startup = time.perf_counter() - start
    # cold: new golds and pairs; new pairs: golds parsed in the workers already; repeat: verdicts cached
    for label, seed in (("cold", 0), ("new pairs", 1), ("repeat", 0)):
        completions, answers = batch(seed)
        before = grader_metrics()
        start = time.perf_counter()
        scores = math_accuracy(None, completions, answers)
        seconds = time.perf_counter() - start
        after = grader_metrics()
        delta = {k: after[k] - before[k] for k in ("fast_path", "cached", "math_verify", "timeouts")}
        print(
            f"{label}: {args.n} completions in {seconds:.2f} s = {args.n / seconds:.0f}/s "
            f"(mean score {sum(s or 0 for s in scores) / len(scores):.3f}, {delta})"
        )
    print(f"worker start-up {startup:.2f} s ({grader_metrics()['worker_restarts']} restarts)")


if __name__ == "__main__":
    main()
