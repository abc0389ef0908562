r"""Train and/or evaluate R-FCN: `python -m rfcn_tf.train`.

  python -m rfcn_tf.train --config_file=configs/rfcn_bccd.yaml --model_dir=runs/bccd \
      [--params_override="train.steps=600,train.optimizer.learning_rate=0.01"] \
      [--mode=train|eval|train_and_eval]

train           trains to train.steps, continuing whatever model_dir holds.
eval            evaluates model_dir's latest checkpoint on eval_data.
train_and_eval  trains, evaluating every train.eval_every_epochs epochs and at
                the end; keeps the best checkpoint by eval.best_metric.

Without --config_file the embedded default (configs/rfcn_synthetic.yaml of
this repository) is used. The run ends by listing what it wrote and the final
metrics. Exit status 1 with a one-line error for a bad config, bad data, a
model_dir whose checkpoint does not fit the configured model or cannot be read,
a diverged run, or a failure to write into model_dir (a full disk, no permission,
a parent that is a file: the line names the file and the OS reason; the same
command then continues from the latest checkpoint or backup once that is fixed).
"""

from __future__ import annotations

import os

import rfcn_tf  # noqa: F401  (tf.keras -> tf_keras before TensorFlow loads)
from absl import app, flags, logging

from rfcn_tf import configs
from rfcn_tf.evaluation import report
from rfcn_tf.training import cli_errors, experiment, loop

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "rfcn_synthetic.yaml")

FLAGS = flags.FLAGS
flags.DEFINE_string("config_file", None, "Experiment YAML (default: the embedded synthetic "
                    "config, configs/rfcn_synthetic.yaml).")
flags.DEFINE_string("model_dir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_string("params_override", "", 'Overrides, "a.b=1,c.d=x", or a YAML file.')
flags.DEFINE_enum("mode", "train_and_eval", list(experiment.MODES), "What to run.")
flags.mark_flag_as_required("model_dir")

# What to do after a failure to write into model_dir (a full disk, no permission, a
# parent that is a file), training and --mode=eval. Checkpoints and backups are written
# under a temporary name and then renamed, so a failed save leaves the earlier ones whole.
TRAIN_WRITE_ADVICE = ("once that is fixed, the same command continues training from the "
                      "latest checkpoint or backup in model_dir")
EVAL_WRITE_ADVICE = "once that is fixed, run the command again"


def _print_block(title: str, lines) -> None:
    print(f"\n{title}")
    for line in lines:
        print(f"  {line}")


def _final_losses(summary: loop.TrainingSummary) -> str:
    logs = summary.final_logs or {}
    names = [n for n in (*loop.LOSS_TERMS, "model_loss", "l2_loss", "loss") if n in logs]
    return ", ".join(f"{n}={logs[n]:.4f}" for n in names)


def run_train(config: configs.ExperimentConfig, model_dir: str, evaluate: bool) -> None:
    summary = loop.run_training(config, model_dir, evaluate=evaluate)
    minutes = summary.seconds / 60.0
    _print_block("Training", [
        f"steps {summary.start_step} -> {summary.final_step} of {config.train.steps} "
        f"in {minutes:.1f} min",
        f"final epoch means: {_final_losses(summary)}" if summary.final_logs else
        "no training step ran in this invocation",
    ])
    _print_block("Wrote", summary.written)
    if summary.best:
        _print_block("Best checkpoint", [
            f"{summary.best['checkpoint']} ({summary.best['metric']} = "
            f"{summary.best['value']:.4f} at step {summary.best['step']})"])
    if summary.eval_results is not None:
        print(f"\nFinal metrics ({config.eval_data.split} split, step {summary.final_step}):")
        print(report.format_table(summary.eval_results))


def run_eval(config: configs.ExperimentConfig, model_dir: str) -> None:
    checkpoint = loop.resolve_checkpoint(model_dir)
    output = loop.evaluate_checkpoint(
        config, checkpoint, unreadable_advice="to evaluate an earlier checkpoint, run python "
                                              "-m rfcn_tf.evaluate --checkpoint=<model_dir>/"
                                              "ckpt-<step>")
    path = report.write_eval_results(output.results,
                                     os.path.join(model_dir, loop.EVAL_RESULTS_FILE))
    _print_block("Wrote", [path])
    print(f"\nMetrics of {checkpoint} ({config.eval_data.split} split):")
    print(report.format_table(output.results))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config_file = FLAGS.config_file or DEFAULT_CONFIG
    errors = (*cli_errors.USER_ERRORS, loop.CheckpointReadError, loop.TrainingDivergedError,
              loop.PeerWorkerLostError)
    advice = EVAL_WRITE_ADVICE if FLAGS.mode == "eval" else TRAIN_WRITE_ADVICE
    with cli_errors.exit_on_user_error("rfcn_tf.train", errors, FLAGS.model_dir, advice):
        config = configs.load_config(config_file, FLAGS.params_override)
        experiment.validate_experiment(config, FLAGS.mode)
        logging.info("config %s, model_dir %s, mode %s", config_file, FLAGS.model_dir, FLAGS.mode)
        if FLAGS.mode == "eval":
            run_eval(config, FLAGS.model_dir)
        else:
            run_train(config, FLAGS.model_dir, evaluate=FLAGS.mode == "train_and_eval")

if __name__ == "__main__":
    app.run(main)
