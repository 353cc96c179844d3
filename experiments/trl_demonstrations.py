"""Demonstrations through TRL: GVPOTrainer (gvpo.integrations.trl) with and without one worked solution per group,
on `arithmetic_long` (the embedded base model never succeeds), in the regime of experiments/demonstrations.py.

    python experiments/trl_demonstrations.py run --arm gvpo_demos --seed 0     # one run, into runs/trl_demonstrations/
    python experiments/trl_demonstrations.py report                           # the table of docs/demonstrations.md

Regime: 8 prompts x k = 8 per generation, cut into 2 optimizer steps (steps_per_generation = 2: pi_theta' = the
policy that generated the batch, as the 2 mini-batches of experiments/demonstrations.py), 40 generations, lr 1e-4
(constant), grad-norm clip 1, temperature 1, beta 0.1, completion budget 68 tokens. Final checkpoint: greedy
accuracy and step accuracy on the same 400 held-out problems as experiments/demonstrations.py's final_eval.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from demonstrations import BUDGET, FINAL_EVAL, step_accuracy  # noqa: E402

ROOT = Path("runs/trl_demonstrations")
TASK = "arithmetic_long"
ARMS = {"gvpo": {}, "gvpo_demos": {"demonstration_column": "solution", "demonstrations_per_group": 1}}


def run(arm: str, seed: int, generations: int = 40) -> None:
    import torch
    from datasets import Dataset

    from gvpo.assets import default_model_path
    from gvpo.integrations.trl import GVPOConfig, GVPOTrainer
    from gvpo.modeling import load_model_and_tokenizer
    from gvpo.rollout import make_engine
    from gvpo.tasks import arithmetic_reward, make_dataset
    from gvpo.types import SamplingParams

    torch.set_num_threads(1)
    out = ROOT / arm / f"s{seed}"
    rows = make_dataset(TASK, "train", 2000, seed=seed)
    data = Dataset.from_dict({key: [r[key] for r in rows] for key in ("prompt", "answer", "solution")})
    _, tokenizer = load_model_and_tokenizer("default", "float32", False)
    args = GVPOConfig(output_dir=str(out), use_cpu=True, bf16=False, report_to="none", seed=seed, beta=0.1,
                      num_generations=8, per_device_train_batch_size=32, gradient_accumulation_steps=1,
                      steps_per_generation=2, max_steps=2 * generations, max_completion_length=BUDGET[TASK],
                      temperature=1.0, learning_rate=1e-4, lr_scheduler_type="constant", max_grad_norm=1.0,
                      logging_steps=1, save_strategy="no", dataloader_num_workers=0, **ARMS[arm])
    trainer = GVPOTrainer(model=str(default_model_path()), reward_funcs=arithmetic_reward, args=args,
                          train_dataset=data, processing_class=tokenizer)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    model = trainer.model.eval()
    test = make_dataset(TASK, "test", FINAL_EVAL, seed=12345)
    greedy = make_engine("fast", model, tokenizer).generate(
        [tokenizer(r["prompt"])["input_ids"] for r in test], 1, SamplingParams(max_new_tokens=BUDGET[TASK], temperature=0.0))
    texts = tokenizer.batch_decode(greedy.token_lists(), skip_special_tokens=True)
    log = [h for h in trainer.state.log_history if "loss" in h]
    # The policy's own samples (TRL's `reward` mixes demonstrations in): last 10 generations.
    own = [h.get("demonstrations/sampled_reward_mean", h.get("reward")) for h in log if "reward" in h][-10:]
    result = {"arm": arm, "seed": seed, "train_seconds": seconds,
              "accuracy": sum(arithmetic_reward(None, texts, [r["answer"] for r in test])) / len(test),
              "step_accuracy": sum(step_accuracy(t, r["solution"]) for t, r in zip(texts, test)) / len(test),
              "sampled_reward_last10": sum(own) / len(own), "example": texts[0]}
    (out / "result.json").write_text(json.dumps(result))
    print(json.dumps(result), flush=True)


def report() -> None:
    results = [json.loads(p.read_text()) for p in sorted(ROOT.glob("*/s*/result.json"))]
    print("| arm | seeds | final accuracy (400) | final step accuracy (400) | sampled reward, last 10 generations |")
    print("|---|---|---|---|---|")
    for arm in ARMS:
        runs = [r for r in results if r["arm"] == arm]
        if runs:
            cells = [", ".join(f"{r[key]:.3f}" for r in runs) for key in
                     ("accuracy", "step_accuracy", "sampled_reward_last10")]
            print(f"| {arm} | {[r['seed'] for r in runs]} | " + " | ".join(cells) + " |")
    by = {(r["arm"], r["seed"]): r for r in results}
    pairs = [(by[("gvpo_demos", s)], by[("gvpo", s)]) for a, s in by if a == "gvpo" and ("gvpo_demos", s) in by]
    for key in ("accuracy", "step_accuracy"):
        diffs = [d[key] - g[key] for d, g in pairs]
        if diffs:
            print(f"paired by seed, demos - on-policy, {key}: {', '.join(f'{x:+.3f}' for x in diffs)} "
                  f"(mean {statistics.mean(diffs):+.3f})")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("run", "report"))
    parser.add_argument("--arm", choices=sorted(ARMS), default="gvpo_demos")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generations", type=int, default=40, help="generation batches (2 optimizer steps each)")
    a = parser.parse_args()
    run(a.arm, a.seed, a.generations) if a.what == "run" else report()


if __name__ == "__main__":
    main()
