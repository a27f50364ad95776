"""A PACS-side job runner: segment every points CSV dropped into an inbox folder, store the SEG on the PACS.

The flow a hospital sets up around it:

1. an annotator clicks four extreme points per object in a viewer, which saves
   ``inbox/<job>.csv`` with rows keyed by ``sop_instance_uid`` (columns as for ``cmdeploy infer``);
2. this script (run as a service, or from cron with ``--once``) picks up every CSV that has no
   ``<job>.csv.result.json`` yet, finds the CSV's series on the PACS (QIDO-RS lookup of its first
   SOP instance UID), pulls the series into a temporary folder, segments every object with
   ``cmdeploy.Segmenter`` (the same batched pipeline as ``cmdeploy infer``), and stores one DICOM SEG
   on the PACS, next to the images in every viewer;
3. it writes ``<job>.csv.result.json`` (status, exit code, message, timings; no patient data) next to
   the CSV. Input files are never moved or deleted. A transient failure (PACS down or slow, after
   retries) writes nothing, so the job is tried again on the next round.

Usage::

    python examples/pacs_watch.py --pacs dicomweb:http://pacs:8042/dicom-web --inbox /srv/cmdeploy/inbox \\
        [--send dimse:ORTHANC@pacs:4242 --calling-aet CMDEPLOY] [--interval 10] [--once]

Needs ``pip install 'cmdeploy[dicom,pacs]'``. ``--pacs`` must be DICOMweb (for the lookup); the SEG goes
there too unless ``--send`` names another destination (DICOMweb or DIMSE).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from cmdeploy import Segmenter
from cmdeploy.errors import InputError
from cmdeploy.pacs import PacsError, connect, segment_series
from cmdeploy.writers.atomic import atomic_write_text

RESULT_SUFFIX = ".result.json"


def first_sop_uid(csv_path: Path) -> str:
    """The first ``sop_instance_uid`` of a points CSV (InputError if there is none)."""
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            uid = {k.strip().lower(): v for k, v in row.items() if k}.get("sop_instance_uid", "")
            if uid and uid.strip():
                return uid.strip()
    raise InputError(f"{csv_path.name}: no sop_instance_uid in any row; the series cannot be found")


def run_job(csv_path: Path, args: argparse.Namespace, segmenter: Segmenter) -> dict | None:
    """Process one job; returns the result to write, or None to try again later (transient)."""
    pacs = connect(args.pacs, calling_aet=args.calling_aet, timeout=args.timeout, retries=args.retries)
    dest = connect(args.send, calling_aet=args.calling_aet, timeout=args.timeout, retries=args.retries) \
        if args.send else pacs
    t0 = time.perf_counter()
    try:
        study, series = pacs.locate_instance(first_sop_uid(csv_path))
        result = segment_series(pacs, study, series, csv_path, segmenter=segmenter, send_to=dest)
    except PacsError as exc:
        if exc.transient:
            print(f"{csv_path.name}: {exc} - will retry", file=sys.stderr)
            return None
        return {"status": "failed", "exit_code": exc.exit_code, "message": str(exc)}
    except InputError as exc:
        return {"status": "failed", "exit_code": 2, "message": str(exc)}
    return {
        "status": "ok" if result.sent else "empty",
        "exit_code": 0,
        "message": "SEG stored" if result.sent else "every mask was empty: no SEG stored",
        "instances": result.num_instances,
        "objects": result.num_objects,
        "areas_px": result.areas_px,
        "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
        "total_s": round(time.perf_counter() - t0, 3),
    }


def scan(inbox: Path, args: argparse.Namespace, segmenter: Segmenter) -> int:
    """Run every pending job once; returns the number of jobs finished (ok or failed)."""
    done = 0
    for csv_path in sorted(inbox.glob("*.csv")):
        marker = csv_path.with_name(csv_path.name + RESULT_SUFFIX)
        if marker.exists():
            continue
        result = run_job(csv_path, args, segmenter)
        if result is None:
            continue
        atomic_write_text(marker, json.dumps(result, indent=1) + "\n")
        print(f"{csv_path.name}: {result['status']} ({result['message']})", file=sys.stderr)
        done += 1
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pacs", required=True, help="dicomweb:URL of the PACS holding the series")
    ap.add_argument("--inbox", required=True, type=Path, help="folder where points CSVs are dropped")
    ap.add_argument("--send", default=None, help="where to store the SEG (default: --pacs)")
    ap.add_argument("--calling-aet", default="CMDEPLOY")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--model", default=None, help="model file (default: the embedded model)")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between scans")
    ap.add_argument("--once", action="store_true", help="scan once and exit")
    args = ap.parse_args(argv)
    if not args.pacs.lower().startswith("dicomweb:"):
        ap.error("--pacs must be dicomweb:URL (the series is looked up with QIDO-RS)")
    if not args.inbox.is_dir():
        ap.error(f"--inbox {args.inbox} is not a folder")
    segmenter = Segmenter.load(args.model)
    while True:
        scan(args.inbox, args, segmenter)
        if args.once:
            return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    raise SystemExit(main())
