"""DICOM CT readers: a series folder or a single file -> :class:`~cmdeploy.io.series.Series`.

Slices are ``ds.pixel_array`` (rows = y, columns = x) times RescaleSlope plus RescaleIntercept
(or the Modality LUT when the file has one), float32 HU. A folder is scanned recursively; files
that are not DICOM, DICOMDIR files and annotation objects (SEG, RTSTRUCT, SR, PR, KO, REG) are
ignored; the rest are grouped by SeriesInstanceUID. The slices of the chosen series are sorted by
``ImagePositionPatient . normal`` with ``normal = row_cosines x column_cosines``
(ImageOrientationPatient), ascending, 0-based.

Refused, with the file named: a Modality other than CT, no pixel data, multi-frame or colour
images, Rows/Columns/PixelSpacing/ImageOrientationPatient that differ between slices, two slices
at the same position, and compressed pixel data whose decoder is not installed (the message names
the ``dicom`` extra). A file that looks like DICOM (the ``DICM`` marker) but cannot be parsed, or
whose data ends early (truncated: pixel data cut short, or no SeriesInstanceUID/Modality/pixels
left), is a named error, never silently skipped: a dropped slice would shift every
``slice_index`` after it. For the same reason a gap in the slice positions (a step more than 1.5
times the usual spacing) is refused, naming the two positions and files around it, unless
``allow_gaps`` (``--allow-gaps``) is given; slice indices then count the files present.
Headers are read with large values deferred, and pixels one file at a time
when a slice is asked for. Messages never contain patient names, IDs or UIDs.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmdeploy.errors import InputError
from cmdeploy.io.series import Series

DICOM_EXTRA_HINT = "pip install 'cmdeploy[dicom]'"
_IGNORED_MODALITIES = frozenset({"SEG", "RTSTRUCT", "SR", "PR", "KO", "REG"})
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_DUPLICATE_TOL_MM = 1e-3
_ORIENTATION_TOL = 1e-4
_GAP_FACTOR = 1.5  # a step this many times the median spacing means a missing slice
_GAP_TOL_MM = 0.05
# header values registered with the scrubber so no message or log record can show them
_IDENTIFYING = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "SeriesDate", "AcquisitionDate",
    "ContentDate", "ReferringPhysicianName", "InstitutionName", "PatientAddress",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "SOPClassUID",
    "MediaStorageSOPInstanceUID",
)


@dataclass(frozen=True)
class _Header:
    """What the reader needs from one file's header (no pixels)."""

    path: Path
    series_uid: str
    sop_uid: str | None
    modality: str
    rows: int
    columns: int
    spacing: tuple[float, float] | None  # (row spacing = y, column spacing = x), DICOM order
    orientation: np.ndarray | None
    position: np.ndarray | None
    has_pixels: bool
    frames: int
    samples: int
    photometric: str
    transfer_syntax: str | None
    is_dicomdir: bool


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Read without pydicom's value-validation warnings: they echo raw values (names, UIDs)."""
    from pydicom import config

    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        config.settings.reading_validation_mode = old


def _code(value: object) -> str:
    """A DICOM code string (CS) value, or "?" when malformed (so corrupt bytes are never echoed)."""
    text = str(value or "").strip().upper()
    return text if re.fullmatch(r"[A-Z0-9_ ]{0,16}", text) else "?"


def _floats(value: object, n: int) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"expected {n} finite numbers")
    return arr


def has_dicm_marker(path: Path) -> bool:
    """True when ``path`` is a readable file with the DICOM Part 10 preamble marker ``DICM``."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _register(ds: object) -> None:
    """Hand the identifying values of a header to the scrubber (cmdeploy.privacy)."""
    from cmdeploy.privacy import register_identifiers

    values = []
    for kw in _IDENTIFYING:
        try:
            v = ds.get(kw)  # type: ignore[attr-defined]
            if v is None:
                meta = getattr(ds, "file_meta", None)
                v = meta.get(kw) if meta is not None else None
        except Exception:
            continue
        if v is not None:
            values.extend(v if isinstance(v, (list, tuple)) else [v])
    register_identifiers(values)


def _truncated(path: Path, ds: object) -> bool:
    """True when the file's pixel data ends after the end of the file (a cut-off download/copy)."""
    try:
        elem = ds.get_item(0x7FE00010)  # type: ignore[attr-defined]
        length, tell = int(elem.length), getattr(elem, "value_tell", None)
    except Exception:
        return False
    if tell is None or length == 0xFFFFFFFF:
        return False
    return int(tell) + length > path.stat().st_size


@_quiet_pydicom()
def _read_header(path: Path) -> _Header:
    """Parse one file's header; pydicom's InvalidDicomError passes through (not DICOM) unless the
    file carries the DICM marker (then it is DICOM that cannot be parsed: a named InputError)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, defer_size="1 KB")
    except InvalidDicomError:
        if has_dicm_marker(path):
            raise InputError(
                f"'{path}': looks like DICOM (DICM marker) but cannot be parsed; corrupt or "
                "truncated file"
            ) from None
        raise
    except Exception as exc:  # corrupt file: pydicom raises many kinds
        raise InputError(
            f"'{path}': cannot read the DICOM header (corrupt or truncated file; "
            f"{type(exc).__name__})"
        ) from None
    _register(ds)
    if _truncated(path, ds):
        raise InputError(f"'{path}': truncated DICOM file (its pixel data ends after the end of the file)")
    try:
        meta = getattr(ds, "file_meta", None)
        media_sop = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
        ts = meta.get("TransferSyntaxUID") if meta is not None else None
        spacing = _floats(ds.get("PixelSpacing"), 2)
        return _Header(
            path=path,
            series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
            sop_uid=str(ds.get("SOPInstanceUID", "") or "") or None,
            modality=_code(ds.get("Modality", "")),
            rows=int(ds.get("Rows", 0) or 0),
            columns=int(ds.get("Columns", 0) or 0),
            spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
            orientation=_floats(ds.get("ImageOrientationPatient"), 6),
            position=_floats(ds.get("ImagePositionPatient"), 3),
            has_pixels="PixelData" in ds,
            frames=int(ds.get("NumberOfFrames", 1) or 1),
            samples=int(ds.get("SamplesPerPixel", 1) or 1),
            photometric=_code(ds.get("PhotometricInterpretation", "MONOCHROME2")),
            transfer_syntax=str(ts) if ts else None,
            is_dicomdir=media_sop == _DICOMDIR_SOP_CLASS or path.name.upper() == "DICOMDIR",
        )
    except Exception as exc:
        raise InputError(
            f"'{path}': malformed DICOM header ({type(exc).__name__} reading an image attribute)"
        ) from None


def _decoder_available(transfer_syntax: str) -> bool:
    """True when pydicom can decode this (known, supported) transfer syntax with what is installed.

    Raises NotImplementedError when pydicom has no decoder for the syntax at all.
    """
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = UID(transfer_syntax)
    if not uid.is_compressed:
        return True
    return bool(get_decoder(uid).is_available)


@_quiet_pydicom()
def _check_decodable(h: _Header) -> None:
    if h.transfer_syntax is None:
        raise InputError(
            f"'{h.path}': no TransferSyntaxUID in the file meta information; cannot decode pixels"
        )
    from pydicom.uid import UID

    uid = UID(h.transfer_syntax)
    if not uid.is_transfer_syntax:
        raise InputError(f"'{h.path}': TransferSyntaxUID is not a known DICOM transfer syntax")
    try:
        ok = _decoder_available(h.transfer_syntax)
    except NotImplementedError:
        raise InputError(
            f"'{h.path}': pixel data is compressed as {uid.name}, which cmdeploy cannot decode"
        ) from None
    if not ok:
        raise InputError(
            f"'{h.path}': pixel data is compressed ({uid.name}) and no decoder for it is "
            f"installed; install one with: {DICOM_EXTRA_HINT}"
        )


def _sanitise(message: str) -> str:
    """Drop quoted values from a pydicom message (they could carry header contents)."""
    return re.sub(r"'[^']*'", "'...'", message.splitlines()[0] if message else "")[:200]


def _check_image(h: _Header) -> None:
    """Per-file checks: CT, has single-frame greyscale pixels, sane size, decodable."""
    if h.modality != "CT":
        what = {"": "missing", "?": "malformed"}.get(h.modality, f"'{h.modality}'")
        raise InputError(f"'{h.path}': Modality is {what}; cmdeploy reads CT images only")
    if not h.has_pixels:
        raise InputError(f"'{h.path}': no pixel data (PixelData element missing)")
    if h.rows < 1 or h.columns < 1:
        raise InputError(f"'{h.path}': Rows/Columns missing or zero ({h.rows} x {h.columns})")
    if h.frames != 1:
        raise InputError(
            f"'{h.path}': multi-frame image ({h.frames} frames); only single-frame CT slices "
            "are supported"
        )
    if h.samples != 1 or not h.photometric.startswith("MONOCHROME"):
        raise InputError(
            f"'{h.path}': not a greyscale image (SamplesPerPixel {h.samples}, "
            f"PhotometricInterpretation {h.photometric or 'missing'})"
        )
    _check_decodable(h)


@_quiet_pydicom()
def load_dicom_hu(path: Path) -> np.ndarray:
    """Read one CT file's pixels as float32 (rows, columns) HU (rows = y, columns = x)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise InputError(
            f"'{path}': cannot read the DICOM file ({type(exc).__name__}); was it changed "
            "after the series was opened?"
        ) from None
    try:
        arr = ds.pixel_array
    except RuntimeError as exc:
        if "missing dependencies" in str(exc):
            raise InputError(
                f"'{path}': no decoder installed for its compressed pixel data; "
                f"install one with: {DICOM_EXTRA_HINT}"
            ) from None
        raise InputError(f"'{path}': cannot decode pixel data ({_sanitise(str(exc))})") from None
    except Exception as exc:
        raise InputError(
            f"'{path}': cannot decode pixel data ({type(exc).__name__}: {_sanitise(str(exc))})"
        ) from None
    if arr.ndim != 2:
        raise InputError(f"'{path}': pixel data has shape {arr.shape}, expected (rows, columns)")
    try:
        if "ModalityLUTSequence" in ds and "RescaleSlope" not in ds:
            from pydicom.pixels import apply_modality_lut

            return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except Exception as exc:
        raise InputError(
            f"'{path}': malformed rescale attributes ({type(exc).__name__})"
        ) from None
    if not (np.isfinite(slope) and np.isfinite(intercept)):
        raise InputError(f"'{path}': RescaleSlope/RescaleIntercept are not finite")
    out = arr.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def _spacing_xy(h: _Header) -> tuple[float, float] | None:
    """DICOM PixelSpacing is (row spacing, column spacing) = (y, x); return (x, y)."""
    return None if h.spacing is None else (h.spacing[1], h.spacing[0])


def read_dicom_file(path: str | Path, *, series_uid: str | None = None) -> Series:
    """Open one single-frame CT DICOM file as a one-slice Series (kind "dicom-file")."""
    from pydicom.errors import InvalidDicomError

    p = Path(path)
    try:
        h = _read_header(p)
    except InvalidDicomError:
        raise InputError(
            f"'{p}': not a DICOM file (no 'DICM' marker) and not a .nii/.nii.gz/.png/.npy file"
        ) from None
    if h.is_dicomdir:
        raise InputError(f"'{p}' is a DICOMDIR index; give the folder holding the series instead")
    if series_uid is not None and h.series_uid != series_uid:
        raise InputError(f"'{p}' does not belong to the requested series_uid")
    _check_image(h)
    return Series(
        kind="dicom-file",
        path=p,
        num_slices=1,
        shape=(h.rows, h.columns),
        spacing_xy_mm=_spacing_xy(h),
        slice_uids=(h.sop_uid,),
        loader=lambda _k: load_dicom_hu(p),
        files=(p,),
        positions_mm=None if h.position is None else h.position[None].copy(),
        orientation=h.orientation,
        series_uid=h.series_uid or None,
    )


def _scan_folder(folder: Path) -> tuple[list[_Header], int]:
    """Headers of the image files under ``folder`` (recursive) and the number skipped."""
    from pydicom.errors import InvalidDicomError

    headers: list[_Header] = []
    skipped = 0
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or any(part.startswith(".") for part in f.relative_to(folder).parts):
            continue
        try:
            h = _read_header(f)
        except InvalidDicomError:
            skipped += 1
            continue
        if h.is_dicomdir or h.modality in _IGNORED_MODALITIES:
            skipped += 1
            continue
        if not h.has_pixels and (not h.series_uid or h.modality in ("", "?")):
            raise InputError(
                f"'{f}': incomplete DICOM file (no pixel data, no SeriesInstanceUID or Modality); "
                "truncated? Restore the file or move it out of the folder"
            )
        headers.append(h)
    return headers, skipped


def _select_series(folder: Path, headers: list[_Header], series_uid: str | None) -> list[_Header]:
    groups: dict[str, list[_Header]] = {}
    for h in headers:
        groups.setdefault(h.series_uid, []).append(h)
    if series_uid is not None:
        if series_uid not in groups:
            raise InputError(
                f"'{folder}': none of its {len(headers)} DICOM files belongs to the requested "
                f"series_uid ({len(groups)} series found)"
            )
        return groups[series_uid]
    if len(groups) > 1:
        lines = []
        for i, members in enumerate(sorted(groups.values(), key=lambda m: str(m[0].path)), 1):
            mods = ", ".join(f"{m or '?'}" for m in sorted(Counter(h.modality for h in members)))
            example = members[0].path.relative_to(folder)
            n = len(members)
            lines.append(
                f"  series {i}: {n} file{'s' * (n != 1)}, modality {mods}, e.g. '{example}'"
            )
        raise InputError(
            f"'{folder}' holds {len(groups)} DICOM series:\n" + "\n".join(lines) + "\n"
            "Pass series_uid (--series-uid; the SeriesInstanceUID (0020,000E) of the one to read, see any of "
            "its files) or point at a folder that holds one series only."
        )
    return next(iter(groups.values()))


def _check_consistent(members: list[_Header]) -> None:
    ref = members[0]
    for h in members[1:]:
        if (h.rows, h.columns) != (ref.rows, ref.columns):
            raise InputError(
                f"'{h.path}': Rows x Columns {h.rows} x {h.columns} differ from "
                f"{ref.rows} x {ref.columns} in '{ref.path}'"
            )
        if (h.spacing is None) != (ref.spacing is None) or (
            h.spacing is not None
            and not np.allclose(h.spacing, ref.spacing, rtol=1e-4, atol=1e-6)  # type: ignore[arg-type]
        ):
            raise InputError(
                f"'{h.path}': PixelSpacing {h.spacing} differs from {ref.spacing} in '{ref.path}'"
            )
        if not np.allclose(h.orientation, ref.orientation, atol=_ORIENTATION_TOL):  # type: ignore[arg-type]
            raise InputError(
                f"'{h.path}': ImageOrientationPatient differs from '{ref.path}'; "
                "a series must have one orientation"
            )


def _check_gaps(ordered: list[_Header], dist: np.ndarray) -> None:
    """Refuse a step between neighbouring slices of more than 1.5 times the median step."""
    if len(ordered) < 3:
        return
    steps = np.diff(dist)
    usual = float(np.median(steps))
    big = np.nonzero(steps > _GAP_FACTOR * usual + _GAP_TOL_MM)[0]
    if big.size == 0:
        return
    i = int(big[0])
    a, b = ordered[i], ordered[i + 1]
    missing = max(int(round(steps[i] / usual)) - 1, 1) if usual > 0 else 1
    raise InputError(
        f"gap in the slice positions: {dist[i]:.2f} mm ('{a.path}') to {dist[i + 1]:.2f} mm "
        f"('{b.path}') is {steps[i]:.2f} mm, the usual spacing is {usual:.2f} mm "
        f"(about {missing} slice(s) missing{f'; {big.size} gaps in all' if big.size > 1 else ''}). "
        "slice_index would skip the missing slice(s); restore them, or pass --allow-gaps "
        "(allow_gaps=True) to number the slices present"
    )


def _sort_by_normal(members: list[_Header], *, allow_gaps: bool = False) -> list[_Header]:
    for h in members:
        if h.position is None or h.orientation is None:
            raise InputError(
                f"'{h.path}': ImagePositionPatient/ImageOrientationPatient missing or malformed; "
                "cannot order the slices of the series"
            )
    _check_consistent(members)
    iop = members[0].orientation
    normal = np.cross(iop[:3], iop[3:])  # type: ignore[index]
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise InputError(f"'{members[0].path}': ImageOrientationPatient is degenerate")
    normal /= norm
    dist = np.array([float(h.position @ normal) for h in members])  # type: ignore[operator]
    order = np.argsort(dist, kind="stable")
    gaps = np.diff(dist[order])
    dup = np.nonzero(gaps < _DUPLICATE_TOL_MM)[0]
    if dup.size:
        a, b = members[order[dup[0]]], members[order[dup[0] + 1]]
        raise InputError(
            f"'{a.path}' and '{b.path}' lie at the same position along the slice normal "
            f"({dist[order[dup[0]]]:.3f} mm); duplicate slices in one series"
        )
    ordered = [members[i] for i in order]
    if not allow_gaps:
        _check_gaps(ordered, dist[order])
    return ordered


def read_dicom_series(
    folder: str | Path, *, series_uid: str | None = None, allow_gaps: bool = False
) -> Series:
    """Open the CT series in ``folder`` (scanned recursively) as a Series (kind "dicom-series").

    Several series in the folder: pass ``series_uid`` to pick one (otherwise InputError lists them
    by file count, modality and an example file name). Slices are sorted along the slice normal;
    a gap in their positions is refused unless ``allow_gaps``.
    """
    p = Path(folder)
    headers, skipped = _scan_folder(p)
    if not headers:
        raise InputError(
            f"'{p}': no DICOM image files found ({skipped} other files skipped; "
            "non-DICOM files, DICOMDIR and SEG/RTSTRUCT/SR objects are ignored)"
        )
    members = _select_series(p, headers, series_uid)
    for h in members:
        _check_image(h)
    if len(members) > 1:
        members = _sort_by_normal(members, allow_gaps=allow_gaps)
    ref = members[0]
    files = tuple(h.path for h in members)
    positions = (
        np.stack([h.position for h in members]).astype(np.float64)  # type: ignore[misc]
        if all(h.position is not None for h in members)
        else None
    )
    return Series(
        kind="dicom-series",
        path=p,
        num_slices=len(members),
        shape=(ref.rows, ref.columns),
        spacing_xy_mm=_spacing_xy(ref),
        slice_uids=tuple(h.sop_uid for h in members),
        loader=lambda k: load_dicom_hu(files[k]),
        files=files,
        positions_mm=positions,
        orientation=ref.orientation,
        series_uid=ref.series_uid or None,
    )
