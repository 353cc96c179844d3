"""Conversational datasets as TRL has them: prompts are chat messages, completions reach rewards as messages."""

import json
import math

import pytest

from gvpo.config import load_config
from gvpo.data import as_completions, chat_prompt_ids, validate_rows
from gvpo.trainer import train

# Only characters of the char tokenizer (tests/conftest.py), so that every template token is a real one.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }}. {% endfor %}"
                 "{% if add_generation_prompt %}assistant {% endif %}")
ROWS = [{"prompt": [{"role": "system", "content": "add"}, {"role": "user", "content": f"{a}+{b}="}],
         "answer": str(a + b)} for a in range(10, 14) for b in range(10, 12)]


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_chat")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(path)
    return str(path)


def config_for(tmp_path, model_dir, **overrides):
    base = {"model_name_or_path": model_dir, "output_dir": str(tmp_path / "run"), "max_steps": 2,
            "prompts_per_step": 4, "num_generations": 4, "max_completion_length": 6, "eval_steps": 0,
            "save_steps": 0, "progress_bar": False}
    return load_config(None, {**base, **overrides})


def test_the_model_input_is_the_chat_template_with_the_generation_prompt(chat_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    ids = chat_prompt_ids(ROWS[0]["prompt"], tok)
    assert ids == tok.encode("system add. user 10+10=. assistant ", add_special_tokens=False)
    assert as_completions(["12"], True) == [[{"role": "assistant", "content": "12"}]]
    assert as_completions(["12"], False) == ["12"]


class Recorder:
    """A TRL-style reward for conversational data: reads completion[0]["content"]; records what it was given."""

    __name__ = "sevens_chat"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, answer, **kwargs):
        self.calls.append((prompts, completions))
        return [c[0]["content"].count("7") / 6 for c in completions]


@pytest.mark.parametrize("num_historical", [0, 2])
def test_a_conversational_dataset_trains_and_evaluates(tmp_path, chat_model_dir, num_historical):
    reward = Recorder()
    cfg = config_for(tmp_path, chat_model_dir, max_steps=3, num_historical=num_historical)
    # 8 rows, 4 prompts per step: prompts recur from step 3 on, so replay has history to mix in.
    summary = train(cfg, reward_funcs=[reward], train_rows=ROWS, eval_rows=ROWS[:3])
    assert not math.isnan(summary["initial_accuracy"]) and not math.isnan(summary["final_accuracy"])
    # initial evaluation, 3 steps, final evaluation
    assert [len(c) for _, c in reward.calls] == [3, 16, 16, 16 - 4 * num_historical, 3]
    for prompts, completions in reward.calls:
        assert all(p in [r["prompt"] for r in ROWS] for p in prompts)  # the messages, as TRL passes them
        assert all(isinstance(c, list) and len(c) == 1 and c[0]["role"] == "assistant"
                   and isinstance(c[0]["content"], str) for c in completions)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    if num_historical:
        assert [r["replayed"] for r in metrics if "replayed" in r][-1] == 4 * num_historical


def test_chat_prompts_need_a_chat_template(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="need a tokenizer with a chat template"):
        train(config_for(tmp_path, tiny_model_dir), reward_funcs=[Recorder()], train_rows=ROWS, eval_rows=ROWS[:2])


def test_a_text_template_on_chat_prompts_is_refused(tmp_path, chat_model_dir):
    with pytest.raises(ValueError, match="template='plain' wraps a plain-text problem.*set template=none"):
        train(config_for(tmp_path, chat_model_dir, template="plain"), reward_funcs=[Recorder()], train_rows=ROWS,
              eval_rows=ROWS[:2])


@pytest.mark.parametrize("rows, match", [
    ([ROWS[0], {"prompt": "1+1="}], r"row 1: the prompt is plain text but row 0's is chat messages"),
    ([{"prompt": [{"role": "user"}]}], r"row 0: chat message .* needs the keys 'role' and 'content'"),
    ([{"prompt": 42}], r"row 0: prompt of type int"),
])
def test_bad_chat_rows_are_named(rows, match):
    with pytest.raises(ValueError, match=match):
        validate_rows(rows)
