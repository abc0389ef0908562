"""A seeded synthetic detection dataset, written to disk as Pascal VOC or COCO.

Each image has a gradient background with soft colour blotches, unlabelled
clutter (lines, arcs, dots) and 1..max_objects labelled shapes of random size
(log-uniform, 8% to 45% of the short side), aspect ratio (1:2 to 2:1), colour
and texture (solid, stripes, checker, noise, gradient), then pixel noise.
Shapes may overlap, but a new shape is only placed where every shape already
drawn keeps at least 60% of its pixels visible. A box is the tight box of the
shape's VISIBLE pixels (continuous coordinates: columns c0..c1 -> xmin=c0,
xmax=c1+1).

The output depends only on the arguments: image i is drawn from
numpy.random.default_rng([seed, i]) and encoded with PIL (JPEG quality 90), so
two runs with the same arguments write identical bytes.

Layout, VOC: Annotations/, JPEGImages/, ImageSets/Main/{trainval,test}.txt.
Layout, COCO: images/, annotations/instances_{trainval,test}.json.
Both: label_map.pbtxt and synthetic.json (the arguments) at the root.
Split: the last round(num_images * test_fraction) images are "test".
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from rfcn_tf.data import coco, voc
from rfcn_tf.data.label_map import LABEL_MAP_FILENAME, LabelMap
from rfcn_tf.data.records import DataError, ImageRecord

SHAPES = ("ellipse", "rectangle", "triangle", "cross", "ring", "star")
DEFAULT_CLASSES = ("ellipse", "rectangle", "triangle", "cross")
GENERATOR_VERSION = 1
MARKER = "synthetic.json"
SPLITS = ("trainval", "test")

_MIN_VISIBLE = 0.6
_PLACEMENT_TRIES = 30
_TEXTURES = ("solid", "stripes", "checker", "noise", "gradient")


# ------------------------------------------------------------- drawing ------


def _shape_mask(shape: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """bool [h, w]: the shape drawn to fill an h x w box."""
    im = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(im)
    thick = max(2, int(round(rng.uniform(0.22, 0.38) * min(h, w))))
    if shape == "ellipse":
        draw.ellipse([0, 0, w - 1, h - 1], fill=255)
    elif shape == "rectangle":
        draw.rectangle([0, 0, w - 1, h - 1], fill=255)
    elif shape == "triangle":
        apex = rng.uniform(0.2, 0.8)
        corners = {0: [(apex * (w - 1), 0), (0, h - 1), (w - 1, h - 1)],
                   1: [(apex * (w - 1), h - 1), (0, 0), (w - 1, 0)],
                   2: [(0, apex * (h - 1)), (w - 1, 0), (w - 1, h - 1)],
                   3: [(w - 1, apex * (h - 1)), (0, 0), (0, h - 1)]}
        draw.polygon(corners[int(rng.integers(4))], fill=255)
    elif shape == "cross":
        top, left = (h - thick) // 2, (w - thick) // 2
        draw.rectangle([0, top, w - 1, top + thick - 1], fill=255)
        draw.rectangle([left, 0, left + thick - 1, h - 1], fill=255)
    elif shape == "ring":
        inset = max(2, thick // 2)
        draw.ellipse([0, 0, w - 1, h - 1], fill=255)
        draw.ellipse([inset, inset, w - 1 - inset, h - 1 - inset], fill=0)
    elif shape == "star":
        turn = rng.uniform(0, 2 * math.pi)
        points = []
        for k in range(10):
            radius = 1.0 if k % 2 == 0 else 0.45
            angle = turn + k * math.pi / 5
            points.append(((0.5 + 0.5 * radius * math.cos(angle)) * (w - 1),
                           (0.5 + 0.5 * radius * math.sin(angle)) * (h - 1)))
        draw.polygon(points, fill=255)
    else:
        raise DataError(f"unknown synthetic shape {shape!r}; choose from {SHAPES}")
    return np.asarray(im) > 0


def _texture(h: int, w: int, colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """float32 [h, w, 3] fill pattern around `colour`."""
    kind = _TEXTURES[int(rng.integers(len(_TEXTURES)))]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    second = np.clip(colour * rng.uniform(0.3, 0.7) + rng.uniform(0, 90, 3), 0, 255)
    if kind == "solid":
        pick = np.zeros((h, w), bool)
    elif kind == "stripes":
        angle = rng.choice([0.0, 0.25, 0.5, 0.75]) * math.pi
        period = rng.uniform(4, 10)
        pick = ((xx * math.cos(angle) + yy * math.sin(angle)) // (period / 2)) % 2 == 1
    elif kind == "checker":
        cell = int(rng.integers(3, 9))
        pick = ((yy // cell + xx // cell) % 2) == 1
    elif kind == "noise":
        return np.clip(colour + rng.normal(0, 35, (h, w, 3)), 0, 255).astype(np.float32)
    else:  # gradient
        t = (xx / max(w - 1, 1))[..., None]
        return (colour * (1 - t) + second * t).astype(np.float32)
    return np.where(pick[..., None], second, colour).astype(np.float32)


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = ((t - t.min()) / max(float(np.ptp(t)), 1.0))[..., None]
    image = c0 * (1 - t) + c1 * t
    for _ in range(int(rng.integers(2, 5))):  # soft blotches
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        sigma = rng.uniform(0.1, 0.3) * min(h, w)
        weight = 0.5 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))[..., None]
        image = image * (1 - weight) + rng.uniform(0, 255, 3) * weight
    return image.astype(np.float32)


def _clutter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unlabelled distractors: lines, arcs and dots."""
    h, w = image.shape[:2]
    im = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)

    def colour():
        return tuple(int(v) for v in rng.integers(0, 256, 3))

    for _ in range(int(rng.integers(3, 9))):
        draw.line([(rng.uniform(0, w), rng.uniform(0, h)), (rng.uniform(0, w), rng.uniform(0, h))],
                  fill=colour(), width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(1, 4))):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, 0.15 * min(h, w) + 9)
        start = rng.uniform(0, 360)
        draw.arc([cx - r, cy - r, cx + r, cy + r], start, start + rng.uniform(40, 200),
                 fill=colour(), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(5, 21))):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1, 3)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour())
    return np.asarray(im).astype(np.float32)


def _contrasting_colour(region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mean = region.reshape(-1, 3).mean(axis=0)
    best, best_dist = None, -1.0
    for _ in range(10):
        c = rng.uniform(0, 255, 3)
        dist = float(np.linalg.norm(c - mean))
        if dist > 100:
            return c
        if dist > best_dist:
            best, best_dist = c, dist
    return best


def render_image(height: int, width: int, classes: Sequence[str], max_objects: int,
                 rng: np.random.Generator) -> Tuple[np.ndarray, List[Tuple[str, List[int]]]]:
    """uint8 [height, width, 3] and [(class name, [ymin, xmin, ymax, xmax] pixels)]."""
    image = _clutter(_background(height, width, rng), rng)
    owner = np.full((height, width), -1, np.int32)
    full_area: List[int] = []
    names: List[str] = []
    short = min(height, width)
    lo, hi = max(8.0, 0.08 * short), max(9.0, 0.45 * short)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        name = classes[int(rng.integers(len(classes)))]
        for _ in range(_PLACEMENT_TRIES):
            size = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            ratio = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
            bh = int(np.clip(round(size / math.sqrt(ratio)), 8, height))
            bw = int(np.clip(round(size * math.sqrt(ratio)), 8, width))
            y0, x0 = int(rng.integers(0, height - bh + 1)), int(rng.integers(0, width - bw + 1))
            mask = _shape_mask(name, bh, bw, rng)
            window = owner[y0:y0 + bh, x0:x0 + bw]
            covered = np.bincount(window[mask & (window >= 0)], minlength=len(names))
            visible = np.bincount(owner[owner >= 0], minlength=len(names))
            if np.all(visible - covered >= _MIN_VISIBLE * np.array(full_area, np.float64)):
                break
        else:
            continue
        colour = _contrasting_colour(image[y0:y0 + bh, x0:x0 + bw], rng)
        patch = image[y0:y0 + bh, x0:x0 + bw]
        patch[mask] = _texture(bh, bw, colour, rng)[mask]
        window[mask] = len(names)
        names.append(name)
        full_area.append(int(mask.sum()))
    image = image + rng.normal(0, rng.uniform(2, 10), image.shape)
    objects = []
    for index, name in enumerate(names):
        rows, cols = np.nonzero(owner == index)
        objects.append((name, [int(rows.min()), int(cols.min()),
                               int(rows.max()) + 1, int(cols.max()) + 1]))
    return np.clip(np.round(image), 0, 255).astype(np.uint8), objects


# --------------------------------------------------------------- files ------


def _arguments(num_images, image_size, seed, fmt, classes, test_fraction, max_objects) -> dict:
    return {"generator_version": GENERATOR_VERSION, "num_images": int(num_images),
            "image_size": [int(image_size[0]), int(image_size[1])], "seed": int(seed),
            "format": fmt, "classes": list(classes), "test_fraction": float(test_fraction),
            "max_objects": int(max_objects)}


def _check_arguments(num_images, image_size, fmt, classes, test_fraction, max_objects):
    if num_images < 1:
        raise DataError(f"synthetic num_images must be >= 1, got {num_images}")
    if len(image_size) != 2 or min(image_size) < 32:
        raise DataError(f"synthetic image_size must be (height, width), each >= 32; "
                        f"got {list(image_size)}")
    if fmt not in ("voc", "coco"):
        raise DataError(f"synthetic format must be 'voc' or 'coco', got {fmt!r}")
    unknown = [c for c in classes if c not in SHAPES]
    if not classes or unknown or len(set(classes)) != len(classes):
        raise DataError(f"synthetic classes must be distinct names from {SHAPES}; "
                        f"got {list(classes)}")
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"synthetic test_fraction must be in [0, 1), got {test_fraction}")
    if max_objects < 1:
        raise DataError(f"synthetic max_objects must be >= 1, got {max_objects}")


def generate(output_dir: str, num_images: int, image_size: Sequence[int] = (320, 320),
             seed: int = 0, format: str = "voc",  # pylint: disable=redefined-builtin
             classes: Sequence[str] = DEFAULT_CLASSES, test_fraction: float = 0.25,
             max_objects: int = 6) -> dict:
    """Writes the dataset into `output_dir` (created; existing files are overwritten).

    Returns a summary: {"root", "format", "splits": {split: num_images},
    "num_boxes", "label_map"} (label_map is the path of label_map.pbtxt).
    """
    classes = tuple(classes)
    _check_arguments(num_images, image_size, format, classes, test_fraction, max_objects)
    height, width = int(image_size[0]), int(image_size[1])
    label_map = LabelMap.from_names(classes)
    num_test = int(round(num_images * test_fraction))
    image_dir = os.path.join(output_dir, voc.IMAGES if format == "voc" else "images")
    os.makedirs(image_dir, exist_ok=True)
    records = {split: [] for split in SPLITS}
    num_boxes = 0
    for i in range(num_images):
        image, objects = render_image(height, width, classes, max_objects,
                                      np.random.default_rng([seed, i]))
        stem = f"synth_{i:06d}"
        Image.fromarray(image).save(os.path.join(image_dir, stem + ".jpg"), quality=90)
        split = "test" if i >= num_images - num_test else "trainval"
        num_boxes += len(objects)
        if format == "voc":
            os.makedirs(os.path.join(output_dir, voc.ANNOTATIONS), exist_ok=True)
            xml = voc.annotation_xml(stem + ".jpg", height, width,
                                     [(name, box, False) for name, box in objects])
            with open(os.path.join(output_dir, voc.ANNOTATIONS, stem + ".xml"), "w",
                      encoding="utf-8") as f:
                f.write(xml)
        scale = np.array([height, width, height, width], np.float64)
        records[split].append(ImageRecord(
            source_id=i, filename=stem + ".jpg", image_path=None, height=height, width=width,
            boxes=np.array([box for _, box in objects], np.float64).reshape(-1, 4) / scale,
            classes=[label_map.id_of(name) for name, _ in objects],
            difficult=np.zeros(len(objects)), is_crowd=np.zeros(len(objects))))
    for split, split_records in records.items():
        if format == "voc":
            voc.write_split(output_dir, split, [os.path.splitext(r.filename)[0]
                                                for r in split_records])
        else:
            coco.write_coco(split_records, label_map,
                            os.path.join(output_dir, "annotations", f"instances_{split}.json"))
    label_map.write(os.path.join(output_dir, LABEL_MAP_FILENAME))
    with open(os.path.join(output_dir, MARKER), "w", encoding="utf-8") as f:
        json.dump(_arguments(num_images, image_size, seed, format, classes, test_fraction,
                             max_objects), f, indent=2, sort_keys=True)
    return {"root": output_dir, "format": format,
            "splits": {s: len(r) for s, r in records.items()}, "num_boxes": num_boxes,
            "label_map": os.path.join(output_dir, LABEL_MAP_FILENAME)}


def default_root(num_images: int, image_size: Sequence[int], seed: int,
                 classes: Sequence[str]) -> str:
    """A per-arguments directory under the system temp dir."""
    tag = f"{num_images}_{image_size[0]}x{image_size[1]}_s{seed}_{'-'.join(classes)}"
    return os.path.join(tempfile.gettempdir(), f"rfcn_tf_synthetic_v{GENERATOR_VERSION}_{tag}")


def _marker(root: str):
    try:
        with open(os.path.join(root, MARKER), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def ensure_voc(root: str, num_images: int, image_size: Sequence[int], seed: int,
               classes: Sequence[str] = DEFAULT_CLASSES) -> str:
    """Makes `root` hold the VOC synthetic set for these arguments and returns it.

    Reuses it when its synthetic.json matches; otherwise generates into a
    temporary sibling and renames it into place, so concurrent callers (several
    workers) never see a half-written set. Refuses to replace a non-empty
    directory that is not a synthetic set.
    """
    classes = tuple(classes)
    wanted = _arguments(num_images, image_size, seed, "voc", classes, 0.25, 6)
    if _marker(root) == wanted:
        return root
    if os.path.isdir(root) and os.listdir(root) and _marker(root) is None:
        raise DataError(f"synthetic data path {root} exists and is not a synthetic dataset "
                        f"(no {MARKER}); choose an empty or new directory")
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(root)}.tmp-{uuid.uuid4().hex}")
    generate(tmp, num_images, image_size, seed, "voc", classes)
    old = None
    if os.path.isdir(root):
        old = os.path.join(parent, f".{os.path.basename(root)}.old-{uuid.uuid4().hex}")
        try:
            os.rename(root, old)
        except OSError:
            old = None
    try:
        os.rename(tmp, root)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    if _marker(root) != wanted:
        raise DataError(f"could not create the synthetic set in {root}")
    return root
