"""How a multi-process run ends: :func:`leave_process_group`."""

from __future__ import annotations

import gc
import logging
import os

import torch

logger = logging.getLogger(__name__)


def leave_process_group() -> list[str]:
    """End a multi-process run cleanly: destroy the process group, and stop its worker threads, while the
    interpreter is still whole. Call it last, once nothing holds a trainer or a wrapped model any more.

    gloo's worker threads free a collective's work object after the caller has seen the collective complete.
    When that object is the last owner of a tensor Python created (an ``all_gather`` output, say), freeing it
    takes the GIL; if the main thread has begun finalizing the interpreter by then, taking the GIL ends the
    worker thread inside a C++ destructor, and the process aborts ("terminate called without an active
    exception", SIGABRT) after everything else succeeded: only on a loaded machine, where the worker thread lags
    (pytorch/pytorch#190489). ``destroy_process_group`` alone does not stop those threads while DDP wrappers
    still own the group, and a ``Trainer`` keeps its wrapper inside reference cycles that only the garbage
    collector frees: so collect first. The group's destructor then joins its threads (with the GIL released).

    Returns:
        The names of the gloo threads still running afterwards (empty when the group is gone; always empty where
        ``/proc`` does not list threads). Each is logged as a warning: something still holds the group.
    """
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    gc.collect()
    running = [name for name in _thread_names() if name.startswith(("pt_gloo", "gloo"))]
    if running:
        logger.warning(
            "the process group's threads are still running after destroy_process_group (%s): something still holds "
            "a trainer or a DDP-wrapped model, and the process may abort at exit; drop those references first",
            ", ".join(running),
        )
    return running


def _thread_names() -> list[str]:
    """This process's OS thread names (Linux's ``/proc/self/task/*/comm``; empty elsewhere)."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return []
    names = []
    for task in os.listdir(tasks):
        try:
            with open(os.path.join(tasks, task, "comm")) as comm:
                names.append(comm.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return names
