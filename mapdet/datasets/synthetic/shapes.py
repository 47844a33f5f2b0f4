"""Shapes and textures of the synthetic thing classes, one drawer per class.

A drawer ``draw(rng, h, w) -> (mask, rgb)`` fills an (h, w) crop: ``mask`` bool (h, w) is the
object's silhouette, ``rgb`` float32 (h, w, 3) its colours (only read under the mask). Every class
differs from the others in shape, colour and texture so a small detector can tell them apart;
the rare classes get the most distinctive ones. All drawing is vectorised over the crop.
"""

from __future__ import annotations

import numpy as np


def _uv(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates scaled to [0, 1]: v (h, 1) down, u (1, w) right."""
    return (np.arange(h)[:, None] + 0.5) / h, (np.arange(w)[None, :] + 0.5) / w


def _colour(rng, base, jitter: int = 18) -> np.ndarray:
    return np.clip(np.asarray(base, np.float32) + rng.integers(-jitter, jitter + 1, 3), 0, 255)


def _fill(h: int, w: int, base, parts=()) -> np.ndarray:
    rgb = np.empty((h, w, 3), np.float32)
    rgb[:] = base
    for region, colour in parts:
        rgb[np.broadcast_to(region, (h, w))] = colour
    return rgb


def car(rng, h, w):
    v, u = _uv(h, w)
    mask = np.abs(2 * u - 1) ** 4 + np.abs(2 * v - 1) ** 4 <= 1
    window = (v > 0.12) & (v < 0.42) & (np.abs(u - 0.5) < 0.33)
    wheel = (v > 0.78) & (np.minimum(np.abs(u - 0.22), np.abs(u - 0.78)) < 0.09)
    return mask, _fill(h, w, _colour(rng, (200, 30, 35)), [(window, (45, 55, 75)), (wheel, (15, 15, 15))])


def bus(rng, h, w):
    v, u = _uv(h, w)
    mask = np.abs(2 * u - 1) ** 8 + np.abs(2 * v - 1) ** 8 <= 1
    windows = (v > 0.15) & (v < 0.45) & (np.sin(u * 2 * np.pi * rng.integers(5, 9)) > -0.3)
    return mask, _fill(h, w, _colour(rng, (240, 150, 20)), [(windows, (50, 60, 80))])


def caravan(rng, h, w):
    v, u = _uv(h, w)
    mask = (np.abs(2 * u - 1) ** 6 + np.abs(2 * v - 1) ** 6 <= 1) & (v > 0.3 * (u - 0.8) / 0.2)
    stripes = ((u * w + v * h) // max(2, h // 6)) % 2 == 0
    return mask, _fill(h, w, _colour(rng, (235, 235, 235), 8), [(stripes, (0, 190, 200))])


def trailer(rng, h, w):
    v, u = _uv(h, w)
    mask = (v < 0.85) | (np.abs(u - 0.5) < 0.3)
    cell = max(2, h // 4)
    checker = ((np.arange(h)[:, None] // cell) + (np.arange(w)[None, :] // cell)) % 2 == 0
    return mask, _fill(h, w, _colour(rng, (140, 80, 30), 10), [(checker, (80, 45, 15))])


def pole(rng, h, w):
    v, u = _uv(h, w)
    grey = _colour(rng, (70, 72, 88), 10)
    shade = 0.75 + 0.35 * np.cos(np.pi * (u - 0.4))  # a lit cylinder
    rgb = np.broadcast_to(grey * shade[..., None], (h, w, 3)).astype(np.float32)
    return np.ones((h, w), bool), rgb


def person(rng, h, w):
    y, x = np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5
    r = min(w * 0.38, h * 0.14)
    head = (x - w / 2) ** 2 + (y - r) ** 2 <= r * r
    body_cy, body_ry = (2 * r + h) / 2, (h - 2 * r) / 2
    body = ((x - w / 2) / (w / 2)) ** 2 + ((y - body_cy) / body_ry) ** 2 <= 1
    legs = y > body_cy + body_ry * 0.3
    rgb = _fill(h, w, _colour(rng, (40, 70, 180)), [(legs, (30, 30, 60)), (head, _colour(rng, (225, 180, 140)))])
    return head | body, rgb


def sign(rng, h, w):
    v, u = _uv(h, w)
    mask = v >= np.abs(2 * u - 1)  # a triangle, apex up
    inner = (v - 0.3) / 0.6 >= np.abs(2 * (u - 0.5) / 0.6)
    return mask, _fill(h, w, (20, 20, 20), [(inner, _colour(rng, (235, 205, 0), 10))])


def street_light(rng, h, w):
    v, u = _uv(h, w)
    d = np.sqrt((2 * u - 1) ** 2 + (2 * v - 1) ** 2)
    glow = np.clip(1 - d, 0, 1)[..., None]
    rgb = _colour(rng, (245, 215, 110), 8) * (1 - glow) + np.float32([255, 255, 230]) * glow
    return d <= 1, rgb.astype(np.float32)


def traffic_light(rng, h, w):
    v, u = _uv(h, w)
    # three round lamps: distances in units of the width so they stay circular
    lamps = [((v - c) * h / w) ** 2 + (u - 0.5) ** 2 < 0.09 for c in (1 / 6, 0.5, 5 / 6)]
    parts = zip(lamps, ((230, 30, 30), (240, 200, 30), (40, 220, 60)))
    return np.ones((h, w), bool), _fill(h, w, _colour(rng, (25, 25, 25), 5), parts)


def bicycle(rng, h, w):
    y, x = np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5
    r = min(h * 0.4, w * 0.28)
    rings = [np.abs(np.hypot(x - cx, y - (h - r)) - r * 0.8) < max(r * 0.2, 0.8) for cx in (r, w - r)]
    bar = (np.abs(y - h * 0.35) < max(h * 0.07, 0.8)) & (x > r) & (x < w - r)
    return rings[0] | rings[1] | bar, _fill(h, w, _colour(rng, (30, 180, 70)))


def hydrant(rng, h, w):
    v, u = _uv(h, w)
    body = (np.abs(u - 0.5) < 0.3) & (v > 0.15)
    cap = ((u - 0.5) / 0.25) ** 2 + ((v - 0.18) / 0.18) ** 2 <= 1
    nubs = np.abs(v - 0.5) < 0.1
    bands = (np.arange(w)[None, :] % 3 == 0) & np.ones((h, 1), bool)
    return body | cap | nubs, _fill(h, w, _colour(rng, (210, 40, 210), 10), [(bands, (150, 20, 150))])


def bird(rng, h, w):
    v, u = _uv(h, w)
    mask = np.abs(v - (0.25 + 1.2 * np.abs(u - 0.5))) < 0.28  # wings in a V
    return mask, _fill(h, w, _colour(rng, (25, 20, 20), 8))


def group(draw, rng, h: int, w: int, members: int):
    """A crowd: ``members`` overlapping instances of one class side by side, as one segment."""
    mask = np.zeros((h, w), bool)
    rgb = np.zeros((h, w, 3), np.float32)
    step = w / (members + 1)
    for j in range(members):
        mh = max(2, int(h * rng.uniform(0.75, 1.0)))
        mw = max(2, min(w, int(2 * step)))
        x0 = min(int(j * step), w - mw)
        m, c = draw(rng, mh, mw)
        region = (slice(h - mh, h), slice(x0, x0 + mw))
        mask[region] |= m
        rgb[region][m] = c[m]
    return mask, rgb
