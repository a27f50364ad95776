"""Benchmark: pull + segment + push of a CT series through a real Orthanc vs the same run on a local
folder, one run each, side by side.

Usage::

    .venv/bin/python benchmarks/bench_pacs.py [--data ../shared/data/ct-organs] [--case thorax_1p5mm] \
        [--slices 100] [--size 512] [--json out.json]

What it does:

1. Writes a ``--slices``-slice DICOM CT series (resampled to ``--size`` x ``--size``) and the points CSV
   of every labelled object from a shared ``ct-organs`` case, as ``bench_infer.py`` does, into a
   temporary folder (removed at the end).
2. Starts Orthanc (Debian packages ``orthanc`` + ``orthanc-dicomweb``) on free ports with a temporary
   storage folder, uploads the series through its REST API (setup, timed separately).
3. Runs ``cmdeploy infer`` three times as separate processes, with the shipped default model:
   on the local folder (``--format dicom-seg``); ``--input dicomweb:... --send dicomweb:...``
   (WADO-RS + STOW-RS); ``--input dimse:... --send dimse:...`` (C-GET + C-STORE). Wall time of each
   process, plus the pull and push times the command prints and the in-command time from
   ``report.json``.
4. Checks that the three SEGs have identical frames.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

from bench_infer import build_series  # noqa: E402
from pacs_servers import CALLING_AET, orthanc_missing_reason, start_orthanc  # noqa: E402

INFER = [sys.executable, "-c", "from cmdeploy.cli import app; app()", "infer"]


def run_infer(args: list[str], out: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([*INFER, *args, "--output", str(out)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"cmdeploy infer failed ({proc.returncode}):\n{proc.stderr}")
    pull = re.search(r"retrieved (\d+) instance\(s\) .* in ([\d.]+) s", proc.stderr)
    push = re.search(r"stored the SEG on .* in ([\d.]+) s", proc.stderr)
    report = json.loads((out / "report.json").read_text())
    return {
        "wall_s": wall,
        "pull_s": float(pull.group(2)) if pull else 0.0,
        "instances": int(pull.group(1)) if pull else None,
        "push_s": float(push.group(1)) if push else 0.0,
        "infer_s": float(report["timings_s"]["command_total"]),
        "model_s": float(report["timings_s"]["model"]),
    }


def seg_frames(path: Path) -> dict:
    import pydicom

    ds = pydicom.dcmread(path)
    px = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    out = {}
    for i, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
        ref = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        out[(str(ref), int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber))] = px[i]
    return out


def print_table(runs: dict) -> None:
    """Markdown table: wall time, model time, time outside the model, PACS pull and push."""
    print("| run | wall s | model s | outside the model s | pull s | push s | pull + push, % of local wall |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    base = runs["local folder"]["wall_s"]
    for name, r in runs.items():
        pacs = r["pull_s"] + r["push_s"]
        print(f"| {name} | {r['wall_s']:.2f} | {r['model_s']:.2f} | {r['wall_s'] - r['model_s']:.2f} | "
              f"{r['pull_s']:.2f} | {r['push_s']:.2f} | {100 * pacs / base:.1f} % |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ct-organs"))
    ap.add_argument("--case", default="thorax_1p5mm")
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    case = Path(args.data) / args.case
    if not (case / "image.nii.gz").is_file():
        raise SystemExit(f"no case at {case} (needs ../shared/data/ct-organs)")
    missing = orthanc_missing_reason()
    if missing:
        raise SystemExit(missing)

    with tempfile.TemporaryDirectory(prefix="cmdeploy-bench-pacs-") as tmp_name:
        tmp = Path(tmp_name)
        built = build_series(case, tmp / "data", args.slices, args.size)
        files = sorted(Path(built["dicom"]).glob("*.dcm"))
        import pydicom

        head = pydicom.dcmread(files[0], stop_before_pixels=True)
        study, series = str(head.StudyInstanceUID), str(head.SeriesInstanceUID)
        orthanc = start_orthanc(tmp / "orthanc")
        try:
            t0 = time.perf_counter()
            orthanc.upload(files)
            upload = time.perf_counter() - t0
            mb = sum(f.stat().st_size for f in files) / 2**20
            common = ["--points", built["points"], "--format", "dicom-seg"]
            remote = ["--study", study, "--series", series, "--calling-aet", CALLING_AET]
            runs = {
                "local folder": run_infer(["--input", built["dicom"], *common], tmp / "out_local"),
                "DICOMweb (WADO-RS + STOW-RS)": run_infer(
                    ["--input", orthanc.dicomweb, *remote, *common, "--send", orthanc.dicomweb],
                    tmp / "out_dicomweb"),
                "DIMSE (C-GET + C-STORE)": run_infer(
                    ["--input", orthanc.dimse(), *remote, *common, "--send", orthanc.dimse()],
                    tmp / "out_dimse"),
            }
            segs = orthanc.find("Series", StudyInstanceUID=study, Modality="SEG")
        finally:
            orthanc.stop()
        ref = seg_frames(tmp / "out_local" / "seg.dcm")
        for name in ("out_dicomweb", "out_dimse"):
            got = seg_frames(tmp / name / "seg.dcm")
            assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref), name

    h, w = built["shape"]
    print(f"series: {args.slices} slices of {h} x {w} ({mb:.1f} MiB), {built['objects']} objects on "
          f"{built['annotated_slices']} slices; upload to Orthanc (setup) {upload:.2f} s; "
          f"{len(segs)} SEG series stored; PACS SEG frames == local SEG frames")
    print_table(runs)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "upload_s": upload, "built": built,
                                               "mib": mb}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
