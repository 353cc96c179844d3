"""The math grader: answer extraction, equivalence in each benchmark's answer style, time limits, threads."""

import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("math_verify")

from gvpo.rewards import boxed_format, extract_answer, grader_metrics, math_accuracy, score_completions  # noqa: E402
from gvpo.rewards.workers import ERROR, TIMEOUT, WorkerPool  # noqa: E402

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

# (completion, gold answer, expected score)
CASES = [
    # MATH: LaTeX answers
    ("so $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.5}", "\\frac12", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1.0),
    ("\\boxed{\\frac{3}{5}}", "\\frac{3}{4}", 0.0),
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),
    ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 0.0),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    ("\\boxed{120}", "120^\\circ", 1.0),
    ("\\boxed{(2, \\infty)}", "(2,\\infty)", 1.0),
    ("\\boxed{[2, \\infty)}", "(2,\\infty)", 0.0),
    ("\\boxed{x = 3}", "3", 1.0),
    ("\\boxed{-2+7i}", "-2 + 7i", 1.0),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", 1.0),
    ("\\boxed{50\\%}", "50", 1.0),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", 1.0),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 3 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", 0.0),
    # Matrices and vectors compare by value: bracket style, spacing, row breaks, entries in any notation
    (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", 1.0),
    ("\\boxed{\\begin{pmatrix}\n 1 \\\\\n 2\n\\end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", 1.0),
    (r"\boxed{\begin{bmatrix} 1 \\ 2 \end{bmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", 1.0),
    (r"\boxed{\left(\begin{array}{c} 1 \\ 2 \end{array}\right)}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", 1.0),
    (r"\boxed{\begin{pmatrix}1&2\\3&4\\\end{pmatrix}}", r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", 1.0),
    (r"\boxed{\begin{pmatrix} 1 \\\\ 2 \end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", 1.0),
    (r"\boxed{\begin{pmatrix} 0.5 & 0 \\ 0 & 1 \end{pmatrix}}", r"\begin{pmatrix} \frac{1}{2} & 0 \\ 0 & 1 \end{pmatrix}",
     1.0),
    (r"\boxed{\begin{pmatrix} \sqrt{2}/2 \\ 1 \end{pmatrix}}", r"\begin{pmatrix} \frac{\sqrt{2}}{2} \\ 1 \end{pmatrix}",
     1.0),
    (r"\boxed{\begin{pmatrix} 0.5 & 0 \\ 0 & 2 \end{pmatrix}}", r"\begin{pmatrix} \frac{1}{2} & 0 \\ 0 & 1 \end{pmatrix}",
     0.0),
    # entry by entry, each entry normalised as a whole answer would be (notation math-verify alone misses)
    (r"\boxed{\begin{pmatrix} 4.4e7 \\ 1 \end{pmatrix}}", r"\begin{pmatrix} 44000000 \\ 1 \end{pmatrix}", 1.0),
    (r"\boxed{\begin{pmatrix} 1{,}000 \\ 2 \end{pmatrix}}", r"\begin{pmatrix} 1000 \\ 2 \end{pmatrix}", 1.0),
    (r"\boxed{\begin{pmatrix} 5 \text{ cm} \\ 2 \end{pmatrix}}", r"\begin{pmatrix} 5 \\ 2 \end{pmatrix}", 1.0),
    (r"\boxed{\begin{pmatrix} 4.5e7 \\ 1 \end{pmatrix}}", r"\begin{pmatrix} 44000000 \\ 1 \end{pmatrix}", 0.0),
    (r"\boxed{\begin{pmatrix} 2 \\ 1 \end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", 0.0),
    (r"\boxed{\begin{pmatrix} 1 & 2 \end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", 0.0),
    (r"\boxed{\begin{pmatrix} 1 \\ 2 \\ 3 \end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", 0.0),
    # AIME: integers, gold zero-padded
    ("\\boxed{25}", "025", 1.0),
    ("\\boxed{025}", "25", 1.0),
    ("\\boxed{24}", "025", 0.0),
    ("The answer is 73.", "073", 1.0),
    # AMC: gold stored as a float
    ("\\boxed{27}", 27.0, 1.0),
    ("\\boxed{27.0}", "27", 1.0),
    ("\\boxed{26.5}", 27.0, 0.0),
    # Minerva: scientific notation and units
    ("\\boxed{4.4 \\times 10^{7}}", "4.4e7", 1.0),
    ("\\boxed{44000000}", "4.4e7", 1.0),
    ("\\boxed{4.5 \\times 10^{7}}", "4.4e7", 0.0),
    ("\\boxed{5.3 \\times 10^{-9}}", "5.3e-9", 1.0),
    ("\\boxed{6.5 \\mathrm{~m}}", "6.5", 1.0),
    ("\\boxed{1.6 \\text{ cm}}", "1.6", 1.0),
    ("\\boxed{\\frac{e^{-2t}}{15}+C_1 e^t}", "\\frac{e^{-2 t}}{15}+C_{1} e^{t}", 1.0),
    # OlympiadBench: tuples, intervals, several answers in any order
    ("\\boxed{(1,1), (3,2)}", "(1,1), (3,2)", 1.0),
    ("\\boxed{(3,2), (1,1)}", "(1,1), (3,2)", 1.0),
    ("\\boxed{(1,1)}", "(1,1), (3,2)", 0.0),
    ("\\boxed{1, 0, -1}", "-1,0,1", 1.0),
    ("\\boxed{1, 0}", "-1,0,1", 0.0),
    ("\\boxed{[-1, 2)}", "[-1,2)", 1.0),
    ("\\boxed{n^2+1}", "n^{2}+1", 1.0),
    ("\\boxed{2n-1}", "k=2 n-1", 1.0),
    ("\\boxed{8\\%}", "8 \\%", 1.0),
    # GSM8K: integers, thousands separators, dollars
    ("\\boxed{1,234}", "1234", 1.0),
    ("\\boxed{\\$18}", "18", 1.0),
    ("\\boxed{18 \\text{ dollars}}", "18", 1.0),
    ("\\boxed{19}", "18", 0.0),
    ("She makes 9 * 2 = 18 dollars.\n#### 18", "18", 1.0),
    # malformed completions, no box, several boxes, nesting
    ("I do not know.", "5", 0.0),
    ("", "5", 0.0),
    ("\\boxed{}", "5", 0.0),
    ("so the answer is \\boxed{5", "5", 0.0),  # cut off by max_new_tokens
    ("first \\boxed{3}, then \\boxed{5}", "5", 1.0),
    ("first \\boxed{5}, then \\boxed{3}", "5", 0.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 1.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{2}}{2}", 0.0),
    ("\\boxed{\\{1, 2\\}}", "\\{1,2\\}", 1.0),
    ("\\fbox{7}", "7", 1.0),
    ("\\boxed{\\boxed{7}}", "7", 1.0),
    ("The final answer is $\\frac{1}{2}$.", "0.5", 1.0),
    ("Final answer: 3.5", "\\frac{7}{2}", 1.0),
    ("\\boxed{\\frac{1}{0}}", "1", 0.0),
    ("\\boxed{}}}{{\\frac{", "1", 0.0),
]


def test_grader_table():
    completions, golds, expected = zip(*CASES)
    scores = math_accuracy(None, list(completions), list(golds))
    wrong = [(c, g, e, s) for c, g, e, s in zip(completions, golds, expected, scores) if s != e]
    assert not wrong, "completion, gold, expected, got:\n" + "\n".join(map(repr, wrong))
    assert len(CASES) >= 40


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\boxed{\\frac{a}{b}} and more", "\\frac{a}{b}"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed 5$", "5"),
        ("The answer is $x^2$. Done.", "x^2"),
        ("the answer is 3.5.", "3.5"),
        ("no answer", None),
        ("\\boxed{   }", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_gold_that_cannot_be_parsed_scores_none():
    assert math_accuracy(None, ["\\boxed{5}", "\\boxed{5}", "\\boxed{5}"], [None, "", "\\boxed{}"]) == [None] * 3
    # a missing final answer is a valid 0, when the gold is fine
    assert math_accuracy(None, ["no box"], ["5"]) == [0.0]


def test_conversational_completions():
    completions = [[{"role": "assistant", "content": "so \\boxed{4}"}], [{"role": "assistant", "content": "3"}]]
    assert math_accuracy(prompts=None, completions=completions, answer=["4", "4"]) == [1.0, 0.0]


def test_boxed_format():
    completions = ["\\boxed{1}", "no box", "\\boxed{1} \\boxed{2}", "\\boxed{\\frac{1}{2}}", "\\boxed{1"]
    assert boxed_format(None, completions) == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_adversarial_answer_times_out_and_is_counted():
    before = grader_metrics()["timeouts"]
    start = time.monotonic()
    scores, _ = score_completions(["\\boxed{9^{9^{9^{9^{9}}}}}", "\\boxed{7}"], ["7", "7"], timeout_s=1.0)
    assert scores == [0.0, 1.0]
    assert grader_metrics()["timeouts"] == before + 1
    assert time.monotonic() - start < 30
    # the killed worker was replaced: the grader still works
    assert math_accuracy(None, ["\\boxed{\\sqrt{16}}"], ["4"]) == [1.0]


def test_works_from_other_threads():
    answers = ["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{0.25}", "\\boxed{2^{-1}}"]
    gold = "\\frac{\\sqrt{2}}{\\sqrt{8}}"  # needs math-verify, not the string / number pre-check
    results = {}

    def grade(i):
        results[i] = math_accuracy(None, [answers[i], "\\boxed{2}"], [gold, "3"])

    threads = [threading.Thread(target=grade, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == {0: [1.0, 0.0], 1: [1.0, 0.0], 2: [0.0, 0.0], 3: [1.0, 0.0]}


def test_worker_pool_limits_errors_and_crashes():
    pool = WorkerPool("time:sleep", num_workers=2)
    try:
        assert pool.map([(0.0,), (30.0,), (0.0,)], timeout_s=1.0) == [None, TIMEOUT, None]
        assert (pool.timeouts, pool.restarts) == (1, 1)
        assert pool.map([("not a number",)], timeout_s=5.0) == [ERROR]
        assert pool.errors == 1
    finally:
        pool.close()
    crashing = WorkerPool("os:_exit", num_workers=1)
    try:
        assert crashing.map([(3,)], timeout_s=5.0) == [ERROR]
        assert crashing.restarts == 1
    finally:
        crashing.close()


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark data not found at {DATA_DIR}")
def test_math500_reference_solutions_grade_correct():
    from gvpo.data import load_benchmark

    rows = load_benchmark("math500", data_dir=DATA_DIR)
    scores = math_accuracy(None, [r["solution"] for r in rows], [r["answer"] for r in rows])
    assert scores == [1.0] * 500
    shifted = math_accuracy(None, [r["solution"] for r in rows[1:51]], [r["answer"] for r in rows[:50]])
    assert sum(shifted) <= 3  # another problem's answer is (almost always) wrong
