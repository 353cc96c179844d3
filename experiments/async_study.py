"""Does GVPO without importance sampling tolerate stale groups? The statistics of async RL, without the timing.

    python experiments/async_study.py run    [--seeds 0,1,2] [--lags 0,1,2,4,8] [--jobs 2] [--only NAME,...]
    python experiments/async_study.py report [--out docs/async]

Every run trains the embedded model on the default arithmetic task with `training.simulated_policy_lag` = eta
(gvpo.lag: step s trains on the batch generated eta policy versions earlier; the first eta steps on lags
0..eta-1), one optimizer update per batch at lr 1e-4 with k = 8 (the regime of the GUIDE's calibration), but
16 prompts per step (not 32) and 40 steps (not 150): the budget of a shared 2-core machine. Held-out greedy
accuracy on 200 problems every 10 steps. `run` skips runs whose
summary.json exists (runs/async_study/<config>/lag<eta>/s<seed>); `report` writes tables.md and PNGs.

Configurations (GUIDE section 1: with pi_theta' = the sampler and fresh groups R_theta = 0, so beta only acts
on stale groups here, through R_theta = beta log(pi_theta / pi_behaviour)):
- gvpo_behaviour (beta 0.1) and gvpo_behaviour_b0.5: pi_theta' = the policy that generated the group, no ratio;
- gvpo_previous: pi_theta' = the learner's weights at the start of the step (ignores staleness), no ratio;
- grpo_corrected: GRPO's clipped token ratio against the behaviour log-probs (verl / AReaL style);
- grpo_uncorrected: the ratio against the learner's start-of-step weights (ignores staleness).
At lag 0 grpo_uncorrected is grpo_corrected bit for bit (tests/test_lag.py), and gvpo_behaviour is
gvpo_previous up to the rollout engine's numerics (behaviour vs teacher-forced log-probs, within 1e-5), so each pair is
one run there.
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from train_run import train_run

ROOT = Path("runs/async_study")
COMMON = {"max_steps": 40, "eval_steps": 10, "num_eval": 200, "save_steps": 0, "progress_bar": "false",
          "learning_rate": 1e-4, "num_mini_batches": 1, "num_iterations": 1, "prompts_per_step": 16,
          "num_generations": 8}
CONFIGS = {
    "gvpo_behaviour": {"algorithm": "gvpo", "old_policy": "behaviour", "beta": 0.1},
    "gvpo_previous": {"algorithm": "gvpo", "old_policy": "previous", "beta": 0.1},
    "grpo_corrected": {"algorithm": "grpo", "off_policy_correction": "behaviour"},
    "grpo_uncorrected": {"algorithm": "grpo", "off_policy_correction": "none"},
    "gvpo_behaviour_b0.5": {"algorithm": "gvpo", "old_policy": "behaviour", "beta": 0.5},
}
LABELS = {"gvpo_behaviour": "GVPO, π_θ' = behaviour, β 0.1", "gvpo_behaviour_b0.5": "GVPO, π_θ' = behaviour, β 0.5",
          "gvpo_previous": "GVPO, π_θ' = previous (current)", "grpo_corrected": "GRPO, ratio vs behaviour (clipped)",
          "grpo_uncorrected": "GRPO, no correction"}
OPTIONAL = ("gvpo_behaviour_b0.5",)  # the GUIDE's calibration suggests beta 0.5; run if the budget allows
LAGS = (0, 1, 2, 4, 8)
SAMPLES_PER_STEP = 16 * 8


def canonical(name: str, lag: int) -> str:
    """At lag 0 one run stands for both members of a pair that coincide there (see the docstring)."""
    return {"grpo_uncorrected": "grpo_corrected", "gvpo_behaviour": "gvpo_previous"}.get(name, name) if lag == 0 \
        else name


def run_dir(name: str, lag: int, seed: int) -> Path:
    return ROOT / canonical(name, lag) / f"lag{lag}" / f"s{seed}"


def _one(name: str, lag: int, seed: int) -> str:
    out = run_dir(name, lag, seed)
    if (out / "summary.json").exists():
        return f"skip {out}"
    settings = {**COMMON, **CONFIGS[name], "simulated_policy_lag": lag, "seed": seed, "output_dir": str(out)}
    return train_run(settings, out)


def todo(seeds, lags, only=None) -> list[tuple]:
    """Seed by seed (a partial sweep still pairs by seed); the optional beta 0.5 runs after all the others."""
    items, seen = [], set()
    for group in ([n for n in CONFIGS if n not in OPTIONAL], OPTIONAL):
        for seed in seeds:
            for name in group:
                for lag in lags:
                    key = run_dir(name, lag, seed)
                    if (only and name not in only) or key in seen:
                        continue
                    seen.add(key)
                    items.append((canonical(name, lag), lag, seed))
    return items


def run(seeds, lags, jobs, only=None):
    items = todo(seeds, lags, only)
    print(f"{len(items)} runs, {jobs} at a time", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        for line in pool.map(lambda a: _one(*a), items):
            print(line, flush=True)


# --------------------------------------------------------------------------------------------------
# Report


def _load(name, lag):
    out = {}
    base = run_dir(name, lag, 0).parent
    for d in sorted(base.glob("s*")):
        if (d / "summary.json").exists():
            rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
            out[int(d.name[1:])] = {"summary": json.loads((d / "summary.json").read_text()), "metrics": rows}
    return out


def _final(runs):
    return {s: r["summary"]["final_accuracy"] for s, r in runs.items()}


def _late(runs, last=3):
    """Mean of the last `last` evaluations (steps 20, 30, 40): less noisy than the final one alone."""
    out = {}
    for s, r in runs.items():
        evals = [m["eval_accuracy"] for m in r["metrics"] if m.get("eval_accuracy") is not None and m["step"] > 0]
        out[s] = statistics.mean(evals[-last:])
    return out


def _stat(values):
    values = list(values)
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def _paired(a: dict, b: dict) -> str:
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return "-"
    d = [a[s] - b[s] for s in seeds]
    return (f"{100 * statistics.mean(d):+.1f} ± {100 * statistics.stdev(d) / len(d) ** 0.5:.1f} "
            f"({sum(x > 0 for x in d)}/{len(d)})")


def _step_mean(runs, key, skip=0):
    values = [m[key] for r in runs.values() for m in r["metrics"] if m.get(key) is not None and m["step"] > skip]
    return statistics.mean(values) if values else float("nan")


def report(out_dir: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    data = {(n, lag): _load(n, lag) for n in CONFIGS for lag in LAGS}
    lines = ["(a) Held-out greedy accuracy (%) after 40 updates, mean ± std over seeds (runs per cell in brackets)",
             "", "| config | " + " | ".join(f"η = {lag}" for lag in LAGS) + " |", "|---" * (len(LAGS) + 1) + "|"]
    base = [r["summary"]["initial_accuracy"] for runs in data.values() for r in runs.values()]
    for n in CONFIGS:
        cells = [f"{_stat(_final(data[n, lag]).values())} [{len(data[n, lag])}]" for lag in LAGS]
        lines.append(f"| {LABELS[n]} | " + " | ".join(cells) + " |")
    bases = ", ".join(sorted({f"{100 * b:.1f}" for b in base}))
    lines += ["", f"Base model, per seed (the held-out set depends on the seed, hence pairing by seed): {bases}", ""]

    lines += ["(b) The same, mean of the last three evaluations (steps 20, 30, 40): less evaluation noise", "",
              "| config | " + " | ".join(f"η = {lag}" for lag in LAGS) + " |", "|---" * (len(LAGS) + 1) + "|"]
    for n in CONFIGS:
        lines.append(f"| {LABELS[n]} | " + " | ".join(_stat(_late(data[n, lag]).values()) for lag in LAGS) + " |")
    lines.append("")

    pairs = (("gvpo_behaviour", "grpo_uncorrected"), ("gvpo_behaviour", "grpo_corrected"),
             ("gvpo_behaviour_b0.5", "grpo_corrected"), ("gvpo_behaviour_b0.5", "gvpo_behaviour"),
             ("gvpo_behaviour", "gvpo_previous"), ("gvpo_previous", "grpo_uncorrected"))
    lines += ["(c) Paired by seed: first minus second, final accuracy, points, mean ± standard error "
              "(seeds where the first is ahead)", "",
              "| comparison | " + " | ".join(f"η = {lag}" for lag in LAGS) + " |", "|---" * (len(LAGS) + 1) + "|"]
    for a, b in pairs:
        lines.append(f"| {LABELS[a]} − {LABELS[b]} | " +
                     " | ".join(_paired(_final(data[a, lag]), _final(data[b, lag])) for lag in LAGS) + " |")
    lines += ["", "(d) Each config against itself at η = 0, paired by seed (final accuracy, points)", "",
              "| config | " + " | ".join(f"η = {lag}" for lag in LAGS[1:]) + " |", "|---" * len(LAGS) + "|"]
    for n in CONFIGS:
        zero = _final(data[n, 0])
        lines.append(f"| {LABELS[n]} | " + " | ".join(_paired(_final(data[n, lag]), zero) for lag in LAGS[1:]) + " |")
    lines += ["", "(d') The same on the mean of the last three evaluations (unstable runs oscillate, so their final "
              "accuracy depends on the phase at step 40)", "",
              "| config | " + " | ".join(f"η = {lag}" for lag in LAGS[1:]) + " |", "|---" * len(LAGS) + "|"]
    for n in CONFIGS:
        zero = _late(data[n, 0])
        lines.append(f"| {LABELS[n]} | " + " | ".join(_paired(_late(data[n, lag]), zero) for lag in LAGS[1:]) + " |")

    lines += ["", "(e) KL(π_behaviour ‖ π_current) per token on the trained batch (k1 estimate: mean over its tokens of "
              "behaviour − current log-probs, current = the learner at the start of the step), mean over steps > η "
              "and seeds", "", "| config | " + " | ".join(f"η = {lag}" for lag in LAGS) + " |",
              "|---" * (len(LAGS) + 1) + "|"]
    for n in CONFIGS:
        lines.append(f"| {LABELS[n]} | " + " | ".join(
            f"{_step_mean(data[n, lag], 'kl_behaviour_current', skip=lag):.4f}" for lag in LAGS) + " |")

    lines += ["", "(f) Seconds per step, mean over steps 2-40 and seeds (a shared, overloaded 2-core machine: "
              "ratios only)", "", "| config | η | generation s | rest of the step s (scoring + update) | generation share |",
              "|---|---|---|---|---|"]
    for n in CONFIGS:
        for lag in (0, 8):
            runs = data[n, lag]
            gen, step = _step_mean(runs, "generation_seconds", 1), _step_mean(runs, "step_seconds", 1)
            lines.append(f"| {LABELS[n]} | {lag} | {gen:.2f} | {step - gen:.2f} | {gen / step:.2f} |")

    _plot_curves(plt, data, out_dir / "async_curves.png")
    _plot_final(plt, data, out_dir / "async_final.png")
    _plot_kl(plt, data, out_dir / "async_kl.png")
    lines += ["", "![](async/async_final.png)", "", "![](async/async_kl.png)", "", "![](async/async_curves.png)", ""]
    (out_dir / "tables.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _curve(runs):
    points = {}
    for r in runs.values():
        for m in r["metrics"]:
            if m.get("eval_accuracy") is not None:
                points.setdefault(m["step"], []).append(m["eval_accuracy"])
    steps = sorted(points)
    return [s * SAMPLES_PER_STEP for s in steps], [statistics.mean(points[s]) for s in steps]


def _plot_curves(plt, data, path):
    fig, axes = plt.subplots(1, len(LAGS), figsize=(3.2 * len(LAGS), 3.4), sharey=True)
    for ax, lag in zip(axes, LAGS):
        for n in CONFIGS:
            if data[n, lag]:
                xs, ys = _curve(data[n, lag])
                ax.plot(xs, ys, marker=".", label=LABELS[n])
        ax.set_title(f"η = {lag}")
        ax.set_xlabel("trained completions")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy (mean over seeds)")
    axes[0].legend(fontsize=6, loc="lower right")
    _save(plt, fig, path)


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _finish(plt, fig, ax, path):
    """The final-accuracy plots' common y axis, grid and legend, then save."""
    ax.set_ylabel("held-out accuracy after 40 updates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(plt, fig, path)


def _plot_final(plt, data, path):
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for j, n in enumerate(CONFIGS):
        xs, ys, es = [], [], []
        for i, lag in enumerate(LAGS):
            v = list(_final(data[n, lag]).values())
            if v:
                xs.append(i + (j - 2) * 0.06)
                ys.append(statistics.mean(v))
                es.append(statistics.stdev(v) if len(v) > 1 else 0)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=LABELS[n])
    ax.set_xticks(range(len(LAGS)), [str(lag) for lag in LAGS])
    ax.set_xlabel("policy lag η (versions between generating and training)")
    _finish(plt, fig, ax, path)


def _plot_kl(plt, data, path):
    """Final accuracy against the measured staleness in distribution terms (one point per config and lag > 0)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for n in CONFIGS:
        points = [(_step_mean(data[n, lag], "kl_behaviour_current", skip=lag),
                   statistics.mean(_final(data[n, lag]).values())) for lag in LAGS[1:] if data[n, lag]]
        if points:
            ax.plot(*zip(*points), marker="o", label=LABELS[n])
            for (x, y), lag in zip(points, LAGS[1:]):
                ax.annotate(f"η{lag}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("KL(π_behaviour ‖ π_current) per token on the trained batch")
    _finish(plt, fig, ax, path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("run", "report"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lags", default=",".join(map(str, LAGS)))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated configuration names")
    p.add_argument("--out", default="docs/async")
    a = p.parse_args()
    if a.command == "run":
        run([int(s) for s in a.seeds.split(",")], [int(x) for x in a.lags.split(",")], a.jobs,
            set(filter(None, a.only.split(","))))
    else:
        report(Path(a.out))


if __name__ == "__main__":
    main()
