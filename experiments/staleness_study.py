"""How stale may GVPO's data be? The frontier past eta = 8, fully off-policy data, mixed versions, and peers.

    python experiments/staleness_study.py run    [--seeds 0,1,2] [--tasks arithmetic] [--cases lag0,...] [--jobs 2]
    python experiments/staleness_study.py report [--out docs/staleness]

The setup of experiments/async_study.py (docs/async.md) pushed further: the embedded model, one optimizer update
per generated batch, lr 1e-4, k = 8, 8 prompts per step (16 in docs/async.md: halved for the 2-core
budget of 3 seeds x 6 lags x 7 methods), temperature 1, held-out greedy accuracy on 200
problems, with an exact, deterministic lag (``simulated_policy_lag`` = eta: step s trains on the batch the
policy of version s - 1 - eta generated; gvpo.lag). Each run is ``gvpo train`` in a subprocess with one thread.

Cases (one directory each under runs/staleness/<task>/<case>/<method>/s<seed>):
- lag<eta>, eta in {0, 8, 16, 32, 64, 128}: max(150, 3 eta) updates, so most of them are at full lag.
- offline: every training batch generated before training by the initial model (simulated_policy_lag = the
  number of updates: the first request generates them all), then 150 updates on them in order: training on a
  fixed log of k responses per prompt with rewards, as offline RL or another team's logs.
- mixed: groups whose responses come from several past versions at once: a replay buffer (replay.num_historical
  4 of k = 8, max_staleness 40) over a training set of 80 prompts, so a prompt recurs every 10 steps and its
  group holds 4 fresh responses and 4 from up to four versions 10-40 updates old. Its reference, ``mixed_fresh``,
  is the same 80-prompt training set with no replay (the small set alone changes accuracy).

Methods: GVPO with pi_theta' = the behaviour policy (each row's sampler, no ratio) at beta 0.1, 0.5, 1 and 2;
GRPO with the token ratio against the behaviour log-probs, clipped (verl / AReaL); GRPO with no correction
(ratio against the learner's start-of-step weights); A*-PO (a ratio-free peer, docs/peers.md: regression of
beta2 log(pi_theta / pi_initial) onto R - V, V the soft value of the group's other responses); OAPL (the same
regression anchored at each group's sampler, V from its whole group, beta1 = 1 as its paper).
At eta = 0 GRPO corrected and uncorrected are the same run bit for bit (tests/test_lag.py), so one stands for both.
``run`` skips runs whose summary.json exists; ``report`` writes tables.md, frontier.png and frontier.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from train_run import train_run

ROOT = Path("runs/staleness")
STEPS = 150
COMMON = {"eval_steps": 50, "num_eval": 200, "save_steps": 0, "progress_bar": "false", "learning_rate": 1e-4,
          "num_mini_batches": 1, "num_iterations": 1, "prompts_per_step": 8, "num_generations": 8}
TASKS = {"arithmetic": {}, "arithmetic_hard": {"task": "arithmetic_hard", "max_completion_length": 56}}
METHODS = {
    "gvpo_b0.1": {"algorithm": "gvpo", "old_policy": "behaviour", "beta": 0.1},
    "gvpo_b0.5": {"algorithm": "gvpo", "old_policy": "behaviour", "beta": 0.5},
    "gvpo_b1": {"algorithm": "gvpo", "old_policy": "behaviour", "beta": 1.0},
    "gvpo_b2": {"algorithm": "gvpo", "old_policy": "behaviour", "beta": 2.0},
    "grpo_clipped": {"algorithm": "grpo", "off_policy_correction": "behaviour"},
    "grpo_uncorrected": {"algorithm": "grpo", "off_policy_correction": "none"},
    "astar_po": {"algorithm": "astar_po"},
    "oapl": {"algorithm": "oapl", "beta1": 1.0},  # the paper's beta1 (docs/peers.md); anchored at the sampler
    # The paper's beta2 = 1e-3 goes with its lr 1e-6 and gradient clip 1e-3; at this study's lr 1e-4 the regression
    # target (R - V) / beta2 of hundreds of nats is never reached. beta1 = beta2 = 0.5 is the KL-regularised
    # optimum at GVPO's stale beta: the same anchor strength, a fair comparison.
    "oapl_b0.5": {"algorithm": "oapl", "beta1": 0.5, "beta2": 0.5},
}
LABELS = {"gvpo_b0.1": "GVPO β 0.1", "gvpo_b0.5": "GVPO β 0.5", "gvpo_b1": "GVPO β 1", "gvpo_b2": "GVPO β 2",
          "grpo_clipped": "GRPO, clipped ratio vs behaviour", "grpo_uncorrected": "GRPO, no correction",
          "astar_po": "A*-PO (ratio-free peer), β2 1e-3",
          "oapl": "OAPL (ratio-free peer), β1 1, β2 1e-3", "oapl_b0.5": "OAPL, β1 = β2 = 0.5"}
LAGS = (0, 8, 16, 32, 64, 128)
MIXED = {"num_train": 80, "num_historical": 4, "max_staleness": 40}


def case_settings(case: str) -> dict:
    if case.startswith("lag"):
        lag = int(case[3:])
        return {"simulated_policy_lag": lag, "max_steps": max(STEPS, 3 * lag)}
    if case == "offline":
        return {"simulated_policy_lag": STEPS, "max_steps": STEPS}
    if case == "mixed":
        return {**MIXED, "max_steps": STEPS}
    if case == "mixed_fresh":
        return {"num_train": MIXED["num_train"], "max_steps": STEPS}
    raise ValueError(f"case={case!r}: lag<eta>, offline, mixed or mixed_fresh")


CASES = [f"lag{lag}" for lag in LAGS] + ["offline", "mixed", "mixed_fresh"]


def run_dir(task: str, case: str, method: str, seed: int) -> Path:
    if case in ("lag0", "mixed_fresh") and method == "grpo_uncorrected":
        method = "grpo_clipped"  # fresh groups: the two GRPO variants are the same run
    return ROOT / task / case / method / f"s{seed}"


def _one(task: str, case: str, method: str, seed: int) -> str:
    out = run_dir(task, case, method, seed)
    if (out / "summary.json").exists():
        return f"skip {out}"
    settings = {**COMMON, **TASKS[task], **METHODS[method], **case_settings(case), "seed": seed, "output_dir": str(out)}
    return train_run(settings, out)


def todo(tasks, cases, seeds, methods) -> list[tuple]:
    """Seed-major (a partial sweep still pairs by seed), each seed's cases in the order given."""
    items, seen = [], set()
    for task in tasks:
        for seed in seeds:
            for case in cases:
                for method in methods:
                    key = run_dir(task, case, method, seed)
                    if key not in seen:
                        seen.add(key)
                        items.append((task, case, method, seed))
    return items


def run(tasks, cases, seeds, methods, jobs):
    items = todo(tasks, cases, seeds, methods)
    # Longest first inside the list would pack better, but seed-major order keeps partial results paired.
    print(f"{len(items)} runs, {jobs} at a time", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        for line in pool.map(lambda a: _one(*a), items):
            print(line, flush=True)


# --------------------------------------------------------------------------------------------------
# Report


def _runs(task, case, method) -> dict[int, dict]:
    out = {}
    base = run_dir(task, case, method, 0).parent
    for d in sorted(base.glob("s*")):
        if (d / "summary.json").exists():
            rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
            out[int(d.name[1:])] = {"summary": json.loads((d / "summary.json").read_text()), "metrics": rows}
    return out


def _score(run) -> float:
    """Mean of the last three evaluations (the final 100 updates for 150-update runs): less evaluation noise
    than the final one alone, and an oscillating run is not judged by its phase at the last step."""
    evals = [m["eval_accuracy"] for m in run["metrics"] if m.get("eval_accuracy") is not None and m["step"] > 0]
    return statistics.mean(evals[-3:])


def _kl(run, skip) -> float | None:
    values = [m["kl_behaviour_current"] for m in run["metrics"]
              if m.get("kl_behaviour_current") is not None and m["step"] > skip]
    return statistics.mean(values) if values else None


def _cell(values) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f} [1]"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f} [{len(values)}]"


def _drop(scores: dict, zero: dict) -> float | None:
    """Mean drop in points against the method's own eta = 0, paired by seed."""
    seeds = sorted(set(scores) & set(zero))
    return statistics.mean(100 * (zero[s] - scores[s]) for s in seeds) if seeds else None


def _drop_cell(scores: dict, zero: dict) -> str:
    """The paired drop with its standard error over seeds (the noise a 2-point criterion must be read against)."""
    seeds = sorted(set(scores) & set(zero))
    if not seeds:
        return "-"
    d = [100 * (zero[s] - scores[s]) for s in seeds]
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
    return f"{statistics.mean(d):+.1f} ± {se:.1f}"


def frontier(scores_by_lag: dict[int, dict], tolerance: float = 2.0) -> int | None:
    """The largest eta up to which every measured eta stays within ``tolerance`` points of eta = 0 (None when
    eta = 0 was not measured)."""
    zero = scores_by_lag.get(0)
    if not zero:
        return None
    held = 0
    for lag in sorted(scores_by_lag):
        drop = _drop(scores_by_lag[lag], zero)
        if drop is None:
            continue
        if drop > tolerance:
            break
        held = lag
    return held


def report(out_dir: Path, tasks):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    lines, summary = [], {}
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        data = {(c, m): _runs(task, c, m) for c in CASES for m in METHODS}
        scores = {k: {s: _score(r) for s, r in v.items()} for k, v in data.items()}
        header = "| method | " + " | ".join(f"η = {lag}" for lag in LAGS) + " | holds to η (2 points) |"
        lines += [f"### {task}: held-out greedy accuracy (%), mean of the last three evaluations, mean ± std over "
                  "seeds [runs]", "", header, "|---" * (len(LAGS) + 2) + "|"]
        summary[task] = {}
        for color, m in enumerate(METHODS):  # one colour per method in every panel
            by_lag = {lag: scores[f"lag{lag}", m] for lag in LAGS if scores[f"lag{lag}", m]}
            held = frontier(by_lag)
            summary[task][m] = {"frontier": held, **{f"lag{lag}": list(v.values()) for lag, v in by_lag.items()}}
            lines.append(f"| {LABELS[m]} | " + " | ".join(_cell(list(scores[f'lag{lag}', m].values())) for lag in LAGS)
                         + f" | {held if held is not None else '-'} |")
            xs = [lag for lag in LAGS if scores[f"lag{lag}", m]]
            if xs:
                means = [statistics.mean(scores[f"lag{lag}", m].values()) for lag in xs]
                spread = [statistics.stdev(scores[f"lag{lag}", m].values()) if len(scores[f"lag{lag}", m]) > 1 else 0
                          for lag in xs]
                ax.errorbar([max(lag, 1) for lag in xs], [100 * v for v in means], yerr=[100 * v for v in spread],
                            marker="o", capsize=3, label=LABELS[m], color=f"C{color}")
        base = sorted({r["summary"]["initial_accuracy"] for v in data.values() for r in v.values()})
        lines += ["", f"Base model held-out accuracy per seed: {', '.join(f'{100 * b:.1f}' for b in base)}. "
                  "η = 0 is drawn at 1 on the log axis.", ""]

        lines += [f"### {task}: drop against the method's own η = 0, points, paired by seed, mean ± standard error "
                  "(positive = worse)", "",
                  "| method | " + " | ".join(f"η = {lag}" for lag in LAGS[1:]) + " | offline | mixed vs mixed_fresh |",
                  "|---" * (len(LAGS) + 2) + "|"]
        for m in METHODS:
            zero = scores["lag0", m]
            cells = [_drop_cell(scores[f"lag{lag}", m], zero) for lag in LAGS[1:]]
            cells += [_drop_cell(scores["offline", m], zero), _drop_cell(scores["mixed", m], scores["mixed_fresh", m])]
            lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")

        lines += ["", f"### {task}: fully off-policy and mixed-version groups, accuracy (%)", "",
                  "| method | offline (all data from the initial model) | mixed (replay, 4 of 8 from 10-40 updates ago) "
                  "| mixed_fresh (same 80 prompts, no replay) |", "|---|---|---|---|"]
        for m in METHODS:
            lines.append(f"| {LABELS[m]} | " + " | ".join(_cell(list(scores[c, m].values()))
                                                          for c in ("offline", "mixed", "mixed_fresh")) + " |")

        lines += ["", f"### {task}: KL(π_behaviour ‖ π_current) per token on the trained batch (k1 estimate), mean "
                  "over updates after the warm-up and seeds", "",
                  "| method | " + " | ".join(f"η = {lag}" for lag in LAGS[1:]) + " | offline |",
                  "|---" * (len(LAGS) + 1) + "|"]
        for m in METHODS:
            cells = []
            for case, skip in [(f"lag{lag}", lag) for lag in LAGS[1:]] + [("offline", 0)]:
                kls = [k for k in (_kl(r, skip) for r in data[case, m].values()) if k is not None]
                cells.append(f"{statistics.mean(kls):.4f}" if kls else "-")
            lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
        lines.append("")

        ax.set_xscale("log", base=2)
        ax.set_xticks([max(lag, 1) for lag in LAGS], [str(lag) for lag in LAGS])
        ax.set_xlabel("policy lag η (updates between generating and training)")
        ax.set_ylabel("held-out accuracy (%), last 3 evaluations")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "frontier.png", dpi=90)
    plt.close(fig)
    lines += ["![](staleness/frontier.png)", ""]
    (out_dir / "tables.md").write_text("\n".join(lines) + "\n")
    (out_dir / "frontier.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("run", "report"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tasks", default="arithmetic")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="docs/staleness")
    a = p.parse_args()
    tasks = a.tasks.split(",")
    if a.command == "run":
        run(tasks, a.cases.split(","), [int(s) for s in a.seeds.split(",")], a.methods.split(","), a.jobs)
    else:
        report(Path(a.out), tasks)


if __name__ == "__main__":
    main()
