"""Synthetic verifiable tasks: multi-step addition with a worked solution.

A problem is a tuple of two-digit operands; the prompt is ``"23+45+17="`` and the demonstrated completion
chains the partial sums, then states the answer after a ``####`` marker::

    23+45=68,68+17=85 #### 85

The split of a problem (train or test) is a pure function of its prompt text (a SHA-256 hash), so held-out
problems are disjoint from training problems by construction, whatever the seed or the number of rows drawn,
and the same problem lands in the same split in every task.

Tasks:
- ``arithmetic`` (default): 3 two-digit addends. The shipped default model is pretrained on it.
- ``arithmetic_hard``: 5 two-digit addends; longer chains, so more carries to get right. The default model
  also saw (fewer) such problems in pretraining, so it starts lower on them but not at zero.
- ``arithmetic_long``: 6 two-digit addends, one more than the default model ever saw in pretraining (2-5).
  The base nearly never succeeds (measured: 0.0% greedy on 200 held-out problems, 0 of 800 samples at
  temperature 1, ``python experiments/demonstrations.py base``: it skips addends and stops the chain early), so
  on-policy RL gets almost no signal; the ``solution`` column
  holds worked solutions in the pretraining format, the demonstrations of ``docs/demonstrations.md``.
- ``addition_chat``: 2 two-digit addends asked as a chat question, ``"What is 23 + 45? Answer with just the
  number."``, for pretrained chat models (``template=chat``, ``reward_funcs=final_number``: the last integer of the
  answer counts, as a chat model writes ``23 + 45 = 68``). SmolLM2-135M-Instruct (Q4_1) answers 15% of 80
  held-out prompts right, greedy, within 16 new tokens (configs/smollm2_cpu.yaml).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from gvpo.rewards.math import completion_text

ANSWER_MARKER = "####"
TEST_FRACTION = 0.1  # share of all problems that belong to the held-out split


@dataclass(frozen=True)
class ArithmeticTask:
    """Sums of ``num_operands`` integers drawn uniformly from [low, high]."""

    name: str
    num_operands: int
    low: int = 10
    high: int = 99
    # "equation": "23+45=" (the default model's pretraining format); "question": a chat question.
    style: str = "equation"

    def __post_init__(self):
        if self.num_operands < 2:
            raise ValueError(f"num_operands={self.num_operands}: must be >= 2 (a sum needs two addends)")
        if not 0 <= self.low <= self.high:
            raise ValueError(f"low={self.low}, high={self.high}: need 0 <= low <= high")
        if self.style not in ("equation", "question"):
            raise ValueError(f"style={self.style!r}: use equation or question")

    def sample_operands(self, rng: random.Random) -> tuple[int, ...]:
        return tuple(rng.randint(self.low, self.high) for _ in range(self.num_operands))

    def row(self, operands: tuple[int, ...]) -> dict:
        return {
            "prompt": prompt_text(operands, self.style),
            "answer": str(sum(operands)),
            "solution": worked_solution(operands),
            "task": self.name,
        }


TASKS: dict[str, ArithmeticTask] = {
    "arithmetic": ArithmeticTask("arithmetic", num_operands=3),
    "arithmetic_hard": ArithmeticTask("arithmetic_hard", num_operands=5),
    "arithmetic_long": ArithmeticTask("arithmetic_long", num_operands=6),
    "addition_chat": ArithmeticTask("addition_chat", num_operands=2, style="question"),
}


def get_task(task: str) -> ArithmeticTask:
    if task not in TASKS:
        raise ValueError(f"task={task!r}: unknown task; choose one of {sorted(TASKS)}")
    return TASKS[task]


def prompt_text(operands: tuple[int, ...], style: str = "equation") -> str:
    if style == "question":
        return f"What is {' + '.join(str(x) for x in operands)}? Answer with just the number."
    return "+".join(str(x) for x in operands) + "="


def units_carry(a: int, b: int) -> bool:
    """True when adding the units digits of a and b carries into the tens."""
    return a % 10 + b % 10 >= 10


def worked_solution(operands: tuple[int, ...], drop_carry: tuple[bool, ...] | None = None) -> str:
    """The demonstrated completion, without EOS.

    ``drop_carry[i]`` makes step i forget the units carry (writes a + b - 10 when the units carry), the
    systematic mistake the default model's pretraining data contains on purpose; later steps then chain
    from the wrong partial sum, as a student's would.
    """
    steps = []
    total = operands[0]
    for i, x in enumerate(operands[1:]):
        result = total + x
        if drop_carry is not None and drop_carry[i] and units_carry(total, x):
            result -= 10
        steps.append(f"{total}+{x}={result}")
        total = result
    return ",".join(steps) + f" {ANSWER_MARKER} {total}"


def split_of(prompt: str) -> str:
    """'test' for a fixed ~10% of all prompts (by hash), 'train' for the rest."""
    digest = hashlib.sha256(prompt.encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < TEST_FRACTION else "train"


def make_dataset(task: str = "arithmetic", split: str = "train", n: int = 1000, seed: int = 0) -> list[dict]:
    """``n`` distinct problems of ``split``; the same (task, split, n, seed) always gives the same rows.

    Rows: ``prompt``, ``answer`` (the gold integer as a string), ``solution`` (a correct worked
    solution, handy for SFT) and ``task``.
    """
    spec = get_task(task)
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: must be 'train' or 'test'")
    space = (spec.high - spec.low + 1) ** spec.num_operands
    share = TEST_FRACTION if split == "test" else 1 - TEST_FRACTION
    if n > 0.5 * space * share:  # rejection sampling of distinct rows slows down near exhaustion
        available = int(space * share)
        raise ValueError(f"n={n}: task {task!r} has only about {available} {split} problems; ask for fewer")
    rng = random.Random(f"{task}/{split}/{seed}")
    rows, seen = [], set()
    while len(rows) < n:
        operands = spec.sample_operands(rng)
        prompt = prompt_text(operands, spec.style)
        if prompt in seen or split_of(prompt) != split:
            continue
        seen.add(prompt)
        rows.append(spec.row(operands))
    return rows


_ANSWER_RE = re.compile(r"-?\d+")


def extract_answer(completion: str) -> str | None:
    """The integer after the first ``####``, or None when the marker is missing or followed by anything
    but one integer (so trailing junk, e.g. a completion that never stopped, earns no reward)."""
    if ANSWER_MARKER not in completion:
        return None
    tail = completion.split(ANSWER_MARKER, 1)[1].strip()
    return tail if _ANSWER_RE.fullmatch(tail) else None


def arithmetic_reward(prompts, completions, answer, **kwargs) -> list[float | None]:
    """TRL-style reward: 1.0 when the completion's final answer equals the gold integer, else 0.0.

    ``answer`` is the dataset column, one gold answer per completion (a single string is broadcast).
    """
    return _graded(completions, answer, extract_answer)


def _graded(completions, answer, extract) -> list[float | None]:
    """1.0 where ``extract(text)`` (an integer string or None) equals the gold integer; ``answer`` is one gold answer
    per completion, or a single one broadcast."""
    answers = [answer] * len(completions) if isinstance(answer, (str, int)) else list(answer)
    if len(answers) != len(completions):
        raise ValueError(f"answer: got {len(answers)} gold answers for {len(completions)} completions")
    out: list[float | None] = []
    for completion, gold in zip(completions, answers):
        value = extract(completion_text(completion))
        out.append(float(value is not None and value.lstrip("-").isdigit() and int(value) == int(gold)))
    return out


_LAST_INT_RE = re.compile(r"-?\d[\d,]*")


def final_number(text: str) -> str | None:
    """The last integer of a free-text answer ("23 + 45 = 68." -> "68"; thousands commas dropped), or None."""
    found = _LAST_INT_RE.findall(text)
    return found[-1].replace(",", "") if found else None


def final_number_reward(prompts, completions, answer, **kwargs) -> list[float | None]:
    """TRL-style reward for chat models: 1.0 when the last integer of the completion equals the gold answer.

    Lenient on format (a chat model writes "23 + 45 = 68" or "The answer is 68."), strict on the value; an
    answer cut off by max_completion_length usually ends on an operand or a partial sum and earns 0.
    """
    return _graded(completions, answer, final_number)
