"""Loaders on the real shared data (counts from its README), user files, row validation, prompt templates."""

import json
from pathlib import Path

import pytest

from gvpo.data import (
    QWEN_MATH_INSTRUCTION,
    encode_prompts,
    format_prompt,
    load_benchmark,
    load_dataset_file,
    resolve_data_dir,
    validate_rows,
)

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark data not found at {DATA_DIR}")

# the README's record counts
COUNTS = [("math500", "test", 500), ("aime24", "test", 30), ("amc23", "test", 40), ("minerva", "test", 272),
          ("olympiadbench", "test", 675), ("gsm8k", "test", 1319), ("gsm8k", "train", 7473),
          ("math_train", "train", 7500)]


@needs_data
@pytest.mark.parametrize("name, split, count", COUNTS)
def test_loader_counts_and_fields(name, split, count):
    rows = load_benchmark(name, data_dir=DATA_DIR, split=split)
    assert len(rows) == count
    assert len({r["id"] for r in rows}) == count
    for r in rows:
        assert isinstance(r["problem"], str) and r["problem"].strip()
        assert isinstance(r["id"], str)
        assert isinstance(r["answer"], str)
    # MATH train has two problems whose reference solution boxes nothing (`\boxed{}`); every other answer is set
    assert sum(not r["answer"] for r in rows) == (2 if name == "math_train" else 0)


@needs_data
def test_answers_are_normalised():
    aime = load_benchmark("aime24", data_dir=DATA_DIR)
    assert all(r["answer"].isdigit() and not r["answer"].startswith("0") for r in aime)  # "025" -> "25"
    assert "25" in {r["answer"] for r in aime}
    assert load_benchmark("amc23", data_dir=DATA_DIR)[0]["answer"] == "27"  # 27.0
    minerva = load_benchmark("minerva", data_dir=DATA_DIR)
    assert all("\\boxed" not in r["answer"] for r in minerva)
    olympiad = load_benchmark("olympiadbench", data_dir=DATA_DIR)
    assert all("$" not in r["answer"] for r in olympiad)
    assert sum(r["is_multiple_answer"] for r in olympiad) == 94
    assert {"69,84"} <= {r["answer"] for r in olympiad}  # "$69$,$84$"
    gsm = load_benchmark("gsm8k", data_dir=DATA_DIR)
    assert gsm[0]["answer"] == "18" and all("," not in r["answer"] for r in gsm)
    math500 = {r["id"]: r for r in load_benchmark("math500", data_dir=DATA_DIR)}
    assert not set(math500) & {r["id"] for r in load_benchmark("math_train", data_dir=DATA_DIR)}


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("GVPO_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path.resolve()
    assert resolve_data_dir(tmp_path / ".") == tmp_path.resolve()  # the argument wins
    monkeypatch.delenv("GVPO_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="GVPO_DATA_DIR") as e:
        resolve_data_dir()
    assert str(tmp_path.parent / "shared" / "data") in str(e.value)
    with pytest.raises(ValueError, match="choose one of"):
        load_benchmark("aime25", data_dir=tmp_path)
    with pytest.raises(ValueError, match="no split"):
        load_benchmark("math500", data_dir=tmp_path, split="train")


def test_load_dataset_file_formats(tmp_path):
    rows = [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "answer": "4"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    assert load_dataset_file(tmp_path / "d.jsonl") == rows
    assert load_dataset_file(str(tmp_path / "d.json")) == rows
    assert load_dataset_file(tmp_path / "wrapped.json") == rows
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert load_dataset_file(tmp_path / "d.parquet") == rows
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset_file(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("prompt,answer\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_dataset_file(tmp_path / "d.csv")


def test_validate_rows_names_row_and_column():
    assert validate_rows([{"prompt": "q", "answer": "1"}], required=("prompt", "answer"))
    with pytest.raises(ValueError, match=r"row 1: missing column 'answer'.*answer_column="):
        validate_rows([{"prompt": "q", "answer": "1"}, {"prompt": "q"}], required=("prompt", "answer"))
    with pytest.raises(ValueError, match=r"row 0: missing column 'prompt'.*prompt_column="):
        validate_rows([{"question": "q"}])
    with pytest.raises(ValueError, match="row 2: column 'prompt' is empty"):
        validate_rows([{"prompt": "a"}, {"prompt": "b"}, {"prompt": "  "}])
    with pytest.raises(ValueError, match="no rows"):
        validate_rows([])


def _chat_tokenizer(with_template=True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    if with_template:
        tokenizer.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
    return tokenizer


def test_prompt_templates():
    plain = format_prompt("What is 1+1?")
    assert plain == f"Question: What is 1+1?\n{QWEN_MATH_INSTRUCTION}\nAnswer:"
    tokenizer = _chat_tokenizer()
    qwen = format_prompt("What is 1+1?", tokenizer, template="qwen_math")
    assert qwen == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    )
    chat = format_prompt("What is 1+1?", tokenizer, template="chat")
    # chat wraps the user's prompt only: the math instruction belongs to qwen_math and plain.
    assert chat == "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"

    class Recorder:  # chat templates carry their own special tokens: encode must not add a BOS again
        def encode(self, text, add_special_tokens=True):
            return [len(text), int(add_special_tokens)]

    assert encode_prompts(["ab", "c"], Recorder(), "qwen_math") == [[2, 0], [1, 0]]
    assert encode_prompts(["ab"], Recorder(), "plain") == [[2, 1]]
    with pytest.raises(ValueError, match="has none. Use template='plain'"):
        format_prompt("q", _chat_tokenizer(with_template=False), template="qwen_math")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        format_prompt("q", None, template="chat")
    with pytest.raises(ValueError, match="choose one of"):
        format_prompt("q", template="fancy")
