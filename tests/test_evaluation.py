"""The evaluation core with a fake engine that returns canned completions: scores, JSON files, the table."""

import json

import pytest
import torch

pytest.importorskip("math_verify")

from gvpo.evaluation import evaluate, format_table  # noqa: E402
from gvpo.types import Rollout  # noqa: E402


class CharTokenizer:
    """One token per character; enough for prompts and completions in tests."""

    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


class CannedEngine:
    """Answers each problem (found in the prompt text) with canned[problem][sample]."""

    def __init__(self, canned):
        self.canned = canned
        self.calls = []

    def generate(self, prompt_ids, num_generations, params, generator=None):
        self.calls.append((len(prompt_ids), num_generations, params))
        texts = []
        for ids in prompt_ids:
            prompt = "".join(chr(i) for i in ids)
            problem = next(p for p in self.canned if p in prompt)
            texts += [self.canned[problem][j] for j in range(num_generations)]
        width = max(len(t) for t in texts)
        ids = torch.zeros((len(texts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, text in enumerate(texts):
            ids[row, : len(text)] = torch.tensor([ord(c) for c in text])
            mask[row, : len(text)] = 1
        index = torch.arange(len(prompt_ids)).repeat_interleave(num_generations)
        return Rollout(ids, mask, torch.zeros(ids.shape), index)


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def data_dir(tmp_path):
    """Three MATH500-style and two AIME-style problems, in the shared data's formats."""
    math500 = [
        {"problem": f"P{i}: compute it.", "solution": "", "answer": a, "subject": "x", "level": 1,
         "unique_id": f"test/x/{i}.json"}
        for i, a in enumerate(["\\frac{1}{2}", "(1,2)", "7"])
    ]
    aime = [{"id": 60 + i, "problem": f"A{i}: find it.", "solution": "", "answer": a, "url": "", "question": ""}
            for i, a in enumerate(["025", "204"])]
    _write(tmp_path / "data" / "math500" / "test.jsonl", math500)
    _write(tmp_path / "data" / "aime24" / "test.jsonl", aime)
    return tmp_path / "data"


def test_evaluate_scores_files_and_table(data_dir, tmp_path):
    canned = {
        "P0:": ["so \\boxed{0.5}"],  # right (decimal for fraction)
        "P1:": ["\\boxed{(2,1)}"],  # wrong (tuple order matters)
        "P2:": ["The answer is 7."],  # right, no box
        "A0:": ["\\boxed{25}", "\\boxed{24}", "no answer", "\\boxed{025}"],  # 2 of 4
        "A1:": ["\\boxed{204}"] * 4,  # 4 of 4
    }
    engine = CannedEngine(canned)
    out = tmp_path / "eval"
    results = evaluate(None, CharTokenizer(), engine, ["aime24", "math500"], n={"aime24": 4}, temperature=0.6,
                       template="plain", data_dir=data_dir, output_dir=out, batch_size=2, max_new_tokens=32)
    bench = results["benchmarks"]
    assert bench["math500"]["score"] == pytest.approx(2 / 3)
    assert bench["math500"]["metric"] == "pass@1" and bench["math500"]["num_problems"] == 3
    assert bench["aime24"]["score"] == pytest.approx((0.5 + 1.0) / 2)
    assert bench["aime24"]["metric"] == "avg@4"
    # batches of at most 2 prompts, n samples each, with the requested sampling settings
    assert [(p, k) for p, k, _ in engine.calls] == [(2, 4), (2, 1), (1, 1)]
    assert engine.calls[0][2].temperature == 0.6 and engine.calls[0][2].max_new_tokens == 32

    saved = json.loads((out / "aime24.json").read_text())
    assert saved["score"] == pytest.approx(0.75) and saved["n"] == 4
    first = saved["problems"][0]
    assert first["id"] == "60" and first["answer"] == "25"
    assert first["predictions"] == canned["A0:"]
    assert first["extracted"] == ["25", "24", None, "025"]
    assert first["scores"] == [1.0, 0.0, 0.0, 1.0] and first["score"] == 0.5
    saved = json.loads((out / "math500.json").read_text())
    assert [p["score"] for p in saved["problems"]] == [1.0, 0.0, 1.0]

    table = format_table(results, label="tiny")
    assert table.splitlines() == ["| | AIME24 | MATH500 |", "|---|---|---|", "| tiny | 75.00 | 66.67 |"]
    two = format_table({"base": results, "gvpo": {"benchmarks": {"math500": {"score": 0.8}, "amc23": {"score": 0.5}}}})
    assert two.splitlines()[0] == "| | AIME24 | AMC | MATH500 |"
    assert two.splitlines()[2:] == ["| base | 75.00 | - | 66.67 |", "| gvpo | - | 50.00 | 80.00 |"]


def test_evaluate_limit_and_greedy_checks(data_dir):
    engine = CannedEngine({"P0:": ["\\boxed{1/2}"], "P1:": ["\\boxed{(1, 2)}"], "P2:": ["x"]})
    results = evaluate(None, CharTokenizer(), engine, ["math500"], limit=2, template="plain", data_dir=data_dir)
    assert results["benchmarks"]["math500"]["score"] == 1.0
    assert results["benchmarks"]["math500"]["num_problems"] == 2
    with pytest.raises(ValueError, match="temperature > 0"):
        evaluate(None, CharTokenizer(), engine, ["math500"], n=4, temperature=0.0, data_dir=data_dir)


def test_evaluate_with_hf_engine_on_a_tiny_model(data_dir, tmp_path):
    rollout = pytest.importorskip("gvpo.rollout")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    model = Qwen2ForCausalLM(config)
    tokenizer = CharTokenizer()
    tokenizer.eos_token_id, tokenizer.pad_token_id = 0, 0
    engine = rollout.make_engine("hf", model, tokenizer)
    results = evaluate(model, tokenizer, engine, ["math500"], n=2, temperature=1.0, max_new_tokens=4,
                       template="plain", data_dir=data_dir, output_dir=tmp_path / "hf")
    assert results["benchmarks"]["math500"]["score"] == 0.0  # random weights, 4 tokens: no boxed answer
    saved = json.loads((tmp_path / "hf" / "math500.json").read_text())
    assert [len(p["predictions"]) for p in saved["problems"]] == [2, 2, 2]
    assert all(len(text) <= 4 for p in saved["problems"] for text in p["predictions"])
