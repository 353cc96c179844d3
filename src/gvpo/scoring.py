"""Reward functions by name, and scoring a batch of completions with several of them.

A reward function is called exactly as TRL 1.16's GRPOTrainer calls it, with keywords only::

    f(prompts=..., completions=..., completion_ids=..., trainer_state=..., log_metric=..., log_extra=..., **columns)
    -> list[float | None]

``columns`` are the dataset's other columns, one value per completion. For a conversational dataset (the
prompt is a list of ``{"role", "content"}`` messages) ``prompts`` are those lists and each completion is
``[{"role": "assistant", "content": text}]``. ``None`` means "cannot score": that response leaves its group
(it is never silently a zero). See :mod:`gvpo.rewards.calling` for async functions and the time limit.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from gvpo.rewards.calling import RewardError, RewardTimeout, call_rewards, check_signature, reward_name

RewardFunc = Callable[..., list]
__all__ = ["RewardError", "RewardTimeout", "resolve_reward", "reward_name", "score", "score_rollout", "check_rewards",
           "check_signature", "make_trainer_state", "BUILTIN_REWARDS"]


def _builtin(name: str) -> RewardFunc | None:
    if name == "arithmetic":
        from gvpo.tasks import arithmetic_reward

        return arithmetic_reward
    if name == "final_number":
        from gvpo.tasks import final_number_reward

        return final_number_reward
    if name == "math_accuracy":
        from gvpo.rewards.math import math_accuracy

        return math_accuracy
    if name == "boxed_format":
        from gvpo.rewards.math import boxed_format

        return boxed_format
    return None


BUILTIN_REWARDS = ("arithmetic", "final_number", "math_accuracy", "boxed_format")


def resolve_reward(spec: str | RewardFunc) -> RewardFunc:
    """A callable as is, a built-in name, ``"package.module:function"``, or a reward model
    (``AutoModelForSequenceClassification`` with one label: its folder, hub id or the loaded model), scored on
    prompt + completion as TRL does."""
    if hasattr(spec, "config") and hasattr(spec, "parameters"):  # a loaded reward model, as TRL accepts one
        from gvpo.rewards.model import RewardModel

        return RewardModel.from_model(spec)
    if callable(spec):
        return spec
    func = _builtin(spec)
    if func is not None:
        return func
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            return getattr(_import_from_cwd(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward_funcs: cannot import {spec!r} ({e}); check the module path and name") from e
    if Path(spec).expanduser().is_dir() or spec.count("/") == 1:  # a local folder or a hub id "org/name"
        from gvpo.rewards.model import RewardModel

        return RewardModel.load(spec)
    raise ValueError(
        f"reward_funcs: unknown reward {spec!r}; use one of {', '.join(BUILTIN_REWARDS)}, 'module:function', or "
        f"the folder of a reward model (AutoModelForSequenceClassification)"
    )


def make_trainer_state(global_step: int, max_steps: int, is_main_process: bool = True):
    """What TRL hands reward functions as ``trainer_state``: a transformers ``TrainerState``. As in TRL, steps
    count optimizer updates."""
    from transformers import TrainerState

    return TrainerState(global_step=global_step, max_steps=max_steps, is_world_process_zero=is_main_process,
                        is_local_process_zero=is_main_process)
def _import_from_cwd(module: str):
    """Import ``module`` as ``python -m`` would: the current directory first on the path.

    The ``gvpo`` console script starts with its own bin folder on ``sys.path``, not the current directory, so
    ``reward_funcs=my_rewards:exact`` next to the user's data would not import; the folder is put in front
    only when the plain import does not find the module.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != module.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
    sys.path.insert(0, cwd)
    return importlib.import_module(module)


def score(funcs: Sequence[RewardFunc], weights: Sequence[float], prompts: list, completions: list,
          columns: dict[str, list], *, completion_ids: list[list[int]] | None = None, trainer_state=None,
          timeout_s: float = 0.0) -> tuple[list[float], dict[str, float]]:
    """Weighted sum of the reward functions per completion; NaN where any function returned None.

    Returns the totals and the metrics: per function, the mean of the values it could score
    (``rewards/<name>``), and the mean of each value the functions passed to ``log_metric(name, value)``.
    """
    n = len(completions)
    logged: dict[str, list[float]] = {}
    kwargs = {
        "prompts": prompts, "completions": completions,
        "completion_ids": completion_ids if completion_ids is not None else [[] for _ in completions],
        **columns, "trainer_state": trainer_state,
        "log_metric": lambda name, value: logged.setdefault(name, []).append(float(value)),
        "log_extra": lambda column, values: None,  # TRL's completions table; gvpo has none: accepted, dropped
    }
    outputs = call_rewards(funcs, kwargs, timeout_s)
    totals = [0.0] * n
    metrics = {}
    for func, weight, values in zip(funcs, weights, outputs):
        name = reward_name(func)
        if values is None or len(values) != n:
            got = "None" if values is None else f"{len(values)} values"
            raise RewardError(f"reward function {name!r} returned {got} for {n} completions; return one per completion")
        scored = []
        for i, v in enumerate(values):
            if v is None or (isinstance(v, float) and math.isnan(v)):
                totals[i] = math.nan
                continue
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise RewardError(f"reward function {name!r} returned {v!r} at index {i}; return a float or None") from None
            if math.isinf(v):
                raise RewardError(f"reward function {name!r} returned {v} at index {i}; return a finite float or None")
            scored.append(v)
            totals[i] += weight * v
        metrics[f"rewards/{name}"] = sum(scored) / len(scored) if scored else math.nan
    metrics.update({name: sum(values) / len(values) for name, values in logged.items()})
    return totals, metrics


def reward_columns(row: dict) -> list[str]:
    """The dataset columns a reward function receives (TRL passes all but the prompt; prompt_ids are ours)."""
    return [k for k in row if k not in ("prompt", "prompt_ids")]


def check_rewards(funcs: Sequence[RewardFunc], train_rows: list[dict], eval_rows: list[dict]) -> None:
    """Refuse, before any model loads, a reward function that asks for a column the data lacks."""
    for func in funcs:
        check_signature(func, reward_columns(train_rows[0]), "dataset")
    if eval_rows:  # held-out accuracy is the first reward function's
        check_signature(funcs[0], reward_columns(eval_rows[0]), "eval_dataset")


def score_rollout(funcs, weights, tokenizer, rollout, rows: list[dict], trainer_state=None, timeout_s: float = 0.0):
    """:func:`score` for a rollout: completion i (decoded, as messages for chat prompts) came from ``rows[i]``."""
    from gvpo.data import as_completions, is_conversational

    ids = rollout.token_lists()
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    columns = {k: [r[k] for r in rows] for k in reward_columns(rows[0])}
    completions = as_completions(texts, is_conversational(rows[0]["prompt"]))
    return score(funcs, weights, [r["prompt"] for r in rows], completions, columns,
                 completion_ids=[list(x) for x in ids], trainer_state=trainer_state, timeout_s=timeout_s)
