"""The points CSV: one row per object per slice, four extreme points each.

Columns are found by name (case-insensitive, any order, extra columns ignored):

* ``slice_index`` (0-based, in the Series' slice order) and/or ``sop_instance_uid`` (DICOM); at
  least one column must exist and every row must fill at least one; when both are filled they
  must name the same slice.
* ``label``: a non-empty object name, unique per slice, without control characters or line
  breaks. ``name#k`` (k = 2, 3, ...) marks the k-th extra connected piece of ``name`` on a slice
  (written by ``points-from-labels``; ``infer`` merges ``#k`` pieces into ``name``). At most
  :data:`MAX_LABELS` distinct names (without ``#k``) per file: they must fit a uint16 label map.
* ``left_x,left_y,right_x,right_y,top_x,top_y,bottom_x,bottom_y``: pixel coordinates,
  ``x`` = column, ``y`` = row, pixel centres at integers, inside the slice
  (``0 <= x <= W-1``, ``0 <= y <= H-1``), ``left_x <= right_x``, ``top_y <= bottom_y``, and a box
  with a real extent: the points' x values are not all equal (zero width), nor their y values
  (zero height).

Line numbers count physical lines of the file, the header being line 1. Every problem in every
row is collected and reported in one :class:`~cmdeploy.errors.InputError`.
"""

from __future__ import annotations

import csv
import io
import math
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmdeploy.errors import InputError
from cmdeploy.io.series import Series
from cmdeploy.writers.atomic import atomic_path, check_output_file

POINT_COLUMNS: tuple[str, ...] = (
    "left_x",
    "left_y",
    "right_x",
    "right_y",
    "top_x",
    "top_y",
    "bottom_x",
    "bottom_y",
)
SLICE_COLUMN = "slice_index"
UID_COLUMN = "sop_instance_uid"
LABEL_COLUMN = "label"
_PIECE = re.compile(r"^(.*\S)\s*#\s*\d+$")


def piece_label(name: str, piece: int) -> str:
    """The label of piece ``piece`` (1 = the largest) of ``name`` on a slice: ``name``, ``name#2``, ..."""
    return name if piece <= 1 else f"{name}#{piece}"


def base_label(label: str) -> str:
    """``"liver#2"`` -> ``"liver"`` (the ``#k`` piece suffix removed); other labels unchanged."""
    text = label.strip()
    m = _PIECE.match(text)
    return m.group(1) if m else text


MAX_REPORTED_PROBLEMS = 100
MAX_LABELS = 65535  # distinct base labels: values of a uint16 label map and DICOM segment numbers


def label_problem(label: str) -> str | None:
    """Why ``label`` cannot name an object (empty, control characters, line breaks), or None."""
    if not label.strip():
        return "label is empty"
    bad = [c for c in label if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp")]
    if bad:
        codes = ", ".join(sorted({f"U+{ord(c):04X}" for c in bad}))
        return f"label contains control characters or line breaks ({codes})"
    return None


@dataclass(frozen=True, eq=False)
class PointsRow:
    """One object on one slice.

    ``points`` is float32 (4, 2): left, right, top, bottom, each ``(x, y)`` = (column, row).
    ``line`` is the CSV line the row came from (0 for rows made in code).
    """

    slice_index: int
    label: str
    points: np.ndarray
    sop_instance_uid: str | None = None
    line: int = 0


def _show(text: str, limit: int = 24) -> str:
    """A short, quoted echo of a bad cell (never used for UID cells)."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _parse_index(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        value = float(text)  # ValueError passes up
    if not math.isfinite(value) or not value.is_integer():
        raise ValueError(text)
    return int(value)


def _header_map(header: list[str], source: str) -> dict[str, int]:
    cols: dict[str, int] = {}
    dupes = []
    for i, name in enumerate(header):
        key = name.strip().lower()
        if not key:
            continue
        if key in cols:
            dupes.append(key)
        cols[key] = i
    wanted = {SLICE_COLUMN, UID_COLUMN, LABEL_COLUMN, *POINT_COLUMNS}
    dupes = sorted(set(dupes) & wanted)
    if dupes:
        raise InputError(f"{source}: column(s) appear more than once: {', '.join(dupes)}")
    missing = [c for c in (LABEL_COLUMN, *POINT_COLUMNS) if c not in cols]
    if SLICE_COLUMN not in cols and UID_COLUMN not in cols:
        missing.insert(0, f"{SLICE_COLUMN} or {UID_COLUMN}")
    if missing:
        hint = ""
        if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
            hint = " (the file must be comma-separated)"
        raise InputError(
            f"{source}: missing required column(s): {', '.join(missing)}{hint}; expected "
            f"{SLICE_COLUMN} and/or {UID_COLUMN}, {LABEL_COLUMN}, {','.join(POINT_COLUMNS)}"
        )
    return cols


class _RowParser:
    """Validates one data row at a time; remembers (slice, label) pairs for duplicates."""

    def __init__(self, cols: dict[str, int], n_fields: int, series: Series | None) -> None:
        self.cols = cols
        self.n_fields = n_fields
        self.series = series
        self.seen: dict[tuple[int, str], int] = {}

    def _cell(self, row: list[str], name: str) -> str:
        i = self.cols.get(name)
        return row[i].strip() if i is not None and i < len(row) else ""

    def _slice(self, row: list[str], problems: list[str]) -> tuple[int | None, str | None]:
        s = self.series
        si_text, uid = self._cell(row, SLICE_COLUMN), self._cell(row, UID_COLUMN) or None
        if not si_text and uid is None:
            problems.append(f"no {SLICE_COLUMN} or {UID_COLUMN}")
            return None, None
        si: int | None = None
        if si_text:
            try:
                si = _parse_index(si_text)
            except ValueError:
                problems.append(f"{SLICE_COLUMN} {_show(si_text)} is not a whole number")
                return None, uid
            n = s.num_slices if s is not None else None
            if si < 0 or (n is not None and si >= n):
                rng = f"0..{n - 1}" if n is not None else ">= 0"
                problems.append(f"{SLICE_COLUMN} {si} is outside the series ({rng})")
                return None, uid
        if uid is not None:
            if s is None:
                if si is None:
                    problems.append(f"{UID_COLUMN} given but no image series to look it up in")
                return si, uid
            k = s.slice_index_for_uid(uid)
            if k is None:
                problems.append(f"{UID_COLUMN} matches no slice of the series")
                return None, uid
            if si is not None and si != k:
                problems.append(f"{SLICE_COLUMN} {si} disagrees with {UID_COLUMN} (slice {k})")
                return None, uid
            si = k
        return si, uid

    def _points(self, row: list[str], problems: list[str]) -> np.ndarray | None:
        vals = []
        for name in POINT_COLUMNS:
            text = self._cell(row, name)
            try:
                v = float(text)
            except ValueError:
                problems.append(f"{name} {_show(text)} is not a number")
                continue
            if not math.isfinite(v):
                problems.append(f"{name} {_show(text)} is not finite")
                continue
            vals.append(v)
        if len(vals) != len(POINT_COLUMNS):
            return None
        pts = np.asarray(vals, dtype=np.float64).reshape(4, 2)
        names = ("left", "right", "top", "bottom")
        if self.series is not None:
            h, w = self.series.shape
            for (x, y), nm in zip(pts, names, strict=True):
                if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
                    problems.append(
                        f"{nm} point ({x:g}, {y:g}) is outside the {w}x{h} slice "
                        f"(need 0 <= x <= {w - 1}, 0 <= y <= {h - 1})"
                    )
        else:
            for (x, y), nm in zip(pts, names, strict=True):
                if x < 0 or y < 0:
                    problems.append(f"{nm} point ({x:g}, {y:g}) has a negative coordinate")
        ok = True
        if pts[0, 0] > pts[1, 0]:
            problems.append(f"left_x {pts[0, 0]:g} > right_x {pts[1, 0]:g}")
            ok = False
        if pts[2, 1] > pts[3, 1]:
            problems.append(f"top_y {pts[2, 1]:g} > bottom_y {pts[3, 1]:g}")
            ok = False
        if np.all(pts == pts[0]):
            problems.append("all four points are identical (no extent)")
            ok = False
        elif pts[:, 0].max() == pts[:, 0].min():
            problems.append(f"zero-width box (every x is {pts[0, 0]:g}); an object needs a real extent")
            ok = False
        elif pts[:, 1].max() == pts[:, 1].min():
            problems.append(f"zero-height box (every y is {pts[0, 1]:g}); an object needs a real extent")
            ok = False
        return pts.astype(np.float32) if ok else None

    def parse(self, row: list[str], line: int) -> tuple[PointsRow | None, list[str]]:
        problems: list[str] = []
        if len(row) > self.n_fields:
            problems.append(
                f"{len(row)} fields but the header has {self.n_fields} (unquoted comma?)"
            )
        si, uid = self._slice(row, problems)
        label = self._cell(row, LABEL_COLUMN)
        bad_label = label_problem(label)
        if bad_label:
            problems.append(bad_label)
        pts = self._points(row, problems)
        if si is not None and not bad_label:
            first = self.seen.setdefault((si, label), line)
            if first != line:
                problems.append(f"duplicate of line {first} (slice {si}, label {_show(label)})")
        if problems or si is None or pts is None or bad_label:
            return None, problems
        return PointsRow(si, label, pts, uid, line), problems


def parse_points_csv(
    text: str, *, series: Series | None = None, source: str = "points CSV"
) -> list[PointsRow]:
    """Parse and validate points-CSV text (see the module docstring); ``source`` names it."""
    rows = csv.reader(io.StringIO(text, newline=""))
    try:
        header: list[str] | None = None
        header_line = 0
        for rec in rows:
            if any(c.strip() for c in rec):
                header, header_line = rec, rows.line_num
                break
        if header is None:
            raise InputError(f"{source} is empty (no header, no rows)")
        cols = _header_map(header, source)
        parser = _RowParser(cols, len(header), series)
        out: list[PointsRow] = []
        problems: list[str] = []
        n_rows = 0
        start = rows.line_num + 1
        for rec in rows:
            line, start = start, rows.line_num + 1
            if not any(c.strip() for c in rec):
                continue
            n_rows += 1
            row, errs = parser.parse(rec, line)
            if errs:
                problems.append(f"line {line}: " + "; ".join(errs))
            elif row is not None:
                out.append(row)
    except csv.Error as exc:
        raise InputError(f"{source}: not readable as CSV near line {rows.line_num} ({exc})") from None
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = len(problems) - len(shown)
        tail = f"\n  ... and {more} more invalid rows" if more else ""
        raise InputError(
            f"{source}: {len(problems)} of {n_rows} rows are invalid "
            f"(header is line {header_line}):\n  " + "\n  ".join(shown) + tail
        )
    if not out:
        raise InputError(f"{source} has a header but no data rows")
    n_labels = len({base_label(r.label) for r in out})
    if n_labels > MAX_LABELS:
        raise InputError(
            f"{source}: {n_labels} distinct labels; at most {MAX_LABELS} fit a label map "
            "(merge labels or split the file)"
        )
    return out


def read_points_csv(path: str | Path, series: Series | None = None) -> list[PointsRow]:
    """Read and validate a points CSV against ``series`` (its slice count, size and UIDs).

    Without a series, only the file's own consistency is checked and every row needs a
    ``slice_index``. Raises InputError listing every bad row with its line number.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise InputError(f"points CSV '{p}': cannot read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"points CSV '{p}': not UTF-8 text (bad byte at offset {exc.start})"
        ) from None
    return parse_points_csv(text, series=series, source=f"points CSV '{p}'")


def _fmt(v: float) -> str:
    return np.format_float_positional(np.float32(v), trim="-")


def write_points_csv(path: str | Path, rows: Iterable[PointsRow], *, overwrite: bool = False) -> None:
    """Write rows as a points CSV (written to a temp file in the same folder, then renamed).

    Columns: ``slice_index``, ``sop_instance_uid`` (only when some row has one), ``label``, then
    the eight point coordinates (shortest float32 round-trip text). An existing file is refused
    (:class:`~cmdeploy.writers.atomic.OutputExistsError`) unless ``overwrite``; a folder or other
    non-regular file at ``path`` always is.
    """
    p = Path(path)
    rows = list(rows)
    with_uid = any(r.sop_instance_uid for r in rows)
    header = [SLICE_COLUMN, *([UID_COLUMN] if with_uid else []), LABEL_COLUMN, *POINT_COLUMNS]
    check_output_file(p, overwrite=overwrite, what="points CSV")
    with atomic_path(p) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for r in rows:
            pts = np.asarray(r.points, dtype=np.float32).reshape(4, 2)
            uid = [r.sop_instance_uid or ""] if with_uid else []
            w.writerow([int(r.slice_index), *uid, r.label, *(_fmt(v) for v in pts.ravel())])
