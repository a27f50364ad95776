"""DICOM Segmentation (SEG) output via highdicom, referencing the source CT series.

One BINARY multi-frame SEG instance per run. Segments: one per distinct label, numbered by
:func:`cmdeploy.writers.label_values` (the NIfTI label values), ``SegmentLabel`` = the label text,
algorithm type SEMIAUTOMATIC (the user gives the extreme points), algorithm "cmdeploy" + version of
family "Artificial Intelligence" (DCM 123110), property category/type from
:mod:`cmdeploy.writers.snomed` (SNOMED CT organ codes, laterality modifier, generic "Tissue"
otherwise) and the overlay palette's colour. Objects of one label on one slice are merged;
different labels may overlap (BINARY segments are independent).

All source images of the series are referenced (their headers are reread from ``series.files``,
without pixel data); frames are written only for the annotated slices, placed by their
ImagePositionPatient, so highdicom records the source instance of each frame. Empty frames are
omitted. The SEG copies the source's patient and study modules, as DICOM requires: it carries
the same patient identifiers as its source, unlike ``report.json``.

highdicom is imported inside the functions; without it they raise :class:`InputError` naming the
``dicom`` extra.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cmdeploy import __version__
from cmdeploy.errors import InputError
from cmdeploy.writers import MaskCrop, SegmentedObject, check_objects, label_values
from cmdeploy.writers.atomic import atomic_path
from cmdeploy.writers.png_overlay import color_for_value
from cmdeploy.writers.snomed import property_codes

if TYPE_CHECKING:
    from cmdeploy.io.series import Series

DICOM_EXTRA_HINT = "pip install 'cmdeploy[dicom]'"
SERIES_DESCRIPTION = "cmdeploy segmentation - research use only"
CONTENT_DESCRIPTION = "Extreme-point guided segmentation, research use only"
CONTENT_LABEL = "CMDEPLOY"
MANUFACTURER = "cmdeploy"
MODEL_NAME = "cmdeploy extreme-point segmentation"
ALGORITHM_NAME = "cmdeploy"
DEFAULT_SERIES_NUMBER = 9001


def research_description(text: str, limit: int = 64) -> str:
    """``text`` cut to ``limit`` characters (DICOM LO) that still ends in "research use only"."""
    text = " ".join(str(text).split())
    if "research use only" in text.lower() and len(text) <= limit:
        return text
    suffix = " - research use only"
    return text[: limit - len(suffix)].rstrip() + suffix


def _highdicom() -> Any:
    try:
        import highdicom
    except ImportError:
        raise InputError(f"writing DICOM SEG output needs highdicom: {DICOM_EXTRA_HINT}") from None
    return highdicom


# Patient/study attributes that highdicom copies from the source images into the SEG. They are type 2
# (must be present, may be empty) in CT images, yet exported or anonymised series often drop them.
_TYPE2_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "StudyID", "AccessionNumber", "ReferringPhysicianName",
)
# What a SEG must reference; empty or malformed values make it unusable (and crash highdicom).
_REFERENCE_UIDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
_UID_TEXT = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_ENUMERATED = {"PatientSex": {"M", "F", "O", ""}}
NO_SEG_HINT = "a DICOM SEG cannot reference it: use --format png,nifti"
MAX_SEGMENT_LABEL = 64  # characters: SegmentLabel is a DICOM LO


def _valid_uid(value: object) -> bool:
    text = str(value or "")
    return 0 < len(text) <= 64 and _UID_TEXT.match(text) is not None


@dataclass
class SegSources:
    """The source headers a SEG references, checked and cleaned (:func:`prepare_sources`).

    Attributes:
        datasets: one pydicom Dataset per slice (no pixel data), in slice order.
        dropped: keywords of patient/study attributes whose values were invalid and left out of
            the SEG (emptied when DICOM requires them); never their values.
    """

    datasets: list[Any]
    dropped: list[str] = field(default_factory=list)


def check_seg_references(datasets: Sequence[Any], *, where: str = "series") -> None:
    """Raise :class:`InputError` unless every dataset has valid SOP Class, SOP Instance, Series
    and Study Instance UIDs, one study, and a SOP Class that a SEG can reference.

    This guard runs before any SEG is built or written (by :func:`build_dicom_seg` and by
    ``infer`` before inference): a SEG whose referenced UIDs are empty is never written. Messages
    count the files and name the attributes, never the values.
    """
    from highdicom._standard_utils import get_sop_class_iod_map

    if not datasets:
        raise InputError(f"{where}: no source images to reference; {NO_SEG_HINT}")
    bad: dict[str, int] = {}
    for ds in datasets:
        for kw in _REFERENCE_UIDS:
            if not _valid_uid(ds.get(kw, "")):
                bad[kw] = bad.get(kw, 0) + 1
    n = len(datasets)
    if bad:
        what = ", ".join(f"{kw} ({k} of {n} files)" for kw, k in bad.items())
        raise InputError(
            f"{where}: missing or malformed UIDs: {what}; this series has no usable SOP Class/"
            f"Instance UIDs, so {NO_SEG_HINT}"
        )
    known = get_sop_class_iod_map()
    unknown = sum(str(ds.SOPClassUID) not in known for ds in datasets)
    if unknown:
        raise InputError(
            f"{where}: SOPClassUID of {unknown} of {n} files is not a standard image storage class "
            f"(private or unknown); {NO_SEG_HINT}"
        )
    if len({str(ds.StudyInstanceUID) for ds in datasets}) > 1:
        raise InputError(f"{where}: the files belong to more than one study; {NO_SEG_HINT}")


def _copied_keywords(ds: Any) -> list[str]:
    """Root-level attributes of the Patient and Study modules highdicom copies from ``ds``."""
    from highdicom._standard_utils import (
        get_iod_module_map,
        get_module_attribute_map,
        get_sop_class_iod_map,
    )

    iod = get_sop_class_iod_map().get(str(ds.get("SOPClassUID", "")), "ct-image")
    attrs = get_module_attribute_map()
    out = []
    for module in get_iod_module_map().get(iod, []):
        if module["ie"] in ("Patient", "Study"):
            out += [str(a["keyword"]) for a in attrs[module["key"]] if not a["path"]]
    return out


def _valid_value(elem: Any, vr: str, keyword: str) -> bool:
    """True when ``elem``'s value is valid for ``vr`` (pydicom's strict rules, real dates/times)."""
    from pydicom import config
    from pydicom.valuerep import DA, DT, TM, validate_value

    value = elem.value
    if value is None or value == "":
        return True
    from pydicom.multival import MultiValue

    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        for v in values:
            text = v.original_string if hasattr(v, "original_string") and v.original_string else v
            validate_value(vr, text, config.RAISE)
            if vr in ("DA", "TM", "DT") and str(text).strip():
                {"DA": DA, "TM": TM, "DT": DT}[vr](str(text).strip())
        allowed = _ENUMERATED.get(keyword)
        if allowed is not None and any(str(v).strip() not in allowed for v in values):
            return False
    except Exception:
        return False
    return True


def clean_patient_study(ds: Any) -> list[str]:
    """Make the patient/study attributes highdicom will copy from ``ds`` valid, in memory.

    An attribute whose value is malformed for its DICOM value representation (a date like
    "03/14/1961", PatientSex "male", a 70-character name) or stored with a VR other than the
    dictionary's is emptied when DICOM requires it (type 2) and removed otherwise; sequences are
    kept only when every value in them is valid. Returns the keywords changed, never the values.
    """
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    changed: list[str] = []
    for keyword in _copied_keywords(ds):
        tag = tag_for_keyword(keyword)
        if tag is None or tag not in ds:
            continue
        elem = ds[tag]
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        valid = _valid_sequence(elem) if vr == "SQ" else _valid_value(elem, vr, keyword)
        if elem.VR == vr and valid:
            continue
        changed.append(keyword)
        del ds[tag]
        if keyword in _TYPE2_COPIED:
            setattr(ds, keyword, "")
    for keyword in _TYPE2_COPIED:  # type 2 in the source IODs, but often absent in real files
        if keyword not in ds:
            setattr(ds, keyword, "")  # in memory only: the input file is never modified
    return changed


def _valid_sequence(elem: Any) -> bool:
    from pydicom.datadict import dictionary_VR

    for item in elem.value:
        for sub in item:
            try:
                vr = dictionary_VR(sub.tag)
            except KeyError:
                return False
            if sub.VR != vr:
                return False
            if vr == "SQ":
                if not _valid_sequence(sub):
                    return False
            elif not _valid_value(sub, vr, sub.keyword):
                return False
    return True


def read_source_headers(series: Series) -> list[Any]:
    """The source datasets of ``series`` (no pixel data), in slice order, checked against it."""
    return prepare_sources(series).datasets


def prepare_sources(series: Series) -> SegSources:
    """Reread, check (:func:`check_seg_references`) and clean (:func:`clean_patient_study`) the
    source headers of a DICOM ``series``; :class:`InputError` when a SEG cannot reference them.

    Cheap (headers only); ``infer`` calls it before inference so that a SEG that cannot be
    written is refused before the work.
    """
    import pydicom

    if series.kind not in ("dicom-series", "dicom-file") or not series.files:
        raise InputError(
            f"'{series.path}': DICOM SEG output needs a DICOM input (got a {series.kind} input); "
            "write NIfTI output instead"
        )
    _highdicom()
    datasets = []
    for k, f in enumerate(series.files):
        try:
            with _quiet():
                ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as exc:
            raise InputError(f"'{f}': cannot reread the source DICOM header ({type(exc).__name__})") from None
        uid = series.slice_uids[k]
        if uid is not None and str(ds.get("SOPInstanceUID", "")) != uid:
            raise InputError(f"'{f}': the file changed after the series was opened (other SOPInstanceUID)")
        datasets.append(ds)
    return _checked_sources(datasets, where=f"'{series.path}'")


def _checked_sources(datasets: Sequence[Any], *, where: str) -> SegSources:
    with _quiet():
        check_seg_references(datasets, where=where)
        dropped: list[str] = []
        for ds in datasets:
            for kw in clean_patient_study(ds):
                if kw not in dropped:
                    dropped.append(kw)
    return SegSources(list(datasets), dropped)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence pydicom's value warnings (they echo header values) while reading and checking."""
    import warnings

    from pydicom import config

    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        config.settings.reading_validation_mode = old


def segment_labels(values: Mapping[str, int]) -> dict[str, str]:
    """The SegmentLabel of each label: the label itself when it fits 64 characters (DICOM LO),
    otherwise its first 55 characters, ``~`` and 8 hex digits of its SHA-256, so two long labels
    with a common start stay distinct. Backslashes (the DICOM value separator) become ``/``.

    Raises :class:`InputError` for labels with control characters or line breaks.
    """
    import hashlib

    from cmdeploy.points_csv import label_problem

    out: dict[str, str] = {}
    for label in values:
        problem = label_problem(str(label))
        if problem:
            raise InputError(f"SEG segment {values[label]}: {problem}")
        text = str(label).replace("\\", "/")
        if len(text) > MAX_SEGMENT_LABEL:
            digest = hashlib.sha256(str(label).encode("utf-8")).hexdigest()[:8]
            text = f"{text[: MAX_SEGMENT_LABEL - 9].rstrip()}~{digest}"
        out[label] = text
    if len(set(out.values())) != len(out):
        raise InputError("two labels map to the same DICOM segment label; rename one of them")
    return out


def segment_descriptions(values: Mapping[str, int], *, algorithm_version: str = __version__) -> list[Any]:
    """highdicom SegmentDescriptions for a label -> segment number map (numbers 1..K)."""
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, version=str(algorithm_version), family=codes.DCM.ArtificialIntelligence
    )
    descs = []
    names = segment_labels(values)
    for label, number in sorted(values.items(), key=lambda kv: kv[1]):
        pc = property_codes(label)
        desc = hd.seg.SegmentDescription(
            segment_number=int(number),
            segment_label=names[label],
            segmented_property_category=pc.category,
            segmented_property_type=pc.type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*color_for_value(number)),
        )
        if pc.modifier is not None:
            item = desc.SegmentedPropertyTypeCodeSequence[0]
            item.SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(pc.modifier.value, pc.modifier.scheme_designator, pc.modifier.meaning)
            ]
        descs.append(desc)
    return descs


def _object_mask(obj: SegmentedObject, i: int, series: Series) -> MaskCrop:
    """Object ``i``'s mask cut to its box, checked like :func:`cmdeploy.writers.check_objects`."""
    try:
        return check_objects([obj], series.num_slices, series.shape)[0]
    except ValueError as exc:
        raise ValueError(str(exc).replace("object 0", f"object {i}", 1)) from None


def _label_frames(
    objects: Sequence[SegmentedObject], values: Mapping[str, int], annotated: list[int], series: Series
) -> np.ndarray:
    """The SEG pixel array: a (F, H, W) label map (pixel = segment number) when no two labels
    overlap, else one-hot (F, H, W, K) uint8. One object's mask is in memory at a time."""
    h, w = series.shape
    row = {k: i for i, k in enumerate(annotated)}
    dtype = np.uint8 if len(values) <= np.iinfo(np.uint8).max else np.uint16
    frames = np.zeros((len(annotated), h, w), dtype=dtype)
    for i, obj in enumerate(objects):
        label = str(obj.label)
        if label not in values:
            raise ValueError(f"label {label!r} has no segment number in `values`")
        mc = _object_mask(obj, i, series)
        frame = frames[row[int(obj.slice_index)]][mc.window]
        v = values[label]
        taken = frame[mc.crop]
        if np.any((taken != 0) & (taken != v)):
            break
        frame[mc.crop] = v
    else:
        return frames
    del frames  # overlapping labels: BINARY segments are independent, so one plane per segment
    stack = np.zeros((len(annotated), h, w, len(values)), dtype=np.uint8)
    for i, obj in enumerate(objects):
        mc = _object_mask(obj, i, series)
        stack[row[int(obj.slice_index)], :, :, values[str(obj.label)] - 1][mc.window] |= mc.crop
    return stack


def check_written_references(seg: Any) -> None:
    """Raise :class:`InputError` unless a built SEG references its study, series and every source
    instance by valid, non-empty UIDs (the last guard before a SEG is written)."""
    problems = []
    if not _valid_uid(seg.get("StudyInstanceUID", "")):
        problems.append("StudyInstanceUID")
    refs = seg.get("ReferencedSeriesSequence") or []
    if not refs:
        problems.append("ReferencedSeriesSequence")
    for item in refs:
        if not _valid_uid(item.get("SeriesInstanceUID", "")):
            problems.append("referenced SeriesInstanceUID")
        instances = item.get("ReferencedInstanceSequence") or []
        if not instances:
            problems.append("ReferencedInstanceSequence")
        for inst in instances:
            for kw in ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID"):
                if not _valid_uid(inst.get(kw, "")):
                    problems.append(kw)
    if problems:
        raise InputError(
            f"the DICOM SEG would carry empty or malformed references ({', '.join(sorted(set(problems)))}); "
            f"not written: {NO_SEG_HINT}"
        )


def build_dicom_seg(
    series: Series,
    objects: Sequence[SegmentedObject],
    *,
    values: Mapping[str, int] | None = None,
    series_number: int = DEFAULT_SERIES_NUMBER,
    series_description: str = SERIES_DESCRIPTION,
    algorithm_version: str = __version__,
    source_datasets: Sequence[Any] | None = None,
) -> Any:
    """The ``highdicom.seg.Segmentation`` of ``objects`` over a DICOM ``series`` (not written).

    ``values`` maps label -> segment number (default :func:`label_values`; numbers must be 1..K).
    ``source_datasets`` replaces rereading ``series.files`` (same order as the slices): a
    :class:`SegSources` from :func:`prepare_sources`, or plain datasets, which are then checked and
    cleaned the same way (in memory). Whatever the sources, :func:`check_seg_references` runs
    first and :func:`check_written_references` last: a SEG with empty references is never built.
    The SEG's character set is UTF-8 (ISO_IR 192), so non-ASCII labels and names survive.
    """
    hd = _highdicom()
    from pydicom.uid import generate_uid

    if not objects:
        raise ValueError("no objects to write: a DICOM SEG needs at least one segment")
    values = dict(values) if values is not None else label_values(objects)
    numbers = sorted(values.values())
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(f"segment numbers must be 1..{len(numbers)}, got {numbers}")
    if source_datasets is None:
        sources = prepare_sources(series).datasets
    elif isinstance(source_datasets, SegSources):
        sources = source_datasets.datasets
        with _quiet():
            check_seg_references(sources)
    else:
        sources = _checked_sources(list(source_datasets), where="source datasets").datasets
    if len(sources) != series.num_slices:
        raise ValueError(f"{len(sources)} source datasets for a series of {series.num_slices} slices")

    annotated = sorted({int(o.slice_index) for o in objects})
    h, w = series.shape
    stack = _label_frames(objects, values, annotated, series)

    have_positions = all("ImagePositionPatient" in ds for ds in sources)
    if have_positions:
        plane_positions = [
            hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, sources[k].ImagePositionPatient)
            for k in annotated
        ]
    else:  # no patient geometry: frames must correspond one to one with the source images
        plane_positions = None
        full = np.zeros((series.num_slices, *stack.shape[1:]), dtype=stack.dtype)
        full[annotated] = stack
        stack = full
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=stack,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(values, algorithm_version=algorithm_version),
        series_instance_uid=generate_uid(),
        series_number=int(series_number),
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=str(__version__),
        device_serial_number="none",
        content_label=CONTENT_LABEL,
        content_description=CONTENT_DESCRIPTION,
        plane_positions=plane_positions,
        series_description=research_description(series_description),
    )
    seg.SpecificCharacterSet = "ISO_IR 192"
    check_written_references(seg)
    return seg


def write_dicom_seg(
    path: str | Path,
    series: Series,
    objects: Sequence[SegmentedObject],
    **kwargs: Any,
) -> dict[str, int]:
    """Build (:func:`build_dicom_seg`, same keyword arguments) and write the SEG atomically.

    Returns the label -> segment number map used.
    """
    values = dict(kwargs.pop("values", None) or label_values(objects))
    seg = build_dicom_seg(series, objects, values=values, **kwargs)
    check_written_references(seg)
    with atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return values
