"""The activation memory of the training pass, bounded before it is allocated (CPU).

On a GPU, running out of memory raises ``OutOfMemoryError``, which gvpo.update catches to halve the micro-batch.
On a CPU the kernel kills the process instead: no exception, no message naming the setting to change, and the
run is gone. So on a CPU the training forward counts the bytes it keeps for the backward (every floating-point
tensor autograd saves, once per storage, the weights excluded) and raises :class:`ActivationBudgetExceeded` as
soon as they pass the budget, before the memory is short; gvpo.update treats that as an out-of-memory error (halve
and redo the mini-batch, or stop with a message). The count is of what the model really saves, so it holds for any
architecture, attention implementation, LoRA, bf16 autocast or activation checkpointing (whose recomputed
activations are not saved, hence not counted).
"""

from __future__ import annotations

import contextlib
import os

import psutil
import torch

# The share of the free memory the saved activations may take: the rest is for what the count does not see, the
# backward's own temporaries (each layer's activation gradients, the log-prob head's chunks) and the allocator's
# slack. Measured (README, Benchmarks): a step's peak resident memory rose by 1.05-1.2x the counted bytes plus
# 3x the weights' on a 25M Qwen2 (float32, bf16) and on SmolLM2-135M; 1.65x with LoRA, whose count is smaller.
SHARE = 0.6


class ActivationBudgetExceeded(RuntimeError):
    """The training forward would keep more activations than the budget (message says "out of memory")."""


def free_bytes() -> int:
    """Memory the system could give this process now, shared evenly by the processes of this machine."""
    return psutil.virtual_memory().available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def budget_bytes(model: torch.nn.Module, limit_gb: float) -> int:
    """``limit_gb`` (training.activation_memory_gb) if set, else SHARE of the free memory once room is kept for
    what the step allocates besides activations: gradients and AdamW's two moments of the trainable weights."""
    if limit_gb > 0:
        return int(limit_gb * 2**30)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return int(SHARE * max(0, free_bytes() - 3 * trainable))


class ActivationBudget:
    """Counts the bytes autograd saves inside :meth:`watch` and raises past ``limit`` bytes (0 = off)."""

    def __init__(self, model: torch.nn.Module, limit: int):
        self.model, self.limit = model, limit
        self.last = 0  # bytes the last watched pass saved (metrics, tests)

    @contextlib.contextmanager
    def watch(self):
        if not self.limit:
            yield
            return
        weights = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        seen: set[int] = set()
        # Held until the pass ends: a branch of the graph that dies mid-forward would free its saved tensors, and
        # a later one at the same address would look already counted (the count would then vary from run to run).
        held: list[torch.Tensor] = []
        self.last = 0

        def pack(tensor):
            if not tensor.is_floating_point():  # ids, positions, masks, indices: views of the batch, which exists
                return tensor
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in weights and ptr not in seen:
                seen.add(ptr)
                held.append(tensor)
                self.last += storage.nbytes()
                if self.last > self.limit:
                    raise ActivationBudgetExceeded(
                        f"out of memory: the training pass would keep more than {self.limit / 2**30:.2f} GB of "
                        f"activations (training.activation_memory_gb; 0 = {SHARE:.0%} of the free memory)")
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield
