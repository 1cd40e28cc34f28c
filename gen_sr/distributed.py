"""Process-level helpers for runs under ``accelerate launch``."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import PartialState

__all__ = ["exit_if_distributed", "process_state"]


def exit_if_distributed(code: int) -> None:
    """End a worker of a multi-process run now, skipping interpreter teardown; return in a single process.

    Call it once everything is written. Destroying a gloo process group joins its worker threads while holding the
    GIL, and a worker that still has to release a Python-owned tensor then waits for the GIL forever (seen with
    torch 2.13 after collectives at the end of a run), so a distributed run exits without that teardown.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def process_state() -> PartialState:
    """Accelerate's process state for inference, on the CPU (gloo) when no GPU is used.

    ``PartialState()`` alone ignores ``ACCELERATE_USE_CPU`` and, without CUDA, silently runs every process as a
    single one; this asks for the CPU backend explicitly in that case. (torch and accelerate are imported here, not
    with the module: the CLI imports it, and ``gen-sr info`` needs neither.)
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
