"""``cmdeploy serve`` over real HTTP: uvicorn on a free localhost port, the shipped model, a
5-slice DICOM series made from pydicom's CT slice (and the shared thorax volume when present)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import SHIFT_PX, VERTEBRA, call, running_server, write_ct_series  # noqa: E402

from cmdeploy.segmenter import Segmenter  # noqa: E402

TOKEN = "s3cret-token"
SHUFFLE = [2, 0, 3, 1]  # top, left, bottom, right: clicks in an arbitrary order


@pytest.fixture(scope="module")
def seg() -> Segmenter:
    return Segmenter.load(threads=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_ct_series(root / "case1" / "ct")
    (root / "case1" / "notes.txt").write_text("not an image")
    return root


def _make_app(data_dir: Path, seg: Segmenter, out: Path, **kw):
    from cmdeploy.serve.app import create_app
    from cmdeploy.serve.catalog import Catalog

    return create_app(Catalog(data_dir), seg, out, **kw)


@pytest.fixture(scope="module")
def server(data_dir: Path, seg: Segmenter, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    with running_server(_make_app(data_dir, seg, out, token=TOKEN, max_body_bytes=64 * 1024)) as url:
        yield url, out


def _api(server, path: str, method: str = "GET", body=None, token: str | None = TOKEN, raw=None):
    url, _ = server
    return call(f"{url}/api/v1{path}", method, body, token=token, raw=raw)


def _series_id(server) -> str:
    status, listing = _api(server, "/series")
    assert status == 200 and [s["name"] for s in listing] == ["case1/ct"]
    return listing[0]["id"]


def _mask(m: dict) -> np.ndarray:
    from cmdeploy.serve.masks import rle_to_mask

    return rle_to_mask(m["rle"], (m["rows"], m["columns"]))


def test_series_geometry_and_pixels(server, data_dir: Path) -> None:
    from cmdeploy.io import open_series

    sid = _series_id(server)
    status, geo = _api(server, f"/series/{sid}")
    assert status == 200
    assert (geo["num_slices"], geo["rows"], geo["columns"]) == (5, 128, 128)
    assert geo["spacing_xy_mm"] == pytest.approx([0.661468, 0.661468])
    assert np.diff(geo["slice_positions_mm"]) == pytest.approx([2.5] * 4)
    assert geo["orientation_labels"] == ["R", "L", "A", "P"]  # axial: patient right on screen left
    status, raw = _api(server, f"/series/{sid}/slices/3")
    assert status == 200 and len(raw) == 128 * 128 * 2
    want = open_series(data_dir / "case1" / "ct").slice_hu(3)
    np.testing.assert_array_equal(np.frombuffer(raw, "<i2").reshape(128, 128), np.rint(want))


def test_segment_accept_export_seg_matches_predict(server, data_dir: Path, seg: Segmenter) -> None:
    import highdicom as hd
    import pydicom

    from cmdeploy.io import open_series

    sid = _series_id(server)
    series = open_series(data_dir / "case1" / "ct")
    k = 2
    pts = VERTEBRA + np.array([k * SHIFT_PX, 0], np.float32)
    status, r = _api(
        server, f"/series/{sid}/segment", "POST", {"slice_index": k, "points": pts[SHUFFLE].tolist()}
    )
    assert status == 200, r
    assert np.array_equal(r["points"], pts)  # sorted back into left, right, top, bottom
    want = seg.predict(series.slice_hu(k), pts)
    got = _mask(r["mask"])
    assert want.sum() > 300 and np.array_equal(got, want)
    assert r["area_px"] == int(want.sum()) and r["model_ms"] > 0 and r["batch_size"] == 1
    assert all(got[y, x] for x, y in r["contour"])

    status, obj = _api(
        server,
        f"/series/{sid}/objects",
        "POST",
        {"label": "vertebral body", "slice_index": k, "points": r["points"], "mask": r["mask"]},
    )
    assert status == 201 and np.array_equal(_mask(obj["mask"]), want)

    status, prop = _api(server, f"/series/{sid}/propagate", "POST", {"object_id": obj["id"], "direction": 1})
    assert status == 200 and prop["slice_index"] == k + 1
    from cmdeploy.guidance import extreme_points

    assert np.array_equal(prop["points"], extreme_points(want))
    want_next = seg.predict(series.slice_hu(k + 1), extreme_points(want))
    assert np.array_equal(_mask(prop["mask"]), want_next)
    status, obj2 = _api(
        server,
        f"/series/{sid}/objects",
        "POST",
        {"label": "vertebral body", "slice_index": k + 1, "points": prop["points"], "mask": prop["mask"]},
    )
    assert status == 201

    status, ex = _api(server, f"/series/{sid}/export", "POST", {"formats": ["dicom-seg", "csv", "nifti"]})
    assert status == 200, ex
    folder = Path(ex["folder"])
    assert sorted(ex["files"]) == ["labels.nii.gz", "points.csv", "seg.dcm"]
    segds = hd.seg.segread(folder / "seg.dcm")
    uids = [series.slice_uids[k], series.slice_uids[k + 1]]
    arr = np.asarray(segds.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1]))
    np.testing.assert_array_equal(arr[0, :, :, 0].astype(bool), want)
    np.testing.assert_array_equal(arr[1, :, :, 0].astype(bool), want_next)
    plain = pydicom.dcmread(folder / "seg.dcm")
    assert plain.SegmentSequence[0].SegmentLabel == "vertebral body"


def test_points_csv_export_reads_back_to_same_masks(server, data_dir: Path, seg: Segmenter) -> None:
    """The exported CSV, run through ``cmdeploy infer``'s reader and pipeline, gives the accepted masks."""
    from cmdeploy.io import open_series
    from cmdeploy.pipeline import run_pipeline
    from cmdeploy.points_csv import read_points_csv

    sid = _series_id(server)
    _, objects = _api(server, f"/series/{sid}/objects")
    status, ex = _api(server, f"/series/{sid}/export", "POST", {"formats": ["csv"]})
    assert status == 200 and objects
    series = open_series(data_dir / "case1" / "ct")
    rows = read_points_csv(Path(ex["folder"]) / "points.csv", series)
    result = run_pipeline(seg, series, rows)
    by_slice = {m.slice_index: m.mask for m in result.label_masks(rows)}
    for o in objects:
        np.testing.assert_array_equal(by_slice[o["slice_index"]], _mask(o["mask"]))


def test_failed_export_keeps_previous_files(server, monkeypatch) -> None:
    import cmdeploy.points_csv as pc

    sid = _series_id(server)
    status, ex = _api(server, f"/series/{sid}/export", "POST", {})
    assert status == 200
    folder = Path(ex["folder"])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    _, o = _api(
        server,
        f"/series/{sid}/objects",
        "POST",
        {"label": "extra", "slice_index": 0, "points": VERTEBRA.tolist()},
    )

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(pc, "write_points_csv", boom)
    status, err = _api(server, f"/series/{sid}/export", "POST", {})
    assert status == 500 and err == {"error": "internal error"}
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temp files either
    monkeypatch.undo()
    assert _api(server, f"/series/{sid}/objects/{o['id']}", "DELETE")[0] == 204


def test_objects_replace_delete_and_labels(server) -> None:
    sid = _series_id(server)
    _, o = _api(
        server,
        f"/series/{sid}/objects",
        "POST",
        {"label": "tmp", "slice_index": 4, "points": VERTEBRA.tolist()},
    )
    status, r = _api(
        server,
        f"/series/{sid}/objects/{o['id']}",
        "PUT",
        {"label": "renamed", "slice_index": 4, "points": VERTEBRA.tolist()},
    )
    assert status == 200 and r["id"] == o["id"] and r["label"] == "renamed"
    _, labels = _api(server, "/labels")
    assert labels["labels"][0] == "renamed"
    _, on4 = _api(server, f"/series/{sid}/objects?slice_index=4")
    assert [x["id"] for x in on4] == [o["id"]]
    assert _api(server, f"/series/{sid}/objects/{o['id']}", "DELETE")[0] == 204
    assert _api(server, f"/series/{sid}/objects/{o['id']}", "DELETE")[0] == 404
    assert _api(server, f"/series/{sid}/objects?slice_index=4")[1] == []


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/series/..%2F..%2Fetc%2Fpasswd", None, 404),
        ("GET", "/series/%2e%2e/slices/0", None, 404),
        ("GET", "/series/nope/slices/0", None, 404),
        ("GET", "/series/{sid}/slices/5", None, 404),
        ("GET", "/series/{sid}/slices/-1", None, 404),
        ("POST", "/series/{sid}/segment", {"slice_index": 0, "points": [[1, 2]]}, 422),
        ("POST", "/series/{sid}/segment", {"slice_index": 0, "points": [[1, 2]] * 4}, 400),
        (
            "POST",
            "/series/{sid}/segment",
            {"slice_index": 0, "points": [[500, 2], [1, 2], [3, 0], [3, 9]]},
            400,
        ),
        ("POST", "/series/{sid}/segment", {"slice_index": 9, "points": VERTEBRA.tolist()}, 404),
        (
            "POST",
            "/series/{sid}/objects",
            {"label": "a#b", "slice_index": 0, "points": VERTEBRA.tolist()},
            400,
        ),
        (
            "POST",
            "/series/{sid}/objects",
            {
                "label": "a",
                "slice_index": 0,
                "points": VERTEBRA.tolist(),
                "mask": {"rows": 128, "columns": 128, "rle": [5]},
            },
            400,
        ),
        ("POST", "/series/{sid}/propagate", {"object_id": 99999, "direction": 1}, 404),
        ("POST", "/series/{sid}/propagate", {"object_id": 1, "direction": 2}, 422),
        ("POST", "/series/{sid}/export", {"formats": ["png"]}, 422),
    ],
)
def test_bad_requests_get_json_errors(server, method, path, body, status) -> None:
    sid = _series_id(server)
    got, payload = _api(server, path.replace("{sid}", sid), method, body)
    assert got == status, payload
    assert isinstance(payload, dict) and set(payload) == {"error"} and payload["error"]
    assert "Traceback" not in payload["error"]


def test_token_and_body_limit(server) -> None:
    url, _ = server
    assert _api(server, "/series", token=None)[0] == 401
    assert _api(server, "/series", token="wrong")[0] == 401
    assert call(f"{url}/", "POST", {"image": "", "pos_points": []})[0] == 401  # CVAT root needs it too
    page_status, page = call(f"{url}/")  # the page itself is public; it carries no data
    assert page_status == 200 and b"cmdeploy" in page
    status, payload = _api(server, "/series/x/segment", "POST", raw=b"{" + b" " * (70 * 1024) + b"}")
    assert status == 413 and "error" in payload


def test_without_token_only_loopback_host_names(data_dir: Path, seg: Segmenter, tmp_path: Path) -> None:
    """No token: a request naming another host (DNS rebinding from a web page) gets 403."""
    with running_server(_make_app(data_dir, seg, tmp_path)) as url:
        assert call(f"{url}/api/v1/series")[0] == 200
        assert call(f"{url}/api/v1/series", headers={"Host": "localhost:1234"})[0] == 200
        status, payload = call(f"{url}/api/v1/series", headers={"Host": "attacker.example:8765"})
        assert status == 403 and "loopback" in payload["error"]
        assert call(f"{url}/", headers={"Host": "127.0.0.1.attacker.example"})[0] == 403


def test_page_and_static_files_are_self_contained(server) -> None:
    """The page loads nothing from another origin (hospital machines are offline)."""
    import re

    url, _ = server
    for name in ("", "static/app.js", "static/style.css"):
        status, body = call(f"{url}/{name}")
        assert status == 200
        text = body.decode()
        assert not re.search(r"https?://", text.replace("http://www.w3.org", "")), name
    import urllib.request

    with urllib.request.urlopen(f"{url}/") as res:
        assert "default-src 'self'" in res.headers["Content-Security-Policy"]


def test_dice_against_reference_on_shared_thorax(seg: Segmenter, tmp_path: Path) -> None:
    """Segment an aorta slice of the shared thorax volume over HTTP: identical to predict, and Dice
    against the reference mask."""
    data = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ct-organs" / "thorax_1p5mm"
    if not (data / "image.nii.gz").is_file():
        pytest.skip("../shared/data/ct-organs/thorax_1p5mm is not present")
    import json

    from cmdeploy.evaluation.metrics import dice
    from cmdeploy.guidance import extreme_points
    from cmdeploy.labels_to_points import label_components, open_label_volume

    names = json.loads((data.parent / "labels.json").read_text())
    aorta = int(next(k for k, v in names.items() if v == "aorta"))
    labels = open_label_volume(data / "labels.nii.gz")
    k = max(range(len(labels)), key=lambda i: int((labels.slice(i) == aorta).sum()))
    comp = label_components(labels.slice(k), label_ids={aorta})[0]
    ref = comp.mask()
    pts = extreme_points(ref)
    app = _make_app(data, seg, tmp_path)
    with running_server(app) as url:
        _, listing = call(f"{url}/api/v1/series")
        sid = next(s["id"] for s in listing if s["name"] == "image.nii.gz")
        status, r = call(
            f"{url}/api/v1/series/{sid}/segment", "POST", {"slice_index": k, "points": pts[::-1].tolist()}
        )
    assert status == 200
    got = _mask(r["mask"])
    from cmdeploy.io import open_series

    np.testing.assert_array_equal(got, seg.predict(open_series(data / "image.nii.gz").slice_hu(k), pts))
    assert dice(got, ref) > 0.85


def test_no_patient_identifiers_in_answers_or_logs(
    data_dir: Path, seg: Segmenter, tmp_path: Path, caplog
) -> None:
    import logging

    import pydicom

    from cmdeploy.io import open_series

    series = open_series(data_dir / "case1" / "ct")
    ds = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    idents = [str(ds.PatientName), str(ds.PatientID), ds.StudyInstanceUID, ds.SeriesInstanceUID]
    idents += [u for u in series.slice_uids if u]
    answers = []
    with caplog.at_level(logging.DEBUG), running_server(_make_app(data_dir, seg, tmp_path)) as url:
        _, listing = call(f"{url}/api/v1/series")
        sid = listing[0]["id"]
        answers += [listing, call(f"{url}/api/v1/series/{sid}")[1]]
        body = {"label": "x", "slice_index": 1, "points": VERTEBRA.tolist()}
        answers.append(call(f"{url}/api/v1/series/{sid}/objects", "POST", body)[1])
        answers.append(
            call(f"{url}/api/v1/series/{sid}/segment", "POST", {"slice_index": 7, "points": body["points"]})[
                1
            ]
        )
        answers.append(call(f"{url}/api/v1/series/{sid}/export", "POST", {})[1])
        answers.append(
            call(f"{url}/api/v1/series/{sid}/propagate", "POST", {"object_id": 10**6, "direction": 1})[1]
        )
    text = caplog.text + repr(answers)
    leaked = [i for i in idents if i in text]
    assert leaked == [] and all(idents), [
        text[max(text.find(i) - 300, 0) : text.find(i) + 80] for i in leaked
    ]


def test_masks_come_from_segmenter_to_mask(data_dir: Path, seg: Segmenter, tmp_path: Path) -> None:
    """The server turns probabilities into masks only through ``Segmenter.to_mask`` (threshold and
    the spec's post-processing live there), for segment, accept without a mask and propagate."""

    class Inverted:
        spec, threshold, batch_size = seg.spec, seg.threshold, seg.batch_size
        predict_batch = staticmethod(seg.predict_batch)

        @staticmethod
        def to_mask(probs, points, origin=(0, 0)):
            return ~seg.to_mask(probs, points, origin)

    from cmdeploy.io import open_series

    hu = open_series(data_dir / "case1" / "ct").slice_hu(0)
    want = ~seg.predict(hu, VERTEBRA)
    with running_server(_make_app(data_dir, Inverted(), tmp_path)) as url:
        sid = call(f"{url}/api/v1/series")[1][0]["id"]
        _, r = call(
            f"{url}/api/v1/series/{sid}/segment", "POST", {"slice_index": 0, "points": VERTEBRA.tolist()}
        )
        body = {"label": "x", "slice_index": 0, "points": VERTEBRA.tolist()}
        _, o = call(f"{url}/api/v1/series/{sid}/objects", "POST", body)
    np.testing.assert_array_equal(_mask(r["mask"]), want)
    np.testing.assert_array_equal(_mask(o["mask"]), want)
