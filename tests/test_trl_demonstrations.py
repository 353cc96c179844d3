"""Demonstrations in GVPOTrainer (gvpo.integrations.trl): a dataset's worked completions replace the last d
samples of their own prompt's group, reach TRL's reward functions as completions, and train with the GVPO loss
as they are. On the tiny random Qwen2 of tests/test_trl.py, on CPU."""

import copy
import json
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from gvpo.integrations.trl import GVPOTrainer  # noqa: E402
from test_distributed import _torchrun, assert_group_ended  # noqa: E402
from test_trl import CHARS, K, first_half_letters, make_config, recording_trainer, tiny  # noqa: E402, F401 (fixture)

EOS = 1
# Letters and digits only, so the char tokenizer round-trips them exactly; row i's own text, so a demonstration in
# another prompt's group is visible. Odd rows' solutions are longer than max_completion_length = 8.
SOLUTIONS = [f"{CHARS[i]}{'abc' if i % 2 == 0 else 'abcdefghij'}" for i in range(16)]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def dataset(conversational=False, lists=False):
    prompts = [f"{CHARS[i]}{CHARS[i + 1]}:" for i in range(16)]
    if conversational:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    solutions = [[f"{n}{s}" for n in "012"] for s in SOLUTIONS] if lists else SOLUTIONS  # distinct when cut
    return Dataset.from_dict({"prompt": prompts, "solution": solutions})


def recording(cls=GVPOTrainer):
    """A trainer class that records what reward functions saw and what each generation batch held."""

    class Recording(cls):
        seen = []  # per reward call: (prompts, completions, solution column)
        batches = []  # per generation: the output dict of _generate_and_score_completions

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            type(self).batches.append({k: v for k, v in output.items() if isinstance(v, torch.Tensor)})
            return output

    def reward(prompts, completions, solution=(), **kwargs):  # evaluation data has no solution column
        Recording.seen.append((list(prompts), list(completions), list(solution)))
        return first_half_letters([c if isinstance(c, str) else c[0]["content"] for c in completions])

    return Recording, reward


@pytest.mark.parametrize("conversational,d", [(False, 1), (True, 2)], ids=["standard-d1", "conversational-d2-lists"])
def test_a_demonstration_joins_exactly_its_own_group_and_is_scored(tiny, tmp_path, monkeypatch, conversational, d):
    path, tokenizer = tiny
    if conversational:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = CHAT_TEMPLATE
    sampled_rows = []  # prompts TRL's own _generate_single_turn was asked to sample
    original = GRPOTrainer._generate_single_turn

    def counting(self, prompt_ids, *args, **kwargs):
        sampled_rows.append(len(prompt_ids))
        return original(self, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", counting)
    cls, reward = recording()
    args = make_config(tmp_path, demonstration_column="solution", demonstrations_per_group=d)
    trainer = cls(model=path, reward_funcs=reward, args=args, train_dataset=dataset(conversational, lists=d > 1),
                  processing_class=tokenizer)
    trainer.train()

    assert len(cls.seen) == 3 and len(cls.batches) == 3  # one generation batch of 16 rows per step
    assert sampled_rows == [16 - 4 * d] * 3, "the rows a demonstration replaces were generated anyway"
    picks = set()
    for (prompts, completions, solution), batch in zip(cls.seen, cls.batches):
        expected_demo = torch.tensor([i % K >= K - d for i in range(16)])
        assert torch.equal(batch["is_demonstration"].cpu(), expected_demo)
        for g in range(16 // K):
            rows = range(g * K, (g + 1) * K)
            assert all(prompts[i] == prompts[g * K] for i in rows)
            own = solution[g * K] if d > 1 else [solution[g * K]]  # this prompt's row's demonstrations
            texts = [completions[i][0]["content"] if conversational else completions[i] for i in rows]
            demos = texts[K - d:]
            if conversational:  # TRL's representation of a conversational completion
                assert all(completions[i] == [{"role": "assistant", "content": t}] for i, t in zip(rows, texts))
            # its own demonstrations (cut at 8 tokens), distinct, in column order
            cut = [t[:8] for t in own]
            assert all(t in cut for t in demos) and sorted(demos, key=cut.index) == demos and len(set(demos)) == d
            picks.add(tuple(cut.index(t) for t in demos))
            for i, text in zip(rows[K - d:], demos):  # tokenized as a completion: text + EOS, cut at the budget
                ids = [CHARS.index(c) + 3 for c in own[cut.index(text)]] + [EOS]
                n = min(len(ids), 8)
                assert batch["completion_ids"][i, :n].tolist() == ids[:8]
                assert batch["completion_mask"][i].sum().item() == n
    if d > 1:
        assert len(picks) > 1, "every group got the same demonstrations of its list: the pick is not random"
    logged = [h for h in trainer.state.log_history if "loss" in h]
    clipped = []
    for h, (prompts, completions, solution) in zip(logged, cls.seen):  # one generation per logged step
        texts = [c[0]["content"] if conversational else c for c in completions]
        rewards = first_half_letters(texts)
        demo = [i % K >= K - d for i in range(16)]
        assert h["demonstrations/fraction"] == d / K
        assert h["demonstrations/reward_mean"] == pytest.approx(sum(r for r, m in zip(rewards, demo) if m) / (4 * d))
        assert h["demonstrations/sampled_reward_mean"] == pytest.approx(
            sum(r for r, m in zip(rewards, demo) if not m) / (16 - 4 * d))
        full = [len(t) == 8 for t, m in zip(texts, demo) if m]  # cut at the budget (an uncut one is shorter)
        assert h["demonstrations/clipped_ratio"] == pytest.approx(sum(full) / len(full))
        clipped += full
    assert any(clipped) and not all(clipped), "every demonstration cut, or none: the budget is not tested"
    if not conversational:  # evaluation samples all k and needs no demonstration column
        n = len(cls.batches)
        metrics = trainer.evaluate(Dataset.from_dict({"prompt": dataset()["prompt"][:4]}))
        assert len(cls.batches) > n and not any("is_demonstration" in b for b in cls.batches[n:])
        assert not any("demonstrations" in key for key in metrics)


def _run(path, tokenizer, tmp_path, cls=GVPOTrainer, data=None, **overrides):
    args = make_config(tmp_path, max_steps=2, **overrides)
    trainer = cls(model=path, reward_funcs=first_half_letters, args=args, train_dataset=data or dataset(),
                  processing_class=tokenizer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_without_demonstrations_a_run_is_unchanged(tiny, tmp_path):
    """Column unset, column set with d = 0, and TRL's own generation and scoring methods (the overrides bypassed):
    the same losses and bit-identical weights."""
    path, tokenizer = tiny

    class TRLGeneration(GVPOTrainer):
        _generate_single_turn = GRPOTrainer._generate_single_turn
        _calculate_rewards = GRPOTrainer._calculate_rewards

    plain_losses, plain = _run(path, tokenizer, tmp_path / "a", cls=TRLGeneration)
    for run in (dict(), dict(demonstration_column="solution", demonstrations_per_group=0)):
        losses, weights = _run(path, tokenizer, tmp_path / "b", **run)
        assert losses == plain_losses
        assert all(torch.equal(weights[n], plain[n]) for n in plain)
    with_demos, _ = _run(path, tokenizer, tmp_path / "c", demonstration_column="solution")
    assert with_demos != plain_losses, "demonstrations changed nothing: the comparison checks nothing"


def test_the_loss_on_a_batch_with_demonstrations_is_gvpo_recomputed_by_hand(tiny, tmp_path):
    """test_trl.py's reference (a plain forward, rewards from the decoded completions, groups from the prompt
    text, pi_theta' = the log-probs each row had when generated) on batches where each group holds a high-reward
    demonstration; the second iteration over the batch has R_theta != 0, so pi_theta' of the demonstration rows
    counts too."""
    path, tokenizer = tiny
    data = Dataset.from_dict({"prompt": [f"{CHARS[i]}{CHARS[i + 1]}:" for i in range(16)],
                              "solution": ["abcdefg"] * 16})  # reward 7; random samples score ~2.6
    cls = recording_trainer(tokenizer, beta=1.0)
    args = make_config(tmp_path, beta=1.0, gradient_accumulation_steps=1, max_steps=2, learning_rate=1e-2,
                       num_iterations=2, demonstration_column="solution", demonstrations_per_group=1)
    trainer = cls(model=path, reward_funcs=first_half_letters, args=args, train_dataset=data,
                  processing_class=tokenizer)
    trainer.train()
    assert cls.generations == 1 and len(cls.records) == 2
    logged = [h for h in trainer.state.log_history if "loss" in h]
    for h, (expected, returned) in zip(logged, cls.records):
        assert returned == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert h["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # logged where the batch was generated (step 1): the demonstrations' reward is apart from the samples'
    assert logged[0]["demonstrations/reward_mean"] == 7.0 and logged[0]["demonstrations/sampled_reward_mean"] < 7.0
    assert logged[1]["gvpo/implicit_reward_mse"] != pytest.approx(logged[0]["gvpo/implicit_reward_mse"], abs=1e-6)


@pytest.mark.parametrize("overrides,match", [
    (dict(demonstrations_per_group=4), r"demonstrations_per_group=4: must be < num_generations=4"),
    (dict(demonstrations_per_group=-1), r"demonstrations_per_group=-1: must be >= 0"),
    (dict(remove_unused_columns=True), r"set remove_unused_columns=False"),
])
def test_bad_demonstration_settings_are_named(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config(tmp_path, demonstration_column="solution", **overrides)
    if "demonstrations_per_group" not in overrides or overrides["demonstrations_per_group"] >= 0:
        make_config(tmp_path, **overrides)  # fine without a column: d is then unused


@pytest.mark.parametrize("data,extra,match", [
    ({"solution": SOLUTIONS}, {}, None),
    ({"answer": SOLUTIONS}, {}, r"demonstration_column='solution': train_dataset has no such column \(it has prompt, "
                                r"answer\)"),
    ({"solution": list(range(16))}, {}, r"train_dataset row 0: demonstration_column='solution': expected a "
                                        r"completion string or a list of them per row, got int"),
    ({"solution": SOLUTIONS}, {"tools": [first_half_letters]}, r"with tools: .* unset one of them"),
])
def test_bad_demonstration_data_is_named_before_the_model_loads(tmp_path, data, extra, match):
    prompts = {"prompt": [f"{CHARS[i]}{CHARS[i + 1]}:" for i in range(16)]}
    args = make_config(tmp_path, demonstration_column="solution")

    def make():
        return GVPOTrainer(model=str(tmp_path / "no-model-here"), reward_funcs=first_half_letters, args=args,
                           train_dataset=Dataset.from_dict({**prompts, **data}), **extra)

    if match is None:  # good data: it gets as far as loading the (missing) model
        with pytest.raises(OSError):
            make()
    else:
        with pytest.raises(ValueError, match=match):
            make()


def test_with_vllm_all_rows_are_sampled_and_demonstrations_carry_nan_sampling_logps(tiny, tmp_path, monkeypatch):
    """vLLM's path (no vLLM on CPU: TRL's method is replaced by a fake that returns what vLLM returns): all k rows
    are generated, the demonstration rows' ids replaced and their sampling log-probs NaN (TRL's marker for "no
    sampler log-prob": importance ratio 1, left out of its logp-difference metrics), the others kept."""
    path, tokenizer = tiny
    calls = []

    def fake_vllm(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        calls.append((len(prompt_ids), num_generations))
        return [[10 + i, EOS] for i in range(len(prompt_ids))], [[-0.5 - i, -0.25] for i in range(len(prompt_ids))]

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", fake_vllm)
    trainer = GVPOTrainer(model=path, reward_funcs=first_half_letters, processing_class=tokenizer,
                          args=make_config(tmp_path, demonstration_column="solution"), train_dataset=dataset())
    trainer.use_vllm = True
    plan = [None, None, None, [5, 6, EOS]] * 2
    trainer._demo_plan = plan
    ids, logps = trainer._generate_single_turn([[3, 4]] * 8, None, {}, K)
    assert calls == [(8, K)] and trainer._demo_plan is None
    for i, row in enumerate(plan):
        if row is None:
            assert ids[i] == [10 + i, EOS] and logps[i] == [-0.5 - i, -0.25]
        else:
            assert ids[i] == row and len(logps[i]) == 3 and all(x != x for x in logps[i])  # NaN
    ids, _ = trainer._generate_single_turn([[3, 4]] * 8, None, {}, K)  # no plan (eval, later turns): TRL's rows
    assert ids == [[10 + i, EOS] for i in range(8)]


def demonstration_run(model_dir, tokenizer, out, per_device):
    """3 steps of 4 prompts x K, d = 2 of 4 listed demonstrations per prompt (also run by the worker, per rank).
    Returns (trainer, per reward call [prompts, completions, solution lists])."""
    seen = []

    def reward(prompts, completions, solution, **kwargs):
        seen.append([list(prompts), list(completions), [list(s) for s in solution]])
        return first_half_letters(completions)

    data = Dataset.from_dict({"prompt": [f"{CHARS[i]}{CHARS[i + 1]}:" for i in range(16)],
                              "solution": [[f"{n}{CHARS[i]}" for n in "0123"] for i in range(16)]})
    args = make_config(Path(out), per_device_train_batch_size=per_device, gradient_accumulation_steps=1,
                       steps_per_generation=1, max_steps=3, demonstration_column="solution", demonstrations_per_group=2)
    trainer = GVPOTrainer(model=model_dir, reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=tokenizer)
    trainer.train()
    return trainer, seen


def _picks(seen) -> dict:
    """(step, prompt) -> the demonstrations in its group, after checking they are the last 2 of its own group's
    rows, distinct, and from its own row's list."""
    picks = {}
    for step, (prompts, completions, solution) in enumerate(seen):
        for g in range(0, len(prompts), K):
            assert len(set(prompts[g : g + K])) == 1
            demos = completions[g + K - 2 : g + K]
            assert all(d in solution[g] for d in demos) and len(set(demos)) == 2, (prompts[g], demos, solution[g])
            picks[(step, prompts[g])] = demos
    return picks


def test_two_processes_put_the_same_demonstrations_in_the_same_groups_as_one(tiny, tmp_path):
    """torchrun, 2 gloo processes of 8 rows each vs one process of 16 (the same global batches): every rank's
    groups hold their own prompt's demonstrations, and the seeded pick is the same per (step, prompt)."""
    path, tokenizer = tiny
    _, seen_one = demonstration_run(path, tokenizer, tmp_path / "one", 16)
    out = tmp_path / "two"
    out.mkdir()
    tests = Path(__file__).parent
    cmd, env = _torchrun(2, [str(tests / "trl_demonstrations_worker.py"), path, str(out), "8"], tests)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_group_ended(out, 2, done.stderr)
    ranks = [json.loads((out / f"seen{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert all(len(call[0]) == 8 for r in ranks for call in r["seen"])  # each rank scored its own 2 groups
    one = _picks(seen_one)
    two = {key: demos for r in ranks for key, demos in _picks(r["seen"]).items()}
    assert len(one) == 12 and two == one
