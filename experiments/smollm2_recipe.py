"""The real-model recipe (configs/smollm2_cpu.yaml: SmolLM2-135M-Instruct, two-digit sums through its chat template),
several seeds: held-out greedy accuracy against steps and against training seconds, one line per seed.

    python experiments/smollm2_recipe.py run    [--seeds 0,1,2] [--jobs 2] [--set bf16=true --name bf16]
    python experiments/smollm2_recipe.py report [--names fp32,bf16] [--out docs/real_model]

`run` trains one `gvpo train` per seed (one torch thread each, --jobs at a time) into runs/smollm2_recipe/<name>/s<seed>
and skips seeds whose summary.json exists; `report` writes <out>/recipe.png and prints a markdown table (accuracy at
each evaluation, mean and spread over seeds; seconds per step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path("runs/smollm2_recipe")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2_cpu.yaml"


def run(seeds: list[int], jobs: int, name: str, overrides: list[str]) -> None:
    def one(seed: int) -> None:
        out = ROOT / name / f"s{seed}"
        if (out / "summary.json").exists():
            print(f"{name} s{seed}: done already", flush=True)
            return
        cmd = [sys.executable, "-m", "gvpo.cli", "train", "--config", str(CONFIG), f"seed={seed}",
               f"output_dir={out}", "overwrite_output_dir=true", "progress_bar=false", *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        print(f"{name} s{seed}: exit {done.returncode}" + (f"\n{done.stderr[-2000:]}" if done.returncode else ""),
              flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, seeds))


def curves(folder: Path) -> tuple[list[tuple[int, float, float]], float]:
    """[(step, training seconds so far, accuracy)] at each evaluation, and the mean seconds per step."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    seconds, points, per_step = 0.0, [], []
    for r in rows:
        if "step_seconds" in r:
            seconds += r["step_seconds"]
            per_step.append(r["step_seconds"])
        if "eval_accuracy" in r:
            points.append((r["step"], seconds, r["eval_accuracy"]))
    return points, statistics.mean(per_step[1:] or per_step)


def report(names: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for color, name in zip(("tab:blue", "tab:orange", "tab:green", "tab:red"), names):
        runs = sorted((ROOT / name).glob("s*/metrics.jsonl"))
        if not runs:
            continue
        table = {}
        for i, path in enumerate(runs):
            points, step_s = curves(path.parent)
            label = name if i == 0 else None
            by_step.plot([p[0] for p in points], [p[2] for p in points], "o-", color=color, alpha=0.7, label=label)
            by_time.plot([p[1] for p in points], [p[2] for p in points], "o-", color=color, alpha=0.7, label=label)
            table[path.parent.name] = (points, step_s)
        steps = [p[0] for p in next(iter(table.values()))[0]]
        print(f"\n{name}: {len(table)} seeds ({', '.join(table)})\n")
        print("| step | " + " | ".join(table) + " | mean | min-max |\n|---" * 1 + "|---" * (len(table) + 2) + "|")
        for j, step in enumerate(steps):
            accs = [t[0][j][2] for t in table.values() if j < len(t[0])]
            print(f"| {step} | " + " | ".join(f"{a:.2f}" for a in accs)
                  + f" | {statistics.mean(accs):.3f} | {min(accs):.2f}-{max(accs):.2f} |")
        print(f"\nseconds per step (mean over seeds, first step dropped): "
              f"{statistics.mean(t[1] for t in table.values()):.1f}")
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel("training seconds (one core; evaluation not counted)")
    by_step.set_ylabel("held-out greedy accuracy (100 prompts)")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_step.legend()
    fig.suptitle("SmolLM2-135M-Instruct (Q4_1 GGUF), gvpo train, configs/smollm2_cpu.yaml: one line per seed")
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / "recipe.png", dpi=110)
    print(f"\nplot: {out / 'recipe.png'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("run", "report"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--name", default="fp32", help="run folder under runs/smollm2_recipe")
    p.add_argument("--set", action="append", default=[], help="key=value config overrides for `run`")
    p.add_argument("--names", default="fp32,bf16")
    p.add_argument("--out", default="docs/real_model")
    a = p.parse_args()
    if a.command == "run":
        run([int(s) for s in a.seeds.split(",")], a.jobs, a.name, a.set)
    else:
        report(a.names.split(","), Path(a.out))


if __name__ == "__main__":
    main()
