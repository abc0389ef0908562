"""Helpers shared by the tests/test_data_*.py files: BCCD location and tiny datasets."""

from __future__ import annotations

import io
import os
from typing import Sequence, Tuple

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bccd_root() -> str:
    """BCCD's root from $RFCN_TF_BCCD or <repo>/../shared/datasets/bccd; skips if absent."""
    root = os.environ.get("RFCN_TF_BCCD") or os.path.join(REPO, "..", "shared", "datasets",
                                                          "bccd")
    if not os.path.isdir(os.path.join(root, "Annotations")):
        pytest.skip(f"BCCD not found at {root} (set RFCN_TF_BCCD)")
    return root


def image_bytes(height: int, width: int, fmt: str = "JPEG", mode: str = "RGB",
                seed: int = 0) -> bytes:
    """A random image of the given PIL mode encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    im = Image.fromarray(pixels, "RGBA").convert(mode)
    out = io.BytesIO()
    im.save(out, format=fmt)
    return out.getvalue()


def write_voc(root: str, entries: Sequence[Tuple[str, str, Sequence]], split: str = "trainval",
              split_ids: Sequence[str] = None, size: Tuple[int, int] = (48, 64)) -> None:
    """A VOC tree. entries: (image id, image file name or "" for none, objects) where an
    object is (name, (ymin, xmin, ymax, xmax), difficult). Images are written by the
    caller (or not at all); the XML states `size` (height, width)."""
    from rfcn_tf.data import voc  # pylint: disable=import-outside-toplevel
    os.makedirs(os.path.join(root, voc.ANNOTATIONS), exist_ok=True)
    os.makedirs(os.path.join(root, voc.IMAGES), exist_ok=True)
    for image_id, filename, objects in entries:
        with open(os.path.join(root, voc.ANNOTATIONS, image_id + ".xml"), "w",
                  encoding="utf-8") as f:
            f.write(voc.annotation_xml(filename or image_id + ".jpg", size[0], size[1], objects))
    voc.write_split(root, split, split_ids or [e[0] for e in entries])
