"""Points CSV: columns by name, every bad row reported at once with its line number."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmdeploy.errors import InputError
from cmdeploy.io import Series
from cmdeploy.points_csv import (
    POINT_COLUMNS,
    PointsRow,
    parse_points_csv,
    read_points_csv,
    write_points_csv,
)

H, W, N = 20, 30, 3
UIDS = ("1.2.826.0.1.111", "1.2.826.0.1.222", "1.2.826.0.1.333")
HEADER = "slice_index,sop_instance_uid,label," + ",".join(POINT_COLUMNS)


@pytest.fixture(scope="module")
def series() -> Series:
    return Series(
        kind="dicom-series",
        path=Path("fake"),
        num_slices=N,
        shape=(H, W),
        spacing_xy_mm=(1.0, 1.0),
        slice_uids=UIDS,
        loader=lambda k: np.zeros((H, W), np.float32),
    )


def _write(tmp_path: Path, text: str, name: str = "p.csv") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_columns_by_name_any_order_extra_ignored(tmp_path, series) -> None:
    text = (
        "Bottom_Y,bottom_x,note,TOP_Y,top_x,right_y,right_x,left_y,left_x,Label,SOP_Instance_UID\n"
        f"9,5,hello,1,5,5,8,5,2,liver,{UIDS[2]}\n"
        f"19,29,,0,0,0,29,19,0, aorta ,{UIDS[0]}\n"
    )
    rows = read_points_csv(_write(tmp_path, text), series)
    assert [(r.line, r.slice_index, r.label) for r in rows] == [(2, 2, "liver"), (3, 0, "aorta")]
    assert rows[0].points.dtype == np.float32 and rows[0].points.shape == (4, 2)
    np.testing.assert_array_equal(rows[0].points, [[2, 5], [8, 5], [5, 1], [5, 9]])
    assert rows[0].sop_instance_uid == UIDS[2]


def test_slice_index_and_uid_agree(series) -> None:
    text = f"{HEADER}\n1,{UIDS[1]},a,1,2,5,2,3,0,3,4\n2,,b,1,2,5,2,3,0,3,4\n"
    rows = parse_points_csv(text, series=series)
    assert [r.slice_index for r in rows] == [1, 2]


def test_every_bad_row_reported_with_line_numbers(tmp_path, series) -> None:
    good = "1,2,5,2,3,0,3,4"
    lines = [
        HEADER,  # 1
        f"0,,ok,{good}",  # 2: fine
        "0,,x1,abc,2,5,2,3,0,3,4",  # 3: not a number
        "0,,x2,nan,2,5,2,3,0,3,4",  # 4: not finite
        "0,,x3,1,2,30,2,3,0,3,4",  # 5: right_x outside (W-1 = 29)
        "0,,x4,1,2,5,2,3,0,3,20",  # 6: bottom_y outside (H-1 = 19)
        "0,,x5,6,2,5,2,3,0,3,4",  # 7: left_x > right_x
        "0,,x6,1,2,5,2,3,5,3,4",  # 8: top_y > bottom_y
        "0,,x7,3,3,3,3,3,3,3,3",  # 9: all identical
        f"7,,x8,{good}",  # 10: unknown slice
        f",1.9.9.9,x9,{good}",  # 11: uid not in series
        f"0,{UIDS[1]},x10,{good}",  # 12: index and uid disagree
        f"0,,ok,{good}",  # 13: duplicate of line 2
        f"0,,,{good}",  # 14: empty label
        f",,x11,{good}",  # 15: no slice
        f"1.5,,x12,{good}",  # 16: not a whole number
        "",  # 17: blank line, skipped
        f"-1,,x13,{good}",  # 18: negative slice
        f"0,,x14,{good},extra",  # 19: too many fields
    ]
    with pytest.raises(InputError) as exc:
        read_points_csv(_write(tmp_path, "\n".join(lines) + "\n"), series)
    msg = str(exc.value)
    assert "16 of 17 rows are invalid" in msg
    expected = {
        3: "left_x 'abc' is not a number",
        4: "left_x 'nan' is not finite",
        5: "right point (30, 2) is outside the 30x20 slice",
        6: "bottom point (3, 20) is outside",
        7: "left_x 6 > right_x 5",
        8: "top_y 5 > bottom_y 4",
        9: "all four points are identical",
        10: "slice_index 7 is outside the series (0..2)",
        11: "sop_instance_uid matches no slice",
        12: "slice_index 0 disagrees with sop_instance_uid (slice 1)",
        13: "duplicate of line 2 (slice 0, label 'ok')",
        14: "label is empty",
        15: "no slice_index or sop_instance_uid",
        16: "slice_index '1.5' is not a whole number",
        18: "slice_index -1 is outside",
        19: "12 fields but the header has 11",
    }
    reported = {int(m.group(1)): m.group(2) for m in re.finditer(r"line (\d+): (.*)", msg)}
    assert set(reported) == set(expected)
    for line, fragment in expected.items():
        assert fragment in reported[line], (line, reported[line])
    assert "1.9.9.9" not in msg and UIDS[1] not in msg  # UIDs never echoed


def test_missing_columns_listed_together(series) -> None:
    with pytest.raises(InputError) as exc:
        parse_points_csv("label,left_x,left_y,right_x\n", series=series)
    msg = str(exc.value)
    for col in ("slice_index or sop_instance_uid", "right_y", "top_x", "top_y", "bottom_y"):
        assert col in msg
    with pytest.raises(InputError, match="comma-separated"):
        parse_points_csv("slice_index;label;left_x\n0;a;1\n")
    with pytest.raises(InputError, match="more than once: label"):
        parse_points_csv(HEADER + ",label\n")


def test_empty_header_only_and_encoding(tmp_path, series) -> None:
    with pytest.raises(InputError, match="is empty"):
        read_points_csv(_write(tmp_path, ""), series)
    with pytest.raises(InputError, match="is empty"):
        read_points_csv(_write(tmp_path, "\n , \n"), series)
    with pytest.raises(InputError, match="no data rows"):
        read_points_csv(_write(tmp_path, HEADER + "\n\n"), series)
    p = tmp_path / "latin.csv"
    p.write_bytes(HEADER.encode() + b"\n0,,f\xe9,1,2,5,2,3,0,3,4\n")
    with pytest.raises(InputError, match="not UTF-8"):
        read_points_csv(p, series)
    p.write_bytes(b"\xef\xbb\xbf" + HEADER.encode() + b"\r\n0,,a,1,2,5,2,3,0,3,4\r\n")
    assert read_points_csv(p, series)[0].label == "a"  # BOM and CRLF accepted
    with pytest.raises(InputError, match="cannot read"):
        read_points_csv(tmp_path / "missing.csv", series)


def test_without_series(series) -> None:
    rows = parse_points_csv(f"{HEADER}\n99,,a,1,2,500,2,3,0,3,4\n")
    assert rows[0].slice_index == 99  # no bounds known
    with pytest.raises(InputError) as exc:
        parse_points_csv(f"{HEADER}\n,{UIDS[0]},a,1,2,5,2,3,0,3,4\n0,,b,-1,2,5,2,3,0,3,4\n")
    msg = str(exc.value)
    assert "line 2: sop_instance_uid given but no image series" in msg
    assert "line 3: left point (-1, 2) has a negative coordinate" in msg


def test_problem_list_is_capped() -> None:
    text = HEADER + "\n" + "\n".join(f"{i},,a,x,2,5,2,3,0,3,4" for i in range(150)) + "\n"
    with pytest.raises(InputError) as exc:
        parse_points_csv(text)
    msg = str(exc.value)
    assert "150 of 150 rows are invalid" in msg and "and 50 more invalid rows" in msg
    assert "line 101:" in msg and "line 102:" not in msg


def test_write_read_round_trip_atomic(tmp_path, series) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for k in range(N):
        lo = rng.uniform(0, 10, size=2)
        hi = lo + rng.uniform(1, 9, size=2)
        pts = np.array(
            [[lo[0], 5.25], [hi[0], 6.5], [4.125, lo[1]], [3.0, hi[1]]], dtype=np.float32
        )
        rows.append(PointsRow(k, f"organ, {k}", pts, UIDS[k] if k else None))
    out = tmp_path / "out.csv"
    out.write_text("old content")
    with pytest.raises(InputError, match="overwrite"):  # an existing file is never replaced silently
        write_points_csv(out, rows)
    assert out.read_text() == "old content"
    write_points_csv(out, rows, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]  # temp file renamed away
    back = read_points_csv(out, series)
    assert [(r.slice_index, r.label, r.line) for r in back] == [
        (k, f"organ, {k}", k + 2) for k in range(N)
    ]
    for a, b in zip(rows, back, strict=True):
        np.testing.assert_array_equal(a.points, b.points)  # exact float32 round trip
    assert back[1].sop_instance_uid == UIDS[1] and back[0].sop_instance_uid is None
    with pytest.raises(InputError, match="does not exist"):
        write_points_csv(tmp_path / "nope" / "x.csv", rows)


# ---------------------------------------------------------------- fuzz

_cells = st.one_of(
    st.integers(-3, 40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "liver", UIDS[0], "1.2", "a,b", '"', "\n", "1e999", " 3 "]),
    st.text(max_size=6),
)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.lists(_cells, min_size=0, max_size=13), max_size=6))
def test_fuzz_structured_rows(rows, series) -> None:
    text = HEADER + "\n" + "\n".join(",".join(r) for r in rows)
    try:
        out = parse_points_csv(text, series=series)
    except InputError:
        return
    for r in out:
        assert 0 <= r.slice_index < N and r.label
        assert np.all((r.points[:, 0] >= 0) & (r.points[:, 0] <= W - 1))
        assert np.all((r.points[:, 1] >= 0) & (r.points[:, 1] <= H - 1))


@settings(max_examples=100, deadline=None)
@given(text=st.text())
def test_fuzz_text(text, series) -> None:
    try:
        parse_points_csv(text, series=series)
        parse_points_csv(HEADER + "\n" + text)
    except InputError:
        pass


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=400))
def test_fuzz_bytes(data, tmp_path_factory, series) -> None:
    p = tmp_path_factory.mktemp("csv") / "f.csv"
    p.write_bytes(data)
    try:
        read_points_csv(p, series)
    except InputError:
        pass
