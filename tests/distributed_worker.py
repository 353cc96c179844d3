"""Run by tests/test_distributed.py and tests/test_async.py under torchrun: a few training steps on the tiny model."""

import sys

from gvpo.config import load_config
from gvpo.trainer import train


def sevens(prompts, completions, **kwargs):
    return [c.count("7") / max(len(c), 1) for c in completions]


class CrashAt:
    """``sevens`` that raises on every rank at its n-th call (the same step everywhere: one call per step)."""

    __name__ = "sevens"

    def __init__(self, n):
        self.calls, self.n = 0, n

    def __call__(self, prompts, completions, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise SystemExit(3)
        return sevens(prompts, completions)


def run(model_dir: str, out: str, steps: int, replay: int, extra: list[str] = ()) -> dict:
    """``extra``: more key=value overrides (e.g. rollout_workers=1, engine=hf, save_steps=2, resume=true);
    ``crash_at=N`` (not a config field) makes the reward stop every rank at its N-th call (the initial
    evaluation, then one call per step)."""
    overrides = dict(arg.split("=", 1) for arg in extra)
    crash_at = int(overrides.pop("crash_at", 0))
    # Two demonstrations per row (a "solution" column), so the seeded pick of one (d = 1) is exercised too.
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "solution": [f"{a}+{b}={a + b}", f"{a + b}"]}
            for a in range(10, 30) for b in range(10, 20)]
    if replay:  # few prompts, so that they recur and find their history (on whichever rank they land)
        rows = rows[:12]
    config = load_config(None, {
        "model_name_or_path": model_dir, "output_dir": out, "max_steps": steps, "prompts_per_step": 8,
        "num_generations": 4, "max_completion_length": 8, "learning_rate": 1e-2, "eval_steps": 0,
        "save_steps": 0, "progress_bar": False, "seed": 0, "num_mini_batches": 2, "num_historical": replay,
        **overrides,
    })
    return train(config, reward_funcs=[CrashAt(crash_at) if crash_at else sevens], train_rows=rows,
                 eval_rows=rows[:8])


def record_group_at_exit(out) -> None:
    """At interpreter exit, after every atexit hook registered later (gvpo's among them: atexit runs them last
    in, first out), write whether torch.distributed's default group was still alive, and how many DDP models
    still held it, to OUT/exit_rank<R>.json."""
    import atexit
    import json
    import os
    from pathlib import Path

    def record():
        import gc

        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        alive = dist.is_available() and dist.is_initialized()
        # A DDP model whose reducer survives keeps the group alive past destroy_process_group (gvpo.process_group)
        holding = sum(isinstance(o, DistributedDataParallel) and "reducer" in vars(o) for o in gc.get_objects())
        Path(out, f"exit_rank{os.environ.get('RANK', '0')}.json").write_text(
            json.dumps({"group_alive": alive, "ddp_models_holding_the_group": holding}))

    atexit.register(record)


if __name__ == "__main__":
    record_group_at_exit(sys.argv[2])
    run(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
