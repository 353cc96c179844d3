"""Reward callables, called as TRL calls them (keywords only): `f(prompts=, completions=, **columns)`.

math-verify is imported only inside the grader's worker processes (install it with `pip install gvpo[math]`).
"""

from gvpo.rewards.math import (
    boxed_format,
    configure_grader,
    extract_answer,
    grader_metrics,
    math_accuracy,
    score_completions,
    shutdown_grader,
)

__all__ = [
    "boxed_format",
    "configure_grader",
    "extract_answer",
    "grader_metrics",
    "math_accuracy",
    "score_completions",
    "shutdown_grader",
]
