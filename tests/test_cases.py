"""The one case layout (:mod:`cmdeploy.io.cases`): every supported layout, the label names JSON and
the errors. Discovery looks at names only, so empty files stand in for volumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmdeploy.errors import InputError
from cmdeploy.io.cases import LAYOUTS, discover_cases, find_cases, load_label_names


def _touch(*paths: Path) -> None:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def test_every_layout(tmp_path: Path) -> None:
    assert LAYOUTS == ("case-folder", "segthor", "flat", "split", "file")
    # case-folder (ct-organs, ct-tumours): names in <root>/labels.json; label.* also accepted
    organs = tmp_path / "organs"
    _touch(organs / "b" / "image.nii.gz", organs / "b" / "labels.nii.gz")
    _touch(organs / "a" / "image.nii", organs / "a" / "label.nii")
    (organs / "labels.json").write_text(json.dumps({"1": "liver"}))
    a, b = find_cases(organs)
    assert (a.name, a.image.name, a.labels.name, a.names_file) == ("a", "image.nii", "label.nii",
                                                                   organs / "labels.json")
    assert b.label_names == {1: "liver"} and (b.image_path, b.label_path) == (b.image, b.labels)
    # one case folder on its own: names from its parent
    (one,) = find_cases(organs / "b")
    assert one.name == "b" and one.names_file == organs / "labels.json"
    # SegTHOR: fixed default names
    seg = tmp_path / "segthor"
    _touch(seg / "Patient_01" / "Patient_01.nii.gz", seg / "Patient_01" / "GT.nii.gz")
    (p1,) = find_cases(seg)
    assert p1.labels.name == "GT.nii.gz" and p1.label_names[2] == "heart" and p1.label_names[4] == "aorta"
    # flat and split
    flat = tmp_path / "flat"
    _touch(flat / "c0_image.nii.gz", flat / "c0_label.nii.gz")
    _touch(flat / "c1_image.nii.gz", flat / "c1_labels.nii.gz")
    assert [c.name for c in find_cases(flat)] == ["c0", "c1"]
    split = tmp_path / "split"
    _touch(split / "images" / "p0.nii.gz", split / "labels" / "p0.nii.gz")
    assert [(c.name, c.labels.parent.name) for c in find_cases(split)] == [("p0", "labels")]
    # one image file with its reference
    (f,) = find_cases(organs / "a" / "image.nii", reference=organs / "a" / "label.nii")
    assert f.name == "image" and f.labels.name == "label.nii"
    # a names file given explicitly overrides the one found
    names = tmp_path / "n.json"
    names.write_text(json.dumps({"1": "spleen"}))
    assert find_cases(organs, names_file=names)[0].label_names == {1: "spleen"}
    # selection keeps the given order
    assert [c.name for c in find_cases(organs, cases=["b", "a"])] == ["b", "a"]


def test_errors(tmp_path: Path) -> None:
    organs = tmp_path / "organs"
    _touch(organs / "case_a" / "image.nii.gz", organs / "case_a" / "labels.nii.gz")
    with pytest.raises(InputError, match="does not exist"):
        find_cases(tmp_path / "missing")
    with pytest.raises(InputError, match="no cases found"):
        find_cases(_empty(tmp_path))
    with pytest.raises(InputError, match="available: case_a"):
        find_cases(organs, cases=["nope"])
    with pytest.raises(InputError, match="--reference"):
        find_cases(organs / "case_a" / "image.nii.gz")
    with pytest.raises(InputError, match="only when --data is an image file"):
        find_cases(organs, reference=organs / "case_a" / "labels.nii.gz")
    with pytest.raises(InputError, match="does not exist"):
        find_cases(organs, names_file=tmp_path / "none.json")
    assert discover_cases(_empty(tmp_path)) == [] and discover_cases(tmp_path / "missing") == []


def _empty(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir(exist_ok=True)
    return d


def test_label_names(tmp_path: Path) -> None:
    p = tmp_path / "n.json"
    p.write_text(json.dumps({"5": " liver ", 52: "aorta"}))
    assert load_label_names(p) == {5: "liver", 52: "aorta"}
    for bad, match in (("[1, 2]", "JSON object"), ('{"x": "a"}', "not an integer"),
                       ('{"1": "a#b"}', "without '#'"), ('{"1": ""}', "non-empty"), ("{", "cannot read")):
        p.write_text(bad)
        with pytest.raises(InputError, match=match):
            load_label_names(p)


def test_image_only_cases_when_labels_are_not_required(tmp_path: Path) -> None:
    root = tmp_path / "new"
    _touch(root / "a" / "image.nii.gz", root / "b" / "image.nii.gz", root / "b" / "labels.nii.gz")
    assert [c.name for c in find_cases(root, require_labels=False)] == ["a", "b"]
    a, b = find_cases(root, require_labels=False)
    assert a.labels is None and b.labels == root / "b" / "labels.nii.gz"
    with pytest.raises(InputError, match="has no label volume"):
        _ = a.label_path
    assert [c.name for c in find_cases(root)] == ["b"]  # the default still needs labels
    flat = tmp_path / "flat"
    _touch(flat / "x_image.nii.gz", flat / "y_image.nii.gz", flat / "y_label.nii.gz")
    assert [(c.name, c.labels is None) for c in discover_cases(flat, require_labels=False)] == [
        ("x", True), ("y", False)]
    split = tmp_path / "split"
    _touch(split / "images" / "p.nii.gz")
    (p,) = find_cases(split, require_labels=False)
    assert (p.name, p.labels) == ("p", None)
    with pytest.raises(InputError, match="no cases found"):
        find_cases(split)
    (f,) = find_cases(split / "images" / "p.nii.gz", require_labels=False)
    assert (f.name, f.labels) == ("p", None)
