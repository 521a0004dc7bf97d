"""Demo world: deterministic synthetic SPair-71k, PF-Pascal and PF-Willow in their official on-disk formats.

Every category has a fixed template object (body shapes, limbs and coloured parts); an image is one instance
of it under a random rotation / anisotropic scale / shear / translation (optionally mirrored) with appearance
jitter, and its semantic keypoints are the transformed part centres. The files are packed as the official
archives, so the same fetch + parse code a real user runs consumes them; a spec gives byte-identical archives.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import math
import os
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image, ImageDraw

from sd4match.datasets import PFPASCAL_CLASSES, PFWILLOW_CLASSES, SPAIR_CATEGORIES
from sd4match.io import atomic_path

PathLike = str | os.PathLike[str]

PFWILLOW_SUBCLASSES = PFWILLOW_CLASSES
SPLITS: tuple[str, ...] = ("trn", "val", "test")

SPAIR_ARCHIVE = "SPair-71k.tar.gz"
PFPASCAL_IMAGES_ARCHIVE = "PF-dataset-PASCAL.zip"
PFPASCAL_PAIRS_ARCHIVE = "pf-pascal_image_pairs.zip"
PFWILLOW_IMAGES_ARCHIVE = "PF-dataset.zip"
PFWILLOW_PAIRS_CSV = "test_pairs.csv"

PFWILLOW_N_KPS = 10
ARCHIVE_MTIME = 1704067200  # 2024-01-01 00:00:00 UTC: a fixed member time keeps archives byte-identical
ZIP_DATE_TIME = (2024, 1, 1, 0, 0, 0)
MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: posix, Created by: sd4match.demo_world"
DEMO_SOURCE = "sd4match demo world"

# PF-Willow object class -> (template shared with SPair / PF-Pascal, image-name pattern of the real files).
_WILLOW_BASES: dict[str, tuple[str, str]] = {
    "car": ("car", "Cars_{num:03d}{letter}"),
    "duck": ("bird", "060_{num:04d}"),
    "motorbike": ("motorbike", "Motorbikes_{num:03d}{letter}"),
    "winebottle": ("bottle", "246_{num:04d}"),
}


@dataclass(frozen=True)
class DemoWorldSpec:
    """Sizes and seed of the demo world; the defaults give a CPU demo generated in a few seconds.

    SPair images are disjoint between splits (as in SPair-71k); PF-Pascal splits share one image pool per
    class but no pair (as in the PF-Pascal lists), and every trn pair is listed twice, with ``flip`` 0 and 1.
    """

    seed: int = 0
    image_size_range: tuple[int, int] = (160, 320)
    jpeg_quality: int = 90
    min_shared_kps: int = 3
    spair_categories: tuple[str, ...] = SPAIR_CATEGORIES
    spair_images_per_split: tuple[int, int, int] = (3, 2, 3)
    spair_pairs_per_split: tuple[int, int, int] = (6, 2, 3)
    pfpascal_classes: tuple[str, ...] = ("aeroplane", "car", "cat", "motorbike")
    pfpascal_images_per_class: int = 6
    pfpascal_pairs_per_split: tuple[int, int, int] = (6, 2, 3)
    pfwillow_subclasses: tuple[str, ...] = PFWILLOW_SUBCLASSES
    pfwillow_images_per_class: int = 3
    custom_categories: tuple[str, ...] = ("cat", "car")
    custom_images_per_category: int = 3

    def __post_init__(self) -> None:
        lo, hi = self.image_size_range
        if self.seed < 0:
            raise ValueError(f"DemoWorldSpec.seed must be >= 0, got {self.seed}")
        if not 64 <= lo < hi:
            raise ValueError(f"DemoWorldSpec.image_size_range must satisfy 64 <= lo < hi, got {(lo, hi)}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"DemoWorldSpec.jpeg_quality must be in 1..95, got {self.jpeg_quality}")
        if self.min_shared_kps < 1:
            raise ValueError(f"DemoWorldSpec.min_shared_kps must be >= 1, got {self.min_shared_kps}")
        for key in ("spair_images_per_split", "spair_pairs_per_split", "pfpascal_pairs_per_split"):
            if len(getattr(self, key)) != len(SPLITS):
                raise ValueError(
                    f"DemoWorldSpec.{key} needs one count per split {SPLITS}, got {getattr(self, key)}"
                )
        _check_names("spair_categories", self.spair_categories, SPAIR_CATEGORIES)
        _check_names("pfpascal_classes", self.pfpascal_classes, PFPASCAL_CLASSES)
        _check_names("pfwillow_subclasses", self.pfwillow_subclasses, PFWILLOW_SUBCLASSES)
        _check_names("custom_categories", self.custom_categories, SPAIR_CATEGORIES)
        _check_pair_budget("custom", self.custom_images_per_category, 1)
        for split, n_img, n_pairs in zip(
            SPLITS, self.spair_images_per_split, self.spair_pairs_per_split, strict=True
        ):
            _check_pair_budget(f"spair {split}", n_img, n_pairs)
        _check_pair_budget("pfpascal", self.pfpascal_images_per_class, sum(self.pfpascal_pairs_per_split))
        _check_pair_budget("pfwillow", self.pfwillow_images_per_class, 1)


def _check_names(key: str, names: Sequence[str], allowed: Sequence[str]) -> None:
    """Reject empty, duplicated or unknown category names in a spec field."""
    unknown = [n for n in names if n not in allowed]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(
            f"DemoWorldSpec.{key} must be distinct names from {list(allowed)}, got {list(names)}"
        )


def _check_pair_budget(where: str, n_images: int, n_pairs: int) -> None:
    """Reject pair counts that the image count cannot provide (ordered pairs of distinct images)."""
    if n_images < 2 or n_pairs < 1 or n_pairs > n_images * (n_images - 1):
        raise ValueError(
            f"DemoWorldSpec {where}: {n_pairs} pairs must be >= 1 and <= n*(n-1) for n={n_images} images"
        )


# ----------------------------------------------------------------------------------------------- randomness


def _stable_id(key: str | int) -> int:
    """A process-independent integer for a seed key (Python's str hash is salted per process)."""
    return key if isinstance(key, int) else zlib.crc32(key.encode("utf-8"))


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    """An independent generator for one named entity of the world (template, image, pair list)."""
    return np.random.default_rng([seed, *(_stable_id(k) for k in keys)])


# ------------------------------------------------------------------------------------------------- templates


@dataclass(frozen=True, eq=False)
class Shape:
    """A filled polygon in template coordinates (object centred at the origin, extent about 1)."""

    vertices: np.ndarray
    colour: tuple[int, int, int]


@dataclass(frozen=True, eq=False)
class Part:
    """A keypoint-bearing part: outer polygon, inner dot, both centred on the semantic keypoint."""

    centre: np.ndarray
    outer: Shape
    inner: Shape
    limb: bool


@dataclass(frozen=True, eq=False)
class Template:
    """A category's canonical object; keypoint ``i`` is the centre of ``parts[i]``."""

    name: str
    body: tuple[Shape, ...]
    parts: tuple[Part, ...]
    limb_colour: tuple[int, int, int]
    limb_width: float

    @property
    def keypoints(self) -> np.ndarray:
        """(K, 2) template keypoints."""
        return np.stack([p.centre for p in self.parts])

    def all_vertices(self) -> np.ndarray:
        """Every polygon vertex of the object, for its bounding box."""
        polys = [s.vertices for s in self.body] + [p.outer.vertices for p in self.parts]
        return np.concatenate(polys)


def _polygon(kind: str, centre: np.ndarray, radius: float, angle: float, aspect: float = 1.0) -> np.ndarray:
    """Vertices of a regular shape (circle, square, triangle, diamond, hexagon) scaled by ``aspect`` in y."""
    n = {"circle": 20, "square": 4, "triangle": 3, "diamond": 4, "hexagon": 6}[kind]
    phases = angle + 2 * np.pi * np.arange(n) / n + (np.pi / 4 if kind == "square" else 0.0)
    stretch = np.array([1.0, aspect * (1.6 if kind == "diamond" else 1.0)])
    local = np.stack([np.cos(phases), np.sin(phases)], axis=1) * radius * stretch
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return centre + (local @ rot.T if kind == "diamond" else local)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated random RGB colour (one channel high, one low)."""
    channels = rng.permutation([rng.integers(200, 256), rng.integers(0, 70), rng.integers(0, 256)])
    return (int(channels[0]), int(channels[1]), int(channels[2]))


def _body(rng: np.random.Generator) -> tuple[Shape, ...]:
    """Body of a template: a main ellipse, a star-shaped 'head' polygon and a rectangular 'base'."""
    a, b = rng.uniform(0.55, 0.85), rng.uniform(0.3, 0.55)
    t = np.linspace(0.0, 2 * np.pi, 32, endpoint=False)
    main = np.stack([a * np.cos(t), b * np.sin(t)], axis=1)
    n_head = int(rng.integers(3, 8))
    head_centre = np.array([rng.choice([-1.0, 1.0]) * rng.uniform(0.45, 0.7), -rng.uniform(0.2, 0.45)])
    phases = 2 * np.pi * np.arange(2 * n_head) / (2 * n_head)
    radii = np.where(np.arange(2 * n_head) % 2 == 0, rng.uniform(0.22, 0.32), rng.uniform(0.1, 0.18))
    head = head_centre + np.stack([radii * np.cos(phases), radii * np.sin(phases)], axis=1)
    w, h, x0 = rng.uniform(0.3, 0.7), rng.uniform(0.08, 0.18), rng.uniform(-0.3, 0.3)
    base = np.array([[x0 - w / 2, b * 0.6], [x0 + w / 2, b * 0.6], [x0 + w / 2, b + h], [x0 - w / 2, b + h]])
    return (Shape(main, _colour(rng)), Shape(head, _colour(rng)), Shape(base, _colour(rng)))


def _part_centres(rng: np.random.Generator, radii: np.ndarray, n_sym: int) -> np.ndarray:
    """Separated part centres; the first ``2 * n_sym`` are left/right mirror pairs (x -> -x)."""
    centres: list[np.ndarray] = []
    for _ in range(20000):
        i = len(centres)
        c = rng.uniform([-0.9, -0.65], [0.9, 0.65])
        is_twin = i < 2 * n_sym and i % 2 == 1
        if is_twin:
            c = centres[-1] * np.array([-1.0, 1.0])
        elif i < 2 * n_sym and abs(c[0]) < radii[i] + 0.08:
            continue
        if all(np.linalg.norm(c - o) >= radii[i] + radii[j] + 0.03 for j, o in enumerate(centres)):
            centres.append(c)
        elif is_twin:
            centres.pop()
        if len(centres) == len(radii):
            return np.stack(centres)
    raise RuntimeError(f"demo_world: could not place {len(radii)} separated template parts")


def make_template(name: str, seed: int = 0) -> Template:
    """The fixed template object of a category (or PF-Willow base object); same name and seed, same template.

    Parts come in left/right look-alike pairs and share a small colour palette, so a keypoint is identified by
    its context on the object, not by its colour alone (matching is non-trivial but learnable).
    """
    rng = _rng(seed, "template", name)
    body = _body(rng)
    semi_axes = body[0].vertices.max(axis=0)  # the main ellipse; parts off it hang on limbs
    n_parts = int(rng.integers(PFWILLOW_N_KPS, 15))
    n_sym = int(rng.integers(2, 4))
    radii = rng.uniform(0.07, 0.12, size=n_parts)
    radii[1 : 2 * n_sym : 2] = radii[0 : 2 * n_sym : 2]
    centres = _part_centres(rng, radii, n_sym)
    palette = [_colour(rng) for _ in range(max(3, n_parts // 2))]
    kinds = ["circle", "square", "triangle", "diamond", "hexagon"]
    parts: list[Part] = []
    for i in range(n_parts):
        twin = i < 2 * n_sym and i % 2 == 1
        if twin:
            prev = parts[-1]
            mirror = np.array([-1.0, 1.0])
            outer = Shape(prev.outer.vertices[::-1] * mirror, prev.outer.colour)
            inner = Shape(prev.inner.vertices[::-1] * mirror, prev.inner.colour)
            parts.append(Part(centres[i], outer, inner, prev.limb))
            continue
        kind = kinds[int(rng.integers(len(kinds)))]
        angle = rng.uniform(0, 2 * np.pi)
        outer = Shape(_polygon(kind, centres[i], radii[i], angle), palette[int(rng.integers(len(palette)))])
        inner = Shape(
            _polygon("circle", centres[i], 0.4 * radii[i], 0.0), palette[int(rng.integers(len(palette)))]
        )
        on_body = (centres[i][0] / semi_axes[0]) ** 2 + (centres[i][1] / semi_axes[1]) ** 2 <= 1.0
        parts.append(Part(centres[i], outer, inner, not on_body or bool(rng.random() < 0.3)))
    order = rng.permutation(n_parts)  # keypoint ids are not sorted by position nor by symmetry
    return Template(
        name=name,
        body=body,
        parts=tuple(parts[k] for k in order),
        limb_colour=_colour(rng),
        limb_width=float(rng.uniform(0.03, 0.06)),
    )


# ------------------------------------------------------------------------------------------------- instances


@dataclass(frozen=True)
class Style:
    """How much instances of one dataset vary: pose ranges, clutter and occlusion."""

    rot_max_deg: float
    mirror_prob: float
    shift: float
    scale_range: tuple[float, float]
    anisotropy: float
    max_clutter: int
    occlusion_prob: float


SPAIR_STYLE = Style(35.0, 0.35, 0.12, (0.3, 0.5), 1.3, 4, 0.3)
PFPASCAL_STYLE = Style(15.0, 0.0, 0.08, (0.34, 0.48), 1.15, 3, 0.15)
_WILLOW_STYLES: dict[str, Style] = {
    "G": Style(25.0, 0.0, 0.06, (0.32, 0.44), 1.2, 3, 0.0),
    "M": Style(15.0, 0.0, 0.06, (0.32, 0.44), 1.15, 2, 0.0),
    "S": Style(6.0, 0.0, 0.04, (0.34, 0.42), 1.08, 1, 0.0),
    "wC": Style(12.0, 0.0, 0.05, (0.32, 0.44), 1.15, 6, 0.0),
    "woC": Style(12.0, 0.0, 0.05, (0.32, 0.44), 1.15, 0, 0.0),
}


@dataclass(frozen=True, eq=False)
class Pose:
    """Template -> image map ``p -> A p + t``; ``mirror`` when A includes a horizontal reflection."""

    matrix: np.ndarray
    translation: np.ndarray
    mirror: bool
    rotation_deg: float

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Map (N, 2) template points into the image."""
        return points @ self.matrix.T + self.translation


@dataclass(eq=False)
class Instance:
    """One rendered image with its annotation in pixel coordinates (x right, y down)."""

    name: str
    image: Image.Image
    kps: np.ndarray  # (K, 2) float64, also where invisible
    visible: np.ndarray  # (K,) bool: inside the image and not occluded
    bbox: tuple[float, float, float, float]  # object's bbox clipped to the image
    truncated: bool
    occluded: bool
    pose: Pose

    @property
    def width(self) -> int:
        """Image width in pixels."""
        return self.image.width

    @property
    def height(self) -> int:
        """Image height in pixels."""
        return self.image.height

    @property
    def azimuth_id(self) -> int:
        """Viewpoint bin 0..7 (45 degrees each); a mirrored instance faces the other way (+180 degrees)."""
        azimuth = self.pose.rotation_deg + (180.0 if self.pose.mirror else 0.0)
        return int(((azimuth + 22.5) % 360.0) // 45.0)


def _image_size(rng: np.random.Generator, size_range: tuple[int, int]) -> tuple[int, int]:
    """A random non-square (width, height) inside the spec's range."""
    lo, hi = size_range
    width, height = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    if width == height:
        height = height - 1 if height > lo else height + 1
    return width, height


def _sample_pose(rng: np.random.Generator, size: tuple[int, int], style: Style) -> Pose:
    """Random rotation, anisotropic scale, shear, optional mirror and translation of the template."""
    width, height = size
    theta = math.radians(rng.uniform(-style.rot_max_deg, style.rot_max_deg))
    mirror = bool(rng.random() < style.mirror_prob)
    scale = rng.uniform(*style.scale_range) * min(width, height)
    aniso = rng.uniform(1.0 / style.anisotropy, style.anisotropy, size=2)
    shear = rng.uniform(-0.12, 0.12)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    matrix = rot @ np.diag(scale * aniso) @ np.array([[1.0, shear], [0.0, 1.0]])
    if mirror:
        matrix = matrix @ np.diag([-1.0, 1.0])
    shift = rng.uniform(-style.shift, style.shift, size=2) * np.array([width, height])
    translation = np.array([width / 2.0, height / 2.0]) + shift
    return Pose(matrix, translation, mirror, math.degrees(theta))


def _jitter(colour: tuple[int, int, int], gain: float, rng: np.random.Generator) -> tuple[int, int, int]:
    """Appearance jitter of one colour: global gain plus per-channel noise."""
    values = np.clip(np.asarray(colour, dtype=float) * gain + rng.normal(0.0, 12.0, size=3), 0, 255)
    return (int(values[0]), int(values[1]), int(values[2]))


def _background(rng: np.random.Generator, size: tuple[int, int], max_clutter: int) -> Image.Image:
    """Smooth random colour texture plus a few distractor shapes."""
    width, height = size
    cells = (int(rng.integers(3, 7)), int(rng.integers(3, 7)))
    base = rng.uniform(40, 215, size=3)
    coarse = np.clip(base + rng.normal(0.0, 35.0, size=(cells[1], cells[0], 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    kinds = ["circle", "square", "triangle", "hexagon"]
    for _ in range(int(rng.integers(0, max_clutter + 1))):
        centre = rng.uniform([0, 0], [width, height])
        radius = rng.uniform(0.04, 0.14) * min(width, height)
        kind = kinds[int(rng.integers(len(kinds)))]
        poly = _polygon(kind, centre, radius, rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.5))
        draw.polygon([tuple(p) for p in poly], fill=_colour(rng))
    return image


def _draw_object(draw: ImageDraw.ImageDraw, template: Template, pose: Pose, rng: np.random.Generator) -> None:
    """Paint the transformed template: body, limbs to some parts, then the parts on top."""
    gain = rng.uniform(0.8, 1.2)
    for shape in template.body:
        draw.polygon([tuple(p) for p in pose.apply(shape.vertices)], fill=_jitter(shape.colour, gain, rng))
    origin = pose.apply(np.zeros((1, 2)))[0]
    width = max(1, round(template.limb_width * math.sqrt(abs(np.linalg.det(pose.matrix)))))
    limb_colour = _jitter(template.limb_colour, gain, rng)
    for part in template.parts:
        if part.limb:
            end = pose.apply(part.centre[None])[0]
            draw.line([tuple(origin), tuple(end)], fill=limb_colour, width=width)
    for part in template.parts:
        for shape in (part.outer, part.inner):
            draw.polygon(
                [tuple(p) for p in pose.apply(shape.vertices)], fill=_jitter(shape.colour, gain, rng)
            )


def _occlude(
    draw: ImageDraw.ImageDraw,
    kps: np.ndarray,
    visible: np.ndarray,
    size: tuple[int, int],
    rng: np.random.Generator,
) -> np.ndarray:
    """Paint a disc over a random visible keypoint; return the mask of keypoints it hides."""
    radius = rng.uniform(0.08, 0.15) * min(size)
    centre = kps[rng.choice(np.flatnonzero(visible))] + rng.uniform(-0.5, 0.5, size=2) * radius
    box = [centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius]
    draw.ellipse(box, fill=_colour(rng))
    return np.linalg.norm(kps - centre, axis=1) <= radius + 1.0


def render_instance(
    template: Template,
    name: str,
    rng: np.random.Generator,
    size_range: tuple[int, int],
    style: Style,
    require_visible: int = 0,
) -> Instance:
    """Render one random instance of ``template``; its first ``require_visible`` keypoints are kept in view.

    Keypoints outside ``[0, W-1] x [0, H-1]`` or under the occluder are invisible; the bbox is the object's
    bbox clipped to the image.
    """
    size = _image_size(rng, size_range)
    width, height = size
    for _ in range(200):
        pose = _sample_pose(rng, size, style)
        kps = pose.apply(template.keypoints)
        inside = (kps[:, 0] >= 0) & (kps[:, 0] <= width - 1) & (kps[:, 1] >= 0) & (kps[:, 1] <= height - 1)
        if inside[:require_visible].all() and inside.any():
            break
    else:
        raise RuntimeError(f"demo_world: no pose of template {template.name!r} keeps its keypoints in {size}")
    image = _background(rng, size, style.max_clutter)
    draw = ImageDraw.Draw(image)
    _draw_object(draw, template, pose, rng)
    hidden = np.zeros(len(kps), dtype=bool)
    if rng.random() < style.occlusion_prob:
        hidden = _occlude(draw, kps, inside, size, rng)
    noisy = np.asarray(image, dtype=np.float64) + rng.normal(0.0, 4.0, size=(height, width, 3))
    image = Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
    corners = pose.apply(template.all_vertices())
    x1, y1 = corners.min(axis=0)
    x2, y2 = corners.max(axis=0)
    truncated = bool(x1 < 0 or y1 < 0 or x2 > width - 1 or y2 > height - 1)
    bbox = (max(0.0, x1), max(0.0, y1), min(width - 1.0, x2), min(height - 1.0, y2))
    return Instance(name, image, kps, inside & ~hidden, bbox, truncated, bool((hidden & inside).any()), pose)


def _voc_names(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    """``n`` new PASCAL-VOC-like image stems (``2008_000123``), unique against ``taken`` (updated)."""
    names: list[str] = []
    while len(names) < n:
        name = f"{int(rng.integers(2007, 2012))}_{int(rng.integers(1, 8000)):06d}"
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def _select_pairs(
    instances: Sequence[Instance],
    n_pairs: int,
    min_shared: int,
    rng: np.random.Generator,
    where: str,
    exclude: Iterable[tuple[int, int]] = (),
) -> list[tuple[int, int]]:
    """``n_pairs`` random ordered pairs of distinct images sharing >= ``min_shared`` visible keypoints."""
    banned = set(exclude)
    candidates = [p for p in itertools.permutations(range(len(instances)), 2) if p not in banned]
    chosen: list[tuple[int, int]] = []
    for k in rng.permutation(len(candidates)):
        src, trg = candidates[int(k)]
        if (instances[src].visible & instances[trg].visible).sum() >= min_shared:
            chosen.append((src, trg))
        if len(chosen) == n_pairs:
            return sorted(chosen, key=lambda p: (instances[p[0]].name, instances[p[1]].name))
    raise ValueError(
        f"demo_world {where}: only {len(chosen)} of {n_pairs} pairs share >= {min_shared} visible keypoints; "
        "use more images or a smaller min_shared_kps"
    )


# ------------------------------------------------------------------------------------------------- encoders


def _jpeg(image: Image.Image, quality: int) -> bytes:
    """JPEG bytes with a fixed quality (deterministic)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    """PNG bytes (deterministic)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _mat(variables: dict[str, np.ndarray]) -> bytes:
    """Compressed MATLAB 5 .mat bytes; the header's creation time is replaced by a fixed text."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, variables, do_compression=True, format="5")
    data = bytearray(buf.getvalue())
    data[:116] = MAT_HEADER.ljust(116, b" ")
    return bytes(data)


def _json_line(obj: dict) -> bytes:
    """JSON in the SPair files' style: one line, default separators, trailing newline."""
    return (json.dumps(obj) + "\n").encode("utf-8")


def _csv(rows: Sequence[Sequence[str]]) -> bytes:
    """CSV text with ``\\n`` line ends (cells never need quoting here)."""
    return "".join(",".join(row) + "\n" for row in rows).encode("utf-8")


def _g15(value: float) -> str:
    """A coordinate as in the PF-Pascal test CSV (MATLAB-style 15 significant digits)."""
    return format(float(value), ".15g")


def _archive_entries(files: dict[str, bytes]) -> list[str]:
    """Directory entries (``a/``) and file names, each directory before its content, sorted by component."""
    dirs = {"/".join(name.split("/")[:i]) + "/" for name in files for i in range(1, name.count("/") + 1)}
    return sorted([*dirs, *files], key=lambda n: n.rstrip("/").split("/"))


def _write_tar_gz(path: Path, files: dict[str, bytes]) -> None:
    """A reproducible .tar.gz (fixed mtimes, owners, modes, order; gzip header without name/time)."""
    with atomic_path(path) as tmp, tmp.open("wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for name in _archive_entries(files):
                    info = tarfile.TarInfo(name.rstrip("/"))
                    info.mtime, info.uid, info.gid, info.uname, info.gname = ARCHIVE_MTIME, 0, 0, "", ""
                    if name.endswith("/"):
                        info.type, info.mode = tarfile.DIRTYPE, 0o755
                        tar.addfile(info)
                    else:
                        info.mode, info.size = 0o644, len(files[name])
                        tar.addfile(info, io.BytesIO(files[name]))


def _write_zip(path: Path, files: dict[str, bytes]) -> None:
    """A reproducible .zip (fixed date_time, attributes, order; deflated)."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for name in _archive_entries(files):
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
            info.create_system = 3
            if name.endswith("/"):
                info.external_attr = (0o40755 << 16) | 0x10
                zf.writestr(info, b"")
            else:
                info.external_attr = 0o100644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, files[name])


# ------------------------------------------------------------------------------------------------- SPair-71k


@dataclass
class _SpairSplit:
    """Pair ids already used per split (ids run across categories, as in the official layout)."""

    next_id: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 1))
    large: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    small: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in SPLITS})


def _int(value: float) -> int:
    """A pixel coordinate rounded to a plain int (the SPair JSON files store integers)."""
    return int(round(float(value)))


def spair_image_annotation(inst: Instance, category: str) -> dict:
    """The ImageAnnotation JSON object of one SPair image (field order of the official files)."""
    kps = {
        str(i): ([_int(x), _int(y)] if vis else None)
        for i, ((x, y), vis) in enumerate(zip(inst.kps, inst.visible, strict=True))
    }
    return {
        "filename": f"{inst.name}.jpg",
        "src_database": DEMO_SOURCE,
        "src_annotation": DEMO_SOURCE,
        "src_image": "synthetic",
        "image_width": inst.width,
        "image_height": inst.height,
        "image_depth": 3,
        "category": category,
        "pose": "Left" if inst.pose.mirror else "Right",
        "truncated": int(inst.truncated),
        "occluded": int(inst.occluded),
        "difficult": 0,
        "bndbox": [_int(v) for v in inst.bbox],
        "kps": kps,
        "azimuth_id": inst.azimuth_id,
    }


def _variation(src: Instance, trg: Instance) -> tuple[int, int]:
    """(viewpoint_variation, scale_variation), each 0/1/2.

    Viewpoint: circular distance d of the azimuth bins, 0 if d == 0, 1 if d <= 2, else 2. Scale: ratio r of
    the bbox diagonals, 0 if r < 1.5, 1 if r < 2, else 2.
    """
    d = abs(src.azimuth_id - trg.azimuth_id)
    d = min(d, 8 - d)
    viewpoint = 0 if d == 0 else (1 if d <= 2 else 2)
    diag = [max(1.0, math.hypot(b[2] - b[0], b[3] - b[1])) for b in (src.bbox, trg.bbox)]
    ratio = max(diag) / min(diag)
    return viewpoint, 0 if ratio < 1.5 else (1 if ratio < 2.0 else 2)


def spair_pair_annotation(pair_id: int, src: dict, trg: dict, src_inst: Instance, trg_inst: Instance) -> dict:
    """The PairAnnotation JSON object of one SPair pair from the two ImageAnnotation objects.

    Keypoints are the mutually visible ones in id order; ``truncation``/``occlusion`` are 0 none, 1 source,
    2 target, 3 both; ``mirror`` is 1 when exactly one of the two instances is mirrored.
    """
    ids = [k for k, v in src["kps"].items() if v is not None and trg["kps"].get(k) is not None]
    src_stem, trg_stem = src["filename"][:-4], trg["filename"][:-4]
    viewpoint, scale = _variation(src_inst, trg_inst)
    return {
        "pair_id": pair_id,
        "filename": f"{pair_id:06d}-{src_stem}-{trg_stem}:{src['category']}",
        "src_imname": src["filename"],
        "trg_imname": trg["filename"],
        "src_imsize": [src["image_width"], src["image_height"], src["image_depth"]],
        "trg_imsize": [trg["image_width"], trg["image_height"], trg["image_depth"]],
        "src_bndbox": src["bndbox"],
        "trg_bndbox": trg["bndbox"],
        "category": src["category"],
        "src_pose": src["pose"],
        "trg_pose": trg["pose"],
        "src_kps": [src["kps"][k] for k in ids],
        "trg_kps": [trg["kps"][k] for k in ids],
        "kps_ids": ids,
        "mirror": int(src_inst.pose.mirror != trg_inst.pose.mirror),
        "viewpoint_variation": viewpoint,
        "scale_variation": scale,
        "truncation": src["truncated"] + 2 * trg["truncated"],
        "occlusion": src["occluded"] + 2 * trg["occluded"],
    }


def _spair_category(
    spec: DemoWorldSpec, category: str, files: dict[str, bytes], ids: _SpairSplit, taken: set[str]
) -> None:
    """Add one category's images, ImageAnnotation and PairAnnotation files; register its pairs per split."""
    template = make_template(category, spec.seed)
    root = "SPair-71k"
    for split, n_images, n_pairs in zip(
        SPLITS, spec.spair_images_per_split, spec.spair_pairs_per_split, strict=True
    ):
        rng = _rng(spec.seed, "spair", category, split)
        names = sorted(_voc_names(rng, n_images, taken))
        insts = [render_instance(template, n, rng, spec.image_size_range, SPAIR_STYLE) for n in names]
        annos = [spair_image_annotation(inst, category) for inst in insts]
        for inst, anno in zip(insts, annos, strict=True):
            files[f"{root}/JPEGImages/{category}/{inst.name}.jpg"] = _jpeg(inst.image, spec.jpeg_quality)
            files[f"{root}/ImageAnnotation/{category}/{inst.name}.json"] = _json_line(anno)
        pairs = _select_pairs(insts, n_pairs, spec.min_shared_kps, rng, f"spair {split} {category}")
        for k, (s, t) in enumerate(pairs):
            pair = spair_pair_annotation(ids.next_id[split], annos[s], annos[t], insts[s], insts[t])
            ids.next_id[split] += 1
            files[f"{root}/PairAnnotation/{split}/{pair['filename']}.json"] = _json_line(pair)
            ids.large[split].append(pair["filename"])
            if k < math.ceil(n_pairs / 5):  # 'small' layout: a fixed subset (~1/5) of each category's pairs
                ids.small[split].append(pair["filename"])


def make_spair(out_dir: PathLike, spec: DemoWorldSpec = DemoWorldSpec()) -> Path:
    """Write the demo ``SPair-71k.tar.gz`` (official layout under ``SPair-71k/``) into ``out_dir``."""
    files: dict[str, bytes] = {}
    ids = _SpairSplit()
    taken: set[str] = set()
    for category in spec.spair_categories:
        _spair_category(spec, category, files, ids, taken)
    for size, layout in (("large", ids.large), ("small", ids.small)):
        for split in SPLITS:
            files[f"SPair-71k/Layout/{size}/{split}.txt"] = "".join(f"{n}\n" for n in layout[split]).encode()
    path = Path(out_dir) / SPAIR_ARCHIVE
    _write_tar_gz(path, files)
    return path


# ------------------------------------------------------------------------------------------------- PF-Pascal


def pfpascal_annotation(inst: Instance) -> dict[str, np.ndarray]:
    """The ``.mat`` variables of a PF-Pascal image: ``kps`` (K x 2, NaN rows invisible), ``bbox`` (1 x 4)."""
    kps = np.where(inst.visible[:, None], inst.kps, np.nan).astype(np.float64)
    bbox = np.array([[_int(v) for v in inst.bbox]], dtype=np.float64)
    return {"kps": kps, "bbox": bbox}


def _pfpascal_test_row(src: Instance, trg: Instance, class_id: int, image_dir: str) -> list[str]:
    """One test CSV row: image paths, class id, then the mutually visible keypoints ';'-separated."""
    shared = src.visible & trg.visible
    xa, ya = src.kps[shared].T
    xb, yb = trg.kps[shared].T
    coords = [";".join(_g15(v) for v in values) for values in (xa, ya, xb, yb)]
    return [f"{image_dir}/{src.name}.jpg", f"{image_dir}/{trg.name}.jpg", str(class_id), *coords]


def make_pfpascal(out_dir: PathLike, spec: DemoWorldSpec = DemoWorldSpec()) -> tuple[Path, Path]:
    """Write the demo ``PF-dataset-PASCAL.zip`` and ``pf-pascal_image_pairs.zip`` into ``out_dir``.

    trn rows list every pair with ``flip`` 0 and 1 and are shuffled, val rows are shuffled with ``flip`` 0,
    and test rows are grouped by class with their keypoints inline (the layouts of the official lists).
    """
    image_dir = "PF-dataset-PASCAL/JPEGImages"
    images: dict[str, bytes] = {}
    rows: dict[str, list[list[str]]] = {s: [] for s in SPLITS}
    taken: set[str] = set()
    for cls in spec.pfpascal_classes:
        class_id = PFPASCAL_CLASSES.index(cls) + 1
        rng = _rng(spec.seed, "pfpascal", cls)
        template = make_template(cls, spec.seed)
        names = sorted(_voc_names(rng, spec.pfpascal_images_per_class, taken))
        insts = [render_instance(template, n, rng, spec.image_size_range, PFPASCAL_STYLE) for n in names]
        for inst in insts:
            images[f"{image_dir}/{inst.name}.jpg"] = _jpeg(inst.image, spec.jpeg_quality)
            images[f"PF-dataset-PASCAL/Annotations/{cls}/{inst.name}.mat"] = _mat(pfpascal_annotation(inst))
        used: list[tuple[int, int]] = []
        for split, n_pairs in zip(SPLITS, spec.pfpascal_pairs_per_split, strict=True):
            pairs = _select_pairs(insts, n_pairs, spec.min_shared_kps, rng, f"pfpascal {split} {cls}", used)
            used += pairs
            for s, t in pairs:
                paths = [
                    f"{image_dir}/{insts[s].name}.jpg",
                    f"{image_dir}/{insts[t].name}.jpg",
                    str(class_id),
                ]
                if split == "test":
                    rows[split].append(_pfpascal_test_row(insts[s], insts[t], class_id, image_dir))
                else:
                    rows[split].extend([*paths, flip] for flip in (("0", "1") if split == "trn" else ("0",)))
    order_rng = _rng(spec.seed, "pfpascal", "row order")
    for split in ("trn", "val"):
        rows[split] = [rows[split][int(k)] for k in order_rng.permutation(len(rows[split]))]
    headers = {
        "trn": ["source_image", "target_image", "class", "flip"],
        "val": ["source_image", "target_image", "class", "flip"],
        "test": ["source_image", "target_image", "class", "XA", "YA", "XB", "YB"],
    }
    pair_files = {f"{s}_pairs.csv": _csv([headers[s], *rows[s]]) for s in SPLITS}
    out = Path(out_dir)
    _write_zip(out / PFPASCAL_IMAGES_ARCHIVE, images)
    _write_zip(out / PFPASCAL_PAIRS_ARCHIVE, pair_files)
    return out / PFPASCAL_IMAGES_ARCHIVE, out / PFPASCAL_PAIRS_ARCHIVE


# ------------------------------------------------------------------------------------------------- PF-Willow


def _willow_names(subclass: str, rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct image stems in the style of the real PF-Willow files of that object class."""
    pattern = _WILLOW_BASES[subclass.split("(")[0]][1]
    names: set[str] = set()
    while len(names) < n:
        names.add(pattern.format(num=int(rng.integers(0, 120)), letter="ab"[int(rng.integers(2))]))
    return sorted(names)


def pfwillow_header() -> list[str]:
    """The PF-Willow pair CSV header: imageA, imageB, XA1..XA10, YA1..YA10, XB1..XB10, YB1..YB10."""
    coords = [f"{axis}{im}{i}" for im in "AB" for axis in "XY" for i in range(1, PFWILLOW_N_KPS + 1)]
    return ["imageA", "imageB", *coords]


def make_pfwillow(out_dir: PathLike, spec: DemoWorldSpec = DemoWorldSpec()) -> tuple[Path, Path]:
    """Write the demo ``PF-dataset.zip`` and the plain ``test_pairs.csv`` (all ordered pairs per class)."""
    files: dict[str, bytes] = {}
    rows: list[list[str]] = [pfwillow_header()]
    for subclass in spec.pfwillow_subclasses:
        base, variant = subclass[:-1].split("(")
        template = make_template(_WILLOW_BASES[base][0], spec.seed)
        rng = _rng(spec.seed, "pfwillow", subclass)
        style = _WILLOW_STYLES[variant]
        names = _willow_names(subclass, rng, spec.pfwillow_images_per_class)
        insts = [
            render_instance(template, n, rng, spec.image_size_range, style, require_visible=PFWILLOW_N_KPS)
            for n in names
        ]
        for inst in insts:
            pts = np.ascontiguousarray(inst.kps[:PFWILLOW_N_KPS].T, dtype=np.float64)
            files[f"PF-dataset/{subclass}/{inst.name}.png"] = _png(inst.image)
            files[f"PF-dataset/{subclass}/{inst.name}.mat"] = _mat({"pts_coord": pts})
        for src, trg in itertools.permutations(insts, 2):
            a, b = src.kps[:PFWILLOW_N_KPS], trg.kps[:PFWILLOW_N_KPS]
            coords = [repr(float(v)) for v in (*a[:, 0], *a[:, 1], *b[:, 0], *b[:, 1])]
            rows.append(
                [f"PF-dataset/{subclass}/{src.name}.png", f"PF-dataset/{subclass}/{trg.name}.png", *coords]
            )
    out = Path(out_dir)
    _write_zip(out / PFWILLOW_IMAGES_ARCHIVE, files)
    with atomic_path(out / PFWILLOW_PAIRS_CSV) as tmp:
        tmp.write_bytes(_csv(rows))
    return out / PFWILLOW_IMAGES_ARCHIVE, out / PFWILLOW_PAIRS_CSV


# ---------------------------------------------------------------------------------------- a custom dataset

CUSTOM_PAIRS_FILE = "pairs.csv"
CUSTOM_IMAGE_FORMATS = ("jpg", "png")  # alternating: a custom dataset may mix any formats PIL reads
CUSTOM_HEADER = ("pair_id", "category", "source", "target", "source_kps", "target_kps", "source_bbox",
                 "target_bbox")  # fmt: skip


def custom_image_name(category: str, index: int) -> str:
    """``images/<category>/<category>_<index>.<jpg|png>`` (index from 1), the demo custom dataset's files."""
    return f"images/{category}/{category}_{index}.{CUSTOM_IMAGE_FORMATS[(index - 1) % 2]}"


def _custom_points(inst: Instance) -> str:
    """Every template keypoint as ``x,y;...``, ``nan,nan`` where it is not visible in this image."""
    points = zip(inst.kps, inst.visible, strict=True)
    return ";".join(f"{_g15(x)},{_g15(y)}" if vis else "nan,nan" for (x, y), vis in points)


def demo_custom_images(config: dict) -> list[str]:
    """The image files (relative to the folder) ``make_custom_dataset`` writes for a config's demo world."""
    spec = spec_from_config(config.get("demo_world") or {})
    return [
        custom_image_name(category, k)
        for category in spec.custom_categories
        for k in range(1, spec.custom_images_per_category + 1)
    ]


def make_custom_dataset(out_dir: PathLike, spec: DemoWorldSpec = DemoWorldSpec()) -> Path:
    """Write a small keypoint dataset in the custom layout (``sd4match.custom_dataset``) into ``out_dir``:
    ``images/<category>/<category>_<k>.{jpg,png}`` and ``pairs.csv`` with every ordered pair of distinct
    images of a category that share a visible keypoint. Returns the pairs file."""
    out = Path(out_dir)
    rows: list[list[str]] = []
    for category in spec.custom_categories:
        template = make_template(category, spec.seed)
        rng = _rng(spec.seed, "custom", category)
        insts = [
            render_instance(template, f"{category}_{k}", rng, spec.image_size_range, SPAIR_STYLE)
            for k in range(1, spec.custom_images_per_category + 1)
        ]
        for k, inst in enumerate(insts, start=1):
            name = custom_image_name(category, k)
            data = _jpeg(inst.image, spec.jpeg_quality) if name.endswith(".jpg") else _png(inst.image)
            with atomic_path(out / name) as tmp:
                tmp.write_bytes(data)
        for s, t in itertools.permutations(range(len(insts)), 2):
            if not (insts[s].visible & insts[t].visible).any():
                continue
            rows.append(
                [
                    f"{category}-{s + 1}-{t + 1}",
                    category,
                    custom_image_name(category, s + 1),
                    custom_image_name(category, t + 1),
                    _custom_points(insts[s]),
                    _custom_points(insts[t]),
                    ",".join(_g15(v) for v in insts[s].bbox),
                    ",".join(_g15(v) for v in insts[t].bbox),
                ]
            )
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerows([CUSTOM_HEADER, *rows])
    with atomic_path(out / CUSTOM_PAIRS_FILE) as tmp:
        tmp.write_bytes(text.getvalue().encode("utf-8"))
    return out / CUSTOM_PAIRS_FILE


def make_demo_world(out_dir: PathLike, spec: DemoWorldSpec = DemoWorldSpec()) -> dict[str, Path]:
    """Write the five demo downloads (official archive / file names) into ``out_dir``; return their paths."""
    spair = make_spair(out_dir, spec)
    pfpascal_images, pfpascal_pairs = make_pfpascal(out_dir, spec)
    pfwillow_images, pfwillow_pairs = make_pfwillow(out_dir, spec)
    return {
        "spair_archive": spair,
        "pfpascal_images_archive": pfpascal_images,
        "pfpascal_pairs_archive": pfpascal_pairs,
        "pfwillow_images_archive": pfwillow_images,
        "pfwillow_pairs_csv": pfwillow_pairs,
    }


def spec_from_config(demo_cfg: dict) -> DemoWorldSpec:
    """DemoWorldSpec from the config's ``demo_world`` block (``seed`` plus optional ``spec`` overrides)."""
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in demo_cfg.get("spec", {}).items()}
    unknown = sorted(set(overrides) - set(DemoWorldSpec.__dataclass_fields__))
    if unknown:
        raise ValueError(f"config key 'demo_world.spec' has unknown fields {unknown}")
    return DemoWorldSpec(seed=demo_cfg.get("seed", 0), **overrides)
