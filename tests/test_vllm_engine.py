"""The vLLM engine against a stand-in ``vllm`` module (vLLM itself needs a GPU): the conversion of its outputs
into a Rollout, behaviour log-probs of the trainer's distribution under top-k, and the weights it is sent
(merged LoRA weights under the base model's names)."""

from __future__ import annotations

import copy
import sys
import types
from types import SimpleNamespace as NS

import pytest
import torch

from test_rollout import EOS, completions, tiny_model, tokenizer  # noqa: F401 (fixture)

from gvpo.rollout import make_engine
from gvpo.types import SamplingParams


class FakeLLM:
    """Returns fixed tokens (rows out of order on purpose) with log-prob -0.1 * token, records loaded weights."""

    def __init__(self, **settings):
        self.settings, self.loaded, self.resets = settings, [], 0
        runner = NS(model=NS(load_weights=lambda w: self.loaded.append(dict(w))))
        self.llm_engine = NS(model_executor=NS(driver_worker=NS(model_runner=runner)))

    def reset_prefix_cache(self):
        self.resets += 1

    def generate(self, prompts, sampling, use_tqdm):
        self.sampling = sampling
        requests = []
        for p, prompt in enumerate(prompts):
            samples = []
            for i in reversed(range(sampling["n"])):
                tokens = [p + 2, 5, EOS] if i % 2 else [p + 2, 4, 4, 4]
                samples.append(NS(index=i, token_ids=tokens, logprobs=[{t: NS(logprob=-0.1 * t)} for t in tokens]))
            requests.append(NS(outputs=samples))
        return requests


@pytest.fixture
def fake_vllm(monkeypatch):
    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = FakeLLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)


def test_vllm_engine_with_a_stand_in_vllm(fake_vllm, tokenizer):
    """Rows grouped by prompt, EOS kept, stop strings cut, weights loaded by name."""
    model = tiny_model("qwen2", len(tokenizer))
    engine = make_engine("vllm", model, tokenizer, model_path="unused")
    assert engine.llm.settings["logprobs_mode"] == "processed_logprobs"
    assert set(engine.llm.loaded[0]) == set(model.state_dict()) and engine.llm.resets == 1
    stop = tokenizer.decode([4])
    rollout = engine.generate([[5], [6, 7]], 2, SamplingParams(max_new_tokens=4, stop_strings=(stop,)),
                              torch.Generator().manual_seed(0))
    assert engine.llm.sampling["n"] == 2 and engine.llm.sampling["seed"] is not None
    assert completions(rollout) == [[2, 4], [2, 5, EOS], [3, 4], [3, 5, EOS]]
    # Without top-k / top-p, vLLM's processed log-probs are the policy's: taken as they are.
    torch.testing.assert_close(rollout.behavior_logps[1, :3], torch.tensor([-0.2, -0.5, -0.1]))
    assert rollout.prompt_index.tolist() == [0, 0, 1, 1]


def test_vllm_behaviour_logps_under_top_k_are_the_policys(fake_vllm, tokenizer):
    """With top-k, vLLM's log-probs are of the truncated distribution; the engine replaces them by the live
    model's temperature-scaled log-probs, the distribution the trainer differentiates."""
    from gvpo.modeling import build_sequences, token_logps

    model = tiny_model("qwen2", len(tokenizer))
    engine = make_engine("vllm", model, tokenizer, model_path="unused")
    params = SamplingParams(max_new_tokens=4, temperature=0.7, top_k=3)
    rollout = engine.generate([[5], [6, 7]], 2, params, torch.Generator().manual_seed(0))
    seq = build_sequences([[5], [6, 7]], rollout.completion_ids, rollout.completion_mask, rollout.prompt_index,
                          tokenizer.pad_token_id)
    with torch.no_grad():
        want = token_logps(model, *seq, rollout.completion_ids.shape[1], 0.7) * rollout.completion_mask
    torch.testing.assert_close(rollout.behavior_logps, want, atol=1e-5, rtol=0)
    assert not torch.allclose(rollout.behavior_logps[1, :3], torch.tensor([-0.2, -0.5, -0.1]))


def test_lora_policy_is_sent_as_merged_base_weights(fake_vllm, tokenizer):
    """LoRA + vLLM: what vLLM loads is W + scaling * B @ A under the base model's names (no adapter tensors),
    equal to peft's own merge_and_unload on a copy, and the training model is left unmerged."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model("qwen2", len(tokenizer))
    names = set(base.state_dict())
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at 0 (a no-op adapter); make the merge matter
            torch.nn.init.normal_(p, std=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = make_engine("vllm", model, tokenizer, model_path="unused")
    sent = engine.llm.loaded[0]
    want = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(sent) == names == set(want)
    for k in want:
        assert sent[k].shape == want[k].shape, k
        torch.testing.assert_close(sent[k], want[k], rtol=1e-6, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(sent[q], before["base_model.model." + q.replace(".weight", ".base_layer.weight")])
    for k, v in model.state_dict().items():  # training model untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
