"""Make docs/images/serve.png: the annotation page in headless Chromium on a real 512 x 512 CT slice.

    python examples/serve_screenshot.py --output docs/images/serve.png

Starts ``cmdeploy serve``'s app on a free localhost port on pydicom's bundled 512 x 512 head CT
(the image in the repository; no shared data may be committed), clicks the extreme points of the
posterior fossa, accepts it, then clicks the right temporal lobe and leaves its proposal on screen.
With ``--data FOLDER`` (image.nii.gz + labels.nii.gz, e.g. ../shared/data/ct-organs/thorax_1p5mm)
it clicks the reference labels' extreme points instead (for local checks; do not commit that
image). Needs Debian's chromium and chromium-driver, selenium, and the ``[serve]`` extra.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_helpers import call, chromium_driver, click_image_point, running_server, wait_for  # noqa: E402

IDLE = "document.body.dataset.busy === '0'"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="folder with image.nii.gz and labels.nii.gz (local checks)")
    ap.add_argument("--output", type=Path, default=Path("docs/images/serve.png"))
    ap.add_argument("--labels", default="heart,aorta", help="with --data: accepted label, then proposed")
    args = ap.parse_args()
    if args.data is None:
        import shutil
        import tempfile

        from pydicom.data import get_testdata_file

        tmp = Path(tempfile.mkdtemp(prefix="cmdeploy-screenshot-"))
        folder = tmp / "pydicom_head_ct"
        folder.mkdir()
        shutil.copy(get_testdata_file("J2K_pixelrep_mismatch.dcm"), folder / "head.dcm")
        # (x, y) pixel clicks on the bundled head CT, in the order the page receives them
        points = {
            "posterior_fossa": np.array([[140, 335], [372, 335], [256, 228], [256, 402]], np.float32),
            "temporal_lobe_right": np.array([[128, 210], [222, 222], [172, 160], [200, 250]], np.float32),
        }
        shoot(args.output, folder, 0, points)
        shutil.rmtree(tmp)
        return

    from cmdeploy.guidance import extreme_points
    from cmdeploy.labels_to_points import label_components, open_label_volume

    names = json.loads((args.data.parent / "labels.json").read_text())
    ids = {v: int(k) for k, v in names.items()}
    first, second = args.labels.split(",")
    labels = open_label_volume(args.data / "labels.nii.gz")
    # the slice where the first structure is largest, among those that also show the second
    areas = [
        int((s == ids[first]).sum()) * bool((s == ids[second]).sum() > 100)
        for s in (labels.slice(k) for k in range(len(labels)))
    ]
    k = int(np.argmax(areas))
    lab = labels.slice(k)
    points = {
        name: extreme_points(label_components(lab, label_ids={ids[name]})[0].mask())
        for name in (first, second)
    }
    shoot(args.output, args.data, k, points)


def shoot(output: Path, data: Path, k: int, points: dict[str, np.ndarray]) -> None:
    """Screenshot of the page on slice ``k`` of ``data``: the first object of ``points`` accepted,
    the second one's proposal on screen (points: (4, 2) pixel (x, y) each)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from cmdeploy.segmenter import Segmenter
    from cmdeploy.serve.app import create_app
    from cmdeploy.serve.catalog import Catalog

    first, second = list(points)
    driver = chromium_driver(1920, 1080)
    if driver is None:
        raise SystemExit("needs chromium and chromium-driver (apt-get install chromium chromium-driver)")
    out = Path("/tmp/cmdeploy-screenshot-out")
    try:
        with running_server(create_app(Catalog(data), Segmenter.load(), out)) as url:
            _, listing = call(url + "/api/v1/series")  # warm the model up: the page shows latency
            for _ in range(3):
                call(
                    f"{url}/api/v1/series/{listing[0]['id']}/segment",
                    "POST",
                    {"slice_index": k, "points": points[first].tolist()},
                )
            driver.get(url + "/")
            wait_for(driver, "document.querySelector('#series-list li')")
            driver.find_element(By.CSS_SELECTOR, "#series-list li").click()
            wait_for(driver, f"window.cmdeploy.state.geo && {IDLE}")
            driver.execute_script(
                f"document.getElementById('slice-slider').value = {k};"
                "document.getElementById('slice-slider').dispatchEvent(new Event('input'))"
            )
            wait_for(driver, f"window.cmdeploy.state.k === {k} && {IDLE}")
            for name in (first, second):
                for i in (2, 0, 3, 1):
                    click_image_point(driver, *points[name][i])
                wait_for(driver, f"{IDLE} && window.cmdeploy.state.proposal")
                if name == first:
                    box = driver.find_element(By.ID, "label-input")
                    box.send_keys(name)
                    box.send_keys(Keys.ENTER)
                    wait_for(driver, f"window.cmdeploy.state.objects.length === 1 && {IDLE}")
                else:
                    box = driver.find_element(By.ID, "label-input")
                    box.clear()
                    box.send_keys(name)
                    ActionChains(driver).send_keys(Keys.ESCAPE).perform()
            # the cursor read-out: hover over the proposal
            mx, my = points[second].mean(axis=0)
            cx, cy = driver.execute_script(f"return window.cmdeploy.imageToClient({mx}, {my})")
            from selenium.webdriver.common.actions.action_builder import ActionBuilder

            ab = ActionBuilder(driver)
            ab.pointer_action.move_to_location(int(cx), int(cy))
            ab.perform()
            output.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(output))
            print(f"slice {k}: wrote {output}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
