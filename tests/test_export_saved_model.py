"""SavedModel export: layout and assets, the signatures against the in-process model,
preprocessing identical to the evaluation pipeline's, a fresh Python without rfcn_tf,
stock-ops-only graphs, saved_model_cli, the custom-op flavour and the export command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import export_fixtures as ef
import rfcn_tf  # noqa: F401
import tensorflow as tf

from rfcn_tf.data import preprocess
from rfcn_tf.export import graph_ops, inputs, saved_model


@pytest.fixture(scope="session")
def export_path(tmp_path_factory):
    return ef.exported(str(tmp_path_factory.mktemp("export")))


@pytest.fixture(scope="session")
def reference():
    """The in-process detector's outputs on the scene (what every route must reproduce)."""
    config, detector = ef.trained()
    batch = ef._training_batch(config)  # pylint: disable=protected-access
    outputs = detector({"images": batch["images"], "image_info": batch["image_info"]},
                       training=False)
    return {k: outputs[k].numpy() for k in saved_model.OUTPUT_KEYS}


@pytest.fixture(scope="session")
def loaded(export_path):
    return tf.saved_model.load(export_path)


def encoded_png(image: np.ndarray) -> bytes:
    return tf.io.encode_png(image).numpy()


def example_bytes(encoded: bytes) -> bytes:
    return tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded]))}
    )).SerializeToString()


def assert_same_detections(actual, expected, atol=1e-4):
    for key in saved_model.OUTPUT_KEYS:
        np.testing.assert_allclose(np.asarray(actual[key]), np.asarray(expected[key]), atol=atol,
                                   err_msg=key)


def test_layout_assets_and_metadata(export_path):
    assert os.path.basename(export_path) == "1"  # export_dir/<version>, TF Serving's layout
    for name in ("saved_model.pb", "variables/variables.index", "assets/label_map.pbtxt",
                 "assets/rfcn_export.json"):
        assert os.path.isfile(os.path.join(export_path, name)), name
    assert saved_model.read_class_names(export_path) == {1: "square", 2: "bar"}
    meta = saved_model.read_metadata(export_path)
    assert meta["psroi_impl"] == "portable" and meta["input_type"] == "image_tensor"
    # The portable flavour gets the TFLite-friendly NMS whatever model.detection says.
    assert meta["nms_version"] == "builtin"
    ops = graph_ops.saved_model_op_types(export_path)
    assert "NonMaxSuppressionV4" in ops and "CombinedNonMaxSuppression" not in ops
    assert meta["preprocessing"]["short_side"] == ef.IMAGE_SIZE
    assert meta["signatures"]["serving_default"] == "image_tensor"


def test_scene_is_detected(reference):
    """The fixture model is meaningful: both objects found, right classes, tight boxes."""
    boxes, scores, classes = ef.top_detections(reference, min_score=0.5)
    assert sorted(classes.tolist()) == [1.0, 2.0]
    for gt, cls in zip(ef.GT_BOXES / ef.IMAGE_SIZE, ef.GT_CLASSES):
        match = boxes[classes == cls]
        assert ef.iou(match, gt[None].repeat(len(match), 0)).max() > 0.7


def test_every_signature_matches_the_in_process_model(loaded, reference):
    image = ef.scene()
    assert set(loaded.signatures) == {"serving_default", *inputs.INPUT_TYPES}
    feeds = {
        "serving_default": tf.constant(image[None]),
        "image_tensor": tf.constant(image[None]),
        "encoded_image_string_tensor": tf.constant([encoded_png(image)]),
        "tf_example": tf.constant([example_bytes(encoded_png(image))]),
    }
    for name, feed in feeds.items():
        outputs = loaded.signatures[name](input_tensor=feed)
        assert sorted(outputs) == sorted(saved_model.OUTPUT_KEYS), name
        assert all(v.dtype == tf.float32 for v in outputs.values())
        assert_same_detections({k: v.numpy() for k, v in outputs.items()}, reference)


def test_serving_preprocessing_equals_the_evaluation_pipeline():
    """In-graph preprocessing == rfcn_tf.data.preprocess as the eval pipeline chains it,
    bit for bit, on a non-square image that needs resizing and padding."""
    config = ef.tiny_config("eval_data.short_side=100,eval_data.max_side=150")
    image = np.random.default_rng(3).integers(0, 256, (90, 170, 3), dtype=np.uint8)
    served, info = inputs.Preprocessor(config.eval_data)(tf.constant(image[None]))
    size = preprocess.scaled_size(tf.shape(image)[:2], 100.0, 150.0)
    expected = preprocess.pad(preprocess.normalize(preprocess.resize(tf.constant(image), size)),
                              16)
    assert served.shape[1:] == expected.shape == (80, 160, 3)  # 79x150 padded to 16s
    np.testing.assert_array_equal(served[0].numpy(), expected.numpy())
    np.testing.assert_allclose(info[0].numpy(),
                               preprocess.image_info(tf.shape(image)[:2], size).numpy())


FRESH_PROCESS = r"""
import json, sys
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import op_def_pb2
from tensorflow.python.client import pywrap_tf_session as c
ops = op_def_pb2.OpList()
ops.ParseFromString(c.TF_GetBuffer(c.TF_GetAllOpList()))
loaded = tf.saved_model.load(sys.argv[1])
images = np.load(sys.argv[2])
png = tf.io.encode_png(images[0]).numpy()
example = tf.train.Example(features=tf.train.Features(feature={
    "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png]))}))
feeds = {"serving_default": images, "image_tensor": images,
         "encoded_image_string_tensor": [png], "tf_example": [example.SerializeToString()]}
outputs = {name: {k: v.numpy().tolist() for k, v in
                  loaded.signatures[name](input_tensor=tf.constant(feed)).items()}
           for name, feed in feeds.items()}
print(json.dumps({"rfcn_tf_imported": any(m.startswith("rfcn_tf") for m in sys.modules),
                  "registered_ops": sorted(o.name for o in ops.op),
                  "signatures": sorted(loaded.signatures), "outputs": outputs}))
"""


@pytest.fixture(scope="module")
def fresh_process(export_path, tmp_path_factory):
    """Runs FRESH_PROCESS in a new interpreter outside the repository (no rfcn_tf)."""
    work = tmp_path_factory.mktemp("fresh")
    np.save(work / "scene.npy", ef.scene()[None])
    script = work / "run.py"
    script.write_text(FRESH_PROCESS)
    result = subprocess.run([sys.executable, str(script), export_path, str(work / "scene.npy")],
                            cwd=str(work), env=ef.clean_env(), capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_fresh_process_without_rfcn_tf_gives_the_same_detections(fresh_process, reference):
    """All four signatures, called in a Python that never imported rfcn_tf (the scene as
    pixels, PNG bytes and a tf.Example holding them), give the in-process detections."""
    assert not fresh_process["rfcn_tf_imported"]
    assert fresh_process["signatures"] == sorted(["serving_default", *inputs.INPUT_TYPES])
    assert sorted(fresh_process["outputs"]) == fresh_process["signatures"]
    for name, outputs in fresh_process["outputs"].items():
        assert sorted(outputs) == sorted(saved_model.OUTPUT_KEYS), name
        assert_same_detections({k: np.array(v) for k, v in outputs.items()}, reference)


def test_portable_export_uses_only_stock_tensorflow_ops(fresh_process, export_path):
    """Every op anywhere in the graph (function and while bodies included) is registered
    in a TensorFlow that never loaded the custom op library."""
    used = graph_ops.saved_model_op_types(export_path)
    stock = set(fresh_process["registered_ops"])
    assert "RfcnPsRoiPool" not in stock
    assert {"While", "ResizeBilinear", "Conv2D"} <= used  # the listing reaches the bodies
    assert used - stock == set()


def test_op_listing_flags_a_custom_op(tmp_path):
    """The listing is not vacuous: a graph with a made-up op type is reported."""
    from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=import-outside-toplevel
    proto = saved_model_pb2.SavedModel()
    graph = proto.meta_graphs.add().graph_def
    graph.node.add(name="a", op="Placeholder")
    function = graph.library.function.add()
    function.signature.name = "body_fn"
    function.node_def.add(name="b", op="RfcnPsRoiPool")
    graph.node.add(name="c", op="body_fn")  # a call of a library function, not an op
    (tmp_path / "saved_model.pb").write_bytes(proto.SerializeToString())
    assert graph_ops.saved_model_op_types(str(tmp_path)) == {"Placeholder", "RfcnPsRoiPool"}
    assert graph_ops.custom_ops({"Placeholder", "RfcnPsRoiPool"}) == {"RfcnPsRoiPool"}


def _saved_model_cli():
    found = shutil.which("saved_model_cli", path=os.path.dirname(sys.executable)) or \
        shutil.which("saved_model_cli")
    if found is None:
        pytest.skip("saved_model_cli is not installed next to this Python")
    return found


def test_saved_model_cli_show_and_run(export_path, reference, tmp_path):
    cli = _saved_model_cli()
    show = subprocess.run([cli, "show", "--dir", export_path, "--all"], capture_output=True,
                          text=True, timeout=300, env=ef.clean_env(), check=False)
    assert show.returncode == 0, show.stderr[-3000:]
    for text in ("signature_def['serving_default']", "signature_def['tf_example']",
                 "dtype: DT_UINT8", "shape: (-1, -1, -1, 3)", "detection_boxes",
                 "num_detections"):
        assert text in show.stdout, text
    np.save(tmp_path / "scene.npy", ef.scene()[None])
    run = subprocess.run([cli, "run", "--dir", export_path, "--tag_set", "serve",
                          "--signature_def", "serving_default",
                          "--inputs", f"input_tensor={tmp_path / 'scene.npy'}",
                          "--outdir", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300, env=ef.clean_env(),
                         check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    outputs = {k: np.load(tmp_path / "out" / f"{k}.npy") for k in saved_model.OUTPUT_KEYS}
    assert_same_detections(outputs, reference)


def test_custom_flavour_uses_the_compiled_op_and_agrees(tmp_path, reference):
    from rfcn_tf.ops import op_library  # pylint: disable=import-outside-toplevel
    try:
        op_library.load()
    except op_library.OpLibraryUnavailableError as error:
        if os.environ.get("RFCN_TF_REQUIRE_CUSTOM_OP") == "1":
            raise
        pytest.skip(f"compiled op library unavailable: {error}")
    config, detector = ef.trained()
    path = saved_model.export_detector(detector, config, str(tmp_path), version=3,
                                       psroi_impl="custom", class_names=ef.CLASS_NAMES,
                                       extra_signatures=False)
    assert detector.head.psroi_impl == "portable"  # restored after the export
    ops = graph_ops.saved_model_op_types(path)
    assert graph_ops.custom_ops(ops) == {"RfcnPsRoiPool"}
    assert saved_model.read_metadata(path)["psroi_impl"] == "custom"
    # The custom flavour keeps the model's NMS (model.detection.nms_version: batched).
    assert saved_model.read_metadata(path)["nms_version"] == "batched"
    assert "CombinedNonMaxSuppression" in ops
    outputs = tf.saved_model.load(path).signatures["serving_default"](
        input_tensor=tf.constant(ef.scene()[None]))
    assert_same_detections({k: v.numpy() for k, v in outputs.items()}, reference, atol=1e-3)


def test_portable_export_with_batched_nms(tmp_path, reference):
    config, detector = ef.trained()
    path = saved_model.export_detector(detector, config, str(tmp_path), nms_version="batched",
                                       class_names=ef.CLASS_NAMES, extra_signatures=False)
    assert detector.detection_generator.get_config()["nms_version"] == "batched"  # restored
    ops = graph_ops.saved_model_op_types(path)
    assert "CombinedNonMaxSuppression" in ops and not graph_ops.custom_ops(ops)
    assert saved_model.read_metadata(path)["nms_version"] == "batched"
    outputs = tf.saved_model.load(path).signatures["serving_default"](
        input_tensor=tf.constant(ef.scene()[None]))
    assert_same_detections({k: v.numpy() for k, v in outputs.items()}, reference)


def test_export_restores_the_detector_when_saving_fails(monkeypatch, tmp_path):
    config, detector = ef.trained()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        saved_model.export_detector(detector, config, str(tmp_path), psroi_impl="portable",
                                    nms_version="v2", class_names=ef.CLASS_NAMES)
    assert detector.head.psroi_impl == "portable"
    assert detector.detection_generator.get_config()["nms_version"] == "batched"
    assert detector.matmul_convs_enabled()


def test_a_failed_export_leaves_no_version_and_keeps_the_previous_one(monkeypatch, tmp_path):
    """A save that fails midway (as on a full disk: variables and assets written, no
    saved_model.pb) leaves no export_dir/<version> that TF Serving would try to load and
    no partial directory, and an earlier export of that version stays whole; a complete
    re-export replaces it."""
    config, detector = ef.trained()
    export_dir = str(tmp_path / "export")

    def export(**kwargs):
        return saved_model.export_detector(detector, config, export_dir, version=3,
                                           class_names=ef.CLASS_NAMES,
                                           extra_signatures=False, **kwargs)

    path = export()
    os.mkdir(tmp_path / "plain")  # TF Serving may run as another user: not mkdtemp's 0700
    assert os.stat(path).st_mode == os.stat(tmp_path / "plain").st_mode
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        previous = f.read()
    save = tf.saved_model.save

    def save_then_fail(module, directory, **kwargs):
        save(module, directory, **kwargs)
        os.remove(os.path.join(directory, "saved_model.pb"))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tf.saved_model, "save", save_then_fail)
    for version in (3, 4):
        with pytest.raises(OSError, match="No space left"):
            saved_model.export_detector(detector, config, export_dir, version=version,
                                        input_type="encoded_image_string_tensor",
                                        class_names=ef.CLASS_NAMES, extra_signatures=False)
        assert os.listdir(export_dir) == ["3"]
        assert os.path.isfile(os.path.join(path, "saved_model.pb"))
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        assert f.read() == previous
    assert saved_model.read_metadata(path)["input_type"] == "image_tensor"

    monkeypatch.setattr(tf.saved_model, "save", save)
    assert export(input_type="encoded_image_string_tensor") == path
    assert os.listdir(export_dir) == ["3"]
    assert saved_model.read_metadata(path)["input_type"] == "encoded_image_string_tensor"
    assert list(tf.saved_model.load(path).signatures) == ["serving_default"]


def test_exports_trace_plain_convolutions(export_path):
    # The matmul form of MatmulConv2D is an in-process CPU choice; exports keep Conv2D.
    from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=import-outside-toplevel
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(export_path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    rpn_ops = {node.op for meta_graph in proto.meta_graphs
               for function in meta_graph.graph_def.library.function
               for node in function.node_def if "rpn_conv/" in node.name}
    assert "Conv2D" in rpn_ops and "MatMul" not in rpn_ops, rpn_ops
    _, detector = ef.trained()
    assert detector.matmul_convs_enabled()  # restored after the export


def test_export_refuses_bad_options():
    config, detector = ef.trained()
    with pytest.raises(saved_model.ExportError, match="input_type must be one of"):
        saved_model.export_detector(detector, config, "/nonexistent", input_type="jpeg")
    with pytest.raises(saved_model.ExportError, match="'auto' would make the flavour"):
        saved_model.export_detector(detector, config, "/nonexistent", psroi_impl="auto")
    with pytest.raises(saved_model.ExportError, match="nms_version must be one of"):
        saved_model.export_detector(detector, config, "/nonexistent", nms_version="v9")
    with pytest.raises(saved_model.ExportError, match="1 class names for model.num_classes=2"):
        saved_model.export_detector(detector, config, "/nonexistent", class_names=["x"])


def test_export_command_from_a_checkpoint(tmp_path, reference):
    """`python -m rfcn_tf.export` restores a training checkpoint, names the version after
    its step, sets serving_default's input type from --input_type, and the export gives
    the in-process detector's detections."""
    config, detector = ef.trained()
    checkpoint = tf.train.Checkpoint(model=detector)
    checkpoint.save_counter.assign(6)
    prefix = checkpoint.save(str(tmp_path / "ckpt"))  # ckpt-7, as training writes them
    from rfcn_tf import configs  # pylint: disable=import-outside-toplevel
    configs.save_config(config, str(tmp_path / "config.yaml"))
    result = ef.run_module("rfcn_tf.export", f"--checkpoint={prefix}",
                           f"--config_file={tmp_path / 'config.yaml'}",
                           f"--export_dir={tmp_path / 'export'}",
                           "--input_type=encoded_image_string_tensor",
                           "--params_override=export.extra_signatures=false")
    assert result.returncode == 0, result.stderr[-4000:]
    path = str(tmp_path / "export" / "7")
    assert f"Wrote SavedModel {path}" in result.stdout
    meta = saved_model.read_metadata(path)
    assert meta["signatures"] == {"serving_default": "encoded_image_string_tensor"}
    loaded = tf.saved_model.load(path)
    assert list(loaded.signatures) == ["serving_default"]
    out = loaded.signatures["serving_default"](
        input_tensor=tf.constant([encoded_png(ef.scene())]))
    # PNG is lossless and the checkpoint holds the detector's exact weights: the same
    # detections as the model in this process, like every other export route here.
    assert_same_detections({k: v.numpy() for k, v in out.items()}, reference)


def test_export_command_reports_a_missing_checkpoint(tmp_path):
    result = ef.run_module("rfcn_tf.export", f"--checkpoint={tmp_path / 'nope'}",
                           f"--config_file={tmp_path / 'nope.yaml'}", f"--export_dir={tmp_path}")
    assert result.returncode == 1
    assert "rfcn_tf.export: error:" in result.stderr and "not found" in result.stderr


def test_export_command_reports_an_unwritable_export_dir(tmp_path):
    # --export_dir under a regular file: one line naming the path, no traceback.
    config, detector = ef.trained()
    prefix = tf.train.Checkpoint(model=detector).save(str(tmp_path / "ckpt"))
    from rfcn_tf import configs  # pylint: disable=import-outside-toplevel
    configs.save_config(config, str(tmp_path / "config.yaml"))
    (tmp_path / "a_file").write_text("not a directory")
    export_dir = tmp_path / "a_file" / "export"
    result = ef.run_module("rfcn_tf.export", f"--checkpoint={prefix}",
                           f"--config_file={tmp_path / 'config.yaml'}",
                           f"--export_dir={export_dir}")
    assert result.returncode == 1, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    assert (f"rfcn_tf.export: error: cannot write to {export_dir}: " in result.stderr
            and "not a directory" in result.stderr.lower()
            and "once that is fixed, run the command again" in result.stderr), result.stderr[-2000:]


def test_export_preprocesses_as_eval_data_not_train_data(tmp_path, reference):
    """The served preprocessing is eval_data's: with train_data resizing to 64 (eval_data:
    128, what the reference saw) the export still gives the reference detections."""
    _, detector = ef.trained()
    config = ef.tiny_config("train_data.short_side=64,train_data.max_side=64")
    assert (config.train_data.short_side, config.eval_data.short_side) == (64, ef.IMAGE_SIZE)
    path = saved_model.export_detector(detector, config, str(tmp_path),
                                       class_names=ef.CLASS_NAMES, extra_signatures=False)
    assert (saved_model.read_metadata(path)["preprocessing"]
            == inputs.Preprocessor(config.eval_data).as_dict())
    outputs = tf.saved_model.load(path).signatures["serving_default"](
        input_tensor=tf.constant(ef.scene()[None]))
    assert_same_detections({k: v.numpy() for k, v in outputs.items()}, reference)


def test_serving_preprocessing_fits_the_image_inside_padded_size():
    """eval_data.padded_size [64, 96]: a 90 x 170 image is scaled by min(128/170,
    64/90, 96/170) = 96/170 to 51 x 96 (round(90 * 96/170) = round(50.8)), then padded
    to exactly 64 x 96, as the eval pipeline chains rfcn_tf.data.preprocess."""
    config = ef.tiny_config("eval_data.padded_size=[64,96]")
    image = np.random.default_rng(4).integers(0, 256, (90, 170, 3), dtype=np.uint8)
    served, info = inputs.Preprocessor(config.eval_data)(tf.constant(image[None]))
    assert served.shape == (1, 64, 96, 3)
    np.testing.assert_array_equal(info[0, 1].numpy(), [51, 96])
    size = preprocess.scaled_size(tf.shape(image)[:2], float(ef.IMAGE_SIZE),
                                  float(ef.IMAGE_SIZE), [64, 96])
    expected = preprocess.pad(preprocess.normalize(preprocess.resize(tf.constant(image), size)),
                              16, [64, 96])
    np.testing.assert_array_equal(served[0].numpy(), expected.numpy())
    np.testing.assert_array_equal(served[0, 51:].numpy(), 0)  # the padding rows
    np.testing.assert_allclose(info[0].numpy(),
                               preprocess.image_info(tf.shape(image)[:2], size).numpy())
