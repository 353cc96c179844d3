"""torch.distributed's default process group ends before the interpreter does.

A gloo group still alive at interpreter shutdown is torn down while its C++ threads are still joinable, and
the process aborts after its work is done ("terminate called without an active exception", SIGABRT): a
2-process torchrun / accelerate launch job then exits non-zero although training finished. Destroying the
group is not enough while a DistributedDataParallel model still holds it (its reducer and logger keep a
reference, so the group outlives destroy_process_group and dies during finalization): measured on the 2-core
machine with 2 ranks of a small DDP model kept alive to the end (as `gvpo train`'s Run, in a reference cycle,
or a user's global `trainer`), 10 aborts in 30 runs with destroy_process_group alone, 0 in 30 when the models'
references are dropped first. accelerate and TRL leave all this to the user's script; `gvpo train` and
GVPOTrainer do it themselves.
"""

from __future__ import annotations

import atexit
import functools
import gc


@functools.cache
def destroy_at_exit() -> None:
    """Register, once per process, the destruction of the default process group at interpreter exit (after
    the user's code, before finalization). A no-op where the group was never initialised or is gone already."""
    atexit.register(_destroy)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        _release_ddp_models()
        dist.destroy_process_group()


def _release_ddp_models() -> None:
    """Every DistributedDataParallel model still in memory (reachable or only in a reference cycle) lets go of
    its reducer, logger and group, so that destroy_process_group ends the group now, while the interpreter is
    whole. The program is ending: such a model could not synchronise gradients without its group anyway."""
    from torch.nn.parallel import DistributedDataParallel

    for obj in gc.get_objects():
        if isinstance(obj, DistributedDataParallel):
            for name in ("reducer", "logger", "process_group"):
                vars(obj).pop(name, None)
