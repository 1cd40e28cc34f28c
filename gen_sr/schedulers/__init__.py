"""Schedulers with a data-consistency hook on the predicted clean sample.

:class:`DDIMDataConsistencyScheduler` is a ``diffusers.DDIMScheduler`` whose ``step`` accepts ``x0_hook``. Other
diffusers schedulers (e.g. ``DPMSolverMultistepScheduler``, built with ``from_config(scheduler.config)``) can be used
as they are with guidance off.
"""

from gen_sr.schedulers.ddim import DDIMDataConsistencyScheduler

__all__ = ["DDIMDataConsistencyScheduler"]
