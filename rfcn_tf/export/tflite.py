"""TFLite conversion of a portable SavedModel export, at a fixed input size, builtin ops only.

The TFLite model takes uint8 `input_tensor` [1, H, W, 3] (H, W fixed at conversion)
and returns the TF OD API outputs of the SavedModel (detection_boxes normalised to the
input image, detection_scores, detection_classes, num_detections) from its
serving_default signature. Preprocessing is inside, as in the SavedModel. Only TFLite
builtin ops are allowed (no Flex / SELECT_TF_OPS: Python interpreters such as
ai_edge_litert cannot run them). The portable PSRoI pooling (prefix-sum matmuls and
gathers), the RPN's and the detection generator's NMS (NON_MAX_SUPPRESSION_V4 in a WHILE
loop over images and classes: nms_version "builtin", which portable exports get by
default; "v2" converts too), top-k and the bilinear resize all convert. The custom-op
flavour and exports with nms_version "batched" (CombinedNonMaxSuppression) are refused up
front.

Variants:
  float32       plain conversion.
  float16       weights stored as float16 (dequantised at load), float32 compute.
  dynamic_int8  dynamic-range quantisation: int8 weights, activations quantised on
                the fly for the ops that support it.
  full_int8     integer quantisation of the convolutional trunk (backbone, RPN and
                score-map convolutions: int8 weights and activations) with ranges
                calibrated on a representative dataset (training images); the
                post-processing (PSRoI pooling, box decoding, NMS) stays float32
                (see INT8_SCOPES), the input stays uint8 and the outputs float32.

Run a converted model with `TFLiteDetector` (ai_edge_litert's Interpreter).
"""

from __future__ import annotations

import glob
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

VARIANTS = ("float32", "float16", "dynamic_int8", "full_int8")
INPUT_NAME = "input_tensor"
IMAGE_SIGNATURES = ("image_tensor", "serving_default")
# Ops that exist in a SavedModel but have no TFLite builtin, with what to do instead.
_UNSUPPORTED = {
    "CombinedNonMaxSuppression": "re-export with --nms_version=builtin (NonMaxSuppressionV4, "
                                 "a TFLite builtin; the default for the portable flavour)",
}


class ConversionError(ValueError):
    """A model or option the conversion cannot handle; the message says what to do."""


def check_convertible(saved_model_dir: str, target: str) -> None:
    """Raises ConversionError when the export uses ops `target` (e.g. "TFLite") cannot run:
    the compiled PSRoIPool op or combined NMS."""
    from rfcn_tf.export import graph_ops  # pylint: disable=import-outside-toplevel
    ops = graph_ops.saved_model_op_types(saved_model_dir)
    custom = graph_ops.custom_ops(ops)
    if custom:
        raise ConversionError(
            f"{saved_model_dir} is the custom-op flavour (it uses {sorted(custom)}), which "
            f"{target} cannot run; export with --psroi_impl=portable (the default) and "
            "convert that")
    for op, advice in _UNSUPPORTED.items():
        if op in ops:
            raise ConversionError(f"{saved_model_dir} uses {op}, which {target} has no builtin "
                                  f"for; {advice}")


def parse_input_size(text: str) -> Tuple[int, int]:
    """"H,W" (or "S" for S x S) -> (H, W), both >= 1 and H * W at most the pixel limit of
    an export's inputs (rfcn_tf.export.inputs.MAX_IMAGE_PIXELS, which its graph refuses
    above); raises ConversionError otherwise."""
    from rfcn_tf.export.inputs import MAX_IMAGE_PIXELS  # pylint: disable=import-outside-toplevel
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = (size[0], size[0])
    if len(size) != 2 or min(size) < 1:
        raise ConversionError(f"input size must be 'H,W' or 'S' with positive integers, "
                              f"got {text!r}")
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise ConversionError(f"input size {size[0]},{size[1]} has {size[0] * size[1]:,} "
                              f"pixels, more than the {MAX_IMAGE_PIXELS:,} an export takes "
                              "(rfcn_tf.export.inputs.MAX_IMAGE_PIXELS); give a smaller one")
    return size  # type: ignore[return-value]


def default_input_size(saved_model_dir: str) -> Tuple[int, int]:
    """(H, W) from the export's preprocessing (assets/rfcn_export.json): padded_size,
    else a square of short_side."""
    from rfcn_tf.export import saved_model as saved_model_lib  # pylint: disable=import-outside-toplevel
    pre = saved_model_lib.read_metadata(saved_model_dir).get("preprocessing")
    if not pre:
        raise ConversionError(f"{saved_model_dir} has no rfcn_export.json; give "
                              "--input_size=H,W")
    if pre.get("padded_size"):
        return tuple(pre["padded_size"])
    side = int(pre["short_side"])
    return side, side


def parse_variants(text: str) -> List[str]:
    """"float32,full_int8" or "all" -> variant names; ConversionError for unknown ones."""
    variants = list(VARIANTS) if text.strip() == "all" else [
        v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ConversionError(f"TFLite variants must name some of {VARIANTS} "
                              f"or be 'all', got {text!r}")
    return variants


def variant_paths(output: str, variants: List[str]) -> Dict[str, str]:
    """One variant: {variant: output}; several: <output stem>_<variant>.tflite each."""
    if len(variants) == 1:
        return {variants[0]: output}
    stem, ext = os.path.splitext(output)
    return {v: f"{stem}_{v}{ext or '.tflite'}" for v in variants}


def image_signature(loaded, saved_model_dir: str):
    """The export's signature taking uint8 images (image_tensor, else serving_default)."""
    for key in IMAGE_SIGNATURES:
        if key in loaded.signatures:
            function = loaded.signatures[key]
            spec = function.structured_input_signature[1].get(INPUT_NAME)
            if spec is not None and spec.dtype.name == "uint8":
                return function
    raise ConversionError(f"{saved_model_dir} has no signature taking uint8 '{INPUT_NAME}' "
                          f"images (looked at {IMAGE_SIGNATURES}); export it with rfcn_tf")


def write_fixed_size_saved_model(saved_model_dir: str, input_size: Tuple[int, int],
                                 output_dir: str) -> str:
    """Saves a SavedModel whose serving_default calls the export's image signature with a
    fixed uint8 [1, H, W, 3] input; the converter then sees static shapes throughout."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    loaded = tf.saved_model.load(saved_model_dir)
    signature = image_signature(loaded, saved_model_dir)
    module = tf.Module()
    module.exported = loaded

    @tf.function(input_signature=[
        tf.TensorSpec([1, input_size[0], input_size[1], 3], tf.uint8, name=INPUT_NAME)])
    def serve(input_tensor):
        return signature(input_tensor=input_tensor)

    module.serve = serve
    tf.saved_model.save(module, output_dir, signatures={"serving_default": serve})
    return output_dir


def load_images(paths: Sequence[str], input_size: Tuple[int, int]) -> Iterator[np.ndarray]:
    """uint8 [H, W, 3] arrays of image files, resized (bilinear, aspect ratio not kept)
    to the model's fixed input size; unreadable files are skipped with a warning."""
    from absl import logging  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB").resize((input_size[1], input_size[0]),
                                                    Image.BILINEAR)
                yield np.asarray(image, np.uint8)
        except (OSError, ValueError) as error:
            logging.warning("representative data: skipping %s (%s)", path, error)


def image_paths(data_config, limit: int) -> List[str]:
    """Up to `limit` image files of a DataConfig (voc, coco or synthetic format), spread
    evenly over the split; e.g. config.train_data for full_int8 calibration."""
    from rfcn_tf.data import sources  # pylint: disable=import-outside-toplevel
    source = sources.open_source(data_config)
    if source.records is None:
        raise ConversionError("representative images need a dataset of image files "
                              "(voc, coco or synthetic format), not TFRecords; pass "
                              "--representative_images='dir/*.jpg' instead")
    paths = [r.image_path for r in source.records if r.image_path]
    step = max(len(paths) // max(limit, 1), 1)  # spread over the set, deterministic
    return paths[::step][:limit]


def glob_images(pattern: str, limit: int) -> List[str]:
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise ConversionError(f"no files match --representative_images={pattern!r}")
    return paths[:limit]


# Op outputs under these name scopes stay int8 in the full_int8 variant: the
# convolutional trunk. Everything else (preprocessing, PSRoI pooling, proposal and
# detection post-processing, the NMS loops) is kept float32: int8 box arithmetic breaks
# the NMS (a quantised IoU division by zero) and the summed-area tables of the portable
# pooling need more than 8 bits.
INT8_SCOPES = ("rfcn/backbone/", "rfcn/rpn_head/", "rfcn/rfcn_head/reduce/",
               "rfcn/rfcn_head/class_maps/", "rfcn/rfcn_head/box_maps/")


def _op_output_names(flatbuffer: bytes) -> List[str]:
    """Output tensor names of every op of every subgraph (WHILE bodies included)."""
    from tensorflow.lite.tools import flatbuffer_utils  # pylint: disable=import-outside-toplevel
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    names = []
    for subgraph in model.subgraphs:
        for op in subgraph.operators or []:
            # op.outputs is a NumPy array (or None): `or []` would be ambiguous.
            outputs = op.outputs if op.outputs is not None else []
            names.extend(subgraph.tensors[i].name.decode() for i in outputs)
    return names


def op_tensor_types(flatbuffer: bytes) -> Dict[str, int]:
    """Count of op outputs per TFLite tensor type name (e.g. {"FLOAT32": 500, "INT8": 120})."""
    from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=import-outside-toplevel
    from tensorflow.lite.tools import flatbuffer_utils  # pylint: disable=import-outside-toplevel
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    counts: Dict[str, int] = {}
    for subgraph in model.subgraphs:
        for op in subgraph.operators or []:
            for i in (op.outputs if op.outputs is not None else []):  # a NumPy array or None
                name = type_names.get(subgraph.tensors[i].type, str(subgraph.tensors[i].type))
                counts[name] = counts.get(name, 0) + 1
    return counts


def _quantize_trunk(calibrated: bytes) -> bytes:
    """Quantises a calibrated model to int8, except the ops outside INT8_SCOPES.

    These are the two steps tf.lite.experimental.QuantizationDebugger runs for selective
    quantisation (its denylisted_nodes), without its instrumented debug model. TOPK_V2,
    which the trunk does not use, is also denied by type: the node denylist does not hold
    an op with two outputs, and an int8 top-k of the RPN's scores (1/256 steps, many
    ties) reorders the proposals.
    """
    from tensorflow.lite.python import convert as lite_convert  # pylint: disable=import-outside-toplevel
    float_nodes = [n for n in _op_output_names(calibrated) if not n.startswith(INT8_SCOPES)]
    return lite_convert.mlir_quantize(calibrated, disable_per_channel=False,
                                      fully_quantize=False, denylisted_nodes=float_nodes,
                                      denylisted_ops=["TOPK_V2"])


def _convert_fixed(fixed_dir: str, variant: str, representative_images) -> bytes:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    converter = tf.lite.TFLiteConverter.from_saved_model(fixed_dir)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if variant != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if variant == "full_int8":
        def dataset():
            count = 0
            for image in representative_images():
                count += 1
                yield {INPUT_NAME: np.asarray(image, np.uint8)[None]}
            if count == 0:
                raise ConversionError("the representative dataset is empty")
        converter.representative_dataset = dataset
        converter._experimental_calibrate_only = True  # pylint: disable=protected-access
    try:
        flatbuffer = converter.convert()
        return _quantize_trunk(flatbuffer) if variant == "full_int8" else flatbuffer
    except ConversionError:
        raise
    except Exception as error:  # the converter raises several private error types
        raise ConversionError(f"TFLite conversion ({variant}) failed: {error}") from error


def convert(saved_model_dir: str, output_paths: Dict[str, str], input_size: Tuple[int, int],
            representative_images: Optional[Callable[[], Iterable[np.ndarray]]] = None
            ) -> List[dict]:
    """Converts the export to one TFLite flatbuffer per variant.

    output_paths: variant -> output file (variants from VARIANTS).
    representative_images: (full_int8 only) a callable returning an iterable of uint8
      [H, W, 3] images of the input size (e.g. `load_images(image_paths(config.train_data, 32), size)`).
    Returns one {"variant", "path", "input_size", "bytes", "seconds", "op_types"} per
    variant. Raises ConversionError for an unknown variant, a missing dataset or a model
    with ops TFLite cannot run without Flex.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    unknown = sorted(set(output_paths) - set(VARIANTS))
    if unknown or not output_paths:
        raise ConversionError(f"TFLite variants must be among {VARIANTS}, got "
                              f"{sorted(output_paths)}")
    if "full_int8" in output_paths and representative_images is None:
        raise ConversionError("the full_int8 variant needs a representative dataset "
                              "(training images)")
    check_convertible(saved_model_dir, "TFLite")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        fixed = write_fixed_size_saved_model(saved_model_dir, input_size,
                                             os.path.join(tmp, "fixed"))
        for variant in [v for v in VARIANTS if v in output_paths]:
            started = time.time()
            flatbuffer = _convert_fixed(fixed, variant, representative_images)
            path = output_paths[variant]
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with tf.io.gfile.GFile(path, "wb") as f:
                f.write(flatbuffer)
            results.append({"variant": variant, "path": path, "input_size": list(input_size),
                            "bytes": len(flatbuffer), "seconds": time.time() - started,
                            "op_types": op_tensor_types(flatbuffer)})
    return results


class TFLiteDetector:
    """A converted model in ai_edge_litert's Interpreter.

    `detector(images)` takes uint8 [1, H, W, 3] at the model's input size (see
    `input_size`) and returns the TF OD API outputs as NumPy arrays with a batch axis.
    """

    def __init__(self, model_path: str, num_threads: Optional[int] = None):
        from ai_edge_litert.interpreter import Interpreter  # pylint: disable=import-outside-toplevel
        self.interpreter = Interpreter(model_path=model_path, num_threads=num_threads)
        self._runner = self.interpreter.get_signature_runner("serving_default")
        details = self._runner.get_input_details()[INPUT_NAME]
        self.input_size = (int(details["shape"][1]), int(details["shape"][2]))
        self.input_dtype = details["dtype"]

    def __call__(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        images = np.asarray(images)
        expected = (1, self.input_size[0], self.input_size[1], 3)
        if images.dtype != np.uint8 or images.shape != expected:
            raise ValueError(f"this TFLite model takes uint8 {list(expected)}, got "
                             f"{images.dtype} {list(images.shape)}")
        return {k: np.asarray(v) for k, v in self._runner(**{INPUT_NAME: images}).items()}

    def latency_ms(self, runs: int = 10, warmup: int = 2, seed: int = 0) -> float:
        """Median wall time of one invoke on a random image, in milliseconds."""
        rng = np.random.default_rng(seed)
        image = rng.integers(0, 256, (1, *self.input_size, 3), dtype=np.uint8)
        for _ in range(warmup):
            self(image)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self(image)
            times.append((time.perf_counter() - start) * 1000.0)
        return statistics.median(times)
