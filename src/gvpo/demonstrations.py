"""Demonstrations inside RL groups: a dataset's worked solutions join their prompt's group.

GVPO's optimum pi* = pi_theta' exp(R / beta) / Z holds for any sampler that covers pi_theta' (Corollary 3.2)
and any group size (Corollary 3.5), so a group may mix the policy's samples with responses from anywhere.
A demonstration therefore enters the GVPO loss as it is: no behaviour log-probs, no importance ratio. Its
implicit reward beta * (s - o) uses pi_theta' as configured, like every other response of the group.

Per step and prompt, up to ``d = demonstrations_per_group`` demonstrations are taken from the row's
``demonstration_column`` (a string or a list of strings; a longer list is sampled without replacement,
seeded per prompt so that any number of processes picks the same) and ``num_generations - h - d`` fresh
samples are generated (h = replayed responses): the group keeps k responses, as LUFFY's 7 + 1 groups, so the
training pass costs the same as without demonstrations and generation slightly less.

A demonstration is tokenized as a completion: its text, then EOS (what a generated completion ends with),
cut at ``max_completion_length`` like a generation that ran out of budget. It is scored by the same reward
functions (a demonstration that scores None leaves its group, like any response), never stored in the replay
buffer (it is re-read from the dataset each time), and marked ``is_demonstration``. Its behaviour log-probs
are NaN, so any code path that used them would fail loudly instead of silently treating it as sampled.
"""

from __future__ import annotations

import torch

from gvpo.scoring import score_rollout
from gvpo.types import DEMONSTRATION, Groups, tokens_to_rollout


def per_group(settings) -> int:
    """d, the demonstrations that join each group (0 when no column is set). ``settings``: what holds
    ``demonstration_column`` and ``demonstrations_per_group`` (gvpo's ``config.data``, TRL's ``GVPOConfig``)."""
    return settings.demonstrations_per_group if settings.demonstration_column else 0


def pick(rows: list[dict], config, tokenizer, seeds: list[int]) -> list[list[list[int]]]:
    """Per prompt, up to d demonstrations as completion token ids (EOS appended, cut at the budget)."""
    d = per_group(config.data)
    if not d:
        return [[] for _ in rows]
    column, budget = config.data.demonstration_column, config.rollout.max_completion_length
    return [[tokenize(t, tokenizer, budget) for t in choose(row, column, d, seed)] for row, seed in zip(rows, seeds)]


def choose(row: dict, column: str, d: int, seed: int) -> list[str]:
    """Up to ``d`` of the row's demonstrations: all of them if there are at most d, else d drawn without
    replacement (in their column order) from a stream that depends only on ``seed`` (the prompt's)."""
    options = texts(row, column)
    if len(options) <= d:
        return options
    order = torch.randperm(len(options), generator=torch.Generator().manual_seed(_demo_seed(seed)))
    return [options[i] for i in sorted(order[:d].tolist())]


def check(rows: list[dict], config) -> None:
    """Every training row holds demonstrations of the right type (before anything is written or loaded)."""
    if per_group(config.data):
        for row in rows:
            texts(row, config.data.demonstration_column)


def tokenize(text: str, tokenizer, max_completion_length: int) -> list[int]:
    """A demonstration as a generated completion would be: its tokens, EOS, at most the generation budget."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids[:max_completion_length]


def add(groups: Groups, demos: list[list[list[int]]], rows: list[dict], tokenizer, reward_funcs, reward_weights,
        trainer_state=None, reward_timeout: float = 0.0) -> Groups:
    """``groups`` with the demonstrations ``demos[p]`` of each prompt p appended, scored exactly as sampled
    completions are (TRL's keyword call, chat completions as messages, timeout; in a call of their own, so the
    samples' reward metrics stay the samples'), each with its prompt's index: it joins its own group only."""
    pairs = [(p, ids) for p, group in enumerate(demos) for ids in group]
    if not pairs:
        return groups
    pad = tokenizer.pad_token_id
    rollout = tokens_to_rollout([p for p, _ in pairs], [ids for _, ids in pairs], None,
                                groups.rollout.completion_ids.device, pad)
    rewards, _ = score_rollout(reward_funcs, reward_weights, tokenizer, rollout, [rows[p] for p, _ in pairs],
                               trainer_state, reward_timeout)
    return groups.extend(rollout, rewards, DEMONSTRATION, pad_token_id=pad)


def texts(row: dict, column: str) -> list[str]:
    """The row's demonstrations as a list (a single string is a list of one); a clear error otherwise."""
    if column not in row:
        raise ValueError(f"demonstration_column={column!r}: a training row has no such column (it has "
                         f"{', '.join(sorted(k for k in row if k != 'prompt_ids'))}); name the column that holds "
                         "the demonstrated completion")
    value = row[column]
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"demonstration_column={column!r}: expected a completion string or a list of them per row, "
                         f"got {type(value).__name__}")
    return list(texts)


def _demo_seed(seed: int) -> int:
    """A seed for the demonstration pick, distinct from the generation and replay streams of ``seed``."""
    return (seed * 2862933555777941757 + 3037000493) % 2**63
