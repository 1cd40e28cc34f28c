"""Schedulers with a data-consistency hook on the predicted clean sample.

:class:`DDIMDataConsistencyScheduler` is a ``diffusers.DDIMScheduler`` whose ``step`` accepts ``x0_hook``;
:class:`DPMSolverDataConsistencyScheduler` and :class:`UniPCDataConsistencyScheduler` are diffusers' multistep
solvers with the same hook (:mod:`gen_sr.schedulers.multistep`). Any other diffusers scheduler (built with
``from_config(scheduler.config)``) can be used as it is with guidance off. ``SCHEDULERS`` names them for the command
line (``--scheduler``), and :func:`scheduler_from_name` builds one from a model's scheduler config;
:func:`folder_sampler_name` names the sampler a model folder records without loading the model, and
:func:`sampler_text` says a recorded sampler name in words.
"""

import json
import re
from os import PathLike
from pathlib import Path
from typing import Any

from gen_sr.errors import InputError
from gen_sr.schedulers.ddim import DDIMDataConsistencyScheduler
from gen_sr.schedulers.multistep import DPMSolverDataConsistencyScheduler, UniPCDataConsistencyScheduler

__all__ = ["READABLE_NAMES", "SCHEDULERS", "SCHEDULER_OPTIONS", "DDIMDataConsistencyScheduler",
           "DPMSolverDataConsistencyScheduler", "UniPCDataConsistencyScheduler", "folder_sampler_name", "sampler_text",
           "scheduler_from_name"]

SCHEDULERS = {"ddim": DDIMDataConsistencyScheduler, "dpmsolver++": DPMSolverDataConsistencyScheduler,
              "sde-dpmsolver++": DPMSolverDataConsistencyScheduler, "unipc": UniPCDataConsistencyScheduler}
"""The samplers with a data-consistency hook, by their command-line name."""

SCHEDULER_OPTIONS: dict[str, dict[str, Any]] = {
    "dpmsolver++": {"algorithm_type": "dpmsolver++"},
    "sde-dpmsolver++": {"algorithm_type": "sde-dpmsolver++"},  # fresh noise at each step (diffusers' SDE variant)
}
"""The config entries a name sets over the model's own (so that ``dpmsolver++`` is the ODE solver even where the
model folder's config asks for the SDE one)."""


READABLE_NAMES = {"ddim": "DDIM", "dpmsolver++": "DPM-Solver++", "sde-dpmsolver++": "SDE-DPM-Solver++",
                  "unipc": "UniPC"}
"""How a report names each sampler of :data:`SCHEDULERS` (its command-line name)."""


def sampler_text(name: str, steps: int | None = None) -> str:
    """A sampler as run records and calibrations name it (``sampler_name``: its class name and variants, e.g.
    ``DPMSolverDataConsistencyScheduler(trailing)``), in words for a reader: ``DPM-Solver++, 3 steps, trailing
    spacing`` (``steps``: its step count, if given); a sampler not of :data:`SCHEDULERS`, by its recorded name."""
    match = re.fullmatch(r"(\w+)(?:\((.*)\))?", name.strip())
    command = next((k for k, cls in SCHEDULERS.items() if match and cls.__name__ == match[1]), None)
    if command is None:
        parts = [name]
    else:
        variants = [v.strip() for v in (match[2] or "").split(",") if v.strip()]
        command = next((v for v in variants if v in READABLE_NAMES), command)  # the SDE form
        parts = [READABLE_NAMES[command], *(f"{v} spacing" for v in variants if v not in READABLE_NAMES)]
    if steps is not None:
        parts.insert(1, f"{steps} step{'' if steps == 1 else 's'}")
    return ", ".join(parts)


def scheduler_from_name(name: str, config: Any, **overrides: Any) -> Any:
    """The sampler ``name`` (a key of :data:`SCHEDULERS`) with the rest of ``config`` (a model's scheduler config:
    betas, prediction type, ...); ``overrides`` set further config entries (e.g. ``timestep_spacing="trailing"``)."""
    return SCHEDULERS[name].from_config(config, **{**SCHEDULER_OPTIONS.get(name, {}), **overrides})


def folder_sampler_name(folder: str | PathLike[str]) -> str | None:
    """The sampler that a model folder's ``scheduler/scheduler_config.json`` records, named as the loaded pipeline's
    ``sampler_name`` names it (one of :data:`SCHEDULERS` with its variant, e.g.
    ``DPMSolverDataConsistencyScheduler(trailing)``, else the config's class name), read without loading the model;
    ``None`` where the folder records none.

    Raises:
        InputError: the file is not a scheduler config.
    """
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
        ours = {cls.__name__: cls for cls in SCHEDULERS.values()}.get(config["_class_name"])
        return ours.from_config(config).sampler_name if ours else config["_class_name"]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"is not a scheduler config ({e})", path) from None
