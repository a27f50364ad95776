"""Compare two deployed models on the same real inputs: FP32 vs INT8, ONNX vs TensorRT, plain vs fused.

Both models run through :class:`cmdeploy.segmenter.Segmenter` (onnxruntime for ``.onnx``,
:mod:`cmdeploy.backends.tensorrt` for ``.engine``/``.plan``/``.trt``), so each is fed exactly the
way the runtime feeds it: plain models get :func:`cmdeploy.preprocess.prepare_batch` crops and
their sigmoid is pasted back, fused models get the raw slices and points. The comparison is in
slice space, on each object's crop footprint (the pixels a model can set; both are 0 elsewhere):
max and mean |dprobability|, the fraction of identical mask pixels and the masks' Dice.

A direct comparison rather than Polygraphy's ``Comparator``: Polygraphy compares raw outputs
tensor by tensor under identical feeds, while here the two models may have different inputs
(plain ``input`` vs fused ``slices``/``points``) and backends that cmdeploy already wraps
(engine sidecar checks), and the quantity that matters is the pasted-back probability.

Default inputs: pydicom's ``CT_small.dcm`` with ``examples/ct_small_points.csv`` when that file
exists, else the built-in point sets of :data:`cmdeploy.export.parity.CT_SMALL_POINT_SETS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmdeploy.errors import InputError
from cmdeploy.export.parity import (
    ParityCase,
    ParityReport,
    compare_outputs,
    ct_small_cases,
    ct_small_path,
    footprints,
)

DEFAULT_ATOL = 0.1  # max |dprobability|
DEFAULT_MIN_MASK_AGREEMENT = 0.99  # fraction of footprint pixels with identical masks
EXAMPLE_POINTS = Path(__file__).resolve().parents[1] / "examples" / "ct_small_points.csv"


@dataclass
class VerifyResult:
    """Outcome of :func:`verify_models`.

    Attributes:
        model_a, model_b: the compared files.
        report: the numbers (``model_a`` is the reference).
        atol, min_mask_agreement: the tolerances applied.
        problems: the tolerances exceeded (empty when the models agree).
        notes: differences worth knowing that are not failures (e.g. different specs).
    """

    model_a: Path
    model_b: Path
    report: ParityReport
    atol: float
    min_mask_agreement: float
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        r = self.report
        lines = [
            f"A: {self.model_a}",
            f"B: {self.model_b}",
            f"{r.n_items} objects, {r.n_values} footprint pixels",
            f"max |dprobability| {r.max_abs:.4g} (tolerance {self.atol:g}), mean {r.mean_abs:.4g}",
            f"mask agreement {100 * r.mask_agreement:.3f} % (minimum "
            f"{100 * self.min_mask_agreement:g} %), mask Dice {r.dice:.5f}, "
            f"foreground of A {100 * r.foreground:.1f} %",
        ]
        lines += [f"note: {n}" for n in self.notes]
        lines.append("PASS" if self.ok else "FAIL: " + "; ".join(self.problems))
        return "\n".join(lines)


def load_cases(
    input_path: str | Path | None = None, points_csv: str | Path | None = None
) -> list[ParityCase]:
    """(slice, points) cases from a CT input and a points CSV.

    Without ``input_path``: CT_small.dcm with ``points_csv`` (default the example CSV if present,
    else the built-in point sets). With ``input_path`` (DICOM file or folder, NIfTI, NPY, PNG; see
    :func:`cmdeploy.io.open_series`) a ``points_csv`` is required.
    """
    from cmdeploy.io import open_series
    from cmdeploy.points_csv import read_points_csv

    if input_path is None:
        if points_csv is None and not EXAMPLE_POINTS.is_file():
            return ct_small_cases()
        input_path = ct_small_path()
        points_csv = EXAMPLE_POINTS if points_csv is None else points_csv
    elif points_csv is None:
        raise InputError(f"--input {input_path} needs --points (a points CSV for its slices)")
    series = open_series(input_path)
    rows = read_points_csv(points_csv, series)
    cache: dict[int, np.ndarray] = {}
    cases = []
    for row in rows:
        if row.slice_index not in cache:
            cache[row.slice_index] = np.asarray(series.slice_hu(row.slice_index), dtype=np.float32)
        cases.append(
            ParityCase(f"slice {row.slice_index}:{row.label}", cache[row.slice_index], row.points)
        )
    return cases


def model_probabilities(
    model_path: str | Path,
    cases: Sequence[ParityCase],
    *,
    backend: str = "auto",
    threads: int | None = None,
    batch_size: int = 8,
) -> tuple[list[np.ndarray], object]:
    """(N float32 (H, W) slice probabilities, the Segmenter) of one model on ``cases``."""
    from cmdeploy.segmenter import Segmenter

    seg = Segmenter.load(model_path, backend=backend, threads=threads, batch_size=batch_size)  # type: ignore[arg-type]
    probs = seg.predict_batch(
        [c.slice_hu for c in cases], [c.points for c in cases], return_probabilities=True
    )
    return probs, seg


def verify_models(
    model_a: str | Path,
    model_b: str | Path,
    cases: Sequence[ParityCase] | None = None,
    *,
    atol: float = DEFAULT_ATOL,
    min_mask_agreement: float = DEFAULT_MIN_MASK_AGREEMENT,
    backend_a: str = "auto",
    backend_b: str = "auto",
    threads: int | None = None,
) -> VerifyResult:
    """Run both models on ``cases`` (default :func:`load_cases`) and compare (A = reference).

    Masks use model A's threshold; the compared pixels are the union of both models' crop
    footprints. Returns a :class:`VerifyResult`; it does not raise on disagreement.
    """
    if not 0.0 <= min_mask_agreement <= 1.0:
        raise InputError(f"min_mask_agreement must be a fraction in [0, 1], got {min_mask_agreement}")
    if not atol >= 0:
        raise InputError(f"atol must be >= 0, got {atol}")
    cases = load_cases() if cases is None else list(cases)
    if not cases:
        raise InputError("nothing to compare: no (slice, points) cases")
    probs_a, seg_a = model_probabilities(model_a, cases, backend=backend_a, threads=threads)
    probs_b, seg_b = model_probabilities(model_b, cases, backend=backend_b, threads=threads)
    spec_a, spec_b = seg_a.spec, seg_b.spec  # type: ignore[attr-defined]
    regions = footprints(cases, spec_a.input_size, spec_a.target_size)
    notes = []
    if spec_b != spec_a:
        notes.append("the two models carry different specs; comparing on both crop footprints")
        regions_b = footprints(cases, spec_b.input_size, spec_b.target_size)
        regions = [a | b for a, b in zip(regions, regions_b, strict=True)]
    report = compare_outputs(probs_a, probs_b, spec_a.threshold, regions=regions)
    problems = []
    if not report.max_abs <= atol:
        problems.append(f"max |dprobability| {report.max_abs:.4g} > {atol:g}")
    if not report.mask_agreement >= min_mask_agreement:
        problems.append(
            f"mask agreement {100 * report.mask_agreement:.3f} % < {100 * min_mask_agreement:g} %"
        )
    return VerifyResult(
        model_a=Path(model_a),
        model_b=Path(model_b),
        report=report,
        atol=atol,
        min_mask_agreement=min_mask_agreement,
        problems=problems,
        notes=notes,
    )


__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_MIN_MASK_AGREEMENT",
    "EXAMPLE_POINTS",
    "VerifyResult",
    "load_cases",
    "model_probabilities",
    "verify_models",
]
