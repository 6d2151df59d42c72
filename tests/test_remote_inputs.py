"""Remote and catalog inputs: STAC Items and COGs served over HTTP by a server that honours ``Range``
(``changedet.testing.range_server``), read through GDAL's ``/vsicurl/`` with range requests."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from changedet.cli import main
from changedet.io.remote import display_url, gdal_path
from changedet.io.scene import open_scene
from changedet.pipeline.detect import DetectParams, detect_changes
from changedet.testing.range_server import RangeServer, threaded_http_server
from changedet.testing.stac import write_cogs, write_item
from tests.conftest import write_raster
from tests.reliability import Case, assert_failed_cleanly, assert_one_error_line, snapshot

DATES = ("imgs_1", "imgs_2")


@pytest.fixture(scope="module")
def served(tmp_path_factory, sample_city):
    """COGs of the bundled city's two dates under ``cogs/``, served on 127.0.0.1."""
    root = tmp_path_factory.mktemp("served")
    for date in DATES:
        write_cogs(sample_city / date, root / "cogs" / date)
    with RangeServer(root) as server:
        yield root, server


@pytest.fixture
def site(served, tmp_path, monkeypatch):
    """A fresh folder on the server (GDAL caches what it has read of a URL) with items of both dates,
    relative hrefs; GDAL retries quickly."""
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.05")
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "3")
    root, server = served
    name = tmp_path.name
    for date in DATES:
        shutil.copytree(root / "cogs" / date, root / name / date)
        write_item(root / name / date, root / name / f"{date}.json")
    server.reset()
    return root / name, server, name


@pytest.fixture(scope="module")
def local_outputs(sample_city, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    detect_changes(sample_city / "imgs_1", sample_city / "imgs_2", out, DetectParams())
    return out


def test_an_item_served_over_http_gives_the_bytes_of_local_folders(site, local_outputs):
    folder, server, name = site
    result = detect_changes(server.url(f"{name}/imgs_1.json"), server.url(f"{name}/imgs_2.json"), folder / "out", DetectParams())
    for output in ("change_mask.tif", "change_probability.tif", "difference.tif"):
        assert result.path(output).read_bytes() == (local_outputs / output).read_bytes(), output
    assert all(r.status == 206 for r in server.requests() if r.method == "GET" and r.path.endswith(".tif"))  # range reads only


def test_every_href_style_and_asset_naming_gives_the_folder_scene(sample_city, tmp_path):
    folder = sample_city / "imgs_1"
    expected = open_scene(folder)
    for hrefs in ("relative", "absolute", "file"):
        for keys in ("sentinel2", "common"):
            item = write_item(folder, tmp_path / hrefs / f"{keys}.json", hrefs=hrefs, keys=keys)
            scene = open_scene(item)
            assert scene.band_names == expected.band_names, (hrefs, keys)
            assert [Path(b.path).resolve() for b in scene.bands] == [Path(b.path).resolve() for b in expected.bands]
            assert [b.description for b in scene.bands][:4] == ["coastal", "blue", "green", "red"]  # roles from eo:bands
    assert open_scene(item.as_uri()).band_names == expected.band_names  # the item itself as a file:// URL


def test_urls_map_to_gdal_network_paths():
    assert gdal_path("s3://bucket/tiles/B04.tif") == "/vsis3/bucket/tiles/B04.tif"
    assert gdal_path("https://h/x.tif?sig=a&b=c") == "/vsicurl/https://h/x.tif?sig=a&b=c"
    assert gdal_path("file:///data/a%20b.tif") == "/data/a b.tif"
    assert display_url("/vsis3/bucket/k.tif") == "s3://bucket/k.tif"


def test_a_small_window_of_a_large_remote_cog_reads_only_its_blocks(tmp_path):
    """t1 is a local 256² crop; t2 a 4096² COG over HTTP: the common grid is the crop, and only its blocks travel."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:4096, 0:4096]
    big = ((np.sin(x / 97.0) + np.cos(y / 61.0)) * 800 + 2000 + rng.normal(0, 30, x.shape)).astype(np.uint16)
    transform = Affine(10.0, 0, 500000.0, 0, -10.0, 5400000.0)
    write_raster(tmp_path / "big.tif", np.stack([big, big[::-1]]), transform=transform)
    write_cogs(tmp_path, tmp_path / "www")
    crop = np.stack([big, big[::-1]])[:, 2048:2304, 1024:1280].copy()
    t1 = write_raster(tmp_path / "t1.tif", crop, transform=transform * Affine.translation(1024, 2048))
    size = (tmp_path / "www" / "big.tif").stat().st_size
    with RangeServer(tmp_path / "www") as server:
        result = detect_changes(t1, server.url("big.tif"), tmp_path / "out", DetectParams(model="cva"))
        served = server.bytes_served("big.tif")
    with rasterio.open(result.path("change_mask.tif")) as ds:
        assert (ds.width, ds.height) == (256, 256) and ds.transform == transform * Affine.translation(1024, 2048)
    assert served < 0.05 * size, (served, size)
    print(f"served {served} of {size} bytes ({served / size:.2%})")


def test_a_transient_500_mid_read_is_retried(site, local_outputs):
    folder, server, name = site
    server.fail(500, times=2, min_offset=1, path=f"{name}/imgs_2/")  # every read of t2 past its header, twice
    result = detect_changes(server.url(f"{name}/imgs_1.json"), server.url(f"{name}/imgs_2.json"), folder / "out", DetectParams())
    assert result.path("change_mask.tif").read_bytes() == (local_outputs / "change_mask.tif").read_bytes()
    assert sum(r.status == 500 for r in server.requests()) == 2


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _missing_asset(folder: Path, server: RangeServer, name: str) -> list[str]:
    (folder / "imgs_2" / next(p.name for p in (folder / "imgs_2").glob("*_B04.tif"))).unlink()
    return [server.url(f"{name}/imgs_1.json"), server.url(f"{name}/imgs_2.json")]


FAILURES = {
    "item 404": (lambda f, s, n: [s.url(f"{n}/imgs_1.json"), s.url(f"{n}/nothing.json")], "HTTP 404", None),
    "asset 404": (_missing_asset, "asset B04", None),
    "persistent 500 mid-read": (lambda f, s, n: [s.url(f"{n}/imgs_1.json"), s.url(f"{n}/imgs_2.json")], "failed after 3 retries", 500),
    "item missing a band": (lambda f, s, n: [s.url(f"{n}/imgs_1.json"),
                                             str(write_item(f / "imgs_2", f / "no_b10.json", drop=("B10",)))], "'B10' not found", None),
    "unreachable item": (lambda f, s, n: [s.url(f"{n}/imgs_1.json"), f"http://127.0.0.1:{_closed_port()}/t2.json"], "cannot reach", None),
    "unreachable raster": (lambda f, s, n: [s.url(f"{n}/imgs_1.json"), f"http://127.0.0.1:{_closed_port()}/t2.tif"], "failed to connect", None),
    "a collection, not an item": (lambda f, s, n: [s.url(f"{n}/imgs_1.json"), str(_collection(f))], "not an item", None),
}


def _collection(folder: Path) -> Path:
    (folder / "collection.json").write_text('{"type": "Collection", "stac_version": "1.0.0", "id": "c", "links": []}')
    return folder / "collection.json"


@pytest.mark.parametrize("failure", list(FAILURES))
def test_remote_failures_give_one_error_line_and_leave_nothing(failure, site, ctx, capsys):
    folder, server, name = site
    inputs, expect, fault = FAILURES[failure]
    t1, t2 = inputs(folder, server, name)
    if fault:
        server.fail(fault, times=None, min_offset=1, path=f"{name}/imgs_2/")
    before = snapshot(ctx.out)
    rc = main(["detect", "--t1", t1, "--t2", t2, "--model", "oscd-s2", "--out", str(ctx.out), "--overwrite", "--quiet"])
    assert_failed_cleanly(rc, capsys.readouterr().err, ctx.out, before, Case([], expect))


class _StacApi(BaseHTTPRequestHandler):
    """A STAC API (landing page, ``POST /search`` filtering by collection, bbox and datetime) over ``ITEMS``."""

    items: list[dict] = []

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, document: dict) -> None:
        body = json.dumps(document).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        base = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self._json({"type": "Catalog", "id": "api", "stac_version": "1.0.0", "description": "test API",
                    "conformsTo": ["https://api.stacspec.org/v1.0.0/core", "https://api.stacspec.org/v1.0.0/item-search"],
                    "links": [{"rel": "self", "href": base}, {"rel": "root", "href": base},
                              {"rel": "search", "href": base + "search", "method": "POST", "type": "application/geo+json"}]})

    def do_POST(self) -> None:
        query = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        start, _, end = query.get("datetime", "../..").partition("/")
        west, south, east, north = query.get("bbox", (-180, -90, 180, 90))

        def keep(item: dict) -> bool:
            when = dt.datetime.fromisoformat(item["properties"]["datetime"])
            b = item["bbox"]
            return (item["collection"] in query.get("collections", [item["collection"]])
                    and (start in ("", "..") or when >= dt.datetime.fromisoformat(start))
                    and (end in ("", "..") or when <= dt.datetime.fromisoformat(end))
                    and b[0] <= east and b[2] >= west and b[1] <= north and b[3] >= south)  # fmt: skip

        self._json({"type": "FeatureCollection", "features": [i for i in self.items if keep(i)], "links": []})


@pytest.fixture
def stac_api(site):
    folder, server, name = site
    items = []
    for date, when, cloud in (("imgs_1", "2016-11-30T10:57:00Z", 3.0), ("imgs_2", "2017-08-29T10:50:00Z", 1.0),
                              ("imgs_2", "2017-07-01T10:50:00Z", 80.0)):  # fmt: skip
        path = write_item(folder / date, folder / f"api_{when[:10]}.json", hrefs="url", base_url=server.url(name),
                          properties={"datetime": when, "eo:cloud_cover": cloud})  # fmt: skip
        items.append({**json.loads(path.read_text()), "collection": "sentinel-2-l1c"})
    handler = type("Api", (_StacApi,), {"items": items})
    with threaded_http_server(handler) as url:
        yield url, folder


def test_stac_api_search_saves_items_that_detect_reads(stac_api, local_outputs, capsys):
    api, folder = stac_api
    bbox = "2.3,48.8,2.45,48.9"
    rc = main(["stac-search", "--api", api, "--collection", "sentinel-2-l1c", "--bbox", bbox,
               "--datetime", "2016-01-01/2017-12-31", "--max-cloud", "0.2", "--out", str(folder / "found")])  # fmt: skip
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert rc == 0 and len(lines) == 2, captured.err  # the 80 % cloudy item is left out
    t1, t2 = (line.split("\t")[0] for line in lines)  # oldest first
    assert "2016-11-30" in lines[0] and "2017-08-29" in lines[1]
    result = detect_changes(t1, t2, folder / "out", DetectParams())
    assert result.path("change_mask.tif").read_bytes() == (local_outputs / "change_mask.tif").read_bytes()
    assert main(["stac-search", "--api", api, "--collection", "sentinel-2-l1c", "--bbox", "10,10,11,11",
                 "--out", str(folder / "none")]) == 0  # fmt: skip
    assert "0 item(s)" in capsys.readouterr().err


def test_an_unreachable_stac_api_is_one_error_line(capsys):
    rc = main(["stac-search", "--api", f"http://127.0.0.1:{_closed_port()}/", "--collection", "c", "--out", "/tmp/never"])
    assert_one_error_line(rc, capsys.readouterr().err, 2, "cannot reach")
    assert not Path("/tmp/never").exists()


def test_the_flow_reads_items_over_http_on_dask_workers(site, local_outputs, prefect_api):
    """Tiles are read in Dask worker processes: they get GDAL's HTTP settings and give the same bytes."""
    from flows.detect import DetectFlowParams, detect_pair, task_runner

    folder, server, name = site
    params = DetectFlowParams(t1=server.url(f"{name}/imgs_1.json"), t2=server.url(f"{name}/imgs_2.json"), out=str(folder / "flow"),
                              name="served")  # fmt: skip
    detect_pair.with_options(task_runner=task_runner(workers=1))(params)
    for output in ("change_mask.tif", "change_probability.tif"):
        assert (folder / "flow" / output).read_bytes() == (local_outputs / output).read_bytes(), output
    assert any(r.path.endswith(".tif") and r.status == 206 for r in server.requests())


def test_bbox_reads_only_the_area_of_interest_of_two_remote_cogs(tmp_path):
    """Both dates are 4096² COGs over HTTP (UTM); --bbox (WGS84) keeps t1's lattice and fetches a small part."""
    from rasterio.warp import transform_bounds

    y, x = np.mgrid[0:4096, 0:4096]
    base = ((np.sin(x / 97.0) + np.cos(y / 61.0)) * 800 + 2000).astype(np.uint16)
    transform = Affine(10.0, 0, 500000.0, 0, -10.0, 5400000.0)
    write_raster(tmp_path / "t1.tif", np.stack([base, base[::-1]]), transform=transform)
    write_raster(tmp_path / "t2.tif", np.stack([base[:, ::-1], base]), transform=transform)
    write_cogs(tmp_path, tmp_path / "www")
    area = (500000 + 10 * 1000, 5400000 - 10 * 1300, 500000 + 10 * 1300, 5400000 - 10 * 1000)  # 300² px
    bbox = transform_bounds("EPSG:32631", "EPSG:4326", *area)
    with RangeServer(tmp_path / "www") as server:
        result = detect_changes(server.url("t1.tif"), server.url("t2.tif"), tmp_path / "out", DetectParams(model="cva", bbox=list(bbox)))
        served = server.bytes_served()
    size = sum((tmp_path / "www" / n).stat().st_size for n in ("t1.tif", "t2.tif"))
    with rasterio.open(result.path("change_mask.tif")) as ds:
        col, row = ~transform @ (ds.transform.c, ds.transform.f)
        assert ds.transform.a == 10.0 and col == round(col) and row == round(row)  # t1's lattice
        assert 290 <= ds.width <= 340 and 290 <= ds.height <= 340  # the box, reprojected through WGS84
    # the 3 x 3 COG blocks (256²) the box touches are 3.5 % of each file; planning's passes (samples,
    # co-registration) and the tiles each read them again: about 3 reads
    assert served < 0.15 * size, (served, size)
    print(f"served {served} of {size} bytes ({served / size:.2%})")


@pytest.mark.parametrize("bbox, expect", [("10,10,11,11", "does not meet"), ("11,10,10,11", "west < east"), ("1,2,3", "4 numbers")])
def test_bad_bbox_is_one_error_line(bbox, expect, ctx, capsys):
    before = snapshot(ctx.out)
    rc = main(["detect", *ctx.args(), "--bbox", bbox, "--out", str(ctx.out), "--overwrite", "--quiet"])
    assert_failed_cleanly(rc, capsys.readouterr().err, ctx.out, before, Case([], expect))
