"""Calling reward functions exactly as TRL 1.16's GRPOTrainer does, with a time limit.

TRL calls every reward function with keywords only::

    f(prompts=..., completions=..., completion_ids=..., trainer_state=..., log_metric=..., log_extra=..., **columns)

``columns`` are the dataset's other columns (one value per completion). Synchronous functions run one after the
other in the calling thread; ``async def`` functions (or objects with an async ``__call__``) run concurrently
(``asyncio.gather``) on a background event loop, as TRL does. A function whose signature has no ``**kwargs``
gets only the keywords it names (TRL would raise); one that names a keyword nobody provides is refused before
training with an error naming the function and the missing column (:func:`check_signature`).

Time limit (``reward_timeout``): a synchronous function runs in the main thread (math-verify's signal-based
limits keep working there), watched by a thread that interrupts it with SIGUSR1 when the time is up (a SIGUSR1
from elsewhere during the call goes to the handler that was installed before); elsewhere
(not the main thread, no SIGUSR1) it runs in a helper thread that is abandoned at the deadline. Code that holds
the GIL inside one C call (a catastrophic regex) cannot be interrupted in the main thread; nothing can short
of killing the process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import signal
import threading
from typing import Callable, Sequence

# Keywords that every call provides besides the dataset's columns.
CALL_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra")
_SIGNAL = getattr(signal, "SIGUSR1", None)


class RewardError(RuntimeError):
    """A reward function raised, returned something unusable, or asked for a missing column; the message names it."""


class RewardTimeout(RewardError):
    """A reward function did not return within ``reward_timeout`` seconds."""


def reward_name(func) -> str:
    """TRL's display name: a function's ``__name__`` (through functools.partial), else the class name."""
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


def is_async(func) -> bool:
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None))


def _parameters(func):
    try:
        return inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: assume TRL's form
        return None


def check_signature(func, columns: Sequence[str], where: str = "dataset") -> None:
    """Raise RewardError when ``func`` requires a keyword that a call would not provide."""
    params = _parameters(func)
    if params is None or any(p.kind is p.VAR_KEYWORD for p in params):
        return
    available = set(CALL_KEYWORDS) | set(columns)
    for p in params:
        if p.kind is p.POSITIONAL_ONLY and p.default is p.empty:
            raise RewardError(f"reward function {reward_name(func)!r}: parameter {p.name!r} is positional-only; "
                              f"rewards are called with keywords only (as TRL does): remove the '/'")
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty and p.name not in available:
            raise RewardError(
                f"reward function {reward_name(func)!r} needs column {p.name!r}, which the {where} does not have "
                f"(columns: {', '.join(sorted(columns)) or 'none'}); add the column, rename the parameter, "
                f"or give it a default / take **kwargs")


def _keywords_for(func, kwargs: dict) -> dict:
    params = _parameters(func)
    if params is None or any(p.kind is p.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in kwargs.items() if k in names}


def call_rewards(funcs: Sequence[Callable], kwargs: dict, timeout_s: float = 0.0) -> list:
    """Each function's raw output, in order; ``kwargs`` are the keywords of one call (see the module docstring).

    Raises RewardError (naming the function) when one raises, and RewardTimeout when one has not returned
    within ``timeout_s`` seconds (0 = no limit).
    """
    outputs: list = [None] * len(funcs)
    pending = []
    for i, func in enumerate(funcs):
        if is_async(func):
            pending.append(i)
            continue
        name = reward_name(func)
        call = functools.partial(func, **_keywords_for(func, kwargs))
        try:
            outputs[i] = _with_time_limit(call, timeout_s, name)
        except RewardError:
            raise
        except Exception as e:  # the run stops here; no checkpoint is written mid-step, so the last stays whole
            raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
    if pending:
        for i, value in zip(pending, _gather([funcs[i] for i in pending], kwargs, timeout_s)):
            outputs[i] = value
    return outputs


def _timeout_error(names: list[str], timeout_s: float) -> RewardTimeout:
    which = ", ".join(repr(n) for n in names)
    return RewardTimeout(
        f"reward function {which} did not return within reward_timeout={timeout_s:g} s; the run stops here (the "
        f"last checkpoint is intact). Fix the function, or raise reward_timeout (0 = no limit)")


# --------------------------------------------------------------------------------------------------
# Synchronous functions


class _Expired(BaseException):
    """Raised inside a reward function at its deadline; a BaseException, so `except Exception` does not eat it."""


def _with_time_limit(call, timeout_s: float, name: str):
    if not timeout_s:
        return call()
    if _SIGNAL is not None and threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(_SIGNAL)
        if previous is not None:  # None: a handler installed outside Python, which we could not restore
            return _in_main_thread(call, timeout_s, name, previous)
    return _in_helper_thread(call, timeout_s, name)


def _in_main_thread(call, timeout_s, name, previous):
    done, fired = threading.Event(), threading.Event()
    main = threading.main_thread().ident

    def on_signal(signum, frame):
        if fired.is_set() and not done.is_set():
            raise _Expired
        if callable(previous):  # not ours (e.g. a cluster's SIGUSR1 warning before preemption): pass it on
            previous(signum, frame)

    def watchdog():
        if done.wait(timeout_s):
            return
        fired.set()
        while not done.is_set():  # again every second, in case the function caught the first one
            signal.pthread_kill(main, _SIGNAL)
            done.wait(1.0)

    signal.signal(_SIGNAL, on_signal)
    thread = threading.Thread(target=watchdog, name=f"reward-timeout-{name}", daemon=True)
    thread.start()
    try:
        try:
            result = call()
        finally:
            done.set()
    except _Expired:
        fired.set()
    finally:
        thread.join()
        signal.signal(_SIGNAL, previous)
    if fired.is_set():  # interrupted, or it returned only after the deadline (having caught the interruption)
        raise _timeout_error([name], timeout_s)
    return result


def _in_helper_thread(call, timeout_s, name):
    box: dict = {}

    def target():
        try:
            box["value"] = call()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name=f"reward-{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():  # abandoned: a thread cannot be killed; it is a daemon, so it does not block exit
        raise _timeout_error([name], timeout_s)
    if "error" in box:
        raise box["error"]
    return box["value"]


# --------------------------------------------------------------------------------------------------
# async functions: concurrently on one background event loop (as TRL), so that a caller's running loop
# (Jupyter) does not matter.

_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _loop() -> asyncio.AbstractEventLoop:
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="gvpo-async-rewards", daemon=True).start()
        return _LOOP


def _gather(funcs, kwargs, timeout_s):
    global _LOOP
    names = [reward_name(f) for f in funcs]
    finished: set[int] = set()

    async def one(i, func):
        try:
            result = await func(**_keywords_for(func, kwargs))
        except Exception as e:
            raise RewardError(f"reward function {names[i]!r} raised {type(e).__name__}: {e}") from e
        finished.add(i)
        return result

    async def everything():
        return await asyncio.gather(*(one(i, f) for i, f in enumerate(funcs)))

    future = asyncio.run_coroutine_threadsafe(everything(), _loop())
    try:
        return future.result(timeout_s or None)
    except concurrent.futures.TimeoutError:
        late = [n for i, n in enumerate(names) if i not in finished]  # before cancel() wakes them up
        future.cancel()
        with _LOOP_LOCK:  # the loop may be blocked by a function that never yields: use a fresh one next time
            stale, _LOOP = _LOOP, None
        if stale is not None:
            stale.call_soon_threadsafe(stale.stop)
        raise _timeout_error(late, timeout_s) from None
