"""The paper's comparisons at small scale: Table 1 analogue, beta, k, and historical:current mixing.

    python experiments/ablations.py run    [--tasks arithmetic,arithmetic_hard] [--seeds 0,1,2] [--jobs 2]
    python experiments/ablations.py report [--out docs/reproduction]

`run` trains every configuration below for every task and seed (`gvpo train` in subprocesses, `--jobs` at a
time, one torch thread each), skipping runs whose summary.json exists, into runs/ablations/<task>/<name>/s<seed>.
`report` reads them back and writes Markdown tables and PNG plots (mean +/- std over seeds 0-2; where
gvpo, grpo and dr_grpo ran more seeds, Table 1 is repeated over all of them, paired by seed).

Regime (GUIDE, section 1): with one on-policy update per batch, beta only rescales the GVPO gradient, so every
run here makes 4 updates per batch (num_mini_batches = 4, as the authors' script); pi_theta' is the policy
that generated the batch. Every configuration spends the same number of completions per step (128):
k = 16 uses 8 prompts, k = 4 uses 32, and the h:c mixes hold 16 prompts x 8 responses, c of them fresh.
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from train_run import train_run

ROOT = Path("runs/ablations")
COMMON = {
    "max_steps": 25, "eval_steps": 10, "num_eval": 200, "save_steps": 0, "progress_bar": "false",
    "num_mini_batches": 4, "max_completion_length": 64,
}
COMPLETIONS_PER_STEP = 128


def configurations() -> dict[str, dict]:
    """name -> overrides. Shared points (gvpo, beta 0.1, k 8, 0:8) are one run, used by every table."""
    runs = {}
    for algo in ("gvpo", "grpo", "dr_grpo"):
        runs[algo] = {"algorithm": algo}
    # Isolation: GVPO's loss is ~50x larger than Dr. GRPO's, so grad-norm clipping at 1.0 is active on most of
    # its updates (never on the baselines'); this run switches clipping off.
    runs["gvpo_noclip"] = {"algorithm": "gvpo", "max_grad_norm": 0}
    # Isolation: with one update per batch GVPO's gradient is Dr. GRPO's up to a scale (R_theta = 0, ratio = 1),
    # so a gap that survives here is not about the multi-update regime.
    for algo in ("gvpo", "dr_grpo"):
        runs[f"{algo}_1update"] = {"algorithm": algo, "num_mini_batches": 1}
    for beta in (0.01, 0.05, 0.2, 0.5):
        runs[f"gvpo_beta{beta}"] = {"algorithm": "gvpo", "beta": beta}
    for k in (2, 4, 16, 32):
        for algo in ("gvpo", "grpo"):
            runs[f"{algo}_k{k}"] = {"algorithm": algo, "num_generations": k,
                                    "prompts_per_step": COMPLETIONS_PER_STEP // k}
    for h in (2, 4):
        for algo in ("gvpo", "grpo"):
            # Prompts must recur for history to exist: 128 training prompts, 16 per step -> every 8 steps.
            runs[f"{algo}_mix{h}"] = {"algorithm": algo, "num_historical": h, "num_train": 128,
                                      "max_staleness": 16}
    for algo in ("gvpo", "grpo"):  # the 0:8 point of the mixing table on the same 128 prompts
        runs[f"{algo}_mix0"] = {"algorithm": algo, "num_train": 128}
    return runs


def base_overrides(name: str, overrides: dict) -> dict:
    out = dict(COMMON)
    k = overrides.get("num_generations", 8)
    out["prompts_per_step"] = COMPLETIONS_PER_STEP // 8 if "num_historical" in overrides or "mix" in name \
        else COMPLETIONS_PER_STEP // k
    out.update(overrides)
    return out


def _one(task: str, name: str, seed: int, overrides: dict) -> str:
    out = ROOT / task / name / f"s{seed}"
    if (out / "summary.json").exists():
        return f"skip {out}"
    # A folder without summary.json holds an unfinished run: start it again from scratch.
    settings = {**base_overrides(name, overrides), "task": task, "seed": seed, "output_dir": str(out),
                "overwrite_output_dir": True}
    return train_run(settings, out)


def run(tasks, seeds, jobs, only=None):
    configs = configurations()
    todo = [(t, n, s, o) for t in tasks for s in seeds for n, o in configs.items() if not only or n in only]
    print(f"{len(todo)} runs, {jobs} at a time", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        for line in pool.map(lambda a: _one(*a), todo):
            print(line, flush=True)


# --------------------------------------------------------------------------------------------------
# Report


def _load(task, name, seeds=None):
    """The finished runs of one configuration: those of `seeds` (default: the report's seeds)."""
    seeds = SEEDS if seeds is None else seeds
    out = []
    for d in sorted((ROOT / task / name).glob("s*")):
        if (d / "summary.json").exists() and (seeds == "all" or int(d.name[1:]) in seeds):
            rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
            out.append({"seed": int(d.name[1:]), "summary": json.loads((d / "summary.json").read_text()),
                        "metrics": rows})
    return out


SEEDS = (0, 1, 2)  # the seeds every table reports (so that all configurations compare over the same seeds)


def _paired(task) -> list[str]:
    """Table (a) over every seed that all three algorithms ran, with GVPO's paired difference to each."""
    finals = {n: {r["seed"]: r["summary"]["final_accuracy"] for r in _load(task, n, "all")}
              for n in ("gvpo", "grpo", "dr_grpo")}
    seeds = sorted(set.intersection(*(set(v) for v in finals.values())))
    if len(seeds) <= len(SEEDS):
        return []
    lines = [f"(a') Table 1 analogue over all {len(seeds)} seeds that ran it ({seeds[0]}-{seeds[-1]}); GVPO minus "
             "the other algorithm on the same seed (same base model and held-out set), mean ± standard error", "",
             "| | accuracy | GVPO minus it | seeds GVPO is ahead |", "|---|---|---|---|"]
    for name, label in (("grpo", "+GRPO"), ("dr_grpo", "+Dr. GRPO"), ("gvpo", "+GVPO")):
        values = [finals[name][s] for s in seeds]
        diff = [finals["gvpo"][s] - finals[name][s] for s in seeds]
        paired = "" if name == "gvpo" else (f"{100 * statistics.mean(diff):+.1f} ± "
                                            f"{100 * statistics.stdev(diff) / len(diff) ** 0.5:.1f}")
        ahead = "" if name == "gvpo" else f"{sum(d > 0 for d in diff)} of {len(diff)}"
        lines.append(f"| {label} | {_stat(values)} | {paired} | {ahead} |")
    return lines + [""]


def _stat(values):
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def _final(runs):
    return [r["summary"]["final_accuracy"] for r in runs]


ISOLATION = (  # (label, configuration, baseline it is compared with on the same seeds)
    ("GVPO without grad-norm clipping vs GVPO", "gvpo_noclip", "gvpo"),
    ("GVPO vs Dr. GRPO, 1 update per batch", "gvpo_1update", "dr_grpo_1update"),
    ("GVPO beta 0.5 vs GRPO (4 updates)", "gvpo_beta0.5", "grpo"),
    ("GVPO beta 0.5 vs GVPO beta 0.1", "gvpo_beta0.5", "gvpo"),
)


def _isolation(task) -> list[str]:
    """Paired-by-seed comparisons that probe where a gap between GVPO and the baselines comes from."""
    rows = []
    for label, name, base in ISOLATION:
        a = {r["seed"]: r["summary"]["final_accuracy"] for r in _load(task, name, "all")}
        b = {r["seed"]: r["summary"]["final_accuracy"] for r in _load(task, base, "all")}
        seeds = sorted(set(a) & set(b))
        if len(seeds) < 2:
            continue
        diff = [a[s] - b[s] for s in seeds]
        rows.append(f"| {label} | {_stat([a[s] for s in seeds])} | {_stat([b[s] for s in seeds])} | "
                    f"{100 * statistics.mean(diff):+.1f} ± {100 * statistics.stdev(diff) / len(diff) ** 0.5:.1f} | "
                    f"{sum(d > 0 for d in diff)} of {len(diff)} |")
    if not rows:
        return []
    return ["(e) Isolating the gap: paired by seed over every seed both ran, difference mean ± standard error", "",
            "| comparison | first | second | first minus second | seeds first is ahead |",
            "|---|---|---|---|---|", *rows, ""]


def report(tasks, out_dir: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for task in tasks:
        lines += [f"### Task `{task}`", ""]
        base = [r["summary"]["initial_accuracy"] for r in _load(task, "gvpo")]
        lines += ["(a) Table 1 analogue: held-out greedy accuracy (%) after 25 steps, mean ± std over seeds", "",
                  "| | accuracy | wall s / run |", "|---|---|---|", f"| base | {_stat(base)} | |"]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name, label in (("grpo", "+GRPO"), ("dr_grpo", "+Dr. GRPO"), ("gvpo", "+GVPO")):
            runs = _load(task, name)
            wall = statistics.mean(r["summary"]["wall_seconds"] for r in runs) if runs else 0
            lines.append(f"| {label} | {_stat(_final(runs))} | {wall:.0f} |")
            _curve(ax, runs, label)
        _finish(ax, fig, f"{task}: held-out accuracy", out_dir / f"{task}_table1.png")
        lines += ["", f"![]({task}_table1.png)", ""]
        lines += _paired(task)
        lines += _isolation(task)

        lines += ["(b) beta (GVPO, 4 updates per batch)", "", "| beta | accuracy |", "|---|---|"]
        betas = [(0.01, "gvpo_beta0.01"), (0.05, "gvpo_beta0.05"), (0.1, "gvpo"), (0.2, "gvpo_beta0.2"),
                 (0.5, "gvpo_beta0.5")]
        lines += [f"| {b} | {_stat(_final(_load(task, n)))} |" for b, n in betas]
        _bars(plt, [str(b) for b, _ in betas], {"gvpo": [_final(_load(task, n)) for _, n in betas]}, "beta",
              f"{task}: beta", out_dir / f"{task}_beta.png")
        lines += ["", f"![]({task}_beta.png)", ""]

        lines += ["(c) k (128 fresh completions per step)", "", "| k | GVPO | GRPO |", "|---|---|---|"]
        ks = (2, 4, 8, 16, 32)
        by_k = {a: [_final(_load(task, a if k == 8 else f"{a}_k{k}")) for k in ks] for a in ("gvpo", "grpo")}
        lines += [f"| {k} | {_stat(g)} | {_stat(r)} |" for k, g, r in zip(ks, by_k["gvpo"], by_k["grpo"])]
        _bars(plt, [str(k) for k in ks], by_k, "k", f"{task}: group size", out_dir / f"{task}_k.png")
        lines += ["", f"![]({task}_k.png)", ""]

        lines += ["(d) historical:current (128 training prompts, each seen every 8 steps)", "",
                  "| h:c | GVPO | GRPO |", "|---|---|---|"]
        mixes = ((0, "0:8"), (2, "2:6"), (4, "4:4"))
        by_m = {a: [_final(_load(task, f"{a}_mix{h}")) for h, _ in mixes] for a in ("gvpo", "grpo")}
        lines += [f"| {m} | {_stat(g)} | {_stat(r)} |" for (_, m), g, r in zip(mixes, by_m["gvpo"], by_m["grpo"])]
        _bars(plt, [m for _, m in mixes], by_m, "historical:current", f"{task}: replay mix", out_dir / f"{task}_mix.png")
        lines += ["", f"![]({task}_mix.png)", ""]
    (out_dir / "tables.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _curve(ax, runs, label):
    if not runs:
        return
    points = {}
    for r in runs:
        for m in r["metrics"]:
            if m.get("eval_accuracy") is not None:
                points.setdefault(m["step"], []).append(m["eval_accuracy"])
    steps = sorted(points)
    mean = [statistics.mean(points[s]) for s in steps]
    ax.plot(steps, mean, marker="o", label=label)


def _finish(ax, fig, title, path):
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _bars(plt, labels, series: dict, xlabel, title, path):
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.8 / len(series)
    for j, (name, groups) in enumerate(series.items()):
        xs = [i + j * width for i in range(len(labels))]
        means = [statistics.mean(g) if g else 0 for g in groups]
        errs = [statistics.stdev(g) if len(g) > 1 else 0 for g in groups]
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))], labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final held-out accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("run", "report"))
    p.add_argument("--tasks", default="arithmetic,arithmetic_hard")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated configuration names")
    p.add_argument("--out", default="docs/reproduction")
    a = p.parse_args()
    tasks = a.tasks.split(",")
    if a.command == "run":
        run(tasks, [int(s) for s in a.seeds.split(",")], a.jobs, set(filter(None, a.only.split(","))))
    else:
        report(tasks, Path(a.out))


if __name__ == "__main__":
    main()
