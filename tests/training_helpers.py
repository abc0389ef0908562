"""Shared pieces of the training tests: a tiny version of the embedded default config,
subprocess runners and readers of what a run writes."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "rfcn_synthetic.yaml")


def tiny_override(data_dir, steps=4, steps_per_epoch=2, batch_size=2, extra=""):
    """configs/rfcn_synthetic.yaml shrunk to 128x128 images, a quarter-width ResNet-18,
    k = 3 and few RoIs, so one process traces and runs it in well under a minute."""
    parts = [
        "model.backbone.width_multiplier=0.25", "model.head.reduce_channels=32",
        "model.rpn.conv_channels=32", "model.head.group_size=3",
        "model.roi_sampler.ohem_num_rois=64", "model.roi_sampler.ohem_batch_size=32",
        "model.rpn.pre_nms_top_k_train=500", "model.rpn.pre_nms_top_k_test=300",
        "model.rpn.post_nms_top_k_test=50",
        f"train_data.path={data_dir}", f"eval_data.path={data_dir}",
        "train_data.synthetic_num_images=16", "eval_data.synthetic_num_images=16",
        "train_data.synthetic_image_size=[128, 128]", "eval_data.synthetic_image_size=[128, 128]",
        "train_data.short_side=128", "train_data.max_side=128",
        "eval_data.short_side=128", "eval_data.max_side=128",
        f"train.batch_size={batch_size}", f"train.steps={steps}",
        f"train.steps_per_epoch={steps_per_epoch}", "train.optimizer.warmup_steps=1",
        "train.checkpoint_every_steps=1", "train.verbose=2", "eval.batch_size=2",
    ]
    return ",".join(parts + ([extra] if extra else []))


def python_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


def train_command(model_dir, override, mode="train", config=DEFAULT_CONFIG):
    return [sys.executable, "-m", "rfcn_tf.train", f"--config_file={config}",
            f"--model_dir={model_dir}", f"--params_override={override}", f"--mode={mode}"]


def run(command, timeout=240, **env):
    """Runs a command from the repository root; returns the CompletedProcess (text)."""
    return subprocess.run(command, cwd=REPO, env=python_env(**env), capture_output=True,
                          text=True, timeout=timeout, check=False)


def read_train_log(model_dir):
    path = os.path.join(model_dir, "train_log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def ensure_synthetic(data_dir, num_images=16, size=128):
    """Generates the tiny synthetic set once, before processes that share it start."""
    from rfcn_tf.data import synthetic  # pylint: disable=import-outside-toplevel
    return synthetic.ensure_voc(str(data_dir), num_images, [size, size], 0)


def train_in_this_process(config_file, model_dir, override, callback):
    """Trains like `python -m rfcn_tf.train --mode=train` (no evaluation), with `callback`
    added after the built-in ones; for the worker scripts that tests run as subprocesses."""
    from rfcn_tf import configs  # pylint: disable=import-outside-toplevel
    from rfcn_tf.training import loop  # pylint: disable=import-outside-toplevel
    loop.run_training(configs.load_config(config_file, override), model_dir, evaluate=False,
                      extra_callbacks=[callback])


def save_tiny_checkpoint(model_dir, data_dir, extra=""):
    """Saves model_dir/ckpt-1 (model=detector, as rfcn_tf.evaluate restores it) of the
    untrained detector of tiny_override(data_dir, extra=extra); returns its prefix."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from rfcn_tf import configs  # pylint: disable=import-outside-toplevel
    from rfcn_tf.modeling.builder import build_model  # pylint: disable=import-outside-toplevel
    config = configs.load_config(DEFAULT_CONFIG, tiny_override(data_dir, extra=extra))
    detector = build_model(config.model, load_pretrained=False)
    return tf.train.Checkpoint(model=detector).save(os.path.join(str(model_dir), "ckpt"))


def scalar_summary_steps(log_dir):
    """{tag: [steps]} of the scalar summaries in every event file under log_dir."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from tensorboard.backend.event_processing import event_accumulator as ea  # pylint: disable=import-outside-toplevel
    steps = {}
    for path in sorted(tf.io.gfile.glob(os.path.join(log_dir, "events.*"))):
        acc = ea.EventAccumulator(path, size_guidance={ea.TENSORS: 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            steps.setdefault(tag, []).extend(e.step for e in acc.Tensors(tag))
    return steps
