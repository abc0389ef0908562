"""Experiment configs: YAML <-> dataclass round trips, overrides, and clear errors."""

import dataclasses
import glob
import os

import pytest
import yaml

from rfcn_tf import configs
from rfcn_tf.configs import ConfigError, ExperimentConfig, load_config, save_config
from rfcn_tf.training.experiment import validate_experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
REQUIRED = ["rfcn_resnet101_voc.yaml", "rfcn_resnet101_coco.yaml", "rfcn_resnet50_coco.yaml",
            "rfcn_bccd.yaml", "rfcn_synthetic.yaml"]


def _bccd_root():
    root = os.environ.get("RFCN_TF_BCCD") or os.path.join(REPO, "..", "shared", "datasets", "bccd")
    return root if os.path.isdir(root) else None


def test_required_experiment_files_exist():
    names = {os.path.basename(f) for f in CONFIG_FILES}
    assert set(REQUIRED) <= names, f"missing: {sorted(set(REQUIRED) - names)}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_yaml_round_trip(path, tmp_path):
    config = load_config(path)
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    # Every value written in the file reached the dataclass.
    flat = configs.to_dict(config)

    def check(node, expected, where):
        for key, value in expected.items():
            if isinstance(value, dict):
                check(node[key], value, f"{where}{key}.")
            else:
                assert node[key] == value, f"{where}{key}"
    check(flat, raw, "")
    saved = tmp_path / "saved.yaml"
    save_config(config, str(saved))
    assert load_config(str(saved)) == config


def test_dataclass_yaml_dataclass_round_trip(tmp_path):
    config = ExperimentConfig()
    config.model.anchor.scales = [16.0, 48.0]
    config.train.optimizer.decay_boundaries = [10, 20]
    config.eval.metrics = ["coco"]
    config.train_data.class_names = ["a", "b"]
    path = tmp_path / "c.yaml"
    save_config(config, str(path))
    assert load_config(str(path)) == config


def test_overrides_apply_on_top_of_the_file():
    path = os.path.join(REPO, "configs", "rfcn_bccd.yaml")
    config = load_config(path, "train.optimizer.learning_rate=0.5,model.anchor.scales=[16, 32],"
                               "train_data.class_names=[x, y, z],train.distribution=mirrored,"
                               "train.optimizer.warmup_steps=3")
    assert config.train.optimizer.learning_rate == 0.5
    assert config.model.anchor.scales == [16.0, 32.0]
    assert config.train_data.class_names == ["x", "y", "z"]
    assert config.train.distribution == "mirrored"
    assert config.train.optimizer.warmup_steps == 3
    # Untouched keys keep the file's values, not the dataclass defaults.
    assert config.model.backbone.depth == 18
    assert config.train.optimizer.schedule == "cosine"


def test_override_file_is_accepted(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("train:\n  steps: 40\n  steps_per_epoch: 20\n")
    config = load_config(os.path.join(REPO, "configs", "rfcn_bccd.yaml"), str(override))
    assert (config.train.steps, config.train.steps_per_epoch) == (40, 20)


def test_scientific_notation_is_a_float_in_files_and_overrides(tmp_path):
    """As with tf-models-official's loader, 1e-4 (no '.') and 1.5e1 (unsigned exponent) are
    floats: YAML 1.1 resolvers, plain PyYAML's, read them as strings."""
    path = tmp_path / "sci.yaml"
    path.write_text("train:\n  optimizer:\n    weight_decay: 1e-4\n    momentum: 9E-1\n")
    override = tmp_path / "override.yaml"
    override.write_text("train:\n  optimizer:\n    clip_norm: 1.5e1\n")
    config = load_config(str(path), "train.optimizer.learning_rate=2e-3,"
                                    "model.anchor.scales=[3.2e1, 64]")
    opt = config.train.optimizer
    assert (opt.weight_decay, opt.momentum, opt.learning_rate) == (0.0001, 0.9, 0.002)
    assert config.model.anchor.scales == [32.0, 64.0]
    assert load_config(str(path), str(override)).train.optimizer.clip_norm == 15.0
    # Only numbers: text that merely starts like one stays a string.
    assert load_config(None, "train_data.class_names=[1e, e5, 1e-]").train_data.class_names == [
        "1e", "e5", "1e-"]


@pytest.mark.parametrize("text, fragment", [("train: [1\n", "not valid YAML"),
                                            ("- 1\n- 2\n", "must hold a mapping")])
def test_bad_override_file_is_a_config_error(tmp_path, text, fragment):
    override = tmp_path / "override.yaml"
    override.write_text(text)
    with pytest.raises(ConfigError, match=f"params_override file .*{fragment}"):
        load_config(None, str(override))


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  optimizer:\n    learning_rte: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.optimizer\.learning_rte"):
        load_config(str(path))


def test_unknown_key_in_override_is_named():
    with pytest.raises(ConfigError, match=r"model\.backbone\.dept"):
        load_config(None, "model.backbone.dept=50")


@pytest.mark.parametrize("override, key", [
    ("train.steps=many", "train.steps"),
    ("train.optimizer.learning_rate=[1]", "train.optimizer.learning_rate"),
    ("model.backbone.frozen_batch_norm=3", "model.backbone.frozen_batch_norm"),
    ("model.anchor.scales=12", "model.anchor.scales"),
    ("train=3", "train"),
    ("train.steps=2e4", "train.steps"),  # read as the float 20000.0, not an int
    ("train.batch_size=true", "train.batch_size"),  # a bool is no int
    ("train.optimizer.clip_norm=yes", "train.optimizer.clip_norm"),  # YAML 1.1: yes is True
])
def test_wrong_type_is_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, override)


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, "train.steps")
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")


def test_missing_dataset_path_is_a_clear_error(tmp_path):
    config = load_config(os.path.join(REPO, "configs", "rfcn_bccd.yaml"),
                         f"train_data.path={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match=r"train_data\.path.*nowhere.*does not exist"):
        validate_experiment(config, "train")
    config = load_config(None, "eval_data.format=coco,eval_data.path=" + str(tmp_path) +
                               ",eval_data.annotation_file=" + str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match=r"eval_data\.annotation_file.*missing\.json"):
        validate_experiment(config, "eval")
    config = load_config(None, "train_data.format=tfrecord,train_data.path=" +
                               str(tmp_path / "none-*.tfrecord"))
    with pytest.raises(ConfigError, match=r"train_data\.path.*none-\*\.tfrecord"):
        validate_experiment(config, "train")


@pytest.mark.parametrize("override, fragment", [
    ("train.steps=150,train.steps_per_epoch=100", "multiple of train.steps_per_epoch"),
    ("train.distribution=tpu", "train.distribution"),
    ("train.mixed_precision=float16", "train.mixed_precision"),
    ("train.optimizer.schedule=poly", "train.optimizer.schedule"),
    ("eval.metrics=[voc, lvis]", "eval.metrics"),
    ("eval.metrics=[coco],eval.best_metric=voc07_mAP@0.5", "eval.best_metric"),
    ("eval.iou_threshold=1.5", "eval.iou_threshold"),
    ("train.max_checkpoints_to_keep=0", "train.max_checkpoints_to_keep"),
    ("train.checkpoint_every_steps=0", "train.checkpoint_every_steps"),
    ("train.eval_every_epochs=-1", "train.eval_every_epochs"),
])
def test_inconsistent_settings_are_named(override, fragment):
    config = load_config(os.path.join(REPO, "configs", "rfcn_synthetic.yaml"), override)
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        validate_experiment(config, "train_and_eval")


@pytest.mark.parametrize("max_detections, refused", [(9, True), (10, False)])
def test_max_detections_must_suit_the_coco_metric(max_detections, refused):
    """Evaluation with the COCO metric is refused up front where COCOMetric would refuse
    max_detections later (COCOeval's maxDets are 1, 10 and it), naming both keys; without
    COCO (or evaluation) any count is accepted."""
    from rfcn_tf.evaluation.coco_metric import COCOMetric  # pylint: disable=import-outside-toplevel
    synthetic = os.path.join(REPO, "configs", "rfcn_synthetic.yaml")
    config = load_config(synthetic, f"model.detection.max_detections={max_detections}")
    if refused:
        with pytest.raises(ValueError, match="max_detections"):
            COCOMetric(["a"], max_detections=max_detections)
        with pytest.raises(ConfigError, match=rf"model\.detection\.max_detections={max_detections}"
                                              rf".*eval\.metrics=\['voc', 'coco'\]"):
            validate_experiment(config, "eval")
    else:
        COCOMetric(["a"], max_detections=max_detections)
        validate_experiment(config, "eval")
    validate_experiment(config, "train")
    voc_only = load_config(synthetic, f"model.detection.max_detections={max_detections},"
                                      "eval.metrics=[voc],eval.best_metric=voc07_mAP@0.5")
    validate_experiment(voc_only, "train_and_eval")


def test_embedded_default_validates():
    config = load_config(os.path.join(REPO, "configs", "rfcn_synthetic.yaml"))
    validate_experiment(config, "train_and_eval")
    assert config.train_data.format == "synthetic"


def test_bccd_config_points_at_the_shared_dataset(monkeypatch):
    root = _bccd_root()
    if root is None:
        pytest.skip("BCCD not found: set RFCN_TF_BCCD or place it at ../shared/datasets/bccd")
    config = load_config(os.path.join(REPO, "configs", "rfcn_bccd.yaml"))
    assert os.path.normpath(config.train_data.path) == os.path.normpath("../shared/datasets/bccd")
    monkeypatch.chdir(REPO)  # the config's paths are relative to the repository root
    validate_experiment(config, "train_and_eval")
    assert config.model.backbone.depth in (18, 34)
    assert config.model.num_classes == len(config.train_data.class_names) == 3


def test_paper_voc_settings():
    config = load_config(os.path.join(REPO, "configs", "rfcn_resnet101_voc.yaml"))
    opt = config.train.optimizer
    assert (opt.learning_rate, opt.momentum, opt.weight_decay) == (0.001, 0.9, 0.0005)
    assert opt.decay_boundaries == [20000] and config.train.steps == 30000
    assert config.model.head.group_size == 7 and config.model.roi_sampler.ohem_batch_size == 128
    assert config.model.detection.nms_iou == 0.3 and config.model.rpn.post_nms_top_k_test == 300
    assert (config.train_data.short_side, config.train_data.max_side) == (600, 1000)
    assert dataclasses.asdict(config.model.anchor) == {
        "scales": [128.0, 256.0, 512.0], "aspect_ratios": [0.5, 1.0, 2.0]}


def test_override_value_may_contain_equals_signs():
    """Only the first '=' separates the key from the value."""
    assert load_config(None, "train_data.path=/d/a=b").train_data.path == "/d/a=b"


def test_quoted_override_value_may_contain_commas():
    """A comma inside quotes belongs to the value, not to the list of overrides."""
    config = load_config(None, "train_data.path='a,b',train.steps=7")
    assert (config.train_data.path, config.train.steps) == ("a,b", 7)


def test_empty_override_value_clears_a_string_setting():
    """`key=` sets the empty string: here it turns the VOC config's ImageNet start off."""
    path = os.path.join(REPO, "configs", "rfcn_resnet101_voc.yaml")
    assert load_config(path).model.backbone.pretrained == "imagenet"
    assert load_config(path, "model.backbone.pretrained=").model.backbone.pretrained == ""


def test_optimizer_defaults_are_the_paper_settings():
    """DESIGN.md (R-FCN paper settings): "SGD with momentum 0.9 and weight decay 0.0005;
    lr 0.001, then 0.0001" (a decay factor of 0.1)."""
    opt = configs.OptimizerConfig()
    assert (opt.momentum, opt.weight_decay, opt.learning_rate) == (0.9, 0.0005, 0.001)
    assert opt.decay_factor == pytest.approx(0.0001 / 0.001)
