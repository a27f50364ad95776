"""Peak memory of infer's writers (PNG overlay, NIfTI, DICOM SEG, report) for many objects on huge slices.

Builds one synthetic CT slice of ``--size`` x ``--size`` pixels (a DICOM file, so the SEG writer
runs too), ``--objects`` non-overlapping square objects merged into one label map as the pipeline
does, and measures the peak of Python-traced allocations (tracemalloc, NumPy included) while each
writer runs. Run it on two checkouts to compare (the numbers in docs/results.md came from)::

    python benchmarks/bench_writer_memory.py --size 2048 --objects 4 40
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def _dicom_slice(folder: Path, size: int) -> Path:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    ds = copy.deepcopy(pydicom.dcmread(get_testdata_file("CT_small.dcm")))
    ds.Rows = ds.Columns = size
    ds.PixelData = np.zeros((size, size), np.int16).tobytes()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = folder / "slice.dcm"
    ds.save_as(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--objects", type=int, nargs="+", default=[4, 40])
    args = ap.parse_args()

    from cmdeploy.io import open_series
    from cmdeploy.pipeline import PipelineResult
    from cmdeploy.writers.atomic import OutputDir
    from cmdeploy.writers.dicom_seg import write_dicom_seg
    from cmdeploy.writers.nifti import write_nifti_labels
    from cmdeploy.writers.png_overlay import write_series_overlays

    size = args.size
    print(f"writers' peak traced memory, one {size} x {size} slice (MiB; seconds)")
    for n in args.objects:
        with tempfile.TemporaryDirectory() as tmp:
            series = open_series(_dicom_slice(Path(tmp), size))
            lm = np.zeros((size, size), np.uint16)
            grid = int(np.ceil(np.sqrt(n)))
            side = max(size // (2 * grid), 2)
            values = {}
            for i in range(n):
                y, x = divmod(i, grid)
                lm[2 * y * side : 2 * y * side + side, 2 * x * side : 2 * x * side + side] = i + 1
                values[f"o{i + 1}"] = i + 1
            objects = PipelineResult((size, size), 1, {0: lm}, values, []).label_masks()
            row = []
            for name in ("png", "nifti", "seg"):
                tracemalloc.start()
                t0 = time.perf_counter()
                with OutputDir(Path(tmp) / f"out_{name}") as out:
                    if name == "png":
                        write_series_overlays(out, series, objects, folder="overlays", values=values)
                    elif name == "nifti":
                        with out.stage("labels.nii.gz") as p:
                            write_nifti_labels(p, series, objects, values=values)
                    else:
                        with out.stage("seg.dcm") as p:
                            write_dicom_seg(p, series, objects, values=values)
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                row.append(f"{name} {peak / 2**20:.0f} ({time.perf_counter() - t0:.1f} s)")
            print(f"{n:4d} objects: " + ", ".join(row), flush=True)


if __name__ == "__main__":
    main()
