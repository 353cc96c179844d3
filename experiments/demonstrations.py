"""Demonstrations inside RL groups: GVPO + demonstrations against on-policy RL, LUFFY-style and naive GRPO,
and SFT on the demonstrations followed by GVPO.

    python experiments/demonstrations.py run    [--tasks arithmetic_long,arithmetic_hard] [--seeds 0,1,2] [--jobs 2]
    python experiments/demonstrations.py report [--out docs/demonstrations]
    python experiments/demonstrations.py base       # the base model's accuracy on both tasks
    python experiments/demonstrations.py final_eval # final checkpoints on 400 held-out problems (+ step accuracy)

`run` trains every arm below for every seed and task (`gvpo train` in subprocesses, `--jobs` at a time, one torch
thread each; seeds outermost, so a sweep cut short still has whole seeds to pair), skipping runs whose
summary.json exists, into runs/demonstrations/<task>/<arm>/s<seed>. `report` writes the Markdown tables and
PNG plots of docs/demonstrations.md.

Regime (sized to finish on a shared 2-core machine): 8 prompts x k = 8 per step, 2 mini-batch updates per batch
(so beta and the baselines' clipping act; the authors' script uses 4), pi_theta' = the policy that generated
the batch, lr 1e-4 (the default), 40 steps, held-out greedy accuracy on 100 test problems every 10 steps;
demos: d = 1 demonstration + 7 samples per group (LUFFY's 7 + 1). SFT arm: 20 SFT steps of 8 demonstrations,
then 20 GVPO steps. The `_off` arms continue a demonstration run's final
checkpoint for CONTINUE more steps without demonstrations (does what was learned survive on-policy?).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path("runs/demonstrations")
# Steps per task (sized to the shared machine: see the module docstring); SFT arm: half SFT, half GVPO.
STEPS = {"arithmetic_long": 40, "arithmetic_hard": 30}
CONTINUE = 20
COMMON = { "eval_steps": 10, "num_eval": 100, "save_steps": 0, "progress_bar": "false",
          "prompts_per_step": 8, "num_generations": 8, "num_mini_batches": 2}
BUDGET = {"arithmetic_hard": 56, "arithmetic_long": 68}  # longest worked solution + EOS fits
DEMOS = {"demonstration_column": "solution", "demonstrations_per_group": 1}
ARMS = {
    "gvpo": {"algorithm": "gvpo"},
    "gvpo_demos": {"algorithm": "gvpo", **DEMOS},
    "grpo": {"algorithm": "grpo"},
    "grpo_luffy": {"algorithm": "grpo", "demonstration_loss": "luffy", **DEMOS},
    "grpo_naive": {"algorithm": "grpo", "demonstration_loss": "naive", **DEMOS},
    "sft_gvpo": {"algorithm": "gvpo"},  # half the steps SFT, then GVPO from the SFT model
    # The closest to LUFFY's released script: no std normalisation, token losses summed / a constant.
    "dr_grpo_luffy": {"algorithm": "dr_grpo", "demonstration_loss": "luffy", **DEMOS},
}
CONTINUED = ("gvpo_demos", "grpo_luffy")
CONTINUED_TASKS = ("arithmetic_long",)  # over-imitation is measured where demonstrations matter most
LABELS = {"gvpo": "GVPO (on-policy)", "gvpo_demos": "GVPO + demos", "grpo": "GRPO (on-policy)",
          "grpo_luffy": "GRPO + demos, LUFFY-style", "grpo_naive": "GRPO + demos, naive",
          "sft_gvpo": "SFT on demos, then GVPO", "dr_grpo_luffy": "Dr. GRPO + demos, LUFFY-style"}


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _train(settings: dict, log: Path) -> None:
    cmd = [sys.executable, "-m", "gvpo.cli", "train", *[f"{k}={v}" for k, v in settings.items()]]
    with open(log, "w") as f:
        subprocess.run(cmd, env=_env(), stdout=f, stderr=subprocess.STDOUT, check=True)


def _one(task: str, arm: str, seed: int) -> str:
    out = ROOT / task / arm / f"s{seed}"
    if (out / "summary.json").exists():
        return f"skip {out}"
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {**COMMON, **ARMS[arm], "task": task, "seed": seed, "output_dir": str(out),
                "max_completion_length": BUDGET[task], "max_steps": STEPS[task]}
    if arm == "sft_gvpo":
        sft_dir = ROOT / task / "sft" / f"s{seed}"
        seconds = sft(task, seed, sft_dir, settings["prompts_per_step"], STEPS[task] // 2)
        settings.update(model_name_or_path=str(sft_dir), max_steps=STEPS[task] - STEPS[task] // 2)
        (out.parent / f"s{seed}.sft_seconds").write_text(str(seconds))
    _train(settings, out.parent / f"s{seed}.log")
    return f"done {out}"


def _continue(task: str, arm: str, seed: int) -> str:
    """The final checkpoint of a demonstration run, trained CONTINUE more steps with d = 0."""
    src, out = ROOT / task / arm / f"s{seed}", ROOT / task / f"{arm}_off" / f"s{seed}"
    if (out / "summary.json").exists() or not (src / "summary.json").exists():
        return f"skip {out}"
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, out)
    (out / "summary.json").unlink()
    settings = {**COMMON, **ARMS[arm], "task": task, "seed": seed, "output_dir": str(out),
                "max_completion_length": BUDGET[task], "max_steps": STEPS[task] + CONTINUE, "demonstrations_per_group": 0,
                "resume": "true"}
    _train(settings, out.parent / f"s{seed}.log")
    return f"done {out}"


def sft(task: str, seed: int, out: Path, batch: int, steps: int) -> float:
    """SFT of the default model on steps x batch demonstrations (token-mean NLL, AdamW as the RL runs: lr 1e-4,
    betas (0.9, 0.99), grad clip 1), saved to ``out``. Returns the seconds it took."""
    import time

    import torch

    from gvpo.modeling import load_model_and_tokenizer
    from gvpo.tasks import make_dataset

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    clock = time.perf_counter()
    model, tok = load_model_and_tokenizer("default", "float32", False)
    rows = make_dataset(task, "train", steps * batch, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)
    model.train()
    for step in range(steps):
        chunk = rows[step * batch:(step + 1) * batch]
        seqs, labels = [], []
        for r in chunk:
            p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
            c = tok(r["solution"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seqs.append(p + c)
            labels.append([-100] * len(p) + c)
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
        att = (torch.arange(width)[None] < torch.tensor([len(s) for s in seqs])[:, None]).long()
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return time.perf_counter() - clock


def base(tasks, n=200, samples=8):
    """The embedded base model on each task's held-out problems: greedy accuracy on n, and the share of
    correct samples at temperature 1 (samples per problem, first n // 2 problems)."""
    import torch

    from gvpo.modeling import load_model_and_tokenizer
    from gvpo.rollout import make_engine
    from gvpo.tasks import arithmetic_reward, make_dataset
    from gvpo.types import SamplingParams

    torch.set_num_threads(1)
    model, tok = load_model_and_tokenizer("default", "float32", False)
    engine = make_engine("fast", model, tok)
    for task in tasks:
        rows = make_dataset(task, "test", n, seed=0)
        ids = [tok(r["prompt"])["input_ids"] for r in rows]
        greedy = engine.generate(ids, 1, SamplingParams(max_new_tokens=BUDGET[task], temperature=0.0))
        texts = tok.batch_decode(greedy.token_lists(), skip_special_tokens=True)
        acc = sum(arithmetic_reward(None, texts, [r["answer"] for r in rows])) / n
        sampled = engine.generate(ids[:n // 2], samples, SamplingParams(max_new_tokens=BUDGET[task], temperature=1.0),
                                  torch.Generator().manual_seed(0))
        texts = tok.batch_decode(sampled.token_lists(), skip_special_tokens=True)
        gold = [rows[i]["answer"] for i in sampled.prompt_index.tolist()]
        rate = sum(arithmetic_reward(None, texts, gold)) / len(texts)
        print(f"{task}: greedy {acc:.3f} on {n} held-out problems; sampled (T=1) {rate:.4f} of {len(texts)}; "
              f"example: {rows[0]['prompt']} -> {tok.decode(greedy.token_lists()[0], skip_special_tokens=True)!r} "
              f"(gold {rows[0]['solution']!r})")


FINAL_EVAL = 400  # held-out problems for the final checkpoints (the training-time eval uses 100: 1-point steps)


def step_accuracy(completion: str, solution: str) -> float:
    """Share of the gold chain's steps ("a+b=c") that the completion writes correctly at the same position:
    partial credit that shows a chain being learned before whole answers are right."""
    gold = solution.split(" #### ")[0].split(",")
    got = completion.split(" #### ")[0].split(",")
    return sum(g == c for g, c in zip(gold, got)) / len(gold)


def final_eval(tasks, seeds):
    """Greedy accuracy and step accuracy of every finished run's final checkpoint (and of the base model) on
    FINAL_EVAL held-out problems, written to <run>/final_eval.json."""
    import torch

    from gvpo.modeling import load_model_and_tokenizer
    from gvpo.rollout import make_engine
    from gvpo.tasks import arithmetic_reward, make_dataset
    from gvpo.types import SamplingParams

    torch.set_num_threads(1)

    def score(path, task):
        model, tok = load_model_and_tokenizer(str(path), "float32", False)
        rows = make_dataset(task, "test", FINAL_EVAL, seed=12345)
        out = make_engine("fast", model, tok).generate([tok(r["prompt"])["input_ids"] for r in rows], 1,
                                                       SamplingParams(max_new_tokens=BUDGET[task], temperature=0.0))
        texts = tok.batch_decode(out.token_lists(), skip_special_tokens=True)
        acc = sum(arithmetic_reward(None, texts, [r["answer"] for r in rows])) / len(rows)
        steps = sum(step_accuracy(t, r["solution"]) for t, r in zip(texts, rows)) / len(rows)
        return {"accuracy": acc, "step_accuracy": steps, "n": len(rows)}

    for task in tasks:
        base_file = ROOT / task / "base_final_eval.json"
        if not base_file.exists():
            base_file.write_text(json.dumps(score("default", task)))
        for arm in list(ARMS) + [f"{a}_off" for a in CONTINUED]:
            for seed in seeds:
                run_dir = ROOT / task / arm / f"s{seed}"
                if not (run_dir / "summary.json").exists() or (run_dir / "final_eval.json").exists():
                    continue
                last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
                (run_dir / "final_eval.json").write_text(json.dumps({**score(last, task), "checkpoint": last.name}))
                print(f"final eval {run_dir}", flush=True)
        for seed in seeds:  # the SFT model itself, before its GVPO steps
            sft_dir = ROOT / task / "sft" / f"s{seed}"
            if (sft_dir / "config.json").exists() and not (sft_dir / "final_eval.json").exists():
                (sft_dir / "final_eval.json").write_text(json.dumps(score(sft_dir, task)))


def _safe(fn, *args) -> str:
    try:
        return fn(*args)
    except Exception as e:  # one failed run must not stop the sweep; its log says why
        return f"FAILED {args}: {type(e).__name__}: {e}"


def run(tasks, seeds, jobs):
    """Task by task (the near-zero task first), seed by seed within a task; continuations right after a seed."""
    with ThreadPoolExecutor(jobs) as pool:
        for task in tasks:
            for seed in seeds:
                futures = [pool.submit(_safe, _one, task, arm, seed) for arm in ARMS]
                if task in CONTINUED_TASKS:
                    futures += [pool.submit(_safe, _continue, task, arm, seed) for arm in CONTINUED]
                for f in futures:
                    print(f.result(), flush=True)
        # A continuation whose source run was still going when it was submitted was skipped: retry.
        futures = [pool.submit(_safe, _continue, task, arm, seed) for task in tasks if task in CONTINUED_TASKS
                   for seed in seeds for arm in CONTINUED]
        for f in futures:
            print(f.result(), flush=True)


# --------------------------------------------------------------------------------------------------
# Report


def _load(task, arm):
    runs = {}
    for d in sorted((ROOT / task / arm).glob("s*")):
        if arm == "sft":  # the SFT model: no training log, only its final evaluation
            if (d / "final_eval.json").exists():
                runs[int(d.name[1:])] = {"summary": {}, "log": [], "final": json.loads((d / "final_eval.json").read_text())}
            continue
        if not (d / "summary.json").exists():
            continue
        log = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        final = json.loads((d / "final_eval.json").read_text()) if (d / "final_eval.json").exists() else None
        runs[int(d.name[1:])] = {"summary": json.loads((d / "summary.json").read_text()), "log": log, "final": final}
    return runs


def _curve(run, offset=0):
    return [(r["step"] + offset, r["eval_accuracy"]) for r in run["log"] if "eval_accuracy" in r]


def _step_seconds(run):
    secs = [r["step_seconds"] for r in run["log"] if "step_seconds" in r]
    return statistics.median(secs) if secs else float("nan")


def _fmt(values, signed=False):
    if not values:
        return "-"
    f = "+.3f" if signed else ".3f"
    if len(values) == 1:
        return format(values[0], f)
    return f"{format(statistics.mean(values), f)} +/- {statistics.stdev(values):.3f}"


def _metric(run, key):
    """From the 400-problem final evaluation (None until `final_eval` has run)."""
    return run["final"][key] if run["final"] else None


def _paired(a: dict, b: dict, key: str) -> tuple[list[int], list[float]]:
    seeds = [s for s in sorted(set(a) & set(b)) if _metric(a[s], key) is not None and _metric(b[s], key) is not None]
    return seeds, [_metric(a[s], key) - _metric(b[s], key) for s in seeds]


def report(tasks, out_dir: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for task in tasks:
        data = {arm: _load(task, arm) for arm in list(ARMS) + [f"{a}_off" for a in CONTINUED]}
        sft_only = _load(task, "sft")
        base_file = ROOT / task / "base_final_eval.json"
        base = json.loads(base_file.read_text()) if base_file.exists() else None
        lines += [f"### {task}", "",
                  f"Base model on the {FINAL_EVAL} final-evaluation problems: " + (
                      f"accuracy {base['accuracy']:.3f}, step accuracy {base['step_accuracy']:.3f}" if base else "-"),
                  "", f"| arm | seeds | eval (100) at step 0 | eval (100) at step {STEPS[task]} | final accuracy "
                  f"({FINAL_EVAL}) | final step accuracy ({FINAL_EVAL}) | median s/step |", "|---|---|---|---|---|---|---|"]
        for arm in ARMS:
            runs = data[arm].values()
            initial = [_curve(r)[0][1] for r in runs]
            lines.append(f"| {LABELS[arm]} | {sorted(data[arm])} | {_fmt(initial)} | "
                         f"{_fmt([r['summary']['final_accuracy'] for r in runs])} | "
                         f"{_fmt([v for r in runs if (v := _metric(r, 'accuracy')) is not None])} | "
                         f"{_fmt([v for r in runs if (v := _metric(r, 'step_accuracy')) is not None])} | "
                         f"{_fmt([_step_seconds(r) for r in runs])} |")
        lines.append(f"| SFT only (the SFT-then-GVPO arm before its GVPO steps) | {sorted(sft_only)} | - | - | "
                     f"{_fmt([_metric(r, 'accuracy') for r in sft_only.values()])} | "
                     f"{_fmt([_metric(r, 'step_accuracy') for r in sft_only.values()])} | - |")
        lines += ["", "SFT-then-GVPO: its step-0 evaluation is after SFT; its s/step is the GVPO part only.", "",
                  f"Paired by seed, on the {FINAL_EVAL}-problem final evaluation:", "",
                  "| comparison | pairs | accuracy diff | per seed | step-accuracy diff | per seed |",
                  "|---|---|---|---|---|---|"]
        pairs = [(arm, "gvpo") for arm in ARMS if arm != "gvpo"] + [("gvpo_demos", "grpo_luffy"),
                                                                    ("gvpo_demos", "grpo_naive"),
                                                                    ("gvpo_demos", "sft_gvpo"),
                                                                    ("gvpo_demos", "dr_grpo_luffy")]
        data["sft"] = sft_only
        LABELS.setdefault("sft", "SFT only")
        for a, b in pairs + [("gvpo_demos", "sft"), ("sft_gvpo", "sft")]:
            seeds, acc = _paired(data[a], data[b], "accuracy")
            _, step = _paired(data[a], data[b], "step_accuracy")
            lines.append(f"| {LABELS[a]} - {LABELS[b]} | {len(seeds)} | {_fmt(acc, True)} | "
                         f"{', '.join(f'{d:+.3f}' for d in acc)} | {_fmt(step, True)} | "
                         f"{', '.join(f'{d:+.3f}' for d in step)} |")
        lines.append("")
        if task in CONTINUED_TASKS:
            lines += [f"Continuing without demonstrations ({CONTINUE} more steps, d = 0), {FINAL_EVAL}-problem "
                      "evaluation (accuracy / step accuracy):", "",
                      f"| arm | seeds | at step {STEPS[task]} (with demos) | at step {STEPS[task] + CONTINUE} |",
                      "|---|---|---|---|"]
            for arm in CONTINUED:
                off = data[f"{arm}_off"]
                seeds, _ = _paired(off, data[arm], "accuracy")
                cell = lambda runs, k: _fmt([_metric(runs[s], k) for s in seeds])  # noqa: E731
                lines.append(f"| {LABELS[arm]} | {seeds} | {cell(data[arm], 'accuracy')} / "
                             f"{cell(data[arm], 'step_accuracy')} | {cell(off, 'accuracy')} / "
                             f"{cell(off, 'step_accuracy')} |")
            lines.append("")
        del data["sft"]
        _plot(plt, task, data, out_dir)
    (out_dir / "tables.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _plot(plt, task, data, out_dir):
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for arm, runs in data.items():
        if not runs or arm.endswith("_off"):
            continue
        offset = STEPS[task] // 2 if arm == "sft_gvpo" else 0
        steps = sorted({s for r in runs.values() for s, _ in _curve(r, offset)})
        means = [statistics.mean(a for r in runs.values() for s2, a in _curve(r, offset) if s2 == s) for s in steps]
        line, = axes[0].plot(steps, means, marker="o", label=f"{LABELS[arm]} (n={len(runs)})")
        for r in runs.values():
            xs, ys = zip(*_curve(r, offset))
            axes[0].plot(xs, ys, color=line.get_color(), alpha=0.2, lw=0.8)
        # Wall-clock: evaluation points at the median step time x step (training time only, shared machine).
        sec = statistics.median(_step_seconds(r) for r in runs.values())
        axes[1].plot([s * sec for s in steps], means, marker="o", color=line.get_color(), label=LABELS[arm])
    axes[0].set(xlabel="training step (SFT arm: SFT steps first)", ylabel="held-out greedy accuracy",
                title=f"{task}: accuracy vs steps (mean, thin: seeds)")
    axes[1].set(xlabel="training seconds (median s/step x step; shared 2-core machine)",
                title=f"{task}: accuracy vs training time")
    axes[0].legend(fontsize=7)
    # Final checkpoints on FINAL_EVAL problems: accuracy and step accuracy per arm, one dot per seed.
    arms = [a for a in data if data[a]]
    for j, key in enumerate(("accuracy", "step_accuracy")):
        for i, arm in enumerate(arms):
            values = [_metric(r, key) for r in data[arm].values() if _metric(r, key) is not None]
            x = i + (0.2 if j else -0.2)
            axes[2].scatter([x] * len(values), values, marker="o" if j else "s", color="C1" if j else "C0", s=18,
                            label=None if i else ("step accuracy" if j else "accuracy"))
            if values:
                axes[2].hlines(statistics.mean(values), x - 0.15, x + 0.15, color="k", lw=1)
    axes[2].set_xticks(range(len(arms)), [LABELS.get(a, a.replace("_off", "") + " then d=0").replace(", ", "\n")
                                          for a in arms], rotation=60, fontsize=6)
    axes[2].set(title=f"{task}: final checkpoints, {FINAL_EVAL} held-out problems")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / f"{task}.png", dpi=90)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["run", "report", "base", "final_eval"])
    parser.add_argument("--tasks", default="arithmetic_long,arithmetic_hard")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="docs/demonstrations")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    if args.command == "run":
        run(tasks, [int(s) for s in args.seeds.split(",")], args.jobs)
    elif args.command == "base":
        base(tasks)
    elif args.command == "final_eval":
        final_eval(tasks, [int(s) for s in args.seeds.split(",")])
    else:
        report(tasks, Path(args.out))


if __name__ == "__main__":
    main()
