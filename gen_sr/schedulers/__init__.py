"""Schedulers with a data-consistency hook on the predicted clean sample.

:class:`DDIMDataConsistencyScheduler` is a ``diffusers.DDIMScheduler`` whose ``step`` accepts ``x0_hook``;
:class:`DPMSolverDataConsistencyScheduler` and :class:`UniPCDataConsistencyScheduler` are diffusers' multistep
solvers with the same hook (:mod:`gen_sr.schedulers.multistep`). Any other diffusers scheduler (built with
``from_config(scheduler.config)``) can be used as it is with guidance off. ``SCHEDULERS`` names them for the command
line (``--scheduler``).
"""

from gen_sr.schedulers.ddim import DDIMDataConsistencyScheduler
from gen_sr.schedulers.multistep import DPMSolverDataConsistencyScheduler, UniPCDataConsistencyScheduler

__all__ = ["SCHEDULERS", "DDIMDataConsistencyScheduler", "DPMSolverDataConsistencyScheduler",
           "UniPCDataConsistencyScheduler"]

SCHEDULERS = {"ddim": DDIMDataConsistencyScheduler, "dpmsolver++": DPMSolverDataConsistencyScheduler,
              "unipc": UniPCDataConsistencyScheduler}
"""The samplers with a data-consistency hook, by their command-line name."""
