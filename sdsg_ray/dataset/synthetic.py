"""An Internet-like image set for one keyword ("bird"): several inlier modes plus rare planted outliers.

Inliers are stylised birds in four modes (``MODES``), varying pose, colour, scale, position, mirroring and
background (sky gradient, optional rolling ground): simple and consistent on purpose, so that a tiny
StyleGAN learns them in minutes on a CPU. Outliers (``OUTLIER_KINDS``) are what a keyword scrape also
returns, drawn ON THE SAME backgrounds WITH THE SAME palettes, as smooth filled shapes at the bird's size,
so that they differ from the birds in CONTENT, not in image statistics (every trivial detector of
``sdsg_ray.diagnostics`` stays <= 0.70 AUROC overall; a test checks it).

Every image is a pure function of ``(seed, index)``: the same seed gives the same bytes. Images are
written as a mix of .jpg and .png under ``<out>/images/``; ``<out>/labels.csv`` has
``key,is_outlier,kind,mode`` with ``key`` the full URI (what :meth:`Storage.list` yields), and
``<out>/preview.png`` shows inliers by mode and outliers by kind.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from sdsg_ray.artifacts.dataset import SyntheticDataset
from sdsg_ray.config import SDSGConfig
from sdsg_ray.imaging import encode_png, image_grid
from sdsg_ray.storage import Storage, join, normalize

log = logging.getLogger(__name__)

MODES = ("perched", "flying", "front", "wader")
# What the demo plants: another subject, a person, a poster, a line drawing, a collage.
OUTLIER_KINDS = ("animal", "person", "poster", "drawing", "collage")
# Kinds that mostly differ in statistics (sharp text, pixel noise), which trivial detectors catch; available
# through make_dataset(kinds=...) to show that the trivial-detector check can fail.
STATISTICAL_KINDS = ("text", "noise", "object", "cartoon", "clutter")
INLIER_KIND = "inlier"
LABEL_COLUMNS = ("key", "is_outlier", "kind", "mode")

# (sky top, sky bottom, ground): shared by inliers and outliers.
BACKGROUNDS = (
    ((90, 150, 230), (190, 220, 250), (80, 140, 60)),  # day over grass
    ((250, 140, 80), (250, 210, 150), (110, 80, 50)),  # sunset over earth
    ((150, 160, 170), (210, 215, 220), (100, 120, 90)),  # overcast
    ((40, 50, 100), (120, 100, 150), (50, 60, 50)),  # dusk
    ((120, 180, 230), (230, 220, 190), (210, 180, 120)),  # desert
)
# (body, accent, detail): bird plumage, reused for every outlier's colours.
PALETTES = (
    ((200, 40, 40), (240, 200, 60), (30, 30, 30)),
    ((40, 80, 200), (235, 235, 240), (25, 25, 40)),
    ((60, 160, 70), (240, 220, 80), (30, 40, 30)),
    ((140, 90, 50), (225, 200, 160), (40, 30, 20)),
    ((45, 45, 50), (240, 140, 40), (230, 230, 230)),
    ((240, 210, 40), (240, 130, 40), (40, 40, 40)),
)
BRANCH = (95, 65, 40)


@dataclass(frozen=True)
class Item:
    """What one image is: its index, label, kind and (inliers) mode, and file format."""

    index: int
    is_outlier: bool
    kind: str
    mode: str
    suffix: str


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int], amount: int = 18) -> tuple[int, int, int]:
    shift = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(np.asarray(colour) + shift, 0, 255))


class Canvas:
    """A supersampled drawing surface in unit coordinates ((0,0) top-left, (1,1) bottom-right)."""

    def __init__(self, background: Image.Image):
        self.size = background.size[0]
        self.image = background
        self.draw = ImageDraw.Draw(self.image)

    def px(self, points) -> list[tuple[float, float]]:
        return [(x * self.size, y * self.size) for x, y in points]

    def polygon(self, points, fill, outline=None, width: float = 0.0) -> None:
        self.draw.polygon(self.px(points), fill=fill, outline=outline, width=max(0, round(width * self.size)))

    def ellipse(self, cx, cy, rx, ry, fill, angle: float = 0.0, outline=None, width: float = 0.0) -> None:
        self.polygon(_ellipse_points(cx, cy, rx, ry, angle), fill, outline, width)

    def rect(self, x0, y0, x1, y1, fill) -> None:
        self.polygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], fill)

    def line(self, points, fill, width: float) -> None:
        self.draw.line(self.px(points), fill=fill, width=max(1, round(width * self.size)), joint="curve")


def _ellipse_points(cx, cy, rx, ry, angle=0.0, n=40) -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    return list(zip(cx + ca * x - sa * y, cy + sa * x + ca * y))


def _column(top: np.ndarray, bottom: np.ndarray, size: int) -> Image.Image:
    """A size x size vertical gradient, built as one column and stretched (C speed, no HxW maths)."""
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    column = (top + (bottom - top) * t).clip(0, 255).astype(np.uint8)  # [size, 1, 3]
    return Image.fromarray(column).resize((size, size), Image.Resampling.NEAREST)


def _background(rng: np.random.Generator, size: int, flat: bool = False) -> tuple[Image.Image, float]:
    """Sky gradient plus, most of the time, rolling ground; returns (RGB image, horizon height)."""
    top, bottom, ground = (np.array(_jitter(rng, c), np.float32) for c in BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
    if flat:  # posterised: each gradient becomes its mean colour (cartoon backdrop)
        top = bottom = (top + bottom) / 2
    sky = _column(top, bottom, size)
    horizon = 1.0
    if rng.random() < 0.75:
        horizon = float(rng.uniform(0.62, 0.85))
        amp, freq, phase = rng.uniform(0, 0.05), rng.uniform(1, 3), rng.uniform(0, 2 * math.pi)
        x = np.linspace(0, 1, 33)
        ridge = horizon + amp * np.sin(2 * math.pi * freq * x + phase)
        mask = Image.new("L", (size, size), 0)
        ridge_points = [(xi * size, yi * size) for xi, yi in zip(x, ridge)]
        ImageDraw.Draw(mask).polygon(ridge_points + [(size, size), (0, size)], fill=255)
        far = ground if flat else ground * np.float32(0.75)  # ground darkens toward the viewer
        sky.paste(_column(ground, far, size), (0, 0), mask)
    return sky, horizon


def _bird(c: Canvas, rng: np.random.Generator, mode: str, palette, horizon: float) -> None:
    """An inlier: one bird in one of the four ``MODES``."""
    body, accent, detail = (_jitter(rng, col, 12) for col in palette)
    s = float(rng.uniform(0.55, 0.85))  # overall size, fraction of the frame
    cx = 0.5 + float(rng.uniform(-0.1, 0.1))
    flip = -1.0 if rng.random() < 0.5 else 1.0  # facing right (+1) or left (-1)

    def fx(dx: float) -> float:
        return cx + flip * dx * s

    if mode == "perched":
        cy = 0.5 + float(rng.uniform(-0.08, 0.08))
        tilt = float(rng.uniform(-0.35, 0.1)) * flip
        c.line([(0.0, cy + 0.3 * s), (1.0, cy + 0.26 * s + rng.uniform(-0.05, 0.05))], _jitter(rng, BRANCH), 0.05 * s)
        c.polygon([(fx(-0.2), cy), (fx(-0.5), cy + 0.12 * s), (fx(-0.45), cy + 0.2 * s)], body)  # tail
        c.line([(fx(-0.02), cy + 0.15 * s), (fx(-0.04), cy + 0.3 * s)], detail, 0.02 * s)  # legs
        c.line([(fx(0.06), cy + 0.15 * s), (fx(0.06), cy + 0.3 * s)], detail, 0.02 * s)
        c.ellipse(cx, cy, 0.26 * s, 0.17 * s, body, tilt)
        c.ellipse(fx(0.02), cy + 0.04 * s, 0.15 * s, 0.09 * s, accent, tilt)  # belly/wing patch
        hx, hy = fx(0.22), cy - 0.15 * s
        c.ellipse(hx, hy, 0.12 * s, 0.12 * s, body)
        c.polygon([(fx(0.31), hy - 0.03 * s), (fx(0.44), hy + 0.02 * s), (fx(0.31), hy + 0.05 * s)], accent)  # beak
        c.ellipse(fx(0.25), hy - 0.03 * s, 0.025 * s, 0.025 * s, detail)
    elif mode == "flying":
        cy = min(horizon - 0.2, 0.42) + float(rng.uniform(-0.08, 0.08))
        wing = float(rng.uniform(0.35, 1.0)) * (1.0 if rng.random() < 0.7 else -0.6)  # up (+) or down (-) stroke
        for side in (-1.0, 1.0):  # far wing (darker) then near wing
            span = 0.5 * s * (0.8 if side < 0 else 1.0)
            tip = (fx(-0.05 + 0.05 * side), cy - math.sin(wing) * span)
            c.polygon([(fx(-0.12), cy), (fx(0.12), cy), tip], accent if side < 0 else body)
        c.polygon([(fx(-0.25), cy), (fx(-0.45), cy - 0.08 * s), (fx(-0.45), cy + 0.08 * s)], body)  # tail
        c.ellipse(cx, cy, 0.27 * s, 0.12 * s, body)
        c.ellipse(fx(0.28), cy - 0.04 * s, 0.09 * s, 0.08 * s, body)
        c.polygon([(fx(0.35), cy - 0.06 * s), (fx(0.46), cy - 0.03 * s), (fx(0.35), cy)], accent)
        c.ellipse(fx(0.3), cy - 0.06 * s, 0.02 * s, 0.02 * s, detail)
    elif mode == "front":
        cy = 0.52 + float(rng.uniform(-0.06, 0.06))
        lean = float(rng.uniform(-0.15, 0.15))
        c.line([(cx - 0.08 * s, cy + 0.3 * s), (cx - 0.1 * s, cy + 0.4 * s)], detail, 0.025 * s)  # feet
        c.line([(cx + 0.08 * s, cy + 0.3 * s), (cx + 0.1 * s, cy + 0.4 * s)], detail, 0.025 * s)
        c.ellipse(cx, cy + 0.05 * s, 0.25 * s, 0.3 * s, body, lean)
        c.ellipse(cx, cy + 0.12 * s, 0.15 * s, 0.2 * s, accent, lean)  # belly
        hx, hy = cx + lean * 0.3 * s, cy - 0.25 * s
        c.ellipse(hx, hy, 0.2 * s, 0.17 * s, body)
        for side in (-1.0, 1.0):
            c.ellipse(hx + side * 0.08 * s, hy - 0.02 * s, 0.06 * s, 0.06 * s, (240, 240, 235))
            c.ellipse(hx + side * 0.08 * s, hy - 0.02 * s, 0.03 * s, 0.03 * s, detail)
        c.polygon([(hx - 0.035 * s, hy + 0.05 * s), (hx + 0.035 * s, hy + 0.05 * s), (hx, hy + 0.12 * s)], accent)
    else:  # wader: long legs, long neck
        ground_y = min(horizon + 0.05, 0.92)
        cy = ground_y - 0.5 * s
        neck = float(rng.uniform(0.2, 0.9))  # neck angle from horizontal
        c.line([(fx(-0.03), cy + 0.05 * s), (fx(-0.06), ground_y)], detail, 0.018 * s)
        c.line([(fx(0.05), cy + 0.05 * s), (fx(0.1), ground_y)], detail, 0.018 * s)
        c.polygon([(fx(-0.18), cy - 0.02 * s), (fx(-0.36), cy + 0.06 * s), (fx(-0.2), cy + 0.08 * s)], body)
        c.ellipse(cx, cy, 0.21 * s, 0.1 * s, body, -0.2 * flip)
        hx, hy = fx(0.15 + 0.28 * math.cos(neck)), cy - 0.3 * s * math.sin(neck) - 0.05 * s
        c.line([(fx(0.14), cy - 0.03 * s), (hx, hy)], body, 0.05 * s)
        c.ellipse(hx, hy, 0.07 * s, 0.06 * s, body)
        c.polygon([(hx + flip * 0.05 * s, hy - 0.02 * s), (hx + flip * 0.25 * s, hy + 0.02 * s),
                   (hx + flip * 0.05 * s, hy + 0.03 * s)], accent)
        c.ellipse(hx + flip * 0.02 * s, hy - 0.015 * s, 0.015 * s, 0.015 * s, detail)


def _text(c: Canvas, rng: np.random.Generator, palette, horizon: float) -> None:
    """A statistical outlier: a few letters, sharp strokes, sometimes on a sign board."""
    body, accent, detail = (_jitter(rng, col, 12) for col in palette)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!?"
    lines = ["".join(letters[i] for i in rng.integers(len(letters), size=int(rng.integers(2, 5))))
             for _ in range(int(rng.integers(1, 3)))]
    size = c.size
    if rng.random() < 0.5:  # on a sign board
        x0, y0 = rng.uniform(0.1, 0.25), rng.uniform(0.15, 0.35)
        c.rect(x0, y0, 1 - x0, y0 + 0.45, accent)
    font_size = int(size * rng.uniform(0.22, 0.32))  # strokes of 1-2 output pixels: sharp, not learnable
    try:
        font = ImageFont.load_default(size=font_size)  # Pillow's bundled font: same glyphs on every machine
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    y = rng.uniform(0.15, 0.3) * size
    for line in lines:
        x = rng.uniform(0.05, 0.2) * size
        c.draw.text((x, y), line, fill=body if rng.random() < 0.7 else detail, font=font)
        y += font.size * 1.15 if hasattr(font, "size") else 12


def _noise(c: Canvas, rng: np.random.Generator, palette, horizon: float) -> None:
    colours = np.array([_jitter(rng, col, 12) for col in palette], np.uint8)
    size = c.size
    cells = int(rng.integers(12, 24))  # texture period: a few output pixels
    pattern = rng.integers(3)
    if pattern == 0:  # pixel noise
        idx = rng.integers(len(colours), size=(cells, cells))
    elif pattern == 1:  # stripes
        idx = (np.arange(cells)[:, None] + np.arange(cells)[None, :] * int(rng.integers(0, 2))) % 2 + np.zeros((cells, cells), int)
    else:  # checkerboard
        idx = (np.arange(cells)[:, None] + np.arange(cells)[None, :]) % 2
    texture = Image.fromarray(colours[idx]).resize((size, size), Image.Resampling.NEAREST)
    mask = Image.new("L", (size, size), 0)
    s = float(rng.uniform(0.55, 0.85))
    blob = _ellipse_points(0.5 + rng.uniform(-0.1, 0.1), 0.5 + rng.uniform(-0.08, 0.08), 0.3 * s, 0.25 * s,
                           float(rng.uniform(-0.5, 0.5)))
    ImageDraw.Draw(mask).polygon(c.px(blob), fill=255)
    c.image.paste(texture, (0, 0), mask)


def _object(c: Canvas, rng: np.random.Generator, palette, horizon: float) -> None:
    body, accent, detail = (_jitter(rng, col, 12) for col in palette)
    s = float(rng.uniform(0.55, 0.85))
    cx, base = 0.5 + float(rng.uniform(-0.1, 0.1)), min(horizon + 0.05, 0.9)
    if rng.random() < 0.5:  # a house: box, roof, door, windows
        w, h = 0.6 * s, 0.42 * s
        c.rect(cx - w / 2, base - h, cx + w / 2, base, body)
        c.polygon([(cx - w / 2 - 0.04, base - h), (cx + w / 2 + 0.04, base - h), (cx, base - h - 0.25 * s)], accent)
        c.rect(cx - 0.04 * s, base - 0.18 * s, cx + 0.04 * s, base, detail)
        for side in (-1, 1):
            x = cx + side * 0.15 * s
            c.rect(x - 0.05 * s, base - 0.28 * s, x + 0.05 * s, base - 0.2 * s, accent)
    else:  # a car: body, cabin, wheels
        w = 0.85 * s
        y = base - 0.1 * s
        c.rect(cx - w / 2, y - 0.15 * s, cx + w / 2, y, body)
        c.polygon([(cx - w / 4, y - 0.15 * s), (cx - w / 6, y - 0.28 * s), (cx + w / 6, y - 0.28 * s),
                   (cx + w / 4, y - 0.15 * s)], accent)
        for side in (-1, 1):
            c.ellipse(cx + side * w / 3, y, 0.07 * s, 0.07 * s, detail)


def _cartoon(c: Canvas, rng: np.random.Generator, palette, horizon: float) -> None:
    body, accent, detail = (_jitter(rng, col, 12) for col in palette)
    s = float(rng.uniform(0.55, 0.85))
    cx, cy = 0.5 + float(rng.uniform(-0.08, 0.08)), 0.5 + float(rng.uniform(-0.08, 0.08))
    width = 0.035 * s  # thick ink outlines
    for side in (-1, 1):  # ears
        c.polygon([(cx + side * 0.3 * s, cy - 0.05 * s), (cx + side * 0.32 * s, cy - 0.42 * s),
                   (cx + side * 0.08 * s, cy - 0.25 * s)], body, outline=detail, width=width)
    c.ellipse(cx, cy, 0.34 * s, 0.29 * s, body, outline=detail, width=width)
    for side in (-1, 1):
        c.ellipse(cx + side * 0.12 * s, cy - 0.06 * s, 0.06 * s, 0.08 * s, accent, outline=detail, width=width)
        for k in (-1, 0, 1):  # whiskers
            c.line([(cx + side * 0.12 * s, cy + 0.1 * s), (cx + side * 0.42 * s, cy + (0.06 + 0.06 * k) * s)], detail,
                   0.012 * s)
    c.polygon([(cx - 0.04 * s, cy + 0.05 * s), (cx + 0.04 * s, cy + 0.05 * s), (cx, cy + 0.1 * s)], accent,
              outline=detail, width=width / 2)


def _clutter(c: Canvas, rng: np.random.Generator, palette, horizon: float) -> None:
    colours = [_jitter(rng, col, 12) for col in palette] + [_jitter(rng, BRANCH)]
    for _ in range(int(rng.integers(10, 20))):
        x, y, r = rng.uniform(0.05, 0.95), rng.uniform(0.1, 0.95), rng.uniform(0.03, 0.09)
        colour = colours[rng.integers(len(colours))]
        shape = rng.integers(4)
        if shape == 0:
            c.ellipse(x, y, r, r * rng.uniform(0.5, 1.5), colour, float(rng.uniform(0, math.pi)))
        elif shape == 1:
            c.rect(x - r, y - r, x + r, y + r, colour)
        elif shape == 2:
            c.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], colour)
        else:
            c.line([(x - r, y - r * rng.uniform(-1, 1)), (x + r, y + r * rng.uniform(-1, 1))], colour, 0.02)


def _animal(c: Canvas, rng: np.random.Generator, palette, horizon: float) -> None:
    """Another subject: a four-legged animal (cat/dog/horse-like) standing on the ground, side view."""
    body, accent, detail = (_jitter(rng, col, 12) for col in palette)
    s = float(rng.uniform(0.55, 0.85))
    cx = 0.5 + float(rng.uniform(-0.1, 0.1))
    flip = -1.0 if rng.random() < 0.5 else 1.0
    ground_y = min(horizon + 0.05, 0.92)
    leg = float(rng.uniform(0.15, 0.28)) * s
    cy = ground_y - leg - 0.08 * s

    def fx(dx: float) -> float:
        return cx + flip * dx * s

    for dx in (-0.2, -0.12, 0.12, 0.2):  # legs
        c.line([(fx(dx), cy), (fx(dx), ground_y)], body if abs(dx) > 0.15 else accent, 0.05 * s)
    c.line([(fx(-0.28), cy - 0.02 * s), (fx(-0.42), cy - 0.18 * s * float(rng.uniform(-0.5, 1)))], body, 0.04 * s)
    c.ellipse(cx, cy, 0.3 * s, 0.12 * s, body)
    c.ellipse(fx(0.02), cy + 0.03 * s, 0.18 * s, 0.06 * s, accent)
    hx, hy = fx(0.34), cy - float(rng.uniform(0.1, 0.2)) * s
    c.line([(fx(0.22), cy - 0.02 * s), (hx, hy)], body, 0.1 * s)  # neck
    c.ellipse(hx, hy, 0.1 * s, 0.08 * s, body)
    c.ellipse(fx(0.42), hy + 0.02 * s, 0.06 * s, 0.04 * s, accent)  # muzzle
    c.polygon([(fx(0.28), hy - 0.05 * s), (fx(0.3), hy - 0.16 * s), (fx(0.35), hy - 0.06 * s)], body)  # ear
    c.ellipse(fx(0.37), hy - 0.02 * s, 0.02 * s, 0.02 * s, detail)


def _person(c: Canvas, rng: np.random.Generator, palette, horizon: float) -> None:
    """A person standing, front view: head, torso, arms and legs (smooth, palette colours)."""
    body, accent, detail = (_jitter(rng, col, 12) for col in palette)
    s = float(rng.uniform(0.55, 0.85))
    cx = 0.5 + float(rng.uniform(-0.1, 0.1))
    ground_y = min(horizon + 0.1, 0.95)
    top = ground_y - 0.95 * s
    head_r = 0.09 * s
    arm = float(rng.uniform(-0.6, 0.9))  # arm angle: down (-) to raised (+)
    shoulder_y = top + 2.2 * head_r
    hip_y = shoulder_y + 0.34 * s
    for side in (-1.0, 1.0):
        c.line([(cx + side * 0.06 * s, hip_y), (cx + side * 0.1 * s, ground_y)], detail, 0.06 * s)  # legs
        hand = (cx + side * (0.14 + 0.2 * math.cos(arm)) * s, shoulder_y - 0.2 * s * math.sin(arm))
        c.line([(cx + side * 0.1 * s, shoulder_y + 0.02 * s), hand], body, 0.05 * s)  # arms
        c.ellipse(hand[0], hand[1], 0.03 * s, 0.03 * s, accent)
    c.polygon([(cx - 0.12 * s, shoulder_y), (cx + 0.12 * s, shoulder_y), (cx + 0.1 * s, hip_y),
               (cx - 0.1 * s, hip_y)], body)  # torso
    c.ellipse(cx, top + head_r, head_r * 0.9, head_r, accent)  # face
    c.ellipse(cx, top + 0.5 * head_r, head_r, head_r * 0.55, detail)  # hair


def _poster(c: Canvas, rng: np.random.Generator, palette, horizon: float) -> None:
    """A poster / screenshot: a panel with a header bar, image blocks and lines of (unreadable) text."""
    body, accent, detail = (_jitter(rng, col, 12) for col in palette)
    s = float(rng.uniform(0.55, 0.85))
    cx, cy = 0.5 + float(rng.uniform(-0.08, 0.08)), 0.5 + float(rng.uniform(-0.06, 0.06))
    w, h = 0.62 * s, 0.48 * s
    x0, y0 = cx - w / 2, cy - h / 2
    c.rect(x0, y0, x0 + w, y0 + h, accent)
    c.rect(x0, y0, x0 + w, y0 + 0.18 * h, body)  # header bar
    split = float(rng.uniform(0.4, 0.6))
    c.rect(x0 + 0.06 * w, y0 + 0.28 * h, x0 + split * w, y0 + 0.9 * h, body)  # picture block
    for k in range(int(rng.integers(2, 4))):  # text lines, as thick bars
        y = y0 + (0.3 + 0.2 * k) * h
        c.rect(x0 + (split + 0.06) * w, y, x0 + float(rng.uniform(0.8, 0.94)) * w, y + 0.08 * h, detail)


class _OutlineCanvas(Canvas):
    """Draws every filled shape as its outline only: a line drawing of whatever is drawn on it."""

    def __init__(self, background: Image.Image, ink, width: float):
        super().__init__(background)
        self.ink, self.stroke = ink, width

    def polygon(self, points, fill, outline=None, width: float = 0.0) -> None:
        super().polygon(points, None, outline=self.ink, width=self.stroke)


def _drawing(c: Canvas, rng: np.random.Generator, palette, horizon: float) -> None:
    """A drawing: a bird sketched in outlines (no fills), the same poses as the inliers."""
    sketch = _OutlineCanvas(c.image, _jitter(rng, palette[0], 12), 0.04)
    _bird(sketch, rng, MODES[int(rng.integers(len(MODES)))], palette, horizon)


def _collage(c: Canvas, rng: np.random.Generator, palette, horizon: float) -> None:
    """A collage: two small scenes side by side (birds and the other subjects), each on its own backdrop."""
    subjects = (lambda cc, r, p, hz: _bird(cc, r, MODES[int(r.integers(len(MODES)))], p, hz), _animal, _person)
    half = c.size // 2
    for qx in range(2):
        tile, tile_horizon = _background(rng, c.size)
        subjects[int(rng.integers(len(subjects)))](Canvas(tile), rng, PALETTES[int(rng.integers(len(PALETTES)))],
                                                   tile_horizon)
        c.image.paste(tile.crop((half // 2, 0, half // 2 + half, c.size)), (qx * half, 0))


OUTLIER_DRAW: dict[str, Callable] = {
    "animal": _animal, "person": _person, "poster": _poster, "drawing": _drawing, "collage": _collage,
    "text": _text, "noise": _noise, "object": _object, "cartoon": _cartoon, "clutter": _clutter,
}


def plan(n: int, outlier_fraction: float, seed: int, kinds: tuple[str, ...] = OUTLIER_KINDS) -> list[Item]:
    """Which index is what: exactly round(n * fraction) outliers at random positions, kinds in turn (so
    every kind appears once n * fraction >= 5), inlier modes uniformly at random, jpg/png 50/50."""
    rng = np.random.default_rng([seed, 0x5D56])
    n_out = int(round(n * outlier_fraction))
    outliers = {int(i): k for k, i in enumerate(sorted(rng.permutation(n)[:n_out]))}
    items = []
    for index in range(n):
        suffix = ".jpg" if rng.random() < 0.5 else ".png"
        if index in outliers:
            items.append(Item(index, True, kinds[outliers[index] % len(kinds)], "", suffix))
        else:
            items.append(Item(index, False, INLIER_KIND, MODES[int(rng.integers(len(MODES)))], suffix))
    return items


def render(item: Item, resolution: int, seed: int) -> np.ndarray:
    """The image for one item: RxRx3 uint8, a pure function of (item, resolution, seed)."""
    rng = np.random.default_rng([seed, item.index])
    factor = 4 if resolution <= 64 else 2
    size = resolution * factor  # supersample, then box-downsample: antialiased edges
    # Cartoons sit on a flat (posterised) backdrop half the time, the shared sky otherwise.
    background, horizon = _background(rng, size, flat=item.kind == "cartoon" and rng.random() < 0.5)
    canvas = Canvas(background)
    palette = PALETTES[rng.integers(len(PALETTES))]
    if item.is_outlier:
        OUTLIER_DRAW[item.kind](canvas, rng, palette, horizon)
    else:
        _bird(canvas, rng, item.mode, palette, horizon)
    return np.asarray(canvas.image.reduce(factor), dtype=np.uint8)


def encode(image: np.ndarray, suffix: str, quality: int = 92) -> bytes:
    if suffix == ".png":
        return encode_png(image)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _preview(rows: list[list[int]], images: dict[int, np.ndarray], per_row: int = 8) -> np.ndarray:
    """The images of each row of indices, ``per_row`` tiles a row, upscaled to >= 64 px tiles."""
    some = next(iter(images.values()))
    blank = np.full_like(some, 255)
    tiles = [images[row[k]] if k < len(row) else blank for row in rows for k in range(per_row)]
    grid = image_grid(np.stack(tiles), per_row, pad=2)
    scale = max(1, 64 // some.shape[0])
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def make_dataset(
    out: str, n: int, resolution: int, outlier_fraction: float, seed: int, storage: Storage,
    kinds: tuple[str, ...] = OUTLIER_KINDS,
) -> dict:
    """Render and write the dataset under ``out``; returns a summary (counts per kind/mode, URIs, time)."""
    if n <= 0 or resolution < 8 or not 0.0 <= outlier_fraction <= 1.0:
        raise ValueError(f"make_dataset: need n > 0, resolution >= 8, 0 <= outlier_fraction <= 1; got "
                         f"n={n}, resolution={resolution}, outlier_fraction={outlier_fraction}")
    start = time.perf_counter()
    out = normalize(out)
    unknown = set(kinds) - set(OUTLIER_DRAW)
    if not kinds or unknown:
        raise ValueError(f"make_dataset: unknown outlier kinds {sorted(unknown)}; known: {sorted(OUTLIER_DRAW)}")
    items = plan(n, outlier_fraction, seed, tuple(kinds))
    dataset = SyntheticDataset(out)
    keys = {item.index: join(dataset.images, f"{item.index:06d}{item.suffix}") for item in items}
    # The preview's rows: inliers, one row per mode, then outliers, one row per kind.
    preview = [[i.index for i in items if i.mode == mode][:8] for mode in MODES]
    preview += [[i.index for i in items if i.kind == kind][:8]
                for kind in dict.fromkeys(i.kind for i in items if i.is_outlier)]
    preview_indices = {index for row in preview for index in row}
    kept: dict[int, np.ndarray] = {}
    with ThreadPoolExecutor(max_workers=8) as writers:  # uploads overlap rendering (S3 latency)
        pending = []
        for item in tqdm(items, desc="make-dataset", unit="img", mininterval=1.0):
            image = render(item, resolution, seed)
            if item.index in preview_indices:
                kept[item.index] = image
            pending.append(writers.submit(storage.write_bytes, keys[item.index], encode(image, item.suffix)))
        for future in pending:
            future.result()  # re-raise the first storage error, if any

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(LABEL_COLUMNS)
    writer.writerows([keys[item.index], int(item.is_outlier), item.kind, item.mode] for item in items)
    storage.write_text(dataset.labels, text.getvalue())
    storage.write_bytes(dataset.preview, encode_png(_preview(preview, kept)))

    summary = {
        "out": out, "n": n, "resolution": resolution, "seed": seed, "outliers": sum(i.is_outlier for i in items),
        "kinds": {k: sum(i.kind == k for i in items) for k in (INLIER_KIND,) + tuple(kinds)},
        "modes": {m: sum(i.mode == m for i in items) for m in MODES},
        "labels": dataset.labels, "preview": dataset.preview, "seconds": round(time.perf_counter() - start, 2),
    }
    log.info("wrote %d images (%d outliers) to %s in %.1fs", n, summary["outliers"], out, summary["seconds"])
    return summary


def run_make_dataset(config: SDSGConfig) -> dict:
    """``sdsg make-dataset``: reads ``config.dataset`` and ``config.storage``."""
    ds = config.dataset
    return make_dataset(ds.out, ds.n, ds.resolution, ds.outlier_fraction, ds.seed, Storage(config.storage))
