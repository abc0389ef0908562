"""Detections as data and as pictures: per-image JSON records and boxes drawn with PIL.

Boxes arrive as the exports give them: (ymin, xmin, ymax, xmax) normalised to the
image. A box covers the pixel columns round(xmin * W) .. round(xmax * W) - 1 (and rows
likewise); `draw_detections` outlines exactly that rectangle (the outline lies inside
it, `line_width` pixels thick) in the class colour, with a filled "name: score" label
above it (inside it when the box touches the top edge).
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct, saturated colours; class id c uses PALETTE[(c - 1) % len(PALETTE)].
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128))


def class_colour(class_id: int) -> Tuple[int, int, int]:
    return PALETTE[(int(class_id) - 1) % len(PALETTE)]


def pixel_box(box: Sequence[float], height: int, width: int) -> Tuple[int, int, int, int]:
    """Normalised (ymin, xmin, ymax, xmax) -> inclusive pixel corners (x0, y0, x1, y1),
    clipped to the image; x1 >= x0 and y1 >= y0."""
    ymin, xmin, ymax, xmax = (float(v) for v in box)
    x0 = min(max(int(round(xmin * width)), 0), width - 1)
    y0 = min(max(int(round(ymin * height)), 0), height - 1)
    x1 = min(max(int(round(xmax * width)) - 1, x0), width - 1)
    y1 = min(max(int(round(ymax * height)) - 1, y0), height - 1)
    return x0, y0, x1, y1


def detection_records(outputs: Mapping[str, np.ndarray], height: int, width: int,
                      class_names: Mapping[int, str], min_score: float = 0.0) -> List[Dict]:
    """The detections of image 0 of `outputs` (TF OD API arrays with a batch axis) with
    score >= min_score, best first: class_id, class_name, score, box_normalized and
    box_pixels (continuous pixel coordinates of the original image)."""
    count = int(np.asarray(outputs["num_detections"]).reshape(-1)[0])
    boxes = np.asarray(outputs["detection_boxes"])[0][:count]
    scores = np.asarray(outputs["detection_scores"])[0][:count]
    classes = np.asarray(outputs["detection_classes"])[0][:count]
    records = []
    for box, score, class_id in zip(boxes, scores, classes):
        if score < min_score:
            continue
        ymin, xmin, ymax, xmax = (float(v) for v in box)
        class_id = int(round(float(class_id)))
        records.append({
            "class_id": class_id, "class_name": class_names.get(class_id, f"class_{class_id}"),
            "score": float(score),
            "box_normalized": {"ymin": ymin, "xmin": xmin, "ymax": ymax, "xmax": xmax},
            "box_pixels": {"ymin": ymin * height, "xmin": xmin * width,
                           "ymax": ymax * height, "xmax": xmax * width},
        })
    return records


def line_width_for(height: int, width: int) -> int:
    """Outline thickness: 2 px, more for large images (1 px per 250 px of the short side)."""
    return max(2, min(height, width) // 250)


def draw_detections(image: np.ndarray, records: Sequence[Mapping], line_width: int = 0
                    ) -> np.ndarray:
    """uint8 [H, W, 3]: `image` with each record's box and "name: score" label drawn
    (records from `detection_records`; drawn worst first, so the best is on top)."""
    image = np.asarray(image, np.uint8)
    height, width = image.shape[:2]
    line_width = line_width or line_width_for(height, width)
    canvas = Image.fromarray(image, "RGB")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for record in sorted(records, key=lambda r: r["score"]):
        b = record["box_normalized"]
        x0, y0, x1, y1 = pixel_box((b["ymin"], b["xmin"], b["ymax"], b["xmax"]), height, width)
        colour = class_colour(record["class_id"])
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=line_width)
        label = f"{record['class_name']}: {record['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        text_w, text_h = right - left + 4, bottom - top + 4
        label_y = y0 - text_h if y0 - text_h >= 0 else y0
        draw.rectangle([x0, label_y, x0 + text_w, label_y + text_h], fill=colour)
        draw.text((x0 + 2 - left, label_y + 2 - top), label, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)
