"""Reward functions written for TRL run unchanged: TRL's keywords, async functions, reward models, time limits."""

import asyncio
import json
import time

import pytest
import torch

import trl_doc_rewards as docs
from gvpo.rewards.calling import CALL_KEYWORDS, call_rewards
from gvpo.scoring import RewardError, RewardTimeout, score
from gvpo.trainer import train

from test_trainer import ROWS, read
from test_trainer import config_for as _trainer_config


def config_for(tmp_path, model_dir, name="run", **overrides):
    """test_trainer's tiny run, smaller: 3 steps of 4 prompts x 4 completions of 6 tokens."""
    small = dict(max_steps=3, prompts_per_step=4, num_generations=4, max_completion_length=6)
    return _trainer_config(tmp_path, model_dir, name, **{**small, **overrides})


def test_a_reward_receives_exactly_trls_keywords(tmp_path, tiny_model_dir):
    seen = []

    def spy(**kwargs):
        seen.append(kwargs)
        return [0.0] * len(kwargs["completions"])

    train(config_for(tmp_path, tiny_model_dir, max_steps=1, num_eval=0), reward_funcs=[spy], train_rows=ROWS,
          eval_rows=[])
    (kwargs,) = seen
    assert set(kwargs) == set(CALL_KEYWORDS) | {"answer"}
    assert len(kwargs["prompts"]) == len(kwargs["completions"]) == len(kwargs["answer"]) == 16
    assert set(kwargs["prompts"]) <= {r["prompt"] for r in ROWS}  # the dataset's prompt, as TRL passes it
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for ids, text in zip(kwargs["completion_ids"], kwargs["completions"]):
        assert tok.decode(ids, skip_special_tokens=True) == text
    # rows and answers stay aligned: each completion's answer is its prompt's sum
    assert all(str(eval(p.rstrip("="))) == a for p, a in zip(kwargs["prompts"], kwargs["answer"]))
    assert kwargs["trainer_state"].global_step == 0 and kwargs["trainer_state"].max_steps == 1


def test_trl_documentation_rewards_train_unchanged(tmp_path, tiny_model_dir):
    docs.SEEN_STEPS.clear()
    funcs = [docs.reward_len, docs.format_reward, docs.accuracy_reward, docs.progress_reward, docs.async_reward,
             docs.logging_reward]
    cfg = config_for(tmp_path, tiny_model_dir, max_steps=3, num_iterations=2, eval_steps=0, num_eval=4)
    summary = train(cfg, reward_funcs=funcs, train_rows=ROWS, eval_rows=ROWS[:4])
    assert summary["steps"] == 3
    rows = [r for r in read(tmp_path / "run") if "loss" in r]
    for name in ("reward_len", "format_reward", "accuracy_reward", "progress_reward", "async_reward"):
        assert all(f"rewards/{name}" in r for r in rows), name
    assert all(r["mean_length"] > 0 for r in rows)  # log_metric lands in metrics.jsonl
    # Steps count optimizer updates, as in TRL: 2 per step here, 6 in all; the initial and final evaluations
    # call the first reward only (reward_len), so progress_reward sees the three training steps.
    assert docs.SEEN_STEPS == [(0, 6), (2, 6), (4, 6)]


async def _meet(mine: str, theirs: str, completions):
    """Completes only if the other function runs at the same time (a sequential caller would deadlock)."""
    _EVENTS.setdefault(mine, asyncio.Event()).set()
    await _EVENTS.setdefault(theirs, asyncio.Event()).wait()
    return [1.0] * len(completions)


_EVENTS: dict = {}


async def ping(completions, **kwargs):
    return await _meet("ping", "pong", completions)


async def pong(completions, **kwargs):
    return await _meet("pong", "ping", completions)


def test_async_rewards_run_concurrently():
    _EVENTS.clear()
    kwargs = {"prompts": ["a"], "completions": ["b"]}
    # A caller that awaited one function after the other would stop at the time limit instead.
    assert call_rewards([ping, docs.reward_len, pong], kwargs, timeout_s=20) == [[1.0], [-19], [1.0]]


def test_a_missing_column_is_named_before_the_model_loads(tmp_path):
    def needs_solution(prompts, completions, solution):
        return [0.0] * len(completions)

    cfg = config_for(tmp_path, "/nonexistent/model")  # never reached: the reward check comes first
    with pytest.raises(RewardError, match=r"'needs_solution' needs column 'solution'.*columns: answer"):
        train(cfg, reward_funcs=[needs_solution], train_rows=ROWS, eval_rows=ROWS[:4])


def test_a_function_without_kwargs_gets_the_keywords_it_names():
    def plain(completions, answer):
        return [float(c == a) for c, a in zip(completions, answer)]

    totals, metrics = score([plain], [1.0], ["p", "q"], ["3", "4"], {"answer": ["3", "5"]})
    assert totals == [1.0, 0.0] and metrics["rewards/plain"] == 0.5


def test_cli_trains_with_module_function_rewards(tmp_path, tiny_model_dir, monkeypatch):
    from pathlib import Path

    from gvpo.cli import main

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:40]))
    rewards = ",".join(f"trl_doc_rewards:{n}" for n in ("reward_len", "accuracy_reward", "progress_reward",
                                                         "async_reward"))
    code = main(["train", f"model_name_or_path={tiny_model_dir}", f"dataset={data}", "num_eval=4",
                 f"output_dir={tmp_path / 'cli'}", "max_steps=2", "prompts_per_step=4", "num_generations=4",
                 "max_completion_length=6", "progress_bar=false", "save_steps=0", f"reward_funcs={rewards}"])
    assert code == 0
    rows = [r for r in read(tmp_path / "cli") if "loss" in r]
    assert len(rows) == 2 and all("rewards/accuracy_reward" in r and "rewards/async_reward" in r for r in rows)


# ------------------------------------------------------------------------------------------------------
# Time limits


class SleepsOnCall:
    """Returns normally until its n-th call, which never returns (for the test's purpose: 120 s)."""

    __name__ = "stuck_judge"

    def __init__(self, n, swallow=False):
        self.calls, self.n, self.swallow, self.started = 0, n, swallow, None

    def __call__(self, completions, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            self.started = time.monotonic()
            try:
                time.sleep(120)
            except BaseException:  # even a function that swallows the interruption and returns late is stopped
                if not self.swallow:
                    raise
        return [0.0] * len(completions)


@pytest.mark.parametrize("swallow", [False, True])
def test_a_reward_that_never_returns_stops_the_run_and_keeps_the_checkpoint(tmp_path, tiny_model_dir, swallow):
    from gvpo.checkpoint import latest_checkpoint, load_trainer_state

    stuck = SleepsOnCall(3, swallow)  # calls: initial evaluation, step 1, step 2 (hangs)
    cfg = config_for(tmp_path, tiny_model_dir, max_steps=3, save_steps=1, reward_timeout=1)
    with pytest.raises(RewardTimeout, match=r"'stuck_judge' did not return within reward_timeout=1 s"):
        train(cfg, reward_funcs=[stuck], train_rows=ROWS, eval_rows=ROWS[:4])
    # Not a speed figure: a bound ten times the limit that only a hang (or a missing limit) breaks.
    assert time.monotonic() - stuck.started < 1 + 10
    last = latest_checkpoint(tmp_path / "run")
    assert last.name == "step-000001" and load_trainer_state(last)["step"] == 1


def test_a_hanging_async_reward_is_named():
    async def stuck_async(completions, **kwargs):
        await asyncio.sleep(120)

    async def fine(completions, **kwargs):
        return [1.0] * len(completions)

    start = time.monotonic()
    with pytest.raises(RewardTimeout, match=r"'stuck_async' did not return"):
        call_rewards([fine, stuck_async], {"prompts": ["a"], "completions": ["b"]}, timeout_s=1)
    assert time.monotonic() - start < 1 + 10
    assert call_rewards([fine], {"prompts": ["a"], "completions": ["b"]}, timeout_s=1) == [[1.0]]  # loop usable


def test_a_reward_off_the_main_thread_is_limited_too():
    import threading

    def stuck(completions, **kwargs):
        time.sleep(120)

    errors = []
    thread = threading.Thread(target=lambda: errors.append(
        pytest.raises(RewardTimeout, call_rewards, [stuck], {"prompts": ["a"], "completions": ["b"]}, 1)))
    thread.start()
    thread.join(30)
    assert not thread.is_alive() and "'stuck'" in str(errors[0].value)


# ------------------------------------------------------------------------------------------------------
# Reward models


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from conftest import build_char_tokenizer

    path = tmp_path_factory.mktemp("tiny_rm")
    tok = build_char_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    Qwen2ForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_a_reward_model_scores_prompt_plus_completion_as_trl(tmp_path, tiny_model_dir, reward_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from gvpo.scoring import resolve_reward

    rm = resolve_reward(reward_model_dir)
    prompts, completions = ["1+2=", "10+20="], ["3", "30 and more"]
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(reward_model_dir)
    expected = [model(torch.tensor([tok.encode(p + c, add_special_tokens=False)])).logits[0, 0].item()
                for p, c in zip(prompts, completions)]  # one at a time: no padding at all
    assert rm(prompts=prompts, completions=completions) == pytest.approx(expected, abs=1e-5)
    loaded = resolve_reward(AutoModelForSequenceClassification.from_pretrained(reward_model_dir))  # as TRL accepts
    assert loaded(prompts=prompts, completions=completions) == pytest.approx(expected, abs=1e-5)
    assert loaded.__name__ == rm.__name__ == reward_model_dir.rstrip("/").split("/")[-1]

    summary = train(config_for(tmp_path, tiny_model_dir, max_steps=2, reward_funcs=[reward_model_dir]),
                    train_rows=ROWS, eval_rows=ROWS[:4])
    name = reward_model_dir.rstrip("/").split("/")[-1]
    assert summary["steps"] == 2 and all(f"rewards/{name}" in r for r in read(tmp_path / "run") if "loss" in r)


def test_a_reward_model_scores_a_conversation_through_its_chat_template(reward_model_dir):
    from transformers import AutoModelForSequenceClassification

    from gvpo.rewards.model import RewardModel

    rm = RewardModel.load(reward_model_dir)
    rm.tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }}. {% endfor %}"
    prompts = [[{"role": "user", "content": "1+2="}]] * 2
    completions = [[{"role": "assistant", "content": "3"}], [{"role": "assistant", "content": "4"}]]
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    expected = [model(torch.tensor([rm.tokenizer.encode(f"user 1+2=. assistant {c}. ", add_special_tokens=False)]))
                .logits[0, 0].item() for c in "34"]
    assert rm(prompts=prompts, completions=completions) == pytest.approx(expected, abs=1e-5)


def test_a_foreign_sigusr1_during_a_reward_reaches_its_own_handler():
    import os
    import signal

    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))

    def pinged(completions, **kwargs):  # e.g. a cluster's "about to be preempted" signal arrives mid-call
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.2)
        return [1.0] * len(completions)

    try:
        assert call_rewards([pinged], {"prompts": ["a"], "completions": ["b"]}, timeout_s=30) == [[1.0]]
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert received == [signal.SIGUSR1]
