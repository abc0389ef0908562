"""Running an exported detector on image files: JSON records and drawn PNGs per image
(the library behind `python -m rfcn_tf.predict`).

A custom-op export loads the compiled PSRoIPool library first; the export's uint8
image signature is used when it has one, else its serving_default with whatever
input type it takes. `load_detector` loads an export, `predict_files` runs it on files.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from typing import Callable, Dict, List, Tuple

import numpy as np
import tensorflow as tf
from absl import logging
from PIL import Image
from tqdm import tqdm

from rfcn_tf.export import drawing, error_line, graph_ops
from rfcn_tf.export import saved_model as saved_model_lib


def list_images(patterns: str) -> List[str]:
    """Sorted, de-duplicated files matching the comma-separated globs."""
    paths = set()
    for pattern in (p.strip() for p in patterns.split(",")):
        if pattern:
            paths.update(p for p in glob.glob(pattern) if os.path.isfile(p))
    return sorted(paths)


# (detect, class names): detect(file bytes) -> (uint8 image [H, W, 3], outputs as NumPy
# arrays with a batch axis); class names by label-map id.
Detector = Tuple[Callable[[bytes], Tuple[np.ndarray, Dict[str, np.ndarray]]], Dict[int, str]]


def load_detector(saved_model_dir: str) -> Detector:
    """(detect, class names) of an export. Uses the export's uint8 image signature when it
    has one, else its serving_default whatever its input type. A custom-op export needs
    the compiled op library, loaded here. An export that cannot be loaded raises what
    graph_ops.load_saved_model raises (FileNotFoundError, graph_ops.SavedModelLoadError),
    and one whose assets cannot be read what the asset readers raise (ValueError,
    OSError, DataError for a bad label map).

    detect raises tf.errors.InvalidArgumentError for bytes that cannot be decoded or that
    the export's signature refuses (its in-graph checks)."""
    loaded = graph_ops.load_saved_model(saved_model_dir)
    metadata = saved_model_lib.read_metadata(saved_model_dir)
    signature_types = metadata.get("signatures", {"serving_default": "image_tensor"})
    key = "image_tensor" if "image_tensor" in loaded.signatures else "serving_default"
    function = loaded.signatures[key]
    input_type = signature_types.get(key, "image_tensor")

    def detect(data: bytes):
        image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
        if input_type == "image_tensor":
            feed = image[None]
        elif input_type == "tf_example":
            example = tf.train.Example(features=tf.train.Features(feature={
                "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))}))
            feed = tf.constant([example.SerializeToString()])
        else:
            feed = tf.constant([data])
        outputs = function(input_tensor=feed)
        return image.numpy(), {k: v.numpy() for k, v in outputs.items()}

    return detect, saved_model_lib.read_class_names(saved_model_dir)


def _output_stem(path: str, used: set) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    candidate, n = stem, 1
    while candidate in used:
        candidate, n = f"{stem}_{n}", n + 1
    used.add(candidate)
    return candidate


class OutputWriteError(OSError):
    """An output file of predict_files could not be written; the message names the file
    and the OS reason."""


def _write_outputs(drawn: np.ndarray, png_path: str, record: dict, json_path: str) -> None:
    """Writes the drawn image to png_path and `record` to json_path. On an OSError (a full
    disk, no permission) removes both files (those it can), so that no partial output is
    left, and raises OutputWriteError "cannot write <file>: <OS reason>"."""
    path = png_path
    try:
        Image.fromarray(drawn).save(png_path)
        path = json_path
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
    except OSError as error:
        for written in (png_path, json_path):
            with contextlib.suppress(OSError):  # not there, or not removable either
                os.remove(written)
        raise OutputWriteError(f"cannot write {path}: {error.strerror or error}") from error


def predict_files(detector: Detector, paths: List[str], output_dir: str,
                  min_score: float = 0.3, show_progress: bool = True) -> Dict[str, object]:
    """Runs `detector` (from load_detector) on the image files and writes <stem>.png and
    <stem>.json per image into output_dir; returns {"written": [json paths], "skipped":
    {path: reason}, "detections": count}. A file that cannot be read or decoded, or that
    the export refuses (e.g. over its pixel limit, or a format its string signature does
    not take), is skipped, its reason the error's meaningful line (export.error_line).
    A failure to write an image's outputs (a full disk would fail every next image too)
    raises OutputWriteError (_write_outputs), the outputs of the images before it kept."""
    detect, class_names = detector
    os.makedirs(output_dir, exist_ok=True)
    written, skipped, total, used = [], {}, 0, set()
    for path in tqdm(paths, desc="predicting", unit="image", disable=not show_progress):
        try:
            with open(path, "rb") as f:
                image, outputs = detect(f.read())
        except (OSError, tf.errors.InvalidArgumentError) as error:
            reason = error_line(error)
            logging.warning("skipping %s: %s", path, reason)
            skipped[path] = reason
            continue
        height, width = image.shape[:2]
        records = drawing.detection_records(outputs, height, width, class_names, min_score)
        total += len(records)
        stem = _output_stem(path, used)
        json_path = os.path.join(output_dir, stem + ".json")
        _write_outputs(drawing.draw_detections(image, records),
                       os.path.join(output_dir, stem + ".png"),
                       {"image": os.path.abspath(path), "height": height, "width": width,
                        "min_score_thresh": min_score, "detections": records}, json_path)
        written.append(json_path)
    return {"written": written, "skipped": skipped, "detections": total}
