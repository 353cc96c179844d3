"""A real pretrained chat model on CPU: TRL's GRPOTrainer vs gvpo (through TRL and `gvpo train`), one table.

    python benchmarks/real_model.py                       # 20 steps, seed 0, every arm (about 2 hours on 1 core)
    python benchmarks/real_model.py --steps 1 --quick     # a smoke run of the plumbing (minutes)
    python benchmarks/real_model.py --seeds 0 1 --arms gvpo_train trl_grpo --threads 2
    python benchmarks/real_model.py --steps 3 --arms trl_grpo gvpo_train --set max_completion_length=128
    python benchmarks/real_model.py --steps 10 --gvpo-steps 20 --set eval_steps=2 --arms trl_grpo gvpo_train
        # time to TRL's final accuracy, with gvpo allowed past TRL's step count and evaluated every 2 steps

Model, task and batch come from --config (configs/smollm2_cpu.yaml: SmolLM2-135M-Instruct, addition_chat through
its chat template, 8 prompts x k = 8, 16 new tokens). Every arm trains the same model on the same prompts with the
same k, completion budget, temperature, seed and number of optimizer steps, one fresh process each, in turn:

- trl_grpo_defaults: TRL GRPOTrainer at TRL's defaults (lr 1e-6 linear decay, loss dapo, std-scaled rewards, beta 0)
- trl_grpo: the same with our constant learning rate (and warmup, grad clip) instead of TRL's schedule
- trl_gvpo: gvpo.integrations.trl.GVPOTrainer (TRL's loop, the GVPO loss), our beta and learning rate
- gvpo_train: `gvpo train` with algorithm=gvpo;  gvpo_train_grpo: `gvpo train` with algorithm=grpo
- on request: trl_grpo_bf16 and gvpo_train_bf16, trl_grpo and gvpo_train with bf16 autocast (TRL: bf16=True,
  its Trainer's autocast; gvpo: bf16=true, the training pass and generation), evaluated in bf16 too

Measured per arm: seconds per optimizer step (mean after the first, which warms up), split into generation (sampling
+ scoring) and training (log-probs, backward, optimizer); peak resident memory (ru_maxrss of the arm's process);
greedy held-out accuracy before and after, by one evaluator (gvpo's, on the same held-out prompts; evaluation time
is not counted in any training time); and the training seconds until the arm first reached the final accuracy of
trl_grpo_defaults / trl_grpo (checked at each evaluation, every eval_steps steps; "-" if never).
Results: the table on stdout, every number in --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# In this order: with --jobs 2 the pair that matters most (TRL at our settings, gvpo train) runs side by side first.
ARMS = ("trl_grpo", "gvpo_train", "trl_gvpo", "gvpo_train_grpo", "trl_grpo_defaults")
BF16_ARMS = ("trl_grpo_bf16", "gvpo_train_bf16")  # on request (--arms): the same two with bf16 autocast
REFERENCES = ("trl_grpo_defaults", "trl_grpo")


def _config(a, seed: int, arm: str):
    from gvpo.config import load_config

    steps = a.gvpo_steps if arm.startswith("gvpo_train") and a.gvpo_steps else a.steps
    overrides = {"max_steps": steps, "seed": seed, "output_dir": str(Path(a.workdir) / f"{arm}-s{seed}"),
                 "overwrite_output_dir": True, "save_steps": 0, "progress_bar": False,
                 "algorithm": "grpo" if arm == "gvpo_train_grpo" else "gvpo", "bf16": arm.endswith("_bf16")}
    if a.quick:  # the plumbing, not the numbers: few held-out prompts, evaluated after every step
        overrides.update(num_eval=8, eval_steps=1)
    overrides.update(item.split("=", 1) for item in a.set)  # e.g. max_completion_length=128, for every arm
    return load_config(a.config, overrides)


def run_gvpo_train(config) -> dict:
    from gvpo.trainer import train

    train(config)
    rows = [json.loads(line) for line in (Path(config.logging.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps, evals, elapsed = [], [], 0.0
    for r in rows:
        if "step_seconds" in r:
            elapsed += r["step_seconds"]
            steps.append({"step": r["step"], "seconds": r["step_seconds"], "update_seconds": r["update_seconds"],
                          "generation_seconds": r["step_seconds"] - r["update_seconds"],
                          "clipped_ratio": r.get("clipped_ratio")})
        if "eval_accuracy" in r:
            evals.append({"step": r["step"], "train_seconds": elapsed, "accuracy": r["eval_accuracy"]})
    return {"steps": steps, "evals": evals}


def run_trl(config, arm: str) -> dict:
    """TRL's loop on the rows, rewards and tokenizer `gvpo train` would use; greedy evaluation by gvpo's evaluator
    every eval_steps optimizer steps, outside the timed part of each step."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from gvpo.data import encode_rows
    from gvpo.integrations.trl import GVPOConfig, GVPOTrainer
    from gvpo.modeling import load_model_and_tokenizer, resolve_model_path
    from gvpo.rollout import make_engine
    from gvpo.scoring import resolve_reward
    from gvpo.data import read_rows
    from gvpo.evaluation import held_out_accuracy

    c, r, o = config, config.rollout, config.optimizer
    path = resolve_model_path(c.model.model_name_or_path, c.model.gguf_cache_dir or None)
    _, tokenizer = load_model_and_tokenizer(path)
    train_rows, eval_rows = read_rows(c, None, None)
    chat = c.data.template == "chat"
    data = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": x["prompt"]}] if chat else x["prompt"] for x in train_rows],
        "answer": [x["answer"] for x in train_rows]})
    eval_encoded = encode_rows(eval_rows, tokenizer, c.data.template)
    reward = resolve_reward(c.algorithm.reward_funcs[0])
    batch = r.prompts_per_step * r.num_generations  # one optimizer step = one generation batch, one micro-batch
    bf16 = c.training.bf16  # the bf16 arms (_config)
    common = dict(output_dir=c.logging.output_dir, use_cpu=True, bf16=bf16, report_to="none", seed=c.training.seed,
                  num_generations=r.num_generations, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                  max_completion_length=r.max_completion_length, temperature=r.temperature,
                  max_steps=c.training.max_steps, logging_steps=1, save_strategy="no", dataloader_num_workers=0)
    ours = dict(learning_rate=o.learning_rate, lr_scheduler_type="constant_with_warmup", warmup_steps=o.warmup_steps,
                max_grad_norm=o.max_grad_norm, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
                adam_beta2=o.adam_beta2, adam_epsilon=o.adam_epsilon)
    if arm == "trl_gvpo":
        trainer_cls, args = GVPOTrainer, GVPOConfig(beta=c.gvpo_beta(), **common, **ours)
    else:
        trainer_cls, args = GRPOTrainer, GRPOConfig(**common, **({} if arm == "trl_grpo_defaults" else ours))
    trainer = trainer_cls(model=path, reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer)
    engine = make_engine("fast", trainer.model, tokenizer, bf16=bf16)  # evaluated as gvpo train evaluates
    record = {"steps": [], "evals": [], "elapsed": 0.0, "gen": 0.0}

    def evaluate(step):
        was_training = trainer.model.training
        trainer.model.eval()
        acc = held_out_accuracy(engine, tokenizer, eval_encoded, reward, c, trainer.accelerator)
        trainer.model.train(was_training)
        record["evals"].append({"step": step, "train_seconds": record["elapsed"], "accuracy": acc})

    generate = trainer._generate_and_score_completions

    def timed_generate(inputs):  # TRL generates inside training_step: time it to split the step
        t0 = time.perf_counter()
        try:
            return generate(inputs)
        finally:
            record["gen"] += time.perf_counter() - t0

    trainer._generate_and_score_completions = timed_generate

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            record["gen"], record["t0"] = 0.0, time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - record["t0"]
            record["elapsed"] += seconds
            record["steps"].append({"step": state.global_step, "seconds": seconds, "generation_seconds": record["gen"],
                                    "update_seconds": seconds - record["gen"]})
            every = c.eval.eval_steps
            if state.global_step == c.training.max_steps or (every and state.global_step % every == 0):
                evaluate(state.global_step)

    trainer.add_callback(Timer())
    evaluate(0)
    trainer.train()
    clipped = [h["completions/clipped_ratio"] for h in trainer.state.log_history if "completions/clipped_ratio" in h]
    for step, value in zip(record["steps"], clipped):
        step["clipped_ratio"] = value
    return {"steps": record["steps"], "evals": record["evals"]}


def child(a) -> None:
    """One arm, one seed, in this process; writes its JSON result."""
    import torch

    torch.set_num_threads(a.threads)
    config = _config(a, a.seed, a.arm)
    t0 = time.perf_counter()
    result = run_gvpo_train(config) if a.arm.startswith("gvpo_train") else run_trl(config, a.arm)
    result.update(arm=a.arm, seed=a.seed, wall_seconds=time.perf_counter() - t0, threads=a.threads,
                  peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # KiB on Linux
    Path(a.result).write_text(json.dumps(result))


def summarise(result: dict, targets: dict, ref_steps: int) -> dict:
    steps = result["steps"][1:] or result["steps"]  # the first step warms up (allocations, lazy imports)
    evals = result["evals"]
    row = {"arm": result["arm"], "seed": result["seed"],
           "step_s": statistics.mean(s["seconds"] for s in steps),
           "gen_s": statistics.mean(s["generation_seconds"] for s in steps),
           "train_s": statistics.mean(s["update_seconds"] for s in steps),
           "clipped": statistics.mean(s["clipped_ratio"] for s in steps if s.get("clipped_ratio") is not None)
           if any(s.get("clipped_ratio") is not None for s in steps) else float("nan"),
           "peak_gb": result["peak_rss_gb"], "acc_before": evals[0]["accuracy"], "acc_after": evals[-1]["accuracy"],
           "steps": result["steps"][-1]["step"],
           # at the reference's step count, where an arm ran more steps (--gvpo-steps)
           "acc_at_steps": next((e["accuracy"] for e in evals if e["step"] == ref_steps), None), "ref_steps": ref_steps}
    for name, target in targets.items():
        hit = next((e["train_seconds"] for e in evals if e["accuracy"] >= target - 1e-9), None)
        row[f"t_to_{name}"] = hit
    return row


def markdown(head: list[str], body: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [head, ["---"] * len(head), *body])


def table(rows: list[dict], targets: dict) -> str:
    head = ["arm", "seed", "steps", "s/step (gen / train)", "clipped", "peak RSS GB", "acc before -> after",
            *[f"s to {name} final ({v:.3f})" for name, v in targets.items()]]

    def accuracy(r):  # with the accuracy at the reference's step count where the arm ran longer
        at = r["acc_at_steps"]
        longer = at is not None and r["steps"] != r["ref_steps"]
        return f"{r['acc_before']:.3f} -> {r['acc_after']:.3f}" + (f" ({at:.3f} at {r['ref_steps']})" if longer else "")

    return markdown(head, [
        [r["arm"], str(r["seed"]), str(r["steps"]), f"{r['step_s']:.1f} ({r['gen_s']:.1f} / {r['train_s']:.1f})",
         f"{r['clipped']:.2f}", f"{r['peak_gb']:.2f}", accuracy(r),
         *["-" if r.get(f"t_to_{n}") is None else f"{r[f't_to_{n}']:.0f}" for n in targets]] for r in rows])


def across_seeds(rows: list[dict], names: list[str]) -> str:
    """One line per arm over its seeds: accuracy after (mean, min-max), the mean seconds per step, and for each
    reference how many seeds reached that seed's reference final accuracy, with the median seconds it took."""
    head = ["arm", "seeds", "acc before", "acc after: mean (min-max)", "s/step (mean)",
            *[f"reached {n} final: seeds, median s" for n in names]]
    body = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        after = [r["acc_after"] for r in mine]
        cells = [arm, str(len(mine)), f"{statistics.mean(r['acc_before'] for r in mine):.3f}",
                 f"{statistics.mean(after):.3f} ({min(after):.2f}-{max(after):.2f})",
                 f"{statistics.mean(r['step_s'] for r in mine):.1f}"]
        for n in names:
            hits = [r[f"t_to_{n}"] for r in mine if r.get(f"t_to_{n}") is not None]
            cells.append(f"{len(hits)} of {len(mine)}" + (f", {statistics.median(hits):.0f}" if hits else ""))
        body.append(cells)
    return markdown(head, body)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "smollm2_cpu.yaml"))
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per arm")
    p.add_argument("--gvpo-steps", type=int, default=0,
                   help="optimizer steps for the gvpo_train arms (default: --steps): the time to reach a reference's "
                        "final accuracy can be measured past the reference's step count")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS + BF16_ARMS)
    p.add_argument("--threads", type=int, default=1, help="torch threads per arm (the GUIDE's figures: 1)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every arm, e.g. --set max_completion_length=128")
    p.add_argument("--quick", action="store_true", help="8 held-out prompts, evaluated every step (plumbing only)")
    p.add_argument("--workdir", default="runs/real_model", help="run folders of the arms")
    p.add_argument("--jobs", type=int, default=1, help="arms run at once (each with --threads threads)")
    p.add_argument("--reuse", action="store_true", help="keep the results of arms already in --workdir")
    p.add_argument("--out", default=None, help="JSON results (default: <workdir>/results.json)")
    p.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm in this process
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.arm:
        child(a)
        return 0
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    jobs = []
    for seed in a.seeds:
        for arm in a.arms:
            out = Path(a.workdir) / f"{arm}-s{seed}.json"
            if a.reuse and out.exists():
                print(f"{arm} seed {seed}: reusing {out}", flush=True)
                continue
            jobs.append(([sys.executable, __file__, "--arm", arm, "--seed", str(seed), "--result", str(out),
                          "--config", a.config, "--steps", str(a.steps), "--gvpo-steps", str(a.gvpo_steps),
                          "--threads", str(a.threads),
                          "--workdir", a.workdir, *(["--quick"] if a.quick else []), "--set", *a.set],
                         f"{arm} seed {seed}"))
    running = []
    while jobs or running:  # at most --jobs arms at once, each in its own process with --threads threads
        while jobs and len(running) < a.jobs:
            cmd, name = jobs.pop(0)
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[1:])}", flush=True)
            running.append((subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL if not a.quick else None), name))
        time.sleep(1)
        for proc, name in [r for r in running if r[0].poll() is not None]:
            running.remove((proc, name))
            if proc.returncode:
                print(f"{name} failed (exit {proc.returncode}); rerun its command above to see why", flush=True)
    results = [json.loads(out.read_text()) for seed in a.seeds for arm in a.arms
               if (out := Path(a.workdir) / f"{arm}-s{seed}.json").exists()]
    targets_by_seed = {s: {r["arm"]: r["evals"][-1]["accuracy"] for r in results if r["seed"] == s
                           and r["arm"] in REFERENCES} for s in a.seeds}
    names = [n for n in REFERENCES if any(n in t for t in targets_by_seed.values())]
    rows = [summarise(r, targets_by_seed[r["seed"]], a.steps) for r in results]
    shown = {n: statistics.mean(t[n] for t in targets_by_seed.values() if n in t) for n in names}
    print(table(rows, shown))
    if len(a.seeds) > 1:
        print(across_seeds(rows, names))
    path = Path(a.out or Path(a.workdir) / "results.json")
    path.write_text(json.dumps({"config": a.config, "set": a.set, "steps": a.steps, "gvpo_steps": a.gvpo_steps,
                                "seeds": a.seeds,
                                "threads": a.threads, "rows": rows, "runs": results}, indent=1))
    print(f"results: {path}")
    return 0 if len(results) == len(a.seeds) * len(a.arms) else 1


if __name__ == "__main__":
    sys.exit(main())
