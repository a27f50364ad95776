"""Evaluation and benchmark tooling: Dice/HD95 of models on reference label volumes, latency and
FLOPs. Never imported by the runtime (``import cmdeploy``, :class:`cmdeploy.Segmenter`); needs the
``eval`` extra (scipy, matplotlib; onnx for :mod:`~cmdeploy.evaluation.flops`).

Modules: :mod:`~cmdeploy.evaluation.objects` (reference objects of a label slice),
:mod:`~cmdeploy.evaluation.metrics` (Dice, HD95), :mod:`~cmdeploy.evaluation.run` (the evaluation
loop), :mod:`~cmdeploy.evaluation.stats` (aggregates), :mod:`~cmdeploy.evaluation.report` (CSV rows,
Markdown), :mod:`~cmdeploy.evaluation.plots` (figures), :mod:`~cmdeploy.evaluation.timing` and
:mod:`~cmdeploy.evaluation.flops` (benchmarks). Cases come from :mod:`cmdeploy.io.cases`.
"""

from cmdeploy.evaluation.objects import EvalObject, slice_objects
from cmdeploy.evaluation.report import markdown_report, object_rows, results_rows
from cmdeploy.evaluation.run import Evaluation, ModelRun, evaluate, model_names, open_case, reconstruct
from cmdeploy.evaluation.stats import SIZE_EDGES, label_stats, size_stats, summarize, worst

__all__ = [
    "SIZE_EDGES",
    "EvalObject",
    "Evaluation",
    "ModelRun",
    "evaluate",
    "label_stats",
    "markdown_report",
    "model_names",
    "object_rows",
    "open_case",
    "reconstruct",
    "results_rows",
    "size_stats",
    "slice_objects",
    "summarize",
    "worst",
]
