"""The main job, scripts/train.sh, on the embedded default config at a tiny size:
data -> train with evaluation -> SavedModel export -> evaluation of the export."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

import rfcn_tf  # noqa: F401  (tf.keras -> tf_keras before TensorFlow loads, here via tensorboard)
from training_helpers import REPO, python_env, read_train_log, tiny_override

pytestmark = pytest.mark.slow


def _event_tags(log_dir):
    """{'scalars': set, 'images': set} of the TensorBoard event files in log_dir."""
    from tensorboard.backend.event_processing import event_accumulator as ea  # pylint: disable=import-outside-toplevel
    tags = {"scalars": set(), "images": set()}
    for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        acc = ea.EventAccumulator(path, size_guidance={ea.TENSORS: 0, ea.IMAGES: 0})
        acc.Reload()
        tags["scalars"] |= set(acc.Tags()["tensors"])
        tags["images"] |= set(acc.Tags()["images"]) | {
            t for t in acc.Tags()["tensors"]
            if acc.Tensors(t) and acc.Tensors(t)[0].tensor_proto.dtype == 7}  # DT_STRING
    return tags


def test_train_sh_runs_the_embedded_default_end_to_end(tmp_path):
    model_dir = tmp_path / "run"
    override = tiny_override(tmp_path / "data", steps=6, steps_per_epoch=3,
                             extra="train.eval_every_epochs=0,eval.num_sample_images=2")
    bash = shutil.which("bash")
    result = subprocess.run([bash, os.path.join(REPO, "scripts", "train.sh"),
                             "configs/rfcn_synthetic.yaml", str(model_dir), override],
                            cwd=tmp_path, env=python_env(PYTHON=sys.executable),
                            capture_output=True, text=True, timeout=300, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]

    # 1. data was generated where the config says.
    assert os.path.isfile(tmp_path / "data" / "synthetic.json")
    # 2. training ran to the configured step and says what it wrote and the final metrics.
    assert "steps 0 -> 6 of 6" in output
    assert "Final metrics (test split, step 6)" in output and "voc07_mAP@0.5" in output
    for written in ("config.yaml", "ckpt-6", "eval_results.json", "train_log.jsonl"):
        assert str(model_dir / written) in output, written
    assert os.path.isfile(model_dir / "ckpt-6.index")
    epochs = [r for r in read_train_log(model_dir) if r["event"] == "epoch_end"]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(0, 3), (1, 6)]
    for record in epochs:
        for term in ("rpn_score_loss", "rpn_box_loss", "rfcn_class_loss", "rfcn_box_loss",
                     "model_loss", "l2_loss", "loss", "learning_rate"):
            assert record[term] is not None and record[term] >= 0, term
    # Evaluation only after the last epoch (eval_every_epochs=0), so best = final.
    assert "val_voc07_mAP_0.5" not in epochs[0] and "val_voc07_mAP_0.5" in epochs[1]
    with open(model_dir / "eval_results.json", encoding="utf-8") as f:
        results = json.load(f)
    for key in ("voc07_mAP@0.5", "voc_mAP@0.5", "AP", "AP50", "AP75", "APs", "APm", "APl",
                "voc07_AP@0.5/ellipse", "AP/cross", "rfcn_class_loss", "num_images"):
        assert key in results, key
    assert results["num_images"] == 4  # the test split is 1/4 of 16 images
    with open(model_dir / "best" / "best_metric.json", encoding="utf-8") as f:
        best = json.load(f)
    assert best["metric"] == "voc07_mAP@0.5" and best["step"] == 6
    assert best["value"] == pytest.approx(results["voc07_mAP@0.5"])
    # TensorBoard: losses and learning rate per epoch, metrics and drawn detections per eval.
    train_tags = _event_tags(model_dir / "logs" / "train")
    assert {"epoch_loss", "epoch_rfcn_class_loss", "epoch_learning_rate"} <= train_tags["scalars"]
    eval_tags = _event_tags(model_dir / "logs" / "eval")
    assert {"voc07_mAP_0.5", "AP", "voc07_AP_0.5/ellipse"} <= eval_tags["scalars"]
    assert "detections" in eval_tags["images"]
    # No fault-tolerance state is left behind by a finished run.
    assert not (model_dir / "backup").exists()

    # 3. the SavedModel export of the best checkpoint, and 4. its evaluation.
    assert os.path.isfile(model_dir / "export" / "6" / "saved_model.pb")
    with open(model_dir / "export" / "eval_results.json", encoding="utf-8") as f:
        exported = json.load(f)
    assert exported["num_images"] == results["num_images"]
    # Same weights, same preprocessing: the export scores like the checkpoint. After 6
    # steps both metrics are ~0, so this only checks that the route runs; the detections
    # themselves are compared below.
    for key in ("voc07_mAP@0.5", "AP50"):
        assert exported[key] == pytest.approx(results[key], abs=1e-3), key
    export_path = model_dir / "export" / "6"
    assert (f"Wrote SavedModel {export_path} from {model_dir / 'best' / 'ckpt-6'}"
            in output)
    _assert_export_detects_like_the_checkpoint(
        str(export_path), str(model_dir / "best" / "ckpt-6"), str(model_dir / "config.yaml"),
        override)


def _assert_export_detects_like_the_checkpoint(export_path, checkpoint, config_file, override):
    """The export's serving_default on the original test images == the checkpoint restored
    into the configured model (as rfcn_tf.evaluate does) on the same images through the
    evaluation preprocessing, output for output.

    The checkpoint model is run with the export's PSRoI pooling and NMS (read from its
    metadata: portable, builtin): after 6 steps every score is ~0.2 with near-ties all over, so
    the model's own batched NMS ranks the tied detections differently (whole boxes apart,
    although each flavour agrees with the other on a trained model, which
    test_export_saved_model.py checks). With the same flavour the two graphs differ only
    in how they are traced: measured within 6e-8, so atol 1e-5; classes and
    num_detections exactly.
    """
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from rfcn_tf import configs  # pylint: disable=import-outside-toplevel
    from rfcn_tf.data import preprocess, sources  # pylint: disable=import-outside-toplevel
    from rfcn_tf.export import saved_model  # pylint: disable=import-outside-toplevel
    from rfcn_tf.training import loop  # pylint: disable=import-outside-toplevel

    config = configs.load_config(config_file, override)
    data = config.eval_data
    meta = saved_model.read_metadata(export_path)
    assert (meta["psroi_impl"], meta["nms_version"]) == ("portable", "builtin")
    detector = loop.restore_detector(config.model, checkpoint)
    serve = tf.saved_model.load(export_path).signatures["serving_default"]
    records = sources.open_source(data).records
    assert len(records) == 4
    for record in records:
        image = tf.io.decode_image(tf.io.read_file(record.image_path), channels=3,
                                   expand_animations=False)
        exported = {k: v.numpy() for k, v in serve(input_tensor=image[None]).items()}
        hw = tf.shape(image)[:2]
        size = preprocess.scaled_size(hw, float(data.short_side), float(data.max_side))
        images = preprocess.pad(preprocess.normalize(preprocess.resize(image, size)),
                                data.pad_multiple)
        with detector.traced_with(psroi_impl=meta["psroi_impl"],
                                  nms_version=meta["nms_version"], matmul_convs=False):
            restored = detector({"images": images[None],
                                 "image_info": preprocess.image_info(hw, size)[None]},
                                training=False)
        assert exported["num_detections"][0] > 0, record.image_path  # not vacuous
        for key in saved_model.OUTPUT_KEYS:
            np.testing.assert_allclose(exported[key], restored[key].numpy(), rtol=0,
                                       atol=1e-5 if "boxes" in key or "scores" in key else 0,
                                       err_msg=f"{key} of {record.image_path}")
