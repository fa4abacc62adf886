"""`fusar_edge.scan`'s pure geometry: the chip grid, pixel -> CRS / lon-lat, merging, GeoJSON."""

import json
import math
import warnings

import numpy as np
import pytest
import rasterio
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.rpc import RPC
from rasterio.transform import Affine, GCPTransformer, RPCTransformer, from_origin
from rasterio.warp import transform as warp

from fusar_edge.errors import InputError
from fusar_edge.scan.geojson import dumps, feature, feature_collection
from fusar_edge.scan.georef import SceneGeoref
from fusar_edge.scan.grid import Chip, chip_grid
from fusar_edge.scan.merge import Detection, edge_margin, merge_detections

# -- chip grid ----------------------------------------------------------------------------------


def _spec_offsets(size, chip, overlap):
    """The offsets as the spec words them, written independently of grid.py."""
    if size < chip:
        return [0]
    out, o = [], 0
    while o + chip < size:
        out.append(o)
        o += chip - overlap
    return out + [size - chip]


def _sizes(c):
    """Scene sizes around the chip size (smaller, equal, one more, a few chips and a ragged end)
    and real scene sizes."""
    out = [(1, 1), (5, 3), (max(c - 1, 1), c), (c, c), (c + 1, 2 * c), (3 * c + 5, 2 * c + 1)]
    return out + ([(1000, 600), (2048, 777), (25000, 16000)] if c == 504 else [])


# a stride of 1 px on a large scene is hundreds of thousands of chips: kept out to stay fast
CASES = [(w, h, c, o) for c in (1, 7, 64, 504) for o in sorted({0, 1 % c, min(64, c - 1), c // 2, c - 1})
         for w, h in _sizes(c)
         if len(_spec_offsets(w, c, o)) * len(_spec_offsets(h, c, o)) <= 5000]


@pytest.mark.parametrize("w,h,c,o", CASES)
def test_chip_grid_covers_the_scene_as_specified(w, h, c, o):
    grid = chip_grid(w, h, c, o)
    xs, ys = _spec_offsets(w, c, o), _spec_offsets(h, c, o)
    want = [(r, k, x, y) for r, y in enumerate(ys) for k, x in enumerate(xs)]
    assert [(g.row, g.col, g.x0, g.y0) for g in grid] == want
    assert [g.index for g in grid] == list(range(len(grid)))  # row-major
    for g in grid:
        assert (g.width, g.height) == (min(c, w), min(c, h))  # full size whenever the scene allows
        assert 0 <= g.x0 and g.x0 + g.width <= w and 0 <= g.y0 and g.y0 + g.height <= h
    for offs, size in ((xs, w), (ys, h)):
        ends = [x + min(c, size) for x in offs]
        assert offs[0] == 0 and ends[-1] == size  # both edges reached
        for i in range(len(offs) - 1):
            assert offs[i + 1] > offs[i] and ends[i] - offs[i + 1] >= o  # neighbours share >= overlap px
    if len(grid) * g.width * g.height <= 20_000_000:  # the 25000 x 16000 scene: per axis above
        hits = np.zeros((h, w), np.int32)
        for g in grid:
            hits[g.y0:g.y0 + g.height, g.x0:g.x0 + g.width] += 1
        assert hits.min() >= 1  # every pixel seen


def test_chip_grid_known_layout():
    grid = chip_grid(1000, 600, 504, 64)
    # x: 0, 440 (stride), then 496 aligned to the far edge; y: 0, then 96
    assert [(g.x0, g.y0) for g in grid] == [(0, 0), (440, 0), (496, 0), (0, 96), (440, 96), (496, 96)]
    assert grid[4] == Chip(index=4, row=1, col=1, x0=440, y0=96, width=504, height=504)
    assert chip_grid(300, 900, 504, 64) == [Chip(0, 0, 0, 0, 0, 300, 504), Chip(1, 1, 0, 0, 396, 300, 504)]
    assert chip_grid(504, 504, 504, 0) == [Chip(0, 0, 0, 0, 0, 504, 504)]


@pytest.mark.parametrize("args,message", [
    ((100, 100, 504, 600), "--overlap 600: must be smaller than --chip 504"),
    ((100, 100, 504, 504), "--overlap 504: must be smaller than --chip 504"),
    ((100, 100, 504, -1), "--overlap -1: must be at least 0"),
    ((100, 100, 0, 0), "--chip 0: must be at least 1"),
    ((100, 100, 504.5, 0), "--chip 504.5: expected an integer"),
    ((0, 100, 504, 0), "scene width 0: must be at least 1"),
    ((100, 0, 504, 0), "scene height 0: must be at least 1"),
])
def test_chip_grid_bad_values(args, message):
    with pytest.raises(InputError) as e:
        chip_grid(*args)
    assert str(e.value) == message


# -- georeference -------------------------------------------------------------------------------

W, H = 64, 48  # not square: a swapped axis shows


def _write(path, *, crs=None, transform=None, gcps=None, rpcs=None):
    profile = dict(driver="GTiff", width=W, height=H, count=1, dtype="uint8")
    if crs is not None:
        profile.update(crs=crs)
    if transform is not None:
        profile.update(transform=transform)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(np.zeros((1, H, W), np.uint8))
            if gcps is not None:
                dst.gcps = gcps
            if rpcs is not None:
                dst.rpcs = rpcs
    return path


def _georef(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            return SceneGeoref.from_dataset(ds)  # used after the file is closed below


# corners, edges, fractional positions and one point past the scene
PX = np.array([0.0, W, 0.0, W, 10.25, 33.5, 63.0, W + 5.0])
PY = np.array([0.0, 0.0, H, H, 7.75, 47.5, 1.0, -3.0])

AFFINE_CASES = {
    "utm_north": ("EPSG:32631", from_origin(500000.0, 5983520.0, 10.0, 10.0)),
    "utm_south": ("EPSG:32733", from_origin(300000.0, 8000000.0, 20.0, 20.0)),
    "lonlat": ("EPSG:4326", from_origin(3.0, 54.0, 0.001, 0.0005)),
    "rotated": ("EPSG:32631",
                Affine.translation(500000.0, 5983520.0) @ Affine.rotation(30.0) @ Affine.scale(10.0, -10.0)),
}


@pytest.mark.parametrize("name", sorted(AFFINE_CASES))
def test_affine_georef_matches_rasterio(name, tmp_path):
    crs, transform = AFFINE_CASES[name]
    g = _georef(_write(tmp_path / f"{name}.tif", crs=crs, transform=transform))
    assert g.kind == "affine" and g.describe() == {"kind": "affine", "crs": crs}
    want_x, want_y = rasterio.transform.xy(transform, PY, PX, offset="ul")
    X, Y = g.pixel_to_crs(PX, PY)
    np.testing.assert_allclose(X, want_x, rtol=0, atol=1e-6)
    np.testing.assert_allclose(Y, want_y, rtol=0, atol=1e-6)
    want_lon, want_lat = warp(crs, "EPSG:4326", want_x, want_y)
    lon, lat = g.pixel_to_lonlat(PX, PY)
    np.testing.assert_allclose(lon, want_lon, rtol=0, atol=1e-9)
    np.testing.assert_allclose(lat, want_lat, rtol=0, atol=1e-9)


def test_utm_north_corner_is_where_the_scene_is(tmp_path):
    # 500000 E is zone 31's central meridian (3 deg E); 5983520 N is 54 deg N
    g = _georef(_write(tmp_path / "n.tif", **dict(zip(("crs", "transform"), AFFINE_CASES["utm_north"]))))
    lon, lat = g.pixel_to_lonlat([0.0, 1.0], [0.0, 0.0])
    assert abs(lon[0] - 3.0) < 1e-9 and abs(lat[0] - 54.0) < 1e-3
    assert lon[1] > lon[0]  # one pixel east
    # the shape of the input is kept
    X, Y = g.pixel_to_crs(np.zeros((2, 3)), np.ones((2, 3)))
    assert X.shape == Y.shape == (2, 3) and np.all(X == 500000.0) and np.all(Y == 5983510.0)


def test_gcp_georef_matches_rasterio(tmp_path):
    crs = CRS.from_epsg(32631)
    gcps = [GroundControlPoint(row=r, col=c, x=500000.0 + 10.0 * c + 2.0 * r, y=5983520.0 - 10.0 * r + 1.5 * c,
                               z=0.0) for r, c in ((0, 0), (0, W), (H, 0), (H, W), (H / 2, W / 3))]
    g = _georef(_write(tmp_path / "gcps.tif", gcps=(gcps, crs)))
    assert g.describe() == {"kind": "gcps", "crs": "EPSG:32631"}
    with GCPTransformer(gcps) as t:
        want_x, want_y = t.xy(PY, PX, offset="ul")
    X, Y = g.pixel_to_crs(PX, PY)
    np.testing.assert_allclose(X, want_x, rtol=0, atol=1e-6)
    np.testing.assert_allclose(Y, want_y, rtol=0, atol=1e-6)
    assert abs(X[1] - (500000.0 + 10.0 * W)) < 1e-3  # the GCP at the top-right corner is honoured
    want_lon, want_lat = warp(crs, "EPSG:4326", want_x, want_y)
    lon, lat = g.pixel_to_lonlat(PX, PY)
    np.testing.assert_allclose(lon, want_lon, rtol=0, atol=1e-9)
    np.testing.assert_allclose(lat, want_lat, rtol=0, atol=1e-9)


def test_rpc_georef_matches_rasterio(tmp_path):
    # a linear RPC: sample grows with longitude, line grows southwards
    num = [0.0] * 20
    samp_num, line_num = list(num), list(num)
    samp_num[1], line_num[2] = 1.0, -1.0
    den = [1.0] + [0.0] * 19
    rpcs = RPC(height_off=0.0, height_scale=100.0, lat_off=54.0, lat_scale=0.01, line_den_coeff=den,
               line_num_coeff=line_num, line_off=H / 2, line_scale=H / 2, long_off=3.0, long_scale=0.01,
               samp_den_coeff=den, samp_num_coeff=samp_num, samp_off=W / 2, samp_scale=W / 2)
    g = _georef(_write(tmp_path / "rpcs.tif", rpcs=rpcs))
    assert g.describe() == {"kind": "rpcs", "crs": "EPSG:4326"}
    with rasterio.open(tmp_path / "rpcs.tif") as ds, RPCTransformer(ds.rpcs) as t:
        want_lon, want_lat = t.xy(PY, PX, offset="ul")
    lon, lat = g.pixel_to_lonlat(PX, PY)
    np.testing.assert_allclose(lon, want_lon, rtol=0, atol=1e-9)
    np.testing.assert_allclose(lat, want_lat, rtol=0, atol=1e-9)
    # RPC line/sample 0 is the first pixel's centre (GDAL's convention): our corner (0, 0) is half a
    # pixel (0.02 deg / 64 px, 0.02 deg / 48 px) west and north of lon 2.99, lat 54.01
    assert abs(lon[0] - (2.99 - 0.5 * 0.02 / W)) < 1e-8 and abs(lat[0] - (54.01 + 0.5 * 0.02 / H)) < 1e-8


def test_no_georef_is_pixel_space(tmp_path):
    g = _georef(_write(tmp_path / "plain.tif"))
    assert g.kind == "none" and g.describe() == {"kind": "none", "crs": None}
    assert g.pixel_to_lonlat(PX, PY) is None
    X, Y = g.pixel_to_crs(PX, PY)
    assert X.tolist() == PX.tolist() and Y.tolist() == PY.tolist()


def test_affine_without_crs_is_not_a_georef(tmp_path):
    g = _georef(_write(tmp_path / "nocrs.tif", transform=from_origin(500000.0, 5983520.0, 10.0, 10.0)))
    assert g.kind == "none"


# -- merge --------------------------------------------------------------------------------------

SW, SH = 944, 504  # two chips of 504 at overlap 64: x 0..504 and 440..944, sharing 440..504
A, B = chip_grid(SW, SH, 504, 64)


def _det(box, chip, label="ship"):
    return Detection(tuple(float(v) for v in box), label, chip.index, [box[0] - chip.x0, box[1] - chip.y0,
                                                                       box[2] - chip.x0, box[3] - chip.y0],
                     edge_margin(box, chip, SW, SH))


def test_grid_of_the_merge_scene():
    assert (A.x0, A.width, B.x0, B.width) == (0, 504, 440, 504)


def test_a_target_cut_by_a_chip_border_merges_into_the_whole_box():
    whole = (470, 200, 530, 230)  # inside B; crosses A's right border at x = 504
    cut = _det((470, 200, 504, 230), A)  # what A sees: truncated, IoU with the whole box 34/60
    full = _det(whole, B)
    assert cut.margin == 0.0 and full.margin == 30.0  # B's left border is 30 px away; its right one is the scene's
    for dets in ([cut, full], [full, cut]):
        merged = merge_detections(dets)
        assert len(merged) == 1
        assert merged[0].box == whole and merged[0].chip == B.index and merged[0].chip_box == [30, 200, 90, 230]


def test_distinct_nearby_targets_both_stay():
    a = _det((450, 100, 480, 120), B)
    b = _det((470, 100, 500, 120), A)  # IoU 10/50 = 0.2
    c = _det((450, 60, 470, 80), A)
    merged = merge_detections([a, b, c])
    assert [d.box for d in merged] == [c.box, a.box, b.box]  # sorted by (label, y0, x0)
    assert merge_detections([a, b], iou=0.2) == [a]  # at the threshold it suppresses; a is farther from a border


def test_labels_do_not_suppress_each_other():
    ship = _det((100, 100, 140, 120), A, "ship")
    plane = _det((100, 100, 140, 120), A, "aircraft")
    again = _det((101, 100, 141, 120), A, "ship")  # IoU 39/41 with `ship`
    merged = merge_detections([ship, again, plane])
    assert [(d.label, d.box) for d in merged] == [("aircraft", plane.box), ("ship", ship.box)]


def test_equal_margins_are_settled_by_chip_then_box_whatever_the_input_order():
    p = Detection((480.0, 10.0, 490.0, 20.0), "ship", B.index, [], 5.0)
    q = Detection((481.0, 10.0, 491.0, 20.0), "ship", A.index, [], 5.0)
    for dets in ([p, q], [q, p]):
        assert merge_detections(dets) == [q]


def test_scene_edge_borders_do_not_count_for_the_margin():
    # A's left, top and bottom borders are the scene's: only its right border (x = 504) counts
    assert edge_margin((0, 0, 20, 504), A, SW, SH) == 484.0
    assert edge_margin((480, 200, 500, 210), A, SW, SH) == 4.0
    # B's right border is the scene's edge: a box touching it is whole
    assert edge_margin((900, 0, 944, 10), B, SW, SH) == 460.0
    assert edge_margin((430, 5, 510, 9), A, SW, SH) == 0.0  # past the border counts as on it
    only = chip_grid(300, 200, 504, 0)[0]
    assert edge_margin((0, 0, 10, 10), only, 300, 200) == math.inf  # a chip that spans the scene cuts nothing
    # a box touching the scene edge is kept over a copy cut by an inner border
    edge = _det((0, 300, 30, 320), A)
    inner_cut = Detection((0.0, 300.0, 30.0, 320.0), "ship", 7, [], 0.0)
    assert merge_detections([inner_cut, edge]) == [edge]


def test_bad_iou():
    with pytest.raises(InputError, match=r"--iou 0.0: expected a value in \(0, 1\]"):
        merge_detections([], iou=0.0)


# -- GeoJSON ------------------------------------------------------------------------------------


def _shoelace(ring):
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))


@pytest.mark.parametrize("transform", [from_origin(500000.0, 5983520.0, 10.0, 10.0),  # north-up
                                       Affine(10.0, 0.0, 500000.0, 0.0, 10.0, 5983040.0)])  # south-up (flips the turn)
def test_feature_ring_is_closed_counterclockwise_and_rounded(transform):
    g = SceneGeoref("affine", "EPSG:32631", transform=transform)
    det = Detection((10.3, 20.0, 30.0, 25.7), "ship", 0, [10, 20, 30, 25])
    f = feature(det, g, {"label": "ship"})
    assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon" and f["properties"] == {"label": "ship"}
    (ring,) = f["geometry"]["coordinates"]
    assert len(ring) == 5 and ring[0] == ring[-1]
    assert _shoelace(ring) > 0  # counterclockwise in lon/lat
    assert all(round(v, 7) == v for pos in ring for v in pos)
    xs, ys = rasterio.transform.xy(transform, [20.0, 20.0, 25.7, 25.7], [10.3, 30.0, 30.0, 10.3], offset="ul")
    lon, lat = warp("EPSG:32631", "EPSG:4326", xs, ys)
    want = {(round(a, 7), round(b, 7)) for a, b in zip(lon, lat)}
    assert {tuple(p) for p in ring} == want
    assert any(round(v, 6) != v for pos in ring for v in pos)  # the 7th decimal is kept


def test_feature_without_georef_has_no_geometry():
    # pixel coordinates written as positions would be read as degrees (RFC 7946 wants WGS 84):
    # the feature keeps its properties (the caller's pixel box) and has a null geometry
    det = Detection((10.0, 20.0, 30.0, 25.0), "ship", 0, [])
    f = feature(det, SceneGeoref("none", None), {"scene_box": [10.0, 20.0, 30.0, 25.0]})
    assert f == {"type": "Feature", "geometry": None, "properties": {"scene_box": [10.0, 20.0, 30.0, 25.0]}}


def test_dumps_is_byte_stable():
    g = SceneGeoref("affine", "EPSG:32631", transform=from_origin(500000.0, 5983520.0, 10.0, 10.0))
    det = Detection((1.0, 2.0, 3.0, 4.0), "ship", 3, [1, 2, 3, 4])

    def build(props, meta):
        return dumps(feature_collection([feature(det, g, props)], meta))

    one = build({"label": "ship", "chip": 3}, {"scene": "s.tif", "georef": g.describe()})
    two = build({"chip": 3, "label": "ship"}, {"georef": {"crs": "EPSG:32631", "kind": "affine"}, "scene": "s.tif"})
    assert one == two and one.endswith("}\n") and one.count("\n") == 1
    fc = json.loads(one)
    assert fc["type"] == "FeatureCollection" and fc["metadata"]["scene"] == "s.tif" and len(fc["features"]) == 1
    assert dumps({"b": [1, 2.5], "a": {"d": None, "c": "é"}}) == '{"a":{"c":"\\u00e9","d":null},"b":[1,2.5]}\n'
    with pytest.raises(ValueError):
        dumps({"a": float("nan")})  # never written as invalid JSON


def test_a_box_across_the_antimeridian_is_cut_in_two():
    """RFC 7946 3.1.9: drawn whole, a box from lon 179.99 to -179.99 would span the globe."""
    import rasterio

    from fusar_edge.scan.geojson import feature
    from fusar_edge.scan.georef import SceneGeoref
    from fusar_edge.scan.merge import Detection

    georef = SceneGeoref("affine", "EPSG:4326", transform=rasterio.transform.Affine(1e-4, 0, 179.99, 0, -1e-4, 54.0))
    across = Detection(box=(50.0, 10.0, 150.0, 30.0), label="ship", chip=0, chip_box=(50.0, 10.0, 150.0, 30.0))
    geometry = feature(across, georef, {})["geometry"]
    assert geometry["type"] == "MultiPolygon" and len(geometry["coordinates"]) == 2
    west, east = (part[0] for part in geometry["coordinates"])
    assert all(179.99 <= lon <= 180 for lon, _ in west) and max(lon for lon, _ in west) == 180
    assert all(-180 <= lon <= -179.995 for lon, _ in east) and min(lon for lon, _ in east) == -180
    for ring in (west, east):
        assert ring[0] == ring[-1] and len(ring) == 5
        area = sum(ring[i][0] * ring[i + 1][1] - ring[i + 1][0] * ring[i][1] for i in range(len(ring) - 1))
        assert area > 0  # counterclockwise
        assert all(53.997 <= lat <= 53.999 + 1e-9 for _, lat in ring)
    inside = Detection(box=(10.0, 10.0, 40.0, 30.0), label="ship", chip=0, chip_box=(10.0, 10.0, 40.0, 30.0))
    assert feature(inside, georef, {})["geometry"]["type"] == "Polygon"


def test_a_box_holding_a_pole_is_a_polar_cap_not_a_sliver(tmp_path):
    """Polar stereographic (EPSG:3413), the north pole at pixel (500, 500): a box around it covers
    every longitude north of its edge. Its corners joined would make a zero-area sliver."""
    path = _write(tmp_path / "arctic.tif", crs="EPSG:3413", transform=from_origin(-5000.0, 5000.0, 10.0, 10.0))
    g = _georef(path)
    f = feature(Detection((490.0, 490.0, 510.0, 510.0), "ship", 0, [0, 0, 1, 1]), g, {})
    (ring,) = f["geometry"]["coordinates"]
    lons, lats = [p[0] for p in ring], [p[1] for p in ring]
    assert f["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and _shoelace(ring) > 0
    assert min(lons) == -180.0 and max(lons) == 180.0 and max(lats) == 90.0
    edge = [lat for lon, lat in ring if lat < 90.0]
    assert len(edge) > 32 and 89.99 < min(edge) < 89.9999  # the box's edge, ~100 m from the pole
    # a box beside the pole (3 km from it) is an ordinary quadrilateral
    geometry = feature(Detection((800.0, 490.0, 820.0, 510.0), "ship", 0, [0, 0, 1, 1]), g, {})["geometry"]
    assert geometry["type"] == "Polygon" and len(geometry["coordinates"][0]) == 5
