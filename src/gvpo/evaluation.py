"""Evaluation on the GVPO paper's benchmarks: pass@1 with greedy decoding, or avg@n over n samples.

The paper's Table 1 reports pass@1 on AMC, MATH500, Minerva and OlympiadBench and avg@32 on AIME24
(graded there with xVerify; here with gvpo.rewards.math, see its docstring). `evaluate` generates with any
rollout engine, grades, writes one JSON file per benchmark, and returns scores that `format_table` prints
in the layout of Table 1.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from gvpo.data import encode_prompts, format_prompt, load_benchmark
from gvpo.rewards.math import score_completions
from gvpo.types import SamplingParams

# Table 1's columns, in its order: (benchmark name for load_benchmark, column title)
PAPER_COLUMNS = (("aime24", "AIME24"), ("amc23", "AMC"), ("math500", "MATH500"), ("minerva", "Minerva"),
                 ("olympiadbench", "OlympiadBench"))
PAPER_BENCHMARKS = tuple(name for name, _ in PAPER_COLUMNS)
_TITLES = dict(PAPER_COLUMNS) | {"gsm8k": "GSM8K", "math_train": "MATH train"}


def _num_samples(n: int | Mapping[str, int], name: str) -> int:
    k = n.get(name, 1) if isinstance(n, Mapping) else n
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"n={n!r}: the number of samples per problem must be an int >= 1 (for {name})")
    return k


def _decode(rollout, tokenizer, num_prompts: int) -> list[list[str]]:
    """Completion texts grouped by prompt, using `prompt_index` rather than assuming the row order."""
    texts: list[list[str]] = [[] for _ in range(num_prompts)]
    for p, ids in zip(rollout.prompt_index.tolist(), rollout.token_lists()):
        texts[p].append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts


def _generator(model, seed: int) -> torch.Generator:
    device = "cpu"
    if isinstance(model, torch.nn.Module):
        device = next(model.parameters()).device
    return torch.Generator(device=device).manual_seed(seed)


def evaluate_benchmark(
    model, tokenizer, engine, name: str, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
    max_new_tokens: int = 1024, limit: int | None = None, template: str = "qwen_math", data_dir=None,
    batch_size: int = 64, seed: int = 0, timeout_s: float | None = None,
) -> dict:
    """One benchmark: {"score", "metric", "n", "num_problems", "ungradable", "seconds", "problems": [...]}."""
    start = time.perf_counter()
    rows = load_benchmark(name, data_dir=data_dir)[: limit if limit else None]
    prompts = encode_prompts([format_prompt(r["problem"], tokenizer, template) for r in rows], tokenizer, template)
    # Prompts longer than the tokenizer's model_max_length (256 for the embedded model, far shorter than
    # competition problems): counted and reported instead of the tokenizer's "indexing errors" warning.
    # RoPE models still run on them; whether the model is any good that far is another matter.
    max_length = getattr(tokenizer, "model_max_length", None)
    too_long = sum(len(p) > max_length for p in prompts) if isinstance(max_length, int) and max_length < 10**9 else 0
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    generator = _generator(model, seed) if temperature > 0 else None
    completions: list[list[str]] = []
    with torch.no_grad():
        for first in range(0, len(prompts), batch_size):
            chunk = prompts[first : first + batch_size]
            rollout = engine.generate(chunk, n, params, generator=generator)
            completions += _decode(rollout, tokenizer, len(chunk))
    if any(len(group) != n for group in completions):
        raise RuntimeError(f"the engine returned {[len(g) for g in completions]} completions per prompt, not {n}")
    flat = [text for group in completions for text in group]
    scores, extracted = score_completions(flat, [r["answer"] for r in rows for _ in range(n)], timeout_s)
    problems = []
    for p, row in enumerate(rows):
        mine = [0.0 if s is None else s for s in scores[p * n : (p + 1) * n]]
        problems.append({
            "id": row["id"], "problem": row["problem"], "answer": row["answer"], "predictions": completions[p],
            "extracted": extracted[p * n : (p + 1) * n], "scores": mine, "score": sum(mine) / n,
        })
    return {
        "benchmark": name,
        "metric": "pass@1" if n == 1 else f"avg@{n}",
        "score": sum(p["score"] for p in problems) / max(len(problems), 1),
        "n": n,
        "num_problems": len(problems),
        "ungradable": sum(s is None for s in scores),  # gold answer could not be parsed: scored 0
        "prompts_over_max_length": too_long,
        "model_max_length": max_length,
        "seconds": time.perf_counter() - start,
        "problems": problems,
    }


def evaluate(
    model, tokenizer, engine=None, benchmarks: list[str] | tuple[str, ...] = PAPER_BENCHMARKS,
    n: int | Mapping[str, int] = 1, temperature: float = 0.0, max_new_tokens: int = 1024,
    limit: int | None = None, template: str = "qwen_math", data_dir=None, output_dir=None,
    batch_size: int = 64, top_p: float = 1.0, seed: int = 0, timeout_s: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Generate, grade and score each benchmark; write `output_dir/<benchmark>.json` when output_dir is set.

    engine: an object with `generate(prompt_ids, num_generations, params, generator) -> Rollout`; None
        builds `gvpo.rollout.make_engine("hf", model, tokenizer)`.
    n: samples per problem, an int or {benchmark: n} (others 1), e.g. {"aime24": 32} for the paper's avg@32.
        n > 1 needs temperature > 0. The score is the mean over problems of the mean over samples.
    limit: the first `limit` problems of each benchmark (a quick look; the scores then are not comparable).
    batch_size: prompts per engine call (each with n completions).
    Returns {"settings": {...}, "benchmarks": {name: {"score" (0-1), "metric", "n", "num_problems", ...}}}.
    """
    for name in benchmarks:
        if _num_samples(n, name) > 1 and temperature == 0:
            raise ValueError(
                f"n={_num_samples(n, name)} for {name} with temperature=0: greedy decoding gives n identical "
                f"samples; set temperature > 0 (e.g. 0.6) for avg@n, or n=1"
            )
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if engine is None:
        from gvpo.rollout import make_engine

        engine = make_engine("hf", model, tokenizer)
    settings = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "limit": limit,
                "template": template, "seed": seed, "n": dict(n) if isinstance(n, Mapping) else n}
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    was_training = bool(getattr(model, "training", False))
    if was_training:
        model.eval()
    summary = {}
    try:
        for name in benchmarks:
            result = evaluate_benchmark(
                model, tokenizer, engine, name, n=_num_samples(n, name), temperature=temperature, top_p=top_p,
                max_new_tokens=max_new_tokens, limit=limit, template=template, data_dir=data_dir,
                batch_size=batch_size, seed=seed, timeout_s=timeout_s,
            )
            if out is not None:
                result["file"] = str(out / f"{name}.json")
                with open(result["file"], "w", encoding="utf-8") as f:
                    json.dump({**result, "settings": settings}, f, indent=1, ensure_ascii=False)
            summary[name] = {k: v for k, v in result.items() if k != "problems"}
            if progress is not None:
                s = summary[name]
                written = f"; wrote {s['file']}" if out is not None else ""
                progress(f"{name}: {s['metric']} = {100 * s['score']:.2f} on {s['num_problems']} problems "
                         f"({s['seconds']:.0f} s){written}")
    finally:
        if was_training:
            model.train()
    return {"settings": settings, "benchmarks": summary}


def format_table(results: Mapping, label: str = "model") -> str:
    """A Markdown table in the layout of the paper's Table 1: scores in percent, 2 decimals, "-" if absent.

    results: what `evaluate` returns (one row, named `label`), or {row label: evaluate(...) result}.
    Columns: AIME24 | AMC | MATH500 | Minerva | OlympiadBench for those evaluated, then any others.
    """
    rows = {label: results} if "benchmarks" in results else dict(results)
    present = {name for r in rows.values() for name in r["benchmarks"]}
    names = [b for b in PAPER_BENCHMARKS if b in present] + sorted(present - set(PAPER_BENCHMARKS))
    lines = ["| | " + " | ".join(_TITLES.get(b, b) for b in names) + " |", "|---" * (len(names) + 1) + "|"]
    for row_label, result in rows.items():
        cells = []
        for b in names:
            entry = result["benchmarks"].get(b)
            cells.append(f"{100 * entry['score']:.2f}" if entry else "-")
        lines.append(f"| {row_label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@torch.no_grad()
def held_out_accuracy(engine, tokenizer, rows, reward_func, config, accelerator, trainer_state=None) -> float:
    """The training loop's greedy held-out accuracy: the mean of ``reward_func`` (an unscorable answer counts 0)
    over ``rows``, split across processes."""
    from gvpo.scoring import score_rollout

    if not rows:
        return math.nan
    mine = rows[accelerator.process_index::accelerator.num_processes]
    params = SamplingParams(max_new_tokens=config.eval.eval_max_completion_length or config.rollout.max_completion_length,
                            temperature=0.0, stop_strings=config.rollout.stop_strings)
    total = torch.zeros(2, device=accelerator.device)
    for start in range(0, len(mine), 256):
        chunk = mine[start:start + 256]
        rollout = engine.generate([r["prompt_ids"] for r in chunk], 1, params)
        values, _ = score_rollout([reward_func], [1.0], tokenizer, rollout,
                                  [chunk[i] for i in rollout.prompt_index.tolist()], trainer_state,
                                  config.algorithm.reward_timeout)
        total += torch.tensor([sum(0.0 if math.isnan(v) else v for v in values), len(values)],
                              device=accelerator.device)
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1]).item()
