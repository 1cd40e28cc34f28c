"""Evaluation: simulated cases and regions (:mod:`~gen_sr.eval.cases`), image-quality metrics, baselines, the
evaluation harness and its tables, uncertainty quality, conformal calibration
(:func:`~gen_sr.eval.calibration.calibrate`) and the lesion stress test. Nothing here imports
:mod:`gen_sr.pipelines`: a pipeline is passed in (:class:`~gen_sr.eval.cases.SRModel`)."""
