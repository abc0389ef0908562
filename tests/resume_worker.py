"""Trains like `python -m rfcn_tf.train --mode=train`, snapshotting the state it resumed.

  python tests/resume_worker.py CONFIG_FILE MODEL_DIR OVERRIDE SNAPSHOT_PREFIX

Runs rfcn_tf.training.loop.run_training (no evaluation), writing the `start_batch` that
it builds the training dataset with to SNAPSHOT_PREFIX.start_batch, and with one extra
callback: before the first batch of the run, after every restore (the latest
checkpoint, then the BackupAndRestore backup), it writes tf.train.Checkpoint(model=<the
trainer>) to SNAPSHOT_PREFIX. The trainer is what the backup saves under "model", so the two
checkpoints share the keys of the detector's variables and the optimizer's state, and a
test can compare them value by value.
"""

import sys

import rfcn_tf  # noqa: F401
import tensorflow as tf
import tf_keras

from training_helpers import train_in_this_process


class SnapshotFirstBatch(tf_keras.callbacks.Callback):
    def __init__(self, prefix):
        super().__init__()
        self.prefix = prefix
        self.written = False

    def on_train_batch_begin(self, batch, logs=None):
        if not self.written:
            tf.train.Checkpoint(model=self.model).write(self.prefix)
            self.written = True


def record_start_batch(path):
    """Makes loop._build_dataset write the training dataset's start_batch to `path`."""
    from rfcn_tf.training import loop  # pylint: disable=import-outside-toplevel
    build = loop._build_dataset

    def recording(data_config, batch_size, input_context=None, start_batch=0):
        if data_config.is_training:
            with open(path, "w", encoding="utf-8") as f:
                f.write(str(start_batch))
        return build(data_config, batch_size, input_context, start_batch)
    loop._build_dataset = recording


def main(config_file, model_dir, override, prefix):
    record_start_batch(prefix + ".start_batch")
    train_in_this_process(config_file, model_dir, override, SnapshotFirstBatch(prefix))


if __name__ == "__main__":
    main(*sys.argv[1:5])
