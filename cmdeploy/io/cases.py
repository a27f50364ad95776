"""Labelled cases on disk: the one case layout of training, calibration and evaluation.

A case is one CT volume and its label volume on the same grid, plus an id -> name map. Layouts
(:data:`LAYOUTS`, tried in this order):

* ``case-folder``: ``<root>/<case>/image.nii.gz`` + ``labels.nii.gz`` (``label.*`` also accepted),
  names in ``<case>/labels.json`` or ``<root>/labels.json`` (the ``ct-organs`` and ``ct-tumours``
  data sets); ``<root>`` may also be one such case folder;
* ``segthor``: ``<root>/Patient_XX/Patient_XX.nii.gz`` + ``GT.nii.gz`` (names default to
  :data:`SEGTHOR_LABELS`);
* ``flat``: ``<root>/<name>_image.nii.gz`` + ``<name>_label.nii.gz`` (or ``_labels``);
* ``split``: ``<root>/images/<name>.nii.gz`` + ``<root>/labels/<name>.nii.gz``;
* ``file``: one image file with its label volume given as ``reference``.

With ``require_labels=False`` (:func:`find_cases`; ``generate-labels`` on unlabelled data) a case
needs only its image (``image.*``, ``<name>_image.*`` or ``images/<name>.*``) and ``labels`` is None
when there is no label volume.

Volumes may be ``.nii.gz``, ``.nii`` or ``.npy``. Discovery only looks at names; nothing is read
here but the small names JSON (so this module needs neither nibabel nor torch).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cmdeploy.errors import InputError

LAYOUTS = ("case-folder", "segthor", "flat", "split", "file")
EXTENSIONS = (".nii.gz", ".nii", ".npy")
NAMES_FILE = "labels.json"
SEGTHOR_LABELS: dict[int, str] = {1: "esophagus", 2: "heart", 3: "trachea", 4: "aorta"}
_EXPECTED = (
    "expected <case>/image.nii.gz + labels.nii.gz, Patient_XX/Patient_XX.nii.gz + GT.nii.gz, "
    "<name>_image.nii.gz + <name>_label.nii.gz, or images/ + labels/ folders"
)


@dataclass(frozen=True)
class Case:
    """One image + label volume pair.

    Attributes:
        name: case name (its folder name, or the image file name without extension).
        image: CT volume path; labels: label volume path on the same grid (None only for a case
            found with ``require_labels=False`` that has no label volume).
        names_file: JSON id -> name map, or None.
        default_names: names used when there is no ``names_file`` (SegTHOR's fixed ids).
    """

    name: str
    image: Path
    labels: Path | None
    names_file: Path | None = None
    default_names: dict[int, str] = field(default_factory=dict, compare=False)

    @property
    def label_names(self) -> dict[int, str]:
        """id -> name, read from ``names_file`` ({} / ``default_names`` without one)."""
        if self.names_file is not None:
            return load_label_names(self.names_file)
        return dict(self.default_names)

    @property
    def image_path(self) -> Path:  # the name training code uses
        return self.image

    @property
    def label_path(self) -> Path:  # the name training code uses
        if self.labels is None:
            raise InputError(f"case {self.name!r} has no label volume")
        return self.labels


def load_label_names(path: str | Path) -> dict[int, str]:
    """Read a JSON object mapping label id (number or numeric string) -> name; :class:`InputError`
    when it is unreadable, not an object, has a non-integer key, or a name that is empty, has '#'
    (the piece suffix of :func:`cmdeploy.points_csv.base_label`) or control characters/line breaks
    (:func:`cmdeploy.points_csv.label_problem`: the points CSV refuses them)."""
    from cmdeploy.points_csv import label_problem

    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"label names '{p}': cannot read as JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise InputError(f"label names '{p}': expected a JSON object {{id: name}}")
    out: dict[int, str] = {}
    for key, value in data.items():
        try:
            lid = int(key)
        except ValueError:
            raise InputError(f"label names '{p}': key {key!r} is not an integer id") from None
        if not isinstance(value, str) or not value.strip() or "#" in value:
            raise InputError(
                f"label names '{p}': name for id {lid} must be non-empty text without '#'"
            )
        problem = label_problem(value)
        if problem:
            raise InputError(f"label names '{p}': name for id {lid}: {problem}")
        out[lid] = value.strip()
    return out


def _stem(path: Path) -> str:
    """File name without its volume extension (the name itself when it has none of them)."""
    for ext in EXTENSIONS:
        if path.name.lower().endswith(ext):
            return path.name[: -len(ext)]
    return path.name


def _first(folder: Path, stem: str) -> Path | None:
    for ext in EXTENSIONS:
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def _names_near(*folders: Path) -> Path | None:
    for f in folders:
        p = f / NAMES_FILE
        if p.is_file():
            return p
    return None


def _case_in(folder: Path, parent: Path, require_labels: bool = True) -> Case | None:
    """The case-folder or SegTHOR case in ``folder`` (names next to it or in ``parent``)."""
    image = _first(folder, "image")
    labels = _first(folder, "labels") or _first(folder, "label")
    names = _names_near(folder, parent)
    if image is not None and (labels is not None or not require_labels):
        return Case(folder.name, image, labels, names)
    image, gt = _first(folder, folder.name), _first(folder, "GT")
    if image is not None and gt is not None:
        return Case(folder.name, image, gt, names, dict(SEGTHOR_LABELS))
    return None


def _flat_cases(root: Path, require_labels: bool = True) -> list[Case]:
    names = _names_near(root)
    found = []
    for p in sorted(root.iterdir()):
        stem = _stem(p)
        if p.is_file() and stem != p.name and stem.endswith("_image"):
            base = stem[: -len("_image")]
            lab = _first(root, f"{base}_label") or _first(root, f"{base}_labels")
            if lab is not None or not require_labels:
                found.append(Case(base, p, lab, names))
    img_dir, lab_dir = root / "images", root / "labels"
    if not found and img_dir.is_dir() and (lab_dir.is_dir() or not require_labels):
        for p in sorted(img_dir.iterdir()):
            stem = _stem(p)
            lab = _first(lab_dir, stem) if stem != p.name and lab_dir.is_dir() else None
            if stem != p.name and (lab is not None or not require_labels):
                found.append(Case(stem, p, lab, names))
    return found


def discover_cases(root: str | Path, *, require_labels: bool = True) -> list[Case]:
    """The cases in folder ``root``, sorted by name; [] when it holds none (or is not a folder).

    ``require_labels=False`` also keeps image-only cases (their ``labels`` is None)."""
    root = Path(root)
    if not root.is_dir():
        return []
    one = _case_in(root, root.parent, require_labels)
    if one is not None:
        return [one]
    subs = sorted(p for p in root.iterdir() if p.is_dir())
    found = [c for sub in subs if (c := _case_in(sub, root, require_labels))]
    found = found or _flat_cases(root, require_labels)
    seen: set[str] = set()
    for c in found:
        if c.name in seen:
            raise InputError(f"duplicate case name {c.name!r} under '{root}'")
        seen.add(c.name)
    return sorted(found, key=lambda c: c.name)


def find_cases(
    data: str | Path,
    *,
    cases: Sequence[str] | None = None,
    reference: str | Path | None = None,
    names_file: str | Path | None = None,
    require_labels: bool = True,
) -> list[Case]:
    """The cases under ``data`` (see the module docstring for the layouts).

    Args:
        data: a root of cases, one case folder, or an image file (then ``reference`` is its
            label volume).
        cases: keep only these case names (in this order); unknown names are an error.
        reference: label volume for an image-file ``data``.
        names_file: id -> name JSON overriding the ``labels.json`` found next to the data.
        require_labels: False = also image-only cases (``labels`` None), for labelling new data.

    Raises :class:`InputError` when nothing usable is found.
    """
    root = Path(data)
    names = Path(names_file) if names_file is not None else None
    if names is not None and not names.is_file():
        raise InputError(f"label names file '{names}' does not exist")
    if not root.exists():
        raise InputError(f"--data '{root}' does not exist")
    if root.is_file():
        if reference is None and not require_labels:
            return _select([Case(_stem(root), root, None, _names_near(root.parent))], names, cases)
        if reference is None:
            raise InputError(f"--data '{root}' is an image file: give its label volume with --reference")
        ref = Path(reference)
        if not ref.is_file():
            raise InputError(f"reference label volume '{ref}' does not exist")
        found = [Case(_stem(root), root, ref, _names_near(root.parent))]
    else:
        if reference is not None:
            raise InputError("--reference applies only when --data is an image file")
        found = discover_cases(root, require_labels=require_labels)
        if not found:
            raise InputError(f"--data '{root}': no cases found; {_EXPECTED}")
    return _select(found, names, cases)


def _select(found: list[Case], names: Path | None, cases: Sequence[str] | None) -> list[Case]:
    """``found`` with the names file ``names`` (if any), restricted to ``cases`` (in that order)."""
    if names is not None:
        found = [Case(c.name, c.image, c.labels, names) for c in found]
    if cases:
        by_name = {c.name: c for c in found}
        unknown = [c for c in cases if c not in by_name]
        if unknown:
            raise InputError(
                f"unknown case(s) {', '.join(map(repr, unknown))}; available: {', '.join(sorted(by_name))}"
            )
        found = [by_name[c] for c in dict.fromkeys(cases)]
    return found
