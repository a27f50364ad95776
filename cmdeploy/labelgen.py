"""Label volumes for a whole data set from four clicks per object (``cmdeploy generate-labels``).

The workflow of the paper's section 4.2: a person clicks four extreme points per object on every
slice of every case (or, for studies, :mod:`cmdeploy.annotator` simulates those clicks on existing
labels), the model draws the masks, and the masks become label volumes to train other networks on.

Cases come from :func:`cmdeploy.io.cases.find_cases` (image-only cases allowed). Per case:

* points: ``<points>/<case>.csv`` (a points CSV as ``cmdeploy infer --points`` reads it), or the
  simulated annotator's clicks on the case's own label volume (one seeded generator per object);
* segmentation: :func:`cmdeploy.pipeline.run_pipeline` (the batched pipeline of ``infer``: one
  preprocessing, one threshold, objects batched ``batch_size`` per model call);
* outputs in ``<output>/<case>/``: ``labels.nii.gz`` on the case's own stored grid and affine
  (:func:`cmdeploy.writers.nifti.write_nifti_labels`, as ``infer --format nifti``), ``points.csv``
  (the clicks used) and ``report.json`` (objects, clicks, Dice against the case's labels when it
  has them, times). The three are staged under temp names and renamed together, ``report.json``
  last: a case is finished exactly when its ``report.json`` exists, so a killed run resumes by
  skipping finished cases and never mistakes a half-written file for a result.

Label values: the id of the label's name in the case's ``labels.json`` when it has one (so generated
labels use the ground truth's ids); other names get the next free ids in order of first appearance.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmdeploy.annotator import ClickModel
from cmdeploy.errors import InputError
from cmdeploy.io.cases import Case, find_cases
from cmdeploy.labels_to_points import DEFAULT_MIN_SIZE, open_label_volume, points_from_label_volume
from cmdeploy.points_csv import PointsRow, base_label, read_points_csv, write_points_csv

LABELS_NAME = "labels.nii.gz"
POINTS_NAME = "points.csv"
REPORT_NAME = "report.json"
SUMMARY_NAME = "summary.json"
SUMMARY_FORMAT = "cmdeploy-generate-labels-summary"
CLICKS_PER_OBJECT = 4


@dataclass(frozen=True)
class CaseJob:
    """One case to label.

    Attributes:
        index: 1-based position in the run (logs show this, never the case name).
        case: the case (image, optional label volume, names).
        points: its points CSV, or None for simulated clicks.
    """

    index: int
    case: Case
    points: Path | None


def case_seed(seed: int, name: str) -> int:
    """A per-case seed for the simulated clicks: stable across runs, different between cases."""
    digest = hashlib.sha256(f"cmdeploy-labelgen:{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def is_finished(case_dir: Path) -> bool:
    """A case is finished when its report exists (it is renamed into place last)."""
    return (case_dir / REPORT_NAME).is_file()


def plan(
    data: str | Path,
    output: str | Path,
    *,
    points: str | Path | None,
    cases: Sequence[str] | None = None,
    names_file: str | Path | None = None,
    overwrite: bool = False,
) -> tuple[list[CaseJob], list[CaseJob]]:
    """Find and check every case before any work: ``(to_do, finished)``.

    With ``points`` (a folder), every case needs ``<points>/<case>.csv``; without it, every case
    needs a label volume (simulated clicks). Finished cases (see :func:`is_finished`) are skipped
    unless ``overwrite``; an unfinished case folder holding a leftover output file is refused unless
    ``overwrite`` (it is not ours to replace silently). Raises :class:`InputError` listing every
    problem.
    """
    from cmdeploy.writers.atomic import check_writable_folder

    out = Path(output)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise InputError(f"--output '{out}' exists and is not a folder")
    check_writable_folder(out, what="--output")
    summary = out / SUMMARY_NAME
    if not overwrite and summary.exists() and not _is_our_summary(summary):
        raise InputError(
            f"--output '{out}' holds a {SUMMARY_NAME} that generate-labels did not write; "
            "choose another output folder or pass --overwrite"
        )
    pts_dir = Path(points) if points is not None else None
    if pts_dir is not None and not pts_dir.is_dir():
        raise InputError(f"--points '{pts_dir}' is not a folder of <case>.csv files")
    found = find_cases(data, cases=cases, names_file=names_file, require_labels=pts_dir is None)
    problems: list[str] = []
    todo: list[CaseJob] = []
    done: list[CaseJob] = []
    for i, case in enumerate(found, start=1):
        csv_path = pts_dir / f"{case.name}.csv" if pts_dir is not None else None
        job = CaseJob(i, case, csv_path)
        case_dir = out / case.name
        if is_finished(case_dir) and not overwrite:
            done.append(job)
            continue
        if csv_path is not None and not csv_path.is_file():
            problems.append(f"case {i}: points CSV '{csv_path}' does not exist")
        if csv_path is None and case.labels is None:
            problems.append(f"case {i}: '{case.image}' has no label volume to simulate clicks on")
        leftovers = [n for n in (LABELS_NAME, POINTS_NAME) if (case_dir / n).exists()]
        if leftovers and not overwrite:
            problems.append(
                f"case {i}: '{case_dir}' holds {', '.join(leftovers)} without {REPORT_NAME} "
                "(an unfinished or foreign result); remove it or pass --overwrite"
            )
        todo.append(job)
    if problems:
        raise InputError(f"{len(problems)} problem(s) with the inputs:\n  " + "\n  ".join(problems))
    return todo, done


def _is_our_summary(path: Path) -> bool:
    """True when ``path`` is a regular file holding a summary this module wrote (it is rewritten
    by every run; anything else there is refused)."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == SUMMARY_FORMAT
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def simulated_rows(
    job: CaseJob, series: Any, model: ClickModel, seed: int, min_size: int = DEFAULT_MIN_SIZE
) -> tuple[list[PointsRow], Any]:
    """Simulated annotator clicks on every object of the case's label volume: ``(rows, volume)``."""
    assert job.case.labels is not None
    vol = open_label_volume(job.case.labels)
    if vol.num_slices != series.num_slices or tuple(vol.shape) != tuple(series.shape):
        raise InputError(
            f"case {job.index}: label volume {vol.num_slices} x {vol.shape} does not match the image "
            f"{series.num_slices} x {tuple(series.shape)}"
        )
    names = job.case.label_names or None
    rows = points_from_label_volume(
        vol.iter_slices(), names=names, min_size=min_size, simulate=model,
        spacing_xy=series.spacing_xy_mm, seed=case_seed(seed, job.case.name),
    )
    return rows, vol


def label_ids(labels: Sequence[str], names: Mapping[int, str]) -> dict[str, int]:
    """Output value of every base label: its id in ``names`` (name -> id, case-insensitive; a
    numeric label is its own id), else the next free id in order of first appearance."""
    by_name = {v.lower(): int(k) for k, v in names.items()}
    out: dict[str, int] = {}
    for name in labels:
        if name in out:
            continue
        lid = by_name.get(name.lower())
        if lid is None and name.isdigit() and not by_name:
            lid = int(name)
        if lid is not None and lid not in out.values():
            out[name] = lid
    nxt = max([0, *out.values(), *by_name.values()]) + 1
    for name in labels:
        if name not in out:
            out[name] = nxt
            nxt += 1
    return out


def dice_against(result: Any, rows: Sequence[PointsRow], vol: Any, values: Mapping[str, int]) -> dict:
    """Dice of the generated labels against the case's label volume ``vol``.

    ``values``: base label -> its id in ``vol`` (only these labels are compared). ``objects``: one
    entry per clicked (slice, label) (2-D Dice of the merged mask vs the reference pixels of that
    label on that slice); ``volume``: per label, 3-D Dice over every slice (reference voxels on
    slices nobody clicked count as missed) with both voxel counts.
    """
    clicked = {(int(r.slice_index), base_label(r.label)) for r in rows}
    per_obj = []
    counts = {name: np.zeros(3, dtype=np.int64) for name in values}  # intersection, reference, generated
    for k, ref in vol.iter_slices():
        pred = result.label_maps.get(k)
        for name, v in values.items():
            r = ref == v
            known = pred is not None and name in result.label_values
            p = pred == result.label_values[name] if known else None
            c = np.array([0 if p is None else np.count_nonzero(p & r), np.count_nonzero(r),
                          0 if p is None else np.count_nonzero(p)], dtype=np.int64)
            counts[name] += c
            if (k, name) in clicked:
                per_obj.append({"slice_index": k, "label": name, "dice": round(_dice(c), 6),
                                "reference_px": int(c[1]), "generated_px": int(c[2])})
    volume = {
        name: {"dice": round(_dice(c), 6) if c[1] + c[2] else None,
               "reference_voxels": int(c[1]), "generated_voxels": int(c[2])}
        for name, c in counts.items()
    }
    scores = [o["dice"] for o in per_obj]
    return {
        "objects": per_obj,
        "object_mean": round(float(np.mean(scores)), 6) if scores else None,
        "object_std": round(float(np.std(scores)), 6) if scores else None,
        "volume": volume,
    }


def _dice(c: np.ndarray) -> float:
    """Dice from (intersection, reference, generated) counts; 1.0 when both are empty."""
    total = int(c[1] + c[2])
    return 2.0 * int(c[0]) / total if total else 1.0


def generate_case(
    seg: Any,
    job: CaseJob,
    output: str | Path,
    *,
    click_model: ClickModel | None,
    seed: int = 0,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Label one case and write its outputs (all or nothing); returns its report dict.

    ``click_model``: the simulated annotator (used when ``job.points`` is None). ``progress(done,
    total)`` is called after every batch of objects.
    """
    from cmdeploy.io import open_series
    from cmdeploy.pipeline import run_pipeline
    from cmdeploy.writers.atomic import OutputDir
    from cmdeploy.writers.nifti import write_nifti_labels
    from cmdeploy.writers.report import build_report, write_report

    t0 = time.perf_counter()
    series = open_series(job.case.image)
    if job.points is not None:
        rows = read_points_csv(job.points, series)
        vol = open_label_volume(job.case.labels) if job.case.labels is not None else None
        clicks: dict[str, Any] = {"source": "points-csv", "file": job.points.name}
    else:
        if click_model is None:
            raise InputError(f"case {job.index}: no points CSV and no click model")
        rows, vol = simulated_rows(job, series, click_model, seed)
        clicks = {"source": "simulated-annotator", **click_model.to_dict(), "seed": int(seed)}
    if vol is not None and (vol.num_slices != series.num_slices or tuple(vol.shape) != tuple(series.shape)):
        vol = None  # a label volume on another grid cannot be compared voxel by voxel
    t_points = time.perf_counter() - t0
    if rows:
        report_progress = (lambda n: progress(n, len(rows))) if progress else None
        result = run_pipeline(seg, series, rows, progress=report_progress)
    else:
        from cmdeploy.pipeline import PipelineResult

        result = PipelineResult(tuple(series.shape), series.num_slices, {}, {}, [], series.spacing_xy_mm)
    names = job.case.label_names
    values = label_ids(list(result.label_values), names)
    objects = result.label_masks(rows)
    report_extra: dict[str, Any] = {
        "command": "generate-labels",
        "case": job.case.name,
        "clicks": {**clicks, "objects": len(rows), "clicks": CLICKS_PER_OBJECT * len(rows)},
        "label_ids": values,
        "slices_clicked": len({int(r.slice_index) for r in rows}),
        "generated_voxels": int(sum(np.count_nonzero(m) for m in result.label_maps.values())),
    }
    if vol is not None:
        # compared: labels named in the case's names file (all of them when it has none)
        ref_values = {n: v for n, v in values.items() if v in names or not names}
        report_extra["dice"] = dice_against(result, rows, vol, ref_values)
        report_extra["reference_voxels"] = int(
            sum(d["reference_voxels"] for d in report_extra["dice"]["volume"].values())
        )
    case_dir = Path(output) / job.case.name
    with OutputDir(case_dir, overwrite=overwrite) as out:
        with out.stage(LABELS_NAME) as tmp:
            remap = {name: values[name] for name in result.label_values}
            if objects:
                write_nifti_labels(tmp, series, objects, values=remap)
            else:
                _write_empty_labels(tmp, series)
        with out.stage(POINTS_NAME) as tmp:
            write_points_csv(tmp, rows)
        timings = {
            **result.timings.to_dict(),
            "points": t_points,
            "case_total": time.perf_counter() - t0,
        }
        report = build_report(
            objects=objects, series=series, model_path=seg.model_path, model_sha256=seg.model_sha256,
            spec=seg.spec, backend=seg.backend, timings=timings,
            values={name: values[name] for name in result.label_values},
            outputs=[LABELS_NAME, POINTS_NAME, REPORT_NAME], extra=report_extra,
        )
        with out.stage(REPORT_NAME) as tmp:
            write_report(tmp, report)
    return report


def _write_empty_labels(path: Path, series: Any) -> None:
    """An all-background label volume on the case's grid (a case without any object)."""
    from cmdeploy.writers.nifti import output_grid, series_geometry, write_nifti_volume

    vol = output_grid(series, np.zeros((series.width, series.height, series.num_slices), np.uint8))
    affine, qcode, scode = series_geometry(series)
    write_nifti_volume(path, vol, affine, qform_code=qcode, sform_code=scode, intent="label")


def summarize(output: str | Path, jobs: Sequence[CaseJob]) -> dict[str, Any]:
    """Totals over the finished cases' reports (objects, clicks, voxels, Dice over objects and
    cases, seconds); ``cases`` lists each case's numbers. Rewritten by every run (``summary.json``)."""
    per_case = []
    obj_scores: list[float] = []
    for job in jobs:
        path = Path(output) / job.case.name / REPORT_NAME
        if not path.is_file():
            continue
        rep = json.loads(path.read_text(encoding="utf-8"))
        ext = rep.get("extra", {})
        entry: dict[str, Any] = {
            "case": job.case.name,
            "objects": ext.get("clicks", {}).get("objects", 0),
            "clicks": ext.get("clicks", {}).get("clicks", 0),
            "generated_voxels": ext.get("generated_voxels", 0),
            "seconds": rep.get("timings_s", {}).get("case_total"),
        }
        dice = ext.get("dice")
        if dice is not None:
            obj_scores += [o["dice"] for o in dice["objects"]]
            vols = [v for v in dice["volume"].values() if v["dice"] is not None]
            entry["reference_voxels"] = ext.get("reference_voxels", 0)
            entry["dice_object_mean"] = dice["object_mean"]
            entry["dice_volume"] = float(np.mean([v["dice"] for v in vols])) if vols else None
        per_case.append(entry)
    case_scores = [c["dice_volume"] for c in per_case if c.get("dice_volume") is not None]

    def stats(x: list[float]) -> dict[str, Any]:
        return {"mean": float(np.mean(x)), "std": float(np.std(x)), "n": len(x)} if x else {"n": 0}

    return {
        "format": SUMMARY_FORMAT,
        "cases": per_case,
        "objects": int(sum(c["objects"] for c in per_case)),
        "clicks": int(sum(c["clicks"] for c in per_case)),
        "generated_voxels": int(sum(c["generated_voxels"] for c in per_case)),
        "reference_voxels": int(sum(c.get("reference_voxels", 0) for c in per_case)),
        "dice_over_objects": stats(obj_scores),
        "dice_over_cases": stats(case_scores),
        "seconds": float(sum(c["seconds"] or 0.0 for c in per_case)),
    }
