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

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cmdeploy import __version__
from cmdeploy.errors import InputError
from cmdeploy.writers import SegmentedObject, check_objects, label_values
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


def read_source_headers(series: Series) -> list[Any]:
    """The source datasets of ``series`` (no pixel data), in slice order, checked against it."""
    import pydicom

    if series.kind not in ("dicom-series", "dicom-file") or not series.files:
        raise InputError(
            f"'{series.path}': DICOM SEG output needs a DICOM input (got a {series.kind} input); "
            "write NIfTI output instead"
        )
    datasets = []
    for k, f in enumerate(series.files):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as exc:
            raise InputError(f"'{f}': cannot reread the source DICOM header ({type(exc).__name__})") from None
        uid = series.slice_uids[k]
        if uid is not None and str(ds.get("SOPInstanceUID", "")) != uid:
            raise InputError(f"'{f}': the file changed after the series was opened (other SOPInstanceUID)")
        for keyword in _TYPE2_COPIED:  # type 2 in the source IODs, but often absent in real files
            if keyword not in ds:
                setattr(ds, keyword, "")  # in memory only: the input file is never modified
        datasets.append(ds)
    return datasets


def segment_descriptions(values: Mapping[str, int], *, algorithm_version: str = __version__) -> list[Any]:
    """highdicom SegmentDescriptions for a label -> segment number map (numbers 1..K)."""
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, version=str(algorithm_version), family=codes.DCM.ArtificialIntelligence
    )
    descs = []
    for label, number in sorted(values.items(), key=lambda kv: kv[1]):
        pc = property_codes(label)
        desc = hd.seg.SegmentDescription(
            segment_number=int(number),
            segment_label=str(label)[:64],
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
    ``source_datasets`` replaces rereading ``series.files`` (same order as the slices).
    """
    hd = _highdicom()
    from pydicom.uid import generate_uid

    if not objects:
        raise ValueError("no objects to write: a DICOM SEG needs at least one segment")
    masks = check_objects(objects, series.num_slices, series.shape)
    values = dict(values) if values is not None else label_values(objects)
    numbers = sorted(values.values())
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(f"segment numbers must be 1..{len(numbers)}, got {numbers}")
    sources = list(source_datasets) if source_datasets is not None else read_source_headers(series)
    if len(sources) != series.num_slices:
        raise ValueError(f"{len(sources)} source datasets for a series of {series.num_slices} slices")

    annotated = sorted({int(o.slice_index) for o in objects})
    row = {k: i for i, k in enumerate(annotated)}
    h, w = series.shape
    stack = np.zeros((len(annotated), h, w, len(numbers)), dtype=np.uint8)
    for obj, mask in zip(objects, masks, strict=True):
        label = str(obj.label)
        if label not in values:
            raise ValueError(f"label {label!r} has no segment number in `values`")
        stack[row[int(obj.slice_index)], :, :, values[label] - 1] |= mask

    have_positions = all("ImagePositionPatient" in ds for ds in sources)
    if have_positions:
        plane_positions = [
            hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, sources[k].ImagePositionPatient)
            for k in annotated
        ]
    else:  # no patient geometry: frames must correspond one to one with the source images
        plane_positions = None
        full = np.zeros((series.num_slices, h, w, len(numbers)), dtype=np.uint8)
        full[annotated] = stack
        stack = full
    return hd.seg.Segmentation(
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
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return values
