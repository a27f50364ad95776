"""SNOMED CT codes for object labels, for DICOM SEG segment descriptions.

:func:`property_codes` turns a free-text label (``"heart"``, ``"Kidney_Left"``, ``"vertebrae L1"``)
into a segmented property category, type and optional laterality modifier. Codes come from
pydicom's DICOM code dictionary (``pydicom.sr.codedict.codes.SCT.<Name>``), not typed by hand.

Label normalisation: lower case, ``_ - / , .`` become spaces, whitespace collapsed. A ``left`` /
``right`` word (or ``l`` / ``r`` / ``lt`` / ``rt``) anywhere in the label becomes the laterality
modifier (SCT Left 7771000 / Right 24028007, DICOM's SegmentedPropertyTypeModifierCodeSequence) and
is removed before the organ lookup. Labels starting with ``vertebra``/``vertebrae`` (``vertebrae L1``)
map to Vertebra. Known organs get category "Anatomical Structure"; any other label gets the generic
category "Tissue" and type "Tissue" (the label text itself stays in SegmentLabel).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# normalised organ name -> attribute of pydicom's ``codes.SCT``
ORGAN_CODE_NAMES: dict[str, str] = {
    "heart": "Heart",
    "aorta": "Aorta",
    "liver": "Liver",
    "spleen": "Spleen",
    "kidney": "Kidney",
    "kidneys": "Kidney",
    "pancreas": "Pancreas",
    "stomach": "Stomach",
    "esophagus": "Esophagus",
    "oesophagus": "Esophagus",
    "trachea": "Trachea",
    "lung": "Lung",
    "lungs": "Lung",
    "pulmonary artery": "PulmonaryArtery",
    "pulmonary arteries": "PulmonaryArtery",
    "gallbladder": "Gallbladder",
    "gall bladder": "Gallbladder",
    "urinary bladder": "Bladder",
    "bladder": "Bladder",
    "vertebra": "Vertebra",
    "vertebrae": "Vertebra",
    "colon": "Colon",
    "small bowel": "SmallIntestine",
    "small intestine": "SmallIntestine",
    "large bowel": "LargeIntestine",
    "large intestine": "LargeIntestine",
    "duodenum": "Duodenum",
    "rectum": "Rectum",
    "prostate": "Prostate",
    "spinal cord": "SpinalCord",
    "adrenal": "AdrenalGland",
    "adrenal gland": "AdrenalGland",
    "inferior vena cava": "InferiorVenaCava",
    "ivc": "InferiorVenaCava",
    "portal vein": "PortalVein",
    "brain": "Brain",
    "sternum": "Sternum",
    "rib": "Rib",
    "ribs": "Rib",
    "femur": "Femur",
    "thyroid": "Thyroid",
    "thyroid gland": "Thyroid",
    "uterus": "Uterus",
    "bone": "Bone",
    "muscle": "Muscle",
}
_PREFIX_CODE_NAMES = {"vertebra": "Vertebra", "vertebrae": "Vertebra"}
_LATERALITY = {"left": "Left", "l": "Left", "lt": "Left", "right": "Right", "r": "Right", "rt": "Right"}
KNOWN_CATEGORY = "AnatomicalStructure"
GENERIC_CATEGORY = "Tissue"
GENERIC_TYPE = "Tissue"


@dataclass(frozen=True)
class PropertyCodes:
    """Coded meaning of one label (pydicom ``Code`` objects, accepted by highdicom).

    Attributes:
        category: segmented property category (CID 7150).
        type: segmented property type (CID 7151 for organs).
        modifier: laterality modifier (Left/Right) or None.
        known: True when the label named an organ of the table.
    """

    category: Any
    type: Any
    modifier: Any | None
    known: bool


def normalise_label(label: str) -> str:
    """Lower case, ``_-/,.`` to spaces, whitespace collapsed."""
    return " ".join(re.sub(r"[_\-/,.]+", " ", str(label).lower()).split())


def split_laterality(label: str) -> tuple[str, str | None]:
    """``("kidney", "Left")`` for ``"kidney_left"``; the laterality is None when absent or ambiguous."""
    words = normalise_label(label).split()
    sides = {_LATERALITY[w] for w in words if w in _LATERALITY}
    rest = [w for w in words if w not in _LATERALITY]
    if len(sides) != 1 or not rest:
        return " ".join(words), None
    return " ".join(rest), sides.pop()


def organ_code_name(label: str) -> tuple[str | None, str | None]:
    """(``codes.SCT`` attribute name or None, laterality ``"Left"``/``"Right"`` or None)."""
    base, side = split_laterality(label)
    name = ORGAN_CODE_NAMES.get(base)
    if name is None:
        first = base.split(" ", 1)[0] if base else ""
        name = _PREFIX_CODE_NAMES.get(first)
    if name is None:
        return None, None
    return name, side


def property_codes(label: str) -> PropertyCodes:
    """Segmented property category/type/modifier codes for ``label`` (generic when unknown)."""
    from pydicom.sr.codedict import codes

    name, side = organ_code_name(label)
    if name is None:
        return PropertyCodes(
            category=getattr(codes.SCT, GENERIC_CATEGORY),
            type=getattr(codes.SCT, GENERIC_TYPE),
            modifier=None,
            known=False,
        )
    return PropertyCodes(
        category=getattr(codes.SCT, KNOWN_CATEGORY),
        type=getattr(codes.SCT, name),
        modifier=None if side is None else getattr(codes.SCT, side),
        known=True,
    )
