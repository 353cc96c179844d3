"""Float32 matrix products on CPU through oneDNN instead of torch's BLAS (MKL), on CPUs where oneDNN is faster.

Why: torch runs a float32 ``F.linear`` / ``matmul`` on CPU with MKL, and MKL takes a slow code path on CPUs that
are not Intel's. On this project's machine (AMD EPYC, Zen 5, one core; ``python benchmarks/cpu_matmul.py``) MKL
reached 78-107 GFLOP/s and oneDNN 156-240 GFLOP/s on the same shapes: a training pass's forward, grad-input and
grad-weight products and a decode step's. oneDNN ships inside torch (it runs bf16 matmuls and Inductor's packed
linears); its default float32 mode is strict IEEE float32, so the results differ from MKL's by summation order only.

- :func:`onednn_linears`: a scope in which every eligible ``F.linear`` call (float32, CPU, autocast off, plain
  tensors) runs forward and backward through oneDNN. Hugging Face models call ``F.linear`` from ``nn.Linear`` (and
  peft's LoRA layers from theirs), so no module is replaced; it is a ``TorchFunctionMode``, like the device and
  dtype scopes torch itself offers.
- :func:`mm`: ``a @ b`` for 2-D float32 CPU tensors (the fused log-prob path's backward).
- :func:`packed_linear`: a weight reordered once into oneDNN's blocked layout, for the decode loop, which calls
  the same weights hundreds of times with few rows (1.1-1.6x over reordering at each call, measured there).

Which backend: :func:`set_backend` ("auto", "onednn" or "torch"; the config's ``model.cpu_matmul``). "auto" times
one float32 product both ways, once per process, and takes oneDNN only where it is at least ``AUTO_MIN_SPEEDUP``
times as fast, so an Intel CPU where MKL is as fast keeps torch's path. GPUs are never affected.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onednn", "torch")
AUTO_MIN_SPEEDUP = 1.2  # "auto" keeps torch's path unless oneDNN is clearly faster (timing noise is ~5%)
_state = {"backend": "auto", "use": None}  # use: the decision, once made (None: not yet)
_active = threading.local()


def set_backend(backend: str) -> None:
    """Choose how float32 CPU matmuls run in gvpo's passes: "auto" (measure once), "onednn" or "torch"."""
    if backend not in BACKENDS:
        raise ValueError(f"cpu_matmul={backend!r}: use one of {BACKENDS}")
    if backend != _state["backend"]:
        _state.update(backend=backend, use=None)


def use_onednn() -> bool:
    """Whether eligible float32 CPU products go through oneDNN (decided once per process for "auto")."""
    if _state["use"] is None:
        backend = _state["backend"]
        if backend == "torch" or not _available():
            _state["use"] = False
        elif backend == "onednn":
            _state["use"] = True
        else:
            torch_gflops, onednn_gflops = _probe()
            _state["use"] = onednn_gflops >= AUTO_MIN_SPEEDUP * torch_gflops
            log.info("cpu_matmul=auto: float32 matmul on this CPU: torch %.0f GFLOP/s, oneDNN %.0f GFLOP/s -> %s",
                     torch_gflops, onednn_gflops, "oneDNN" if _state["use"] else "torch")
    return _state["use"]


def decision() -> str:
    """What this process chose, for the run's summary: "onednn", "torch", or "undecided" (no float32 CPU product asked
    yet, e.g. a run on a GPU)."""
    return {None: "undecided", True: "onednn", False: "torch"}[_state["use"]]


@functools.cache
def _available() -> bool:
    try:
        x = torch.ones(2, 3)
        y = _onednn(x, torch.ones(4, 3), None)
        return torch.backends.mkldnn.is_available() and bool((y == 3).all())
    except (RuntimeError, AttributeError, NotImplementedError):  # a torch built without oneDNN, or without the op
        return False


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias): ``weight`` (out, in), dense or a transposed view, or reordered by packed_linear."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def gflops(product, flops: float, reps: int, pick=min) -> float:
    """GFLOP/s of ``product()`` (``flops`` each): ``pick`` (min: the best; statistics.median) of ``reps`` timed calls
    after one warm-up."""
    product()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        product()
        times.append(time.perf_counter() - start)
    return flops / pick(times) / 1e9


def _probe(rows: int = 256, size: int = 1024, reps: int = 3) -> tuple[float, float]:
    """(torch's, oneDNN's) GFLOP/s on one (rows x size) @ (size x size) product, best of `reps` after a warm-up."""
    x, w = torch.randn(rows, size), torch.randn(size, size)
    flops = 2 * rows * size * size
    # float32 both ways, even when first asked under bf16 autocast or inside the oneDNN scope
    with torch.no_grad(), torch.autocast("cpu", enabled=False), torch._C.DisableTorchFunction():
        return gflops(lambda: F.linear(x, w), flops, reps), gflops(lambda: _onednn(x, w, None), flops, reps)


def _plain(t) -> bool:
    return t is None or (type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"
                         and t.dtype == torch.float32)


def eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """A float32 CPU product of plain tensors, outside autocast (bf16 autocast already runs on oneDNN)."""
    return (_plain(x) and _plain(weight) and _plain(bias) and weight.dim() == 2 and x.dim() >= 2
            and x.numel() > 0 and weight.numel() > 0 and not torch.is_autocast_enabled("cpu") and use_onednn())


@functools.cache
def _weight_saved_first(has_bias: bool) -> bool:
    """Whether F.linear saves the transposed weight before the input (torch 2.x: mm does, addmm does not)."""
    order = []
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: order.append(tuple(t.shape)) or t, lambda t: t)
    # A plain F.linear that records its graph, even when first asked from inside inference mode or a forward.
    with torch.inference_mode(False), torch.enable_grad(), torch._C.DisableTorchFunction(), hooks:
        x, w = torch.ones(2, 3, requires_grad=True), torch.ones(4, 3, requires_grad=True)
        F.linear(x, w, torch.ones(4) if has_bias else None)
    return order[:1] == [(3, 4)]


class _Linear(torch.autograd.Function):
    """F.linear with forward, grad input and grad weight through oneDNN. It saves what F.linear saves, in its order
    and shapes (the 2-D input only when the weight needs a gradient, the transposed weight only when the input does),
    so that a checkpointed layer can be recomputed by either path: torch checks the recomputed tensors' shapes."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        saved = {"x": x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None,
                 "w": weight.t() if ctx.needs_input_grad[0] else None}
        order = ("w", "x") if _weight_saved_first(bias is not None) else ("x", "w")
        ctx.kept = [k for k in order if saved[k] is not None]
        ctx.save_for_backward(*(saved[k] for k in ctx.kept))
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        got = dict(zip(ctx.kept, ctx.saved_tensors))
        x2d, weight_t = got.get("x"), got.get("w")
        grad2d = grad.reshape(-1, grad.shape[-1])  # (M, out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn(grad2d, weight_t, None).view(ctx.x_shape)  # (M, out) @ (out, in)
        if ctx.needs_input_grad[1]:
            grad_w = _onednn(grad2d.t(), x2d.t(), None)  # (out, M) @ (M, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2d.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through oneDNN where :func:`eligible`."""
    if eligible(x, weight, bias):
        return _Linear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D tensors, through oneDNN where eligible (no gradient: for use inside a backward)."""
    if a.dim() == 2 and b.dim() == 2 and eligible(a, b):
        return _onednn(a, b.t(), None)
    return a @ b


class _LinearMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return linear(*args, **kwargs)
        return func(*args, **kwargs)


@contextmanager
def onednn_linears():
    """Run the block's eligible F.linear calls through oneDNN (forward and backward); nothing when the backend is
    torch's. Re-entrant: an inner scope inside an active one does nothing."""
    if getattr(_active, "on", False) or not _available() or not use_onednn():
        yield
        return
    _active.on = True
    try:
        with _LinearMode():
            yield
    finally:
        _active.on = False


# The decode loop's weights are reordered for this many rows; measured on the real model's decode (1-64 rows),
# a hint of 64 or 16 gave the same speed and 1 was slower.
PACK_ROWS_HINT = 64


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """A function x -> F.linear(x, weight, bias) for repeated calls with this weight (inference only): the weight
    is reordered once into oneDNN's layout where :func:`eligible`, else plain F.linear."""
    weight, bias = weight.detach(), None if bias is None else bias.detach()
    if not eligible(weight[:1], weight, bias):
        return functools.partial(F.linear, weight=weight, bias=bias)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            return F.linear(x, weight, bias)
        return _onednn(x, packed, bias)

    return run
