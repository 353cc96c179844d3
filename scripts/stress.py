"""Run the multi-process tests (torchrun, accelerate launch, Ray) many times while a CPU burner keeps every
core busy, and count how often each fails: a test that fails at random blocks every submission that meets it.

    python scripts/stress.py                       # 20 rounds of the default multi-process tests, 2 burners
    python scripts/stress.py --rounds 5 --burners 0 tests/test_distributed.py
    python scripts/stress.py --job 20              # a user's job: `torchrun --nproc_per_node 2 -m gvpo.cli train`

Each round is one pytest process (its own Ray cluster and temporary HOME, as tests/conftest.py sets up). Prints
one row per round and a table of failures per test; exit 1 when anything failed or a rank printed an abort.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TESTS = [
    "tests/test_distributed.py",  # torchrun: 2 processes == 1, resume per rank, a reward timeout on one rank
    "tests/test_async.py",  # Ray: workers, kills, torchrun learners joining the cluster
    "tests/test_trl_demonstrations.py::test_two_processes_put_the_same_demonstrations_in_the_same_groups_as_one",
]
ABORT = "terminate called"


def _burn(stop) -> None:
    x = 0
    while not stop.is_set():
        for i in range(100_000):
            x = (x * 1_103_515_245 + i) % 2_147_483_647


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pytest_round(tests: list[str], log: Path | None = None) -> tuple[Counter, bool, str]:
    # The caller's environment as is: CI sets no OMP_NUM_THREADS, and the thread count changes the numerics.
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *tests], cwd=ROOT,
                          capture_output=True, text=True)
    failed = Counter(m.group(1) for m in re.finditer(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.M))
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    aborted = ABORT in done.stdout + done.stderr
    if log is not None and (failed or aborted):  # what failed, to read after an unattended run
        log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    return failed, aborted, summary


def _job_round(model: str) -> tuple[Counter, bool, str]:
    """What a user runs: 2 gloo processes of `gvpo train` on the embedded model, a few steps."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "gvpo.cli", "train", f"model_name_or_path={model}",
               "max_steps=3", "prompts_per_step=8", "num_eval=16", "eval_steps=0", "save_steps=0",
               "progress_bar=false", f"output_dir={out}"]
        done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True)
    failed = Counter({"torchrun job": 1}) if done.returncode else Counter()
    return failed, ABORT in done.stdout + done.stderr, f"exit {done.returncode}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tests", nargs="*", default=DEFAULT_TESTS)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--burners", type=int, default=os.cpu_count() or 2, help="busy processes (default: one a core)")
    p.add_argument("--job", type=int, default=0, help="instead of the tests: this many runs of a user's 2-process job")
    p.add_argument("--model", default="default")
    a = p.parse_args()
    stop = mp.Event()
    burners = [mp.Process(target=_burn, args=(stop,), daemon=True) for _ in range(a.burners)]
    for b in burners:
        b.start()
    fails, aborts, rounds = Counter(), 0, a.job or a.rounds
    try:
        for i in range(1, rounds + 1):
            t0 = time.perf_counter()
            log = Path(tempfile.gettempdir()) / f"stress-round-{i}.log"
            failed, aborted, summary = _job_round(a.model) if a.job else _pytest_round(a.tests, log)
            fails.update(failed)
            aborts += aborted
            print(f"round {i}/{rounds}: {summary} ({time.perf_counter() - t0:.0f} s)"
                  + (" ABORT seen" if aborted else "") + "".join(f"\n  failed: {t}" for t in failed)
                  + (f"\n  output: {log}" if failed or aborted else ""), flush=True)
    finally:
        stop.set()
        for b in burners:
            b.join(5)
    print(f"\n{rounds} rounds with {a.burners} CPU burners: {sum(fails.values())} failures, {aborts} rounds with "
          f"an abort message")
    for test, n in fails.most_common():
        print(f"| {test} | failed {n} of {rounds} |")
    return 1 if fails or aborts else 0


if __name__ == "__main__":
    sys.exit(main())
