"""A minimal test runner for the GPU check on machines without pytest: runs every ``test_*`` function of one
test file, passing ``device`` (--device) and ``tmp_path`` (a fresh folder) by parameter name; a test that
raises ``unittest.SkipTest`` is skipped. Writes a JUnit XML report that scripts/gpu_check.py reads, as
pytest's --junitxml would.

    python scripts/gpu_check_tests.py tests/test_gpu.py --device cuda --junitxml report.xml
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
import tempfile
import time
import traceback
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path


def run_file(path: str, device: str) -> list[dict]:
    """[{name, outcome: passed | failed | skipped, message, seconds}] for the file's test functions, in order."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(Path(path).parent))
    spec.loader.exec_module(module)
    tests = [(n, f) for n, f in vars(module).items() if n.startswith("test_") and inspect.isfunction(f)]
    results = []
    for name, func in tests:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            known = {"device": device, "tmp_path": Path(tmp)}
            wanted = inspect.signature(func).parameters
            missing = [p for p in wanted if p not in known]
            try:
                if missing:
                    raise TypeError(f"the built-in runner has no fixture {missing}: run this file with pytest")
                func(**{p: known[p] for p in wanted})
                outcome, message = "passed", ""
            except unittest.SkipTest as e:
                outcome, message = "skipped", str(e)
            except Exception:  # noqa: BLE001 - a failing test is a result, not a crash of the runner
                outcome, message = "failed", traceback.format_exc()
        results.append({"name": name, "outcome": outcome, "message": message,
                        "seconds": time.perf_counter() - start})
        print(f"{name}[{device}] {outcome.upper()} ({results[-1]['seconds']:.1f} s)", flush=True)
        if outcome == "failed":
            print(message, flush=True)
    return results


def write_junit(results: list[dict], classname: str, path: Path) -> None:
    suite = ET.Element("testsuite", name="gpu_check", tests=str(len(results)))
    for r in results:
        case = ET.SubElement(suite, "testcase", classname=classname, name=r["name"], time=f"{r['seconds']:.3f}")
        if r["outcome"] == "failed":
            ET.SubElement(case, "failure", message=r["message"].strip().splitlines()[-1][:300]).text = r["message"]
        elif r["outcome"] == "skipped":
            ET.SubElement(case, "skipped", message=r["message"])
    root = ET.Element("testsuites")
    root.append(suite)
    ET.ElementTree(root).write(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file")
    p.add_argument("--device", default="cuda")
    p.add_argument("--junitxml", default=None)
    a = p.parse_args(argv)
    results = run_file(a.file, a.device)
    if a.junitxml:
        write_junit(results, Path(a.file).stem, Path(a.junitxml))
    counts = {o: sum(r["outcome"] == o for r in results) for o in ("passed", "failed", "skipped")}
    print(", ".join(f"{v} {k}" for k, v in counts.items()))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
