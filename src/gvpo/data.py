"""Datasets and prompt templates.

`load_benchmark` reads the benchmark and training files of ../shared/data (see its README) into rows
`{"problem", "answer", "id", ...}`; `load_dataset_file` reads a user's jsonl / json / parquet file or a
Hugging Face dataset; `validate_rows` checks columns before training; `format_prompt` applies a template.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

DEFAULT_DATA_DIR = "../shared/data"
DATA_DIR_ENV = "GVPO_DATA_DIR"
QWEN_MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATES = ("plain", "qwen_math", "chat")

# benchmark name -> {split: file under the data dir}; `_rows` normalises each format
_FILES = {
    "math500": {"test": "math500/test.jsonl"},
    "aime24": {"test": "aime24/test.jsonl"},
    "amc23": {"test": "amc23/test.jsonl"},
    "minerva": {"test": "minerva_math/test.jsonl"},
    "olympiadbench": {"test": "olympiadbench/test.jsonl"},
    "gsm8k": {"test": "gsm8k/test.jsonl", "train": "gsm8k/train.jsonl"},
    "math_train": {"train": "math_train/train.jsonl"},
}
BENCHMARKS = tuple(_FILES)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: the argument, else $GVPO_DATA_DIR, else ../shared/data from the working directory."""
    if data_dir is not None:
        source = f"data_dir={str(data_dir)!r}"
    elif os.environ.get(DATA_DIR_ENV):
        data_dir, source = os.environ[DATA_DIR_ENV], f"${DATA_DIR_ENV}={os.environ[DATA_DIR_ENV]!r}"
    else:
        data_dir, source = DEFAULT_DATA_DIR, f"the default {DEFAULT_DATA_DIR!r} relative to {os.getcwd()}"
    path = Path(data_dir).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(
            f"benchmark data directory not found: looked in {path} (from {source}). Set {DATA_DIR_ENV}=/path/to/data "
            f"(the folder holding math500/, aime24/, ...), or pass it as --data_dir (gvpo eval) or data_dir= (Python)"
        )
    return path


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with _open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg}); write one JSON object "
                                     f"per line") from None
    return rows


def _open(path: Path):
    try:
        return open(path, encoding="utf-8")
    except OSError as e:
        raise OSError(f"cannot read {path}: {e.strerror}") from None


def _last_boxed(text: str) -> str | None:
    from gvpo.rewards.math import boxed_contents  # no math-verify needed: plain string scanning

    boxes = boxed_contents(text)
    return boxes[-1].strip() if boxes else None


def _strip_dollars(text: str) -> str:
    return re.sub(r"(?<!\\)\$", "", text).strip()


def _number_str(value) -> str:
    """27.0 -> "27", "025" -> "25": AIME and AMC answers are integers, compared numerically."""
    number = float(value)
    return str(int(number)) if number.is_integer() else str(number)


def _rows(name: str, raw: list[dict], split: str) -> list[dict]:
    if name in ("math500", "math_train"):
        return [
            {"problem": r["problem"], "answer": r["answer"], "id": r["unique_id"], "solution": r["solution"],
             "level": r["level"], "subject": r.get("subject", r.get("type"))}
            for r in raw
        ]
    if name in ("aime24", "amc23"):
        return [{"problem": r["problem"], "answer": _number_str(r["answer"]), "id": str(r["id"])} for r in raw]
    if name == "minerva":
        return [
            {"problem": r["problem"], "answer": _last_boxed(r["solution"]), "id": str(r["idx"]),
             "solution": r["solution"], "subject": r["type"]}
            for r in raw
        ]
    if name == "olympiadbench":
        rows = []
        for r in raw:
            answers = [_strip_dollars(a) for a in r["final_answer"]]
            problem = f"{r['context']}\n{r['question']}" if r.get("context") else r["question"]
            rows.append(
                {"problem": problem, "answer": ", ".join(answers), "answers": answers, "id": str(r["id"]),
                 "is_multiple_answer": r["is_multiple_answer"], "unit": r["unit"], "answer_type": r["answer_type"]}
            )
        return rows
    if name == "gsm8k":
        return [
            {"problem": r["question"], "answer": r["answer"].split("####")[-1].strip().replace(",", ""),
             "id": f"{split}-{i}", "solution": r["answer"]}
            for i, r in enumerate(raw)
        ]
    raise AssertionError(name)


def load_benchmark(name: str, data_dir: str | os.PathLike | None = None, split: str | None = None) -> list[dict]:
    """Rows `{"problem": str, "answer": str, "id": str, ...}` of a benchmark or training set.

    name: one of BENCHMARKS (math500, aime24, amc23, minerva, olympiadbench, gsm8k, math_train).
    data_dir: see `resolve_data_dir` (argument, else $GVPO_DATA_DIR, else ../shared/data).
    split: "test" (default) or, for gsm8k, "train"; math_train has only "train".
    """
    key = name.lower().replace("-", "_")
    if key == "minerva_math":
        key = "minerva"
    if key not in _FILES:
        raise ValueError(f"benchmark {name!r}: unknown; choose one of {', '.join(BENCHMARKS)}")
    splits = _FILES[key]
    split = split or ("test" if "test" in splits else "train")
    if split not in splits:
        raise ValueError(f"benchmark {name!r} has no split {split!r}; choose one of {', '.join(splits)}")
    path = resolve_data_dir(data_dir) / splits[split]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the data directory should hold {splits[split]}")
    return _rows(key, _read_jsonl(path), split)


def load_dataset_file(path_or_name: str | os.PathLike, split: str = "train") -> list[dict]:
    """Rows of a local .jsonl / .json / .parquet file, or of a Hugging Face dataset (name or local dir).

    A .json file holds a list of rows (or {"data": [...]}) or one row per line. Parquet needs pyarrow
    (or `datasets`); a hub dataset needs `pip install gvpo[parquet]` (the `datasets` package).
    """
    path = Path(path_or_name).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            with _open(path) as f:
                text = f.read()
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                return _read_jsonl(path)
            data = data.get("data", data) if isinstance(data, dict) else data
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a list of rows or {{'data': [...]}}, got {type(data).__name__}")
            return data
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                return list(_hf_datasets().load_dataset("parquet", data_files=str(path), split="train"))
            return pq.read_table(path).to_pylist()
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    if suffix in (".jsonl", ".json", ".parquet") or (not path.exists() and not _hub_name(str(path_or_name))):
        raise FileNotFoundError(f"{path.resolve()} does not exist (path_or_name={str(path_or_name)!r}); give a "
                                f".jsonl, .json or .parquet file, or a Hugging Face dataset name")
    datasets = _hf_datasets()
    try:
        return list(datasets.load_dataset(str(path_or_name), split=split))
    except (OSError, ValueError) as e:  # not found, or the hub cannot be reached (datasets raises both kinds)
        raise OSError(f"dataset {str(path_or_name)!r}: no such local file, and loading it as a Hugging Face dataset "
                      f"failed ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
                      f"give a .jsonl, .json or .parquet file") from None


def _hub_name(name: str) -> bool:
    """Could be a hub dataset id ("name" or "org/name"), as opposed to a path that can only be local."""
    return not name.startswith(("/", ".", "~")) and name.count("/") <= 1 and "\\" not in name


def _hf_datasets():
    try:
        import datasets
    except ImportError as e:
        raise ImportError("loading parquet or Hugging Face datasets needs `pip install 'gvpo[parquet]'`") from e
    return datasets


def validate_rows(rows: list[dict], required: tuple[str, ...] = ("prompt",)) -> list[dict]:
    """Check that every row has the required columns and a non-empty prompt; return the rows unchanged."""
    if not rows:
        raise ValueError("the dataset has no rows: check the file, split or filter")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"row {i}: expected a dict of columns, got {type(row).__name__}")
        for column in required:
            if column not in row or row[column] is None:
                raise ValueError(
                    f"row {i}: missing column {column!r} (columns: {sorted(row)}). Rename the column in the data "
                    f"or point to the one that holds it, e.g. {column}_column='problem'"
                )
            value = row[column]
            if column in ("prompt", "problem") and (not value or (isinstance(value, str) and not value.strip())):
                raise ValueError(f"row {i}: column {column!r} is empty; remove the row or fix the data")
    if "prompt" in required:
        _check_prompt_kinds(rows)
    return rows


# ---------------------------------------------------------------------------------------------------------
# Conversational datasets, as TRL has them: the prompt is a list of {"role", "content"} messages.


def is_conversational(prompt) -> bool:
    """TRL's test: a list whose first item is a dict with a "role"."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def _check_prompt_kinds(rows: list[dict]) -> None:
    chat = is_conversational(rows[0]["prompt"])
    for i, row in enumerate(rows):
        prompt = row["prompt"]
        if is_conversational(prompt) != chat:
            kind = "chat messages" if chat else "plain text"
            raise ValueError(f"row {i}: the prompt is {'plain text' if chat else 'chat messages'} but row 0's is "
                             f"{kind}; one dataset holds one kind of prompt")
        if not chat and not isinstance(prompt, str):
            raise ValueError(f"row {i}: prompt of type {type(prompt).__name__}; give a string or a list of "
                             f"{{'role': ..., 'content': ...}} messages")
        for message in prompt if chat else ():
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"row {i}: chat message {message!r} needs the keys 'role' and 'content'")


def chat_prompt_ids(messages: list[dict], tokenizer) -> list[int]:
    """Token ids of a conversational prompt: the tokenizer's chat template with the generation prompt, as TRL
    builds the model input (the template holds its own special tokens, so none are added)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the prompts are chat messages, which need a tokenizer with a chat template, and this "
                         "model's tokenizer has none: set tokenizer.chat_template (or save one with the model), "
                         "or give plain-text prompts")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def as_completions(texts: list[str], conversational: bool) -> list:
    """Completions as reward functions receive them: strings, or [{"role": "assistant", "content": text}]."""
    return [[{"role": "assistant", "content": t}] for t in texts] if conversational else list(texts)


def format_prompt(problem: str, tokenizer=None, template: str = "plain") -> str:
    """The prompt text for one problem.

    plain: "Question: ...\\n<instruction>\\nAnswer:" - no chat template needed (base models, tiny models).
    qwen_math: the tokenizer's chat template with Qwen2.5-Math's evaluation prompt (system message =
    the instruction, user message = the problem), as in the GVPO paper's setup.
    chat: the tokenizer's chat template around one user message, the problem as is (no instruction added:
    for a user's own prompts; the math instruction belongs to qwen_math and plain).
    A tokenizer without a chat template raises ValueError (no silent fallback: the prompts a model is
    trained and evaluated on must not change without notice); use template="plain" for such models.
    """
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r}: choose one of {', '.join(TEMPLATES)}")
    if template == "plain":
        return f"Question: {problem}\n{QWEN_MATH_INSTRUCTION}\nAnswer:"
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"template={template!r} needs a tokenizer with a chat template; this one has none. "
            f"Use template='plain', or set tokenizer.chat_template"
        )
    if template == "qwen_math":
        messages = [{"role": "system", "content": QWEN_MATH_INSTRUCTION}, {"role": "user", "content": problem}]
    else:
        messages = [{"role": "user", "content": problem}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(texts: list[str], tokenizer, template: str = "plain") -> list[list[int]]:
    """Token ids of formatted prompts; chat templates already hold their special tokens, so none are added."""
    from transformers import PreTrainedTokenizerBase

    add_special = template == "plain"
    # verbose=False (transformers tokenizers only): no "longer than the specified maximum ... indexing errors"
    # warning; callers that care (gvpo eval) count the prompts over model_max_length and say what it means.
    quiet = {"verbose": False} if isinstance(tokenizer, PreTrainedTokenizerBase) else {}
    return [list(tokenizer.encode(text, add_special_tokens=add_special, **quiet)) for text in texts]


def encode_rows(rows: list[dict], tokenizer, template: str = "none") -> list[dict]:
    """Add each row's ``prompt_ids``: chat messages through the tokenizer's chat template; text verbatim
    (``template="none"``) or wrapped by ``format_prompt``."""
    if not rows:
        return rows
    if is_conversational(rows[0]["prompt"]):
        if template != "none":
            raise ValueError(f"template={template!r} wraps a plain-text problem, but the prompts are chat messages "
                             f"(they go through the tokenizer's chat template as they are): set template=none")
        ids = [chat_prompt_ids(r["prompt"], tokenizer) for r in rows]
    elif template == "none":  # the prompt column is the model's input, verbatim
        ids = [tokenizer(r["prompt"])["input_ids"] for r in rows]
    else:
        ids = encode_prompts([format_prompt(r["prompt"], tokenizer, template) for r in rows], tokenizer, template)
    for r, p in zip(rows, ids):
        r["prompt_ids"] = p
    return rows


HELD_OUT_SEED = 0  # fixes which rows of a single dataset are held out, independently of training.seed


def read_rows(config, train_rows=None, eval_rows=None):
    """The training and held-out rows, with canonical column names, validated (no tokenizer needed)."""
    d = config.data
    if train_rows is None and eval_rows is None and d.dataset and not d.eval_dataset:
        # One dataset and no eval set: hold out num_eval rows, so evaluation never sees a training row. Rows are
        # taken in a fixed random order (files are often sorted by source or difficulty): the same held-out
        # set for every training seed, and num_train caps a random subset, not the file's head.
        rows = _rows_from(d.dataset, d, "train", 0, config.training.seed)
        if len(rows) <= d.num_eval:
            raise ValueError(f"dataset {d.dataset!r} has {len(rows)} rows, not enough to hold out num_eval="
                             f"{d.num_eval} for evaluation; lower num_eval or set eval_dataset")
        order = random.Random(HELD_OUT_SEED).sample(range(len(rows)), len(rows))
        held = sorted(order[:d.num_eval])
        eval_rows = [rows[i] for i in held]
        train_rows = [rows[i] for i in sorted(order[d.num_eval:][:d.num_train or None])]
    if train_rows is None:
        train_rows = _rows_from(d.dataset, d, "train", d.num_train, config.training.seed)
    if eval_rows is None:
        eval_rows = _rows_from(d.eval_dataset or d.dataset, d, "test", d.num_eval, config.training.seed)
    out = []
    for rows, name in ((train_rows, "dataset"), (eval_rows, "eval_dataset")):
        rows = [dict(r) for r in rows]
        if name == "eval_dataset" and not rows:  # num_eval=0: no held-out evaluation
            out.append(rows)
            continue
        for r in rows:
            for column, canonical in ((d.prompt_column, "prompt"), (d.answer_column, "answer")):
                if column != canonical and column in r:
                    r[canonical] = r[column]
        try:
            validate_rows(rows, required=("prompt",))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        out.append(rows)
    return out


def _rows_from(source: str, d, split: str, limit: int, seed: int) -> list[dict]:
    if not source:
        from gvpo.tasks import make_dataset

        return make_dataset(d.task, split=split, n=limit, seed=seed)
    rows = load_benchmark(source, split=split if split == "train" else None) if source in BENCHMARKS \
        else load_dataset_file(source, split=split)
    for r in rows:  # benchmark rows carry the question as "problem"
        r.setdefault("prompt", r.get("problem"))
    return rows[:limit] if limit else rows
