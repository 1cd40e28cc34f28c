"""The hallucination audit: super-resolve one LR volume (or reuse a run), write its maps, and build a
self-contained HTML report a researcher can read without knowing this code (:func:`audit`). It sits above both
:mod:`gen_sr.pipelines` and :mod:`gen_sr.eval`."""

from gen_sr.audit.audit import audit
from gen_sr.audit.report import build_report

__all__ = ["audit", "build_report"]
