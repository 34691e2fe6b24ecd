"""The embedded demo dataset: procedurally rendered street scenes (photo, label map, Cityscapes-style
instance map) that a label-to-image GAN learns visibly on CPU in minutes, with nothing to download.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from .base import FieldSpec, Item, Problem, SourceError, SourceInfo, encode_png, sanitize_key

CLASS_NAMES = ("unlabeled", "sky", "building", "window", "road", "sidewalk",
               "lane_marking", "car", "tree", "pole", "person")
(UNLABELED, SKY, BUILDING, WINDOW, ROAD, SIDEWALK,
 LANE_MARKING, CAR, TREE, POLE, PERSON) = range(len(CLASS_NAMES))
# Things get one instance id per object (class_id * 1000 + index); everything else is stuff.
THING_CLASSES = (CAR, TREE, POLE, PERSON)

# Class colours are far apart on purpose: the label -> photo mapping must be learnable, while
# cars, people and buildings vary per instance so the instance map carries information.
_RGB = {k: np.array(v, np.float32) / 255 for k, v in {
    "glass": (48, 62, 92), "road": (88, 88, 94), "sidewalk": (172, 166, 154),
    "paint": (236, 234, 222), "tree": (62, 112, 44), "trunk": (92, 66, 44),
    "pole": (118, 116, 112), "tire": (22, 22, 24), "hood": (26, 28, 34),
    "taillight": (190, 30, 30), "skin": (214, 170, 140)}.items()}
_BUILDING_PALETTE = np.array([(196, 170, 134), (160, 92, 72), (150, 150, 146), (218, 204, 178),
                              (140, 114, 96), (182, 140, 112)], np.float32) / 255
_CAR_PALETTE = np.array([(235, 235, 235), (30, 30, 34), (160, 164, 170), (170, 30, 30),
                         (30, 60, 140), (40, 80, 50), (200, 160, 40), (110, 110, 116)],
                        np.float32) / 255
_CAMERA_HEIGHT = 1.6  # metres; every length below is in metres on the ground plane


class _Canvas:
    """A pinhole camera looking down the street and the layers it paints, painter's-algorithm
    style (later paints occlude earlier ones in all four maps alike). A point at lateral X, height
    v and depth Z lands at ``x = x_v + f X / Z``, ``y = y_h + f (h - v) / Z`` (h: camera height).
    """

    def __init__(self, width: int, height: int, f: float, x_v: float, y_h: float) -> None:
        h, w = self.height, self.width = height, width
        self.f, self.x_v, self.y_h = f, x_v, y_h
        self.image = np.zeros((h, w, 3), np.float32)
        self.label = np.zeros((h, w), np.uint8)
        self.instance = np.zeros((h, w), np.uint16)
        self.depth = np.full((h, w), np.inf, np.float32)  # drives the distance haze
        self.counters = dict.fromkeys(THING_CLASSES, 0)
        # Where each pixel's ray meets the ground (X, Z); rows above the horizon land beyond reach.
        s = np.maximum((np.arange(h, dtype=np.float32)[:, None] + 0.5 - y_h) / _CAMERA_HEIGHT, 1e-3)
        self.ground_x = (np.arange(w, dtype=np.float32)[None, :] + 0.5 - x_v) / s
        self.ground_z = np.broadcast_to(f / s, (h, w))

    def new_instance(self, cls: int) -> int:
        index = self.counters[cls]
        self.counters[cls] += 1
        return cls * 1000 + index

    def paint(self, box: tuple[slice, slice], mask: np.ndarray, cls: int, colour: np.ndarray,
              depth: float | np.ndarray, instance: int | None = None) -> None:
        self.label[box][mask] = cls
        self.instance[box][mask] = cls if instance is None else instance
        self.image[box][mask] = np.broadcast_to(colour, mask.shape + (3,))[mask]
        self.depth[box][mask] = np.broadcast_to(depth, mask.shape)[mask]


def _value_noise(rng: np.random.Generator, h: int, w: int, cell_y: float, cell_x: float) -> np.ndarray:
    """Smooth noise in [0, 1] of shape ``[h, w]``: a random lattice, bilinearly interpolated."""
    gy, gx = np.arange(h) / max(cell_y, 1e-3), np.arange(w) / max(cell_x, 1e-3)
    grid = rng.random((int(gy[-1]) + 2, int(gx[-1]) + 2), dtype=np.float32)
    y0, x0 = gy.astype(int), gx.astype(int)
    ty, tx = (gy - y0)[:, None], (gx - x0)[None, :]
    ty, tx = ty * ty * (3 - 2 * ty), tx * tx * (3 - 2 * tx)  # smoothstep hides the lattice
    top = grid[y0][:, x0] * (1 - tx) + grid[y0][:, x0 + 1] * tx
    bottom = grid[y0 + 1][:, x0] * (1 - tx) + grid[y0 + 1][:, x0 + 1] * tx
    return (top * (1 - ty) + bottom * ty).astype(np.float32)


def _solid(shape: tuple[int, ...], rgb) -> np.ndarray:
    """A writable ``[*shape, 3]`` colour array filled with ``rgb``."""
    return np.broadcast_to(np.asarray(rgb, np.float32), tuple(shape) + (3,)).copy()


def _front_box(canvas: _Canvas, z: float, x0: float, x1: float, top: float):
    """Pixels of a camera-facing plane at depth ``z`` spanning X in [x0, x1], height [0, top]:
    ``(box, X, v)`` with metric coordinates per pixel, or None when off-screen."""
    s = canvas.f / z
    c0, c1 = int(np.floor(canvas.x_v + s * x0)), int(np.ceil(canvas.x_v + s * x1))
    r0 = int(np.floor(canvas.y_h + s * (_CAMERA_HEIGHT - top)))
    r1 = int(np.ceil(canvas.y_h + s * _CAMERA_HEIGHT))
    c0, c1, r0, r1 = max(c0, 0), min(c1, canvas.width), max(r0, 0), min(r1, canvas.height)
    if c0 >= c1 or r0 >= r1:
        return None
    xs = (np.arange(c0, c1, dtype=np.float32) + 0.5 - canvas.x_v) / s
    vs = _CAMERA_HEIGHT - (np.arange(r0, r1, dtype=np.float32) + 0.5 - canvas.y_h) / s
    return (slice(r0, r1), slice(c0, c1)), xs[None, :], vs[:, None]


def _side_box(canvas: _Canvas, x_plane: float, z0: float, z1: float, top: float):
    """Pixels of the street-parallel plane X = ``x_plane`` between depths ``z0 < z1``, height
    [0, top]: ``(box, Z, v)`` like ``_front_box``, or None when off-screen."""
    ends = [canvas.x_v + canvas.f * x_plane / z for z in (z0, z1)]
    c0, c1 = max(int(np.floor(min(ends))), 0), min(int(np.ceil(max(ends))), canvas.width)
    r0 = max(int(np.floor(canvas.y_h + canvas.f * (_CAMERA_HEIGHT - top) / z0)), 0)
    r1 = min(int(np.ceil(canvas.y_h + canvas.f * _CAMERA_HEIGHT / z0)), canvas.height)
    if c0 >= c1 or r0 >= r1:
        return None
    box = (slice(r0, r1), slice(c0, c1))
    return (box, *_side_coords(canvas, x_plane, box[1], box[0]))


def _side_coords(canvas: _Canvas, x_plane: float, cols: slice, rows: slice):
    """Depth Z per column and height v per pixel on the street-parallel plane X = ``x_plane``."""
    dx = np.arange(cols.start, cols.stop, dtype=np.float32) + 0.5 - canvas.x_v
    z = canvas.f * x_plane / np.where(np.abs(dx) < 1e-3, 1e-3, dx)
    ys = np.arange(rows.start, rows.stop, dtype=np.float32) + 0.5 - canvas.y_h
    return z[None, :], _CAMERA_HEIGHT - ys[:, None] * z[None, :] / canvas.f


def _building(rng: np.random.Generator) -> dict:
    return {"height": rng.uniform(6, 28), "colour": _BUILDING_PALETTE[rng.integers(len(_BUILDING_PALETTE))]
            * rng.uniform(0.9, 1.08, 3).astype(np.float32), "floor": rng.uniform(2.8, 3.6),
            "spacing": rng.uniform(2.2, 3.4), "win_w": rng.uniform(0.35, 0.6),
            "win_h": rng.uniform(0.4, 0.6)}


def _paint_facade(canvas: _Canvas, box, mask, v, u, px_per_m, b: dict, shade: float,
                  depth: np.ndarray, salt: int) -> None:
    """Wall and window grid of one building over ``mask``: ``v`` is the height and ``u`` the
    position along the facade (metres). Windows too small to resolve are left out rather than
    aliased into moire."""
    fv, fu = (v - 0.6) / b["floor"], u / b["spacing"]
    rv, ru = fv - np.floor(fv), fu - np.floor(fu)
    win = (rv > 0.28) & (rv < 0.28 + b["win_h"]) & (np.abs(ru - 0.5) < b["win_w"] / 2)
    win &= px_per_m * min(b["spacing"] * b["win_w"], b["floor"] * b["win_h"]) >= 1.6
    win &= (v > 0.6) & (v < b["height"] - 0.8)
    # A stateless hash of the cell gives every window its own, stable shade.
    cell = np.sin(np.floor(fv) * 12.9898 + np.floor(fu) * 78.233 + salt * 0.618) * 43758.5453
    win_shade = (0.75 + 0.6 * (cell - np.floor(cell))).astype(np.float32)
    wall = b["colour"] * shade * np.where((rv < 0.05) | (v > b["height"] - 0.4), 0.82, 1.0)[..., None]
    canvas.paint(box, mask & ~win, BUILDING, wall, depth)
    canvas.paint(box, mask & win, WINDOW, _RGB["glass"] * win_shade[..., None], depth)


def _draw_buildings(canvas: _Canvas, street: dict, rng: np.random.Generator) -> None:
    rows = slice(0, canvas.height)
    sun = rng.uniform(0.68, 0.8)  # one side of the street is in shade
    salt = int(rng.integers(1 << 20)) * 64
    for side, x_plane in ((-1, street["x_bl"]), (1, street["x_br"])):
        edge = canvas.x_v + canvas.f * x_plane / street["z_max"]
        cols = slice(0, int(np.clip(np.ceil(edge), 0, canvas.width))) if side < 0 else \
            slice(int(np.clip(np.floor(edge), 0, canvas.width)), canvas.width)
        if cols.start >= cols.stop:
            continue
        z, v = _side_coords(canvas, x_plane, cols, rows)
        bounds = np.cumsum(rng.uniform(5, 18, 16))
        seg = np.minimum(np.searchsorted(bounds, z[0]), len(bounds) - 1)
        shade = 1.0 if (side > 0) == street["sun_right"] else sun
        for k in np.unique(seg):
            b = _building(rng)
            in_seg = (seg == k)[None, :]
            mask = in_seg & (v >= 0) & (v <= b["height"])
            px_per_m = canvas.f * abs(x_plane) / z**2  # along-facade pixels per metre shrink as 1/Z^2
            _paint_facade(canvas, (rows, cols), mask, v, z - (bounds[k - 1] if k else 0),
                          px_per_m, b, shade, np.broadcast_to(z, v.shape), salt + int(k) * 2 + (side > 0))
    b = _building(rng)
    b["height"] = rng.uniform(10, 30)
    found = _front_box(canvas, street["z_max"], street["x_bl"], street["x_br"], b["height"])
    if found is not None:
        box, xs, vs = found
        mask = np.ones((vs.shape[0], xs.shape[1]), bool)
        _paint_facade(canvas, box, mask, vs, xs - street["x_bl"],
                      np.float32(canvas.f / street["z_max"]), b, 0.9, street["z_max"], salt + 63)


def _draw_sky(canvas: _Canvas, rng: np.random.Generator) -> None:
    h, w = canvas.height, canvas.width
    top = np.array([0.32, 0.52, 0.84], np.float32) + rng.uniform(-0.05, 0.05, 3).astype(np.float32)
    low = np.array([0.74, 0.82, 0.92], np.float32) + rng.uniform(-0.04, 0.04, 3).astype(np.float32)
    t = np.clip(np.arange(h, dtype=np.float32) / max(canvas.y_h, 1), 0, 1)[:, None, None]
    sky = top * (1 - t) + low * t
    clouds = _value_noise(rng, h, w, h / 5, w / 7) * 0.6 + _value_noise(rng, h, w, h / 14, w / 20) * 0.4
    cover = np.clip((clouds - 0.5) / 0.25, 0, 1) * rng.uniform(0.2, 0.9)
    sky = sky * (1 - cover[..., None]) + 0.93 * cover[..., None]
    canvas.paint((slice(0, h), slice(0, w)), np.ones((h, w), bool), SKY, sky, np.inf)


def _draw_ground(canvas: _Canvas, street: dict, rng: np.random.Generator) -> None:
    box, x, z = (slice(None), slice(None)), canvas.ground_x, canvas.ground_z
    s = canvas.f / z  # pixels per metre
    ground = (z <= street["z_max"]) & (x >= street["x_bl"]) & (x <= street["x_br"])
    road = ground & (x > street["x_rl"]) & (x < street["x_rr"])
    hh, ww = z.shape
    grain = _value_noise(rng, hh, ww, 1.3, 1.3) - 0.5
    patches = _value_noise(rng, hh, ww, hh / 3, ww / 6) - 0.5
    asphalt = _RGB["road"] * (1 + 0.16 * grain + 0.14 * patches)[..., None]
    canvas.paint(box, road, ROAD, asphalt, z)
    # Paving tiles and a kerb: lines are kept at least ~1 px wide so they fade out, not alias.
    line = 0.05 + 0.6 / s
    tile = ((x % 1.2) < line) | ((z % 1.2) < line * 2)
    kerb = (np.abs(x - street["x_rl"]) < 0.25) | (np.abs(x - street["x_rr"]) < 0.25)
    paving = _RGB["sidewalk"] * np.where(tile, 0.86, 1.0)[..., None] * np.where(kerb, 1.1, 1.0)[..., None]
    canvas.paint(box, ground & ~road, SIDEWALK, paving * (1 + 0.1 * grain)[..., None], z)
    half = np.maximum(0.07, 0.5 / s)
    centre = (street["x_rl"] + street["x_rr"]) / 2
    dashes = ((z + street["dash_phase"]) % 9.0) < 3.5
    marks = (np.abs(x - centre) < half) & dashes
    marks |= (np.abs(x - street["x_rl"] - 0.35) < half) | (np.abs(x - street["x_rr"] + 0.35) < half)
    if street["crossing"] is not None:
        zc = street["crossing"]
        marks |= (z > zc) & (z < zc + 3.0) & (((x - centre) % 1.0) < 0.5)
    canvas.paint(box, road & marks, LANE_MARKING, _RGB["paint"] * (1 + 0.05 * grain)[..., None], z)


def _draw_car(canvas: _Canvas, obj: dict, rng: np.random.Generator) -> None:
    """Shadow, long side and rear face of one car (4.4 x 1.8 x 1.45 m), nose away from us."""
    z, xc = obj["z"], obj["x"]
    body = _CAR_PALETTE[rng.integers(len(_CAR_PALETTE))] * rng.uniform(0.9, 1.1)  # one paint per car
    length, inst = 4.4, canvas.new_instance(CAR)
    # The dark patch under a car ties it to the road plane.
    gz = canvas.ground_z
    under = (np.abs(canvas.ground_x - xc) < 1.0) & (gz > z - 0.3) & (gz < z + length)
    canvas.image[under & np.isin(canvas.label, (ROAD, SIDEWALK, LANE_MARKING))] *= 0.5
    x_in = xc - 0.9 if xc > 0.9 else xc + 0.9 if xc < -0.9 else None  # the side facing our axis
    found = _side_box(canvas, x_in, z, z + length, 1.45) if x_in is not None else None
    if found is not None:
        box, zz, v = found
        d, slant = zz - z, v - 0.95
        hull = (d >= 0) & (d <= length) & (v >= 0.28) & (v <= 0.95)
        cabin = (slant > 0) & (v <= 1.45) & (d >= 0.9 + slant * 0.8) & (d <= 3.4 - slant * 1.6)
        glass = cabin & (v > 1.02) & (v < 1.4) & (d > 1.1 + slant * 0.8) & (d < 3.2 - slant * 1.6)
        wheel = np.minimum((d - 0.8) ** 2, (d - length + 0.8) ** 2) / 0.34**2 + ((v - 0.32) / 0.32) ** 2 <= 1
        colour = _solid(v.shape, body)
        colour[glass], colour[wheel] = _RGB["glass"] * 0.7, _RGB["tire"]
        canvas.paint(box, hull | cabin | wheel, CAR, colour, np.broadcast_to(zz, v.shape), inst)
    found = _front_box(canvas, z, xc - 0.9, xc + 0.9, 1.45)
    if found is None:
        return
    box, x, v = found
    dx = np.abs(x - xc)
    hull = (v >= 0.28) & (v <= 0.95) & (dx <= 0.9)
    cabin = (v > 0.95) & (v <= 1.45) & (dx <= 0.8 - (v - 0.95) * 0.35)
    glass = (v > 1.0) & (v < 1.38) & (dx <= 0.68 - (v - 0.95) * 0.35)
    wheel = (v < 0.36) & (np.abs(dx - 0.62) < 0.2)
    light = (v > 0.68) & (v < 0.84) & (dx > 0.66) & (dx < 0.86)
    colour = _solid(hull.shape, body * 0.82)  # the rear face is turned away from the sky light
    colour[glass], colour[wheel], colour[light] = _RGB["glass"] * 0.6, _RGB["tire"], _RGB["taillight"]
    canvas.paint(box, hull | cabin | wheel, CAR, colour, z, inst)


def _draw_tree(canvas: _Canvas, obj: dict, rng: np.random.Generator) -> None:
    radius, centre = rng.uniform(1.4, 2.3), rng.uniform(3.6, 4.8)
    found = _front_box(canvas, obj["z"], obj["x"] - radius * 1.25, obj["x"] + radius * 1.25,
                       centre + radius * 1.2)
    if found is None:
        return
    box, x, v = found
    dx, dv = x - obj["x"], v - centre
    angle, phase = np.arctan2(dv, dx), rng.uniform(0, 6.3, 2)
    lumps = 1 + 0.12 * np.sin(3 * angle + phase[0]) + 0.08 * np.sin(7 * angle + phase[1])
    crown = np.hypot(dx, dv * 1.1) <= radius * lumps
    trunk = (np.abs(dx) < 0.16) & (v >= 0) & (v < centre)
    s = canvas.f / obj["z"]
    h, w = crown.shape
    leaves = _value_noise(rng, h, w, max(1.5, 0.45 * s), max(1.5, 0.45 * s))
    light = (0.62 + 0.5 * leaves + 0.12 * np.clip(dv / radius, -1, 1))[..., None]
    colour = _RGB["tree"] * rng.uniform(0.88, 1.12, 3).astype(np.float32) * light
    colour[trunk & ~crown] = _RGB["trunk"]
    canvas.paint(box, crown | trunk, TREE, colour, obj["z"], canvas.new_instance(TREE))


def _draw_pole(canvas: _Canvas, obj: dict, rng: np.random.Generator) -> None:
    top, reach = rng.uniform(6, 8), 1.3 * obj["toward_road"]
    lo, hi = min(obj["x"], obj["x"] + reach) - 0.3, max(obj["x"], obj["x"] + reach) + 0.3
    found = _front_box(canvas, obj["z"], lo, hi, top)
    if found is None:
        return
    box, x, v = found
    s = canvas.f / obj["z"]
    half = max(0.09, 0.5 / s)  # keep distant poles one pixel wide instead of dotted
    mast = (np.abs(x - obj["x"]) < half) & (v >= 0) & (v <= top)
    arm_x = (x - obj["x"]) * obj["toward_road"]
    arm = (arm_x >= 0) & (arm_x <= 1.3) & (v >= top - 0.14)
    lamp = (np.abs(arm_x - 1.2) < 0.25) & (v >= top - 0.32)
    colour = _solid(mast.shape, _RGB["pole"])
    colour[lamp & (v < top - 0.2)] = 0.9
    canvas.paint(box, mast | arm | lamp, POLE, colour, obj["z"], canvas.new_instance(POLE))


def _draw_person(canvas: _Canvas, obj: dict, rng: np.random.Generator) -> None:
    tall = rng.uniform(1.6, 1.85)
    found = _front_box(canvas, obj["z"], obj["x"] - 0.3, obj["x"] + 0.3, tall)
    if found is None:
        return
    box, x, v = found
    dx, stride = x - obj["x"], rng.uniform(0.0, 0.12)
    head = np.hypot(dx, v - tall + 0.12) <= 0.12
    torso = (v >= 0.85) & (v <= tall - 0.22) & (np.abs(dx) <= 0.2 + 0.04 * (v - 0.85))
    legs = (v >= 0) & (v < 0.85) & (np.abs(np.abs(dx) - 0.08 - stride * (0.85 - v)) < 0.075)
    colour = _solid(torso.shape, rng.uniform(0.1, 0.9, 3))  # shirts differ per person
    colour[legs] = rng.uniform(0.1, 0.35, 3).astype(np.float32)
    colour[head] = _RGB["skin"] * rng.uniform(0.55, 1.05)
    canvas.paint(box, head | torso | legs, PERSON, colour, obj["z"], canvas.new_instance(PERSON))


_DRAW = {"car": _draw_car, "tree": _draw_tree, "pole": _draw_pole, "person": _draw_person}


def _layout(rng: np.random.Generator) -> tuple[dict, list[dict]]:
    """The street's cross-section (lateral X in metres, camera at X = 0) and its objects."""
    centre, half = rng.uniform(-1.2, 1.2), rng.uniform(3.5, 5.5)
    street = {"x_rl": centre - half, "x_rr": centre + half, "z_max": rng.uniform(60, 110),
              "sun_right": bool(rng.random() < 0.5), "dash_phase": rng.uniform(0, 9),
              "crossing": rng.uniform(8, 22) if rng.random() < 0.35 else None}
    street["x_bl"] = street["x_rl"] - rng.uniform(2.5, 4.0)
    street["x_br"] = street["x_rr"] + rng.uniform(2.5, 4.0)
    far, objects = street["z_max"] * 0.75, []

    def row(kind: str, x: float, first: tuple, step: tuple, keep: float, **extra) -> None:
        z = rng.uniform(*first)
        while z < far:
            if rng.random() < keep:
                objects.append({"kind": kind, "x": x, "z": z, **extra})
            z += rng.uniform(*step)

    for side, kerb in ((-1, street["x_rl"]), (1, street["x_rr"])):
        row("car", kerb - side * 1.1, (3, 12), (5.2, 12), 0.7)
        row("tree", kerb + side * 0.9, (4, 12), (8, 16), 0.75)
        row("pole", kerb + side * 0.35, (6, 20), (14, 28), 0.85, toward_road=-side)
        for _ in range(rng.integers(0, 3)):
            x = kerb + side * rng.uniform(0.8, 2.2)
            objects.append({"kind": "person", "x": x, "z": rng.uniform(4, 30)})
    for side in rng.permutation([-1, 1])[:rng.integers(0, 3)]:  # traffic, clear of parked cars
        lane = centre + side * max(half - 3.3, 0.3)
        objects.append({"kind": "car", "x": lane, "z": rng.uniform(7, 45)})
    return street, objects


def _draw_hood(canvas: _Canvas, rng: np.random.Generator) -> None:
    """The ego vehicle's bonnet along the bottom edge, unlabeled as in Cityscapes."""
    h, w = canvas.height, canvas.width
    rise = h * rng.uniform(0.05, 0.09)
    x = (np.arange(w, dtype=np.float32) + 0.5) / w - 0.5
    y = np.arange(h, dtype=np.float32)[:, None] + 0.5
    hood = y >= h - rise * (1 - 1.6 * x * x)[None, :]
    sheen = (1 + 0.5 * np.exp(-((y - (h - rise)) / max(rise * 0.4, 1)) ** 2))[..., None]
    colour = np.broadcast_to(_RGB["hood"] * sheen, (h, w, 3))
    canvas.paint((slice(0, h), slice(0, w)), hood, UNLABELED, colour, 0.0)


def _finish(canvas: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Haze with distance, per-sample exposure and white balance, sensor noise; ``[H, W, 3]`` uint8."""
    haze = (1 - np.exp(-np.minimum(canvas.depth, 1e4) / 260))[..., None]
    haze[np.isinf(canvas.depth)] = 0
    image = canvas.image * (1 - haze) + np.float32(0.78) * haze
    gain = rng.uniform(0.85, 1.12) * (1 + rng.uniform(-0.05, 0.05, 3))
    image = image * gain.astype(np.float32)
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(0.012)
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)


def render(rng: np.random.Generator | int | Sequence[int], width: int = 256,
           height: int = 128) -> dict[str, np.ndarray]:
    """One street scene: ``image`` [H, W, 3] uint8, ``label`` [H, W] uint8 (ids into
    ``CLASS_NAMES``), ``instance`` [H, W] uint16 (``class * 1000 + index`` for things, the class
    id for stuff). ``rng`` is a Generator or anything ``np.random.default_rng`` accepts."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    canvas = _Canvas(width, height, f=0.5 * width * rng.uniform(0.92, 1.08),
                     x_v=width * (0.5 + rng.uniform(-0.07, 0.07)),
                     y_h=height * rng.uniform(0.36, 0.46))
    street, objects = _layout(rng)
    _draw_sky(canvas, rng)
    _draw_buildings(canvas, street, rng)
    _draw_ground(canvas, street, rng)
    for obj in sorted(objects, key=lambda o: -o["z"]):  # far to near: nearer objects occlude
        _DRAW[obj["kind"]](canvas, obj, rng)
    _draw_hood(canvas, rng)
    return {"image": _finish(canvas, rng), "label": canvas.label, "instance": canvas.instance}


def sample_seed(seed: int, split: str, index: int, width: int, height: int) -> list[int]:
    """The seed of one sample: a pure function of its coordinates (crc32, not the salted
    ``hash()``, so every process and every run agrees)."""
    return [int(seed), zlib.crc32(split.encode("utf-8")), int(index), int(width), int(height)]


def _parse_size(size: Sequence[int] | str) -> tuple[int, int]:
    try:
        width, height = (int(p) for p in (re.split(r"[x,]", size) if isinstance(size, str) else size))
    except (TypeError, ValueError):
        raise SourceError(f"demo size must be (width, height) or 'WxH', got {size!r}") from None
    if width < 32 or height < 16:
        raise SourceError(f"demo size must be at least 32x16, got {width}x{height}")
    return width, height


def split_counts(source: str, counts: Mapping[str, int] | None,
                 default: dict[str, int]) -> tuple[dict[str, int], dict[str, str]]:
    """A generated source's samples per split, checked, and the split of each key-safe name
    (keys carry the split through ``sanitize_key``)."""
    counts = dict(counts) if counts is not None else default
    for split, n in counts.items():
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise SourceError(f"{source} count for split {split!r} must be an int >= 0, got {n!r}")
    names = {sanitize_key(split): split for split in counts}
    if len(names) != len(counts):
        raise SourceError(f"{source} split names collide once made key-safe: {sorted(counts)}")
    return {split: int(n) for split, n in counts.items()}, names


class DemoSource:
    """Street scenes rendered on the fly; ``root`` is ignored. Sample ``i`` of split ``s`` depends
    only on ``(seed, s, i, size)``, so workers that receive a pickled source render it alike."""

    def __init__(self, root: object = None, size: Sequence[int] | str = (256, 128),
                 counts: Mapping[str, int] | None = None, seed: int = 0) -> None:
        self.size = _parse_size(size)
        self.counts, self._splits = split_counts("demo", counts, {"train": 384, "val": 128})
        self.seed = int(seed)
        self.info = SourceInfo(
            name="demo", task="label2image",
            fields=(FieldSpec("image", "image"), FieldSpec("label", "label"),
                    FieldSpec("instance", "instance")),
            num_classes=len(CLASS_NAMES), class_names=CLASS_NAMES, default_splits=tuple(self.counts))

    def list_items(self, split: str) -> tuple[list[Item], list[Problem]]:
        if split not in self.counts:
            raise SourceError(f"demo has no split {split!r}; available: {', '.join(self.counts)}")
        name = sanitize_key(split)
        return [Item(key=f"demo_{name}_{i:06d}") for i in range(self.counts[split])], []

    def sample(self, split: str, index: int) -> dict[str, np.ndarray]:
        """The arrays of one sample (see ``render``), without encoding."""
        width, height = self.size
        return render(sample_seed(self.seed, split, index, width, height), width, height)

    def read(self, item: Item) -> dict[str, bytes]:
        match = re.fullmatch(r"demo_(.+)_(\d+)", item.key)
        split = self._splits.get(match.group(1)) if match else None
        if split is None or int(match.group(2)) >= self.counts[split]:
            raise SourceError(f"not a demo sample key: {item.key!r}")
        arrays = self.sample(split, int(match.group(2)))
        return {f"{name}.png": encode_png(arrays[name]) for name in ("image", "label", "instance")}
