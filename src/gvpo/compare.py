"""`gvpo compare RUN_DIR ...`: one plot and one table of several runs' metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path

from gvpo.tracking import read_metrics


def load_run(run_dir) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl; pass the output_dir of a `gvpo train` run")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return {"name": run_dir.name, "metrics": read_metrics(run_dir), "summary": summary}


def default_output(run_dirs) -> Path:
    """``compare-<run names>.png`` next to the runs (in their common parent folder), not in the working directory."""
    parents = [str(Path(d).resolve().parent) for d in run_dirs]
    names = "-".join(Path(d).resolve().name for d in run_dirs)[:120]
    return Path(os.path.commonpath(parents)) / f"compare-{names}.png"


def compare_runs(run_dirs, output=None, metric="eval_accuracy") -> str:
    """Plot ``metric`` against step for each run into ``output`` (default: :func:`default_output`) and return
    a Markdown table of the runs, followed by the plot's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(d) for d in run_dirs]
    output = Path(output) if output is not None else default_output(run_dirs)
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        points = [(r["step"], r[metric]) for r in run["metrics"] if r.get(metric) is not None]
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=run["name"])
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)

    lines = ["| run | algorithm | initial acc | final acc | steps | wall s | mean reward (last 10 steps) |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        s = run["summary"]
        rewards = [r["reward_mean"] for r in run["metrics"] if r.get("reward_mean") is not None][-10:]
        mean = sum(rewards) / len(rewards) if rewards else None
        lines.append(f"| {run['name']} | {s.get('algorithm', '?')} | {_fmt(s.get('initial_accuracy'))} | "
                     f"{_fmt(s.get('final_accuracy'))} | {s.get('steps', '?')} | {_fmt(s.get('wall_seconds'), 0)} | "
                     f"{_fmt(mean)} |")
    return "\n".join(lines) + f"\n\nplot: {output}"


def _fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"
