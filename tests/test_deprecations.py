"""Our engines hand the KV cache by its current keyword; pyproject's filterwarnings fails any test in which gvpo
calls a deprecated API (DeprecationWarning / FutureWarning from a gvpo module, or transformers' past_key_values)."""

import inspect
import warnings

import torch

from gvpo.modeling import cache_kwargs


class OldStyle(torch.nn.Module):  # transformers < 5.x: forward takes past_key_values
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):
        return past_key_values


class Wrapped(torch.nn.Module):  # PEFT: forward(**kwargs), the real model behind get_base_model()
    def __init__(self, base):
        super().__init__()
        self.base = base

    def get_base_model(self):
        return self.base

    def forward(self, **kwargs):
        return self.base(**kwargs)


def test_the_cache_keyword_follows_the_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cache = object()
    # the installed transformers (5.25 here) names it `cache`; 4.x only knows past_key_values
    expected = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    assert cache_kwargs(model, cache) == {expected: cache}
    assert cache_kwargs(OldStyle(), cache) == {"past_key_values": cache}
    assert cache_kwargs(Wrapped(OldStyle()), cache) == {"past_key_values": cache}
    assert Wrapped(OldStyle())(**cache_kwargs(Wrapped(OldStyle()), cache)) is cache


def test_generation_raises_no_deprecation_warning(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gvpo.rollout import make_engine
    from gvpo.types import SamplingParams

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for engine in ("fast", "hf"):
            make_engine(engine, model, tok).generate([[3, 4, 5]], 2, SamplingParams(max_new_tokens=3),
                                                     torch.Generator().manual_seed(0))
    assert not [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))
                and "past_key_values" in str(w.message)]
