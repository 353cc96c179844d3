"""Run by tests/test_distributed.py under torchrun: a few training steps on the tiny model."""

import sys

from gvpo.config import load_config
from gvpo.trainer import train


def sevens(prompts, completions, **kwargs):
    return [c.count("7") / max(len(c), 1) for c in completions]


if __name__ == "__main__":
    model_dir, out, steps, replay = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    demos = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    # Two demonstrations per row, so the seeded pick of one (d = 1) is exercised too.
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "solution": [f"{a}+{b}={a + b}", f"{a + b}"]}
            for a in range(10, 30) for b in range(10, 20)]
    if replay:  # few prompts, so that they recur and find their history (on whichever rank they land)
        rows = rows[:12]
    config = load_config(None, {
        "model_name_or_path": model_dir, "output_dir": out, "max_steps": steps, "prompts_per_step": 8,
        "num_generations": 4, "max_completion_length": 8, "learning_rate": 1e-2, "eval_steps": 0,
        "save_steps": 0, "progress_bar": False, "seed": 0, "num_mini_batches": 2, "num_historical": replay,
        "demonstration_column": "solution" if demos else "", "demonstrations_per_group": demos,
    })
    train(config, reward_funcs=[sevens], train_rows=rows, eval_rows=rows[:8])
