"""Synchronous vs asynchronous training throughput (1 Ray rollout worker + the learner), side by side.

Workloads (`--workloads`):
- default: the embedded model on the arithmetic task, the default rollout settings (32 prompts x k = 8,
  up to 40 tokens); on small models on CPU the training pass dominates the step (GUIDE 7).
- gen-heavy: a ~25M-parameter random Qwen2 (hidden 512, 6 layers; the default tokenizer), 8 prompts x k = 4,
  128-token completions (a random model rarely samples EOS): generation is a larger share of the step.
`--reward-latency L1,L2,...` repeats every workload with an ``async def`` reward that waits L seconds per call
before grading (a remote verifier or LLM judge: the learner's cores do nothing while it waits), 0 = the plain
reward.

For each: `--steps` steps synchronous (rollout_workers=0, `--sync-threads`, default all cores) and asynchronous
(rollout_workers=1, max_policy_lag=1; the worker uses 1 thread, the learner `--learner-threads`, default the
remaining cores), alternating `--reps` times, and once synchronous on 1 thread (for the core-split bound).
The first step of every run is left out (worker start-up, warm-up).

Reported per run: samples/s (completions trained per second of step time), the learner's idle fraction
(async: time waiting for groups; sync: time generating and scoring, when no training happens), the worker's
idle fraction (async: worker time without a task, counted between the learner's takes; sync: the training
share of the step). Two bounds from the synchronous runs, G = generation + reward wait, T = the rest:
- ideal overlap (G + T) / max(G, T): each phase as fast on its share of the machine as on all of it (true when
  generation and training have hardware of their own: GPUs, or workers on other machines);
- core split (G + T) / max(G1, T1), G1 / T1 from the 1-thread synchronous run: what overlapping can give when the
  two phases split these cores one each, as they do here.

    PYTHONPATH=src .venv/bin/python benchmarks/async.py                     # both workloads
    PYTHONPATH=src .venv/bin/python benchmarks/async.py --workloads gen-heavy --steps 6
    PYTHONPATH=src .venv/bin/python benchmarks/async.py --reward-latency 0,0.25,1
    PYTHONPATH=src .venv/bin/python benchmarks/async.py --sync-threads 1   # busy machine: equal threads

The last line is JSON with the speedups.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch


def build_25m(path: Path) -> str:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from gvpo.assets import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), sum(p.numel() for p in model.parameters())


def workload(name: str, tmp: Path) -> tuple[dict, str]:
    if name == "default":
        return {}, "embedded default model, 32 prompts x 8, <= 40 tokens"
    path, params = build_25m(tmp / "qwen2-25m")
    return ({"model_name_or_path": path, "prompts_per_step": 8, "num_generations": 4,
             "max_completion_length": 128},
            f"random Qwen2 {params / 1e6:.0f}M, 8 prompts x 4, 128 tokens")


def remote_reward(latency: float):
    """The arithmetic reward behind a remote call that takes ``latency`` seconds (TRL's async reward form)."""
    from gvpo.tasks import arithmetic_reward

    async def remote_judge(prompts, completions, answer, **kwargs):
        await asyncio.sleep(latency)
        return arithmetic_reward(prompts, completions, answer)

    return remote_judge


def run_once(tmp: Path, tag: str, overrides: dict, steps: int, workers: int, threads_now: int,
             latency: float) -> dict:
    from gvpo.config import load_config
    from gvpo.trainer import train

    out = tmp / tag
    config = load_config(None, {"output_dir": str(out), "max_steps": steps, "eval_steps": 0, "num_eval": 16,
                                "save_steps": 0, "progress_bar": False, "rollout_workers": workers,
                                "max_policy_lag": 1, **overrides})
    threads = torch.get_num_threads()
    torch.set_num_threads(threads_now)
    try:
        train(config, reward_funcs=[remote_reward(latency)] if latency else None)
    finally:
        torch.set_num_threads(threads)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_log = [r for r in log if "loss" in r][1:]  # the first step holds start-up and warm-up
    seconds = sum(r["step_seconds"] for r in steps_log)
    samples = len(steps_log) * config.rollout.prompts_per_step * config.rollout.num_generations
    gen = sum(r["generation_seconds"] for r in steps_log) + latency * len(steps_log)
    if workers:
        learner_idle = sum(r["learner_idle_seconds"] for r in steps_log) / seconds
        worker_idle = sum(r["worker_idle_seconds"] for r in steps_log) / (seconds * workers)
        lag = statistics.mean(r["policy_lag_mean"] for r in steps_log)
    else:
        learner_idle, worker_idle, lag = gen / seconds, 1 - gen / seconds, 0.0
    return {"samples_per_s": samples / seconds, "learner_idle": learner_idle, "worker_idle": worker_idle,
            "gen_s": gen / len(steps_log), "step_s": seconds / len(steps_log), "lag": lag}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default="default,gen-heavy")
    p.add_argument("--steps", type=int, default=8, help="steps per run (the first is not counted)")
    p.add_argument("--reward-latency", default="0", help="comma-separated seconds per reward call (0: plain)")
    p.add_argument("--reps", type=int, default=1, help="sync/async pairs per workload, alternating")
    p.add_argument("--learner-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--sync-threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of the synchronous run (default: all cores; on a machine shared with "
                        "other jobs 1 thread can be much faster, then compare at equal threads too)")
    a = p.parse_args()
    import ray

    # One local Ray instance for every async run; workers import what this process imports.
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(x for x in sys.path if x)}})
    results = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for wl in a.workloads.split(","):
            overrides, desc = workload(wl, tmp)
            for latency in (float(x) for x in a.reward_latency.split(",")):
                name = wl if not latency else f"{wl}+{latency:g}s"
                runs = {"sync": [], "async": []}
                for rep in range(a.reps):
                    for mode, workers in (("sync", 0), ("async", 1)):
                        runs[mode].append(run_once(tmp, f"{name}-{mode}-{rep}", overrides, a.steps, workers,
                                                   a.learner_threads if workers else a.sync_threads, latency))
                one = run_once(tmp, f"{name}-sync1", overrides, a.steps, 0, 1, latency)
                med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
                s = med["sync"]
                ideal = s["step_s"] / max(s["gen_s"], s["step_s"] - s["gen_s"])
                split = s["step_s"] / max(one["gen_s"], one["step_s"] - one["gen_s"])
                results[name] = {"desc": desc, **med, "sync1": one,
                                 "speedup": med["async"]["samples_per_s"] / s["samples_per_s"],
                                 "ideal_overlap_speedup": ideal, "core_split_bound": split}
    ray.shutdown()
    print(f"\n{'workload':<16} {'mode':<6} {'samples/s':>10} {'learner idle':>13} {'worker idle':>12} "
          f"{'step s':>7} {'gen s':>6} {'lag':>5}")
    for name, r in results.items():
        for mode in ("sync", "sync1", "async"):
            m = r[mode]
            print(f"{name:<16} {mode:<6} {m['samples_per_s']:>10.1f} {m['learner_idle']:>13.2f} "
                  f"{m['worker_idle']:>12.2f} {m['step_s']:>7.2f} {m['gen_s']:>6.2f} {m['lag']:>5.2f}")
        print(f"{name:<16} speedup {r['speedup']:.2f}x (ideal overlap {r['ideal_overlap_speedup']:.2f}x, "
              f"core split {r['core_split_bound']:.2f}x)  [{r['desc']}]")
    print(json.dumps({n: {"speedup": round(r["speedup"], 3), "ideal": round(r["ideal_overlap_speedup"], 3),
                          "core_split": round(r["core_split_bound"], 3)} for n, r in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
