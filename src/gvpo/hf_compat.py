"""How gvpo calls a transformers model across its versions and the wrappers around it (DDP, DeepSpeed, torch.compile,
peft): the lowest layer, imported by the log-prob passes and the rollout engines."""

from __future__ import annotations

import functools
import inspect

import torch


def unwrap(model):
    """Through DDP / DataParallel / DeepSpeed engines (``.module``), torch.compile (``._orig_mod``) and peft."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(getattr(model, "module"), torch.nn.Module) \
                and "FullyShard" not in type(model).__name__:
            model = model.module
        elif hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def cache_kwargs(model, cache) -> dict:
    """The keyword that hands ``model`` a KV cache: ``cache`` where the model's forward takes it (transformers 5.x,
    where ``past_key_values`` is deprecated and goes in 5.40), else ``past_key_values`` (older versions). Read
    through the wrappers that forward **kwargs (DDP, torch.compile, PEFT)."""
    base = unwrap(model)
    name = "cache" if "cache" in _forward_parameters(type(base)) else "past_key_values"
    return {name: cache}


@functools.cache
def _forward_parameters(cls) -> frozenset:
    return frozenset(inspect.signature(cls.forward).parameters)
