"""rfcn_tf.evaluate's input checks (the full command runs in test_training_end_to_end)."""

import pytest

from rfcn_tf import configs, evaluate


def test_missing_saved_model_is_a_file_not_found_error(tmp_path):
    config = configs.ExperimentConfig()
    config.eval_data.format = "synthetic"
    with pytest.raises(FileNotFoundError, match="no SavedModel at .*absent"):
        evaluate.evaluate_saved_model(config, str(tmp_path / "absent"), keep_detections=False)
    # A directory without saved_model.pb (e.g. the export root instead of its version).
    with pytest.raises(FileNotFoundError, match="no SavedModel at"):
        evaluate.evaluate_saved_model(config, str(tmp_path), keep_detections=False)


def test_tfrecord_eval_data_is_refused_for_a_saved_model(tmp_path):
    config = configs.ExperimentConfig()
    config.eval_data.format = "tfrecord"
    with pytest.raises(configs.ConfigError, match="tfrecord"):
        evaluate.evaluate_saved_model(config, str(tmp_path), keep_detections=False)
