"""One training step of ours (GVPO) against TRL's GRPOTrainer on the same work, same run, alternating blocks.

Same model (the embedded default), tokenizer, prompts (the arithmetic task), k, completion length and reward
(`gvpo.tasks.arithmetic_reward`). TRL is configured as a user would for this work: no reference model
(beta = 0), one update per batch (num_iterations = 1, steps_per_generation = 1), HF generate, CPU, fp32.
A step = generate k completions for every prompt + score + forward/backward + optimizer step.

Blocks of `--steps` steps alternate between the two (`--blocks` each); the first step of every block is a
warm-up and is dropped; medians are reported. Also prints each one's fraction of the FLOP limit: model FLOPs
(generation 2*P per token, training forward+backward 6*P per token) over the fp32 matmul throughput measured
in the same run. Needs `pip install gvpo[trl]`.

    .venv/bin/python benchmarks/train_step.py [--prompts 32] [--k 8] [--tokens 40] [--steps 6] [--blocks 3]

The last line is JSON with `ratio_vs_trl` (ours / TRL seconds per step; the goal is <= 0.7).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from rollout import matmul_gflops  # noqa: E402  (same directory)

from gvpo.config import load_config  # noqa: E402
from gvpo.modeling import resolve_model_path  # noqa: E402
from gvpo.tasks import arithmetic_reward, make_dataset  # noqa: E402
from gvpo.trainer import setup, train_step  # noqa: E402


def ours(args, rows, out):
    config = load_config(None, {
        "output_dir": out, "prompts_per_step": args.prompts, "num_generations": args.k,
        "max_completion_length": args.tokens, "learning_rate": 1e-6, "max_steps": 10**6, "progress_bar": False,
    })
    run = setup(config, reward_funcs=[arithmetic_reward], train_rows=rows, eval_rows=rows[:1])
    step = [0]

    def one():
        step[0] += 1
        start = time.perf_counter()
        m = train_step(run, step[0])
        return time.perf_counter() - start, m["completion_length"]

    return one, run.policy


def trl(args, rows, out):
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    path = resolve_model_path("default")
    tokenizer = AutoTokenizer.from_pretrained(path)
    times, lengths = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.start)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    def build(steps):
        cfg = GRPOConfig(
            output_dir=out, per_device_train_batch_size=args.prompts * args.k, num_generations=args.k,
            gradient_accumulation_steps=1, max_completion_length=args.tokens, learning_rate=1e-6, beta=0.0,
            num_iterations=1, max_steps=steps, logging_steps=1, save_strategy="no", report_to="none",
            use_cpu=True, bf16=False, temperature=1.0, seed=0, disable_tqdm=True, dataloader_num_workers=0)
        from transformers.trainer_callback import PrinterCallback

        trainer = GRPOTrainer(model=path, reward_funcs=arithmetic_reward, args=cfg, processing_class=tokenizer,
                              train_dataset=Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]}
                                                               for r in rows]), callbacks=[Timer()])
        trainer.remove_callback(PrinterCallback)  # per-step log dicts would bury the table
        return trainer

    def block(steps):
        times.clear()
        trainer = build(steps)
        trainer.train()
        return list(times), list(lengths)

    return block


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--blocks", type=int, default=3)
    args = p.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    rows = make_dataset("arithmetic", "train", n=2000, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        ours_step, model = ours(args, rows, f"{tmp}/ours")
        trl_block = trl(args, rows, f"{tmp}/trl")
        t_ours, t_trl, len_ours, len_trl = [], [], [], []
        for _ in range(args.blocks):
            block = [ours_step() for _ in range(args.steps)]
            t_ours += [t for t, _ in block[1:]]
            len_ours += [n for _, n in block]
            times, lengths = trl_block(args.steps)
            t_trl += times[1:]
            len_trl += lengths
        gflops = matmul_gflops()
    params = sum(p.numel() for p in model.parameters())
    n = args.prompts * args.k
    prompt_len = statistics.mean(len(r["prompt"]) for r in rows[:64])  # character-level tokenizer
    def limit(mean_len):
        flops = 2 * params * (args.prompts * prompt_len + n * mean_len) + 6 * params * n * (prompt_len + mean_len)
        return flops / (gflops * 1e9)

    m_ours, m_trl = statistics.median(t_ours), statistics.median(t_trl)
    l_ours, l_trl = statistics.mean(len_ours), statistics.mean(len_trl) if len_trl else float("nan")
    import trl as trl_pkg

    print(f"# train step: {args.prompts} prompts x k={args.k}, <= {args.tokens} new tokens, default model "
          f"({params:,} params), CPU fp32, {torch.get_num_threads()} threads, trl {trl_pkg.__version__}, "
          f"matmul {gflops:.0f} GFLOP/s; {len(t_ours)} + {len(t_trl)} timed steps")
    print(f"{'trainer':<22}{'median s/step':>14}{'mean completion len':>20}{'FLOP-limit fraction':>21}")
    print(f"{'gvpo (ours)':<22}{m_ours:>14.3f}{l_ours:>20.1f}{limit(l_ours) / m_ours:>21.3f}")
    print(f"{'TRL GRPOTrainer':<22}{m_trl:>14.3f}{l_trl:>20.1f}{limit(l_trl) / m_trl:>21.3f}")
    print(json.dumps({"ratio_vs_trl": round(m_ours / m_trl, 3), "ours_s": round(m_ours, 4), "trl_s": round(m_trl, 4)}))


if __name__ == "__main__":
    main()
