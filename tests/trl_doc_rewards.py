"""Reward functions as TRL's GRPO documentation writes them, copied unchanged (keyword-only calls, **kwargs).

Imported by tests/test_rewards_trl.py, and by `gvpo train reward_funcs=trl_doc_rewards:<name>`.
"""

import asyncio
import re

SEEN_STEPS: list[tuple[int, int]] = []  # (global_step, max_steps) that progress_reward saw


def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    matches = [re.match(pattern, content) for content in completions]
    return [1.0 if match else 0.0 for match in matches]


def accuracy_reward(completions, answer, **kwargs):
    """The issue's example: a column named as a parameter, the rest in **kwargs."""
    return [1.0 if c.strip().startswith(str(a)) else 0.0 for c, a in zip(completions, answer)]


def progress_reward(completions, trainer_state, **kwargs):
    """Reward shaping on training progress, as TRL's docs show with trainer_state."""
    SEEN_STEPS.append((trainer_state.global_step, trainer_state.max_steps))
    progress = trainer_state.global_step / max(trainer_state.max_steps, 1)
    return [progress * c.count("7") / max(len(c), 1) for c in completions]


async def async_reward(completions, **kwargs):
    await asyncio.sleep(0.001)  # e.g. a call to a judge model
    return [float(len(c) > 3) for c in completions]


def logging_reward(completions, log_metric, **kwargs):
    log_metric("mean_length", sum(len(c) for c in completions) / len(completions))
    return [0.0 for _ in completions]
