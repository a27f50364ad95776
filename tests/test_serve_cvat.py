"""The CVAT interactor contract: a request shaped exactly as CVAT posts it (base64 PNG frame,
four ``pos_points`` in a shuffled click order), answered over HTTP at ``/`` and ``/api/v1/cvat``
and by the nuclio handler in ``examples/cvat/``, checked against ``Segmenter.predict`` on the same
pixels (8-bit grey -> HU on the model's window)."""

from __future__ import annotations

import base64
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")

from serve_helpers import VERTEBRA, call, running_server, write_ct_series  # noqa: E402

from cmdeploy.segmenter import Segmenter  # noqa: E402
from cmdeploy.serve.cvat import eight_bit_to_hu  # noqa: E402
from cmdeploy.serve.masks import outer_contour  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def seg() -> Segmenter:
    return Segmenter.load(threads=1)


def _frame(seg: Segmenter) -> tuple[np.ndarray, str]:
    """CT_small windowed to the model's window as an 8-bit RGB PNG (what a CVAT task holds)."""
    from PIL import Image
    from pydicom.data import get_testdata_file

    from cmdeploy.io import open_series

    hu = open_series(get_testdata_file("CT_small.dcm")).slice_hu(0)
    lo, hi = seg.spec.window
    grey = np.rint((np.clip(hu, lo, hi) - lo) / (hi - lo) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(buf, format="PNG")
    return grey, base64.b64encode(buf.getvalue()).decode()


def _request(b64: str) -> dict:
    clicks = VERTEBRA[[3, 0, 2, 1]].astype(int).tolist()  # bottom, left, top, right: shuffled
    return {"image": b64, "pos_points": clicks, "neg_points": [], "obj_bbox": [], "threshold": None}


def test_eight_bit_mapping_is_the_model_window() -> None:
    hu = eight_bit_to_hu(np.array([[0, 255, 51]], np.uint8), (-200.0, 250.0))
    np.testing.assert_allclose(hu, [[-200.0, 250.0, -110.0]], atol=1e-4)


def test_cvat_request_over_http_matches_predict(seg: Segmenter, tmp_path: Path) -> None:
    from cmdeploy.serve.app import create_app
    from cmdeploy.serve.catalog import Catalog

    grey, b64 = _frame(seg)
    want = seg.predict(eight_bit_to_hu(grey, seg.spec.window), VERTEBRA)
    assert want.sum() > 300
    app = create_app(Catalog(write_ct_series(tmp_path / "d", n=1)), seg, tmp_path / "out")
    with running_server(app) as url:
        for path in ("/", "/api/v1/cvat"):
            status, r = call(url + path, "POST", _request(b64))
            assert status == 200, r
            mask = np.asarray(r["mask"], np.uint8)
            assert set(np.unique(mask)) <= {0, 255}
            np.testing.assert_array_equal(mask == 255, want)
            assert r["points"] == outer_contour(want) and len(r["points"]) > 20
        bad = dict(_request(b64), pos_points=[[1, 2], [3, 4], [5, 6]])
        status, err = call(url + "/", "POST", bad)
        assert status == 400 and "four" in err["error"]
        status, err = call(url + "/", "POST", dict(_request(b64), image="bm90IGFuIGltYWdl"))
        assert status == 400 and "PNG" in err["error"]
        status, r = call(url + "/", "POST", dict(_request(b64), threshold=0.9, neg_points=[[5, 5]]))
        assert status == 200 and np.array_equal(np.asarray(r["mask"]) == 255, want)  # the model's own mask


def test_nuclio_handler_in_examples(seg: Segmenter) -> None:
    spec = importlib.util.spec_from_file_location("cvat_main", ROOT / "examples" / "cvat" / "main.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)

    class Ctx:
        class user_data:  # noqa: N801 - nuclio's attribute name
            segmenter = seg

        @staticmethod
        def Response(body, headers, content_type, status_code):  # noqa: N802 - nuclio's name
            return status_code, body

    class Event:
        body = None

    grey, b64 = _frame(seg)
    Event.body = _request(b64)
    status, body = main.handler(Ctx, Event)
    import json

    assert status == 200
    np.testing.assert_array_equal(
        np.asarray(json.loads(body)["mask"]) == 255,
        seg.predict(eight_bit_to_hu(grey, seg.spec.window), VERTEBRA),
    )
    yaml_text = (ROOT / "examples" / "cvat" / "function.yaml").read_text()
    for needle in ("type: interactor", "version: 2", "min_pos_points: 4", "handler: main:handler"):
        assert needle in yaml_text
