"""A real browser: headless Chromium (Debian's package, driven by Selenium + chromium-driver)
annotates a vertebral body on a 5-slice CT series: open the series, scroll to a slice with the
mouse wheel, click its four extreme points in a shuffled order, type a label and press Enter,
propagate to the next slice with ``]`` and accept with Enter, export, then read the written DICOM
SEG back and compare it with ``Segmenter.predict`` on the points the page sent."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("selenium")

from serve_helpers import (  # noqa: E402
    SHIFT_PX,
    VERTEBRA,
    call,
    chromium_driver,
    click_image_point,
    running_server,
    wait_for,
    write_ct_series,
)

from cmdeploy.segmenter import Segmenter  # noqa: E402

IDLE = "document.body.dataset.busy === '0'"


@pytest.fixture()
def driver():
    d = chromium_driver()
    if d is None:
        pytest.skip(
            "Chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        )
    try:
        yield d
    finally:
        d.quit()


def test_annotate_propagate_export_in_chromium(driver, tmp_path: Path) -> None:
    import highdicom as hd
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from cmdeploy.guidance import extreme_points
    from cmdeploy.io import open_series
    from cmdeploy.serve.app import create_app
    from cmdeploy.serve.catalog import Catalog

    seg = Segmenter.load(threads=1)
    folder = write_ct_series(tmp_path / "data" / "ct")
    series = open_series(folder)
    out = tmp_path / "out"
    with running_server(create_app(Catalog(tmp_path / "data"), seg, out)) as url:
        driver.get(url + "/")
        wait_for(driver, "document.querySelector('#series-list li')")
        driver.find_element(By.CSS_SELECTOR, "#series-list li").click()
        wait_for(driver, f"window.cmdeploy.state.geo && window.cmdeploy.state.k === 2 && {IDLE}")

        # scroll one slice towards the head ... and back down: the wheel moves through slices
        canvas = driver.find_element(By.ID, "view")
        ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(canvas), 0, 120).perform()
        wait_for(driver, f"window.cmdeploy.state.k === 3 && {IDLE}")
        ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(canvas), 0, -120).perform()
        ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(canvas), 0, -120).perform()
        wait_for(driver, f"window.cmdeploy.state.k === 1 && {IDLE}")

        # four extreme points of the vertebral body on slice 1, clicked bottom, left, top, right;
        # a wrong fifth-to-be click is undone with a right-click first
        k = 1
        pts = VERTEBRA + np.array([k * SHIFT_PX, 0], np.float32)
        click_image_point(driver, 100, 100)
        click_image_point(driver, 100, 100, button="right")
        assert driver.execute_script("return window.cmdeploy.state.clicks.length") == 0
        for i in (3, 0, 2, 1):
            click_image_point(driver, *pts[i])
        proposal = wait_for(driver, f"{IDLE} && window.cmdeploy.state.proposal")
        sent = np.asarray(proposal["points"], np.float32)
        assert np.abs(sent - pts).max() < 1.0  # the clicks landed on the intended pixels, sorted

        label = driver.find_element(By.ID, "label-input")
        label.send_keys("vertebral body")
        label.send_keys(Keys.ENTER)
        wait_for(driver, f"window.cmdeploy.state.objects.length === 1 && {IDLE}")

        ActionChains(driver).send_keys("]").perform()
        wait_for(driver, f"window.cmdeploy.state.k === 2 && window.cmdeploy.state.proposal && {IDLE}")
        ActionChains(driver).send_keys(Keys.ENTER).perform()
        wait_for(driver, f"window.cmdeploy.state.objects.length === 2 && {IDLE}")
        assert driver.find_element(By.CSS_SELECTOR, "#objects-list li .obj-label").text == "vertebral body"

        driver.find_element(By.ID, "export-btn").click()
        wait_for(driver, "document.getElementById('export-result').classList.contains('ok')")
        if os.environ.get("CMDEPLOY_SCREENSHOT"):
            driver.save_screenshot(os.environ["CMDEPLOY_SCREENSHOT"])
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        _, listing = call(url + "/api/v1/series")
        _, objects = call(f"{url}/api/v1/series/{listing[0]['id']}/objects")

    want1 = seg.predict(series.slice_hu(1), sent)
    want2 = seg.predict(series.slice_hu(2), extreme_points(want1))
    assert want1.sum() > 300 and want2.sum() > 300
    assert [o["slice_index"] for o in objects] == [1, 2]
    segs = list(out.glob("*/seg.dcm"))
    assert len(segs) == 1 and (segs[0].parent / "points.csv").is_file()
    ds = hd.seg.segread(segs[0])
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["vertebral body"]
    uids = [series.slice_uids[1], series.slice_uids[2]]
    arr = np.asarray(ds.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1]))
    np.testing.assert_array_equal(arr[0, :, :, 0].astype(bool), want1)
    np.testing.assert_array_equal(arr[1, :, :, 0].astype(bool), want2)
