"""Replay buffer: the configured mix, per-prompt isolation, staleness, and a GVPO run on half-replayed groups."""

import json

import pytest
import torch

from gvpo.groups import generate_groups
from gvpo.replay import Replay, ReplayBuffer, Response
from gvpo.types import SAMPLED, Groups, Rollout, concat_rollouts, tokens_to_rollout


def resp(tag, version, reward=1.0):
    return Response([tag, tag, 1], [-0.5, -0.5, -0.1], reward, version)


def test_capacity_keeps_the_newest():
    buf = ReplayBuffer(max_staleness=3, capacity=2)
    buf.add(7, [resp(1, 1), resp(2, 2), resp(3, 4)])
    assert [r.version for r in buf.entries[7]] == [2, 4]


def test_eviction_boundary():
    buf = ReplayBuffer(max_staleness=3, capacity=8)
    buf.add(1, [resp(1, v) for v in (1, 2, 3, 4)])
    dropped = buf.evict(step=6)  # keeps versions with 6 - v <= 3: 3 and 4
    assert dropped == 2 and [r.version for r in buf.entries[1]] == [3, 4]
    assert buf.evict(step=100) == 2 and len(buf) == 0 and 1 not in buf.entries


def test_sample_is_per_prompt_and_deterministic():
    buf = ReplayBuffer(max_staleness=10, capacity=8)
    for key in (3, 4):
        buf.add(key, [resp(10 * key + i, 1) for i in range(6)])
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = buf.sample(3, 4, g1), buf.sample(3, 4, g2)
    assert a == b and len(a) == 4 and all(30 <= r.completion_ids[0] < 40 for r in a)
    assert len(buf.sample(9, 4)) == 0  # an unseen prompt has no history


def test_state_round_trip():
    buf = ReplayBuffer(5, 4)
    buf.add(2, [resp(1, 1)])
    other = ReplayBuffer(5, 4)
    other.load_state_dict(json.loads(json.dumps(buf.state_dict())))
    assert other.entries == buf.entries


class Fixed:
    """A group source that returns the same groups every step (and records what Replay reserved)."""

    def __init__(self, groups):
        self.groups, self.reserve = groups, None

    def next(self, step):
        return Groups(**{**vars(self.groups), "metrics": {}})


def test_mix_never_crosses_prompts():
    """Historical responses join the group of their own prompt, and fresh ones are stored under theirs."""
    buf = ReplayBuffer(max_staleness=10, capacity=8)
    keys = [40, 41]  # dataset indices of the two prompts in this step
    buf.add(40, [resp(40, 1), resp(40, 2)])
    buf.add(41, [resp(41, 1)])
    fresh = Rollout(completion_ids=torch.tensor([[5, 1], [6, 1], [7, 1]]), completion_mask=torch.ones(3, 2).long(),
                    behavior_logps=torch.zeros(3, 2), prompt_index=torch.tensor([0, 0, 1]))
    replay = Replay(buf, num_historical=2, num_generations=4)
    assert replay.reserve(3, keys) == [2, 1]
    replay.inner = Fixed(Groups(keys, [0, 1], [11, 12], [[9], [9]], fresh, [0.0, 1.0, 0.5], [SAMPLED] * 3, [0] * 3))
    groups = replay.next(3)
    replayed = [o == "replayed" for o in groups.origin]
    assert replayed == [False] * 3 + [True] * 3 and groups.metrics["replayed"] == 3
    assert groups.rollout.prompt_index.tolist() == [0, 0, 1, 0, 0, 1]
    for row, p in enumerate(groups.rollout.prompt_index.tolist()):
        if replayed[row]:
            assert groups.rollout.completion_ids[row, 0].item() == keys[p]  # the tag is the prompt's key
    assert groups.rewards == [0.0, 1.0, 0.5, 1.0, 1.0, 1.0]
    assert [r.completion_ids[0] for r in buf.entries[40]][-2:] == [5, 6] and buf.entries[41][-1].completion_ids[0] == 7
    assert [r.version for r in buf.entries[40]][-2:] == [3, 3]


def test_generate_groups_with_different_counts(tiny_model_dir):
    from gvpo.modeling import load_model_and_tokenizer
    from gvpo.rollout import make_engine
    from gvpo.types import SamplingParams

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    engine = make_engine("fast", model, tok)
    prompts = [tok("12+3=")["input_ids"], tok("4+5=")["input_ids"], tok("77+1=")["input_ids"]]
    r = generate_groups(engine, prompts, [4, 2, 4], SamplingParams(max_new_tokens=5), torch.Generator().manual_seed(0))
    assert sorted(r.prompt_index.tolist()) == [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert r.completion_ids.shape[0] == 10


def test_tokens_to_rollout_pads():
    r = tokens_to_rollout([0, 1], [[3, 4, 1], [5]], [[-1.0, -2.0, -0.5], [-0.3]], "cpu", pad_token_id=0)
    assert r.completion_ids.tolist() == [[3, 4, 1], [5, 0, 0]] and r.completion_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    both = concat_rollouts([r, r])
    assert both.completion_ids.shape == (4, 3)


@pytest.mark.parametrize("algorithm", ["gvpo", "grpo"])
def test_half_replayed_groups_train(tmp_path, tiny_model_dir, algorithm):
    from test_trainer import ROWS, config_for, read, sevens

    from gvpo.trainer import train

    rows = ROWS[:8]  # 8 prompts, 8 per step: every prompt recurs every step
    cfg = config_for(tmp_path, tiny_model_dir, algorithm=algorithm, max_steps=12, num_historical=4, max_staleness=4)
    summary = train(cfg, reward_funcs=[sevens], train_rows=rows, eval_rows=rows)
    log = [r for r in read(tmp_path / "run") if "loss" in r]
    assert [r["replayed"] for r in log] == [0] + [32] * 11  # 4 of 8 per group once history exists
    assert all(r["groups_used"] == 8 for r in log)
    assert summary["skipped_updates"] == 0 and all(abs(r["loss"]) < 1e3 for r in log)
    first = sum(r["reward_mean"] for r in log[:3]) / 3
    last = sum(r["reward_mean"] for r in log[-3:]) / 3
    assert last > first + 0.1, f"{algorithm}: fresh-sample reward {first:.3f} -> {last:.3f}"


def test_stored_responses_carry_the_step_that_generated_them(tmp_path, tiny_model_dir):
    """Each step stores its fresh responses with version = that step (eviction and the baselines' staleness
    count from it), and replayed rows are marked stale."""
    from test_trainer import ROWS, config_for, sevens

    from gvpo.trainer import generate_batch, setup

    rows = ROWS[:8]
    run = setup(config_for(tmp_path, tiny_model_dir, num_historical=2, max_staleness=4), reward_funcs=[sevens],
                train_rows=rows, eval_rows=rows)
    for step in (1, 2, 3):
        batch, metrics = generate_batch(run, step)
        versions = [r.version for responses in run.replay.entries.values() for r in responses]
        assert max(versions) == step and min(versions) >= 1, (step, sorted(set(versions)))
        assert int(batch.is_stale().sum()) == metrics["replayed"] == (0 if step == 1 else 16)
