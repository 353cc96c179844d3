"""Synthetic tasks, the reward, and the shipped default model (src/gvpo/assets/default)."""

import re

import pytest
import torch

from gvpo.assets import default_model_path
from gvpo.tasks import (
    TASKS,
    arithmetic_reward,
    extract_answer,
    make_dataset,
    split_of,
    worked_solution,
)


# --- tasks -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(TASKS))
def test_splits_are_disjoint_and_consistent(task):
    n_test = 1000 if TASKS[task].num_operands > 2 else 300  # two addends: only about 810 test problems exist
    train = make_dataset(task, "train", 3000, seed=0)
    test = make_dataset(task, "test", n_test, seed=0)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    # Other seeds draw other problems but never cross the split.
    other_test = make_dataset(task, "test", n_test, seed=1)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in other_test}
    assert all(split_of(r["prompt"]) == "train" for r in train)
    assert all(split_of(r["prompt"]) == "test" for r in test)
    assert len({r["prompt"] for r in train}) == len(train)  # rows are distinct


def test_dataset_is_deterministic_under_seed():
    a = make_dataset("arithmetic", "train", 200, seed=7)
    b = make_dataset("arithmetic", "train", 200, seed=7)
    c = make_dataset("arithmetic", "train", 200, seed=8)
    assert a == b
    assert a != c


def test_rows_are_well_formed():
    for task, spec in TASKS.items():
        for row in make_dataset(task, "test", 50, seed=0):
            operands = [int(x) for x in re.findall(r"\d+", row["prompt"])]
            assert len(operands) == spec.num_operands
            assert all(10 <= x <= 99 for x in operands)
            assert row["answer"] == str(sum(operands))
            assert extract_answer(row["solution"]) == row["answer"]
            assert row["task"] == task


def test_unknown_task_lists_the_names():
    with pytest.raises(ValueError, match="arithmetic_hard"):
        make_dataset("nope", "train", 10)
    with pytest.raises(ValueError, match="split"):
        make_dataset("arithmetic", "validation", 10)


def test_worked_solution_and_dropped_carry():
    assert worked_solution((23, 45, 17)) == "23+45=68,68+17=85 #### 85"
    # 47+38 carries: the botched demonstration forgets it, and the next step chains from the wrong sum.
    assert worked_solution((47, 38, 10), drop_carry=(True, False)) == "47+38=75,75+10=85 #### 85"
    assert worked_solution((47, 38, 10), drop_carry=(False, False)) == "47+38=85,85+10=95 #### 95"
    # Steps without a carry are unaffected by drop_carry.
    assert worked_solution((21, 32, 10), drop_carry=(True, True)) == "21+32=53,53+10=63 #### 63"


# --- reward ----------------------------------------------------------------------------------------------


def test_reward_correct_incorrect_malformed():
    completions = [
        "23+45=68,68+17=85 #### 85",  # correct
        "23+45=68,68+17=75 #### 75",  # wrong answer
        "23+45=68,68+17=85",  # no marker
        "23+45=68 #### 85 12+",  # trailing junk: never stopped
        "#### ",  # empty answer
        " #### 85 ",  # whitespace around the answer is fine
    ]
    rewards = arithmetic_reward(["23+45+17="] * 6, completions, ["85"] * 6)
    assert rewards == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert all(isinstance(r, float) for r in rewards)


def test_reward_accepts_conversational_and_broadcast_answer():
    completions = [[{"role": "assistant", "content": "#### 85"}], [{"role": "assistant", "content": "#### 8"}]]
    assert arithmetic_reward(None, completions, "85") == [1.0, 0.0]
    with pytest.raises(ValueError, match="answer"):
        arithmetic_reward(None, ["#### 1", "#### 2"], ["1"])


def test_extract_answer():
    assert extract_answer("1+2=3 #### 3") == "3"
    assert extract_answer("#### -12") == "-12"
    assert extract_answer("3") is None
    assert extract_answer("#### 3.5") is None


# --- the shipped default model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    # One thread: on a busy 2-core machine, 2 threads made this tiny model's generate ~80x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model, tokenizer
    torch.set_num_threads(threads)


def test_assets_are_small_and_complete():
    path = default_model_path()
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert sum(p.stat().st_size for p in path.iterdir()) < 8 * 2**20


def test_default_model_config(default_model):
    model, tokenizer = default_model
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_tokenizer_round_trip_and_left_padding(default_model):
    _, tokenizer = default_model
    text = "23+45=68,68+17=85 #### 85"
    ids = tokenizer.encode(text)
    assert len(ids) == len(text)  # one token per character
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text
    # Byte-level: any text survives, spaces included (transformers 5 loads it as Qwen2Tokenizer, whose
    # pipeline drops characters missing from the vocabulary, so the vocabulary must hold every byte).
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    odd = "héllo  wörld\n\t#### -7"
    assert tokenizer.decode(tokenizer.encode(odd)) == odd
    batch = tokenizer(["1+2=", "10+20+30="], padding=True, return_tensors="pt")
    assert tokenizer.padding_side == "left"
    assert batch["input_ids"][0, :5].tolist() == [tokenizer.pad_token_id] * 5
    assert batch["attention_mask"][0].tolist() == [0] * 5 + [1] * 4
    assert tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == "1+2="


def _greedy_accuracy(model, tokenizer, rows, max_new_tokens=40):
    enc = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens)
    completions = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    rewards = arithmetic_reward(None, completions, [r["answer"] for r in rows])
    return sum(rewards) / len(rewards), completions


def test_default_model_is_imperfect_but_competent(default_model):
    model, tokenizer = default_model
    rows = make_dataset("arithmetic", "test", 100, seed=0)
    accuracy, completions = _greedy_accuracy(model, tokenizer, rows)
    # Leaves room for RL to help, yet starts well above zero, so rewards vary within a group.
    assert 0.15 <= accuracy <= 0.60, accuracy
    # Nearly every greedy completion follows the format, so errors are arithmetic, not formatting.
    formatted = sum(extract_answer(c) is not None for c in completions) / len(completions)
    assert formatted >= 0.9, completions[:5]


def test_left_padding_does_not_change_greedy_output(default_model):
    model, tokenizer = default_model
    rows = make_dataset("arithmetic", "test", 8, seed=0)
    alone = [_greedy_accuracy(model, tokenizer, [r])[1][0] for r in rows[:2]]
    # Pad short prompts by batching them with longer ones.
    mixed = rows[:2] + make_dataset("arithmetic_hard", "test", 2, seed=0)
    batched = _greedy_accuracy(model, tokenizer, mixed)[1][:2]
    assert batched == alone


# --- the build script ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def build_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "build_default_model.py"
    spec = importlib.util.spec_from_file_location("build_default_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_script_tokenizer_matches_shipped(build_script, default_model):
    _, shipped = default_model
    built = build_script.build_tokenizer()
    for text in ["23+45=68,68+17=85 #### 85", "99+99+99+99+99=", "a b\tc"]:
        assert built.encode(text) == shipped.encode(text)
    assert (built.eos_token_id, built.pad_token_id) == (shipped.eos_token_id, shipped.pad_token_id)


def test_build_script_demonstrations(build_script):
    import random

    rng = random.Random(0)
    demos = [build_script.sample_demo(rng, 3, drop_carry=0.6, threshold=10) for _ in range(2000)]
    assert all(split_of(prompt) == "train" for prompt, _ in demos)  # never a held-out problem
    botched = carrying = 0
    for prompt, completion in demos:
        a, b, _ = (int(x) for x in prompt.rstrip("=").split("+"))
        if a % 10 + b % 10 >= 10:  # the first step carries: is it botched?
            carrying += 1
            botched += completion.startswith(f"{a}+{b}={a + b - 10},")
        else:
            assert completion.startswith(f"{a}+{b}={a + b},")
    assert 0.55 <= botched / carrying <= 0.65


def test_addition_chat_prompts_and_the_final_number_reward():
    (row,) = make_dataset("addition_chat", "test", 1, seed=0)
    a, b = (int(x) for x in re.findall(r"\d+", row["prompt"]))
    assert row["prompt"] == f"What is {a} + {b}? Answer with just the number."
    from gvpo.scoring import resolve_reward

    reward = resolve_reward("final_number")
    gold = str(a + b)
    completions = [f"{a} + {b} = {gold}", f"The answer is {gold}.", f"{a} + {b} = {int(gold) + 1}", f"{a} + {b}",
                   "", [{"role": "assistant", "content": f"= {gold}"}], f"{gold}0"]
    assert reward(prompts=None, completions=completions, answer=gold) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert reward(prompts=None, completions=["It is 1,234."], answer="1234") == [1.0]
