r"""SavedModel export for TF Serving: images in, TF Object Detection API detections out.

`export_saved_model(config, checkpoint, export_dir)` (and `python -m rfcn_tf.export`,
see rfcn_tf/export/cli.py) writes export_dir/<version>/, the layout TF Serving expects
(version = the checkpoint's training step unless given), atomically: a failed export
leaves no partial version directory and an earlier export of that version in place.
Signatures:

  serving_default               the --input_type one (config export.input_type):
  image_tensor                  input_tensor uint8 [B, H, W, 3], any H, W (one size
                                per batch) with H * W <= inputs.MAX_IMAGE_PIXELS
  encoded_image_string_tensor   input_tensor string [B]: JPEG/PNG/GIF/BMP bytes
  tf_example                    input_tensor string [B]: tf.train.Example protos with
                                image/encoded
(the three named ones are written too unless export.extra_signatures is false), all with
outputs
  detection_boxes    float32 [B, D, 4] (ymin, xmin, ymax, xmax) normalised to the
                     input image, in [0, 1]
  detection_scores   float32 [B, D], sorted, descending
  detection_classes  float32 [B, D], 1-based label-map ids
  num_detections     float32 [B]; the slots past it are zero
D = model.detection.max_detections. Preprocessing (resize, normalisation, padding) is in
the graph: rfcn_tf.export.inputs.

Assets: assets/label_map.pbtxt (TF OD API label map of the classes the model was trained
with: see class_names_for_export) and assets/rfcn_export.json (input type, PSRoI
implementation, preprocessing, class names, model config).

PSRoI pooling flavour (psroi_impl): "portable" (default) uses stock TensorFlow ops
only, so stock TF Serving, a Python without rfcn_tf, TFLite and tf2onnx can all run
it; "custom" uses the compiled RfcnPsRoiPool op, which the consumer must register
(tf.load_op_library, or a TF Serving build that links BUILD's :psroi_pool_ops).

Detection NMS (nms_version, config export.nms_version): "auto" gives the portable
flavour "builtin" (NonMaxSuppressionV4 per image and class: a TensorFlow kernel, a TFLite
builtin and ONNX NonMaxSuppression) and the custom flavour the model's
model.detection.nms_version ("batched" by default: tf.image.combined_non_max_suppression,
TensorFlow only); "builtin", "batched" or "v2" (official.vision's padded NMS) force one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from typing import Dict, List, Optional, Sequence

import rfcn_tf  # noqa: F401  (tf.keras -> tf_keras before TensorFlow loads)
import tensorflow as tf
from absl import logging

from rfcn_tf import configs
from rfcn_tf.export import graph_ops
from rfcn_tf.export import inputs as inputs_lib
from rfcn_tf.modeling import detection

SIGNATURE_KEY = "serving_default"
INPUT_NAME = inputs_lib.INPUT_NAME
OUTPUT_KEYS = inputs_lib.OUTPUT_KEYS
LABEL_MAP_ASSET = "label_map.pbtxt"
METADATA_ASSET = "rfcn_export.json"
PSROI_FLAVOURS = ("portable", "custom")
NMS_CHOICES = ("auto",) + detection.NMS_VERSIONS


class ExportError(ValueError):
    """An export request that cannot be carried out; the message says why."""


class DetectionModule(tf.Module):
    """The serving functions and the detector's variables, without the Keras object.

    Saving the Keras model itself would make tf.saved_model trace its training-mode
    call too (which needs ground truth); only the variables are tracked here, and the
    serving functions reach the detector through a closure. `functions[input_type]`
    is the tf.function of each input type (see rfcn_tf.export.inputs).
    """

    def __init__(self, detector, data_config: configs.DataConfig,
                 input_types: Sequence[str] = inputs_lib.INPUT_TYPES,
                 assets: Sequence[str] = ()):
        super().__init__(name="rfcn_detection_module")
        self.detector_variables = list(detector.variables)
        self.assets = [tf.saved_model.Asset(path) for path in assets]
        preprocessor = inputs_lib.Preprocessor(data_config)
        max_detections = detector.model_config.detection.max_detections

        def detect(images: tf.Tensor) -> Dict[str, tf.Tensor]:
            model_images, image_info = preprocessor(images)
            outputs = detector({"images": model_images, "image_info": image_info},
                               training=False)
            return {key: tf.cast(outputs[key], tf.float32) for key in OUTPUT_KEYS}

        self.functions = {}
        for input_type in input_types:
            function = tf.function(
                inputs_lib.serving_function(detect, input_type, max_detections),
                input_signature=[inputs_lib.input_spec(input_type)])
            setattr(self, f"serve_{input_type}", function)
            self.functions[input_type] = function


def class_names_for_export(config: configs.ExperimentConfig,
                           checkpoint_path: Optional[str] = None) -> List[str]:
    """Names of classes 1..num_classes that the model was trained with
    (loop.trained_class_names: the label map its training run recorded beside
    `checkpoint_path`, else train_data's; never eval_data's), else "class_<id>" with a
    warning when neither can be read."""
    from rfcn_tf.training import loop  # pylint: disable=import-outside-toplevel
    names = loop.trained_class_names(config, checkpoint_path)
    if names is None:
        logging.warning("export: classes are named class_1..class_%d", config.model.num_classes)
        return [f"class_{i}" for i in range(1, config.model.num_classes + 1)]
    return names


def _check_psroi_flavour(psroi_impl: str) -> None:
    if psroi_impl not in PSROI_FLAVOURS:
        raise ExportError(f"psroi_impl must be one of {PSROI_FLAVOURS} for an export, got "
                          f"{psroi_impl!r} ('auto' would make the flavour depend on the machine)")
    if psroi_impl == "custom":
        from rfcn_tf.ops import op_library  # pylint: disable=import-outside-toplevel
        try:
            op_library.load()
        except op_library.OpLibraryUnavailableError as error:
            raise ExportError(f"psroi_impl='custom' needs the compiled op library: {error}"
                              ) from error


def resolve_nms_version(nms_version: str, psroi_impl: str,
                        model_config: configs.ModelConfig) -> str:
    """The NMS of an export: "auto" -> "builtin" for the portable flavour (runs in TFLite
    and ONNX too), the model's detection.nms_version for the custom one. Raises
    ExportError for an unknown name."""
    if nms_version not in NMS_CHOICES:
        raise ExportError(f"nms_version must be one of {NMS_CHOICES}, got {nms_version!r}")
    if nms_version != "auto":
        return nms_version
    return "builtin" if psroi_impl == "portable" else model_config.detection.nms_version


def _write_assets(directory: str, class_names: Sequence[str], metadata: dict) -> List[str]:
    from rfcn_tf.data.label_map import LabelMap  # pylint: disable=import-outside-toplevel
    label_map_path = LabelMap.from_names(class_names).write(
        os.path.join(directory, LABEL_MAP_ASSET))
    metadata_path = os.path.join(directory, METADATA_ASSET)
    with open(metadata_path, "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2)
    return [label_map_path, metadata_path]


def export_detector(detector, config: configs.ExperimentConfig, export_dir: str,
                    version: int = 1, *, input_type: Optional[str] = None,
                    psroi_impl: Optional[str] = None,
                    class_names: Optional[Sequence[str]] = None,
                    extra_signatures: Optional[bool] = None,
                    nms_version: Optional[str] = None) -> str:
    """Saves `detector` (an RfcnModel) as export_dir/<version>; returns that path.

    input_type / psroi_impl / extra_signatures / nms_version default to config.export's;
    class_names to `class_names_for_export(config)`. The SavedModel is written into
    export_dir/.<version>.partial-<random> (a name TF Serving does not load) and renamed to
    export_dir/<version> when complete; an existing export_dir/<version> is replaced only
    then, and a failed export leaves neither a partial directory nor a changed version
    (_move_into_place). The detector's PSRoI implementation and NMS are switched for the
    trace and restored after; its convolutions are traced as Conv2D (no MatmulConv2D matmul form).
    Raises ExportError for a bad input type, flavour, NMS or class list.
    """
    input_type = input_type or config.export.input_type
    psroi_impl = psroi_impl or config.export.psroi_impl
    if input_type not in inputs_lib.INPUT_TYPES:
        raise ExportError(f"input_type must be one of {inputs_lib.INPUT_TYPES}, "
                          f"got {input_type!r}")
    _check_psroi_flavour(psroi_impl)
    nms_version = resolve_nms_version(nms_version or config.export.nms_version, psroi_impl,
                                      config.model)
    if version < 1:
        raise ExportError(f"version must be >= 1 (TF Serving's numbering), got {version}")
    class_names = list(class_names) if class_names else class_names_for_export(config)
    if len(class_names) != config.model.num_classes:
        raise ExportError(f"{len(class_names)} class names for model.num_classes="
                          f"{config.model.num_classes}: {class_names}")
    if extra_signatures is None:
        extra_signatures = config.export.extra_signatures
    input_types = list(inputs_lib.INPUT_TYPES) if extra_signatures else [input_type]
    preprocessor = inputs_lib.Preprocessor(config.eval_data)
    metadata = {
        "format": "rfcn_tf SavedModel", "rfcn_tf_version": rfcn_tf.__version__,
        "tensorflow_version": tf.__version__, "input_type": input_type,
        "signatures": {SIGNATURE_KEY: input_type,
                       **({t: t for t in input_types} if extra_signatures else {})},
        "psroi_impl": psroi_impl, "nms_version": nms_version, "class_names": class_names,
        "preprocessing": preprocessor.as_dict(),
        "max_detections": config.model.detection.max_detections,
        "model": configs.to_dict(config.model),
    }
    path = os.path.join(export_dir, str(version))
    # Written under a name TF Serving skips (it loads all-digit version directories only),
    # renamed to <version> once complete, removed if anything fails before. (Created by
    # tf.saved_model.save with the permissions of any new directory, unlike mkdtemp's 0700.)
    partial = os.path.join(export_dir, f".{version}.partial-{uuid.uuid4().hex}")
    os.makedirs(export_dir, exist_ok=True)
    try:
        # Plain Conv2D in the graph (matmul_convs=False): an export may be served on a GPU
        # or go to TFLite.
        with detector.traced_with(psroi_impl=psroi_impl, nms_version=nms_version,
                                  matmul_convs=False):
            # The assets are staged in export_dir too: a full disk there is the one to free.
            with tempfile.TemporaryDirectory(dir=export_dir, prefix=".assets-") as asset_dir:
                module = DetectionModule(detector, config.eval_data, input_types,
                                         _write_assets(asset_dir, class_names, metadata))
                signatures = {SIGNATURE_KEY: module.functions[input_type]}
                if extra_signatures:
                    signatures.update(module.functions)
                tf.saved_model.save(module, partial, signatures=signatures)
        found = graph_ops.custom_ops(graph_ops.saved_model_op_types(partial))
        if psroi_impl == "portable" and found:
            raise ExportError(f"the portable export {path} contains the custom ops "
                              f"{sorted(found)}")
        _move_into_place(partial, path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already after a complete export
    return path


def _move_into_place(complete: str, path: str) -> None:
    """Renames the directory `complete` to `path`. An existing `path` (an earlier export of
    that version) is first renamed aside, then deleted once `complete` is in its place;
    it is renamed back if that last rename fails."""
    if not os.path.exists(path):
        os.rename(complete, path)
        return
    logging.warning("export: replacing the existing %s", path)
    previous = f"{complete}.replaced"
    os.rename(path, previous)
    try:
        os.rename(complete, path)
    except OSError:
        os.rename(previous, path)
        raise
    shutil.rmtree(previous)


def export_saved_model(config: configs.ExperimentConfig, checkpoint_path: str, export_dir: str,
                       version: Optional[int] = None, *, input_type: Optional[str] = None,
                       psroi_impl: Optional[str] = None,
                       class_names: Optional[Sequence[str]] = None,
                       nms_version: Optional[str] = None) -> str:
    """Restores a training checkpoint into a detector and exports it (export_detector);
    version defaults to the checkpoint's step (the number in "ckpt-<step>"), else 1;
    class_names to those the checkpoint was trained with (class_names_for_export)."""
    from rfcn_tf.training import loop  # pylint: disable=import-outside-toplevel
    psroi_impl = psroi_impl or config.export.psroi_impl
    _check_psroi_flavour(psroi_impl)
    model_config = configs.from_dict(configs.ModelConfig, {
        **configs.to_dict(config.model),
        "head": {**configs.to_dict(config.model.head), "psroi_impl": psroi_impl}})
    detector = loop.restore_detector(model_config, checkpoint_path)
    if version is None:
        suffix = checkpoint_path.rsplit("-", 1)[-1]
        version = int(suffix) if suffix.isdigit() and int(suffix) > 0 else 1
    return export_detector(detector, config, export_dir, version, input_type=input_type,
                           psroi_impl=psroi_impl,
                           class_names=class_names or class_names_for_export(config,
                                                                             checkpoint_path),
                           nms_version=nms_version)


def read_metadata(saved_model_dir: str) -> dict:
    """assets/rfcn_export.json of an export ({} for a SavedModel without it)."""
    path = os.path.join(saved_model_dir, "assets", METADATA_ASSET)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_class_names(saved_model_dir: str) -> Dict[int, str]:
    """id -> name from assets/label_map.pbtxt ({} when there is none)."""
    from rfcn_tf.data.label_map import read_label_map  # pylint: disable=import-outside-toplevel
    path = os.path.join(saved_model_dir, "assets", LABEL_MAP_ASSET)
    if not os.path.isfile(path):
        return {}
    label_map = read_label_map(path)
    return {i: label_map.name_of(i) for i in label_map.ids}
