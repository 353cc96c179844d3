"""Verified math rewards: take the final answer of a completion, decide equivalence with the gold answer.

Grading rules (the README repeats them):
- The final answer is the content of the last top-level `\\boxed{...}` (or `\\fbox{...}`) with balanced
  braces; without a box, the rest of the line after the last "the answer is" / "final answer:"
  (its first `$...$` if it starts with one); without either, a GSM8K-style "#### 42" line.
  No final answer scores 0.0 (a valid reward, not a missing one).
- Both sides are normalised (`$`, `\\left`/`\\right`, spacing commands, `^\\circ`, trailing text units after
  a number, thousands separators, `4.4e7` -> `4.4\\times 10^{7}`), then compared: first cheaply (equal
  strings, or both plain numbers: exact, so "025" == "25" and "27.0" == "27"), else by math-verify
  (`parse` + `verify`: fractions vs decimals, intervals, tuples, sets in any order, `x = 3` vs `3`, percent).
- Every math-verify comparison runs in a worker process under a hard time limit (default 5 s, env
  `GVPO_MATH_TIMEOUT`); an item past it scores 0.0 and is counted (`grader_metrics()["timeouts"]`).
- None only when the gold answer itself is empty or cannot be parsed: the item cannot be scored.
"""

from __future__ import annotations

import atexit
import os
import re
import threading
import time
from collections import OrderedDict
from fractions import Fraction
from functools import lru_cache

from gvpo.rewards.workers import WorkerPool

DEFAULT_TIMEOUT_S = float(os.environ.get("GVPO_MATH_TIMEOUT", "5"))

# ---------------------------------------------------------------------------------------------------------
# Final-answer extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*(\{)?")
_ANSWER_IS_RE = re.compile(r"(?:final answer|the answer)\s*(?:is\s*:?|:|：)\s*(?:\*\*)?", re.IGNORECASE)
_MATH_SPAN_RE = re.compile(r"^\$\$(.+?)\$\$|^\$(.+?)\$|^\\\((.+?)\\\)|^\\\[(.+?)\\\]", re.DOTALL)


def _balanced(text: str, open_at: int) -> int | None:
    """Index of the brace closing the one at `open_at`, or None if the text ends first."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{" and text[i - 1] != "\\":
            depth += 1
        elif text[i] == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return i
    return None


def boxed_contents(text: str) -> list[str]:
    """Contents of the top-level `\\boxed{...}` / `\\fbox{...}` in order; unclosed boxes are skipped."""
    found, pos = [], 0
    while (m := _BOX_RE.search(text, pos)) is not None:
        if m.group(1) is None:  # `\boxed 5`: the token up to whitespace or `$`
            token = re.match(r"\s*([^\s$]+)", text[m.end() :])
            if token and m.group(0)[-1].isspace():
                found.append(token.group(1))
            pos = m.end()
            continue
        close = _balanced(text, m.end() - 1)
        if close is None:
            pos = m.end()
            continue
        found.append(text[m.end() : close])
        pos = close + 1
    return found


def extract_answer(text: str) -> str | None:
    """The final answer of a completion, or None if it gives none (see the module docstring)."""
    boxes = boxed_contents(text)
    if boxes:
        answer = boxes[-1]
        while (inner := boxed_contents(answer)) and answer.strip().startswith(("\\boxed", "\\fbox")):
            answer = inner[-1]
        return answer.strip() or None
    matches = list(_ANSWER_IS_RE.finditer(text))
    if not matches:
        gsm8k = re.findall(r"^####\s*(.+?)\s*$", text, re.MULTILINE)  # GSM8K's own solution format
        return gsm8k[-1] if gsm8k else None
    rest = text[matches[-1].end() :].lstrip()
    if rest.startswith(("\\boxed", "\\fbox")):
        return None  # an unclosed box, cut off by the length limit: no answer
    span = _MATH_SPAN_RE.match(rest)
    if span:
        answer = next(g for g in span.groups() if g is not None)
    else:
        answer = rest.split("\n", 1)[0]
        answer = re.split(r"\.\s|\*\*", answer, maxsplit=1)[0].rstrip(" .")
    return answer.strip() or None


# ---------------------------------------------------------------------------------------------------------
# Normalisation and the cheap pre-check


def normalize_answer(answer: str) -> str:
    """Remove notation that never changes the value, before both the pre-check and math-verify."""
    s = answer.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) > len(left) + len(right):
            s = s[len(left) : -len(right)].strip()
    s = s.replace("\\$", "").replace("$", "")  # currency first: `\$18` is 18
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    # spacing commands (`\,` `\ ` ...) become spaces; a `\\` row break is kept whole (its second backslash
    # followed by a space is not a spacing command)
    s = re.sub(r"\\\\|\\[,!;: ]|~", lambda m: m.group() if m.group() == "\\\\" else " ", s)
    s = _normalize_matrix(s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\degree", "", s)
    # A trailing unit after a number: `5\text{ cm}`, `6.5 \mathrm{~m}^2`. Text-only answers are kept.
    s = re.sub(r"(?<=[\d}])\s*\\(?:text|mathrm|mbox|textrm)\{[^{}]*\}(?:\^\{?\d\}?)?\s*$", "", s)
    text_only = re.fullmatch(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", s.strip())
    if text_only:
        s = text_only.group(1)
    s = s.strip().rstrip(".").strip()
    if re.fullmatch(r"-?\d{1,3}(?:(?:,|\{,\})\d{3})+(?:\.\d+)?", s):
        s = s.replace("{,}", "").replace(",", "")
    sci = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*[eE]\s*([+-]?\d+)", s)
    if sci:
        s = f"{sci.group(1)}\\times 10^{{{int(sci.group(2))}}}"
    return s


_MATRIX_RE = re.compile(  # optional brackets around one matrix environment (array's column spec skipped)
    r"(?:\(|\[)?\s*\\begin\{(?P<env>[pbB]?matrix|smallmatrix|array)\}(?:\{[^{}]*\})?"
    r"(?P<body>.*)\\end\{(?P=env)\}\s*(?:\)|\])?",
    re.DOTALL)


def _matrix(s: str):
    m = _MATRIX_RE.fullmatch(s.strip())
    return m if m and "\\begin{" not in m["body"] and "\\end{" not in m["body"] else None  # one matrix only


def _normalize_matrix(s: str) -> str:
    """One spelling per matrix: pmatrix for every bracket style, one `\\\\` per row break, none before the end."""
    m = _matrix(s)
    if not m:
        return s
    rows = [" & ".join(cell.strip() for cell in row.split("&")) for row in re.split(r"(?:\\\\\s*)+", m["body"])]
    return "\\begin{pmatrix} " + " \\\\ ".join(r for r in rows if r.strip()) + " \\end{pmatrix}"


def matrix_cells(s: str) -> list[list[str]] | None:
    """The entries of a (normalised) matrix or vector, row by row; None if `s` is not one."""
    m = _matrix(s)
    if not m:
        return None
    rows = [r for r in re.split(r"(?:\\\\\s*)+", m["body"]) if r.strip()]
    return [[normalize_answer(cell) for cell in row.split("&")] for row in rows]


def comparison_parts(pred: str | None, gold: str) -> list[tuple[str | None, str]]:
    """What must be equal: the whole answers, or for two matrices of one shape, each pair of entries (compared by
    value: `\\sqrt{2}/2` equals `\\frac{\\sqrt{2}}{2}`). Matrices of different shapes: [] (they differ)."""
    if pred is None:
        return [(pred, gold)]
    a, b = matrix_cells(pred), matrix_cells(gold)
    if a is None or b is None:
        return [(pred, gold)]
    if [len(r) for r in a] != [len(r) for r in b]:
        return []
    return [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]


_NUMBER_RE = re.compile(
    r"(?:[a-zA-Z]\s*=\s*)?(?P<num>-?(?:\d+\.?\d*|\.\d+))(?:\s*(?:\\times|\\cdot)\s*10\^\{?(?P<exp>-?\d+)\}?)?"
)
_FRAC_RE = re.compile(r"(?:[a-zA-Z]\s*=\s*)?(?P<sign>-?)\\frac\{(?P<p>-?\d+)\}\{(?P<q>\d+)\}")


def _as_number(s: str) -> Fraction | None:
    """The exact value of a plain number (`025`, `27.0`, `-\\frac{3}{4}`, `1.7\\times 10^{4}`), else None."""
    if m := _NUMBER_RE.fullmatch(s):
        exp = int(m.group("exp") or 0)
        return Fraction(m.group("num")) * Fraction(10) ** exp if abs(exp) <= 400 else None
    if (m := _FRAC_RE.fullmatch(s)) and int(m.group("q")) != 0:
        value = Fraction(int(m.group("p")), int(m.group("q")))
        return -value if m.group("sign") else value
    return None


def quick_verdict(pred: str, gold: str) -> float | None:
    """1.0 / 0.0 when normalised strings or plain numbers decide it, None when math-verify must."""
    if pred == gold or re.sub(r"\s+", "", pred) == re.sub(r"\s+", "", gold):
        return 1.0
    a, b = _as_number(pred), _as_number(gold)
    if a is None or b is None:
        return None
    if a == b:
        return 1.0
    # Close but unequal numbers go to math-verify, whose rounding accepts 0.333333 for 1/3.
    return None if abs(a - b) <= Fraction(1, 10**4) * max(abs(a), abs(b)) else 0.0


def gold_to_str(gold) -> str | None:
    """A gold answer as a string: 27.0 -> "27"; a solution text -> its last box; None or "" -> None."""
    if gold is None:
        return None
    if isinstance(gold, float) and gold.is_integer():
        gold = int(gold)
    text = str(gold).strip()
    if "\\boxed" in text or "\\fbox" in text:
        text = extract_answer(text) or ""
    text = normalize_answer(text) if text else ""
    return text or None


# ---------------------------------------------------------------------------------------------------------
# The part that runs in worker processes


@lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    from math_verify import parse

    return parse("\\boxed{" + gold + "}", parsing_timeout=None)


def _warm_up() -> None:
    """Runs once in each worker before it takes items: imports and the parser's first (slow) use."""
    import math_verify.grader
    import math_verify.parser

    # Silence the once-per-process "timeout is disabled" warning: our limit is the pool's.
    math_verify.parser.TIMEOUT_WARNING_SHOWN = math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    _verify_pair("\\frac{1}{2}", "0.5")


def _verify_pair(pred: str | None, gold: str) -> float | None:
    """Runs in a worker: math-verify without its signal timeouts (the pool enforces the limit)."""
    from math_verify import parse, verify

    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        return None
    if pred is None:
        return 0.0
    pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    if not pred_parsed:
        return 0.0
    return 1.0 if verify(gold_parsed, pred_parsed, timeout_seconds=None) else 0.0


# ---------------------------------------------------------------------------------------------------------
# The pool, the counters, and the reward callables

_POOL: WorkerPool | None = None
_POOL_LOCK = threading.Lock()
_NUM_WORKERS = int(os.environ.get("GVPO_MATH_WORKERS", "0")) or min(8, os.cpu_count() or 1)
_COUNTS = dict.fromkeys(("items", "fast_path", "cached", "math_verify", "no_answer", "ungradable", "seconds",
                         "timeouts", "errors", "worker_restarts"), 0)
_COUNTS_LOCK = threading.Lock()
_CACHE: OrderedDict = OrderedDict()  # (answer, gold) -> settled score, oldest first
_CACHE_SIZE = 100_000
_MISS = object()


def _pool() -> WorkerPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            try:
                import math_verify  # noqa: F401  (fail here, in the caller, with a useful message)
            except ImportError as e:
                raise ImportError("math rewards need math-verify: pip install 'gvpo[math]'") from e
            _POOL = WorkerPool(f"{__name__}:_verify_pair", _NUM_WORKERS, init=f"{__name__}:_warm_up")
        return _POOL


def configure_grader(num_workers: int | None = None, timeout_s: float | None = None) -> None:
    """Set the number of grader processes (default min(8, cores), env `GVPO_MATH_WORKERS`) and the
    per-comparison time limit in seconds (default 5, env `GVPO_MATH_TIMEOUT`)."""
    global _NUM_WORKERS, DEFAULT_TIMEOUT_S
    if timeout_s is not None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s}: must be > 0 seconds")
        DEFAULT_TIMEOUT_S = float(timeout_s)
    if num_workers is not None:
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers}: must be >= 1")
        shutdown_grader()
        _NUM_WORKERS = num_workers


def shutdown_grader() -> None:
    """Stop the grader processes (they restart on the next call)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None and _POOL.pid == os.getpid():
            _POOL.close()
            with _COUNTS_LOCK:  # keep the pool's counters in the totals
                for key, value in _pool_counts(_POOL).items():
                    _COUNTS[key] += value
        _POOL = None


def _pool_counts(pool: WorkerPool | None) -> dict:
    if pool is None:
        return {"timeouts": 0, "errors": 0, "worker_restarts": 0}
    return {"timeouts": pool.timeouts, "errors": pool.errors, "worker_restarts": pool.restarts}


atexit.register(shutdown_grader)


def grader_metrics() -> dict:
    """Counters since import: items graded, how each was decided, timeouts, errors, worker restarts."""
    with _POOL_LOCK, _COUNTS_LOCK:
        out = dict(_COUNTS)
        for key, value in _pool_counts(_POOL).items():
            out[key] += value
    return out


def completion_text(completion) -> str:
    """TRL passes strings, or for conversational data a list of messages: grade the last one ("" for none)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and not completion:
        return ""
    if isinstance(completion, list) and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"completion of type {type(completion).__name__}: expected a str or a list of messages")


def _cache_get(key):
    with _COUNTS_LOCK:
        return _CACHE.get(key, _MISS)


def _cache_put(key, score) -> None:
    with _COUNTS_LOCK:
        _CACHE[key] = score
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)


def score_completions(completions, golds, timeout_s: float | None = None):
    """Scores (1.0 / 0.0 / None) and extracted answers of completions against aligned gold answers.

    Each distinct (answer, gold) pair of the batch goes to math-verify once (k samples of a prompt often
    agree), and settled verdicts are remembered across calls; timeouts are not, so they are retried.
    """
    if len(completions) != len(golds):
        raise ValueError(f"{len(completions)} completions but {len(golds)} answers: they must be aligned")
    start = time.perf_counter()
    timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    extracted = [extract_answer(completion_text(c)) for c in completions]
    # Per row, one verdict per part that must be equal (the whole answer, or each entry of a matrix).
    verdicts: list[list | None] = [None] * len(completions)
    todo: dict[tuple, list[tuple[int, int]]] = {}  # (answer, gold) -> (row, part) that need it
    counts = dict.fromkeys(("fast_path", "cached", "no_answer"), 0)
    for i, (answer, gold) in enumerate(zip(extracted, golds)):
        gold_str = gold_to_str(gold)
        if gold_str is None:
            continue  # cannot score: None
        pred = (normalize_answer(answer) or None) if answer is not None else None
        counts["no_answer"] += pred is None
        whole = quick_verdict(pred, gold_str) if pred else None
        parts = [] if whole is not None else comparison_parts(pred, gold_str)
        verdicts[i] = [whole] if whole is not None else ([None] * len(parts) or [0.0])  # []: shapes differ
        counts["fast_path"] += whole is not None
        for j, (p, g) in enumerate(parts):
            if (verdict := quick_verdict(p, g) if p else None) is not None:
                verdicts[i][j] = verdict
            elif (cached := _cache_get((p, g))) is not _MISS:
                verdicts[i][j] = cached
                counts["cached"] += 1
            else:
                todo.setdefault((p, g), []).append((i, j))
    pairs = list(todo)
    results = _pool().map(pairs, timeout_s) if pairs else []
    for pair, result in zip(pairs, results):
        failed = isinstance(result, str)  # TIMEOUT or ERROR: counted by the pool, scored 0.0
        if not failed:
            _cache_put(pair, result)
        for i, j in todo[pair]:
            verdicts[i][j] = 0.0 if failed else result
    # All parts equal: 1.0; any part unequal: 0.0; a gold part math-verify cannot parse: None.
    scores: list[float | None] = [
        None if v is None or any(x is None for x in v) else float(all(x == 1.0 for x in v)) for v in verdicts]
    with _COUNTS_LOCK:
        for key, value in counts.items():
            _COUNTS[key] += value
        _COUNTS["items"] += len(completions)
        _COUNTS["math_verify"] += len(pairs)
        _COUNTS["ungradable"] += sum(s is None for s in scores)
        _COUNTS["seconds"] += time.perf_counter() - start
    return scores, extracted


def math_accuracy(prompts=None, completions=None, answer=None, **kwargs) -> list[float | None]:
    """TRL-style reward: 1.0 if the completion's final answer equals the gold `answer`, else 0.0.

    None where the gold answer cannot be parsed. Safe from any thread; see the module docstring.
    """
    if completions is None or answer is None:
        raise TypeError("math_accuracy needs completions= and answer= (the dataset's gold answer column)")
    return score_completions(list(completions), list(answer))[0]


def boxed_format(prompts=None, completions=None, **kwargs) -> list[float]:
    """1.0 if the completion holds exactly one (top-level, closed) `\\boxed{}` answer, else 0.0."""
    if completions is None:
        raise TypeError("boxed_format needs completions=")
    return [float(len(boxed_contents(completion_text(c))) == 1) for c in completions]
