"""Where the seconds of one `gvpo train` step go: generation (+ scoring), the log-prob forward, the backward, the
optimizer, and the rest; with peak memory. One process per variant (so each peak is its own), same config.

    .venv/bin/python benchmarks/step_profile.py --config configs/smollm2_cpu.yaml --steps 3 --threads 1 \
        --variant "plain fp32:shared_prompt=false" --variant "shared fp32:" --variant "shared bf16:bf16=true"

A variant is ``NAME:key=value,key=value`` (config overrides on top of ``--config`` and ``--set``). The first step of
each variant is a warm-up and is not counted; the table gives the mean of the others, seconds per step.
The forward/backward/optimizer split is taken by wrapping the trainer's own calls (gvpo.update.token_logps,
accelerator.backward, optimizer.step), so it times exactly what `gvpo train` runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

PHASES = ("generation", "forward", "backward", "optimizer", "other")


def profile_one(config_path: str | None, overrides: list[str], steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from gvpo import update as update_module
    from gvpo.config import load_config
    from gvpo.trainer import generate_batch, setup
    from gvpo.update import update

    with tempfile.TemporaryDirectory() as out:
        config = load_config(config_path, [*overrides, f"output_dir={out}", "progress_bar=false", "save_steps=0",
                                           "eval_steps=0"])
        run = setup(config)
        clock = {k: 0.0 for k in PHASES}

        def timed(name, fn):
            def wrapper(*args, **kwargs):
                t = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    clock[name] += time.perf_counter() - t
            return wrapper

        update_module.token_logps = timed("forward", update_module.token_logps)  # under grad and pi_theta' passes
        run.accelerator.backward = timed("backward", run.accelerator.backward)
        run.optimizer.step = timed("optimizer", run.optimizer.step)
        rows, tokens, per_step, stats = [], [], [], []
        setup_rss = psutil.Process().memory_info().rss  # the model loaded, nothing trained yet
        for step in range(1, steps + 2):
            for k in clock:
                clock[k] = 0.0
            t0 = time.perf_counter()
            t = time.perf_counter()
            batch, metrics = generate_batch(run, step)
            clock["generation"] = time.perf_counter() - t
            stats.append(update(run, batch))
            total = time.perf_counter() - t0
            clock["other"] = total - sum(clock[k] for k in PHASES if k != "other")
            if step > 1:  # the first step warms up allocators and caches
                per_step.append({**clock, "total": total})
                rows.append(len(batch))
                tokens.append(int(batch.completion_mask.sum()))
        mean = {k: sum(s[k] for s in per_step) / len(per_step) for k in (*PHASES, "total")}
        return {**mean, "rows": sum(rows) / len(rows), "completion_tokens": sum(tokens) / len(tokens),
                "prompt_width": int(batch.input_ids.shape[1] - batch.completion_mask.shape[1]),
                "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                "setup_rss_gb": setup_rss / 2**30,
                # bytes one training pass kept for its backward (gvpo.activation_budget's count), the step's largest
                "activation_gb": max(s.get("activation_gb", 0.0) for s in stats),
                "micro_batch_prompts": run.totals.get("micro_batch_prompts", config.training.micro_batch_prompts),
                "zero_std_groups_skipped": sum(s.get("zero_std_groups_skipped", 0.0) for s in stats[1:])
                / max(1, len(stats) - 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[], help="key=value for every variant")
    p.add_argument("--variant", action="append", default=[], help="NAME:key=value,key=value")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    a = p.parse_args()
    if a.one is not None:
        print(json.dumps(profile_one(a.config, json.loads(a.one), a.steps, a.threads)))
        return 0
    variants = a.variant or ["default:"]
    results = {}
    for spec in variants:
        name, _, rest = spec.partition(":")
        overrides = [*a.set, *[kv for kv in rest.split(",") if kv]]
        cmd = [sys.executable, __file__, "--one", json.dumps(overrides), "--steps", str(a.steps),
               "--threads", str(a.threads), *(["--config", a.config] if a.config else [])]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"{name}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]['total']:.2f} s/step", file=sys.stderr, flush=True)
    first = next(iter(results.values()))
    print(f"\n{first['rows']:.0f} rows a step, prompt width {first['prompt_width']}, "
          f"{first['completion_tokens']:.0f} completion tokens; {a.threads} thread(s); {a.steps} timed steps\n")
    print("| variant | " + " | ".join(PHASES) + " | total s/step | vs first | peak RSS GB | after setup GB "
          "| activations GB (counted) | micro-batch prompts | equal-reward groups skipped / step |")
    print("|---" * (len(PHASES) + 8) + "|")
    for name, r in results.items():
        cells = " | ".join(f"{r[k]:.2f}" for k in PHASES)
        print(f"| {name} | {cells} | {r['total']:.2f} | {r['total'] / first['total']:.2f}x | {r['peak_rss_gb']:.2f} "
              f"| {r['setup_rss_gb']:.2f} | {r['activation_gb']:.2f} | {r['micro_batch_prompts'] or 'all'} "
              f"| {r['zero_std_groups_skipped']:.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
