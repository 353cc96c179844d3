"""Reward functions by name, and scoring a batch of completions with several of them.

A reward function is a TRL-compatible callable ``f(prompts, completions, **columns) -> list[float | None]``,
where ``columns`` are the dataset's other columns, one value per completion. ``None`` means "cannot score":
that response leaves its group (it is never silently a zero).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from typing import Callable, Sequence

RewardFunc = Callable[..., list]


class RewardError(RuntimeError):
    """A reward function raised or returned something unusable; the message names it."""


def _builtin(name: str) -> RewardFunc | None:
    if name == "arithmetic":
        from gvpo.tasks import arithmetic_reward

        return arithmetic_reward
    if name == "math_accuracy":
        from gvpo.rewards.math import math_accuracy

        return math_accuracy
    if name == "boxed_format":
        from gvpo.rewards.math import boxed_format

        return boxed_format
    return None


BUILTIN_REWARDS = ("arithmetic", "math_accuracy", "boxed_format")


def resolve_reward(spec: str | RewardFunc) -> RewardFunc:
    """A callable as is, a built-in name, or ``"package.module:function"``."""
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
    raise ValueError(
        f"reward_funcs: unknown reward {spec!r}; use one of {', '.join(BUILTIN_REWARDS)} or 'module:function'"
    )


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


def reward_name(func: RewardFunc) -> str:
    return getattr(func, "__name__", type(func).__name__)


def score(funcs: Sequence[RewardFunc], weights: Sequence[float], prompts: list[str], completions: list[str],
          columns: dict[str, list]) -> tuple[list[float], dict[str, float]]:
    """Weighted sum of the reward functions per completion; NaN where any function returned None.

    Returns the totals and, per function, the mean of the values it could score (``rewards/<name>``).
    """
    n = len(completions)
    totals = [0.0] * n
    metrics = {}
    for func, weight in zip(funcs, weights):
        name = reward_name(func)
        try:
            values = func(prompts, completions, **columns)
        except Exception as e:  # the run stops here; no checkpoint is written mid-step, so the last stays whole
            raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
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
    return totals, metrics
