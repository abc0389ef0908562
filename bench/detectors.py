"""R-FCN against official.vision's Faster R-CNN: inference latency and training step time.

  python bench/detectors.py [--depth=101] [--sizes=600x1000,800x1333]
      [--flavours=custom,portable,saved_model,tflite] [--warmup=1] [--repeats=5]
      [--train_sizes=600x1000] [--train_warmup=1] [--train_repeats=3] [--output=out.json]

(bench/run_all.py runs this together with the machine-limit and profile measurements
and writes the JSON, Markdown and plot.)

The two detectors
  R-FCN         rfcn_tf.modeling (the paper's settings: ResNet-`depth` with dilated conv5,
                RPN on conv4 with 3 scales x 3 ratios, 6000 boxes into the proposal NMS,
                k = 7, 1024-d reduce conv, class-agnostic boxes), `num_proposals` RoIs at
                test, OHEM over 300 RoIs in training.
  Faster R-CNN  official.vision's `fasterrcnn_resnetfpn_coco` experiment, include_mask=False,
                built with official.vision.modeling.factory.build_maskrcnn: ResNet-`depth`
                + FPN (levels 2-6), RPN, 1000 boxes per level into the proposal NMS,
                `num_proposals` RoIs at test, RoIAlign 7x7, 4 conv + 1 fc box head; 512
                sampled RoIs in training (its defaults).
Both have `num_classes` object classes (Faster R-CNN's count includes background, so it
is built with num_classes + 1), random weights (no pretrained weights can be downloaded
here; speed does not depend on the values) and float32 compute.

Inputs. An image of each size (H x W, e.g. 600x1000) is preprocessed once by
rfcn_tf.export.inputs.Preprocessor (normalised, zero-padded): R-FCN gets it padded to a
multiple of 16, Faster R-CNN to a multiple of 64 (2^max_level, which its FPN needs), each
with the true size as image_info / image_shape. The SavedModel and TFLite flavours take
the uint8 H x W image and run the same preprocessing inside.

R-FCN flavours timed: "custom" (the compiled PSRoIPool op), "portable" (stock TF ops) --
the same model and weights, one concrete function each -- "saved_model" (the portable
export of rfcn_tf.export.saved_model, loaded back with tf.saved_model.load) and "tflite"
(its float32 TFLite conversion by rfcn_tf.export.tflite, run by ai_edge_litert with one
thread per CPU).

Training step: one SGD (momentum 0.9) update on a batch of 1 image with 6 ground-truth
boxes, through each model's own training code: rfcn_tf.training.trainer.DetectionTrainer's
train_step for R-FCN, official.vision's MaskRCNNTask.train_step for Faster R-CNN. Faster
R-CNN's RPN targets (official.vision's RpnAnchorLabeler, normally run by its data
parser) are computed inside the timed step, as R-FCN's are. By default everything is
trained in both models (R-FCN with freeze_at=0 and batch norm updating, like official.vision's
ResNet); --rfcn_freeze_at=2 --rfcn_frozen_batch_norm gives the paper's recipe.

All candidates of one size run in the same process, interleaved A B C A B C after warm-up
rounds (bench/timing.py); each call blocks until its outputs are on the host.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rfcn_tf  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from rfcn_tf import configs  # noqa: E402
from rfcn_tf.export import inputs as export_inputs  # noqa: E402
from rfcn_tf.modeling import builder, rfcn_model  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("depth", 101, "ResNet depth of both backbones (18, 34, 50 or 101).")
flags.DEFINE_integer("num_classes", 20, "Object classes, without background (20: VOC).")
flags.DEFINE_integer("num_proposals", 300, "RoIs per image at test time, both models.")
flags.DEFINE_string("sizes", "600x1000,800x1333", "Inference input sizes HxW, comma separated.")
flags.DEFINE_string("train_sizes", "600x1000", "Training-step input sizes HxW ('' skips).")
flags.DEFINE_string("flavours", "custom,portable,saved_model,tflite",
                    "R-FCN flavours to time at inference (custom, portable, saved_model, "
                    "tflite).")
flags.DEFINE_integer("warmup", 1, "Untimed rounds before the inference timings.")
flags.DEFINE_integer("repeats", 5, "Timed inference rounds (each candidate once per round).")
flags.DEFINE_integer("train_warmup", 1, "Untimed rounds before the training-step timings.")
flags.DEFINE_integer("train_repeats", 3, "Timed training rounds.")
flags.DEFINE_integer("rfcn_freeze_at", 0, "R-FCN backbone.freeze_at for the training step.")
flags.DEFINE_bool("rfcn_frozen_batch_norm", False,
                  "R-FCN backbone.frozen_batch_norm for the training step.")
flags.DEFINE_float("learning_rate", 1e-4, "SGD learning rate of the timed training steps.")
flags.DEFINE_string("work_dir", None, "Where exports go (default: a temporary directory).")
flags.DEFINE_string("output", None, "detectors.py alone: write the results as JSON here.")

RFCN_PAD = 16
FASTER_PAD = 64
NUM_GT_BOXES = 6
MAX_GT_BOXES = 8
RFCN_FLAVOURS = ("custom", "portable", "saved_model", "tflite")


def parse_sizes(text: str) -> List[Tuple[int, int]]:
    """"600x1000,800x1333" -> [(600, 1000), (800, 1333)]."""
    sizes = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            height, width = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"a size must be HxW with integers, e.g. 600x1000; got {item!r}"
                             ) from None
        if height < 32 or width < 32:
            raise ValueError(f"sizes must be at least 32x32, got {item!r}")
        sizes.append((height, width))
    return sizes


def parse_flavours(text: str) -> List[str]:
    flavours = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [f for f in flavours if f not in RFCN_FLAVOURS]
    if unknown or not flavours:
        raise ValueError(f"--flavours must name some of {RFCN_FLAVOURS}, got {text!r}")
    return flavours


def size_name(size: Tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


# ------------------------------------------------------------------ inputs ----


def random_image(size: Tuple[int, int], seed: int = 0) -> np.ndarray:
    """A deterministic uint8 [1, H, W, 3] image."""
    return np.random.default_rng(seed).integers(0, 256, (1, size[0], size[1], 3), np.uint8)


def model_inputs(size: Tuple[int, int], pad_multiple: int, seed: int = 0) -> Dict[str, tf.Tensor]:
    """{"images" float32 [1, H', W', 3] (normalised, padded to `pad_multiple`),
    "image_info" [1, 4, 2], "uint8" [1, H, W, 3]} for an H x W image (not resized)."""
    image = random_image(size, seed)
    data_config = configs.DataConfig(short_side=min(size), max_side=max(size),
                                     pad_multiple=pad_multiple)
    images, image_info = export_inputs.Preprocessor(data_config)(tf.constant(image))
    return {"images": images, "image_info": image_info, "uint8": image}


def ground_truth(size: Tuple[int, int], num_classes: int) -> Dict[str, tf.Tensor]:
    """NUM_GT_BOXES boxes spread over an H x W image, padded to MAX_GT_BOXES rows:
    gt_boxes float32 [1, M, 4] (ymin, xmin, ymax, xmax) pixels, padding rows -1;
    gt_classes int32 [1, M] (1..num_classes, -1 padding)."""
    height, width = size
    rows = []
    for i in range(NUM_GT_BOXES):
        y = (0.1 + 0.12 * i) * height
        x = (0.05 + 0.15 * i) * width
        rows.append([y, x, y + (0.15 + 0.03 * i) * height, x + (0.1 + 0.02 * i) * width])
    boxes = np.full((1, MAX_GT_BOXES, 4), -1.0, np.float32)
    boxes[0, :NUM_GT_BOXES] = np.minimum(rows, [height, width, height, width])
    classes = np.full((1, MAX_GT_BOXES), -1, np.int32)
    classes[0, :NUM_GT_BOXES] = [1 + i % num_classes for i in range(NUM_GT_BOXES)]
    return {"gt_boxes": tf.constant(boxes), "gt_classes": tf.constant(classes)}


# ------------------------------------------------------------------ models ----


def rfcn_model_config(depth: int, num_classes: int, num_proposals: int, freeze_at: int = 2,
                      frozen_batch_norm: bool = True) -> configs.ModelConfig:
    """The paper's R-FCN settings (configs.ModelConfig defaults) at the given sizes."""
    cfg = configs.ModelConfig(num_classes=num_classes)
    cfg.backbone.depth = depth
    cfg.backbone.freeze_at = freeze_at
    cfg.backbone.frozen_batch_norm = frozen_batch_norm
    cfg.rpn.post_nms_top_k_test = num_proposals
    return cfg


def build_rfcn(depth: int, num_classes: int, num_proposals: int, freeze_at: int = 2,
               frozen_batch_norm: bool = True) -> rfcn_model.RfcnModel:
    """A randomly initialised R-FCN (builder.build_model)."""
    return builder.build_model(
        rfcn_model_config(depth, num_classes, num_proposals, freeze_at, frozen_batch_norm),
        load_pretrained=False)


def faster_rcnn_experiment(depth: int, num_classes: int, num_proposals: int):
    """official.vision's fasterrcnn_resnetfpn_coco experiment config, adapted:
    no masks, ResNet-`depth`, num_classes + 1 classes (background included),
    `num_proposals` test RoIs, plain (not synchronised) batch norm, no checkpoint."""
    from official.core import exp_factory  # pylint: disable=import-outside-toplevel
    experiment = exp_factory.get_exp_config("fasterrcnn_resnetfpn_coco")
    model = experiment.task.model
    model.include_mask = False
    model.num_classes = num_classes + 1
    model.backbone.resnet.model_id = depth
    model.roi_generator.test_num_proposals = num_proposals
    model.input_size = [None, None, 3]
    model.norm_activation.use_sync_bn = False
    experiment.task.init_checkpoint = ""
    experiment.task.losses.l2_weight_decay = 0.0005  # R-FCN's weight decay
    return experiment


def build_faster_rcnn(experiment) -> tf_keras.Model:
    """factory.build_maskrcnn of the experiment's model config, L2 as MaskRCNNTask adds it."""
    from official.vision.modeling import factory  # pylint: disable=import-outside-toplevel
    decay = experiment.task.losses.l2_weight_decay
    return factory.build_maskrcnn(
        input_specs=tf_keras.layers.InputSpec(shape=[None, None, None, 3]),
        model_config=experiment.task.model,
        l2_regularizer=tf_keras.regularizers.l2(decay / 2.0) if decay else None)


# --------------------------------------------------------------- inference ----

DETECTION_KEYS = export_inputs.OUTPUT_KEYS


def rfcn_detect_function(model: rfcn_model.RfcnModel, implementation: str,
                         inputs: Dict[str, tf.Tensor]):
    """The concrete inference function of `model` with PSRoI pooling `implementation`,
    traced for the static shapes of `inputs` (returns the TF OD API outputs); the model's
    own PSRoI implementation is restored after the trace."""

    @tf.function
    def detect(images, image_info):
        outputs = model({"images": images, "image_info": image_info}, training=False)
        return {k: outputs[k] for k in DETECTION_KEYS}

    with model.traced_with(psroi_impl=implementation):
        return detect.get_concrete_function(
            tf.TensorSpec(inputs["images"].shape, tf.float32),
            tf.TensorSpec(inputs["image_info"].shape, tf.float32))


def faster_detect_function(model: tf_keras.Model, inputs: Dict[str, tf.Tensor]):
    """The concrete inference function of the Faster R-CNN for the shapes of `inputs`."""

    @tf.function
    def detect(images, image_info):
        outputs = model(images, image_shape=image_info[:, 1, :], training=False)
        return {k: outputs[k] for k in DETECTION_KEYS}

    return detect.get_concrete_function(tf.TensorSpec(inputs["images"].shape, tf.float32),
                                        tf.TensorSpec(inputs["image_info"].shape, tf.float32))


def blocking(function: Callable, *args, **kwargs) -> Callable[[], Dict[str, np.ndarray]]:
    """A no-argument callable running function(*args, **kwargs) and fetching every output
    to NumPy, so that its wall time covers the whole computation."""

    def run():
        outputs = function(*args, **kwargs)
        return {k: np.asarray(v) for k, v in outputs.items()}

    return run


def export_rfcn(model: rfcn_model.RfcnModel, size: Tuple[int, int], directory: str) -> str:
    """The portable SavedModel of `model` (rfcn_tf.export.saved_model.export_detector)
    whose in-graph preprocessing keeps an H x W image at its size."""
    from rfcn_tf.export import saved_model  # pylint: disable=import-outside-toplevel
    config = configs.ExperimentConfig(model=model.model_config)
    config.eval_data.short_side = min(size)
    config.eval_data.max_side = max(size)
    config.eval_data.pad_multiple = RFCN_PAD
    names = [f"class_{i}" for i in range(1, model.model_config.num_classes + 1)]
    return saved_model.export_detector(model, config, directory, 1, input_type="image_tensor",
                                       psroi_impl="portable", class_names=names,
                                       extra_signatures=False)


def saved_model_callable(export_path: str, image: np.ndarray) -> Callable[[], dict]:
    """Loads the export and returns a blocking call of serving_default on `image`."""
    loaded = tf.saved_model.load(export_path)
    signature = loaded.signatures["serving_default"]
    image = tf.constant(image)
    run = blocking(signature, input_tensor=image)

    def call():
        _ = loaded  # keeps the loaded object (and its variables) alive
        return run()

    return call


def tflite_callable(export_path: str, size: Tuple[int, int], directory: str,
                    image: np.ndarray) -> Callable[[], dict]:
    """Converts the export to float32 TFLite at H x W (rfcn_tf.export.tflite) and returns
    a call of it in ai_edge_litert with one thread per CPU."""
    from rfcn_tf.export import tflite  # pylint: disable=import-outside-toplevel
    path = os.path.join(directory, f"rfcn_{size_name(size)}.tflite")
    tflite.convert(export_path, {"float32": path}, size)
    detector = tflite.TFLiteDetector(path, num_threads=os.cpu_count())
    return lambda: detector(image)


class Candidate(NamedTuple):
    """One thing to time: `run()` blocks until done; `concrete` (or None) is the traced
    function for FLOP counting and profiling, `model` the stage rules it follows
    (bench/stages.py)."""
    run: Callable[[], object]
    concrete: Optional[object]
    model: str


def inference_candidates(size: Tuple[int, int], rfcn: rfcn_model.RfcnModel,
                         faster: tf_keras.Model, flavours: List[str], work_dir: str
                         ) -> Dict[str, Candidate]:
    """{"rfcn_<flavour>": ..., "faster_rcnn": ...} for an H x W input, ready to time."""
    rfcn_in = model_inputs(size, RFCN_PAD)
    faster_in = model_inputs(size, FASTER_PAD)
    candidates: Dict[str, Candidate] = {}
    for flavour in ("custom", "portable"):
        if flavour in flavours:
            concrete = rfcn_detect_function(rfcn, flavour, rfcn_in)
            candidates[f"rfcn_{flavour}"] = Candidate(
                blocking(concrete, rfcn_in["images"], rfcn_in["image_info"]), concrete, "rfcn")
    concrete = faster_detect_function(faster, faster_in)
    candidates["faster_rcnn"] = Candidate(
        blocking(concrete, faster_in["images"], faster_in["image_info"]), concrete,
        "faster_rcnn")
    if "saved_model" in flavours or "tflite" in flavours:
        logging.info("exporting the portable SavedModel for %s", size_name(size))
        export_path = export_rfcn(rfcn, size, os.path.join(work_dir, f"export_{size_name(size)}"))
        if "saved_model" in flavours:
            candidates["rfcn_saved_model"] = Candidate(
                saved_model_callable(export_path, rfcn_in["uint8"]), None, "rfcn")
        if "tflite" in flavours:
            logging.info("converting to TFLite at %s", size_name(size))
            candidates["rfcn_tflite"] = Candidate(
                tflite_callable(export_path, size, work_dir, rfcn_in["uint8"]), None, "rfcn")
    return candidates


# ---------------------------------------------------------------- training ----


def rfcn_train_callable(model: rfcn_model.RfcnModel, size: Tuple[int, int],
                        learning_rate: float) -> Callable[[], Dict[str, np.ndarray]]:
    """One DetectionTrainer.train_step (SGD, momentum 0.9, the paper's weight decay) per
    call on a fixed batch of one H x W image."""
    from rfcn_tf.training import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
    inputs = model_inputs(size, RFCN_PAD)
    batch = {"images": inputs["images"], "image_info": inputs["image_info"],
             **ground_truth(size, model.model_config.num_classes)}
    trainer = trainer_lib.DetectionTrainer(
        model, [k for k in rfcn_model.LOSS_KEYS if k != "model_loss"], weight_decay=0.0005)
    trainer.compile(optimizer=tf_keras.optimizers.SGD(learning_rate, momentum=0.9))
    step = tf.function(trainer.train_step)
    return blocking(step, batch)


def faster_rcnn_labels(model_config, parser_config, images: tf.Tensor, image_info: tf.Tensor,
                       gt_boxes: tf.Tensor, gt_classes: tf.Tensor) -> Dict[str, object]:
    """The `labels` dict official.vision's MaskRCNNTask.train_step reads, built the way its
    data parser builds it (anchors and RpnAnchorLabeler targets per image, ground truth
    padded with -1). images must have a static batch size and spatial shape."""
    from official.vision.ops import anchor  # pylint: disable=import-outside-toplevel
    batch, height, width = images.shape[0], images.shape[1], images.shape[2]
    anchor_boxes = anchor.build_anchor_generator(
        min_level=model_config.min_level, max_level=model_config.max_level,
        num_scales=model_config.anchor.num_scales,
        aspect_ratios=model_config.anchor.aspect_ratios,
        anchor_size=model_config.anchor.anchor_size)(image_size=(height, width))
    labeler = anchor.RpnAnchorLabeler(parser_config.rpn_match_threshold,
                                      parser_config.rpn_unmatched_threshold,
                                      parser_config.rpn_batch_size_per_im,
                                      parser_config.rpn_fg_fraction)
    valid = gt_classes > 0
    score_targets, box_targets = [], []
    for i in range(batch):  # the labeler works on one image; the batch size is static
        boxes = tf.boolean_mask(gt_boxes[i], valid[i])
        classes = tf.cast(tf.boolean_mask(gt_classes[i], valid[i]), tf.float32)[:, None]
        scores, deltas = labeler.label_anchors(anchor_boxes, boxes, classes)
        score_targets.append(scores)
        box_targets.append(deltas)
    stack = lambda per_image: {level: tf.stack([t[level] for t in per_image])  # noqa: E731
                               for level in per_image[0]}
    return {
        "anchor_boxes": {level: tf.tile(boxes[None], [batch, 1, 1, 1])
                         for level, boxes in anchor_boxes.items()},
        "image_info": image_info,
        "rpn_score_targets": stack(score_targets),
        "rpn_box_targets": stack(box_targets),
        "gt_boxes": tf.where(valid[..., None], gt_boxes, -1.0),
        "gt_classes": tf.where(valid, gt_classes, -1),
    }


def faster_train_callable(model: tf_keras.Model, experiment, size: Tuple[int, int],
                          num_classes: int, learning_rate: float
                          ) -> Callable[[], Dict[str, np.ndarray]]:
    """One official.vision MaskRCNNTask.train_step (SGD, momentum 0.9) per call, RPN
    targets computed in the step, on a fixed batch of one H x W image."""
    from official.vision.tasks import maskrcnn  # pylint: disable=import-outside-toplevel
    task = maskrcnn.MaskRCNNTask(experiment.task)
    optimizer = tf_keras.optimizers.SGD(learning_rate, momentum=0.9)
    inputs = model_inputs(size, FASTER_PAD)
    gt = ground_truth(size, num_classes)

    @tf.function
    def step(images, image_info, gt_boxes, gt_classes):
        labels = faster_rcnn_labels(experiment.task.model, experiment.task.train_data.parser,
                                    images, image_info, gt_boxes, gt_classes)
        return task.train_step((images, labels), model, optimizer)

    return blocking(step, inputs["images"], inputs["image_info"], gt["gt_boxes"],
                    gt["gt_classes"])


# ------------------------------------------------------------------- main -----


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def main(argv):
    del argv
    import json  # pylint: disable=import-outside-toplevel
    from bench import timing  # pylint: disable=import-outside-toplevel
    sizes, train_sizes = parse_sizes(FLAGS.sizes), parse_sizes(FLAGS.train_sizes)
    flavours = parse_flavours(FLAGS.flavours)
    work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix="rfcn_bench_")
    rfcn = build_rfcn(FLAGS.depth, FLAGS.num_classes, FLAGS.num_proposals,
                      FLAGS.rfcn_freeze_at, FLAGS.rfcn_frozen_batch_norm)
    experiment = faster_rcnn_experiment(FLAGS.depth, FLAGS.num_classes, FLAGS.num_proposals)
    faster = build_faster_rcnn(experiment)
    results = {"machine": timing.machine_info(), "inference": {}, "training": {}}
    for size in sizes:
        candidates = inference_candidates(size, rfcn, faster, flavours, work_dir)
        times = timing.alternate({k: c.run for k, c in candidates.items()}, FLAGS.warmup,
                                 FLAGS.repeats, label=f"inference {size_name(size)}")
        results["inference"][size_name(size)] = {k: timing.summarize(v) for k, v in times.items()}
    for size in train_sizes:
        steps = {"rfcn": rfcn_train_callable(rfcn, size, FLAGS.learning_rate),
                 "faster_rcnn": faster_train_callable(faster, experiment, size,
                                                      FLAGS.num_classes, FLAGS.learning_rate)}
        times = timing.alternate(steps, FLAGS.train_warmup, FLAGS.train_repeats,
                                 label=f"training {size_name(size)}")
        results["training"][size_name(size)] = {k: timing.summarize(v) for k, v in times.items()}
    for section in ("inference", "training"):
        for size, entry in results[section].items():
            base = entry["faster_rcnn"]["median_s"]
            for name, summary in entry.items():
                print(f"{section} {size} {name}: {summary['median_s'] * 1000:.0f} ms "
                      f"(x{ratio(summary['median_s'], base):.2f} of Faster R-CNN)")
    if FLAGS.output:
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
