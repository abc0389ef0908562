"""A tiny detector overfitted to one synthetic image, and its SavedModel exports, shared
by the deployment tests (tests/test_export_*.py, test_tflite.py, test_onnx.py,
test_tftrt.py, test_predict.py).

The expensive objects are built once per pytest process (module-level cache), whichever
test file asks first; the session fixtures of each test file call `trained()` /
`exported()` / `exported_single_signature()`.

The scene: a 128 x 128 grey, lightly textured image with one red rectangle (class 1,
"square") and one blue rectangle (class 2, "bar"). 200 Adam steps (learning rate 1e-3) on it make the
detector find both boxes with high scores (checked in `trained()`, so a broken training
recipe fails loudly instead of making the export tests vacuous).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Dict

import numpy as np

import rfcn_tf  # noqa: F401  (tf.keras -> tf_keras before TensorFlow loads)
import tensorflow as tf

from rfcn_tf import configs
from rfcn_tf.data import preprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 128
CLASS_NAMES = ["square", "bar"]
# Ground truth in pixels (ymin, xmin, ymax, xmax) and classes of the scene.
GT_BOXES = np.array([[20.0, 24.0, 68.0, 72.0], [76.0, 40.0, 108.0, 100.0]], np.float32)
GT_CLASSES = np.array([1, 2], np.int32)
TRAIN_STEPS = 200

TINY_OVERRIDE = ",".join([
    "model.num_classes=2",
    "model.backbone.depth=18", "model.backbone.width_multiplier=0.25",
    "model.backbone.freeze_at=0", "model.backbone.frozen_batch_norm=true",
    "model.anchor.scales=[32.0,64.0]", "model.anchor.aspect_ratios=[0.5,1.0,2.0]",
    "model.rpn.conv_channels=32", "model.rpn.pre_nms_top_k_train=256",
    "model.rpn.pre_nms_top_k_test=128", "model.rpn.post_nms_top_k_test=32",
    "model.head.reduce_channels=32", "model.head.group_size=3",
    "model.roi_sampler.ohem_num_rois=64", "model.roi_sampler.ohem_batch_size=32",
    # The OHEM variant the figures quoted in these tests were measured with.
    "model.roi_sampler.ohem_nms_iou=0.7",
    "model.detection.pre_nms_top_k=32", "model.detection.max_detections=10",
    "model.detection.score_threshold=0.05",
    f"train_data.short_side={IMAGE_SIZE}", f"train_data.max_side={IMAGE_SIZE}",
    f"eval_data.short_side={IMAGE_SIZE}", f"eval_data.max_side={IMAGE_SIZE}",
    f"eval_data.class_names=[{','.join(CLASS_NAMES)}]",
    "train_data.format=synthetic", "eval_data.format=synthetic",
    "train_data.synthetic_num_images=8", f"train_data.synthetic_image_size=[{IMAGE_SIZE},{IMAGE_SIZE}]",
    # train_data (synthetic shapes) only feeds TFLite calibration images to the tests.
    "train_data.class_names=[rectangle,ellipse]",
])

_CACHE: Dict[str, object] = {}


def tiny_config(extra: str = "") -> configs.ExperimentConfig:
    return configs.load_config(None, TINY_OVERRIDE + ("," + extra if extra else ""))


def scene(seed: int = 0) -> np.ndarray:
    """uint8 [128, 128, 3]: the training scene (texture from `seed`)."""
    rng = np.random.default_rng(seed)
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 128, np.int16)
    image += rng.integers(-12, 13, image.shape, dtype=np.int16)
    colours = {1: (220, 30, 30), 2: (30, 40, 220)}
    for (y0, x0, y1, x1), c in zip(GT_BOXES.astype(int), GT_CLASSES):
        image[y0:y1, x0:x1] = colours[int(c)]
    return np.clip(image, 0, 255).astype(np.uint8)


def _training_batch(config: configs.ExperimentConfig) -> Dict[str, tf.Tensor]:
    """The scene through the evaluation preprocessing (no augmentation), batch of 1."""
    data = config.eval_data
    image = tf.constant(scene())
    hw = tf.shape(image)[:2]
    size = preprocess.scaled_size(hw, float(data.short_side), float(data.max_side))
    images = preprocess.pad(preprocess.normalize(preprocess.resize(image, size)),
                            data.pad_multiple)
    scale = size / tf.cast(hw, tf.float32)
    boxes = GT_BOXES * tf.concat([scale, scale], 0)
    return {"images": images[None], "image_info": preprocess.image_info(hw, size)[None],
            "gt_boxes": boxes[None], "gt_classes": tf.constant(GT_CLASSES)[None]}


def trained():
    """(config, detector) with the detector overfitted to `scene()`; cached per process."""
    if "trained" not in _CACHE:
        from rfcn_tf.modeling.builder import build_model  # pylint: disable=import-outside-toplevel
        import tf_keras  # pylint: disable=import-outside-toplevel
        tf_keras.utils.set_random_seed(0)
        config = tiny_config()
        detector = build_model(config.model, psroi_impl="portable")
        batch = _training_batch(config)
        optimizer = tf_keras.optimizers.Adam(1e-3)
        variables = detector.trainable_variables

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = detector.compute_losses(batch)["model_loss"]
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return loss

        for _ in range(TRAIN_STEPS):
            loss = float(step())
        outputs = detector({"images": batch["images"], "image_info": batch["image_info"]},
                           training=False)
        scores = outputs["detection_scores"].numpy()[0]
        if not (np.isfinite(loss) and scores[0] > 0.5):
            raise RuntimeError(f"the tiny detector did not fit the scene (loss {loss:.3f}, best "
                               f"score {scores[0]:.3f}); the export tests would be vacuous")
        _CACHE["trained"] = (config, detector)
    return _CACHE["trained"]


def exported(base_dir: str):
    """Path of the portable SavedModel of `trained()` (all three input signatures);
    written under base_dir once per process."""
    if "exported" not in _CACHE:
        from rfcn_tf.export import saved_model  # pylint: disable=import-outside-toplevel
        config, detector = trained()
        _CACHE["exported"] = saved_model.export_detector(
            detector, config, os.path.join(base_dir, "export"), version=1,
            class_names=CLASS_NAMES)
    return _CACHE["exported"]


def exported_single_signature(base_dir: str, input_type: str) -> str:
    """Path of a portable SavedModel of `trained()` whose only signature is serving_default
    taking `input_type` (export.extra_signatures false: what an export for strings-only
    clients has); written under base_dir once per process and input type."""
    key = f"exported_{input_type}"
    if key not in _CACHE:
        from rfcn_tf.export import saved_model  # pylint: disable=import-outside-toplevel
        config, detector = trained()
        _CACHE[key] = saved_model.export_detector(
            detector, config, os.path.join(base_dir, f"export_{input_type}"), version=1,
            input_type=input_type, class_names=CLASS_NAMES, extra_signatures=False)
    return _CACHE[key]


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [N, 4] and b [N, 4] row by row (ymin, xmin, ymax, xmax)."""
    ymin = np.maximum(a[:, 0], b[:, 0])
    xmin = np.maximum(a[:, 1], b[:, 1])
    ymax = np.minimum(a[:, 2], b[:, 2])
    xmax = np.minimum(a[:, 3], b[:, 3])
    inter = np.clip(ymax - ymin, 0, None) * np.clip(xmax - xmin, 0, None)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def top_detections(outputs: Dict[str, np.ndarray], min_score: float = 0.3):
    """(boxes [K, 4], scores [K], classes [K]) of image 0 with score >= min_score."""
    scores = np.asarray(outputs["detection_scores"])[0]
    keep = scores >= min_score
    return (np.asarray(outputs["detection_boxes"])[0][keep], scores[keep],
            np.asarray(outputs["detection_classes"])[0][keep])


def clean_env() -> Dict[str, str]:
    """Environment for subprocesses: this one without PYTHONPATH, TensorFlow logs quiet."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` from the repository root, with clean_env() and the
    repository on PYTHONPATH; the finished process, its output captured as text."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False,
                          env={**clean_env(), "PYTHONPATH": REPO})
