"""A run's ``report.html``: self-contained, complete, honest about trust; rendered in headless
Chromium where one is installed (``.ci/run`` installs Debian's ``chromium`` when it can)."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
from affine import Affine
from PIL import Image

from changedet.cli import main
from changedet.pipeline.detect import DetectParams, detect_changes
from changedet.pipeline.grid import Grid
from changedet.pipeline.output_table import OUTPUT_NAMES, QUICKLOOK, REPORT_HTML
from changedet.pipeline.run_report import trust_warnings
from changedet.testing.misregistration import write_shifted_date

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
RESOURCE = re.compile(r"""(?:\bsrc|\bhref|\baction|\bposter|\bdata)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//|@import""",
                      re.IGNORECASE)  # fmt: skip


@pytest.fixture(scope="module")
def bercy_run(sample_city, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "out"
    assert main(["detect", "--t1", str(sample_city / "imgs_1"), "--t2", str(sample_city / "imgs_2"), "--out", str(out), "--quiet"]) == 0
    return out


def _browser() -> str:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        pytest.skip(f"no headless browser ({', '.join(BROWSERS)}) installed: .ci/run installs Debian's chromium when apt-get works")
    return found


def test_every_run_writes_the_report_and_the_new_quicklook(bercy_run):
    assert REPORT_HTML in OUTPUT_NAMES and (bercy_run / REPORT_HTML).is_file()
    quicklook = Image.open(bercy_run / QUICKLOOK)
    assert quicklook.width > 2 * quicklook.height  # three panels side by side, not a bare heat map
    page = (bercy_run / REPORT_HTML).read_text()
    summary = json.loads((bercy_run / "run.json").read_text())
    regions = len(gpd.read_file(bercy_run / "changes.gpkg"))
    start = page.index('id="regions"')
    assert f'data-regions-total="{regions}"' in page and page[start : page.index("</table>", start)].count("<tr>") == regions + 1
    assert f"{summary['threshold']:.2f}" in page and "0.289" in page  # the threshold, the model's CV F1 on unseen cities
    for fact in ("EPSG:4326", "360 × 395 px", "peak RSS", f"ha in {regions} regions"):
        assert fact in page, fact


def test_the_page_makes_no_network_request(bercy_run):
    page = (bercy_run / REPORT_HTML).read_text()
    assert not RESOURCE.search(page), RESOURCE.search(page)
    assert "<link" not in page and "<script src" not in page and "<iframe" not in page
    images = re.findall(r'<img[^>]*src="([^"]{0,30})', page)
    assert len(images) == 2 and all(src.startswith("data:image/png;base64,") for src in images)


def test_trust_warnings_say_what_lowers_trust(sample_city, tmp_path):
    t2 = tmp_path / "t2"
    write_shifted_date(sample_city / "imgs_2", t2, (1.5, -2.25))
    result = detect_changes(sample_city / "imgs_1", t2, tmp_path / "out", DetectParams())
    page = result.path(REPORT_HTML).read_text()
    assert "was not corrected" in page and "--coregister" in page
    grid = Grid(None, Affine.identity(), 100, 100)
    lines = trust_warnings({"counts": {"valid_pixels": 5000}, "cloud_fraction": {"t1": 0.0, "t2": 0.2},
                            "coregistration": {"confidence": "low", "reason": "no texture"}, "model": {}}, grid)  # fmt: skip
    assert any("50% of the grid has no data" in line for line in lines)
    assert any("t2 is 20.0% cloud" in line for line in lines) and any("no texture" in line for line in lines)
    assert any("no F1 measured on unseen scenes" in line for line in lines)


def test_report_renders_in_headless_chromium(bercy_run, tmp_path):
    browser = _browser()
    regions = len(gpd.read_file(bercy_run / "changes.gpkg"))
    probe = """<script>window.addEventListener('load', function () {
      var sizes = Array.prototype.map.call(document.images, function (i) { return [i.naturalWidth, i.naturalHeight]; });
      var rows = document.querySelectorAll('#regions tbody tr');
      document.querySelectorAll('#regions th')[2].click();  // sort by pixels, ascending
      var first = parseInt(document.querySelector('#regions tbody tr').cells[2].textContent.replace(/,/g, ''));
      var all = Array.prototype.map.call(document.querySelectorAll('#regions tbody tr'), function (r) {
        return parseInt(r.cells[2].textContent.replace(/,/g, '')); });
      document.body.setAttribute('data-probe', JSON.stringify({images: sizes, rows: rows.length, first: first,
                                                                min: Math.min.apply(null, all)}));
    });</script>"""
    page = tmp_path / "probed.html"
    page.write_text((bercy_run / REPORT_HTML).read_text().replace("</body>", probe + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=10000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r"data-probe=\"([^\"]+)\"", dom)
    assert found, dom[-2000:]
    probe_result = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(probe_result["images"]) == 2 and all(w > 0 and h > 0 for w, h in probe_result["images"])  # decoded
    assert probe_result["rows"] == regions and probe_result["first"] == probe_result["min"]  # every region, sortable
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, "--window-size=1280,1600", f"--screenshot={shot}", (bercy_run / REPORT_HTML).as_uri()],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    pixels = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("L"), np.float32)
    assert pixels.std() > 20 and (pixels < 200).mean() > 0.05  # imagery and text, not a blank page


def test_a_scene_far_from_the_training_data_is_a_trust_warning(sample_city, tmp_path):
    import rasterio

    from tests.conftest import write_raster
    from tests.reliability_cases_inputs import _training_statistics_checkpoint

    dim = tmp_path / "dim"  # t2 four times darker than the checkpoint's training data (within the 10x refusal)
    dim.mkdir()
    for band in (sample_city / "imgs_2").glob("*.tif"):
        with rasterio.open(band) as src:
            write_raster(dim / band.name, src.read().astype(np.float32) / 4, crs=src.crs, transform=src.transform)
    model = _training_statistics_checkpoint(type("Ctx", (), {"tmp": tmp_path})())
    result = detect_changes(sample_city / "imgs_1", dim, tmp_path / "out", DetectParams(model=model))
    assert any("outside what it was trained on" in w for w in result.summary["warnings"])
    page = result.path(REPORT_HTML).read_text()
    assert "outside what it was trained on" in page and "no F1 measured on unseen scenes" in page
